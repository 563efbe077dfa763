-- Fencing: a relay whose lock session ended (terminated, the server restarted) stops publishing
-- and marks nothing more, even on its other connection, while another session holds the shard's
-- lock; a standby process takes over; every event reaches the stream once, in order per key.
-- The state changes are one log line each, saying what happened.
local H = require "relay_helper"
local qx = require "qx"
local core = require "qx.core"
local support = require "support"

local FAST = "--poll-interval 0.05 --idle-interval 0.2 --lock-retry 0.2 --batch-size 50"
    .. " --max-in-flight 16 --ack-timeout-ms 1000 --max-attempts 0 --verbose"

local LOCK_HOLDER = [[
SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = hashtext('qx_relay')::oid
  AND a.application_name = $1]]

local TAKE_LOCK = [[
SELECT pg_try_advisory_lock(hashtext('qx_relay'), hashtext(current_schema() || ' shard 0 of 1'))
       AS ok]]

local function published(ctx)
    return H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events"
                      .. " WHERE published_at IS NOT NULL")[1].n
end

local function terminate(admin, app)
    local rows = assert(admin:query("SELECT pg_terminate_backend(pid) AS done FROM ("
                                    .. LOCK_HOLDER .. ") s", app))
    return rows[1] and rows[1].done
end

describe("relay fencing #slow", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function() H.teardown(ctx) end)

    it("lock session terminated mid-batch while another takes the lock: nothing more marked, nothing lost",
       function()
        local app = "qx-fence-spec-" .. core.uuid():sub(-12)
        local evs = H.commit_many(ctx, 1500, 80, 150)
        local relay = assert(qx.relay{ url = ctx.url .. "&application_name=" .. app,
                                       nats = ctx.conn, batch_size = 100, max_in_flight = 16,
                                       poll_interval_ms = 20, idle_interval_ms = 100,
                                       lock_retry_ms = 50, max_attempts = 0 })
        local admin = assert(qx.connect{ url = support.db_url(), pool_size = 1 })
        -- the other session: same schema, so the same lock
        local other = assert(qx.connect{ url = ctx.url, pool_size = 1 })
        local other_conn = assert(other:acquire())
        local calls, holding, marked, lost, standby_calls = 0, false, nil, 0, 0
        local deadline = core.clock() + 60
        assert(relay:run{ on_batch = function(r, e)
            calls = calls + 1
            if r.lock_lost then
                lost = lost + 1
                assert.is_false(r.leader)
                assert.truthy(e and tostring(e):find("shard lock is gone", 1, true), tostring(e))
            end
            if calls == 3 then
                -- batch 3 is marked; batch 4 is claimed on the relay's other connection and
                -- being published: its lock session goes, and another session takes the lock
                assert.truthy(terminate(admin, app))
                assert(H.wait_until(function()
                    return assert(other_conn:query(TAKE_LOCK))[1].ok
                end, 10), "the lock was not released")
                holding, marked = true, published(ctx)
            elseif holding then
                -- nothing is marked under the other session's lock, on either connection
                assert.equal(marked, published(ctx))
                if not r.leader then standby_calls = standby_calls + 1 end
                if standby_calls >= 5 then
                    assert(other_conn:query("SELECT pg_advisory_unlock_all()"))
                    holding = false
                end
            end
            if (not holding and calls > 3 and r.claimed == 0 and H.pending(ctx) == 0)
               or core.clock() > deadline then
                return false
            end
        end })
        relay:close()
        other_conn:release()
        other:close()
        admin:close()
        assert.equal(1, lost)
        assert.equal(0, H.pending(ctx))
        H.check_stream(ctx, evs)
    end)

    it("leader's lock session terminated mid-batch, a standby waiting: one publisher at a time, all in order",
       function()
        local app_a = "qx-fence-a-" .. core.uuid():sub(-12)
        local a = H.spawn_relay(ctx, FAST, "QX_DB__URL=" .. H.sh(ctx.url .. "&application_name=" .. app_a))
        assert(H.wait_until(function() return H.log_of(ctx, a):find("leader of its shard", 1, true) end, 20))
        local b = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, b):find("standby", 1, true) end, 20))
        H.slow_marks(ctx, 0.05)
        local admin = assert(qx.connect{ url = support.db_url(), pool_size = 1 })
        local evs = {}
        for round = 1, 6 do
            for _, ev in ipairs(H.commit_many(ctx, 150, 23, 30)) do evs[#evs + 1] = ev end
            if round == 2 then
                H.sleep(0.15) -- mid-batch: marks take 50 ms each
                assert.truthy(terminate(admin, app_a), "no lock session to terminate")
            end
        end
        assert(H.wait_until(function() return H.pending(ctx) == 0 end, 60),
               H.pending(ctx) .. " pending")
        admin:close()
        -- A reconnects and waits as a standby (slower under the sanitizers: wait for its word)
        H.wait_until(function()
            local log = H.log_of(ctx, a)
            local at = log:find("shard lock lost", 1, true)
            return at and log:find("standby: another relay holds this shard", at, true)
        end, 30)
        local log_a, log_b = H.kill(ctx, a, "TERM"), H.kill(ctx, b, "TERM")
        H.check_stream(ctx, evs)
        -- one line says the lock went; after it A publishes and marks nothing (B leads)
        local lost_at = log_a:find("shard lock lost: its database session ended", 1, true)
        assert.truthy(lost_at, log_a)
        local after = log_a:sub(lost_at)
        assert.truthy(after:find("standby: another relay holds this shard", 1, true), log_a)
        assert.is_nil(after:match("published [1-9]%d* %("), log_a)
        assert.is_nil(log_a:find("batch failed", 1, true), log_a)
        assert.truthy(log_b:find("leader of its shard", 1, true), log_b)
        -- A says it lost the lock as soon as it finds out: at its next claim, mark or window of
        -- publishing, so within moments of B taking it (B cannot take it before A's session
        -- ended; what A may still send meanwhile is fenced off above). The logs' clock is in
        -- whole seconds, and a sanitized relay is slow: a bound of 3 s.
        local function seconds(ts)
            local h, m, sec = ts:match("T(%d+):(%d+):(%d+)Z$")
            return tonumber(h) * 3600 + tonumber(m) * 60 + tonumber(sec)
        end
        local lost_ts = log_a:match("(%S+) qx relay: shard lock lost")
        local took_ts = log_b:match("(%S+) qx relay: leader of its shard")
        assert.truthy(lost_ts and took_ts, log_a .. log_b)
        assert.is_true(seconds(lost_ts) <= seconds(took_ts) + 3, log_a .. log_b)
    end)

    it("database lost: one line saying so, not that another relay holds the shard", function()
        -- a role of its own, whose log-ins can be refused while the rest of the server runs
        local role = "qx_fence_" .. core.uuid():sub(-12):gsub("-", "")
        assert(ctx.db:exec("CREATE ROLE " .. role .. " LOGIN"))
        for _, grant in ipairs({ "USAGE ON SCHEMA %s", "ALL ON ALL TABLES IN SCHEMA %s",
                                 "ALL ON ALL SEQUENCES IN SCHEMA %s" }) do
            assert(ctx.db:exec("GRANT " .. grant:format(ctx.name) .. " TO " .. role))
        end
        local url = ctx.url:gsub("://[^@/]*@", "://" .. role .. "@", 1)
        assert(url ~= ctx.url, "the test server's url names no user")
        local r = H.spawn_relay(ctx, FAST, "QX_DB__URL=" .. H.sh(url))
        local ok, e = pcall(function()
            assert(H.wait_until(function()
                return H.log_of(ctx, r):find("leader of its shard", 1, true)
            end, 20), H.log_of(ctx, r))
            assert(ctx.db:exec("ALTER ROLE " .. role .. " NOLOGIN"))
            assert(ctx.db:query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                .. " WHERE usename = $1", role))
            assert(H.wait_until(function()
                return H.log_of(ctx, r):find("database lost", 1, true)
            end, 10), H.log_of(ctx, r))
            assert(ctx.db:exec("ALTER ROLE " .. role .. " LOGIN"))
            assert(H.wait_until(function()
                local log = H.log_of(ctx, r)
                local lost = log:find("database lost", 1, true)
                return lost and log:find("leader of its shard", lost, true)
            end, 20), H.log_of(ctx, r))
            local evs = H.commit_many(ctx, 20, 3, 20)
            assert(H.wait_until(function() return H.pending(ctx) == 0 end, 20))
            local log = H.kill(ctx, r, "TERM")
            assert.is_nil(log:find("another relay holds this shard", 1, true), log)
            -- each change once: lock gone, database lost, leader again
            local _, lost_lines = log:gsub("database lost", "")
            assert.equal(1, lost_lines, log)
            H.check_stream(ctx, evs)
        end)
        if H.alive(r) then H.kill(ctx, r, "KILL") end
        ctx.db:exec("ALTER ROLE " .. role .. " LOGIN")
        ctx.db:exec("DROP OWNED BY " .. role)
        ctx.db:exec("DROP ROLE " .. role)
        assert(ok, e)
    end)
end)

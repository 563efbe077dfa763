-- The relay when things break, with relays as separate `qx relay` processes: kill -9 under
-- load, a standby taking over, sharded processes, nats-server stopped and frozen; and in
-- process, its PostgreSQL sessions terminated while batches are marked and claimed. Afterwards
-- every committed event is on the stream exactly once and in order per partition key.
-- Bounded: a few thousand events, a few kills, seconds of outage.
local H = require "relay_helper"

-- a fast-moving relay: short intervals, small batches so a kill lands mid-batch often
local FAST = "--poll-interval 0.05 --idle-interval 0.2 --lock-retry 0.2 --batch-size 100"
    .. " --max-in-flight 64 --ack-timeout-ms 1000 --max-attempts 0"

local function drained(ctx, seconds)
    return H.wait_until(function() return H.pending(ctx) == 0 end, seconds)
end

local function published_by(log)
    local n = 0
    for p in log:gmatch("published (%d+) %(") do n = n + tonumber(p) end
    return n
end

describe("relay processes #novalgrind #slow", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function() H.teardown(ctx) end)

    it("kill -9 at random moments under load: every event on the stream once, in order per key", function()
        math.randomseed(os.time())
        local relays = { H.spawn_relay(ctx, FAST), H.spawn_relay(ctx, FAST) } -- a leader and a standby
        local all = {}
        for round = 1, 8 do
            for _, ev in ipairs(H.commit_many(ctx, 250, 31, 25)) do all[#all + 1] = ev end
            H.sleep(math.random() * 0.3)
            -- kill one at random (often the leader, mid-batch) and start a fresh one
            local i = math.random(#relays)
            H.kill(ctx, relays[i], "KILL")
            relays[i] = H.spawn_relay(ctx, FAST)
            if round % 3 == 0 then
                -- now and then both go at once
                local j = 3 - i
                H.kill(ctx, relays[j], "KILL")
                relays[j] = H.spawn_relay(ctx, FAST)
            end
        end
        assert(drained(ctx, 60), "the outbox did not drain: " .. H.pending(ctx) .. " pending")
        H.check_stream(ctx, all)
        assert.equal(2000, #all)
    end)

    it("a standby takes over within seconds when the leader is killed", function()
        local a = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, a):find("leader of its shard", 1, true) end, 10))
        local b = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, b):find("standby", 1, true) end, 10))
        local first = H.commit_many(ctx, 20, 4, 20)
        assert(drained(ctx, 10))
        H.kill(ctx, a, "KILL")
        local t0 = require("qx.core").clock()
        local second = H.commit_many(ctx, 20, 4, 20)
        assert(drained(ctx, 10), "the standby did not take over")
        local took = require("qx.core").clock() - t0
        assert.is_true(took < 5, "took " .. took .. " s")
        local log = H.kill(ctx, b, "TERM")
        assert.truthy(log:find("leader of its shard", 1, true), log)
        for _, ev in ipairs(second) do first[#first + 1] = ev end
        H.check_stream(ctx, first)
    end)

    it("two sharded processes publish every event once, each key from one of them", function()
        local r0 = H.spawn_relay(ctx, FAST .. " --shard-id 0 --shard-count 2 --verbose")
        local r1 = H.spawn_relay(ctx, FAST .. " --shard-id 1 --shard-count 2 --verbose")
        local evs = H.commit_many(ctx, 600, 29, 30)
        assert(drained(ctx, 30))
        local log0, log1 = H.kill(ctx, r0, "TERM"), H.kill(ctx, r1, "TERM")
        local n0, n1 = published_by(log0), published_by(log1)
        assert.is_true(n0 > 0 and n1 > 0, log0 .. log1)
        assert.equal(600, n0 + n1)
        H.check_stream(ctx, evs)
    end)

    it("SIGTERM finishes the batch in flight and exits cleanly", function()
        local r = H.spawn_relay(ctx, FAST)
        -- a SIGTERM before the relay runs would just end the process (a slow start, under ASan)
        assert(H.wait_until(function() return H.log_of(ctx, r):find("leader", 1, true) end, 20))
        local evs = H.commit_many(ctx, 500, 7, 50)
        H.sleep(0.05)
        local log = H.kill(ctx, r, "TERM")
        assert.truthy(log:find("stopped:", 1, true), log)
        -- whatever it published is marked: a second relay publishes the rest, none twice
        local r2 = H.spawn_relay(ctx, FAST .. " --verbose")
        assert(drained(ctx, 20))
        local log2 = H.kill(ctx, r2, "TERM")
        local msgs = H.check_stream(ctx, evs)
        assert.equal(500, #msgs)
        assert.is_nil(log2:match("%(([1-9]%d*) duplicates%)"), log2)
    end)
end)

describe("relay and PostgreSQL sessions that die #slow", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function() H.teardown(ctx) end)

    it("its sessions terminated under load, again and again: every event once, in order per key", function()
        local qx = require "qx"
        local core = require "qx.core"
        local app = "qx-relay-spec-" .. core.uuid():sub(-12)
        -- 80 keys: batches start wide enough for the gathering NATS connection too
        local evs = H.commit_many(ctx, 3000, 80, 150)
        local relay = assert(qx.relay{ url = ctx.url .. "&application_name=" .. app, nats = ctx.conn,
                                       batch_size = 100, poll_interval_ms = 20, idle_interval_ms = 100,
                                       lock_retry_ms = 50, max_attempts = 0 })
        local admin = assert(qx.connect{ url = require("support").db_url(), pool_size = 1 })
        local batches, kills, errors = 0, 0, 0
        local deadline = core.clock() + 90
        assert(relay:run{ on_batch = function(r, e)
            batches = batches + 1
            if e then errors = errors + 1 end
            -- every third callback, one of the relay's two sessions goes, whichever it is doing
            if batches % 3 == 0 and kills < 12 then
                local rows = assert(admin:query([[SELECT pg_terminate_backend(pid) AS done
          FROM (SELECT pid FROM pg_stat_activity WHERE application_name = $1
                ORDER BY random() LIMIT 1) s]], app))
                if rows[1] and rows[1].done then kills = kills + 1 end
            end
            if (r.claimed == 0 and H.pending(ctx) == 0) or core.clock() > deadline then return false end
        end })
        relay:close()
        admin:close()
        assert.is_true(kills >= 5, "only " .. kills .. " sessions were terminated")
        assert.is_true(errors > 0)
        assert.equal(0, H.pending(ctx))
        H.check_stream(ctx, evs)
    end)
end)

describe("relay and a failing nats-server #novalgrind #slow", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function()
        -- never leave the server frozen or down for the specs that follow
        H.nats_thaw()
        if not H.alive(H.nats_pid() or 0) then H.nats_start() end
        H.teardown(ctx)
    end)

    it("nats-server stopped, then frozen, for seconds under load: failures retried uncounted, nothing lost, "
       .. "publishing resumes",
       function()
        local r = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, r):find("leader of its shard", 1, true) end, 10))
        local all = H.commit_many(ctx, 400, 13, 20)

        -- stopped: the connection drops; events committed meanwhile wait in the outbox
        H.nats_stop()
        for _ = 1, 3 do
            for _, ev in ipairs(H.commit_many(ctx, 100, 13, 20)) do all[#all + 1] = ev end
            H.sleep(1)
        end
        H.nats_start()
        assert(drained(ctx, 30), "publishing did not resume: " .. H.pending(ctx) .. " pending\n" .. H.log_of(ctx, r))

        -- frozen: the connection stays up but nothing is acked, so attempts fail on timeout
        local frozen_from = #all
        H.nats_freeze()
        for _ = 1, 3 do
            for _, ev in ipairs(H.commit_many(ctx, 100, 13, 20)) do all[#all + 1] = ev end
            H.sleep(1)
        end
        H.nats_thaw()
        assert(drained(ctx, 60), "publishing did not resume after the freeze: " .. H.pending(ctx) .. " pending")

        -- the failures were the transport's: retried, never counted, nothing dead-lettered
        local counted = H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events"
            .. " WHERE attempts > 0 OR dead_at IS NOT NULL")[1].n
        assert.equal(0, counted)
        local errors = H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events WHERE last_error LIKE 'timeout:%'")[1].n
        assert.is_true(errors > 0)
        assert.is_true(frozen_from < #all)
        H.kill(ctx, r, "TERM")
        H.check_stream(ctx, all)
    end)
end)

describe("qx relay started while NATS is unreachable #novalgrind #slow", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function()
        if not H.alive(H.nats_pid() or 0) then H.nats_start() end
        H.teardown(ctx)
    end)

    it("keeps trying, logging each attempt, and publishes once NATS is up; SIGTERM stops it cleanly",
       function()
        local port = assert(os.getenv("QX_TEST_NATS_PORT"))
        H.nats_stop()
        local evs = H.commit_many(ctx, 20, 3, 10)
        -- credentials in the url: the log names the server, never the password
        local r = H.spawn_relay(ctx, FAST .. " --servers nats://relayuser:s3cret@127.0.0.1:" .. port)
        H.sleep(3)
        assert.is_true(H.alive(r), "the relay gave up: " .. H.log_of(ctx, r))
        local log = H.log_of(ctx, r)
        local _, attempts = log:gsub("cannot connect to NATS at nats://127%.0%.0%.1:" .. port, "")
        assert.is_true(attempts >= 2, log)
        assert.is_nil(log:find("s3cret", 1, true), log)
        H.nats_start()
        assert(drained(ctx, 30), "nothing published after NATS came up\n" .. H.log_of(ctx, r))
        log = H.kill(ctx, r, "TERM")
        assert.truthy(log:find("stopped:", 1, true), log)
        H.check_stream(ctx, evs)
    end)

    it("stops on SIGTERM while it waits for NATS", function()
        local r = H.spawn_relay(ctx, FAST .. " --servers nats://127.0.0.1:1")
        assert(H.wait_until(function()
            return H.log_of(ctx, r):find("cannot connect to NATS", 1, true) end, 10))
        local log = H.kill(ctx, r, "TERM")
        assert.falsy(H.alive(r))
        assert.truthy(log:find("stopped before NATS was reached", 1, true), log)
    end)

    it("gives up after QX_NATS__RECONNECT_ATTEMPTS further attempts, each one logged", function()
        local out, code = H.cli(ctx, "relay --servers nats://127.0.0.1:1",
                                "QX_NATS__RECONNECT_ATTEMPTS=2 QX_NATS__RECONNECT_WAIT_SECONDS=0.1")
        assert.equal(1, code, out)
        local _, attempts = out:gsub("cannot connect to NATS at nats://127%.0%.0%.1:1", "")
        assert.equal(3, attempts, out)
    end)
end)

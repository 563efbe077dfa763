-- qx through a PostgreSQL failover (scripts/pg-standby.sh): a primary and a streaming standby
-- on 127.0.0.1, QX_DB__URL naming both hosts with target_session_attrs=read-write, the primary
-- stopped at once (-m immediate) under load and the standby promoted. Units of work keep
-- committing, a relay process keeps publishing. Run once, in the Lua 5.4 run only (#cluster).
local qx = require "qx"
local core = require "qx.core"
local support = require "support"
local H = require "relay_helper"

local clock = core.clock

local FAST = "--poll-interval 0.05 --idle-interval 0.2 --lock-retry 0.2 --batch-size 100"
    .. " --max-in-flight 64 --ack-timeout-ms 2000"

local function script(args)
    local p = assert(io.popen("bash scripts/pg-standby.sh " .. args .. " 2>&1; echo \"rc=$?\""))
    local out = p:read("*a")
    p:close()
    assert(tonumber(out:match("rc=(%d+)%s*$")) == 0, "pg-standby.sh " .. args .. ":\n" .. out)
    return out
end

local function read_env(dir)
    local f = assert(io.open(dir .. "/env"))
    local env = {}
    for k, v in f:read("*a"):gmatch("export ([%w_]+)='?([^'\n]*)'?") do env[k] = v end
    f:close()
    return env
end

local Ledger = qx.integration_event("spec.failover.entry", { version = 1 })

describe("a PostgreSQL failover #cluster #slow #novalgrind", function()
    local dir, env, ctx
    local report = {}

    local function start(mode)
        dir = os.tmpname()
        os.remove(dir)
        script("start " .. dir .. (mode == "sync" and " sync" or ""))
        env = read_env(dir)
        local db = assert(qx.connect{ url = env.QX_DB__URL, pool_size = 4, connect_timeout_ms = 2000 })
        assert(qx.migrate(db))
        assert(db:exec("CREATE TABLE ledger (id uuid PRIMARY KEY, k text NOT NULL, n int NOT NULL)"))
        local name = support.unique("failover")
        local conn = assert(qx.nats.connect{ servers = support.nats_url(), stream = name:upper(),
                                             subject_prefix = "spec." .. name })
        assert(conn:ensure_stream())
        ctx = { url = env.QX_DB__URL, db = db, conn = conn, stream = name:upper(),
                prefix = "spec." .. name, servers = support.nats_url(), classes = {},
                counters = {}, children = {} }
    end

    after_each(function()
        if ctx then
            for pid in pairs(ctx.children) do H.kill(ctx, pid, "KILL") end
            ctx.conn:delete_stream()
            ctx.conn:close()
            ctx.db:close()
        end
        ctx = nil
        if dir then
            pcall(script, "stop " .. dir)
            os.execute("rm -rf " .. dir)
        end
        dir = nil
    end)

    teardown(function()
        if #report > 0 then io.stderr:write("\npg failover: ", table.concat(report, "; "), "\n") end
    end)

    -- commits for `seconds` (failing over after `at` seconds, in the background): one ledger row
    -- and one event per unit of work, 7 keys; returns the acknowledged ids, the errors by code,
    -- and the seconds from the first error to the next success
    local function load(seconds, at)
        local acked, errors, n = {}, {}, 0
        local first_error, back
        local t0 = clock()
        local failed_over = false
        while clock() - t0 < seconds do
            if not failed_over and clock() - t0 >= at then
                os.execute("bash scripts/pg-standby.sh failover " .. dir .. " >/dev/null 2>&1 &")
                failed_over = true
            end
            n = n + 1
            local id, key = qx.uuid(), "k" .. (n % 7)
            local ok, e = ctx.db:unit_of_work(function(uow)
                uow:exec("INSERT INTO ledger (id, k, n) VALUES ($1, $2, $3)", id, key, n)
                local ev = Ledger{ id = id, key = key, n = n }
                ev.aggregate_type, ev.aggregate_id = "ledger", key
                uow:record(ev)
            end)
            if ok then
                acked[#acked + 1] = id
                if first_error and not back then back = clock() - first_error end
            else
                errors[e.code] = (errors[e.code] or 0) + 1
                first_error = first_error or clock()
                H.sleep(0.02)
            end
        end
        return acked, errors, back
    end

    local function missing(acked)
        local rows = assert(ctx.db:query("SELECT id::text AS id FROM ledger"))
        local have = {}
        for _, r in ipairs(rows) do have[r.id] = true end
        local lost = 0
        for _, id in ipairs(acked) do if not have[id] then lost = lost + 1 end end
        return lost, #rows
    end

    it("with a synchronous standby: no acknowledged commit is lost, writes resume within seconds, "
       .. "the relay publishes every committed event once", function()
        start("sync")
        ctx.classes["spec.failover.entry"] = Ledger
        local relay = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, relay):find("leader of its shard", 1, true) end, 15),
               H.log_of(ctx, relay))
        local acked, errors, back = load(6, 2)
        assert(back, "no unit of work succeeded after the failover")
        assert.is_true(back < 10, ("writes resumed after %.1f s"):format(back))
        for code in pairs(errors) do
            assert.is_true(code == "connection" or code == "unknown_outcome",
                           "a unit of work ended with " .. code)
        end
        local lost, rows = missing(acked)
        assert.equal(0, lost)
        report[#report + 1] = ("synchronous: %d acknowledged, %d lost, writing again %.2f s after the"
            .. " first error"):format(#acked, lost, back)
        -- the relay finds the new primary, takes its lock there and publishes what it holds
        assert(H.wait_until(function() return H.pending(ctx) == 0 end, 60),
               H.pending(ctx) .. " pending\n" .. H.log_of(ctx, relay))
        local log = H.kill(ctx, relay, "TERM")
        local msgs = H.read_stream(ctx)
        local seen = {}
        for _, m in ipairs(msgs) do
            assert(not seen[m.env.event_id], "published twice: " .. m.env.event_id)
            seen[m.env.event_id] = true
        end
        assert.equal(rows, #msgs, log)
    end)

    it("with an asynchronous standby: writes resume within seconds; the acknowledged commits lost "
       .. "are counted", function()
        start("async")
        local acked, errors, back = load(5, 2)
        assert(back, "no unit of work succeeded after the failover")
        assert.is_true(back < 10, ("writes resumed after %.1f s"):format(back))
        for code in pairs(errors) do
            assert.is_true(code == "connection" or code == "unknown_outcome",
                           "a unit of work ended with " .. code)
        end
        local lost = missing(acked)
        report[#report + 1] = ("asynchronous: %d acknowledged, %d lost, writing again %.2f s after the"
            .. " first error"):format(#acked, lost, back)
    end)
end)

-- qx on a three-node JetStream cluster (scripts/nats-cluster.sh, via spec/nats_servers.lua) with
-- a stream of three replicas: a relay process publishing and a consumer with an inbox consuming
-- while the stream's leader is killed, or a node frozen. Afterwards every committed event is on
-- the stream exactly once and in order per key, none was dead-lettered or counted as an
-- attempt, and the consumer handled each once, in order per key. Run once, in the Lua 5.4 run
-- only (#cluster); bounded to a few thousand events and a minute of outage.
local qx = require "qx"
local core = require "qx.core"
local H = require "relay_helper"
local servers = require "nats_servers"

local clock = core.clock

local FAST = "--poll-interval 0.05 --idle-interval 0.2 --lock-retry 0.2 --batch-size 100"
    .. " --max-in-flight 64 --ack-timeout-ms 2000 --max-attempts 3"

local function drained(ctx, seconds)
    return H.wait_until(function() return H.pending(ctx) == 0 end, seconds)
end

-- How long a drain after a fault may take. nats-server before 2.11 can drop a message whose id
-- a leader change had staged, and ack its retries as duplicates of nothing; the relay retries
-- such a row until the stream stores it, at the latest when the duplicate window (2 minutes)
-- has passed (docs/relay.md). A quiet drain takes seconds.
local AFTER_FAULT = 150

-- seconds until an event committed now is published (nil: not within `limit`)
local function time_to_publish(ctx, limit)
    local t0 = clock()
    local probe = H.commit(ctx, { { key = "probe" } })[1]
    local done = H.wait_until(function()
        return H.sql(ctx, "SELECT published_at IS NOT NULL AS done FROM qx_outbox_events"
            .. " WHERE id = $1", probe.event_id)[1].done
    end, limit)
    return done and clock() - t0, probe
end

-- a consumer with an inbox on the cluster; take(seconds) consumes for that long and checks that
-- no event comes twice and each key's events come in order
local function consumer_of(ctx)
    local conn = assert(qx.nats.connect{ servers = ctx.servers, stream = ctx.stream,
                                         subject_prefix = ctx.prefix, reconnect_wait_ms = 200 })
    local classes = {}
    for _, c in pairs(ctx.classes) do classes[#classes + 1] = c end
    local c = assert(qx.consumer{ nats = conn, stream = ctx.stream, durable = "cluster",
                                  db = ctx.db, registry = qx.registry(classes), ack_wait = 5 })
    local seen, last, count = {}, {}, 0
    local broken = {} -- the first violations, for the message of a count that falls short
    local function check(ok, why)
        if not ok then
            if #broken < 5 then broken[#broken + 1] = why end
            error(why)
        end
    end
    local function handle(ev)
        check(not seen[ev.event_id], "event " .. ev.event_id .. " handled twice")
        seen[ev.event_id] = true
        count = count + 1
        local key, n = ev.key, ev.n
        if key ~= "" and key ~= "probe" then
            check(n > (last[key] or 0), ("key %s: %d after %d"):format(key, n, last[key] or 0))
            last[key] = n
        end
    end
    local self = {}
    function self.take(seconds)
        local deadline = clock() + seconds
        repeat
            c:run_once(handle, { timeout_ms = 200, batch = 100 }) -- errors during a fault: go on
        until clock() > deadline
    end
    function self.count() return count end
    function self.broken() return #broken == 0 and "none broken" or table.concat(broken, "; ") end
    function self.until_all(n, seconds)
        local deadline = clock() + seconds
        while count < n and clock() < deadline do
            c:run_once(handle, { timeout_ms = 500, batch = 100 })
        end
        return count
    end
    function self.close()
        c:close()
        conn:close()
    end
    return self
end

local function check_nothing_counted(ctx)
    local n = H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events"
        .. " WHERE attempts > 0 OR dead_at IS NOT NULL")[1].n
    assert.equal(0, n, "events counted as failed or dead-lettered")
end

describe("a three-node JetStream cluster #cluster #slow #novalgrind", function()
    local set, ctx, consumer, warm
    local report = {}

    before_each(function()
        set = servers.start{ nodes = 3 }
        ctx = H.setup{ servers = set:urls(), replicas = 3 }
        warm = H.commit(ctx, { { key = "warm" } })[1] -- the consumer's registry learns the class
    end)

    after_each(function()
        if consumer then consumer.close() end
        consumer = nil
        if ctx then pcall(H.teardown, ctx) end
        ctx = nil
        set:stop_all()
    end)

    teardown(function()
        -- the figures of this run, for bench/RESULTS.md
        if #report > 0 then io.stderr:write("\ncluster: ", table.concat(report, "; "), "\n") end
    end)

    it("the stream leader killed mid-load, then restarted: nothing lost or doubled, order kept, "
       .. "publishing again within seconds",
       function()
        local relay = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, relay):find("leader of its shard", 1, true) end, 15),
               H.log_of(ctx, relay))
        local all = H.commit_many(ctx, 300, 13, 20)
        table.insert(all, 1, warm)
        consumer = consumer_of(ctx)
        consumer.take(0.5)
        local leader = assert(servers.wait_until(function() return set:stream_leader(ctx.stream) end, 10),
                              "no stream leader")
        leader:kill()
        local resumed, probe = time_to_publish(ctx, 30)
        assert(resumed, "nothing published within 30 s of the leader's death\n" .. H.log_of(ctx, relay))
        all[#all + 1] = probe
        report[#report + 1] = ("stream leader killed: publishing again after %.2f s"):format(resumed)
        for _ = 1, 4 do
            for _, ev in ipairs(H.commit_many(ctx, 50, 13, 10)) do all[#all + 1] = ev end
            consumer.take(0.3)
        end
        leader:restart()
        for _, ev in ipairs(H.commit_many(ctx, 100, 13, 20)) do all[#all + 1] = ev end
        assert(drained(ctx, AFTER_FAULT), H.pending(ctx) .. " pending\n" .. H.log_of(ctx, relay))
        H.kill(ctx, relay, "TERM")
        H.check_stream(ctx, all)
        check_nothing_counted(ctx)
        assert.equal(#all, consumer.until_all(#all, 60), consumer.broken())
    end)

    it("the stream leader frozen for 10 s under load behaves like a slow network", function()
        local relay = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, relay):find("leader of its shard", 1, true) end, 15),
               H.log_of(ctx, relay))
        consumer = consumer_of(ctx)
        local all = H.commit_many(ctx, 200, 13, 20)
        table.insert(all, 1, warm)
        local leader = assert(servers.wait_until(function() return set:stream_leader(ctx.stream) end, 10))
        leader:freeze()
        local t0 = clock()
        while clock() - t0 < 10 do
            for _, ev in ipairs(H.commit_many(ctx, 20, 13, 10)) do all[#all + 1] = ev end
            consumer.take(0.5)
        end
        leader:thaw()
        assert(servers.wait_until(function() return set:stream_leader(ctx.stream) end, 20))
        assert(drained(ctx, AFTER_FAULT), H.pending(ctx) .. " pending\n" .. H.log_of(ctx, relay))
        H.kill(ctx, relay, "TERM")
        H.check_stream(ctx, all)
        check_nothing_counted(ctx)
        assert.equal(#all, consumer.until_all(#all, 60), consumer.broken())
    end)

    it("the relay's own server frozen for 60 s: publishing resumes through another node within seconds, "
       .. "nothing dead-lettered",
       function()
        -- the relay tries the servers in the order given: it is connected to n1
        local relay = H.spawn_relay(ctx, FAST)
        assert(H.wait_until(function() return H.log_of(ctx, relay):find("leader of its shard", 1, true) end, 15),
               H.log_of(ctx, relay))
        local all = H.commit_many(ctx, 200, 13, 20)
        table.insert(all, 1, warm)
        assert(drained(ctx, 30))
        local n1 = set:node("n1")
        n1:freeze()
        local t0 = clock()
        local resumed, probe = time_to_publish(ctx, 40)
        assert(resumed, "nothing published within 40 s of the freeze\n" .. H.log_of(ctx, relay))
        all[#all + 1] = probe
        report[#report + 1] = ("relay's server frozen: publishing again after %.2f s"):format(resumed)
        while clock() - t0 < 60 do
            for _, ev in ipairs(H.commit_many(ctx, 50, 13, 10)) do all[#all + 1] = ev end
            H.sleep(1)
        end
        assert(drained(ctx, AFTER_FAULT), H.pending(ctx) .. " pending while n1 is frozen\n" .. H.log_of(ctx, relay))
        n1:thaw()
        -- n1 rejoins (its replica catches up, leaderships may move): as after the frozen leader
        -- above, the stream has a leader again, then what was committed meanwhile goes out
        for _, ev in ipairs(H.commit_many(ctx, 50, 13, 10)) do all[#all + 1] = ev end
        assert(servers.wait_until(function() return set:stream_leader(ctx.stream) end, 20),
               "no stream leader within 20 s of the thaw")
        assert(drained(ctx, AFTER_FAULT), H.pending(ctx) .. " pending after the thaw\n" .. H.log_of(ctx, relay))
        local log = H.kill(ctx, relay, "TERM")
        H.check_stream(ctx, all)
        check_nothing_counted(ctx)
        assert.is_nil(log:find("dead-lettered)", 1, true), log)
    end)
end)

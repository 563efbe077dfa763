-- Many processes on one outbox and one durable: two relay shards with a standby each and three
-- consumer processes sharing a durable (with the inbox), under load, with relays and consumers
-- killed (-9) and restarted at random. Afterwards every committed event is on the stream once,
-- in order per key, and was handled exactly once. Run once, in the Lua 5.4 run only (#cluster).
local core = require "qx.core"
local H = require "relay_helper"
local R = require "runner_helper"

local clock = core.clock

local FAST = "--poll-interval 0.05 --idle-interval 0.2 --lock-retry 0.2 --batch-size 100"
    .. " --max-in-flight 64 --ack-timeout-ms 2000"

describe("many relays and consumers #cluster #slow #novalgrind", function()
    local ctx
    local consumers, next_id = {}, 0
    local report = {}

    local function consumer()
        next_id = next_id + 1
        return R.spawn("spec/runners/keyed_consumer.lua", {
            QX_DB__URL = ctx.url, QX_NATS__SERVERS = ctx.servers, RUNNER_STREAM = ctx.stream,
            RUNNER_DURABLE = "many", RUNNER_ID = next_id,
        })
    end

    before_each(function()
        ctx = H.setup()
        H.sql(ctx, "CREATE TABLE handled (event_id uuid NOT NULL, k text, n int, pid int)")
    end)

    after_each(function()
        for _, c in ipairs(consumers) do R.finish(c, 5, H.wait_until) end
        consumers = {}
        H.teardown(ctx)
    end)

    teardown(function()
        if #report > 0 then io.stderr:write("\nmany processes: ", table.concat(report, "; "), "\n") end
    end)

    it("two relay shards with a standby each and three consumers on one durable, killed at random: "
       .. "nothing lost, nothing handled twice, per-key order kept on the stream", function()
        math.randomseed(os.time())
        local relays = {}
        for i = 1, 4 do
            relays[i] = H.spawn_relay(ctx, FAST .. (" --shard-id %d --shard-count 2"):format((i - 1) % 2))
        end
        for i = 1, 3 do consumers[i] = consumer() end
        local all = {}
        for round = 1, 8 do
            for _, ev in ipairs(H.commit_many(ctx, 300, 23, 15)) do all[#all + 1] = ev end
            H.sleep(math.random() * 0.4)
            local i = math.random(#relays)
            H.kill(ctx, relays[i], "KILL")
            relays[i] = H.spawn_relay(ctx, FAST .. (" --shard-id %d --shard-count 2"):format((i - 1) % 2))
            if round % 2 == 0 then
                local j = math.random(#consumers)
                R.signal(consumers[j], "KILL")
                R.finish(consumers[j], 5, H.wait_until)
                consumers[j] = consumer()
            end
        end
        -- the time the standbys take over: kill both leaders (the processes whose last word on
        -- leadership is that they took it) and see the next events out
        assert(H.wait_until(function() return H.pending(ctx) == 0 end, 60), H.pending(ctx) .. " pending")
        local leaders
        local function find_leaders()
            leaders = {}
            for i, pid in ipairs(relays) do
                local log = H.log_of(ctx, pid)
                local took = select(2, log:gsub("leader of its shard", ""))
                local left = select(2, log:gsub("shard lock lost", ""))
                    + select(2, log:gsub("database lost", ""))
                if took > left then leaders[#leaders + 1] = i end
            end
            return #leaders == 2
        end
        -- a standby that replaced a killed leader takes the lock within lock_retry
        assert(H.wait_until(find_leaders, 10), "expected one leader per shard, found " .. #leaders)
        local t0 = clock()
        for _, i in ipairs(leaders) do H.kill(ctx, relays[i], "KILL") end
        local after = H.commit_many(ctx, 46, 23, 46)
        for _, ev in ipairs(after) do all[#all + 1] = ev end
        assert(H.wait_until(function() return H.pending(ctx) == 0 end, 60),
               H.pending(ctx) .. " pending")
        report[#report + 1] = ("both shard leaders killed: the standbys published the next events %.2f s"
            .. " later"):format(clock() - t0)
        H.check_stream(ctx, all)

        local function counts()
            return H.sql(ctx, "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM handled")[1]
        end
        local t1 = clock()
        assert(H.wait_until(function() return counts().d >= #all end, 60),
               counts().d .. " of " .. #all .. " handled")
        report[#report + 1] = ("consumers: every event handled %.2f s after the last one was out")
            :format(clock() - t1)
        local c = counts()
        assert.equal(#all, c.d)
        assert.equal(c.d, c.n, "an event was handled twice")
        for _, ch in ipairs(consumers) do R.signal(ch, "TERM") end
        for _, ch in ipairs(consumers) do
            local code, log = R.finish(ch, 20, H.wait_until)
            assert.equal(0, code, log)
        end
        consumers = {}
    end)
end)

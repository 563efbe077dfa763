-- A NATS connection notices a server that stops answering by its unanswered PINGs and moves to
-- the next server of its list, on private nats-servers (spec/nats_servers.lua).
local core = require "qx.core"
local nats = require "qx.messaging.nats"
local servers = require "nats_servers"

local clock = core.clock
local pause = servers.pause

describe("qx.nats failover", function()
    local set

    after_each(function()
        if set then set:stop_all() end
        set = nil
    end)

    it("notices a frozen server within seconds by its unanswered pings and publishes through the next one #slow",
       function()
        set = servers.start{ nodes = 2, cluster = false } -- two JetStream servers on their own
        local a, b = set.nodes[1], set.nodes[2]
        -- the stream lives on b only: while connected to a, a publish finds no stream
        local on_b = assert(nats.connect{ servers = b:url() })
        assert(on_b:ensure_stream{ name = "FAILOVER", subjects = { "failover.>" } })
        on_b:close()

        local conn = assert(nats.connect{ servers = set:urls(), ping_interval_ms = 200,
                                          max_pings_outstanding = 2, reconnect_wait_ms = 100,
                                          publish_timeout_ms = 500 })
        assert.equal("connected", conn:state())
        assert.is_nil((conn:publish("failover.x", "0", nil, nil)), "connected to the first server")

        a:freeze()
        local t0 = clock()
        local ack
        while not ack and clock() - t0 < 10 do
            ack = conn:publish("failover.x", "1", nil, nil)
            if not ack then pause(0.05) end
        end
        local took = clock() - t0
        assert.is_table(ack, "no publish through the second server within 10 s")
        assert.equal("FAILOVER", ack.stream)
        -- about ping_interval * (max_pings_outstanding + 1), plus a publish timeout
        assert.is_true(took < 5, ("took %.1f s"):format(took))
        assert.equal("connected", conn:state())
        conn:close()
    end)

    it("uses pings every 2 s with 2 outstanding by default, from QX_NATS__* or the options", function()
        local s = assert(nats.settings({}, function() end))
        assert.equal(2000, s.ping_interval_ms)
        assert.equal(2, s.max_pings_outstanding)
        local env = { QX_NATS__PING_INTERVAL_SECONDS = "0.5", QX_NATS__MAX_PINGS_OUTSTANDING = "4" }
        s = assert(nats.settings({}, function(k) return env[k] end))
        assert.equal(500, s.ping_interval_ms)
        assert.equal(4, s.max_pings_outstanding)
        s = assert(nats.settings({ ping_interval_seconds = 1, max_pings_outstanding = 1 },
                                 function(k) return env[k] end))
        assert.equal(1000, s.ping_interval_ms)
        assert.equal(1, s.max_pings_outstanding)
    end)

    it("refuses a ping interval or a ping count that is not positive, naming the setting", function()
        for _, case in ipairs({
            { {}, { QX_NATS__PING_INTERVAL_SECONDS = "0" }, "QX_NATS__PING_INTERVAL_SECONDS" },
            { {}, { QX_NATS__PING_INTERVAL_SECONDS = "often" }, "QX_NATS__PING_INTERVAL_SECONDS" },
            { {}, { QX_NATS__MAX_PINGS_OUTSTANDING = "0" }, "QX_NATS__MAX_PINGS_OUTSTANDING" },
            { { max_pings_outstanding = 1.5 }, {}, "max_pings_outstanding" },
            { { ping_interval_ms = -1 }, {}, "ping_interval_ms" },
        }) do
            local s, e = nats.settings(case[1], function(k) return case[2][k] end)
            assert.is_nil(s)
            assert.equal("invalid", e.code)
            assert.equal(case[3], e.setting)
        end
        assert.has_error(function()
            nats.settings({ ping_interval_seconds = 1, ping_interval_ms = 1000 }, function() end)
        end)
        assert.has_error(function() core.nats{ servers = "nats://127.0.0.1:1", ping_interval_ms = 0 } end)
        assert.has_error(function() core.nats{ servers = "nats://127.0.0.1:1", max_pings_out = 0 } end)
    end)
end)

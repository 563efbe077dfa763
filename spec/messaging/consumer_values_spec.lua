-- What a consumer's handler gets is what was published: numbers of their own type (Lua 5.4
-- keeps integers and floats apart) and nested documents as tables, against a real nats-server.
local support = require "support"
local qx = require "qx"
local nats = require "qx.messaging.nats"
local publisher = require "qx.messaging.publisher"
local values = require "json_values"

describe("consumer json values", function()
    local conn, s
    local Sent = qx.integration_event(support.unique("spec.values.sent"), { version = 1 })

    setup(function()
        conn = assert(nats.connect{ servers = support.nats_url() })
    end)

    teardown(function()
        if conn then conn:close() end
    end)

    before_each(function()
        s = { name = support.unique("VALUES"):upper(), prefix = support.unique("vspec") }
        assert(conn:ensure_stream{ name = s.name, subjects = { s.prefix .. ".>" } })
        s.pub = assert(publisher.new{ nats = conn, subject_prefix = s.prefix })
    end)

    after_each(function()
        conn:delete_stream(s.name)
    end)

    -- hands back what the handler got for each of the events published
    local function consume(events)
        local c = assert(qx.consumer{ nats = conn, stream = s.name, durable = support.unique("d"),
                                      registry = qx.registry{ Sent }, batch = #events })
        local got = {}
        local counts = assert(c:run_once(function(ev) got[#got + 1] = ev end, { timeout_ms = 5000 }))
        c:close()
        assert.equal(#events, counts.handled)
        return got
    end

    it("hands the handler integers as integers and floats as floats", function()
        local sent = Sent{ doc = values.numbers(), n = 7 }
        assert(s.pub:publish(sent))
        local got = consume({ sent })
        values.assert_same(values.numbers(), got[1].doc)
        assert.equal("boom on 7", "boom on " .. tostring(got[1].n))
    end)

    it("hands the handler a nested document as a table at every depth the publisher accepts", function()
        local events = {}
        for d = 990, 1003 do
            local ev = Sent{ doc = values.nest(d) }
            local ack, e = s.pub:publish(ev)
            if ack == nil then
                assert.equal("invalid", e.code)
                assert.matches("1000", e.message)
            else
                events[#events + 1] = ev
            end
        end
        assert.is_true(#events > 0 and #events < 14, #events .. " of 14 accepted")
        local got = consume(events)
        for i, ev in ipairs(events) do
            assert.equal(values.depth(ev.doc), values.depth(got[i].doc))
        end
    end)
end)

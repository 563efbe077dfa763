-- qx.consumer and event evolution, against a real nats-server and PostgreSQL: envelopes of older
-- versions and of an old name on the stream reach the handler as today's class; an upcaster
-- that fails dead-letters the message with its step, nothing handled.
local support = require "support"
local qx = require "qx"
local nats = require "qx.messaging.nats"
local publisher = require "qx.messaging.publisher"

describe("qx.consumer: evolution", function()
    local db, conn
    local streams = {}

    setup(function()
        db = support.migrated_db{ pool_size = 2 }
        conn = assert(nats.connect{ servers = support.nats_url() })
    end)

    teardown(function()
        for _, name in ipairs(streams) do conn:delete_stream(name) end
        if conn then conn:close() end
        if db then db:close() end
    end)

    -- a stream of its own, and yesterday's deploy publishing Placed v1 { total } under old_name
    local function setup_stream(old_name)
        local s = { name = support.unique("EVOLVE"):upper(), prefix = support.unique("evospec"),
                    durable = support.unique("d") }
        assert(conn:ensure_stream{ name = s.name, subjects = { s.prefix .. ".>" } })
        streams[#streams + 1] = s.name
        s.pub = assert(publisher.new{ nats = conn, subject_prefix = s.prefix })
        local OldPlaced = qx.integration_event(old_name, { version = 1 })
        for _, total in ipairs({ 10, 20 }) do
            assert(s.pub:publish(OldPlaced{ total = total }))
        end
        return s
    end

    local function run(s, registry, handler)
        local c = assert(qx.consumer{ nats = conn, stream = s.name, durable = s.durable,
                                      registry = registry, db = db })
        local counts = { fetched = 0, handled = 0, termed = 0 }
        for _ = 1, 20 do -- until both came (a loaded machine may hand them out over fetches)
            local got = assert(c:run_once(handler, { timeout_ms = 500 }))
            for k in pairs(counts) do counts[k] = counts[k] + (got[k] or 0) end
            if counts.fetched >= 3 then break end
        end
        c:close()
        return counts
    end

    it("hands envelopes of an old name and older versions to the handler as the new class, upcast", function()
        local old_name, new_name = support.unique("evo.order_placed"), support.unique("evo.placed")
        local s = setup_stream(old_name)
        local Placed = qx.integration_event(new_name, { version = 2, aliases = { old_name } })
        Placed:upcast(1, function(p, meta)
            p.total_cents = p.total * 100; p.total = nil; p.was = meta.event_name; return p
        end)
        assert(s.pub:publish(Placed{ total_cents = 5, was = "new" }))
        local seen = {}
        local counts = run(s, qx.registry{ Placed }, function(ev)
            assert(Placed:is(ev), "not the new class")
            seen[#seen + 1] = ("%s v%d %d %s"):format(ev.event_name, ev.event_version, ev.total_cents, ev.was)
        end)
        assert.equal(3, counts.handled)
        assert.same({ new_name .. " v2 1000 " .. old_name, new_name .. " v2 2000 " .. old_name,
                      new_name .. " v2 5 new" }, seen)
    end)

    it("dead-letters a message whose upcaster fails, naming the step, without running the handler", function()
        local name = support.unique("evo.order_placed")
        local s = setup_stream(name)
        local Placed = qx.integration_event(name, { version = 2 })
        Placed:upcast(1, function(p) if p.total == 20 then return "oops" end return p end)
        assert(s.pub:publish(Placed{ total = 1 }))
        local handled = {}
        local counts = run(s, qx.registry{ Placed }, function(ev) handled[#handled + 1] = ev.total end)
        assert.same({ 10, 1 }, handled)
        assert.equal(1, counts.termed)
        local rows = assert(db:query([[SELECT reason, error, event_version FROM qx_dead_letters
WHERE stream = $1]], s.name))
        assert.equal(1, #rows)
        assert.equal("invalid_message", rows[1].reason)
        assert.matches("upcaster v1 %-> v2 returned a string", rows[1].error)
    end)
end)

-- `qx consumer status|dead|replay|purge-inbox` as a user runs it, against a real PostgreSQL
-- (a schema of its own) and nats-server (a stream of its own).
local H = require "relay_helper"
local qx = require "qx"
local publisher = require "qx.messaging.publisher"
local support = require "support"

local Paid = qx.integration_event("spec.cli.paid", { version = 1 })

describe("qx consumer #slow", function()
    local ctx, durable, c
    local fail = true

    local function handler()
        if fail then return nil, "the handler is broken" end
        return true
    end

    before_each(function()
        ctx = H.setup()
        durable = support.unique("cli")
        c = assert(qx.consumer{ nats = ctx.conn, stream = ctx.stream, durable = durable,
                                registry = qx.registry{ Paid }, db = ctx.db, max_deliver = 1 })
        local pub = assert(publisher.new{ nats = ctx.conn, subject_prefix = ctx.prefix })
        assert(pub:publish(Paid{ amount = 1 }))
        assert(pub:publish(Paid{ amount = 2 }))
        fail = true
        local counts = assert(c:run_once(handler, { timeout_ms = 3000, batch = 2 }))
        if counts.fetched < 2 then assert(c:run_once(handler, { timeout_ms = 3000 })) end
    end)

    after_each(function()
        c:close()
        H.teardown(ctx)
    end)

    local function dead_ids()
        local rows = assert(ctx.db:query("SELECT id::text AS id FROM qx_dead_letters "
            .. "WHERE consumer = $1 AND replayed_at IS NULL ORDER BY dead_at, id", durable))
        local ids = {}
        for i, r in ipairs(rows) do ids[i] = r.id end
        return ids
    end

    it("dead lists the dead letters, oldest first, with reason and deliveries", function()
        local out, code = H.cli(ctx, "consumer dead --durable " .. durable)
        assert.equal(0, code, out)
        local ids = dead_ids()
        assert.equal(2, #ids)
        local first, second = out:find(ids[1], 1, true), out:find(ids[2], 1, true)
        assert(first and second and first < second, out)
        assert.matches("spec.cli.paid  max_deliver  deliveries 1", out, 1, true)
        assert.matches("the handler is broken", out, 1, true)
        out, code = H.cli(ctx, "consumer dead --durable " .. durable .. " --limit 1")
        assert.equal(0, code)
        assert.falsy(out:find(ids[2], 1, true))
        out, code = H.cli(ctx, "consumer dead --durable nobody")
        assert.equal(0, code)
        assert.matches("no dead letters", out, 1, true)
    end)

    it("replay publishes a dead letter again: the consumer handles it, it is marked replayed", function()
        local ids = dead_ids()
        local out, code = H.cli(ctx, "consumer replay --durable " .. durable .. " " .. ids[1])
        assert.equal(0, code, out)
        assert.matches("1 dead letter(s) republished", out, 1, true)
        assert.same({ ids[2] }, dead_ids())
        fail = false
        local counts = assert(c:run_once(handler, { timeout_ms = 3000 }))
        assert.equal(1, counts.handled)
        -- again: nothing left to replay under that id
        out, code = H.cli(ctx, "consumer replay --durable " .. durable .. " " .. ids[1])
        assert.equal(0, code, out)
        assert.matches("0 dead letter(s) republished", out, 1, true)
        out, code = H.cli(ctx, "consumer replay --durable " .. durable .. " --all")
        assert.equal(0, code, out)
        assert.matches("1 dead letter(s) republished", out, 1, true)
        counts = assert(c:run_once(handler, { timeout_ms = 3000 }))
        assert.equal(1, counts.handled)
        assert.same({}, dead_ids())
    end)

    it("replay refuses a bad id, both ids and --all, and neither, publishing nothing", function()
        local before = assert(ctx.conn:stream_info()).messages
        local out, code = H.cli(ctx, "consumer replay --durable " .. durable .. " not-a-uuid")
        assert.equal(2, code, out)
        assert.matches("not a uuid", out, 1, true)
        out, code = H.cli(ctx, "consumer replay --durable " .. durable .. " --all " .. dead_ids()[1])
        assert.equal(2, code, out)
        out, code = H.cli(ctx, "consumer replay --durable " .. durable)
        assert.equal(2, code, out)
        assert.equal(before, assert(ctx.conn:stream_info()).messages)
        assert.equal(2, #dead_ids())
    end)

    it("purge-inbox deletes inbox rows older than --older-than, and only this consumer's", function()
        fail = false
        assert(H.cli(ctx, "consumer replay --durable " .. durable .. " --all"))
        assert(c:run_once(handler, { timeout_ms = 3000, batch = 2 }))
        local function inbox()
            return assert(ctx.db:query("SELECT count(*) AS n FROM qx_inbox WHERE consumer = $1",
                                       durable))[1].n
        end
        local n = inbox()
        assert.is_true(n >= 1)
        local out, code = H.cli(ctx, "consumer purge-inbox --durable " .. durable
            .. " --older-than 3600")
        assert.equal(0, code, out)
        assert.matches("0 inbox row(s) purged", out, 1, true)
        out, code = H.cli(ctx, "consumer purge-inbox --durable other --older-than 0")
        assert.equal(0, code, out)
        assert.equal(n, inbox())
        out, code = H.cli(ctx, "consumer purge-inbox --durable " .. durable .. " --older-than 0")
        assert.equal(0, code, out)
        assert.matches(n .. " inbox row(s) purged", out, 1, true)
        assert.equal(0, inbox())
        for _, bad in ipairs{ "--older-than -1", "--older-than soon", "" } do
            out, code = H.cli(ctx, "consumer purge-inbox --durable " .. durable .. " " .. bad)
            assert.equal(2, code, bad .. ": " .. out)
        end
    end)

    it("status shows the durable's pending, ack pending and redelivered counts", function()
        local pub = assert(publisher.new{ nats = ctx.conn, subject_prefix = ctx.prefix })
        assert(pub:publish(Paid{ amount = 3 }))
        local out, code = H.cli(ctx, "consumer status --durable " .. durable)
        assert.equal(0, code, out)
        assert.matches("consumer:               " .. ctx.stream .. "/" .. durable, out, 1, true)
        assert.matches("pending (not delivered): 1", out, 1, true)
        assert.matches("redelivered, unacked:   0", out, 1, true)
        out, code = H.cli(ctx, "consumer status --durable " .. support.unique("nobody"))
        assert.equal(1, code, out)
    end)

    it("refuses an unknown subcommand, a missing --durable, an unknown flag, with code 2", function()
        for _, args in ipairs{ "consumer", "consumer frobnicate --durable x", "consumer dead",
                               "consumer dead --durable x --bogus 1", "consumer dead --durable x y" } do
            local out, code = H.cli(ctx, args)
            assert.equal(2, code, args .. ": " .. out)
            assert.matches("qx: ", out, 1, true)
        end
    end)
end)

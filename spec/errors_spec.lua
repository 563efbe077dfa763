-- Errors keep their meaning and point at the caller: a domain error raised inside a unit of work
-- comes back as that error, misuse names the caller's line through qx's layers, and a NATS
-- connection that cannot be had says which servers were tried.
local qx = require "qx"
local support = require "support"

local HERE = "errors_spec%.lua:%d+: "

describe("errors", function()
    local db

    setup(function() db = support.migrated_db{ pool_size = 2 } end)
    teardown(function() if db then db:close() end end)

    it("a table raised with a code inside a unit of work is the error, fields kept", function()
        local ok, e = db:unit_of_work(function()
            error({ code = "insufficient_funds", message = "balance 10 is below 50", balance = 10 })
        end)
        assert.is_nil(ok)
        assert.equal("insufficient_funds", e.code)
        assert.equal("balance 10 is below 50", e.message)
        assert.equal(10, e.balance)
        assert.is_true(qx.error.is(e))
        assert.equal("insufficient_funds: balance 10 is below 50", tostring(e))
    end)

    it("qx.error.fail and qx.error.new make domain errors a unit of work returns as they are", function()
        local ok, e = db:unit_of_work(function()
            error(qx.error.new("insufficient_funds", "short", { balance = 3 }))
        end)
        assert.is_nil(ok)
        assert.equal("insufficient_funds: short", tostring(e))
        assert.equal(3, e.balance)
        local n, f = qx.error.fail("not_allowed", "no")
        assert.is_nil(n)
        assert.is_true(qx.error.is(f))
    end)

    it("a table raised without a code stays an error of code 'error' that keeps the value", function()
        local raised = { reason = "x" }
        local ok, e = db:unit_of_work(function() error(raised) end)
        assert.is_nil(ok)
        assert.equal("error", e.code)
        assert.equal(raised, e.value)
    end)

    it("es:append misuse inside a unit of work names the handler's line, not uow.lua", function()
        local store = qx.event_store{ db = db }
        local ok, e = db:unit_of_work(function(uow)
            uow:store(store):append("x")
        end)
        assert.is_nil(ok)
        assert.matches(HERE .. "es:append: expected an event%-sourced aggregate", e.message)
        assert.is_nil(e.message:find("uow.lua", 1, true))
    end)

    it("qx.nats.connect says which servers it tried, without their credentials", function()
        local conn, e = qx.nats.connect{ servers = "nats://bob:s3cret@127.0.0.1:1,nats://127.0.0.1:2",
                                         connect_timeout_ms = 300 }
        assert.is_nil(conn)
        assert.equal("connection", e.code)
        assert.matches("nats://127.0.0.1:1", e.message, 1, true)
        assert.matches("nats://127.0.0.1:2", e.message, 1, true)
        assert.is_nil(e.message:find("s3cret", 1, true))
        assert.is_nil(e.message:find("bob", 1, true))
    end)
end)

-- qx.event_sourced: aggregates whose state is the fold of their events (no database here; the
-- event store specs cover storage).
local qx = require "qx"
local aggregate = require "qx.model.aggregate"

describe("qx.model.event_sourced", function()
    local Deposited = qx.event("es_spec.money_deposited")
    local Withdrawn = qx.event("es_spec.money_withdrawn")
    local Frozen = qx.event("es_spec.account_frozen")
    local Opened = qx.integration_event("es_spec.account_opened")

    local function account_class(opts)
        local Account = qx.event_sourced("EsSpecAccount", opts)
        Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        Account:on("es_spec.money_withdrawn", function(self, ev)
            self.balance = (self.balance or 0) - ev.amount
        end)
        function Account:deposit(n) self:record(Deposited{ amount = n }) end
        function Account:withdraw(n)
            if (self.balance or 0) < n then error("insufficient funds", 2) end
            self:record(Withdrawn{ amount = n })
        end
        return Account
    end

    it("record buffers the event and applies it at once", function()
        local Account = account_class()
        local acc = Account.new("a-1")
        acc:deposit(10)
        acc:deposit(5)
        assert.equal(15, acc.balance)
        local pending = acc:pending_events()
        assert.equal(2, #pending)
        assert.equal("es_spec.money_deposited", pending[1].event_name)
        assert.equal(10, pending[1].amount)
        assert.equal("EsSpecAccount", pending[1].aggregate_type)
        assert.equal("a-1", pending[1].aggregate_id)
        assert.equal(0, acc.version) -- record does not move the stored version
    end)

    it("pull_events drains the buffer, oldest first", function()
        local Account = account_class()
        local acc = Account.new("a-2")
        acc:deposit(1)
        acc:withdraw(1)
        local evs = acc:pull_events()
        assert.equal(2, #evs)
        assert.is_true(Deposited:is(evs[1]))
        assert.is_true(Withdrawn:is(evs[2]))
        assert.same({}, acc:pull_events())
        assert.equal(0, acc.balance) -- state stays
    end)

    it("replay restores state and version without buffering", function()
        local Account = account_class()
        local acc = Account.new("a-3")
        acc:replay({ Deposited{ amount = 7 }, Deposited{ amount = 3 }, Withdrawn{ amount = 4 } })
        assert.equal(6, acc.balance)
        assert.equal(3, acc.version)
        assert.same({}, acc:pending_events())
    end)

    it("from_events builds a new instance at the version of its events", function()
        local Account = account_class()
        local acc = Account.from_events("a-4", { Deposited{ amount = 2 }, Deposited{ amount = 2 } })
        assert.equal("a-4", acc.id)
        assert.equal(4, acc.balance)
        assert.equal(2, acc.version)
        assert.is_true(aggregate.is_aggregate(acc))
        assert.same({}, acc:pending_events())
    end)

    it("an event without a handler is ignored on replay but still counts as a version", function()
        local Account = account_class()
        local acc = Account.from_events("a-5", { Deposited{ amount = 2 }, Frozen{}, Deposited{ amount = 1 } })
        assert.equal(3, acc.balance)
        assert.equal(3, acc.version)
    end)

    it("in strict mode an event without a handler raises on replay and on record", function()
        local Account = account_class({ strict = true })
        assert.has_error(function() Account.from_events("a-6", { Frozen{} }) end,
            "replay: event 1: EsSpecAccount has no handler for es_spec.account_frozen (strict)")
        local acc = Account.new("a-6")
        assert.has_error(function() acc:record(Frozen{}) end)
        assert.same({}, acc:pending_events()) -- nothing buffered when applying failed
    end)

    it("a handler that raises leaves nothing buffered", function()
        local Account = account_class()
        local acc = Account.new("a-7")
        assert.has_error(function() acc:withdraw(5) end, "insufficient funds")
        assert.same({}, acc:pending_events())
    end)

    it("integration events can be recorded but cannot have a handler", function()
        local Account = account_class({ strict = true })
        local acc = Account.new("a-8")
        acc:record(Opened{ owner = "ada" })
        assert.equal(1, #acc:pending_events())
        assert.has_error(function() Account:on(Opened, function() end) end)
    end)

    it("Class.new takes an id or a table of fields, and Class(id) is the same", function()
        local Account = account_class()
        assert.equal("x", Account.new("x").id)
        assert.has_error(function() Account.new(42) end, Account.aggregate_type .. ": id must be a string, got number")
        assert.equal("y", Account("y").id)
        local acc = Account.new{ id = "z", balance = 3 }
        assert.equal(3, acc.balance)
        assert.equal(0, acc.version)
        assert.is_string(Account.new().id) -- a fresh uuid
    end)

    it("snapshot and restore copy the fields by default and can be overridden", function()
        local Account = account_class()
        local acc = Account.from_events("s-1", { Deposited{ amount = 9 } })
        local state = acc:snapshot()
        assert.same({ balance = 9 }, state)
        local copy = Account.new("s-1")
        copy:restore(state)
        assert.equal(9, copy.balance)

        local Custom = qx.event_sourced("EsSpecCustom")
        function Custom:snapshot() return { b = self.balance } end
        function Custom:restore(s) self.balance = s.b end
        local c = Custom.new("c")
        c.balance = 4
        assert.same({ b = 4 }, c:snapshot())
    end)

    it("refuses bad definitions and misuse with a clear message", function()
        assert.has_error(function() qx.event_sourced("1bad") end)
        assert.has_error(function() qx.event_sourced("Ok", { nope = true }) end,
            "event_sourced: unknown option 'nope' (known: strict, snapshot_version)")
        assert.has_error(function() qx.event_sourced("Ok", { snapshot_version = 0 }) end)
        local Account = account_class()
        assert.has_error(function() Account:on(Deposited, function() end) end,
            "on: EsSpecAccount already has a handler for es_spec.money_deposited")
        assert.has_error(function() Account:on({}, function() end) end)
        assert.has_error(function() Account:on(Frozen, "not a function") end)
        assert.has_error(function() Account.new({ on = 1 }) end)
        assert.has_error(function() Account.new(true) end)
        assert.has_error(function() Account.new("r"):replay({ "not an event" }) end)
    end)

    it("handlers are found by name, so every version of an event reaches one handler", function()
        local V2 = qx.event("es_spec.money_deposited", { version = 2 })
        local Account = account_class()
        local acc = Account.new("v")
        acc:record(V2{ amount = 5 })
        assert.equal(5, acc.balance)
        assert.is_true(Account:handles(Deposited))
        assert.is_true(Account:handles("es_spec.money_withdrawn"))
        assert.is_false(Account:handles(Frozen))
    end)
end)

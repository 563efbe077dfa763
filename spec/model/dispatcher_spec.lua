local event = require "qx.model.event"
local dispatcher = require "qx.model.dispatcher"
local qx_error = require "qx.error"


describe("qx.model.dispatcher", function()
    local Deposited = event.define("account.money_deposited")
    local Withdrawn = event.define("account.money_withdrawn")
    local DepositedV2 = event.define("account.money_deposited", { version = 2 })

    local d, calls
    before_each(function()
        d = dispatcher.new()
        calls = {}
    end)

    local function recorder(tag)
        return function(ev, ctx)
            calls[#calls + 1] = { tag = tag, name = ev.event_name, ctx = ctx }
        end
    end

    local function tags()
        local out = {}
        for i = 1, #calls do out[i] = calls[i].tag end
        return out
    end

    describe("publish", function()
        it("calls the handlers of the event's name with the event and the context", function()
            d:on(Deposited, recorder("a"))
            local ev, ctx = Deposited{ amount = 1 }, { uow = true }
            assert.equal(1, d:publish(ev, ctx))
            assert.equal(1, #calls)
            assert.equal("account.money_deposited", calls[1].name)
            assert.equal(ctx, calls[1].ctx)
        end)

        it("runs several handlers in registration order", function()
            d:on(Deposited, recorder("a"))
            d:on("account.money_deposited", recorder("b"))
            d:on(Deposited, recorder("c"))
            d:publish(Deposited{})
            assert.same({ "a", "b", "c" }, tags())
        end)

        it("lets '*' handlers see every event, interleaved by registration order", function()
            d:on(Deposited, recorder("first"))
            d:on("*", recorder("any"))
            d:on(Deposited, recorder("last"))
            d:publish(Deposited{})
            d:publish(Withdrawn{})
            assert.same({ "first", "any", "last", "any" }, tags())
        end)

        it("reaches the same handlers for every version of an event", function()
            d:on(Deposited, recorder("a"))
            d:publish(DepositedV2{})
            assert.same({ "a" }, tags())
        end)

        it("does nothing for an event without handlers", function()
            d:on(Withdrawn, recorder("w"))
            assert.equal(0, d:publish(Deposited{}))
            assert.same({}, calls)
        end)

        it("registers the same handler twice when asked to", function()
            local h = recorder("h")
            d:on(Deposited, h):on(Deposited, h)
            d:publish(Deposited{})
            assert.same({ "h", "h" }, tags())
        end)

        it("works on a snapshot: changes during publish apply to the next one", function()
            d:on(Deposited, function()
            calls[#calls + 1] = { tag = "adder" }
            d:on(Deposited, recorder("late"))
            end)
            d:publish(Deposited{})
            assert.same({ "adder" }, tags())
        end)

        it("accepts callable tables as handlers", function()
            local h = setmetatable({}, { __call = function(_, ev) calls[#calls + 1] = { tag = ev.event_name } end })
            d:on(Deposited, h)
            d:publish(Deposited{})
            assert.same({ "account.money_deposited" }, tags())
        end)
    end)

    describe("handler failures", function()
        it("propagate and stop the remaining handlers", function()
            d:on(Deposited, recorder("a"))
            d:on(Deposited, function() error("boom") end)
            d:on(Deposited, recorder("c"))
            assert.has_error(function() d:publish(Deposited{}) end)
            assert.same({ "a" }, tags())
        end)

        it("name the event and the handler in a string error", function()
            d:on(Deposited, function() error("boom") end)
            local ok, err = pcall(d.publish, d, Deposited{})
            assert.is_false(ok)
            assert.matches("^handler #1 %(.-dispatcher_spec.lua:%d+%) for event "
                           .. "account.money_deposited failed: .-dispatcher_spec.lua:%d+: boom$", err)
        end)

        it("keep a table error intact", function()
            local e = qx_error.new("conflict", "stale version")
            d:on(Deposited, function() error(e) end)
            local ok, err = pcall(d.publish, d, Deposited{})
            assert.is_false(ok)
            assert.equal(e, err)
        end)

        it("include a handler returning nil, err", function()
            local e = qx_error.new("db", "insert failed")
            d:on(Deposited, function() return nil, e end)
            d:on(Deposited, recorder("after"))
            local ok, err = pcall(d.publish, d, Deposited{})
            assert.is_false(ok)
            assert.equal(e, err)
            assert.same({}, calls)

            d = dispatcher.new()
            d:on(Deposited, function() return false, "no funds" end)
            ok, err = pcall(d.publish, d, Deposited{})
            assert.is_false(ok)
            assert.matches("failed: no funds$", err)
        end)

        it("do not include a handler returning nil or false alone", function()
            d:on(Deposited, function() return nil end)
            d:on(Deposited, function() return false end)
            assert.equal(2, d:publish(Deposited{}))
        end)
    end)

    describe("off", function()
        it("removes one handler", function()
            local a, b = recorder("a"), recorder("b")
            d:on(Deposited, a):on(Deposited, b)
            assert.equal(1, d:off(Deposited, a))
            d:publish(Deposited{})
            assert.same({ "b" }, tags())
        end)

        it("removes every handler for a target when no handler is given", function()
            d:on(Deposited, recorder("a")):on(Deposited, recorder("b")):on("*", recorder("any"))
            assert.equal(2, d:off("account.money_deposited"))
            d:publish(Deposited{})
            assert.same({ "any" }, tags())
            assert.equal(0, d:off(Deposited))
        end)

        it("removes catch-all handlers with '*'", function()
            local any = recorder("any")
            d:on("*", any)
            assert.equal(1, d:off("*", any))
            assert.equal(0, d:publish(Withdrawn{}))
        end)
    end)

    describe("handlers_for", function()
        it("lists handlers in call order for a name, a class or an event", function()
            local a, any, b = recorder("a"), recorder("any"), recorder("b")
            d:on(Deposited, a):on("*", any):on(Deposited, b)
            assert.same({ a, any, b }, d:handlers_for("account.money_deposited"))
            assert.same({ a, any, b }, d:handlers_for(Deposited))
            assert.same({ a, any, b }, d:handlers_for(Deposited{}))
            assert.same({ any }, d:handlers_for(Withdrawn))
            assert.same({ any }, d:handlers_for("*"))
        end)

        it("returns a new table", function()
            local a = recorder("a")
            d:on(Deposited, a)
            local list = d:handlers_for(Deposited)
            list[1] = nil
            assert.same({ a }, d:handlers_for(Deposited))
        end)
    end)

    describe("misuse", function()
        it("raises for bad targets and handlers", function()
            assert.has_error(function() d:on(nil, print) end,
            "on: expected an event name, an event class or '*', got nil")
            assert.has_error(function() d:on("a b", print) end,
            "on: event name \"a b\" may contain only letters, digits, '_', '-' and '.'")
            assert.has_error(function() d:on(Deposited{}, print) end)
            assert.has_error(function() d:on(Deposited, "print") end,
            "on: handler must be a function, got string")
            assert.has_error(function() d:on(Deposited, {}) end)
            assert.has_error(function() d:off(Deposited, 1) end,
            "off: handler must be a function, got number")
            assert.has_error(function() d:handlers_for(5) end)
        end)

        it("raises when publishing something that is not an event", function()
            assert.has_error(function() d:publish({ event_name = "account.money_deposited" }) end,
            "publish: expected an event made by an event class, got table")
            assert.has_error(function() d:publish(Deposited) end)
        end)

        it("raises when methods are called with a dot", function()
            assert.has_error(function() d.on(Deposited, print) end, "on: call as d:on(...)")
            assert.has_error(function() d.publish(Deposited{}) end, "publish: call as d:publish(...)")
        end)

        it("reports misuse at the caller's line", function()
            local ok, err = pcall(function() d:on(Deposited, 1) end)
            assert.is_false(ok)
            assert.matches("dispatcher_spec.lua:%d+: on: handler", err)
            err = select(2, pcall(function() d:on(1, print) end))
            assert.matches("dispatcher_spec.lua:%d+: on: expected", err)
            err = select(2, pcall(function() d.on(1, print) end))
            assert.matches("dispatcher_spec.lua:%d+: on: call as", err)
        end)
    end)
end)

local core = require "qx.core"
local event = require "qx.model.event"

local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-7%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local ISO = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$"

local function count(t)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    return n
end


describe("qx.model.event", function()
    local Deposited = event.define("account.money_deposited", { version = 2 })
    local Registered = event.define("identity.user.registered", { integration = true })

    describe("define", function()
        it("makes a class carrying name, version and the integration flag", function()
            assert.equal("account.money_deposited", Deposited.event_name)
            assert.equal(2, Deposited.event_version)
            assert.is_false(Deposited.integration)
            assert.equal("identity.user.registered", Registered.event_name)
            assert.equal(1, Registered.event_version)
            assert.is_true(Registered.integration)
            assert.is_true(event.is_class(Deposited))
            assert.is_false(event.is_class({}))
        end)

        it("has a readable tostring", function()
            assert.equal("event class account.money_deposited v2", tostring(Deposited))
            assert.equal("integration event class identity.user.registered v1", tostring(Registered))
        end)

        it("accepts names made of letters, digits, '_', '-' and dots between segments", function()
            for _, name in ipairs({ "a", "Order_Placed", "billing.invoice-paid.v2", "x.y.z" }) do
                assert.equal(name, event.define(name).event_name)
            end
        end)

        it("rejects names that would break a NATS subject", function()
            local bad = { "", " ", "a b", "a.*", "a.>", ".a", "a.", "a..b", "a/b", "ü", 42, nil, {} }
            for i = 1, 13 do
                local name = bad[i]
                assert.has_error(function() event.define(name) end)
            end
            assert.has_error(function() event.define("a b") end,
                "event name \"a b\" may contain only letters, digits, '_', '-' and '.'")
            assert.has_error(function() event.define("a..b") end,
                "event name \"a..b\" must not start or end with '.' nor contain an empty segment")
            assert.has_error(function() event.define(string.rep("a", 256)) end)
        end)

        it("rejects a version that is not a positive integer", function()
            for _, v in ipairs({ 0, -1, 1.5, "1", true, 2 ^ 31 }) do
                assert.has_error(function() event.define("x", { version = v }) end)
            end
            assert.has_error(function() event.define("x", { version = 0 }) end,
                "event version must be a positive integer, got 0")
        end)

        it("rejects unknown options, a non-table opts and a non-boolean integration flag", function()
            assert.has_error(function() event.define("x", { versoin = 2 }) end,
                "unknown event option 'versoin' (known: aliases, integration, personal, subject, "
                .. "version)")
            assert.has_error(function() event.define("x", 2) end,
                "event options must be a table, got number")
            assert.has_error(function() event.define("x", { integration = "yes" }) end,
                "event option 'integration' must be a boolean, got string")
        end)

        it("reports misuse at the caller's line", function()
            local ok, err = pcall(function() event.define("") end)
            assert.is_false(ok)
            assert.matches("event_spec.lua:%d+: event name", err)
        end)
    end)

    describe("instances", function()
        it("carry metadata defaults and payload fields as plain keys", function()
            local ev = Deposited{ amount = 10, currency = "EUR" }
            assert.matches(UUID, ev.event_id)
            assert.matches(ISO, ev.occurred_at)
            assert.equal("account.money_deposited", ev.event_name)
            assert.equal(2, ev.event_version)
            assert.equal(10, ev.amount)
            assert.equal("EUR", ev.currency)
            assert.is_nil(ev.correlation_id)
            assert.is_nil(ev.causation_id)
            assert.is_nil(ev.tenant_id)
            assert.is_nil(ev.actor_id)
            assert.is_nil(ev.aggregate_id)
            assert.is_nil(ev.aggregate_type)
        end)

        it("get a fresh event_id each", function()
            assert.not_equal(Deposited{}.event_id, Deposited{}.event_id)
        end)

        it("can be made with Class.new as well as Class{}", function()
            local ev = Deposited.new{ amount = 1 }
            assert.is_true(Deposited:is(ev))
            assert.equal(1, ev.amount)
            assert.is_true(Deposited:is(Deposited.new()))
        end)

        it("keep given metadata", function()
            local ev = Deposited{
                event_id = "e1", occurred_at = "2020-01-01T00:00:00.000000Z",
                correlation_id = "c1", causation_id = "k1", tenant_id = "t1", actor_id = "a1",
                aggregate_type = "Account", aggregate_id = "acc-1", amount = 5,
            }
            assert.same({ "e1", "2020-01-01T00:00:00.000000Z", "c1", "k1", "t1", "a1", "Account", "acc-1" },
                { ev.event_id, ev.occurred_at, ev.correlation_id, ev.causation_id, ev.tenant_id,
                  ev.actor_id, ev.aggregate_type, ev.aggregate_id })
        end)

        it("treat core.null metadata as absent", function()
            local ev = Deposited{ tenant_id = core.null, event_id = core.null }
            assert.is_nil(ev.tenant_id)
            assert.matches(UUID, ev.event_id)
        end)

        it("link back to their class", function()
            local ev = Deposited{ amount = 1 }
            assert.equal(Deposited, event.class_of(ev))
            assert.is_true(Deposited:is(ev))
            assert.is_false(Registered:is(ev))
            assert.is_true(event.is_event(ev))
            assert.is_false(event.is_event({ event_name = "account.money_deposited" }))
            assert.is_false(event.is_event(Deposited))
            assert.is_false(event.is_event("x"))
            assert.is_nil(event.class_of({}))
            assert.is_nil(event.class_of(setmetatable({}, { __class = Deposited })))
        end)

        it("have a readable tostring", function()
            local ev = Deposited{ event_id = "e1" }
            assert.equal("event account.money_deposited v2 e1", tostring(ev))
        end)

        it("reject payload keys that collide with metadata or methods", function()
            assert.has_error(function() Deposited{ payload = 1 } end,
                "account.money_deposited: payload field 'payload' would hide the method ev:payload()")
            assert.has_error(function() Deposited{ envelope = 1 } end)
            assert.has_error(function() Deposited{ event_name = "other" } end,
                "account.money_deposited: event_name 'other' does not match the class "
                .. "('account.money_deposited')")
            assert.has_error(function() Deposited{ event_version = 0 } end)
            assert.has_error(function() Deposited{ event_id = 7 } end,
                "account.money_deposited: event_id must be a non-empty string, got number")
            assert.has_error(function() Deposited{ occurred_at = 0 } end)
            assert.has_error(function() Deposited{ tenant_id = 3 } end,
                "account.money_deposited: tenant_id must be a string, got number")
            assert.has_error(function() Deposited{ aggregate_id = {} } end)
        end)

        it("reject keys starting with '_', non-string keys and unserialisable values", function()
            assert.has_error(function() Deposited{ _secret = 1 } end,
                "account.money_deposited: payload field '_secret' starts with '_' (reserved)")
            assert.has_error(function() Deposited{ 1, 2 } end,
                "account.money_deposited: field keys must be strings, got number key 1")
            assert.has_error(function() Deposited{ f = print } end,
                "account.money_deposited: field 'f' holds a function, which cannot be serialised")
        end)

        it("judge a field name the same way every time, however many names have been seen", function()
            -- field names are judged once and remembered: the verdict must not change on reuse,
            -- nor after the memory restarts (more than a thousand distinct names)
            for round = 1, 3 do
                assert.has_error(function() Deposited{ _secret = round } end,
                  "account.money_deposited: payload field '_secret' starts with '_' (reserved)")
                assert.has_error(function() Deposited{ payload = round } end)
                assert.has_error(function() Deposited{ f = print } end)
                assert.equal(round, Deposited{ amount = round }.amount)
                for i = 1, 1500 do
                  local ev = Deposited{ ["field_" .. i] = i }
                  assert.equal(i, ev["field_" .. i])
                end
                assert.has_error(function() Deposited{ ["_n" .. round] = 1 } end)
            end
        end)

        it("reject a non-table argument and a method-style call", function()
            assert.has_error(function() Deposited("x") end,
                "account.money_deposited: fields must be a table, got string")
            assert.has_error(function() Deposited:new{ amount = 1 } end,
                "account.money_deposited: call as Class{...} or Class.new{...}, not Class:new{...}")
        end)

        it("report construction misuse at the caller's line", function()
            local ok, err = pcall(function() Deposited{ _x = 1 } end)
            assert.is_false(ok)
            assert.matches("event_spec.lua:%d+: account.money_deposited", err)
            err = select(2, pcall(function() Deposited.new{ _x = 1 } end))
            assert.matches("event_spec.lua:%d+: account.money_deposited", err)
        end)

        it("accept an explicit event_version, e.g. for an older stored event", function()
            assert.equal(1, Deposited{ event_version = 1 }.event_version)
        end)
    end)

    describe("payload", function()
        it("returns a new table with the payload fields only", function()
            local ev = Deposited{ amount = 10, memo = "rent", tenant_id = "t1",
                                  aggregate_id = "a1", aggregate_type = "Account" }
            local p = ev:payload()
            assert.same({ amount = 10, memo = "rent" }, p)
            p.amount = 99
            assert.equal(10, ev.amount)
        end)

        it("includes fields set after construction but never '_' keys", function()
            local ev = Deposited{ amount = 1 }
            ev.note = "late"
            ev._scratch = true
            assert.same({ amount = 1, note = "late" }, ev:payload())
        end)

        it("is empty for an event without payload", function()
            assert.same({}, Deposited{}:payload())
        end)

        it("raises when not called as a method", function()
            assert.has_error(function() Deposited{}.payload({}) end,
                "payload: call as ev:payload()")
        end)
    end)

    describe("envelope", function()
        it("has every metadata key, absent ids as core.null, and the payload", function()
            local ev = Deposited{ amount = 10, tenant_id = "t1", aggregate_id = "a1" }
            local env = ev:envelope()
            assert.same({
                event_id = ev.event_id,
                event_name = "account.money_deposited",
                event_version = 2,
                occurred_at = ev.occurred_at,
                correlation_id = core.null,
                causation_id = core.null,
                tenant_id = "t1",
                actor_id = core.null,
                payload = { amount = 10 },
            }, env)
            assert.equal(9, count(env))
        end)

        it("leaves aggregate_type and aggregate_id out", function()
            local env = Deposited{ aggregate_type = "Account", aggregate_id = "a1" }:envelope()
            assert.is_nil(env.aggregate_type)
            assert.is_nil(env.aggregate_id)
        end)

        it("is written as JSON by envelope_json, equal to what envelope gives", function()
            local evs = {
                Deposited{ amount = 10, tenant_id = "t1", aggregate_id = "a1", aggregate_type = "Account" },
                Deposited{},
                Registered{ name = "ann", tags = { "a", "b" }, address = { city = "Oslo", zip = core.null },
                            ratio = 0.25, big = 9007199254740991, yes = true, no = false,
                            text = "quote \" backslash \\ newline \n tab \t é",
                            correlation_id = "c1", causation_id = "c2", actor_id = "u1" },
            }
            -- set after construction: never payload (reserved names and '_' keys are left out)
            evs[2]._private = "hidden"
            evs[2].amount = 3
            for i, ev in ipairs(evs) do
                local text = assert(event.envelope_json(ev))
                assert.same(ev:envelope(), core.json_decode(text), "event " .. i)
            end
        end)

        it("refuses in envelope_json what JSON cannot hold, without raising", function()
            local cycle = {}
            cycle.self = cycle
            for _, v in ipairs { cycle, { [true] = 1 } } do
                local text, e = event.envelope_json(Deposited{ v = v })
                assert.is_nil(text)
                assert.equal("invalid", e.code)
            end
        end)

        it("encodes to JSON with nulls for absent ids", function()
            local ok, cjson = pcall(require, "cjson")
            if not ok then return end
            local decoded = cjson.decode(cjson.encode(Deposited{ amount = 3 }:envelope()))
            assert.equal(cjson.null, decoded.correlation_id)
            assert.equal(3, decoded.payload.amount)
        end)
    end)

    describe("from_envelope", function()
        it("round-trips an envelope into an equal instance", function()
            local ev = Deposited{ amount = 10, correlation_id = "c1", actor_id = "u1" }
            local back = assert(event.from_envelope(Deposited, ev:envelope()))
            assert.is_true(Deposited:is(back))
            assert.same(ev:envelope(), back:envelope())
            assert.is_nil(back.tenant_id)
        end)

        it("round-trips through JSON", function()
            local ok, cjson = pcall(require, "cjson")
            if not ok then return end
            local ev = Deposited{ amount = 10, tenant_id = "t1" }
            local back = assert(Deposited.from_envelope(cjson.decode(cjson.encode(ev:envelope()))))
            assert.equal(ev.event_id, back.event_id)
            assert.equal(10, back.amount)
            assert.equal("t1", back.tenant_id)
            assert.is_nil(back.correlation_id)
            assert.equal(2, back.event_version)
            assert.equal(2, math.floor(back.event_version))
        end)

        it("keeps a stored older version", function()
            local env = Deposited{ amount = 1 }:envelope()
            env.event_version = 1
            assert.equal(1, assert(event.from_envelope(Deposited, env)).event_version)
        end)

        it("keeps aggregate_type/aggregate_id given at the top level", function()
            local env = Deposited{}:envelope()
            env.aggregate_type, env.aggregate_id = "Account", "a1"
            local ev = assert(event.from_envelope(Deposited, env))
            assert.equal("Account", ev.aggregate_type)
            assert.equal("a1", ev.aggregate_id)
            assert.same({}, ev:payload())
        end)

        it("returns an invalid error for malformed envelopes", function()
            local good = Deposited{ amount = 1 }:envelope()
            local function with(k, v)
                local e = {}
                for kk, vv in pairs(good) do e[kk] = vv end
                e[k] = v
                return e
            end
            local cases = {
                "nope",
                with("event_name", "other.event"),
                with("event_id", nil),
                with("event_id", 5),
                with("occurred_at", nil),
                with("event_version", nil),
                with("event_version", 0),
                with("event_version", core.null),
                with("payload", nil),
                with("payload", core.null),
                with("payload", { event_id = "x" }),
                with("payload", { _hidden = 1 }),
                with("tenant_id", 42),
            }
            for i = 1, #cases do
                local ev, err = event.from_envelope(Deposited, cases[i])
                assert.is_nil(ev)
                assert.equal("invalid", err.code)
                assert.matches("^account.money_deposited envelope: ", err.message)
            end
            local _, err = event.from_envelope(Deposited, with("event_name", "other.event"))
            assert.equal('account.money_deposited envelope: event_name is "other.event"', err.message)
            assert.matches("^invalid: ", tostring(err))
        end)

        it("raises when the first argument is not an event class", function()
            assert.has_error(function() event.from_envelope({}, {}) end,
                "from_envelope: expected an event class, got table")
        end)
    end)

    describe("valid_name", function()
        it("says why a name is refused", function()
            assert.is_true(event.valid_name("a.b"))
            local ok, why = event.valid_name("a b")
            assert.is_false(ok)
            assert.equal("may contain only letters, digits, '_', '-' and '.'", why)
        end)
    end)
end)

local cjson = require "cjson"
local registry = require "qx.model.registry"
local event = require "qx.model.event"

describe("qx.model.registry", function()
    local V1 = event.define("spec.registry.deposited", { version = 1, integration = true })
    local V2 = event.define("spec.registry.deposited", { version = 2, integration = true })
    local Other = event.define("spec.registry.withdrawn", { integration = true })

    describe("register", function()
        it("keys classes by name and version, so versions of one name live side by side", function()
            local reg = registry.new()
            reg:register(V1)
            reg:register(V2)
            assert.equal(V1, reg:get("spec.registry.deposited", 1))
            assert.equal(V2, reg:get("spec.registry.deposited", 2))
            assert.same({ 1, 2 }, reg:versions("spec.registry.deposited"))
            local classes, names = reg:count()
            assert.equal(2, classes)
            assert.equal(1, names)
        end)

        it("treats registering the same class again as a no-op", function()
            local reg = registry.new({ V1 })
            assert.equal(V1, reg:register(V1))
            assert.equal(V1, reg:register(V1))
            assert.equal(1, (reg:count()))
        end)

        it("raises when another class claims a name and version that are taken", function()
            local reg = registry.new({ V1 })
            local Impostor = event.define("spec.registry.deposited", { version = 1 })
            assert.has_error(function() reg:register(Impostor) end,
                "registry:register: spec.registry.deposited v1 is already registered to another class")
            assert.equal(V1, reg:get("spec.registry.deposited", 1))
        end)

        it("raises on anything that is not an event class", function()
            local reg = registry.new()
            assert.has_error(function() reg:register({ event_name = "x", event_version = 1 }) end)
            assert.has_error(function() reg:register(V1 {}) end)
            assert.has_error(function() reg:register() end)
            assert.has_error(function() registry.new("spec.registry.deposited") end)
            assert.equal(0, (reg:count()))
        end)

        it("accepts several classes at once and is callable as qx.registry{...}", function()
            local reg = registry { V1, V2, Other }
            assert.same({ "spec.registry.deposited", "spec.registry.withdrawn" }, reg:names())
            local reg2 = registry.new()
            assert.equal(V1, reg2:register(V1, Other))
            assert.is_true(reg2:has("spec.registry.withdrawn", 1))
        end)

        it("is reachable as qx.registry", function()
            local qx = require "qx"
            local reg = qx.registry { V1 }
            assert.equal(V1, reg:get("spec.registry.deposited"))
        end)
    end)

    describe("get", function()
        local reg = registry { V1, V2, Other }

        it("resolves a name without a version to the highest version", function()
            assert.equal(V2, reg:get("spec.registry.deposited"))
            assert.equal(V2, reg:latest("spec.registry.deposited"))
            assert.equal(Other, reg:get("spec.registry.withdrawn"))
        end)

        it("returns not_found for an unknown name", function()
            local class, e = reg:get("spec.registry.nope", 1)
            assert.is_nil(class)
            assert.equal("not_found", e.code)
            assert.matches("unknown event \"spec.registry.nope\"", e.message, 1, true)
            assert.is_false(reg:has("spec.registry.nope"))
        end)

        it("returns not_found for an unknown version of a known name", function()
            local class, e = reg:get("spec.registry.deposited", 3)
            assert.is_nil(class)
            assert.equal("not_found", e.code)
            assert.equal(3, e.event_version)
            assert.matches("registered up to v2", e.message, 1, true)
        end)

        it("returns invalid for a version that is not a positive integer", function()
            for _, bad in ipairs({ 0, -1, 1.5, "x", {} }) do
                local class, e = reg:get("spec.registry.deposited", bad)
                assert.is_nil(class)
                assert.equal("invalid", e.code)
            end
            local _, e = reg:get(42)
            assert.equal("invalid", e.code)
        end)

        it("accepts a version given as a decimal string, as headers carry it", function()
            assert.equal(V2, reg:get("spec.registry.deposited", "2"))
        end)
    end)

    describe("from_envelope and decode", function()
        local reg = registry { V1, V2 }

        it("rebuilds the event of the class the envelope names", function()
            local sent = V2 { amount = 10, correlation_id = "0190d2a8-0000-7000-8000-000000000001" }
            local ev = assert(reg:decode(cjson.encode(sent:envelope())))
            assert.is_true(V2:is(ev))
            assert.equal(sent.event_id, ev.event_id)
            assert.equal(10, ev.amount)
            assert.equal(sent.correlation_id, ev.correlation_id)
            assert.equal(sent.occurred_at, ev.occurred_at)
        end)

        it("picks the class by the envelope's version", function()
            local ev = assert(reg:from_envelope(V1 { amount = 1 }:envelope()))
            assert.is_true(V1:is(ev))
            assert.equal(1, ev.event_version)
        end)

        it("returns not_found for an unregistered name and version, or falls back to the latest when asked", function()
            local env = V2 { amount = 1 }:envelope()
            env.event_version = 7
            local ev, e = reg:from_envelope(env)
            assert.is_nil(ev)
            assert.equal("not_found", e.code)
            ev = assert(reg:from_envelope(env, { latest = true }))
            assert.is_true(V2:is(ev))
            assert.equal(7, ev.event_version)

            env.event_name = "spec.registry.unknown"
            ev, e = reg:from_envelope(env, { latest = true })
            assert.is_nil(ev)
            assert.equal("not_found", e.code)
        end)

        it("returns invalid for text that is not a JSON envelope", function()
            for _, text in ipairs({ "", "not json", "[1,2]", "{\"event_name\": 5}", "null",
                                    "{\"event_name\":\"spec.registry.deposited\"}",
                                    "{\"event_name\":\"spec.registry.deposited\",\"event_version\":1}" }) do
                local ev, e = reg:decode(text)
                assert.is_nil(ev, text)
                assert.equal("invalid", e.code, text)
            end
            local ev, e = reg:decode(nil)
            assert.is_nil(ev)
            assert.equal("invalid", e.code)
        end)

        it("raises when called on something that is not a registry", function()
            assert.has_error(function() reg.get({}, "x") end)
            assert.has_error(function() reg:from_envelope({}, "latest") end)
        end)
    end)
end)

-- Event evolution without a database: upcaster steps, their chain, aliases and the registry
-- reading older versions and old names as the class that holds the name now.
local qx = require "qx"
local core = require "qx.core"

local n = 0
local function uname(base)
    n = n + 1
    return ("spec.evolution.%s%d"):format(base, n)
end

-- an envelope as a v1 writer (or an old name) would have published it
local function old_envelope(name, version, payload)
    return { event_id = core.uuid(), event_name = name, event_version = version,
             occurred_at = core.now(), correlation_id = core.null, causation_id = core.null,
             tenant_id = core.null, actor_id = core.null, payload = payload }
end

local function deposited_v3(name)
    local Deposited = qx.event(name, { version = 3 })
    Deposited:upcast(1, function(p) p.amount_cents = p.amount * 100; p.amount = nil; return p end)
    Deposited:upcast(2, function(p) p.currency = p.currency or "EUR"; return p end)
    return Deposited
end

describe("event evolution", function()
    describe("defining steps", function()
        it("refuses a step defined twice, where it is defined", function()
            local E = qx.event(uname("twice"), { version = 3 })
            E:upcast(1, function(p) return p end)
            local ok, e = pcall(E.upcast, E, 1, function(p) return p end)
            assert.is_false(ok)
            assert.matches("v1 %-> v2 is defined twice", e)
        end)

        it("refuses a step beyond the class's version", function()
            local E = qx.event(uname("beyond"), { version = 2 })
            assert.has_error(function() E:upcast(2, function(p) return p end) end)
            local ok, e = pcall(E.upcast, E, 3, function(p) return p end)
            assert.is_false(ok)
            assert.matches("beyond the class's version %(v2%)", e)
        end)

        it("refuses a step that is not a function or whose version is not a positive integer", function()
            local E = qx.event(uname("badstep"), { version = 3 })
            assert.has_error(function() E:upcast(1, "not a function") end)
            assert.has_error(function() E:upcast(0, function(p) return p end) end)
            assert.has_error(function() E:upcast(1.5, function(p) return p end) end)
            assert.has_error(function() E.upcast({}, 1, function(p) return p end) end)
        end)

        it("refuses bad aliases", function()
            local name = uname("alias")
            assert.has_error(function() qx.event(name, { aliases = "x.y" }) end)
            assert.has_error(function() qx.event(name, { aliases = { name } }) end)
            assert.has_error(function() qx.event(name, { aliases = { "a.b", "a.b" } }) end)
            assert.has_error(function() qx.event(name, { aliases = { "bad name" } }) end)
            assert.has_error(function() qx.event(name, { aliases = { x = "a.b" } }) end)
        end)
    end)

    describe("a gap in the chain", function()
        local function gapped()
            local E = qx.event(uname("gap"), { version = 4 })
            E:upcast(1, function(p) return p end)
            E:upcast(3, function(p) return p end)
            return E
        end

        it("raises when a registry's consumer or store is made, naming the missing step", function()
            local E = gapped()
            local reg = qx.registry{ E }
            local ok, why = reg:check_chains()
            assert.is_false(ok)
            assert.matches("no upcaster v2 %-> v3", why)
            local made, e = pcall(qx.event_store, { registry = reg })
            assert.is_false(made)
            assert.matches("qx.event_store: event " .. E.event_name:gsub("%.", "%%.") .. " v4", e)
        end)

        it("raises when a projection is made", function()
            local E = gapped()
            local db = { pool = true } -- the chain is checked before anything needs a database
            local ok, e = pcall(qx.projection, { name = "p", db = db,
                                                 handlers = { [E] = function() end } })
            assert.is_false(ok)
            assert.matches("qx.projection: .*no upcaster v2 %-> v3", e)
        end)

        it("raises when a consumer is made", function()
            local E = gapped()
            local ok, e = pcall(qx.consumer, { durable = "d", registry = qx.registry{ E } })
            assert.is_false(ok)
            assert.matches("qx.consumer: .*no upcaster v2 %-> v3", e)
        end)

        it("a chain that does not reach the class's version is a gap too", function()
            local E = qx.event(uname("short"), { version = 3 })
            E:upcast(1, function(p) return p end)
            local ok, why = qx.registry{ E }:check_chains()
            assert.is_false(ok)
            assert.matches("no upcaster v2 %-> v3", why)
        end)
    end)

    describe("the registry", function()
        it("upcasts an older envelope step by step, with the stored envelope's fields as meta", function()
            local name = uname("deposited")
            local Deposited = qx.event(name, { version = 3 })
            local metas = {}
            Deposited:upcast(1, function(p, meta)
                metas[#metas + 1] = meta
                p.amount_cents = p.amount * 100; p.amount = nil; return p
            end)
            Deposited:upcast(2, function(p, meta)
                metas[#metas + 1] = meta
                p.currency = p.currency or "EUR"; return p
            end)
            local reg = qx.registry{ Deposited }
            local env = old_envelope(name, 1, { amount = 12 })
            local ev = assert(reg:from_envelope(env))
            assert.is_true(Deposited:is(ev))
            assert.equal(3, ev.event_version)
            assert.equal(1200, ev.amount_cents)
            assert.equal("EUR", ev.currency)
            assert.is_nil(ev.amount)
            assert.equal(env.event_id, ev.event_id)
            assert.equal(2, #metas)
            assert.equal(env.event_id, metas[1].event_id)
            assert.equal(1, metas[1].event_version)
            assert.equal(env.occurred_at, metas[1].occurred_at)
            assert.same({ amount = 12 }, env.payload) -- the envelope itself is left as it was

            ev = assert(reg:from_envelope(old_envelope(name, 2, { amount_cents = 5, currency = "USD" })))
            assert.same({ amount_cents = 5, currency = "USD" }, ev:payload())
            ev = assert(reg:decode(core.json_encode(old_envelope(name, 3, { amount_cents = 7 }))))
            assert.same({ amount_cents = 7 }, ev:payload())
        end)

        it("reads an old name as the class that took it as an alias, upcasting from the old versions", function()
            local old, new = uname("money_deposited"), uname("deposited")
            local Deposited = qx.event(new, { version = 2, aliases = { old } })
            Deposited:upcast(1, function(p) p.amount_cents = p.amount * 100; p.amount = nil; return p end)
            local reg = qx.registry{ Deposited }
            local ev = assert(reg:from_envelope(old_envelope(old, 1, { amount = 3 })))
            assert.is_true(Deposited:is(ev))
            assert.equal(new, ev.event_name)
            assert.equal(300, ev.amount_cents)
            ev = assert(reg:from_envelope(old_envelope(old, 2, { amount_cents = 4 })))
            assert.equal(new, ev.event_name)
            assert.is_true(reg:has(old, 1))
            -- new events carry the new name
            assert.equal(new, Deposited{ amount_cents = 1 }:envelope().event_name)
        end)

        it("refuses an alias that already stands for another class", function()
            local old = uname("taken")
            local A = qx.event(uname("a"), { aliases = { old } })
            local B = qx.event(uname("b"), { aliases = { old } })
            assert.has_error(function() qx.registry{ A, B } end)
            assert.has_error(function() qx.registry{ qx.event(old), A } end)
        end)

        it("a version below the chain's start is invalid, naming the event, version and missing step", function()
            local name = uname("nopath")
            local E = qx.event(name, { version = 3 })
            E:upcast(2, function(p) return p end)
            local ev, e = qx.registry{ E }:from_envelope(old_envelope(name, 1, {}))
            assert.is_nil(ev)
            assert.equal("invalid", e.code)
            assert.matches(name:gsub("%.", "%%.") .. ".*v1.*no upcaster v1 %-> v2", e.message)
        end)

        it("a version above the class's is not read as the class (a newer deploy wrote it)", function()
            local name = deposited_v3(uname("newer")).event_name
            local reg = qx.registry{ qx.event(name, { version = 3 }):upcast(1, function(p) return p end)
                                                                   :upcast(2, function(p) return p end) }
            local ev, e = reg:from_envelope(old_envelope(name, 4, {}))
            assert.is_nil(ev)
            assert.equal("not_found", e.code)
        end)

        it("a class without upcasters reads other versions as before", function()
            local name = uname("plain")
            local V2 = qx.event(name, { version = 2 })
            local ev = assert(qx.registry{ V2 }:from_envelope(old_envelope(name, 1, { a = 1 }),
                                                              { latest = true }))
            assert.equal(1, ev.event_version)
            assert.equal(1, ev.a)
        end)
    end)

    describe("a bad upcaster", function()
        local cases = {
            { "returns nothing", function() end, "v1 %-> v2 returned nothing" },
            { "raises", function() error("boom") end, "v1 %-> v2 raised: .*boom" },
            { "returns a non-table", function() return 42 end, "v1 %-> v2 returned a number" },
            { "returns a reserved field", function(p) p.event_id = "x"; return p end,
              "v1 %-> v2 returned the field event_id" },
        }
        for _, c in ipairs(cases) do
            it("that " .. c[1] .. " makes the read invalid, naming the event id and the step", function()
                local name = uname("bad")
                local E = qx.event(name, { version = 3 })
                E:upcast(1, c[2])
                E:upcast(2, function(p) p.second = true; return p end)
                local env = old_envelope(name, 1, { amount = 1 })
                local ev, e = qx.registry{ E }:from_envelope(env)
                assert.is_nil(ev)
                assert.equal("invalid", e.code)
                assert.equal(1, e.step)
                assert.equal(env.event_id, e.event_id)
                assert.matches(env.event_id, e.message, 1, true)
                assert.matches(c[3], e.message)
                assert.same({ amount = 1 }, env.payload)
            end)
        end
    end)
end)

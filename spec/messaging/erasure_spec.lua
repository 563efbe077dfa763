-- Personal fields on the way out (outbox, relay, JetStream) and in (qx.consumer) against a real
-- PostgreSQL and nats-server: sealed in every row and message, opened by a consumer that
-- reaches the key table (per message and commit = "batch"), before its upcasters run,
-- qx.forgotten once the subject is forgotten, a tampered message dead-lettered. See
-- docs/erasure.md.
local H = require "relay_helper"
local qx = require "qx"

describe("personal fields of integration events", function()
    local ctx

    before_each(function()
        ctx = H.setup()
    end)

    after_each(function()
        H.teardown(ctx)
    end)

    local SignedUp = qx.integration_event("spec.erasure.signed_up",
                                          { personal = { "email", "age" }, subject = "user_id" })

    local function sign_up(id, email)
        local ev
        assert(ctx.db:unit_of_work(function(uow)
            ev = assert(uow:record(SignedUp{ user_id = id, email = email, age = 41, plan = "pro" }))
        end))
        return ev
    end

    local function relay_all()
        local relay = assert(H.relay(ctx))
        local r = assert(relay:run_once())
        relay:close()
        return r
    end

    local function consume(durable, opts)
        local o = { nats = ctx.conn, durable = durable, registry = qx.registry{ SignedUp } }
        for k, v in pairs(opts or {}) do o[k] = v end
        local c = assert(qx.consumer(o))
        local got = {}
        local counts = assert(c:run_once(function(ev) got[#got + 1] = ev end, { timeout_ms = 5000 }))
        c:close()
        return got, counts
    end

    it("are sealed in the outbox row and on the stream, and qx.consumer with the db opens them", function()
        local id = qx.uuid()
        local ev = sign_up(id, "eve@example.org")
        assert.equal("eve@example.org", ev.email) -- the event in memory keeps its values
        local row = H.sql(ctx, "SELECT payload::text AS p FROM qx_outbox_events")[1].p
        assert.is_nil(row:find("eve@example.org", 1, true))
        assert.truthy(row:find("qx:sealed:1:" .. id, 1, true))
        assert.equal(1, relay_all().published)

        local msgs = H.read_stream(ctx)
        assert.equal(1, #msgs)
        assert.equal("qx:sealed:1:" .. id .. ":", msgs[1].env.payload.email:sub(1, 49))
        assert.equal(id, msgs[1].env.payload.user_id)
        assert.equal("pro", msgs[1].env.payload.plan)
        assert.equal(id, msgs[1].headers["qx.key_id"]) -- the key the sealed fields need

        local got, counts = consume("with_db", { db = ctx.db })
        assert.equal(1, counts.handled)
        assert.equal("eve@example.org", got[1].email)
        assert.equal(41, got[1].age)
        if math.type then assert.equal("integer", math.type(got[1].age)) end
        -- the inbox row holds ids only
        local inbox = H.sql(ctx, "SELECT row_to_json(i)::text AS t FROM qx_inbox i")
        assert.is_nil(inbox[1].t:find("eve@", 1, true))

        -- a consumer that cannot reach the keys sees the sealed text
        local blind = consume("no_db")
        assert.equal(msgs[1].env.payload.email, blind[1].email)
    end)

    it("a traced unit of work's message carries qx.key_id beside the trace headers", function()
        local tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        local id = qx.uuid()
        assert(ctx.db:unit_of_work(function(uow)
            assert(uow:record(SignedUp{ user_id = id, email = "ivan@example.org" }))
        end, { context = { traceparent = tp, tracestate = "rojo=00f067aa0ba902b7" } }))
        assert.equal(1, relay_all().published)
        local msgs = H.read_stream(ctx)
        assert.equal(1, #msgs)
        local h = msgs[1].headers
        assert.equal(id, h["qx.key_id"])
        assert.equal(tp, h.traceparent)
        assert.equal("rojo=00f067aa0ba902b7", h.tracestate)
        assert.equal("qx:sealed:1:" .. id .. ":", msgs[1].env.payload.email:sub(1, 49))
        local got, counts = consume("traced", { db = ctx.db })
        assert.equal(1, counts.handled)
        assert.equal("ivan@example.org", got[1].email)
    end)

    it("an integration event without personal fields gets no qx.key_id header", function()
        local Plain = qx.integration_event("spec.erasure.plain")
        assert(ctx.db:unit_of_work(function(uow) uow:record(Plain{ note = "qx:sealed:1 in a note" }) end))
        assert.equal(1, relay_all().published)
        local msgs = H.read_stream(ctx)
        assert.is_nil(msgs[1].headers["qx.key_id"])
    end)

    it("a consumer whose database has no key table hands the sealed text to its handler", function()
        local id = qx.uuid()
        sign_up(id, "oscar@example.org")
        assert.equal(1, relay_all().published)
        -- a database of its own, with the inbox but without qx_subject_keys
        local other, schema = H.support.schema_db("nokeys")
        assert(other:exec("DROP TABLE qx_subject_keys CASCADE"))
        local got, counts = consume("other_db", { db = other })
        assert.equal(1, counts.handled)
        assert.equal("qx:sealed:1:" .. id .. ":", got[1].email:sub(1, 49))
        H.support.drop_schema(schema, other)
        other:close()
    end)

    it("qx.publisher refuses an event with personal values (only the outbox seals them)", function()
        local pub = assert(qx.publisher{ nats = ctx.conn })
        local ack, e = pub:publish(SignedUp{ user_id = qx.uuid(), email = "direct@example.org" })
        assert.is_nil(ack)
        assert.equal("invalid", e.code)
        assert.matches("outbox", e.message)
        assert(pub:publish(SignedUp{ user_id = qx.uuid(), plan = "free" })) -- none: fine
        assert.equal(1, #H.read_stream(ctx))
        pub:close()
    end)

    it("read qx.forgotten at the consumer once the subject is forgotten", function()
        local id = qx.uuid()
        sign_up(id, "mallory@example.org")
        assert.equal(1, relay_all().published)
        assert(qx.forget(ctx.db, id))
        local got, counts = consume("after_forget", { db = ctx.db })
        assert.equal(1, counts.handled)
        assert.equal(qx.forgotten, got[1].email)
        assert.equal("pro", got[1].plan)
        -- and none can be recorded any more
        local r, e = ctx.db:unit_of_work(function(uow)
            uow:record(SignedUp{ user_id = id, email = "again@example.org" })
        end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.equal(1, #H.sql(ctx, "SELECT 1 FROM qx_outbox_events"))
    end)

    it("a tampered message is dead-lettered at once, and the dead letter holds only the sealed text", function()
        local id = qx.uuid()
        sign_up(id, "trent@example.org")
        H.sql(ctx, [[
UPDATE qx_outbox_events
   SET payload = jsonb_set(payload, '{payload,age}', payload->'payload'->'email')]])
        assert.equal(1, relay_all().published)
        local got, counts = consume("tampered", { db = ctx.db })
        assert.same({}, got)
        assert.equal(1, counts.termed)
        local dead = H.sql(ctx, "SELECT reason, error, data FROM qx_dead_letters")
        assert.equal(1, #dead)
        assert.equal("invalid_message", dead[1].reason)
        assert.matches("does not open", dead[1].error)
        assert.is_nil(dead[1].data:find("trent@", 1, true))
        assert.truthy(dead[1].data:find("qx:sealed:1:", 1, true))
    end)
    it("a consumer in commit = \"batch\" mode opens them, and dead-letters a message that does not open", function()
        local good, bad = qx.uuid(), qx.uuid()
        sign_up(good, "bob@example.org")
        sign_up(bad, "carol@example.org")
        -- the second message's age holds its email's sealed text (bound to another field)
        H.sql(ctx, [[
UPDATE qx_outbox_events
   SET payload = jsonb_set(payload, '{payload,age}', payload->'payload'->'email')
 WHERE payload->'payload'->>'user_id' = $1]], bad)
        assert.equal(2, relay_all().published)
        local got, counts = consume("batch", { db = ctx.db, commit = "batch" })
        assert.equal(1, counts.handled)
        assert.equal(1, counts.termed)
        assert.equal(0, counts.failed)
        assert.equal(1, #got)
        assert.equal("bob@example.org", got[1].email)
        assert.equal(41, got[1].age)
        local dead = H.sql(ctx, "SELECT reason, error, data FROM qx_dead_letters")
        assert.equal(1, #dead)
        assert.equal("invalid_message", dead[1].reason)
        assert.matches("does not open", dead[1].error)
        assert.truthy(dead[1].data:find(bad, 1, true))
        assert.is_nil(dead[1].data:find("carol@", 1, true))
        -- the handled message's inbox row committed; the dead one's went with its savepoint
        local inbox = H.sql(ctx, "SELECT event_id::text AS id FROM qx_inbox")
        assert.equal(1, #inbox)
        assert.equal(got[1].event_id, inbox[1].id)
    end)

    it("a consumer in commit = \"batch\" mode gives qx.forgotten for a forgotten subject", function()
        local id = qx.uuid()
        sign_up(id, "frank@example.org")
        assert.equal(1, relay_all().published)
        assert(qx.forget(ctx.db, id))
        local got, counts = consume("batch_forgotten", { db = ctx.db, commit = "batch" })
        assert.equal(1, counts.handled)
        assert.equal(qx.forgotten, got[1].email)
        assert.equal(qx.forgotten, got[1].age)
        assert.equal("pro", got[1].plan)
    end)

    it("are opened before the consumer's upcasters run, which see the values", function()
        -- yesterday's deploy published v1 { mail }; today's class is v2 { email } and its step
        -- renames the personal field: the sealed text is bound to the stored field's name
        local name = "spec.erasure.contact"
        local V1 = qx.integration_event(name, { personal = { "mail" }, subject = "user_id" })
        local id = qx.uuid()
        assert(ctx.db:unit_of_work(function(uow)
            assert(uow:record(V1{ user_id = id, mail = "dan@example.org" }))
        end))
        assert.equal(1, relay_all().published)
        local V2 = qx.integration_event(name, { version = 2, personal = { "email" },
                                                subject = "user_id" })
        local seen = {}
        V2:upcast(1, function(p)
            seen[#seen + 1] = p.mail
            p.email, p.mail = p.mail, nil
            return p
        end)
        for _, mode in ipairs({ "message", "batch" }) do
            local got, counts = consume("contact_" .. mode, { db = ctx.db, commit = mode,
                                                              registry = qx.registry{ V2 } })
            assert.equal(1, counts.handled, mode)
            assert.is_true(V2:is(got[1]), mode)
            assert.equal("dan@example.org", got[1].email, mode)
            assert.is_nil(got[1].mail, mode)
        end
        assert.same({ "dan@example.org", "dan@example.org" }, seen)
        -- once forgotten, the step sees qx.forgotten, never the sealed text
        assert(qx.forget(ctx.db, id))
        local got = consume("contact_after", { db = ctx.db, registry = qx.registry{ V2 } })
        assert.equal(qx.forgotten, got[1].email)
        assert.equal(qx.forgotten, seen[3])
    end)

    it("a dead letter with sealed fields is replayed with them opened", function()
        local id = qx.uuid()
        sign_up(id, "grace@example.org")
        assert.equal(1, relay_all().published)
        local c = assert(qx.consumer{ nats = ctx.conn, durable = "replayed", db = ctx.db,
                                      registry = qx.registry{ SignedUp }, max_deliver = 1 })
        local counts = assert(c:run_once(function() error("not now") end, { timeout_ms = 5000 }))
        assert.equal(1, counts.termed)
        local got = {}
        local r = assert(c:replay_dead(function(ev) got[#got + 1] = ev end))
        c:close()
        assert.equal(1, r.handled)
        assert.equal("grace@example.org", got[1].email)
        assert.equal(41, got[1].age)
    end)
end)

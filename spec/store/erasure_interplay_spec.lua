-- Personal fields against the features around them, on a real PostgreSQL: archived streams,
-- upcasters (opened before they run), trace context, and blue/green projection versions'
-- on_forget. The sealing, forget and the key cache are in spec/store/erasure_spec.lua.
local support = require "support"
local qx = require "qx"

describe("personal fields with archived streams, upcasters, trace context and versions", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function user_model(Registered)
        local m = { type = support.unique("User"), Registered = Registered }
        m.Upgraded = qx.event(support.unique("user.upgraded"))
        m.User = qx.event_sourced(m.type)
        m.User:on(Registered, function(self, ev) self.email, self.age = ev.email, ev.age end)
        m.User:on(m.Upgraded, function(self, ev) self.plan = ev.plan end)
        m.store = qx.event_store{ db = db }
        return m
    end

    local function append(m, id, events, uow_opts)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local u = es:load(m.User, id) or m.User.new(id)
            for _, ev in ipairs(events) do u:record(ev) end
            local ok, e = es:append(u)
            if not ok then error(e, 0) end
            return u
        end, uow_opts)
    end

    local function load(m, id, opts)
        return db:unit_of_work(function(uow)
            local u, e = uow:store(m.store):load(m.User, id, opts)
            if not u then error(e or "no such user", 0) end
            return u
        end)
    end

    local function archived_payloads(m, id)
        local out = {}
        for i, r in ipairs(assert(db:query([[
SELECT payload::text AS p FROM qx_aggregate_events_archive
 WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence]], m.type, id))) do
            out[i] = r.p
        end
        return out
    end

    it("of an archived stream open on load and reads, and read qx.forgotten after forget", function()
        local m = user_model(qx.event(support.unique("user.registered"),
                                      { personal = { "email", "age" }, subject = "user_id" }))
        local id, other = qx.uuid(), qx.uuid()
        assert(append(m, id, { m.Registered{ user_id = id, email = "ada@example.org", age = 36 },
                               m.Upgraded{ plan = "team" } }))
        assert(append(m, other, { m.Registered{ user_id = other, email = "bob@example.org" } }))
        assert(m.store:archive(m.type, id))
        assert.same({}, assert(db:query([[
SELECT 1 FROM qx_aggregate_events WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, id)))
        -- the archive holds the rows as written: sealed text only
        local stored = archived_payloads(m, id)
        assert.equal(2, #stored)
        assert.is_nil(stored[1]:find("ada@", 1, true))
        assert.truthy(stored[1]:find("qx:sealed:1:" .. id, 1, true))
        -- no snapshot of it is left in clear: archiving dropped it
        assert.same({ { n = 0 } }, assert(db:query([[
SELECT count(*)::int AS n FROM qx_aggregate_snapshots
 WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, id)))

        -- before the forget: the archived stream's personal fields open like a hot one's
        local u = assert(load(m, id, { archived = true }))
        assert.equal("ada@example.org", u.email)
        assert.equal(36, u.age)
        assert.equal("team", u.plan)
        local recs = assert(m.store:read_stream(m.type, id, { archived = true }))
        assert.equal("ada@example.org", recs[1].email)
        local all = assert(m.store:read_all{ aggregate_type = m.type })
        local by_subject = {}
        for _, r in ipairs(all) do
            if r.user_id then by_subject[r.user_id] = r.email end
        end
        assert.same({ [id] = "ada@example.org", [other] = "bob@example.org" }, by_subject)

        assert(qx.forget(db, id))
        assert.same(stored, archived_payloads(m, id)) -- no row rewritten
        u = assert(load(m, id, { archived = true }))
        assert.equal(qx.forgotten, u.email)
        assert.equal(qx.forgotten, u.age)
        assert.equal("team", u.plan)
        recs = assert(m.store:read_stream(m.type, id, { archived = true }))
        assert.equal(qx.forgotten, recs[1].email)
        assert.equal(id, recs[1].user_id)
        -- inside a unit of work too (the keys read FOR SHARE)
        local inside = assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):read_stream(m.type, id, { archived = true }))
        end))
        assert.equal(qx.forgotten, inside[1].email)
        by_subject = {}
        for _, r in ipairs(assert(m.store:read_all{ aggregate_type = m.type })) do
            if r.user_id then by_subject[r.user_id] = r.email end
        end
        assert.same({ [id] = qx.forgotten, [other] = "bob@example.org" }, by_subject)
    end)

    it("archiving a stream and forgetting its subject both drop its snapshot, in either order", function()
        local Registered = qx.event(support.unique("user.registered"),
                                    { personal = { "email" }, subject = "user_id" })
        local m = user_model(Registered)
        m.store = qx.event_store{ db = db, snapshot_every = 1 }
        local a, b = qx.uuid(), qx.uuid()
        assert(append(m, a, { Registered{ user_id = a, email = "a@example.org" } }))
        assert(append(m, b, { Registered{ user_id = b, email = "b@example.org" } }))
        local function snapshots(id)
            return assert(db:query([[
SELECT count(*)::int AS n FROM qx_aggregate_snapshots
 WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, id))[1].n
        end
        assert.same({ 1, 1 }, { snapshots(a), snapshots(b) })
        assert(qx.forget(db, a))      -- forget first: its snapshot goes
        assert.equal(0, snapshots(a))
        assert(m.store:archive(m.type, a))
        assert(m.store:archive(m.type, b)) -- archive first: its snapshot goes
        assert.equal(0, snapshots(b))
        assert(qx.forget(db, b))
        assert.equal(qx.forgotten, assert(load(m, b, { archived = true })).email)
        assert.equal(qx.forgotten, assert(load(m, a, { archived = true })).email)
    end)

    it("are opened before upcasters run: load, reads and projections see the values", function()
        -- yesterday's deploy stored v1 { mail }; today's class is v2 { email }: its step renames
        -- the personal field, and the sealed text is bound to the name it was stored under
        local name = support.unique("user.contact")
        local V1 = qx.event(name, { personal = { "mail" }, subject = "user_id" })
        local old = user_model(V1)
        local id = qx.uuid()
        assert(append(old, id, { V1{ user_id = id, mail = "dan@example.org" } }))

        local V2 = qx.event(name, { version = 2, personal = { "email" }, subject = "user_id" })
        local seen = {}
        V2:upcast(1, function(p)
            seen[#seen + 1] = p.mail
            p.email, p.mail = p.mail, nil
            return p
        end)
        local m = user_model(V2)
        m.type = old.type
        m.User = qx.event_sourced(m.type)
        m.User:on(V2, function(self, ev) self.email = ev.email end)
        m.store = qx.event_store{ db = db, registry = qx.registry{ V2 } }

        assert.equal("dan@example.org", assert(load(m, id)).email)
        local recs = assert(m.store:read_stream(m.type, id))
        assert.equal("dan@example.org", recs[1].email)
        assert.is_nil(recs[1].mail)
        assert.equal(2, recs[1].event_version)
        assert.equal("dan@example.org", assert(m.store:read_all{ types = V2 })[1].email)
        local got = {}
        local p = qx.projection{ name = support.unique("contacts"), db = db, on_progress = false,
                                 handlers = { [V2] = function(ev) got[#got + 1] = ev.email end } }
        assert.equal(1, assert(p:catch_up()))
        assert.same({ "dan@example.org" }, got)
        assert.same({ "dan@example.org", "dan@example.org", "dan@example.org",
                      "dan@example.org" }, seen)

        -- after the forget the step sees qx.forgotten, never the sealed text
        assert(qx.forget(db, id))
        assert.equal(qx.forgotten, assert(load(m, id)).email)
        assert.equal(qx.forgotten, seen[#seen])
        assert.equal(qx.forgotten, assert(m.store:read_stream(m.type, id))[1].email)
    end)

    it("a traced unit of work stores the trace columns and the sealed fields together", function()
        local tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        local ts = "congo=t61rcWkgMzE"
        local Registered = qx.event(support.unique("user.registered"),
                                    { personal = { "email" }, subject = "user_id" })
        local SignedUp = qx.integration_event(support.unique("user.signed_up"),
                                              { personal = { "email" }, subject = "user_id" })
        local m = user_model(Registered)
        -- one, two and more than 32 outbox rows: each form of the outbox insert
        for _, n in ipairs({ 1, 2, 33 }) do
            local id = qx.uuid()
            local ids = {}
            assert(db:unit_of_work(function(uow)
                local es = uow:store(m.store)
                local u = m.User.new(id)
                u:record(Registered{ user_id = id, email = "eve@example.org" })
                assert(es:append(u))
                for i = 1, n do
                    ids[i] = assert(uow:record(SignedUp{ user_id = id, email = "eve@example.org",
                                                         n = i })).event_id
                end
            end, { context = { traceparent = tp, tracestate = ts } }))
            local rows = assert(db:query([[
SELECT traceparent, tracestate, payload::text AS p FROM qx_outbox_events
 WHERE id = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)::uuid))]], ids))
            assert.equal(n, #rows)
            for _, r in ipairs(rows) do
                assert.equal(tp, r.traceparent)
                assert.equal(ts, r.tracestate)
                assert.is_nil(r.p:find("eve@", 1, true))
                assert.truthy(r.p:find("qx:sealed:1:" .. id, 1, true))
            end
            local ev = assert(db:query([[
SELECT traceparent, tracestate, payload::text AS p FROM qx_aggregate_events
 WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, id))[1]
            assert.equal(tp, ev.traceparent)
            assert.equal(ts, ev.tracestate)
            assert.is_nil(ev.p:find("eve@", 1, true))
            local rec = assert(m.store:read_stream(m.type, id))[1]
            assert.equal("eve@example.org", rec.email)
            assert.equal(tp, rec._traceparent)
        end
        -- a forgotten subject's event in a traced unit of work: refused, nothing written
        local id = qx.uuid()
        assert(qx.forget(db, id))
        local r, e = db:unit_of_work(function(uow)
            local ok, re = uow:record(SignedUp{ user_id = id, email = "late@example.org" })
            if not ok then error(re, 0) end
        end, { context = { traceparent = tp } })
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.same({}, assert(db:query([[
SELECT 1 FROM qx_outbox_events WHERE payload->'payload'->>'user_id' = $1]], id)))
    end)

    it("on_forget of a blue/green version gets it and erases its own tables, made first if it never ran", function()
        local Registered = qx.event(support.unique("user.registered"),
                                    { personal = { "email" }, subject = "user_id" })
        local m = user_model(Registered)
        local name, tbl = support.unique("bg_emails"), support.unique("emails")
        local function version(v)
            return qx.projection{
                name = name, version = v, db = db, on_progress = false, tables = { tbl },
                setup = function(uow, p)
                    assert(uow:exec("CREATE TABLE " .. p:table(tbl)
                                    .. " (user_id uuid PRIMARY KEY, email text)"))
                end,
                handlers = { [Registered] = function(ev, uow, p)
                    local email = ev.email
                    if email == qx.forgotten then email = qx.null end
                    assert(uow:exec("INSERT INTO " .. p:table(tbl) .. " VALUES ($1, $2)",
                                    ev.user_id, email))
                end },
                on_forget = function(subject, uow, p)
                    assert(p.version == v, "the hook got another version")
                    assert(uow:exec("DELETE FROM " .. p:table(tbl) .. " WHERE user_id = $1",
                                    subject))
                end,
            }
        end
        local v1 = version(1)
        local a, b = qx.uuid(), qx.uuid()
        assert(append(m, a, { Registered{ user_id = a, email = "a@example.org" } }))
        assert(append(m, b, { Registered{ user_id = b, email = "b@example.org" } }))
        assert.equal(2, assert(v1:catch_up()))
        local v2 = version(2) -- made, never run: its table does not exist yet
        assert.same({ { here = false } }, assert(db:query(
            "SELECT to_regclass($1) IS NOT NULL AS here", v2:table(tbl))))
        assert(qx.forget(db, a))
        -- v1's hook erased from its table (readers see it through the view); v2 was registered
        -- (its table made) before its hook ran in the forget's transaction
        assert.same({ { id = b, email = "b@example.org" } },
                    assert(db:query("SELECT user_id::text AS id, email FROM " .. tbl)))
        assert.same({ { here = true } }, assert(db:query(
            "SELECT to_regclass($1) IS NOT NULL AS here", v2:table(tbl))))
        -- v2 builds from the events: the forgotten subject's address is gone there too
        assert.equal(2, assert(v2:catch_up()))
        assert.same({ { id = a, email = qx.null }, { id = b, email = "b@example.org" } },
                    assert(db:query("SELECT user_id::text AS id, email FROM " .. v2:table(tbl)
                                    .. " ORDER BY email NULLS FIRST")))
        -- both versions' hooks run on the next forget
        assert(qx.forget(db, b))
        assert.same({}, assert(db:query("SELECT 1 FROM " .. v1:table(tbl)
                                        .. " WHERE email IS NOT NULL")))
        assert.same({}, assert(db:query("SELECT 1 FROM " .. v2:table(tbl)
                                        .. " WHERE email IS NOT NULL")))
    end)

    it("a version that cannot be registered before its hook fails the forget, naming it; nothing forgotten", function()
        local Registered = qx.event(support.unique("user.registered"),
                                    { personal = { "email" }, subject = "user_id" })
        local m = user_model(Registered)
        local id = qx.uuid()
        assert(append(m, id, { Registered{ user_id = id, email = "h@example.org" } }))
        -- made on a db handle of its own, so that its hook is not registered with this one's
        local other = support.migrated_db{ pool_size = 1 }
        local name = support.unique("broken_bg")
        local broken = qx.projection{
            name = name, version = 1, db = other, on_progress = false,
            tables = { support.unique("t") },
            setup = function() error("no room for the table") end,
            handlers = { [Registered] = function() end },
            on_forget = function() error("must not run") end,
        }
        local ok, e = qx.forget(db, id, { projections = { broken } })
        assert.is_nil(ok)
        assert.matches(name, e.message, 1, true)
        assert.matches("no room for the table", e.message, 1, true)
        assert.equal(name, e.projection)
        assert.equal("h@example.org", assert(m.store:read_stream(m.type, id))[1].email)
        other:close()
    end)
end)

-- Forgetting a person (crypto-shredding) against a real PostgreSQL: personal fields sealed per
-- data subject, qx.forget, the tombstone, snapshots, projections, tampering, the key race and
-- the key cache across processes. With archived streams, upcasters, trace context and
-- blue/green projection versions: spec/store/erasure_interplay_spec.lua; the class options:
-- spec/model/event_personal_spec.lua; the outbox/consumer path: spec/messaging/erasure_spec.lua.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"
local personal = require "qx.store.personal"

local sh = support.sh

-- the interpreter running this spec (lua5.4, luajit, or the ASan build of lua5.4)
local function interpreter()
    local i = -1
    while arg and arg[i - 1] ~= nil do i = i - 1 end
    return (arg and arg[i]) or (jit and "luajit" or "lua5.4")
end

-- Starts code in a child process (env: a table of variables); wait(child) -> its output.
local function spawn(code, env)
    local file = os.tmpname()
    local f = assert(io.open(file, "w"))
    f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
    f:write(code)
    f:close()
    local parts = { "env ASAN_OPTIONS=detect_leaks=0" }
    for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. sh(v) end
    parts[#parts + 1] = sh(interpreter()) .. " " .. sh(file) .. " 2>&1"
    return { pipe = assert(io.popen(table.concat(parts, " "), "r")), file = file }
end

local function wait(child)
    local out = child.pipe:read("*a") or ""
    child.pipe:close()
    os.remove(child.file)
    return out
end

-- waits until the backend of another process waits for a lock on qx_subject_keys
local function lock_waiter_seen(db, seconds)
    local deadline = core.clock() + (seconds or 10)
    repeat
        local rows = assert(db:query([[
SELECT count(*)::int AS n FROM pg_stat_activity
 WHERE wait_event_type = 'Lock' AND query ILIKE '%qx_subject_keys%']]))
        if rows[1].n > 0 then return true end
        core.signals_sleep(20)
    until core.clock() > deadline
    return false
end

describe("personal fields", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- a user aggregate of its own, whose registration carries three personal fields
    local function model(opts)
        opts = opts or {}
        local m = {}
        m.type = support.unique("User")
        m.Registered = qx.event(support.unique("user.registered"),
                                { personal = { "email", "name", "age" }, subject = "user_id" })
        m.Renamed = qx.event(support.unique("user.renamed"), { personal = { "name" }, subject = "user_id" })
        m.Upgraded = qx.event(support.unique("user.upgraded"))
        local User = qx.event_sourced(m.type)
        User:on(m.Registered, function(self, ev)
            self.email, self.name, self.age, self.plan = ev.email, ev.name, ev.age, ev.plan
        end)
        User:on(m.Renamed, function(self, ev) self.name = ev.name end)
        User:on(m.Upgraded, function(self, ev) self.plan = ev.plan end)
        m.User = User
        m.store = qx.event_store{ db = db, snapshot_every = opts.snapshot_every or 0 }
        return m
    end

    local function register(m, id, fields)
        local f = { user_id = id, email = "ada@example.org", name = { first = "Ada", last = "L" },
                    age = 36, plan = "pro" }
        for k, v in pairs(fields or {}) do f[k] = v end
        if f.user_id == false then f.user_id = nil end -- no subject at all
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local u = m.User.new(id)
            u:record(m.Registered(f))
            local ok, e = es:append(u)
            if not ok then error(e, 0) end
            return u
        end)
    end

    local function command(m, id, fn)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local u = assert(es:load(m.User, id))
            fn(u)
            local ok, e = es:append(u)
            if not ok then error(e, 0) end
            return u
        end)
    end

    local function load(m, id, opts)
        return db:unit_of_work(function(uow)
            local u, e = uow:store(m.store):load(m.User, id, opts)
            if not u then error(e or "no such user", 0) end
            return u
        end)
    end

    local function stored_texts(m)
        local rows = assert(db:query([[
SELECT payload::text AS p FROM qx_aggregate_events WHERE aggregate_type = $1 ORDER BY sequence]],
            m.type))
        local out = {}
        for i, r in ipairs(rows) do out[i] = r.p end
        return out
    end

    it("are stored sealed, each value in its own sealed text, and the other fields in clear", function()
        local m, id = model(), qx.uuid()
        assert(register(m, id))
        local text = stored_texts(m)[1]
        assert.is_nil(text:find("ada@example.org", 1, true))
        assert.is_nil(text:find("Ada", 1, true))
        local row = assert(db:query([[
SELECT payload FROM qx_aggregate_events WHERE aggregate_type = $1]], m.type))[1].payload
        for _, f in ipairs({ "email", "name", "age" }) do
            assert.equal("qx:sealed:1:" .. id .. ":", row[f]:sub(1, 49), f)
        end
        assert.equal("pro", row.plan)
        assert.equal(id, row.user_id)
        local keys = assert(db:query([[
SELECT length(key) AS n, forgotten_at FROM qx_subject_keys WHERE subject_id = $1]], id))
        assert.same({ { n = 32, forgotten_at = qx.null } }, keys)
    end)

    it("read back with their values and types through load, read_stream and read_all", function()
        local m, id = model(), qx.uuid()
        assert(register(m, id))
        local u = assert(load(m, id))
        assert.equal("ada@example.org", u.email)
        assert.same({ first = "Ada", last = "L" }, u.name)
        assert.equal(36, u.age)
        if math.type then assert.equal("integer", math.type(u.age)) end
        local recs = assert(m.store:read_stream(m.type, id))
        assert.equal("ada@example.org", recs[1].email)
        assert.same({ first = "Ada", last = "L" }, recs[1].name)
        local all = assert(m.store:read_all{ aggregate_type = m.type })
        assert.equal(1, #all)
        assert.equal(36, all[1].age)
        if math.type then assert.equal("integer", math.type(all[1].age)) end
    end)

    it("read outside a unit of work, with keys kept or not, the same as inside one", function()
        -- reads outside a unit of work open sealed values as the rows are decoded, with the keys
        -- the process keeps; inside one, the keys are read (and held) for each read
        local m = model()
        local ids = {}
        for i = 1, 6 do
            ids[i] = qx.uuid()
            assert(register(m, ids[i], { age = i % 2 == 0 and 2.5 or i, plan = "p" .. i }))
            if i % 3 == 0 then
                assert(command(m, ids[i], function(u)
                    u:record(m.Renamed{ user_id = ids[i], name = "n" .. i })
                end))
            end
        end
        assert(qx.forget(db, ids[4]))
        -- one event stored without its event_id in the payload (as older rows are): its id
        -- comes from the row
        assert(db:exec([[
UPDATE qx_aggregate_events SET payload = payload - 'event_id'
 WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, ids[5]))
        local inside = db:unit_of_work(function(uow)
            return assert(uow:store(m.store):read_all{ aggregate_type = m.type })
        end)
        personal.clear_cache()
        local cold = assert(m.store:read_all{ aggregate_type = m.type })
        local warm = assert(m.store:read_all{ aggregate_type = m.type })
        local paged, after = {}, nil
        repeat
            local page, cp = assert(m.store:read_all{ aggregate_type = m.type, limit = 2, after = after })
            for _, r in ipairs(page) do paged[#paged + 1] = r end
            after = cp
        until #page < 2
        assert.equal(8, #inside)
        for _, got in ipairs({ cold, warm, paged }) do
            assert.equal(#inside, #got)
            for i = 1, #inside do
                assert.same(inside[i], got[i])
                if math.type then
                    assert.equal(math.type(inside[i].age), math.type(got[i].age))
                end
            end
        end
        for _, r in ipairs(warm) do
            if r.user_id == ids[4] then
                assert.equal(qx.forgotten, r.name)
            elseif r.event_name == m.Registered.event_name then
                assert.equal("ada@example.org", r.email)
            end
        end
        -- a sealed value changed to hold an escaped character is refused, keys kept or not
        assert(db:exec([[
UPDATE qx_aggregate_events SET payload = jsonb_set(payload, '{email}',
       to_jsonb(substr(payload->>'email', 1, 60) || '"' || substr(payload->>'email', 62)))
 WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, ids[1]))
        for _ = 1, 2 do
            local recs, e = m.store:read_all{ aggregate_type = m.type }
            assert.is_nil(recs)
            assert.equal("invalid", e.code)
            assert.matches("does not open", e.message)
        end
    end)

    it("are sealed by append_batch, and opened by the reads inside a unit of work", function()
        local m, a, b = model(), qx.uuid(), qx.uuid()
        assert(db:unit_of_work(function(uow)
            local ua, ub = m.User.new(a), m.User.new(b)
            ua:record(m.Registered{ user_id = a, email = "a@example.org" })
            ub:record(m.Registered{ user_id = b, email = "b@example.org" })
            ub:record(m.Renamed{ user_id = b, name = "Bea" })
            assert(uow:store(m.store):append_batch({ ua, ub }))
        end))
        for _, text in ipairs(stored_texts(m)) do
            assert.is_nil(text:find("@example.org", 1, true))
            assert.is_nil(text:find("Bea", 1, true))
        end
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local recs = assert(es:read_stream(m.type, b))
            assert.equal("b@example.org", recs[1].email)
            assert.equal("Bea", recs[2].name)
            local all = assert(es:read_all{ aggregate_type = m.type })
            assert.equal(3, #all)
        end))
        -- the same key serves a subject's later events
        assert(command(m, a, function(u) u:record(m.Renamed{ user_id = a, name = "Al" }) end))
        assert.equal("Al", assert(load(m, a)).name)
        assert.equal(2, #assert(db:query(
            "SELECT 1 FROM qx_subject_keys WHERE subject_id = ANY (ARRAY[$1::uuid, $2::uuid])", a, b)))
    end)

    it("that are absent or null are fine: nothing to seal, and no key is made", function()
        local m, id = model(), qx.uuid()
        assert(db:unit_of_work(function(uow)
            local u = m.User.new(id)
            u:record(m.Registered{ user_id = id, plan = "free", email = qx.null })
            assert(uow:store(m.store):append(u))
        end))
        local u = assert(load(m, id))
        assert.equal("free", u.plan)
        assert.equal(qx.null, u.email)
        assert.same({}, assert(db:query("SELECT 1 FROM qx_subject_keys WHERE subject_id = $1", id)))
    end)

    it("read qx.forgotten after forget, while load, replay and read_all keep working, no row rewritten", function()
        local m, id, other = model(), qx.uuid(), qx.uuid()
        assert(register(m, id))
        assert(register(m, other, { email = "bob@example.org" }))
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "team" }) end))
        local before = stored_texts(m)
        assert.is_true(qx.forget(db, id))
        assert.same(before, stored_texts(m))

        local u = assert(load(m, id))
        assert.equal(qx.forgotten, u.email)
        assert.equal(qx.forgotten, u.name)
        assert.equal(qx.forgotten, u.age)
        assert.equal("team", u.plan)
        assert.equal(2, u.version)
        assert.equal("qx.forgotten", tostring(qx.forgotten))
        local recs = assert(m.store:read_stream(m.type, id))
        assert.equal(qx.forgotten, recs[1].email)
        assert.equal(id, recs[1].user_id)
        -- the other subject is untouched
        assert.equal("bob@example.org", assert(load(m, other)).email)
        -- the aggregate goes on: events without personal fields are still appended
        assert(command(m, id, function(x) x:record(m.Upgraded{ plan = "free" }) end))
        assert.equal("free", assert(load(m, id)).plan)
        local keys = assert(db:query([[
SELECT key, forgotten_at IS NOT NULL AS gone FROM qx_subject_keys WHERE subject_id = $1]], id))
        assert.same({ { key = qx.null, gone = true } }, keys)
        -- forgetting twice is harmless
        assert.is_true(qx.forget(db, id))
        assert.is_true(m.store:forget(id))
    end)

    it("drop the subject's snapshots on forget; the next snapshot keeps qx.forgotten, not the data", function()
        local m, id = model{ snapshot_every = 1 }, qx.uuid()
        assert(register(m, id))
        local snap = assert(db:query([[
SELECT state FROM qx_aggregate_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2]],
            m.type, id))
        assert.equal(1, #snap)
        assert.equal("ada@example.org", snap[1].state.email) -- a snapshot is the state as it is
        assert(qx.forget(db, id))
        assert.same({}, assert(db:query([[
SELECT 1 FROM qx_aggregate_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2]],
            m.type, id)))
        -- a later snapshot is made from the replayed state: the forgotten values, as such
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "team" }) end))
        local text = assert(db:query([[
SELECT state::text AS s FROM qx_aggregate_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2]],
            m.type, id))[1].s
        assert.is_nil(text:find("ada@", 1, true))
        assert.truthy(text:find("qx:forgotten", 1, true))
        local u = assert(load(m, id))
        assert.equal(qx.forgotten, u.email)
        assert.equal("team", u.plan)
    end)

    it("a forget during a load from a snapshot waits, then drops the snapshot the load's append wrote", function()
        local m, id = model{ snapshot_every = 2 }, qx.uuid()
        assert(register(m, id))
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "team" }) end)) -- snapshot at 2
        local child
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local u = assert(es:load(m.User, id))
            assert.equal("ada@example.org", u.email) -- from the snapshot, in clear
            child = spawn([[
local qx = require "qx"
local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 1 })
print(qx.forget(db, os.getenv("E_ID")) and "OK")
]], { E_ID = id })
            assert.is_true(lock_waiter_seen(db))
            u:record(m.Upgraded{ plan = "free" })
            u:record(m.Upgraded{ plan = "pro" })  -- a new snapshot at 4, of the state in clear
            assert(es:append(u))
        end))
        assert.equal("OK\n", wait(child))
        assert.same({}, assert(db:query([[
SELECT 1 FROM qx_aggregate_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2]],
            m.type, id)))
        local u = assert(load(m, id))
        assert.equal(qx.forgotten, u.email)
        assert.equal("pro", u.plan)
        assert.equal(4, u.version)
    end)

    local function noted(m, id)
        local rows = assert(db:query([[
SELECT subject_id::text AS s FROM qx_subject_streams
 WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY 1]], m.type, id))
        local out = {}
        for i, r in ipairs(rows) do out[i] = r.s end
        return out
    end

    local function snapshot_count(m, id)
        return assert(db:query([[
SELECT count(*)::int AS n FROM qx_aggregate_snapshots
 WHERE aggregate_type = $1 AND aggregate_id = $2]], m.type, id))[1].n
    end

    it("an append without a snapshot notes no stream; a snapshot notes every subject it folds", function()
        local m, id, other = model{ snapshot_every = 3 }, qx.uuid(), qx.uuid()
        assert(register(m, id))                                     -- 1: no snapshot
        assert(command(m, id, function(u) u:record(m.Renamed{ user_id = other, name = "Bob" }) end))
        assert.same({}, noted(m, id))
        assert.equal(0, snapshot_count(m, id))
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "team" }) end)) -- 3: snapshot
        local both = { id:lower(), other:lower() }
        table.sort(both)
        assert.same(both, noted(m, id))
        -- the subject of an event folded before the snapshot, never in an append with one
        assert(qx.forget(db, other))
        assert.equal(0, snapshot_count(m, id))
        local u = assert(load(m, id))
        assert.equal(qx.forgotten, u.name)
        assert.equal("ada@example.org", u.email)
    end)

    it("a later snapshot notes the subjects of the events since the one it replaces, and forget drops it", function()
        local m, id, later = model{ snapshot_every = 2 }, qx.uuid(), qx.uuid()
        assert(register(m, id))
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "team" }) end)) -- snapshot at 2
        assert.same({ id:lower() }, noted(m, id))
        assert(command(m, id, function(u) u:record(m.Renamed{ user_id = later, name = "Eve" }) end))
        assert.same({ id:lower() }, noted(m, id))              -- 3: no snapshot, nothing noted
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "pro" }) end)) -- 4: replaced
        local snap = assert(db:query([[
SELECT state, version FROM qx_aggregate_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2]],
            m.type, id))
        assert.equal(4, snap[1].version)
        assert.equal("Eve", snap[1].state.name)
        assert(qx.forget(db, later))
        assert.equal(0, snapshot_count(m, id))
        local u = assert(load(m, id))
        assert.equal(qx.forgotten, u.name)
        assert.equal("pro", u.plan)
    end)

    it("refuse a changed sealed value, or one moved to another event or field, as invalid", function()
        local m, id = model(), qx.uuid()
        assert(register(m, id))
        assert(command(m, id, function(u) u:record(m.Renamed{ user_id = id, name = "Ada B" }) end))
        local function expect_invalid(sql, pattern)
            assert(db:exec(sql, m.type))
            local recs, e = m.store:read_stream(m.type, id)
            assert.is_nil(recs)
            assert.equal("invalid", e.code)
            assert.matches(pattern, e.message)
            local _, le = db:unit_of_work(function(uow) return uow:store(m.store):load(m.User, id) end)
            assert.equal("invalid", le.code)
        end
        local original = assert(db:query([[
SELECT sequence, payload FROM qx_aggregate_events WHERE aggregate_type = $1 ORDER BY sequence]],
            m.type))
        local function restore()
            for _, r in ipairs(original) do
                assert(db:exec([[
UPDATE qx_aggregate_events SET payload = $3 WHERE aggregate_type = $1 AND sequence = $2]],
                    m.type, r.sequence, r.payload))
            end
            assert(m.store:read_stream(m.type, id))
        end
        -- a character of the ciphertext changed
        local email = original[1].payload.email
        local last = email:sub(-1) == "A" and "B" or "A"
        assert(db:exec([[
UPDATE qx_aggregate_events SET payload = jsonb_set(payload, '{email}', to_jsonb($2::text))
 WHERE aggregate_type = $1 AND sequence = 1]], m.type, email:sub(1, -2) .. last))
        local recs, e = m.store:read_stream(m.type, id)
        assert.is_nil(recs)
        assert.equal("invalid", e.code)
        assert.matches("does not open", e.message)
        restore()
        -- the name of event 2 copied over the name of event 1 (another event id)
        expect_invalid([[
UPDATE qx_aggregate_events SET payload = jsonb_set(payload, '{name}',
       (SELECT payload->'name' FROM qx_aggregate_events WHERE aggregate_type = $1 AND sequence = 2))
 WHERE aggregate_type = $1 AND sequence = 1]], "does not open")
        restore()
        -- the email moved to the name field of the same event
        expect_invalid([[
UPDATE qx_aggregate_events SET payload = jsonb_set(payload, '{name}', payload->'email')
 WHERE aggregate_type = $1 AND sequence = 1]], "does not open")
        restore()
        -- a sealed value whose subject part names no key of this database
        expect_invalid([[
UPDATE qx_aggregate_events SET payload = jsonb_set(payload, '{age}',
       to_jsonb(replace(payload->>'age', payload->>'user_id', '00000000-0000-4000-8000-000000000000')))
 WHERE aggregate_type = $1 AND sequence = 1]], "no key")
        restore()
        expect_invalid([[
UPDATE qx_aggregate_events SET payload = jsonb_set(payload, '{age}', '"qx:sealed:1:garbage"')
 WHERE aggregate_type = $1 AND sequence = 1]], "malformed")
    end)

    it("of a forgotten subject are refused as invalid later, cached key or not, nothing written", function()
        local m, id = model(), qx.uuid()
        assert(register(m, id))
        assert(qx.forget(db, id))
        local n_before = #stored_texts(m)
        -- this process still has the subject's key cached for writing: refused at commit
        local r, e = command(m, id, function(u) u:record(m.Renamed{ user_id = id, name = "X" }) end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("forgotten", e.message)
        -- without the cached key: refused at append
        personal.clear_cache()
        r, e = command(m, id, function(u) u:record(m.Renamed{ user_id = id, name = "X" }) end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("forgotten", e.message)
        assert.equal(n_before, #stored_texts(m))
        -- a subject forgotten before it ever had data: its tombstone refuses it all the same
        local never = qx.uuid()
        assert(qx.forget(db, never))
        r, e = register(m, never)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.equal(n_before, #stored_texts(m))
        -- events of the subject without personal fields are still fine
        assert(command(m, id, function(u) u:record(m.Upgraded{ plan = "x" }) end))
    end)

    it("need a uuid subject: a missing or malformed one is invalid at record, and nothing is written", function()
        local m = model()
        for _, bad in ipairs({ false, "not-a-uuid", 42 }) do
            local id = qx.uuid()
            local r, e = register(m, id, { user_id = bad })
            assert.is_nil(r)
            assert.equal("invalid", e.code)
            assert.matches("user_id", e.message)
        end
        assert.same({}, stored_texts(m))
        -- uow:record refuses it as well
        local r, e = db:unit_of_work(function(uow)
            local ev, re = uow:record(m.Registered{ email = "a@b.c" })
            if not ev then error(re, 0) end
        end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        -- a non-personal field that looks sealed is refused (it would not open on read)
        r, e = db:unit_of_work(function(uow)
            local u = m.User.new(qx.uuid())
            u:record(m.Upgraded{ plan = "qx:sealed:1:whatever" })
            local ok, ae = uow:store(m.store):append(u)
            if not ok then error(ae, 0) end
        end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("sealed", e.message)
        -- the same in a personal event's other fields, and in an event bound for the outbox
        r, e = register(m, qx.uuid(), { plan = "qx:sealed:1:whatever" })
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("field 'plan' is not personal", e.message, 1, true)
        local Notice = qx.integration_event(support.unique("user.notice"))
        r, e = db:unit_of_work(function(uow) uow:record(Notice{ text = "qx:sealed:1:whatever" }) end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("field 'text' is not personal", e.message, 1, true)
        local n = assert(db:query("SELECT count(*)::int AS n FROM qx_outbox_events WHERE event_name = $1",
                                  Notice.event_name))
        assert.equal(0, n[1].n)
        -- qx.forgotten cannot be recorded
        r, e = register(m, qx.uuid(), { email = qx.forgotten })
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.same({}, stored_texts(m))
    end)

    it("qx.forget: a subject id that is not a uuid is invalid, and a bad call raises", function()
        local _, e = qx.forget(db, "someone")
        assert.equal("invalid", e.code)
        _, e = qx.forget(db, nil)
        assert.equal("invalid", e.code)
        assert.error_matches(function() qx.forget({}, qx.uuid()) end, "qx.connect")
        assert.error_matches(function() qx.forget(db, qx.uuid(), { projection = {} }) end,
                             "unknown")
    end)

    it("of two first writers of one subject, in two processes, end under one key", function()
        local m, id = model(), qx.uuid()
        local writer = [[
local qx = require "qx"
local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 1 })
local Registered = qx.event(os.getenv("E_NAME"), { personal = { "email", "name", "age" }, subject = "user_id" })
local User = qx.event_sourced(os.getenv("E_TYPE"))
User:on(Registered, function() end)
local store = qx.event_store{ db = db }
local ok, e = db:unit_of_work(function(uow)
  local u = User.new(os.getenv("E_AGG"))
  u:record(Registered{ user_id = os.getenv("E_ID"), email = "child@example.org" })
  assert(uow:store(store):append(u))
end)
print(ok and "OK" or tostring(e))
]]
        local agg = qx.uuid()
        local child
        -- this process makes the key first and holds its row until it commits; the child's
        -- first write waits for it, then takes the same key
        assert(db:unit_of_work(function(uow)
            local u = m.User.new(id)
            u:record(m.Registered{ user_id = id, email = "parent@example.org" })
            assert(uow:store(m.store):append(u))
            assert(uow:flush())
            child = spawn(writer, { E_NAME = m.Registered.event_name, E_TYPE = m.type,
                                    E_AGG = agg, E_ID = id })
            assert.is_true(lock_waiter_seen(db))
        end))
        assert.equal("OK\n", wait(child))
        assert.equal("parent@example.org", assert(m.store:read_stream(m.type, id))[1].email)
        assert.equal("child@example.org", assert(m.store:read_stream(m.type, agg))[1].email)
        assert.equal(1, #assert(db:query("SELECT 1 FROM qx_subject_keys WHERE subject_id = $1", id)))
    end)

    it("no key is served from a cache after a forget committed in another process", function()
        local m, id = model(), qx.uuid()
        assert(register(m, id))
        -- warm: this process has the key for writing, and for reading outside a unit of work
        assert.equal("ada@example.org", assert(load(m, id)).email)
        assert.equal("ada@example.org", assert(m.store:read_stream(m.type, id))[1].email)
        assert.equal("ada@example.org", assert(m.store:read_all{ aggregate_type = m.type })[1].email)
        local out = wait(spawn([[
local qx = require "qx"
local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 1 })
print(qx.forget(db, os.getenv("E_ID")) and "OK")
]], { E_ID = id }))
        assert.equal("OK\n", out)
        assert.equal(qx.forgotten, assert(load(m, id)).email)
        assert.equal(qx.forgotten, assert(m.store:read_stream(m.type, id))[1].email)
        assert.equal(qx.forgotten, assert(m.store:read_all{ aggregate_type = m.type })[1].email)
        local r, e = command(m, id, function(u) u:record(m.Renamed{ user_id = id, name = "N" }) end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.equal(1, #stored_texts(m))
    end)
end)

describe("personal fields in projections", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- a projection of e-mail addresses into a table of its own, erased by its on_forget hook
    local function setup_model()
        local m = { table = support.unique("emails") }
        m.type = support.unique("User")
        m.Registered = qx.event(support.unique("user.registered"), { personal = { "email" }, subject = "user_id" })
        m.store = qx.event_store{ db = db }
        assert(db:exec("CREATE TABLE " .. m.table .. " (user_id uuid PRIMARY KEY, email text)"))
        m.handler = function(ev, uow)
            local email = ev.email
            if email == qx.forgotten then email = nil end
            assert(uow:exec("INSERT INTO " .. m.table .. " VALUES ($1, $2)", ev.user_id, email))
        end
        m.on_forget = function(subject, uow)
            assert(uow:exec("DELETE FROM " .. m.table .. " WHERE user_id = $1", subject))
        end
        m.projection = qx.projection{ name = support.unique("emails"), db = db, on_progress = false,
                                      handlers = { [m.Registered] = m.handler }, on_forget = m.on_forget }
        return m
    end

    local function append(m, id)
        assert(db:unit_of_work(function(uow)
            local ev = m.Registered{ user_id = id, email = id:sub(1, 8) .. "@example.org" }
            ev.aggregate_type, ev.aggregate_id = m.type, id
            local User = qx.event_sourced(m.type)
            User:on(m.Registered, function() end)
            local u = User.new(id)
            u:record(ev)
            assert(uow:store(m.store):append(u))
        end))
    end

    local function emails(m)
        local out = {}
        for _, r in ipairs(assert(db:query("SELECT user_id::text AS id, email FROM " .. m.table))) do
            out[r.id] = r.email
        end
        return out
    end

    it("see the values, and on_forget erases them in the transaction of forget", function()
        local m = setup_model()
        local a, b = qx.uuid(), qx.uuid()
        append(m, a)
        append(m, b)
        assert.equal(2, assert(m.projection:catch_up()))
        assert.same({ [a] = a:sub(1, 8) .. "@example.org", [b] = b:sub(1, 8) .. "@example.org" }, emails(m))
        assert(qx.forget(db, a))
        assert.same({ [b] = b:sub(1, 8) .. "@example.org" }, emails(m))
        -- a rebuild replays the forgotten event: the handler gets qx.forgotten
        assert(db:exec("TRUNCATE " .. m.table))
        local again = qx.projection{ name = support.unique("emails"), db = db, on_progress = false,
                                     handlers = { [m.Registered] = m.handler } }
        assert.equal(2, assert(again:catch_up()))
        assert.same({ [a] = qx.null, [b] = b:sub(1, 8) .. "@example.org" }, emails(m))
    end)

    it("a failing on_forget rolls the forget back: the key stays and the error says which projection", function()
        local m = setup_model()
        local id = qx.uuid()
        append(m, id)
        local failing = qx.projection{ name = "failing_" .. support.unique("p"), db = db,
                                       handlers = { [m.Registered] = m.handler },
                                       on_forget = function() return nil, "read model is locked" end }
        local ok, e = qx.forget(db, id, { projections = { failing } })
        assert.is_nil(ok)
        assert.matches("failing_", e.message)
        assert.matches("read model is locked", e.message)
        assert.equal(id:sub(1, 8) .. "@example.org", assert(m.store:read_stream(m.type, id))[1].email)
        -- the hook is registered with the db: forget runs it without being told
        local _, e2 = qx.forget(db, id)
        assert.matches("failing_", e2.message)
        failing.on_forget = function() return true end
        assert(qx.forget(db, id))
    end)

    it("a forget that comes during a projection's batch waits for it, then erases what it wrote", function()
        local m = setup_model()
        local id = qx.uuid()
        append(m, id)
        local child
        local p = qx.projection{ name = support.unique("emails"), db = db, on_progress = false,
            handlers = { [m.Registered] = function(ev, uow)
                -- the batch has read (and holds) the key: a forget from another process waits
                child = spawn([[
local qx = require "qx"
local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 1 })
local T = os.getenv("E_TABLE")
local p = qx.projection{ name = "child", db = db, handlers = { ["x.y"] = function() end },
  on_forget = function(subject, uow) assert(uow:exec("DELETE FROM " .. T .. " WHERE user_id = $1", subject)) end }
print(qx.forget(db, os.getenv("E_ID"), { projections = { p } }) and "OK")
]], { E_ID = id, E_TABLE = m.table })
                assert.is_true(lock_waiter_seen(db))
                m.handler(ev, uow)
            end } }
        assert.equal(1, assert(p:catch_up()))
        assert.equal("OK\n", wait(child))
        assert.same({}, emails(m))
        assert.equal(qx.forgotten, assert(m.store:read_stream(m.type, id))[1].email)
    end)
end)

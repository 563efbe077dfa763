-- Archived streams against a real PostgreSQL: a closed stream refuses appends, loads and stream
-- reads say it is archived unless asked for, its events leave the hot table yet no global read
-- or projection misses or repeats one, and bad input is refused with nothing written.
local support = require "support"
local qx = require "qx"

describe("event store: archived streams", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function model(opts)
        local m = { type = support.unique("Ar") }
        m.Deposited = qx.event(support.unique("ar.deposited"))
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        m.store = qx.event_store{ db = db, snapshot_every = opts and opts.snapshot_every }
        return m
    end

    local function deposit(m, id, amounts, ctx)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            for _, n in ipairs(amounts) do acc:record(m.Deposited{ amount = n }) end
            assert(es:append(acc))
            return acc
        end, ctx and { context = ctx })
    end

    local function count(sql, ...)
        return assert(db:query(sql, ...))[1].n
    end

    local function hot(m, id)
        return count("SELECT count(*) AS n FROM qx_aggregate_events WHERE aggregate_type = $1 "
                     .. "AND aggregate_id = $2", m.type, id)
    end

    local function archived_rows(m, id)
        return count("SELECT count(*) AS n FROM qx_aggregate_events_archive "
                     .. "WHERE aggregate_type = $1 AND aggregate_id = $2", m.type, id)
    end

    local function marked(m, id)
        return count("SELECT count(*) AS n FROM qx_archived_streams WHERE aggregate_type = $1 "
                     .. "AND aggregate_id = $2", m.type, id)
    end

    local function amounts(records) return support.field(records, "amount") end

    it("store:archive moves the stream's events out of the hot table and names the stream", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1, 2, 3 }))
        local info = assert(m.store:archive(m.Account, id))
        assert.same({ m.type, id, 3, 3 },
                    { info.aggregate_type, info.aggregate_id, info.events, info.last_sequence })
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT", info.archived_at)
        assert.equal(0, hot(m, id))
        assert.equal(3, archived_rows(m, id))
        assert.equal(1, marked(m, id))
    end)

    it("an append to an archived stream fails with conflict: stream archived, nothing written", function()
        local m = model()
        local id = qx.uuid()
        local acc = assert(deposit(m, id, { 1 }))
        assert(m.store:archive(m.type, id))
        local ok, err = db:unit_of_work(function(uow)
            acc:record(m.Deposited{ amount = 5 })
            assert(uow:store(m.store):append(acc))
            return true
        end)
        assert.is_nil(ok)
        assert.equal("conflict", err.code)
        assert.matches("stream archived", err.message)
        -- a stale writer at version 0 (sequence 1, no event before it) is refused too
        ok, err = db:unit_of_work(function(uow)
            local fresh = m.Account.new(id)
            fresh:record(m.Deposited{ amount = 7 })
            assert(uow:store(m.store):append(fresh))
            return true
        end)
        assert.is_nil(ok)
        assert.equal("conflict", err.code)
        assert.matches("stream archived", err.message)
        assert.equal(0, hot(m, id))
        assert.equal(1, archived_rows(m, id))
    end)

    it("load of an archived stream is not_found with err.archived; a stream that never was is plain nil", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 4, 5 }))
        assert(m.store:archive(m.type, id))
        local got, err, never, never_err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local a, e = es:load(m.Account, id)
            local b, e2 = es:load(m.Account, qx.uuid())
            return a or false, e, b or false, e2 or false
        end)
        assert.is_false(got)
        assert.equal("not_found", err.code)
        assert.is_true(err.archived)
        assert.matches("stream archived", err.message)
        assert.is_false(never)
        assert.is_false(never_err)
    end)

    it("load with { archived = true } replays the archived events", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 4, 5 }))
        assert(deposit(m, id, { 6 }))
        assert(m.store:archive(m.type, id))
        local acc = assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):load(m.Account, id, { archived = true }))
        end))
        assert.equal(15, acc.balance)
        assert.equal(3, acc.version)
        -- and a live stream loads as before with the option
        local live = qx.uuid()
        assert(deposit(m, live, { 2 }))
        local l = assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):load(m.Account, live, { archived = true }))
        end))
        assert.equal(2, l.balance)
    end)

    it("archiving drops the stream's snapshot; the archived load replays every event", function()
        local m = model{ snapshot_every = 2 }
        local id = qx.uuid()
        assert(deposit(m, id, { 1, 2, 3 }))
        assert.equal(1, count("SELECT count(*) AS n FROM qx_aggregate_snapshots "
                              .. "WHERE aggregate_type = $1 AND aggregate_id = $2", m.type, id))
        assert(m.store:archive(m.type, id))
        assert.equal(0, count("SELECT count(*) AS n FROM qx_aggregate_snapshots "
                              .. "WHERE aggregate_type = $1 AND aggregate_id = $2", m.type, id))
        local acc = assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):load(m.Account, id, { archived = true }))
        end))
        assert.same({ 6, 3 }, { acc.balance, acc.version })
    end)

    it("read_stream of an archived stream is not_found with err.archived unless { archived = true }", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1, 2, 3 }))
        assert(m.store:archive(m.type, id))
        local recs, err = m.store:read_stream(m.type, id)
        assert.is_nil(recs)
        assert.same({ "not_found", true }, { err.code, err.archived })
        recs = assert(m.store:read_stream(m.type, id, { archived = true }))
        assert.same({ 1, 2, 3 }, amounts(recs))
        assert.same({ 1, 2, 3 }, support.field(recs, "_sequence"))
        recs = assert(m.store:read_stream(m.type, id, { archived = true, after_sequence = 1,
                                                        limit = 1 }))
        assert.same({ 2 }, amounts(recs))
        -- inside a unit of work too
        local r2, e2 = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local a, e = es:read_stream(m.type, id)
            local b = assert(es:read_stream(m.type, id, { archived = true }))
            return { a or false, e and e.code, #b }
        end)
        assert.is_nil(e2)
        assert.same({ false, "not_found", 3 }, r2)
        -- a stream that never was reads as empty, as before
        assert.same({}, assert(m.store:read_stream(m.type, qx.uuid())))
    end)

    it("read_all and read_category still return an archived stream's events, once, in order", function()
        local m = model()
        local a, b = qx.uuid(), qx.uuid()
        assert(deposit(m, a, { 1, 2 }))
        assert(deposit(m, b, { 3 }))
        assert(deposit(m, a, { 4 }))
        local before = assert(m.store:read_category(m.type))
        assert(m.store:archive(m.type, a))
        local after = assert(m.store:read_category(m.type))
        assert.same({ 1, 2, 3, 4 }, amounts(after))
        assert.same(support.field(before, "_global_position"), support.field(after, "_global_position"))
        assert.same(amounts(after), amounts(assert(m.store:read_all{ types = { m.Deposited } })))
    end)

    it("a checkpointed read_all that had not passed the archived events reads each of them once", function()
        local m = model()
        local a, b = qx.uuid(), qx.uuid()
        assert(deposit(m, a, { 1, 2 }))
        assert(deposit(m, b, { 3 }))
        assert(deposit(m, a, { 4 }))
        assert(deposit(m, b, { 5 }))
        local first, cp = assert(m.store:read_all{ aggregate_type = m.type, limit = 2 })
        assert.same({ 1, 2 }, amounts(first))
        assert(m.store:archive(m.type, a))             -- 1, 2 read already; 4 not yet
        local rest = assert(m.store:read_all{ aggregate_type = m.type, after = cp })
        assert.same({ 3, 4, 5 }, amounts(rest))
        -- the same with an event-name read, which takes one branch per name
        local f2, cp2 = assert(m.store:read_all{ types = { m.Deposited }, limit = 3 })
        assert.same({ 1, 2, 3 }, amounts(f2))
        assert(m.store:archive(m.type, b))
        local r2 = assert(m.store:read_all{ types = { m.Deposited }, after = cp2 })
        assert.same({ 4, 5 }, amounts(r2))
    end)

    it("a projection lagging behind an archived stream applies its events once; rebuild applies all", function()
        local m = model()
        local a, b = qx.uuid(), qx.uuid()
        local seen = {}
        local p = qx.projection{ name = support.unique("arproj"), db = db, on_progress = false,
            handlers = { [m.Deposited] = function(ev) seen[#seen + 1] = ev.amount end },
            reset = function() seen = {} end }
        assert(deposit(m, a, { 1, 2 }))
        assert.equal(2, assert(p:catch_up()))
        assert(deposit(m, a, { 3, 4 }))
        assert(deposit(m, b, { 5 }))
        assert(m.store:archive(m.type, a))            -- the projection has not read 3 and 4
        assert.equal(3, assert(p:catch_up()))
        assert.same({ 1, 2, 3, 4, 5 }, seen)
        assert.equal(0, assert(p:catch_up()))
        assert.equal(5, assert(p:rebuild()))
        assert.same({ 1, 2, 3, 4, 5 }, seen)
    end)

    it("es:archive archives in the unit of work: with the events appended in it, and only if it commits", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1 }))
        -- rolled back: nothing archived
        local ok, err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = assert(es:load(m.Account, id))
            assert(es:archive(acc))
            error({ code = "changed_my_mind", message = "no" })
        end)
        assert.is_nil(ok)
        assert.equal("changed_my_mind", err.code)
        assert.equal(1, hot(m, id))
        assert.equal(0, marked(m, id))
        -- an append queued before the archive is archived with the stream
        local info = assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = assert(es:load(m.Account, id))
            acc:record(m.Deposited{ amount = 2 })
            assert(es:append(acc))
            return assert(es:archive(acc))
        end))
        assert.same({ 2, 2 }, { info.events, info.last_sequence })
        assert.equal(0, hot(m, id))
        assert.equal(2, archived_rows(m, id))
        -- by class (or type name) and id
        local other = qx.uuid()
        assert(deposit(m, other, { 1 }))
        info = assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):archive(m.Account, other))
        end))
        assert.same({ 1, 1 }, { info.events, info.last_sequence })
        assert.equal(0, hot(m, other))
    end)

    it("es:archive of an instance behind the stream is a conflict, and one with unappended events invalid", function()
        local m = model()
        local id = qx.uuid()
        local stale = assert(deposit(m, id, { 1 }))
        assert(deposit(m, id, { 2 }))
        local ok, err = db:unit_of_work(function(uow)
            return uow:store(m.store):archive(stale)
        end)
        assert.is_nil(ok)
        assert.equal("conflict", err.code)
        assert.matches("at version 2, not 1", err.message)
        ok, err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = assert(es:load(m.Account, id))
            acc:record(m.Deposited{ amount = 3 })
            return es:archive(acc)
        end)
        assert.is_nil(ok)
        assert.equal("invalid", err.code)
        assert.matches("not appended", err.message)
        assert.equal(2, hot(m, id))
        assert.equal(0, marked(m, id))
    end)

    it("archiving a stream that does not exist is not_found, with nothing written", function()
        local m = model()
        local id = qx.uuid()
        local info, err = m.store:archive(m.type, id)
        assert.is_nil(info)
        assert.equal("not_found", err.code)
        assert.matches("no such stream", err.message)
        assert.equal(0, marked(m, id))
        -- and the id stays free: a new stream under it starts normally
        assert(deposit(m, id, { 1 }))
        assert.equal(1, hot(m, id))
    end)

    it("archiving twice is a conflict with err.archived; the first archive stays as it was", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1, 2 }))
        local first = assert(m.store:archive(m.type, id))
        local info, err = m.store:archive(m.type, id)
        assert.is_nil(info)
        assert.same({ "conflict", true }, { err.code, err.archived })
        assert.matches("archived already", err.message)
        local row = assert(db:query("SELECT events, last_sequence, to_char(archived_at AT TIME ZONE "
            .. "'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS at FROM qx_archived_streams "
            .. "WHERE aggregate_type = $1 AND aggregate_id = $2", m.type, id))[1]
        assert.same({ 2, 2, first.archived_at }, { row.events, row.last_sequence, row.at })
        assert.equal(2, archived_rows(m, id))
    end)

    it("bad arguments raise and bad ids are invalid, with nothing archived", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1 }))
        local store = m.store
        assert.has_error(function() store:archive(42, id) end,
            "store:archive: expected an aggregate type (a name or a class), got number")
        assert.has_error(function() store:archive(m.type, 42) end,
            "store:archive: id must be a string, got number")
        assert.has_error(function() store:archive(m.type, id, { tenant = "x" }) end,
            "store:archive: unknown option 'tenant' (known: tenant_id)")
        assert.has_error(function() store:archive(m.type, id, { tenant_id = 5 }) end,
            "store:archive: tenant_id must be a string")
        assert.has_error(function() store.archive(m.type, id) end)
        local info, err = store:archive(m.type, "not-a-uuid")
        assert.is_nil(info)
        assert.equal("invalid", err.code)
        local r = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            assert.has_error(function() es:archive(nil) end)
            assert.has_error(function() es:archive(m.type) end,
                "es:archive: id must be a string, got nil")
            assert.has_error(function() es:archive(m.Account.new(id), id) end,
                "es:archive: give an instance, or a type and an id, not both")
            assert.has_error(function() es:load(m.Account, id, { archived = "yes" }) end,
                "es:load: archived must be a boolean")
            assert.has_error(function() es:read_stream(m.type, id, { archived = 1 }) end,
                "es:read_stream: archived must be a boolean")
            local i2, e2 = es:archive(m.type, "nope")
            return { i2 or false, e2 and e2.code }
        end)
        assert.same({ false, "invalid" }, r)
        assert.equal(1, hot(m, id))
        assert.equal(0, marked(m, id))
    end)

    it("a tenant's unit of work cannot archive, or learn of, another tenant's stream", function()
        local m = model()
        local id = qx.uuid()
        local t1, t2 = qx.uuid(), qx.uuid()
        assert(deposit(m, id, { 1 }, { tenant_id = t1 }))
        local ok, err = db:unit_of_work(function(uow)
            return uow:store(m.store):archive(m.type, id)
        end, { context = { tenant_id = t2 } })
        assert.is_nil(ok)
        assert.equal("not_found", err.code)
        assert.equal(0, marked(m, id))
        assert.is_nil(m.store:archive(m.type, id, { tenant_id = t2 }))
        assert(m.store:archive(m.type, id, { tenant_id = t1 }))
        -- archived by t1: t2 still sees no such stream (not "archived already")
        local _, e2 = m.store:archive(m.type, id, { tenant_id = t2 })
        assert.equal("not_found", e2.code)
        local got, e3 = db:unit_of_work(function(uow)
            local a, e = uow:store(m.store):load(m.Account, id)
            return a or false, e or false
        end, { context = { tenant_id = t2 } })
        assert.same({ false, false }, { got, e3 })
    end)

    it("archive runs only in READ COMMITTED: in another isolation it is invalid, nothing moved", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1 }))
        local ok, err = db:unit_of_work(function(uow)
            assert(uow:exec("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            return uow:store(m.store):archive(m.type, id)
        end)
        assert.is_nil(ok)
        assert.equal("invalid", err.code)
        assert.matches("READ COMMITTED, not repeatable read", err.message)
        assert.equal(1, hot(m, id))
        assert.equal(0, marked(m, id))
    end)

    it("a column of the hot table the archive lacks stops the archive, named; added, its values move", function()
        local sdb, schema = support.schema_db("qx_arcol")
        local ok, problem = pcall(function()
            local m = model()
            local store = qx.event_store{ db = sdb }
            local id = qx.uuid()
            assert(sdb:exec("ALTER TABLE qx_aggregate_events ADD COLUMN trace_note text"))
            assert(sdb:unit_of_work(function(uow)
                local acc = m.Account.new(id)
                acc:record(m.Deposited{ amount = 1 })
                return uow:store(store):append(acc)
            end))
            assert(sdb:exec("UPDATE qx_aggregate_events SET trace_note = 'kept'"))
            local info, err = store:archive(m.type, id)
            assert.is_nil(info)
            assert.equal("invalid", err.code)
            assert.matches("lacks column%(s%) trace_note", err.message)
            assert.equal(1, assert(sdb:query("SELECT count(*) AS n FROM qx_aggregate_events"))[1].n)
            assert(sdb:exec("ALTER TABLE qx_aggregate_events_archive ADD COLUMN trace_note text"))
            assert(store:archive(m.type, id))
            local rows = assert(sdb:query("SELECT trace_note FROM qx_aggregate_events_archive"))
            assert.same({ { trace_note = "kept" } }, rows)
        end)
        support.drop_schema(schema, sdb)
        sdb:close()
        assert(ok, problem)
    end)

    it("the outbox does not care: integration events recorded before the archive stay in it", function()
        local m = model()
        local Opened = qx.integration_event(support.unique("ar.opened"))
        local id = qx.uuid()
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = m.Account.new(id)
            acc:record(m.Deposited{ amount = 1 })
            acc:record(Opened{ account = id })
            assert(es:append(acc))
            return true
        end))
        assert(m.store:archive(m.type, id))
        assert.equal(1, count("SELECT count(*) AS n FROM qx_outbox_events WHERE event_name = $1",
                              Opened.event_name))
    end)
end)

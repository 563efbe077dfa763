-- Event evolution against a real PostgreSQL: events stored by an older deploy (older versions,
-- old names) read as today's classes by load, every read, projections; store:check();
-- snapshots of another snapshot_version and store:rebuild_snapshots. Every test has its own
-- aggregate type and event names, so specs can share a database.
local support = require "support"
local qx = require "qx"

describe("event store: evolution", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- yesterday's deploy: Deposited v1 { amount } under `name`, an Account of type `agg_type`
    local function old_deploy(name, agg_type, opts)
        opts = opts or {}
        local m = {}
        m.Deposited = qx.event(name, { version = opts.version or 1 })
        m.Account = qx.event_sourced(agg_type, { snapshot_version = opts.snapshot_version })
        m.Account:on(m.Deposited, function(self, ev)
            self.balance = (self.balance or 0) + (ev.amount or ev.amount_cents / 100)
        end)
        m.store = qx.event_store{ db = db, snapshot_every = opts.snapshot_every or 0 }
        return m
    end

    -- today's deploy: Deposited v3 { amount_cents, currency } (and maybe a new name)
    local function new_deploy(name, agg_type, opts)
        opts = opts or {}
        local m = {}
        m.Deposited = qx.event(opts.new_name or name,
                               { version = 3, aliases = opts.new_name and { name } or nil })
        m.Deposited:upcast(1, opts.step1 or function(p)
            p.amount_cents = p.amount * 100; p.amount = nil; return p
        end)
        m.Deposited:upcast(2, function(p) p.currency = p.currency or "EUR"; return p end)
        m.Account = qx.event_sourced(agg_type, { snapshot_version = opts.snapshot_version })
        m.Account:on(m.Deposited, function(self, ev)
            assert(ev.event_version == 3 and ev.amount == nil, "handler saw an old payload")
            self.cents = (self.cents or 0) + ev.amount_cents
            self.currencies = (self.currencies or "") .. ev.currency
        end)
        function m.Account:deposit(cents) self:record(m.Deposited{ amount_cents = cents, currency = "USD" }) end
        m.registry = qx.registry{ m.Deposited }
        m.store = qx.event_store{ db = db, registry = m.registry,
                                  snapshot_every = opts.snapshot_every or 0 }
        return m
    end

    local function append_old(m, id, amounts)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            for _, a in ipairs(amounts) do acc:record(m.Deposited{ amount = a }) end
            assert(es:append(acc))
            return acc
        end)
    end

    local function load(m, id, opts)
        return db:unit_of_work(function(uow)
            local acc, e = uow:store(m.store):load(m.Account, id, opts)
            if e then error(e, 0) end
            return acc
        end)
    end

    local function fixture(opts)
        local name, agg_type = support.unique("evo.deposited"), support.unique("EvoAcct")
        local old = old_deploy(name, agg_type, opts)
        local id = qx.uuid()
        assert(append_old(old, id, { 1, 2 }))
        return name, agg_type, id, old
    end

    it("load applies every step to events of older versions before the handlers see them", function()
        local name, agg_type, id = fixture()
        local m = new_deploy(name, agg_type)
        local acc = assert(load(m, id))
        assert.equal(300, acc.cents)
        assert.equal("EUREUR", acc.currencies)
        assert.equal(2, acc.version)
        -- new events are stored at the class's version, next to the old ones
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local a = assert(es:load(m.Account, id))
            a:deposit(5)
            return es:append(a)
        end))
        local rows = assert(db:query([[SELECT (payload->>'event_version')::int AS v FROM qx_aggregate_events
WHERE aggregate_type = $1 ORDER BY sequence]], agg_type))
        assert.same({ 1, 1, 3 }, { rows[1].v, rows[2].v, rows[3].v })
        assert.equal(305, assert(load(m, id)).cents)
    end)

    it("read_stream, read_all, each and read_category hand out upcast records", function()
        local name, agg_type, id = fixture()
        local m = new_deploy(name, agg_type)
        local function check(recs)
            assert.equal(2, #recs)
            for i, r in ipairs(recs) do
                assert.equal(3, r.event_version)
                assert.equal(i * 100, r.amount_cents)
                assert.equal("EUR", r.currency)
                assert.is_nil(r.amount)
                assert.equal(id, r.aggregate_id)
                assert.equal(i, r._sequence)
            end
        end
        check(assert(m.store:read_stream(agg_type, id)))
        check(assert(m.store:read_all{ aggregate_type = agg_type }))
        check(assert(m.store:read_category(agg_type)))
        local recs = {}
        for r in m.store:each{ aggregate_type = agg_type, batch = 1 } do recs[#recs + 1] = r end
        check(recs)
        check(assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):read_stream(agg_type, id))
        end)))
        check(assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):read_all{ aggregate_type = agg_type })
        end)))
        -- a store without a registry hands out what is stored
        local plain = qx.event_store{ db = db }
        assert.equal(1, assert(plain:read_stream(agg_type, id))[1].amount)
    end)

    it("a step that hands back a table of its own (even one it keeps) gives each record its own", function()
        local name, agg_type, id = fixture()
        local KEPT = { amount_cents = 1, currency = "XXX" }
        local m = new_deploy(name, agg_type, { step1 = function() return KEPT end })
        local recs = assert(m.store:read_stream(agg_type, id))
        assert.equal(2, #recs)
        assert.are_not.equal(recs[1], recs[2])
        assert.same({ 1, 2 }, { recs[1]._sequence, recs[2]._sequence })
        assert.equal("XXX", recs[2].currency)
        assert.same({ amount_cents = 1, currency = "XXX" }, KEPT) -- no metadata put into it
        assert.equal(2, assert(load(m, id)).cents)
    end)

    it("a projection keyed by the class gets upcast records", function()
        local name, agg_type = fixture()
        local m = new_deploy(name, agg_type)
        local seen = {}
        local p = qx.projection{ name = support.unique("evo_proj"), db = db, aggregate_type = agg_type,
            on_progress = false,
            handlers = { [m.Deposited] = function(ev) seen[#seen + 1] = ev.amount_cents .. ev.currency end } }
        assert.equal(2, assert(p:catch_up()))
        assert.same({ "100EUR", "200EUR" }, seen)
    end)

    describe("renamed events (aliases)", function()
        it("are read under the new name, upcast from the old versions; new ones stored under it", function()
            local name, agg_type, id = fixture()
            local new_name = support.unique("evo.renamed")
            local m = new_deploy(name, agg_type, { new_name = new_name })
            local acc = assert(load(m, id))
            assert.equal(300, acc.cents)
            assert(db:unit_of_work(function(uow)
                local es = uow:store(m.store)
                local a = assert(es:load(m.Account, id))
                a:deposit(7)
                return es:append(a)
            end))
            local rows = assert(db:query([[SELECT event_name FROM qx_aggregate_events
WHERE aggregate_type = $1 ORDER BY sequence]], agg_type))
            assert.same({ name, name, new_name }, { rows[1].event_name, rows[2].event_name, rows[3].event_name })
            assert.equal(307, assert(load(m, id)).cents)

            -- reads: the class as a type filter takes in the old name; records carry the new name
            local recs = assert(m.store:read_all{ types = m.Deposited })
            assert.equal(3, #recs)
            for _, r in ipairs(recs) do
                assert.equal(new_name, r.event_name)
                assert.equal(3, r.event_version)
            end
            assert.same({ 100, 200, 7 }, { recs[1].amount_cents, recs[2].amount_cents, recs[3].amount_cents })

            local seen = {}
            local p = qx.projection{ name = support.unique("evo_alias"), db = db, on_progress = false,
                handlers = { [m.Deposited] = function(ev) seen[#seen + 1] = ev.event_name .. ev.amount_cents end } }
            assert.equal(3, assert(p:catch_up()))
            assert.same({ new_name .. "100", new_name .. "200", new_name .. "7" }, seen)
        end)
    end)

    describe("stored data the classes cannot read", function()
        it("a version above the class's (a newer deploy) is refused by load and reads", function()
            local name, agg_type, id = fixture({ version = 4 })
            local m = new_deploy(name, agg_type)
            local acc, e = db:unit_of_work(function(uow) return uow:store(m.store):load(m.Account, id) end)
            assert.is_nil(acc)
            assert.equal("invalid", e.code)
            assert.matches("stored v4 is newer than the class %(v3%)", e.message)
            local recs
            recs, e = m.store:read_all{ aggregate_type = agg_type }
            assert.is_nil(recs)
            assert.matches("newer deploy", e.message)
        end)

        it("a version below the chain's start is invalid, naming the event, version and missing step", function()
            local name, agg_type, id = fixture()
            local m = {}
            m.Deposited = qx.event(name, { version = 3 })
            m.Deposited:upcast(2, function(p) return p end)
            m.Account = qx.event_sourced(agg_type)
            m.Account:on(m.Deposited, function() end)
            m.store = qx.event_store{ db = db, registry = qx.registry{ m.Deposited } }
            local acc, e = db:unit_of_work(function(uow) return uow:store(m.store):load(m.Account, id) end)
            assert.is_nil(acc)
            assert.equal("invalid", e.code)
            assert.matches(name:gsub("[%.%-]", "%%%0") .. " v1", e.message)
            assert.matches("no upcaster v1 %-> v2", e.message)
            local recs
            recs, e = m.store:read_stream(agg_type, id)
            assert.is_nil(recs)
            assert.matches("no upcaster v1 %-> v2", e.message)
        end)

        it("a bad upcaster fails the load and the read with its step and event id, nothing half-applied", function()
            local name, agg_type, id = fixture()
            local calls = 0
            local m = new_deploy(name, agg_type, { step1 = function(p)
                calls = calls + 1
                if calls == 2 then return nil end -- the second event: nothing back
                p.amount_cents = p.amount * 100; p.amount = nil; return p
            end })
            local acc, e = db:unit_of_work(function(uow) return uow:store(m.store):load(m.Account, id) end)
            assert.is_nil(acc)
            assert.equal("invalid", e.code)
            assert.equal(1, e.step)
            assert.matches("v1 %-> v2 returned nothing", e.message)
            local rows = assert(db:query(
                "SELECT id::text AS id FROM qx_aggregate_events WHERE aggregate_type = $1 ORDER BY sequence", agg_type))
            assert.equal(rows[2].id, e.event_id)
            assert.matches(rows[2].id, e.message, 1, true)
            calls = 0
            local recs
            recs, e = m.store:read_all{ aggregate_type = agg_type }
            assert.is_nil(recs)
            assert.equal(rows[2].id, e.event_id)
            -- a projection stops before the batch: its checkpoint stays where it was
            calls = 0
            local p = qx.projection{ name = support.unique("evo_bad"), db = db, aggregate_type = agg_type,
                on_progress = false, handlers = { [m.Deposited] = function() end } }
            local n
            n, e = p:catch_up()
            assert.is_nil(n)
            assert.equal("invalid", e.code)
            assert.equal(0, assert(p:status()).events_applied)
        end)

        it("a gap in the chain of an event an aggregate handles is refused when a store is made", function()
            local E = qx.event(support.unique("evo.gap"), { version = 4 })
            E:upcast(1, function(p) return p end)
            E:upcast(3, function(p) return p end)
            local A = qx.event_sourced(support.unique("EvoGap"))
            A:on(E, function() end)
            local ok, e = pcall(qx.event_store, { db = db })
            assert.is_false(ok)
            assert.matches("qx.event_store: .*no upcaster v2 %-> v3", e)
            E:upcast(2, function(p) return p end) -- the chain complete: other specs make stores
            assert.truthy(qx.event_store{ db = db })
        end)

        it("a gap made after the store is refused by the first load of an aggregate handling it", function()
            local name, agg_type, id = fixture()
            local store = qx.event_store{ db = db }
            local E = qx.event(name, { version = 3 })
            E:upcast(1, function(p) return p end)
            local A = qx.event_sourced(agg_type)
            A:on(E, function() end)
            local ok, r, e = pcall(db.unit_of_work, db, function(uow) return uow:store(store):load(A, id) end)
            E:upcast(2, function(p) return p end) -- first: other specs make stores
            assert.is_true(not ok or r == nil)
            assert.matches("es:load: .*no upcaster v2 %-> v3", tostring(ok and e or r))
            assert.truthy(assert(db:unit_of_work(function(uow) return uow:store(store):load(A, id) end)))
        end)
    end)

    describe("store:check()", function()
        it("lists every stored name and version the registry cannot read, and names it does not know apart", function()
            local name, agg_type = fixture()
            local newer_name = support.unique("evo.newer")
            local newer = old_deploy(newer_name, agg_type, { version = 5 })
            assert(append_old(newer, qx.uuid(), { 1 }))
            local m = new_deploy(name, agg_type)
            local Newer = qx.event(newer_name, { version = 2 })
            local report = assert(qx.event_store{ db = db, registry = qx.registry{ m.Deposited, Newer } }:check())
            assert.is_false(report.ok)
            assert.equal(1, #report.unreadable)
            local u = report.unreadable[1]
            assert.equal(newer_name, u.event_name)
            assert.equal(5, u.event_version)
            assert.equal(1, u.count)
            assert.matches("newer deploy", u.reason)

            local Gapped = qx.event(name, { version = 3 })
            Gapped:upcast(2, function(p) return p end)
            report = assert(qx.event_store{ db = db, registry = qx.registry{ Gapped } }:check())
            assert.is_false(report.ok)
            assert.equal(name, report.unreadable[1].event_name)
            assert.equal(1, report.unreadable[1].event_version)
            assert.equal(2, report.unreadable[1].count)
            assert.matches("no upcaster v1 %-> v2", report.unreadable[1].reason)

            report = assert(m.store:check())
            assert.is_true(report.ok)
            assert.same({}, report.unreadable)
            local unknown = {}
            for _, x in ipairs(report.unknown) do unknown[x.event_name] = x.count end
            assert.equal(1, unknown[newer_name])
            assert.is_nil(unknown[name])
        end)

        it("needs a registry", function()
            assert.has_error(function() qx.event_store{ db = db }:check() end)
            assert.has_error(function() qx.event_store{ db = db, registry = {} } end)
        end)
    end)

    describe("snapshots", function()
        it("of another snapshot_version are ignored: the aggregate is rebuilt from its events", function()
            local name, agg_type, id = fixture({ snapshot_every = 2, snapshot_version = 1 })
            local snap = assert(db:query(
                "SELECT state_version FROM qx_aggregate_snapshots WHERE aggregate_type = $1", agg_type))
            assert.equal(1, snap[1].state_version)
            local m = new_deploy(name, agg_type, { snapshot_version = 2 })
            local acc = assert(load(m, id))
            assert.equal(300, acc.cents)
            assert.is_nil(acc.balance) -- the old state was not restored
        end)

        it("rebuild_snapshots rewrites those of another snapshot_version in batches, reporting progress", function()
            local name, agg_type = support.unique("evo.deposited"), support.unique("EvoSnap")
            local old = old_deploy(name, agg_type, { snapshot_every = 2, snapshot_version = 1 })
            local ids = {}
            for i = 1, 5 do
                ids[i] = qx.uuid()
                assert(append_old(old, ids[i], { i, 1 }))
            end
            local fresh = qx.uuid() -- one with no snapshot: left alone
            assert(append_old(old, fresh, { 1 }))
            local m = new_deploy(name, agg_type, { snapshot_version = 2, snapshot_every = 2 })
            function m.Account:snapshot() return { cents = self.cents, currencies = self.currencies } end
            local progress = {}
            local res = assert(m.store:rebuild_snapshots(m.Account, { batch = 2,
                on_progress = function(info) progress[#progress + 1] = info end }))
            assert.same({ rebuilt = 5, total = 5 }, res)
            assert.equal(3, #progress)
            assert.same({ 2, 4, 5 }, { progress[1].done, progress[2].done, progress[3].done })
            assert.equal(5, progress[1].total)
            assert.equal(agg_type, progress[1].aggregate_type)
            local rows = assert(db:query([[SELECT aggregate_id, state, version, state_version
FROM qx_aggregate_snapshots WHERE aggregate_type = $1]], agg_type))
            assert.equal(5, #rows)
            local by_id = {}
            for _, r in ipairs(rows) do by_id[r.aggregate_id] = r end
            for i = 1, 5 do
                local r = by_id[ids[i]]
                assert.equal(2, r.state_version)
                assert.equal(2, r.version)
                assert.same({ cents = (i + 1) * 100, currencies = "EUREUR" }, r.state)
            end
            -- the rebuilt snapshot is used: load restores it and reads no event
            local acc = assert(load(m, ids[3]))
            assert.equal(400, acc.cents)
            -- nothing left to rebuild; all = true rewrites every one
            assert.same({ rebuilt = 0, total = 0 }, assert(m.store:rebuild_snapshots(m.Account)))
            assert.same({ rebuilt = 5, total = 5 }, assert(m.store:rebuild_snapshots(m.Account, { all = true })))
        end)

        it("rebuild_snapshots stops at an aggregate it cannot load, naming it, and keeps the batches before", function()
            local name, agg_type = support.unique("evo.deposited"), support.unique("EvoSnapBad")
            local old = old_deploy(name, agg_type, { snapshot_every = 1, snapshot_version = 1 })
            local ids = {}
            for i = 1, 3 do ids[i] = qx.uuid() end
            table.sort(ids)
            for i = 1, 3 do assert(append_old(old, ids[i], { i })) end
            local m = new_deploy(name, agg_type, { snapshot_version = 2, step1 = function(p)
                if p.amount == 3 then error("cannot read three") end
                p.amount_cents = p.amount * 100; p.amount = nil; return p
            end })
            local res, e = m.store:rebuild_snapshots(m.Account, { batch = 2 })
            assert.is_nil(res)
            assert.equal("invalid", e.code)
            assert.equal(ids[3], e.aggregate_id)
            assert.matches(ids[3], e.message, 1, true)
            assert.matches("cannot read three", e.message)
            local rows = assert(db:query([[SELECT count(*) AS n FROM qx_aggregate_snapshots
WHERE aggregate_type = $1 AND state_version = 2]], agg_type))
            assert.equal(2, rows[1].n)
        end)

        it("rebuild_snapshots refuses what is not an event-sourced class or bad options", function()
            local store = qx.event_store{ db = db }
            local A = qx.event_sourced(support.unique("EvoOpts"))
            assert.has_error(function() store:rebuild_snapshots({}) end)
            assert.has_error(function() store:rebuild_snapshots(A, { batch = 0 }) end)
            assert.has_error(function() store:rebuild_snapshots(A, { all = "yes" }) end)
            assert.has_error(function() store:rebuild_snapshots(A, { on_progress = 1 }) end)
            assert.has_error(function() store:rebuild_snapshots(A, { bacth = 1 }) end)
            assert.has_error(function() qx.event_store{}:rebuild_snapshots(A) end)
        end)
    end)
end)

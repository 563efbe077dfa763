-- The event store against a real PostgreSQL: append, load, snapshots, outbox, conflicts, bad
-- input. Every test uses its own aggregate type and event names, so specs can share a database.
local support = require "support"
local qx = require "qx"
local internal = require "qx.store.internal"

describe("event store: append and load", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- a fresh aggregate class and events, unique to one test
    local function model(opts)
        opts = opts or {}
        local m = {}
        m.type = support.unique("Acct")
        m.Deposited = qx.event(support.unique("es.deposited"))
        m.Withdrawn = qx.event(support.unique("es.withdrawn"))
        m.Opened = qx.integration_event(support.unique("es.opened"))
        local Account = qx.event_sourced(m.type, opts.class)
        Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        Account:on(m.Withdrawn, function(self, ev) self.balance = (self.balance or 0) - ev.amount end)
        function Account:deposit(n) self:record(m.Deposited{ amount = n }) end
        function Account:withdraw(n) self:record(m.Withdrawn{ amount = n }) end
        m.Account = Account
        m.store = qx.event_store{ db = db, snapshot_every = opts.snapshot_every or 0 }
        return m
    end

    -- one unit of work: load (or start) the account, call fn(acc, es, uow), append
    local function command(m, id, fn, uow_opts)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            fn(acc, es, uow)
            assert(es:append(acc))
            return acc
        end, uow_opts)
    end

    local function stream_rows(m, id)
        return assert(db:query([[
SELECT sequence, event_name, event_type, payload, aggregate_id, tenant_id, global_position
FROM qx_aggregate_events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence]],
            m.type, tostring(id)))
    end

    local function snapshot_row(m, id)
        local rows = assert(db:query([[
SELECT version, state FROM qx_aggregate_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2]],
            m.type, tostring(id)))
        return rows[1]
    end

    it("append writes one row per event with sequences from the base version", function()
        local m = model()
        local id = qx.uuid()
        local acc = assert(command(m, id, function(a) a:deposit(10); a:deposit(5); a:withdraw(3) end))
        assert.equal(3, acc.version)
        assert.equal(12, acc.balance)
        acc = assert(command(m, id, function(a) a:deposit(1); a:deposit(2) end))
        assert.equal(5, acc.version)

        local rows = stream_rows(m, id)
        assert.equal(5, #rows)
        for i, r in ipairs(rows) do
            assert.equal(i, r.sequence)
            assert.equal(id, r.aggregate_id)
            assert.equal(r.event_name, r.event_type)
            assert.equal(r.event_name, r.payload.event_name)
            if i > 1 then assert.is_true(r.global_position > rows[i - 1].global_position) end
        end
        assert.equal(m.Withdrawn.event_name, rows[3].event_name)
        assert.equal(3, rows[3].payload.amount)
        assert.equal(1, rows[1].payload.event_version)
        assert.truthy(qx.is_uuid(rows[1].payload.event_id))
        assert.truthy(qx.is_uuid(rows[1].payload.correlation_id)) -- stamped from the unit of work
    end)

    it("append without pending events writes nothing and costs no statement", function()
        local m = model()
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(1) end))
        local sends
        local acc = assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local a = assert(es:load(m.Account, id))
            local before = internal.round_trips(uow)
            assert.is_true(es:append(a))
            assert.equal(0, internal.queued(uow))
            sends = internal.round_trips(uow) - before
            return a
        end))
        assert.equal(0, sends)
        assert.equal(1, acc.version)
        assert.equal(1, #stream_rows(m, id))
    end)

    it("stamps events from the unit of work's context and stores the tenant", function()
        local m = model()
        local id = qx.uuid()
        local tenant, corr = qx.uuid(), qx.uuid()
        assert(command(m, id, function(a) a:deposit(1) end,
            { context = { tenant_id = tenant, correlation_id = corr, user_id = "ada" } }))
        local r = stream_rows(m, id)[1]
        assert.equal(tenant, r.tenant_id)
        assert.equal(corr, r.payload.correlation_id)
        assert.equal("ada", r.payload.actor_id)
    end)

    it("takes a snapshot when the version reaches a multiple of snapshot_every, not below", function()
        local m = model({ snapshot_every = 3 })
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(1); a:deposit(1) end))
        assert.is_nil(snapshot_row(m, id))                   -- version 2: below the threshold
        assert(command(m, id, function(a) a:deposit(1) end))
        local s = snapshot_row(m, id)                        -- version 3: taken
        assert.equal(3, s.version)
        assert.equal(3, s.state.balance)
        assert(command(m, id, function(a) a:deposit(1) end))
        assert.equal(3, snapshot_row(m, id).version)         -- version 4: the old one stays
        assert(command(m, id, function(a) a:deposit(1); a:deposit(1); a:deposit(1) end))
        s = snapshot_row(m, id)                              -- 4 -> 7 crosses 6: taken at 7
        assert.equal(7, s.version)
        assert.equal(7, s.state.balance)
    end)

    it("load returns nil when the stream has no events", function()
        local m = model({ snapshot_every = 2 })
        local got = "unset"
        assert(db:unit_of_work(function(uow)
            got = uow:store(m.store):load(m.Account, qx.uuid())
            return true
        end))
        assert.is_nil(got)
    end)

    local function load(m, id, opts)
        return db:unit_of_work(function(uow)
            local acc, e = uow:store(m.store):load(m.Account, id, opts)
            if e then error(e, 0) end
            return acc or false
        end)
    end

    it("load replays every event when there is no snapshot", function()
        local m = model()
        local id = qx.uuid()
        assert(command(m, id, function(a) for i = 1, 5 do a:deposit(i) end end))
        assert(command(m, id, function(a) a:withdraw(5) end))
        local acc = assert(load(m, id))
        assert.equal(6, acc.version)
        assert.equal(10, acc.balance)
        assert.equal(id, acc.id)
        assert.same({}, acc:pending_events())
    end)

    it("load uses the snapshot and replays only the tail", function()
        local m = model({ snapshot_every = 4 })
        local id = qx.uuid()
        assert(command(m, id, function(a) for _ = 1, 4 do a:deposit(1) end end))
        assert(command(m, id, function(a) a:deposit(100) end))
        -- mark the snapshot: a load that replayed everything would not see the mark
        support.psql(("UPDATE qx_aggregate_snapshots SET state = '{\"balance\": 1000}' "
            .. "WHERE aggregate_type = '%s' AND aggregate_id = '%s'"):format(m.type, id))
        local acc = assert(load(m, id))
        assert.equal(5, acc.version)
        assert.equal(1100, acc.balance)
        -- and without the snapshot, the events alone
        acc = assert(load(m, id, { snapshot = false }))
        assert.equal(5, acc.version)
        assert.equal(104, acc.balance)
    end)

    it("load from a snapshot with no tail restores the state at its version", function()
        local m = model({ snapshot_every = 2 })
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(3); a:deposit(4) end))
        support.psql(("UPDATE qx_aggregate_snapshots SET state = '{\"balance\": 70}' "
            .. "WHERE aggregate_type = '%s' AND aggregate_id = '%s'"):format(m.type, id))
        local acc = assert(load(m, id))
        assert.equal(2, acc.version)
        assert.equal(70, acc.balance)
    end)

    it("ignores snapshots of another snapshot_version", function()
        local m = model({ snapshot_every = 2 })
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(3); a:deposit(4) end))
        support.psql(("UPDATE qx_aggregate_snapshots SET state = '{\"balance\": 70}', "
            .. "state_version = 9 WHERE aggregate_type = '%s' AND aggregate_id = '%s'"):format(m.type, id))
        local acc = assert(load(m, id))
        assert.equal(7, acc.balance)
    end)

    it("a concurrent append of the same version is a conflict and nothing of it is written", function()
        local m = model()
        local id = qx.uuid()
        local side = support.unique("side")
        support.psql("CREATE TABLE " .. side .. " (note text)")
        assert(command(m, id, function(a) a:deposit(1) end))

        local res, err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = assert(es:load(m.Account, id))
            -- another writer appends version 2 first, in its own transaction
            assert(command(m, id, function(a) a:deposit(50) end))
            acc:deposit(7)
            acc:record(m.Opened{ note = "x" })
            assert(uow:queue("INSERT INTO " .. side .. " (note) VALUES ('written?')"))
            assert(es:append(acc))
            return "committed"
        end)
        assert.is_nil(res)
        assert.equal("conflict", err.code)
        local rows = stream_rows(m, id)
        assert.equal(2, #rows)
        assert.equal(50, rows[2].payload.amount)
        assert.equal("0", support.psql("SELECT count(*) FROM " .. side))
        assert.equal("0", support.psql(("SELECT count(*) FROM qx_outbox_events WHERE event_name = '%s'")
            :format(m.Opened.event_name)))
    end)

    it("uow:flush after append reports the conflict at that point", function()
        local m = model()
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(1) end))
        local flushed, ferr
        local res, err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local stale = m.Account.new(id) -- believes the stream is empty
            stale:deposit(1)
            assert(es:append(stale))
            flushed, ferr = uow:flush()
            return true
        end)
        assert.is_nil(flushed)
        assert.equal("conflict", ferr.code)
        assert.is_nil(res)
        assert.equal("conflict", err.code)
    end)

    it("integration events go to the outbox in the same transaction, once, not to the stream", function()
        local m = model()
        local id = qx.uuid()
        local seen = {}
        local d = qx.dispatcher()
        d:on("*", function(ev) seen[#seen + 1] = ev.event_name end)
        assert(command(m, id, function(a, _, uow)
            a:deposit(5)
            a:record(m.Opened{ owner = "ada" })
            uow:track(a) -- tracking as well must not drain the events a second time
        end, { dispatcher = d }))
        local out = assert(db:query([[
SELECT event_name, partition_key, payload FROM qx_outbox_events WHERE event_name = $1]],
            m.Opened.event_name))
        assert.equal(1, #out)
        assert.equal(m.type .. ":" .. id, out[1].partition_key)
        assert.equal("ada", out[1].payload.payload.owner)
        local rows = stream_rows(m, id)
        assert.equal(1, #rows)
        assert.equal(m.Deposited.event_name, rows[1].event_name)
        assert.same({ m.Deposited.event_name, m.Opened.event_name }, seen)
    end)

    it("append_batch stores several aggregates with one insert", function()
        local m = model({ snapshot_every = 2 })
        local a_id, b_id = qx.uuid(), qx.uuid()
        local sends
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local a, b = m.Account.new(a_id), m.Account.new(b_id)
            a:deposit(1); a:deposit(2)
            b:deposit(3)
            local before = internal.queued(uow)
            assert(es:append_batch({ a, b }))
            sends = internal.queued(uow) - before
            assert.equal(2, a.version)
            assert.equal(1, b.version)
            return true
        end))
        assert.equal(2, sends) -- the insert and one snapshot upsert (the wake-up follows COMMIT)
        assert.equal(2, #stream_rows(m, a_id))
        assert.equal(1, #stream_rows(m, b_id))
        assert.equal(2, snapshot_row(m, a_id).version)
        assert.is_nil(snapshot_row(m, b_id))
        assert(db:unit_of_work(function(uow)
            local a = m.Account.new(qx.uuid())
            assert.has_error(function() uow:store(m.store):append_batch({ a, a }) end,
            "es:append_batch: aggregate 2 is in the list twice")
            assert.has_error(function() uow:store(m.store):append_batch(a) end)
            return true
        end))
    end)

    it("refuses an event that JSON cannot hold before anything is queued; the aggregate keeps it", function()
        local m = model()
        local id = qx.uuid()
        local res, err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = m.Account.new(id)
            acc:record(m.Deposited{ amount = 0 / 0 })
            local ok, e = es:append(acc)
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            assert.matches("JSON", e.message)
            assert.equal(1, #acc:pending_events())
            assert.equal(0, acc.version)
            assert.equal(0, internal.queued(uow))
            acc:pull_events()
            acc:record(m.Deposited{ amount = 1, meta = { f = print } })
            ok, e = es:append(acc)
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            return "done"
        end)
        assert.equal("done", res, tostring(err))
        assert.equal(0, #stream_rows(m, id))
    end)

    it("refuses a snapshot that JSON cannot hold", function()
        local m = model({ snapshot_every = 1 })
        local id = qx.uuid()
        local res, err = db:unit_of_work(function(uow)
            local acc = m.Account.new(id)
            acc.callback = print
            acc:deposit(1)
            local ok, e = uow:store(m.store):append(acc)
            return ok, e
        end)
        assert.is_nil(res)
        assert.equal("invalid", err.code)
        assert.equal(0, #stream_rows(m, id))
    end)

    it("loading with the wrong class raises; another type's stream is not found", function()
        local m = model()
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(1) end))
        local Plain = qx.aggregate(support.unique("Plain"))
        local Other = qx.event_sourced(support.unique("Other"))
        local got = "unset"
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            assert.has_error(function() es:load(Plain, id) end)
            assert.has_error(function() es:load({}, id) end)
            assert.has_error(function() es:load(m.Account, { id }) end)
            assert.has_error(function() es:load(m.Account, id, { snapshots = false }) end,
            "es:load: unknown option 'snapshots' (known: snapshot, archived)")
            assert.has_error(function() es:append({}) end)
            got = es:load(Other, id)
            return true
        end))
        assert.is_nil(got)
    end)

    it("a strict class cannot load a stream with events it has no handler for", function()
        local m = model()
        local id = qx.uuid()
        assert(command(m, id, function(a) a:deposit(1) end))
        -- the same type, strict, with no handler for the stored event
        local StrictSame = qx.event_sourced(m.type, { strict = true })
        StrictSame:on(m.Withdrawn, function() end)
        local got, gerr = db:unit_of_work(function(uow)
            local acc, e = uow:store(m.store):load(StrictSame, id)
            if e then error(e, 0) end
            return acc
        end)
        assert.is_nil(got)
        assert.equal("invalid", gerr.code)
        assert.matches("no handler", gerr.message)
    end)

    it("load reports stored data that is not an event as invalid", function()
        local m = model()
        local id = qx.uuid()
        support.psql(([[INSERT INTO qx_aggregate_events
      (id, aggregate_type, aggregate_id, sequence, event_type, event_name, payload)
      VALUES (gen_random_uuid(), '%s', '%s', 1, 'x', '%s', '"not an object"')]])
            :format(m.type, id, m.Deposited.event_name))
        local got, err = db:unit_of_work(function(uow)
            local acc, e = uow:store(m.store):load(m.Account, id)
            if e then error(e, 0) end
            return acc
        end)
        assert.is_nil(got)
        assert.equal("invalid", err.code)
        -- an object whose metadata is of the wrong kind
        local id2 = qx.uuid()
        support.psql(([[INSERT INTO qx_aggregate_events
      (id, aggregate_type, aggregate_id, sequence, event_type, event_name, payload)
      VALUES (gen_random_uuid(), '%s', '%s', 1, 'x', '%s', '{"event_id": 5, "amount": 1}')]])
            :format(m.type, id2, m.Deposited.event_name))
        got, err = db:unit_of_work(function(uow)
            local acc, e = uow:store(m.store):load(m.Account, id2)
            if e then error(e, 0) end
            return acc
        end)
        assert.is_nil(got)
        assert.equal("invalid", err.code)
        assert.matches("event 1: " .. m.Deposited.event_name .. ": event_id must be", err.message, 1, true)
    end)

    it("a tenant cannot load another tenant's stream, nor append to it", function()
        local m = model()
        local id = qx.uuid()
        local t1, t2 = qx.uuid(), qx.uuid()
        assert(command(m, id, function(a) a:deposit(5) end, { context = { tenant_id = t1 } }))
        local got = "unset"
        local res, err = db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            got = es:load(m.Account, id)
            local acc = m.Account.new(id)
            acc:deposit(1)
            assert(es:append(acc))
            return true
        end, { context = { tenant_id = t2 } })
        assert.is_nil(got)
        assert.is_nil(res)
        assert.equal("conflict", err.code)
        local acc = assert(db:unit_of_work(function(uow)
            return uow:store(m.store):load(m.Account, id)
        end, { context = { tenant_id = t1 } }))
        assert.equal(5, acc.balance)
    end)

    it("refuses a sequence that does not follow a stored event", function()
        local m = model()
        local id = qx.uuid()
        local res, err = db:unit_of_work(function(uow)
            local acc = m.Account.new{ id = id, version = 5 }
            acc:deposit(1)
            assert(uow:store(m.store):append(acc))
            return true
        end)
        assert.is_nil(res)
        assert.equal("invalid", err.code)
        assert.matches("does not follow a stored event", err.message)
        assert.equal(0, #stream_rows(m, id))
    end)

    it("refuses, as a conflict, an event whose transaction is older than the previous event's", function()
        -- Without this, a reader ordered by transaction id would see event 2 before event 1.
        local m = model()
        local id = qx.uuid()
        local res, err = db:unit_of_work(function(uow)
            assert(uow:query("SELECT pg_current_xact_id()")) -- this transaction takes its id first
            assert(command(m, id, function(a) a:deposit(1) end)) -- a younger one writes event 1
            local es = uow:store(m.store)
            local acc = assert(es:load(m.Account, id))   -- and this one reads it and writes event 2
            acc:deposit(2)
            assert(es:append(acc))
            return true
        end)
        assert.is_nil(res)
        assert.equal("conflict", err.code)
        assert.equal(1, #stream_rows(m, id))
        -- run again, it succeeds
        local acc = assert(command(m, id, function(a) a:deposit(2) end))
        assert.equal(2, acc.version)
    end)

    it("keeps the order of events within one insert in global positions", function()
        local m = model()
        local id = qx.uuid()
        assert(command(m, id, function(a) for i = 1, 20 do a:deposit(i) end end))
        local rows = stream_rows(m, id)
        for i = 2, #rows do
            assert.is_true(rows[i].global_position > rows[i - 1].global_position)
        end
    end)

    it("wakes qx_events listeners once per unit of work, after its commit; not with notify = false #slow", function()
        local listener = assert(db.pool:acquire())
        assert(listener:listen("qx_events"))
        local function woken_by(pid) return support.notified_by(listener, "qx_events", pid, 400) end
        local ok, err = pcall(function()
            local m = model()
            local pid
            local a, b = qx.uuid(), qx.uuid()
            assert(db:unit_of_work(function(uow)
            pid = uow.conn:pid()
            local es = uow:store(m.store)
            local x, y = m.Account.new(a), m.Account.new(b)
            x:deposit(1); y:deposit(2)
            assert(es:append(x)); assert(es:append(y))
            return true
            end))
            assert.equal(1, woken_by(pid))
            local quiet = qx.event_store{ db = db, notify = false }
            assert(db:unit_of_work(function(uow)
            pid = uow.conn:pid()
            local x = m.Account.new(qx.uuid())
            x:deposit(3)
            assert(uow:store(quiet):append(x))
            return true
            end))
            assert.equal(0, woken_by(pid))
            -- a conflicting append commits nothing and wakes no one
            local ok2 = db:unit_of_work(function(uow)
            pid = uow.conn:pid()
            local stale = m.Account.new(a) -- version 0 again: sequence 1 exists
            stale:deposit(4)
            assert(uow:store(m.store):append(stale))
            return true
            end)
            assert.is_nil(ok2)
            assert.equal(0, woken_by(pid))
        end)
        listener:release()
        assert(ok, err)
    end)

    it("raises on misuse of the store and its options", function()
        assert.has_error(function() qx.event_store{ snapshot_every = -1 } end)
        assert.has_error(function() qx.event_store{ nope = 1 } end,
            "qx.event_store: unknown option 'nope' (known: db, snapshot_every, notify, registry)")
        assert.has_error(function() qx.event_store{ db = {} } end)
        assert.has_error(function() qx.event_store("x") end)
        local m = model()
        assert(db:unit_of_work(function(uow)
            assert.has_error(function() uow:store({}) end)
            assert.has_error(function()
            uow:store(m.store):append(m.Account.new("x"), { aggregate_type = 5 })
            end)
            assert.has_error(function() uow:store(m.store):append(m.Account.new("x"), "opts") end)
            return true
        end))
    end)

    it("appends under an explicit aggregate_type when asked", function()
        local m = model()
        local id = qx.uuid()
        local other = m.type .. "_v2"
        assert(db:unit_of_work(function(uow)
            local acc = m.Account.new(id)
            acc:deposit(1)
            return uow:store(m.store):append(acc, { aggregate_type = other })
        end))
        assert.equal("1", support.psql(("SELECT count(*) FROM qx_aggregate_events "
            .. "WHERE aggregate_type = '%s' AND aggregate_id = '%s'"):format(other, id)))
    end)
end)

-- Global reads of the event store against a real PostgreSQL: order, checkpoints, filters, and
-- the gap-safety of reading below the oldest running transaction.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"

describe("event store: gap-safe reads", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 6 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function model()
        local m = { type = support.unique("Rd") }
        m.Deposited = qx.event(support.unique("rd.deposited"))
        m.Noted = qx.event(support.unique("rd.noted"))
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        m.Account:on(m.Noted, function() end)
        m.store = qx.event_store{ db = db }
        return m
    end

    local function deposit(m, id, amounts, opts)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            for _, n in ipairs(amounts) do acc:record(m.Deposited{ amount = n }) end
            assert(es:append(acc))
            return acc
        end, opts)
    end

    local function amounts(records) return support.field(records, "amount") end

    it("returns events in order with an opaque checkpoint to resume from", function()
        local m = model()
        local a, b = qx.uuid(), qx.uuid()
        assert(deposit(m, a, { 1, 2 }))
        assert(deposit(m, b, { 3 }))
        assert(deposit(m, a, { 4 }))
        local recs, cp = assert(m.store:read_all{ aggregate_type = m.type, limit = 3 })
        assert.same({ 1, 2, 3 }, amounts(recs))
        assert.is_string(cp)
        assert.is_nil(cp:find("[^%w_%-]")) -- base64url
        local rest, cp2 = assert(m.store:read_all{ aggregate_type = m.type, after = cp })
        assert.same({ 4 }, amounts(rest))
        local none, cp3 = assert(m.store:read_all{ aggregate_type = m.type, after = cp2 })
        assert.same({}, none)
        assert.is_string(cp3)
        assert(deposit(m, b, { 5 }))
        local later = assert(m.store:read_all{ aggregate_type = m.type, after = cp3 })
        assert.same({ 5 }, amounts(later))
    end)

    it("hands out records with the event's fields, the stream and the store positions", function()
        local m = model()
        local id = qx.uuid()
        local tenant = qx.uuid()
        assert(deposit(m, id, { 7, 8 }, { context = { tenant_id = tenant } }))
        local recs = assert(m.store:read_all{ aggregate_type = m.type })
        assert.equal(2, #recs)
        local r = recs[2]
        assert.equal(8, r.amount)
        assert.equal(m.Deposited.event_name, r.event_name)
        assert.equal(1, r.event_version)
        assert.truthy(qx.is_uuid(r.event_id))
        assert.is_string(r.occurred_at)
        assert.equal(tenant, r.tenant_id)
        assert.equal(m.type, r.aggregate_type)
        assert.equal(id, r.aggregate_id)
        assert.equal(2, r._sequence)
        assert.is_true(r._global_position > recs[1]._global_position)
        assert.is_string(r._tx_id)
        -- the checkpoint after a record resumes right after it
        local rest = assert(m.store:read_all{ aggregate_type = m.type,
                                              after = require("qx.store.event_store").checkpoint_after(recs[1]) })
        assert.same({ 8 }, amounts(rest))
        -- and the tenant filter
        assert.equal(2, #assert(m.store:read_all{ aggregate_type = m.type, tenant_id = tenant }))
        assert.equal(0, #assert(m.store:read_all{ aggregate_type = m.type, tenant_id = qx.uuid() }))
    end)

    it("filters by event type and by aggregate type (names, classes or lists)", function()
        local m, m2 = model(), model()
        local id = qx.uuid()
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = m.Account.new(id)
            acc:record(m.Deposited{ amount = 1 })
            acc:record(m.Noted{ text = "n" })
            acc:record(m.Deposited{ amount = 2 })
            return es:append(acc)
        end))
        assert(deposit(m2, qx.uuid(), { 9 }))
        local recs = assert(m.store:read_all{ aggregate_type = m.Account, types = { m.Noted } })
        assert.equal(1, #recs)
        assert.equal("n", recs[1].text)
        recs = assert(m.store:read_all{ types = m.Deposited.event_name })
        assert.same({ 1, 2 }, amounts(recs))
        recs = assert(m.store:read_all{ aggregate_type = { m.type, m2.Account } })
        assert.equal(4, #recs)
        recs = assert(m.store:read_category(m2.type))
        assert.same({ 9 }, amounts(recs))
        -- a filtered read that is caught up moves its checkpoint past what it skipped
        local _, cp = assert(m.store:read_all{ aggregate_type = m.type, types = m.Noted })
        local tx = core.b64url_decode(cp):match("^v1%.(%d+)%.")
        assert.truthy(tx)
    end)

    it("reads by many event names or aggregate types alike (one scan with a filter past 64)", function()
        local m = model()
        local id = qx.uuid()
        assert(db:unit_of_work(function(uow)
            local acc = m.Account.new(id)
            acc:record(m.Deposited{ amount = 1 })
            acc:record(m.Noted{ text = "a" })
            acc:record(m.Deposited{ amount = 2 })
            return uow:store(m.store):append(acc)
        end))
        for _, k in ipairs({ 2, 64, 65, 100 }) do
            local names = { m.Deposited.event_name, m.Noted.event_name }
            for i = 3, k do names[i] = support.unique("rd.unused") end
            local recs = assert(m.store:read_all{ types = names, aggregate_type = m.type })
            assert.equal(3, #recs, k .. " names")
            assert.same({ 1, 2 }, { recs[1].amount, recs[3].amount })
            local types = { m.type }
            for i = 2, k do types[i] = support.unique("RdUnused") end
            recs = assert(m.store:read_all{ aggregate_type = types, limit = 2 })
            assert.equal(2, #recs, k .. " types")
            assert.equal(1, recs[1]._sequence)
        end
    end)

    it("reads a stream in sequence order from a given sequence", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, { 1, 2, 3, 4 }))
        local recs = assert(m.store:read_stream(m.type, id, { after_sequence = 1, limit = 2 }))
        assert.same({ 2, 3 }, amounts(recs))
        assert.equal(2, recs[1]._sequence)
        recs = assert(m.store:read_stream(m.Account, id))
        assert.equal(4, #recs)
        assert.same({}, assert(m.store:read_stream(m.type, qx.uuid())))
        local inside = assert(db:unit_of_work(function(uow)
            return uow:store(m.store):read_stream(m.type, id, { after_sequence = 3 })
        end))
        assert.same({ 4 }, amounts(inside))
    end)

    it("iterates batch by batch with each, and resumes from any record's checkpoint", function()
        local m = model()
        for i = 1, 7 do assert(deposit(m, qx.uuid(), { i })) end
        local seen, cps = {}, {}
        for rec, cp in m.store:each{ aggregate_type = m.type, batch = 3 } do
            seen[#seen + 1] = rec.amount
            cps[#cps + 1] = cp
        end
        assert.same({ 1, 2, 3, 4, 5, 6, 7 }, seen)
        local rest = assert(m.store:read_all{ aggregate_type = m.type, after = cps[4] })
        assert.same({ 5, 6, 7 }, amounts(rest))
        assert.same({}, assert(m.store:read_all{ aggregate_type = m.type, after = cps[7] }))
    end)

    it("head is a checkpoint from which only later events are read", function()
        local m = model()
        assert(deposit(m, qx.uuid(), { 1 }))
        local head = assert(m.store:head())
        assert(deposit(m, qx.uuid(), { 2 }))
        assert.same({ 2 }, amounts(assert(m.store:read_all{ aggregate_type = m.type, after = head })))
    end)

    -- Waits (bounded) until stall() names the given backend: another spec's short transaction
    -- may hold the horizon for a moment.
    local function stall_until(store, pid)
        local report
        for _ = 1, 100 do
            report = assert(store:stall())
            for _, h in ipairs(report.holders) do
          if h.pid == pid then return report, h end
            end
            db:query("SELECT pg_sleep(0.02)")
        end
        return report
    end

    it("holds back readers while an earlier transaction is open, instead of skipping it", function()
        local m = model()
        local early, late = qx.uuid(), qx.uuid()
        local naive_seen, held, report, holder, pid
        local store = m.store
        assert(db:unit_of_work(function(uow)
            -- the early transaction takes its position and keeps it
            local es = uow:store(store)
            local acc = m.Account.new(early)
            acc:record(m.Deposited{ amount = 1 })
            assert(es:append(acc))
            assert(uow:flush())
            pid = uow.conn:pid()
            -- a later one takes a higher position and commits first
            assert(deposit(m, late, { 2 }))
            -- a reader that follows positions sees position 2 and moves past position 1 ...
            naive_seen = assert(db:query([[
SELECT aggregate_id FROM qx_aggregate_events WHERE aggregate_type = $1 ORDER BY global_position]],
          m.type))
            -- ... the gap-safe reader returns nothing yet
            held = assert(store:read_all{ aggregate_type = m.type })
            report, holder = stall_until(store, pid)
            return true
        end))
        assert.equal(1, #naive_seen)
        assert.equal(late, naive_seen[1].aggregate_id)
        assert.same({}, held)
        -- stall() named the open transaction, since when, and that an event waits behind it
        assert.truthy(holder, "stall() did not name the open transaction")
        assert.is_true(report.stalled)
        assert.is_true(report.withheld >= 1)
        assert.equal("backend", holder.kind)
        assert.is_string(holder.xact_start)
        assert.is_true(holder.age_seconds >= 0)
        assert.is_string(holder.xid)
        -- once it commits, both come, the early one first
        local recs = assert(store:read_all{ aggregate_type = m.type })
        assert.same({ 1, 2 }, amounts(recs))
    end)

    it("a checkpoint taken while a transaction was open still leads to that transaction's events", function()
        local m = model()
        local cp0 = assert(m.store:head())
        local cp_mid
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = m.Account.new(qx.uuid())
            acc:record(m.Deposited{ amount = 1 })
            assert(es:append(acc))
            assert(uow:flush())
            assert(deposit(m, qx.uuid(), { 2 }))
            local recs
            recs, cp_mid = assert(m.store:read_all{ aggregate_type = m.type, after = cp0 })
            assert.same({}, recs)
            return true
        end))
        assert.same({ 1, 2 }, amounts(assert(m.store:read_all{ aggregate_type = m.type, after = cp_mid })))
    end)

    it("refuses a forged or garbled checkpoint with invalid", function()
        local m = model()
        local enc = core.b64url_encode
        local bad = {
            "garbage!", "", "djEuMS4x=", enc("v2.1.1"), enc("v1.1"), enc("v1.01.1"), enc("v1.1.-1"),
            enc("v1.1.1.1"), enc("v1.18446744073709551616.1"), enc("v1.1.9223372036854775808"),
            enc("v1.a.1"), enc(" v1.1.1"), string.rep("A", 200), 42, {},
        }
        for i, cp in ipairs(bad) do
            local recs, err = m.store:read_all{ aggregate_type = m.type, after = cp }
            assert.is_nil(recs, "item " .. i)
            assert.equal("invalid", err.code, "item " .. i)
        end
        -- a well-formed checkpoint is accepted
        assert.same({}, assert(m.store:read_all{ aggregate_type = m.type, after = enc("v1.0.0") }))
    end)

    it("raises on misuse of the read options", function()
        local m = model()
        assert.has_error(function() m.store:read_all{ limit = 0 } end)
        assert.has_error(function() m.store:read_all{ limit = 1.5 } end)
        assert.has_error(function() m.store:read_all{ nope = 1 } end)
        assert.has_error(function() m.store:read_all{ types = {} } end)
        assert.has_error(function() m.store:read_all{ types = { 5 } } end)
        assert.has_error(function() m.store:read_all("x") end)
        assert.has_error(function() m.store:read_stream(5, "x") end)
        assert.has_error(function() m.store:read_stream(m.type, {}) end)
        assert.has_error(function() m.store:read_stream(m.type, "x", { after_sequence = -1 }) end)
        assert.has_error(function() qx.event_store{}:read_all{} end,
            "store:read_all: this store has no db (qx.event_store{ db = db })")
    end)
end)

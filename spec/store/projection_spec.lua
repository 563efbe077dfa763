-- Projections against a real PostgreSQL: exactly-once batches, checkpoints in the same
-- transaction, rebuild, NOTIFY wake-up, progress.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"

describe("qx.store.projection", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 6 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- an account model with a read model table of its own
    local function model()
        local m = { type = support.unique("Pj"), table = support.unique("balances") }
        m.Deposited = qx.event(support.unique("pj.deposited"))
        m.Withdrawn = qx.event(support.unique("pj.withdrawn"))
        m.Other = qx.event(support.unique("pj.other"))
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        m.Account:on(m.Withdrawn, function(self, ev) self.balance = (self.balance or 0) - ev.amount end)
        m.Account:on(m.Other, function() end)
        m.store = qx.event_store{ db = db }
        support.psql("CREATE TABLE " .. m.table .. " (id text PRIMARY KEY, balance bigint NOT NULL, "
            .. "events int NOT NULL)")
        local upsert = "INSERT INTO " .. m.table .. " (id, balance, events) VALUES ($1, $2, 1) "
            .. "ON CONFLICT (id) DO UPDATE SET balance = " .. m.table .. ".balance + $2, events = "
            .. m.table .. ".events + 1"
        m.handlers = {
            [m.Deposited] = function(ev, uow) assert(uow:queue(upsert, ev.aggregate_id, ev.amount)) end,
            [m.Withdrawn.event_name] = function(ev, uow)
          assert(uow:queue(upsert, ev.aggregate_id, -ev.amount))
            end,
        }
        m.reset = function(uow) assert(uow:exec("TRUNCATE " .. m.table)) end
        return m
    end

    local function projection(m, extra)
        local o = { name = support.unique("proj"), db = db, handlers = m.handlers, reset = m.reset,
                    on_progress = false }
        for k, v in pairs(extra or {}) do o[k] = v end
        return qx.projection(o)
    end

    local function append(m, id, list)
        return assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            for _, ev in ipairs(list) do acc:record(ev) end
            assert(es:append(acc))
            return acc
        end))
    end

    local function balance(m, id)
        local rows = assert(db:query("SELECT balance, events FROM " .. m.table .. " WHERE id = $1", id))
        return rows[1] and rows[1].balance, rows[1] and rows[1].events
    end

    it("catch_up applies every event once and returns when caught up", function()
        local m = model()
        local p = projection(m, { batch_size = 2 })
        local a, b = qx.uuid(), qx.uuid()
        append(m, a, { m.Deposited{ amount = 10 }, m.Withdrawn{ amount = 3 }, m.Other{} })
        append(m, b, { m.Deposited{ amount = 5 } })
        assert.equal(3, assert(p:catch_up())) -- the event without a handler is not read
        assert.same({ 7, 2 }, { balance(m, a) })
        assert.same({ 5, 1 }, { balance(m, b) })
        assert.equal(0, assert(p:catch_up()))     -- nothing applied twice
        append(m, a, { m.Deposited{ amount = 1 } })
        assert.equal(1, assert(p:catch_up()))
        assert.same({ 8, 3 }, { balance(m, a) })
        local st = assert(p:status())
        assert.equal(4, st.events_applied)
        assert.equal(0, st.behind)
        assert.is_string(st.checkpoint)
    end)

    it("catch_up returns a second table, and status() reports the position of the last event applied", function()
        local m = model()
        local p = projection(m)
        local n, info = p:catch_up()
        assert.equal(0, n)
        assert.same({ withheld = false }, info)
        assert.equal(0, assert(p:status()).global_position)
        local a = qx.uuid()
        append(m, a, { m.Deposited{ amount = 1 }, m.Deposited{ amount = 2 } })
        append(m, a, { m.Other{} }) -- no handler: not applied, not the position
        n, info = p:catch_up()
        assert.equal(2, n)
        assert.is_false(info.withheld)
        local last = assert(db:query("SELECT max(global_position) AS g FROM qx_aggregate_events "
            .. "WHERE aggregate_id = $1 AND event_name = $2", a, m.Deposited.event_name))[1].g
        local st = assert(p:status())
        assert.equal(tonumber(last), tonumber(st.global_position)) -- it stayed 0 before
        assert.is_true(tonumber(st.global_position) > 0)
    end)

    it("a failing handler rolls back its whole batch and leaves the checkpoint", function()
        local m = model()
        local a = qx.uuid()
        local fail_on = 2
        local calls = 0
        local handlers = {
            [m.Deposited] = function(ev, uow)
          calls = calls + 1
          assert(uow:queue("INSERT INTO " .. m.table .. " (id, balance, events) VALUES ($1, $2, 1) "
                    .. "ON CONFLICT (id) DO UPDATE SET balance = " .. m.table .. ".balance + $2",
                    ev.aggregate_id, ev.amount))
          if ev.amount == fail_on then error("boom on " .. ev.amount) end
            end,
        }
        local p = projection(m, { handlers = handlers })
        append(m, a, { m.Deposited{ amount = 1 }, m.Deposited{ amount = 2 }, m.Deposited{ amount = 3 } })
        local n, err = p:catch_up()
        assert.is_nil(n)
        assert.equal("error", err.code)
        assert.matches("boom on 2", err.message)
        assert.equal(m.Deposited.event_name, err.event_name)
        assert.truthy(err.global_position)
        assert.is_nil((balance(m, a)))             -- the first event's write was rolled back too
        assert.equal(0, assert(p:status()).events_applied)
        fail_on = nil
        assert.equal(3, assert(p:catch_up()))       -- the same events, once each
        assert.equal(6, (balance(m, a)))
    end)

    it("a handler that returns nil, err fails the batch as well", function()
        local m = model()
        local p = projection(m, { handlers = {
            [m.Deposited] = function() return nil, qx.error.new("invalid", "refused") end,
        } })
        append(m, qx.uuid(), { m.Deposited{ amount = 1 } })
        local n, err = p:catch_up()
        assert.is_nil(n)
        assert.equal("invalid", err.code)
        assert.matches("refused", err.message)
    end)

    it("moves the checkpoint in the same transaction as the handlers' writes", function()
        local m = model()
        local p = projection(m)
        append(m, qx.uuid(), { m.Deposited{ amount = 1 } })
        -- a commit that fails after the handlers ran (a write the database refuses) keeps both
        local bad = qx.projection{ name = p.name, db = db, on_progress = false, handlers = {
            [m.Deposited] = function(_, uow) assert(uow:queue("INSERT INTO " .. m.table
          .. " (id, balance, events) VALUES (NULL, 0, 0)")) end,
        } }
        local n, err = bad:catch_up()
        assert.is_nil(n)
        assert.equal("invalid", err.code)
        assert.equal(0, assert(p:status()).events_applied)
        assert.equal(1, assert(p:catch_up()))
    end)

    it("rebuild resets the read model and the checkpoint, then replays", function()
        local m = model()
        local p = projection(m)
        local a = qx.uuid()
        append(m, a, { m.Deposited{ amount = 4 }, m.Deposited{ amount = 6 } })
        assert.equal(2, assert(p:catch_up()))
        support.psql("UPDATE " .. m.table .. " SET balance = 999")
        assert.equal(2, assert(p:rebuild()))
        assert.same({ 10, 2 }, { balance(m, a) })
        local st = assert(p:status())
        assert.equal(2, st.events_applied)
        assert.is_string(st.rebuilt_at)
    end)

    it("two runners of one projection never apply a batch twice", function()
        local m = model()
        local name = support.unique("shared")
        local p1 = projection(m, { name = name, batch_size = 3 })
        local p2 = projection(m, { name = name, batch_size = 3 })
        local ids = {}
        for i = 1, 5 do
            ids[i] = qx.uuid()
            append(m, ids[i], { m.Deposited{ amount = i }, m.Deposited{ amount = i } })
        end
        local n1 = assert(p1:catch_up())
        local n2 = assert(p2:catch_up())
        assert.equal(10, n1 + n2)
        for i = 1, 5 do assert.same({ 2 * i, 2 }, { balance(m, ids[i]) }) end
    end)

    it("run wakes on NOTIFY when an event is appended, and stops when asked", function()
        local m = model()
        local p = projection(m)
        local a = qx.uuid()
        local rounds, woke_at, appended_at = 0, nil, nil
        local total = assert(p:run{
            poll_ms = 5000, -- far longer than the test takes: only a notification can wake it quickly
            max_seconds = 20,
            stop = function()
          rounds = rounds + 1
          if rounds == 1 then
                -- an append from another connection, committed now
                append(m, a, { m.Deposited{ amount = 3 } })
                appended_at = core.clock()
                return false
          end
          woke_at = core.clock()
          return true
            end,
        })
        assert.equal(1, total)
        assert.equal(3, (balance(m, a)))
        assert.is_true(woke_at - appended_at < 2.5, "woke after " .. (woke_at - appended_at) .. " s")
    end)

    it("stop() from a handler ends run after the batch", function()
        local m = model()
        local p
        p = projection(m, { handlers = {
            [m.Deposited] = function(ev, uow)
            assert(uow:queue("INSERT INTO " .. m.table .. " VALUES ($1, $2, 1)", ev.event_id, ev.amount))
            p:stop()
            end,
        }, batch_size = 1 })
        append(m, qx.uuid(), { m.Deposited{ amount = 1 }, m.Deposited{ amount = 2 } })
        assert.equal(1, assert(p:run{ poll_ms = 10, max_seconds = 10 }))
        assert.equal(1, assert(p:catch_up()))
    end)

    it("run gives its connection back when the stop function raises", function()
        local m = model()
        local p = projection(m)
        local in_use = db:stats().in_use
        local ok, e = pcall(p.run, p, { poll_ms = 10, stop = function() error("stop raised") end })
        assert.is_false(ok)
        assert.matches("stop raised", tostring(e))
        assert.equal(in_use, db:stats().in_use)
    end)

    it("reports progress on long catch-ups", function()
        local m = model()
        local reports = {}
        local p = projection(m, { batch_size = 1, progress_interval_seconds = 0.0001,
                                  on_progress = function(info) reports[#reports + 1] = info end })
        local a = qx.uuid()
        append(m, a, { m.Deposited{ amount = 1 }, m.Deposited{ amount = 1 }, m.Deposited{ amount = 1 },
                       m.Deposited{ amount = 1 } })
        assert.equal(4, assert(p:catch_up()))
        assert.is_true(#reports >= 1)
        local r = reports[1]
        assert.equal(p.name, r.name)
        assert.is_true(r.applied >= 1)
        assert.is_number(r.rate)
        assert.is_number(r.remaining)
        assert.truthy(r.global_position)
    end)

    it("can be limited to aggregate types", function()
        local m, m2 = model(), model()
        local handlers = { [m.Deposited] = m.handlers[m.Deposited] }
        local p = projection(m, { handlers = handlers, aggregate_type = m2.Account })
        local Same = qx.event_sourced(m2.type)
        Same:on(m.Deposited, function() end)
        append(m, qx.uuid(), { m.Deposited{ amount = 1 } })
        local other = qx.uuid()
        assert(db:unit_of_work(function(uow)
            local acc = Same.new(other)
            acc:record(m.Deposited{ amount = 2 })
            return uow:store(m.store):append(acc)
        end))
        assert.equal(1, assert(p:catch_up()))
        assert.equal(2, (balance(m, other)))
    end)

    it("raises on bad definitions", function()
        local m = model()
        local ok_h = { [m.Deposited] = function() end }
        assert.has_error(function() qx.projection{ db = db, handlers = ok_h } end)
        assert.has_error(function() qx.projection{ name = "x", handlers = ok_h } end)
        assert.has_error(function() qx.projection{ name = "x", db = db, handlers = {} } end)
        assert.has_error(function() qx.projection{ name = "x", db = db, handlers = { [1] = print } } end)
        assert.has_error(function()
            qx.projection{ name = "x", db = db, handlers = { [m.Deposited] = "nope" } }
        end)
        assert.has_error(function()
            qx.projection{ name = "x", db = db, handlers = { [m.Deposited] = print,
                                                          [m.Deposited.event_name] = print } }
        end)
        assert.has_error(function() qx.projection{ name = "x", db = db, handlers = ok_h, batch_size = 0 } end)
        assert.has_error(function() qx.projection{ name = "x", db = db, handlers = ok_h, nope = 1 } end)
        assert.has_error(function() qx.projection{ name = string.rep("x", 256), db = db, handlers = ok_h } end)
        local p = qx.projection{ name = "x", db = db, handlers = ok_h }
        assert.has_error(function() p:run{ poll_ms = 0 } end)
        assert.error_matches(function() p:run{ handle_signals = "yes" } end,
                             "handle_signals must be a boolean", 1, true)
        assert.has_error(function() p.catch_up({}) end)
    end)
end)

-- The event store's reads on a fresh deployment's table that the planner has no statistics for
-- (autovacuum has not analysed it yet, or is off for it), holding a 5,000-event backlog. Every
-- statement runs under a statement_timeout of a few seconds: that bound only catches a plan gone
-- quadratic; it is not a speed measurement, which stays in bench/.
local support = require "support"
local qx = require "qx"

describe("event store on a never-analysed table", function()
    local db, schema, m, ids

    setup(function()
        db, schema = support.schema_db("es_unanalysed", { pool_size = 2, statement_timeout_ms = 3000 })
        support.never_analyse(db, "qx_aggregate_events")
        support.never_analyse(db, "qx_aggregate_snapshots")
        m = { type = support.unique("Un") }
        m.Deposited = qx.event(support.unique("un.deposited"))
        m.Noted = qx.event(support.unique("un.noted"))
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        m.Account:on(m.Noted, function(self) self.notes = (self.notes or 0) + 1 end)
        m.store = qx.event_store{ db = db }
        -- 5,000 events over 50 streams, 50 per unit of work, the streams taking turns
        ids = {}
        for i = 1, 50 do ids[i] = qx.uuid() end
        for round = 1, 100 do
            local id = ids[(round - 1) % 50 + 1]
            assert(db:unit_of_work(function(uow)
                local es = uow:store(m.store)
                local acc = es:load(m.Account, id) or m.Account.new(id)
                for i = 1, 50 do
                    acc:record(i % 2 == 0 and m.Noted{} or m.Deposited{ amount = 1 })
                end
                assert(es:append(acc))
            end))
        end
        support.assert_never_analysed(db, "qx_aggregate_events")
    end)

    teardown(function()
        if db then
            support.assert_never_analysed(db, "qx_aggregate_events")
            support.drop_schema(schema, db)
            db:close()
        end
    end)

    -- every record of read(after) in pages of 1,000 until a page comes back empty
    local function drain(read)
        local all, after = {}, nil
        for _ = 1, 10 do
            local recs, cp = read(after)
            assert(recs, cp)
            if #recs == 0 then break end
            for _, r in ipairs(recs) do all[#all + 1] = r end
            after = cp
        end
        return all
    end

    -- 5,000 records, in global order, each stream in sequence order
    local function check(all)
        assert.equal(5000, #all)
        local last = {}
        for i, r in ipairs(all) do
            if i > 1 then assert.is_true(r._global_position > all[i - 1]._global_position) end
            assert.equal((last[r.aggregate_id] or 0) + 1, r._sequence)
            last[r.aggregate_id] = r._sequence
        end
    end

    it("read_all reads a 5,000-event backlog in pages within the statement timeout #slow", function()
        check(drain(function(after) return m.store:read_all{ after = after, limit = 1000 } end))
    end)

    it("read_all by event names reads a 5,000-event backlog within the statement timeout #slow", function()
        check(drain(function(after)
            return m.store:read_all{ after = after, limit = 1000, types = { m.Deposited, m.Noted } }
        end))
    end)

    it("read_all by aggregate type reads a 5,000-event backlog within the statement timeout #slow", function()
        check(drain(function(after)
            return m.store:read_all{ after = after, limit = 1000, aggregate_type = m.Account }
        end))
    end)

    it("loads and reads back a stream of a 5,000-event table within the statement timeout #slow", function()
        local acc = assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):load(m.Account, ids[7]))
        end))
        assert.equal(50, acc.balance)
        assert.equal(50, acc.notes)
        local recs = assert(m.store:read_stream(m.Account, ids[7]))
        assert.equal(100, #recs)
        for i, r in ipairs(recs) do assert.equal(i, r._sequence) end
    end)
end)

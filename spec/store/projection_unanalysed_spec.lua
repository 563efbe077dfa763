-- A projection catching up on a fresh deployment's event table that the planner has no
-- statistics for (autovacuum has not analysed it yet, or is off for it), holding a 5,000-event
-- backlog. Every statement runs under a statement_timeout of a few seconds: that bound only
-- catches a plan gone quadratic; it is not a speed measurement, which stays in bench/.
local support = require "support"
local qx = require "qx"

describe("projection on a never-analysed event table", function()
    local db, schema

    before_each(function()
        db, schema = support.schema_db("pj_unanalysed", { pool_size = 2, statement_timeout_ms = 3000 })
        support.never_analyse(db, "qx_aggregate_events")
        support.never_analyse(db, "qx_projection_checkpoints")
    end)

    after_each(function()
        support.drop_schema(schema, db)
        db:close()
    end)

    it("catches up on a 5,000-event backlog of a never-analysed table within the statement timeout #slow", function()
        local Deposited = qx.event(support.unique("pu.deposited"))
        local Account = qx.event_sourced(support.unique("Pu"))
        Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        local store = qx.event_store{ db = db }
        local ids = {}
        for i = 1, 50 do ids[i] = qx.uuid() end
        for round = 1, 100 do
            local id = ids[(round - 1) % 50 + 1]
            assert(db:unit_of_work(function(uow)
                local es = uow:store(store)
                local acc = es:load(Account, id) or Account.new(id)
                for _ = 1, 50 do acc:record(Deposited{ amount = 1 }) end
                assert(es:append(acc))
            end))
        end
        support.assert_never_analysed(db, "qx_aggregate_events")

        local seen, last = 0, {}
        local p = qx.projection{ name = support.unique("pu"), db = db, on_progress = false,
            handlers = { [Deposited] = function(ev)
                seen = seen + 1
                local id = ev.aggregate_id
                assert.equal((last[id] or 0) + 1, ev._sequence)
                last[id] = ev._sequence
            end } }
        local n, info = p:catch_up()
        assert(n, info)
        assert.equal(5000, n)
        assert.equal(5000, seen)
        assert.is_false(info.withheld)
        support.assert_never_analysed(db, "qx_aggregate_events")
    end)
end)

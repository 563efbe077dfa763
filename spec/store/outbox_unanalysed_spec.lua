-- The outbox's status on a fresh deployment's outbox that the planner has no statistics for
-- (autovacuum has not analysed it yet, or is off for it), holding a 5,000-event backlog over 16
-- partition keys. It runs under a statement_timeout of a few seconds: that bound only catches a
-- plan gone quadratic; it is not a speed measurement, which stays in bench/.
local support = require "support"
local qx = require "qx"

describe("outbox status on a never-analysed outbox", function()
    local db, schema

    before_each(function()
        db, schema = support.schema_db("ob_unanalysed", { pool_size = 2, statement_timeout_ms = 3000 })
        support.never_analyse(db, "qx_outbox_events")
    end)

    after_each(function()
        support.drop_schema(schema, db)
        db:close()
    end)

    it("counts a 5,000-event backlog of a never-analysed outbox within the statement timeout #slow", function()
        local Happened = qx.integration_event(support.unique("ob.happened"), { version = 1 })
        for round = 1, 50 do
            assert(db:unit_of_work(function(uow)
                for i = 1, 100 do
                    local ev = Happened{ n = i }
                    ev.aggregate_type = "spec"
                    ev.aggregate_id = "k" .. ((round * 100 + i) % 16)
                    uow:record(ev)
                end
            end))
        end
        support.assert_never_analysed(db, "qx_outbox_events")
        local s = assert(qx.outbox(db):status())
        assert.equal(5000, s.pending)
        assert.equal(0, s.scheduled)
        assert.equal(0, s.dead)
        assert.equal(0, s.published)
        assert.equal(0, s.max_attempts)
        assert.is_true(s.oldest_pending_age_seconds >= 0)
        support.assert_never_analysed(db, "qx_outbox_events")
    end)
end)

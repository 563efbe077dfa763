-- The relay on a fresh deployment's outbox that the planner has no statistics for (autovacuum
-- has not analysed it yet, or is off for it), with a backlog built while no relay ran (a NATS
-- outage on a new table). Each claim runs under a statement_timeout of a few seconds: that bound
-- only catches a plan gone quadratic in the batch (such a claim takes tens of seconds at this
-- size); it is not a speed measurement, which stays in bench/.
local support = require "support"
local H = require "relay_helper"

describe("outbox relay on a never-analysed outbox", function()
    local ctx, other
    before_each(function()
        ctx = H.setup()
        support.never_analyse(ctx.db, "qx_outbox_events")
    end)
    after_each(function()
        if other then -- a failed spec still holding its row lock would block the schema's drop
            other:query("ROLLBACK")
            other:release()
            other = nil
        end
        H.teardown(ctx)
    end)

    it("drains a 5,000-event backlog over 16 keys from a never-analysed outbox"
       .. " within the statement timeout #slow", function()
        local evs = H.commit_many(ctx, 5000, 16, 100)
        support.assert_never_analysed(ctx.db, "qx_outbox_events")
        local relay = assert(H.relay(ctx, { statement_timeout_ms = 3000 }))
        local total = 0
        for _ = 1, 20 do
            local r, err = relay:run_once()
            assert(r, "a claim failed: " .. tostring(err))
            total = total + r.published
            if r.claimed == 0 then break end
        end
        relay:close()
        assert.equal(5000, total)
        H.check_stream(ctx, evs)
        support.assert_never_analysed(ctx.db, "qx_outbox_events")
    end)

    it("drains a never-analysed outbox's 5,000-event backlog around a row another transaction"
       .. " holds, within the statement timeout #slow", function()
        local evs = H.commit_many(ctx, 5000, 16, 100)
        support.assert_never_analysed(ctx.db, "qx_outbox_events")
        local first_k3 -- the first event of key k3: held by another transaction, it holds k3 back
        for _, ev in ipairs(evs) do
            if ev.aggregate_id == "k3" then first_k3 = ev break end
        end
        local held = 0
        for _, ev in ipairs(evs) do
            if ev.aggregate_id == "k3" then held = held + 1 end
        end
        other = assert(ctx.db:acquire())
        assert(other:query("BEGIN"))
        assert(other:query("SELECT id FROM qx_outbox_events WHERE id = $1 FOR UPDATE",
                           first_k3.event_id))
        local relay = assert(H.relay(ctx, { statement_timeout_ms = 3000 }))
        local function drain()
            local total = 0
            for _ = 1, 20 do
                local r, err = relay:run_once()
                assert(r, "a claim failed: " .. tostring(err))
                total = total + r.published
                if r.published == 0 then break end
            end
            return total
        end
        assert.equal(5000 - held, drain())
        assert(other:query("ROLLBACK"))
        other:release()
        other = nil
        assert.equal(held, drain())
        relay:close()
        H.check_stream(ctx, evs)
        support.assert_never_analysed(ctx.db, "qx_outbox_events")
    end)
end)

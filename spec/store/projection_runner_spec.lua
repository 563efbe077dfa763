-- Projection runners as processes of their own (spec/runners/projection.lua): SIGTERM mid-batch
-- finishes and commits the batch in flight and exits 0; two runners of one projection, one of
-- whose connection is terminated mid-batch, apply every event exactly once between them.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"
local R = require "runner_helper"

local SCRIPT = "spec/runners/projection.lua"

local function wait_until(fn, seconds)
    local deadline = core.clock() + seconds
    while not fn() do
        if core.clock() > deadline then return false end
        core.signals_sleep(50)
    end
    return true
end

describe("projection runner processes #slow", function()
    local db, schema, url
    local Counted = qx.event("spec.counted")
    local Counter = qx.event_sourced("SpecCounter")
    Counter:on(Counted, function() end)

    before_each(function()
        db, schema, url = support.schema_db("pjrun")
        assert(db:exec("CREATE TABLE applied (event_id uuid NOT NULL, runner text NOT NULL)"))
    end)
    after_each(function()
        support.drop_schema(schema, db)
        db:close()
    end)

    local function append(n, per_tx)
        local store = qx.event_store{ db = db }
        local ids = {}
        local done = 0
        while done < n do
            assert(db:unit_of_work(function(uow)
                local es = uow:store(store)
                local c = Counter.new(qx.uuid())
                for _ = 1, math.min(per_tx, n - done) do
                    local ev = Counted{}
                    c:record(ev)
                    ids[#ids + 1] = ev.event_id
                    done = done + 1
                end
                assert(es:append(c))
            end))
        end
        return ids
    end

    local function q1(sql, ...)
        return assert(db:query(sql, ...))[1]
    end

    local function applied() return q1("SELECT count(*) AS n FROM applied").n end

    local function checkpoint()
        local r = q1("SELECT events_applied FROM qx_projection_checkpoints"
                     .. " WHERE projection_name = 'spec_counted'")
        return r and r.events_applied or 0
    end

    -- every event of ids applied exactly once
    local function exactly_once(ids)
        assert.equal(0, q1("SELECT count(*) AS n FROM (SELECT event_id FROM applied"
                           .. " GROUP BY event_id HAVING count(*) > 1) d").n)
        assert.equal(#ids, q1("SELECT count(DISTINCT event_id) AS n FROM applied").n)
        assert.equal(#ids, applied())
        assert.equal(#ids, checkpoint())
    end

    it("SIGTERM mid-batch: the batch in flight commits, exit 0, nothing lost or doubled", function()
        local ids = append(300, 50)
        local batch = 20
        local app = "qx-pjrun-t-" .. core.uuid():sub(-12)
        local child = R.spawn(SCRIPT, { QX_DB__URL = url .. "&application_name=" .. app, RUNNER_ID = "a",
                                        RUNNER_DELAY = 0.01, RUNNER_BATCH = batch })
        assert(wait_until(function() return applied() >= batch end, 30), R.log(child))
        -- the signal lands mid-batch: after one batch committed, while the runner's transaction is
        -- applying events and began less than 100 ms ago (a batch sleeps at least 200 ms)
        assert(wait_until(function()
            return q1([[
SELECT count(*) AS n FROM pg_stat_activity
WHERE application_name = $1 AND xact_start IS NOT NULL
  AND clock_timestamp() - xact_start < interval '100 milliseconds'
  AND (query LIKE '%pg_sleep%' OR query LIKE 'INSERT INTO applied%')]], app).n > 0
        end, 30), R.log(child))
        local before = applied()
        R.signal(child, "TERM")
        local code, log = R.finish(child, 20, wait_until)
        assert.equal(0, code, log)
        local n = tonumber(log:match("stopped: (%d+) applied"))
        assert.truthy(n, log)
        -- the batch in flight was finished and committed, and nothing after it began
        local after = applied()
        assert.is_true(after > before, ("%d before, %d after"):format(before, after))
        assert.is_true(after - before <= 2 * batch, ("%d before, %d after"):format(before, after))
        assert.equal(after, checkpoint())
        assert.is_true(after < #ids)
        -- a second runner applies the rest, none twice
        local again = R.spawn(SCRIPT, { QX_DB__URL = url, RUNNER_ID = "b", RUNNER_BATCH = 100 })
        assert(wait_until(function() return checkpoint() == #ids end, 30), R.log(again))
        R.signal(again, "TERM")
        assert.equal(0, (R.finish(again, 20, wait_until)))
        exactly_once(ids)
    end)

    it("two runners, one's connection terminated mid-batch: no event applied twice, none skipped",
       function()
        local ids = append(400, 40)
        local app_a = "qx-pjrun-a-" .. core.uuid():sub(-12)
        local a = R.spawn(SCRIPT, { QX_DB__URL = url .. "&application_name=" .. app_a,
                                    RUNNER_ID = "a", RUNNER_DELAY = 0.005 })
        local b = R.spawn(SCRIPT, { QX_DB__URL = url, RUNNER_ID = "b", RUNNER_DELAY = 0.005 })
        local admin = assert(qx.connect{ url = support.db_url(), pool_size = 1 })
        -- a's session inside a handler: it holds the checkpoint row and has applied some of
        -- its batch, uncommitted
        local killed = 0
        assert(wait_until(function()
            local rows = assert(admin:query([[
SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity
WHERE application_name = $1 AND query LIKE '%pg_sleep%' AND state = 'active']], app_a))
            if rows[1] and rows[1].done then killed = killed + 1 end
            return killed > 0
        end, 30), R.log(a))
        admin:close()
        assert(wait_until(function() return checkpoint() == #ids end, 60),
               checkpoint() .. " of " .. #ids .. "\n" .. R.log(a) .. R.log(b))
        R.signal(a, "TERM")
        R.signal(b, "TERM")
        local code_a, log_a = R.finish(a, 20, wait_until)
        local code_b, log_b = R.finish(b, 20, wait_until)
        assert.equal(0, code_a, log_a)
        assert.equal(0, code_b, log_b)
        assert.truthy(log_a:find("run failed: connection", 1, true), log_a)
        exactly_once(ids)
    end)
end)

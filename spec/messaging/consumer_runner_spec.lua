-- A consumer runner as a process of its own (spec/runners/consumer.lua): SIGTERM mid-batch
-- handles and answers the batch in flight and exits 0; nothing is lost or handled twice.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"
local publisher = require "qx.messaging.publisher"
local R = require "runner_helper"

local SCRIPT = "spec/runners/consumer.lua"
local Counted = qx.integration_event("spec.runner.counted", { version = 1 })

local function wait_until(fn, seconds)
    local deadline = core.clock() + seconds
    while not fn() do
        if core.clock() > deadline then return false end
        core.signals_sleep(50)
    end
    return true
end

describe("consumer runner process #slow", function()
    local db, schema, url, conn, stream, prefix

    before_each(function()
        db, schema, url = support.schema_db("cnrun")
        assert(db:exec("CREATE TABLE handled (event_id uuid NOT NULL)"))
        conn = assert(qx.nats.connect{ servers = support.nats_url() })
        stream, prefix = support.unique("CNRUN"):upper(), support.unique("cnrun")
        assert(conn:ensure_stream{ name = stream, subjects = { prefix .. ".>" } })
    end)
    after_each(function()
        conn:delete_stream(stream)
        conn:close()
        support.drop_schema(schema, db)
        db:close()
    end)

    local function q1(sql, ...) return assert(db:query(sql, ...))[1] end
    local function handled() return q1("SELECT count(*) AS n FROM handled").n end

    it("SIGTERM mid-batch: the batch in flight is handled and acked, exit 0, nothing lost or doubled",
       function()
        local pub = assert(publisher.new{ nats = conn, subject_prefix = prefix })
        local ids = {}
        for _ = 1, 200 do
            local ev = Counted{}
            assert(pub:publish(ev))
            ids[#ids + 1] = ev.event_id
        end
        local durable = support.unique("d")
        local env = { QX_DB__URL = url, QX_NATS__SERVERS = support.nats_url(),
                      RUNNER_STREAM = stream, RUNNER_DURABLE = durable, RUNNER_DELAY = 0.01,
                      RUNNER_BATCH = 10 }
        local child = R.spawn(SCRIPT, env)
        assert(wait_until(function() return handled() >= 10 end, 30), R.log(child))
        local before = handled()
        R.signal(child, "TERM")
        local code, log = R.finish(child, 20, wait_until)
        assert.equal(0, code, log)
        local after = handled()
        assert.truthy(log:find("stopped: %d+ fetched, " .. after .. " handled"), log)
        assert.is_true(after > before and after - before <= 20,
                       ("%d before, %d after"):format(before, after))
        assert.is_true(after < #ids)
        -- every handled message was acked: none waits for a reply, none comes again
        local c = assert(qx.consumer{ nats = conn, db = db, stream = stream, durable = durable,
                                      registry = qx.registry{ Counted } })
        assert(wait_until(function() return assert(c:info()).num_ack_pending == 0 end, 5))
        c:close()
        -- a second run handles the rest, none twice
        env.RUNNER_DELAY = 0
        local again = R.spawn(SCRIPT, env)
        assert(wait_until(function() return handled() >= #ids end, 30), R.log(again))
        R.signal(again, "TERM")
        local code2, log2 = R.finish(again, 20, wait_until)
        assert.equal(0, code2, log2)
        assert.equal(#ids, handled())
        assert.equal(#ids, q1("SELECT count(DISTINCT event_id) AS n FROM handled").n)
        assert.equal(#ids, q1("SELECT count(*) AS n FROM qx_inbox").n)
    end)
end)

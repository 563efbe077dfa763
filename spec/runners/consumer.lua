-- A consumer runner as a process of its own, for the spec of graceful stop
-- (spec/messaging/consumer_runner_spec.lua). Handles "spec.runner.counted" events from the
-- stream RUNNER_STREAM through the durable RUNNER_DURABLE, writing one row per handling into
-- the table `handled` of the schema its QX_DB__URL names (with the inbox), then sleeping
-- RUNNER_DELAY seconds inside the unit of work. SIGTERM stops it after the batch in flight is
-- handled and answered: exit 0.
local qx = require "qx"

local function log(...)
    io.stderr:write(...)
    io.stderr:write("\n")
    io.stderr:flush()
end

local delay = tonumber(os.getenv("RUNNER_DELAY") or "0")
local Counted = qx.integration_event("spec.runner.counted", { version = 1 })
local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 2 })
local conn = assert(qx.nats.connect{ servers = os.getenv("QX_NATS__SERVERS") })
local c = assert(qx.consumer{ nats = conn, db = db, stream = os.getenv("RUNNER_STREAM"),
                              durable = os.getenv("RUNNER_DURABLE"),
                              registry = qx.registry{ Counted },
                              batch = tonumber(os.getenv("RUNNER_BATCH") or "10") })
log("running")
local totals, e = c:run(function(ev, uow)
    assert(uow:exec("INSERT INTO handled (event_id) VALUES ($1)", ev.event_id))
    if delay > 0 then assert(uow:query("SELECT pg_sleep($1)", delay)) end
end, { handle_signals = true })
if not totals then
    log("run failed: ", tostring(e))
    os.exit(1)
end
c:close()
conn:close()
db:close()
log(("stopped: %d fetched, %d handled"):format(totals.fetched, totals.handled))
os.exit(0)

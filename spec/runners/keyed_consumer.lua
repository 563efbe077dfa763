-- A consumer process for the many-processes spec (spec/cluster/many_processes_spec.lua): one of
-- several on the durable RUNNER_DURABLE of RUNNER_STREAM, with the inbox, handling the relay
-- helper's "thing.happened" events by writing (event_id, key, n, pid) into the table `handled`
-- of the schema its QX_DB__URL names. SIGTERM stops it after the batch in flight.
local qx = require "qx"

local Thing = qx.integration_event("thing.happened", { version = 1 })
local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 2 })
local conn = assert(qx.nats.connect{ servers = os.getenv("QX_NATS__SERVERS"),
                                     reconnect_wait_ms = 200 })
local c = assert(qx.consumer{ nats = conn, db = db, stream = os.getenv("RUNNER_STREAM"),
                              durable = os.getenv("RUNNER_DURABLE"), ack_wait = 2,
                              registry = qx.registry{ Thing }, batch = 20 })
local pid = tonumber(os.getenv("RUNNER_ID"))
io.stderr:write("running\n")
io.stderr:flush()
local totals, e = c:run(function(ev, uow)
    assert(uow:exec("INSERT INTO handled (event_id, k, n, pid) VALUES ($1, $2, $3, $4)",
                    ev.event_id, ev.key, ev.n, pid))
end, { handle_signals = true })
if not totals then
    io.stderr:write("run failed: ", tostring(e), "\n")
    os.exit(1)
end
c:close()
conn:close()
db:close()
os.exit(0)

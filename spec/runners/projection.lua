-- A projection runner as a process of its own, for the specs of graceful stop and fencing
-- (spec/store/projection_runner_spec.lua). Applies "spec.counted" events into the table
-- `applied` of the schema its QX_DB__URL names, one row per application, then sleeps
-- RUNNER_DELAY seconds per event inside the batch's transaction. A run that fails (its
-- connection was terminated) is started again, as a service manager would; SIGTERM stops it
-- after the batch in flight, exit 0.
local qx = require "qx"
local core = require "qx.core"

local me = assert(os.getenv("RUNNER_ID"), "RUNNER_ID")
local delay = tonumber(os.getenv("RUNNER_DELAY") or "0")
local function log(...)
    io.stderr:write(me, ": ", ...)
    io.stderr:write("\n")
    io.stderr:flush()
end

local db = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 2 })
local p = qx.projection{
    name = "spec_counted", db = db, batch_size = tonumber(os.getenv("RUNNER_BATCH") or "20"),
    on_progress = false,
    handlers = {
        ["spec.counted"] = function(ev, uow)
            assert(uow:exec("INSERT INTO applied (event_id, runner) VALUES ($1, $2)",
                            ev.event_id, me))
            if delay > 0 then assert(uow:query("SELECT pg_sleep($1)", delay)) end
        end,
    },
}
log("running")
local total = 0
while true do
    local n, e = p:run{ poll_ms = 100, handle_signals = true }
    if n then
        total = total + n
        break
    end
    log("run failed: ", tostring(e), "; again")
    if core.signals_sleep(200) then break end
end
db:close()
log(("stopped: %d applied"):format(total))
os.exit(0)

-- bank.relay: publishes what the commands committed to the outbox to NATS JetStream. In
-- production this is the `qx relay` process; drain() runs batches here until none is left.
local qx = require "qx"

local M = {}

-- drain(db, conn) -> how many events were published
function M.drain(db, conn)
    local relay = assert(qx.relay{ db = db, nats = conn })
    local published = 0
    repeat
        local r = assert(relay:run_once())
        published = published + r.published
    until r.claimed == 0
    relay:close()
    return published
end

return M

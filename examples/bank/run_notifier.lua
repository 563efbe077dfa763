-- The notifier as a service of its own (examples/systemd/bank-notifier.service): it handles
-- the bank's public events until SIGTERM or SIGINT; the batch in flight is handled and
-- answered first and the process exits 0.
--   cd examples && QX_DB__URL=... QX_NATS__SERVERS=... lua5.4 bank/run_notifier.lua
package.path = "examples/?.lua;?.lua;" .. package.path
local qx = require "qx"
local notifier = require "bank.notifier"

local db = assert(qx.connect())                        -- QX_DB__URL
local conn = assert(qx.nats.connect())                 -- QX_NATS__SERVERS, QX_NATS__STREAM
local consumer = notifier.new(db, conn)
local totals, err = notifier.run(consumer)
consumer:close()
conn:close()
db:close()
if not totals then
    io.stderr:write("bank notifier: ", tostring(err), "\n")
    os.exit(1)
end
io.stderr:write(("bank notifier: stopped, %d handled, %d failed\n")
    :format(totals.handled, totals.failed))
os.exit(0)

-- The balance projection as a service of its own (examples/systemd/bank-balances.service): it
-- catches up, then waits for appends, until SIGTERM or SIGINT; the batch in flight commits
-- first and the process exits 0. Started again after a failure (a lost connection) by its
-- service manager: the checkpoint keeps every batch before it.
--   cd examples && QX_DB__URL=postgresql://... lua5.4 bank/run_balances.lua
package.path = "examples/?.lua;?.lua;" .. package.path
local qx = require "qx"

local db = assert(qx.connect())                        -- QX_DB__URL
local balances = require("bank.balances").new(db)
local n, err = balances:run{ handle_signals = true }
db:close()
if not n then
    io.stderr:write("bank balances: ", tostring(err), "\n")
    os.exit(1)
end
io.stderr:write(("bank balances: stopped, %d events applied\n"):format(n))
os.exit(0)

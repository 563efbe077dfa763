-- Run once from init_by_lua, in the nginx master before it forks the workers: migrate the qx
-- tables and create the shop's table. Blocking is fine there - nothing is served yet - but
-- the connection must be closed before the fork, or every worker would share its socket.
local qx = require "qx"
local model = require "shop.model"

local _M = {}

function _M.run()
    local db = assert(qx.connect{ pool_size = 1 })
    local ok, e = qx.migrate(db)
    if ok then
        ok, e = db:exec(model.SCHEMA)
    end
    db:close()
    if not ok then error("shop setup failed: " .. tostring(e), 0) end
end

return _M

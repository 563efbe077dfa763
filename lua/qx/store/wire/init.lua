--- Internal to qx: PostgreSQL through the core's wire codec, over sockets the caller's event
-- loop owns (nginx cosockets: qx.openresty.connect). conn.lua moves a connection's bytes and
-- gives it core.pool's connection methods; pool.lua keeps them. See docs/openresty.md.
local settings = require "qx.settings"
local db = require "qx.store.db"
local pool = require "qx.store.wire.pool"

local fmt = string.format

local _M = {}

--- A db (as qx.connect's) over wire connections made by sockets (see pool.lua). cfg: the
-- settings (settings.db's table); nothing connects before the first use.
function _M.db(cfg, sockets, dispatcher)
    local timeout = cfg.statement_timeout_ms or 0
    local p, e = pool.new{
        url = cfg.url,
        size = cfg.pool_size,
        acquire_timeout_ms = cfg.acquire_timeout_ms,
        init_sql = timeout > 0 and fmt("SET statement_timeout = %d", timeout) or nil,
        sockets = sockets,
    }
    if not p then return nil, e end
    return db.over(p, cfg, dispatcher)
end

_M.settings = settings.db

return _M

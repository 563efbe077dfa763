-- Internal to qx.projection: the cap on rebuilds running at once on one database. A rebuild
-- holds one of max_rebuilds session advisory locks (pg_try_advisory_lock(key, slot)) on a
-- connection of its own for as long as it runs; a process that dies gives its slot back with
-- its session. Every process should use the same cap (QX_PROJECTION__MAX_REBUILDS).
local core = require "qx.core"
local settings = require "qx.settings"
local qx_error = require "qx.error"

local fmt = string.format
local setmetatable = setmetatable
local os_getenv = os.getenv

local _M = {}

_M.ENV = "QX_PROJECTION__MAX_REBUILDS"
_M.DEFAULT = 2
local MAX = 1000

-- the advisory lock's first key: hashtext('qx_projection_rebuild'), computed by the server
local TRY = [[
SELECT pg_try_advisory_lock(hashtext('qx_projection_rebuild'), $1::int) AS got]]
local UNLOCK = [[
SELECT pg_advisory_unlock(hashtext('qx_projection_rebuild'), $1::int) AS done]]


-- The cap from the option max_rebuilds, else the variable, else 2 -> n | nil, message.
function _M.cap(opts, getenv)
    local src = settings.pick(opts, getenv or os_getenv, "max_rebuilds", _M.ENV)
    if src == nil then
        return _M.DEFAULT
    end
    local n, e = settings.ranged(src, "int", 1, MAX, 1)
    if not n then
        return nil, "qx.projection: " .. e.message
    end
    return n
end


local Slot = {}
Slot.__index = Slot

-- Gives the slot back (also when the connection broke: its session, and the lock, are gone).
function Slot:release()
    if self.conn then
        self.conn:query(UNLOCK, self.n)
        self.conn:release()
        self.pool:close()
        self.conn, self.pool = nil, nil
    end
end


-- Takes a free slot of `cap` -> slot | nil, err (conflict when all are taken).
function _M.acquire(db, cap, name)
    local cfg = db.settings
    local pool, e = core.pool{ conninfo = cfg.url, size = 1,
                               acquire_timeout_ms = cfg.acquire_timeout_ms,
                               connect_timeout_ms = cfg.connect_timeout_ms }
    if not pool then
        return nil, e
    end
    local conn
    conn, e = pool:acquire()
    if not conn then
        pool:close()
        return nil, e
    end
    for n = 1, cap do
        local rows
        rows, e = conn:query(TRY, n)
        if not rows then
            conn:release()
            pool:close()
            return nil, e
        end
        if rows[1].got then
            return setmetatable({ pool = pool, conn = conn, n = n }, Slot)
        end
    end
    conn:release()
    pool:close()
    return nil, qx_error.new("conflict", fmt("cannot rebuild projection %s: %d rebuild(s) already "
        .. "run on this database (max_rebuilds)", name, cap), { max_rebuilds = cap })
end


return _M

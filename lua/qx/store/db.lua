--- qx.connect: a pool of PostgreSQL connections and the entry points that use it.
local core = require "qx.core"
local settings = require "qx.settings"
local options = require "qx.options"

local setmetatable = setmetatable
local type = type
local pairs = pairs
local error = error

local _M = { _VERSION = "0.1.0" }

--- A pool of PostgreSQL connections (qx.connect).
---@class qx.Db
---@field settings table the settings in use (durations in ms)
---@field dispatcher qx.Dispatcher? the default dispatcher of its units of work
local Db = {}
Db.__index = Db

--- Options of qx.connect; left out: QX_DB__* variables, then defaults.
---@class qx.ConnectOptions
---@field url string? postgresql://... or a libpq conninfo (QX_DB__URL)
---@field pool_size integer? connections in the pool (QX_DB__POOL_SIZE, default 10)
---@field pool_timeout_seconds number? wait for a free connection (default 30)
---@field pool_recycle_seconds number? replace connections older than this (default 1800)
---@field statement_timeout_ms integer? server-side statement timeout (default 10000; 0 none)
---@field connect_timeout_seconds number? connection attempt timeout (default 10; 0 none)
---@field cursor_key string? key that signs repository cursors (QX_CURSOR_KEY)
---@field dispatcher qx.Dispatcher? default dispatcher of units of work
---@field shared_pool string? one pool of this name per process, for all its Lua states (nginx)

-- options of qx.connect besides the settings of qx.settings
local KNOWN = { dispatcher = true, shared_pool = true }
for k in pairs(settings.DB_OPTIONS) do KNOWN[k] = true end

--- A pool of PostgreSQL connections (qx.connect). Options left out come from QX_DB__*
-- variables, then defaults (docs/settings.md). The first connection is opened at once, so a
-- wrong url, refused connection or bad password is reported here (connection, invalid).
---@param opts qx.ConnectOptions|nil
---@return qx.Db|nil db
---@return qx.Error? err
function _M.connect(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.connect: options must be a table", 2)
    end
    opts = options.check(opts, KNOWN, "qx.connect")
    local shared = opts.shared_pool
    if shared ~= nil and (type(shared) ~= "string" or shared == "") then
        error("qx.connect: shared_pool must be a non-empty name", 2)
    end
    local db_opts = {}
    for k in pairs(settings.DB_OPTIONS) do db_opts[k] = opts[k] end
    local cfg, e = settings.db(db_opts)
    if not cfg then return nil, e end

    -- statement_timeout is set once per pooled connection, so a unit of work that keeps the
    -- default sends no SET LOCAL of its own (one statement less for the server, every time)
    local timeout = cfg.statement_timeout_ms or 0
    local pool
    pool, e = core.pool{
        conninfo = cfg.url,
        size = cfg.pool_size,
        acquire_timeout_ms = cfg.acquire_timeout_ms,
        recycle_ms = cfg.recycle_ms,
        connect_timeout_ms = cfg.connect_timeout_ms,
        init_sql = timeout > 0 and string.format("SET statement_timeout = %d", timeout) or nil,
        shared = opts.shared_pool,
    }
    if not pool then return nil, e end
    local conn
    conn, e = pool:acquire()
    if not conn then
        pool:close()
        return nil, e
    end
    conn:release()
    return _M.over(pool, cfg, opts.dispatcher)
end

--- A db over a pool of another kind (the wire codec's, qx.openresty.connect): pool:acquire()
-- gives connections with the methods of core.pool's (query, rows, rows_upto, batch,
-- xact_status, tx, release) and pool:close() closes them.
---@param pool table the pool
---@param cfg table the settings in use (settings.db's table)
---@param dispatcher qx.Dispatcher? the default dispatcher of its units of work
---@return qx.Db db
function _M.over(pool, cfg, dispatcher)
    return setmetatable({
        pool = pool,
        settings = cfg,
        dispatcher = dispatcher,
        statement_timeout_ms = cfg.statement_timeout_ms,
        -- what every pooled connection has (0: the server's own)
        session_timeout_ms = cfg.statement_timeout_ms or 0,
    }, Db)
end

--- Leases a connection; the caller releases it (conn:release()). For code that needs one
-- connection for a while: LISTEN, a relay, a migration, conn:script(sql).
---@return userdata|nil conn
---@return qx.Error? err timeout when the pool stays busy
function Db:acquire()
    return self.pool:acquire()
end

--- Runs one statement on a connection of its own, autocommit. NULL columns read as qx.null.
---@param sql string one statement, parameters as $1, $2, ...
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or the affected row count
function Db:query(sql, ...)
    if type(sql) ~= "string" then error("db:query: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local rows, affected = conn:query(sql, ...)
    conn:release()
    return rows, affected
end

--- As db:query, with the NULL columns of a row left out (they read as nil, not qx.null).
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or the affected row count
function Db:rows(sql, ...)
    if type(sql) ~= "string" then error("db:rows: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local rows, affected = conn:rows(sql, ...)
    conn:release()
    return rows, affected
end

--- db:rows with only the first max rows made into tables; count is every row the statement
-- returned (a page reads one row more than it shows, to know whether another follows).
---@param max integer
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or count
function Db:rows_upto(max, sql, ...)
    if type(sql) ~= "string" then error("db:rows_upto: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local rows, count = conn:rows_upto(max, sql, ...)
    conn:release()
    return rows, count
end

--- Runs one statement for its effect.
---@param sql string
---@param ... any the parameters
---@return integer|nil affected row count
---@return qx.Error? err
function Db:exec(sql, ...)
    if type(sql) ~= "string" then error("db:exec: sql must be a string", 2) end
    local rows, affected = self:query(sql, ...)
    if not rows then return nil, affected end
    return affected
end

--- What became of a transaction (err.xid and err.timeline of an unknown_outcome), asked on a
--- connection of the pool. "unknown": the server no longer knows the id, or it is on another
--- timeline than the one the id was learned on.
---@param xid string the transaction id
---@param timeline string|nil the timeline the id was learned on
---@return string|nil status "committed", "aborted", "in progress" or "unknown"
---@return qx.Error? err
function Db:xact_status(xid, timeline)
    if type(xid) ~= "string" then error("db:xact_status: xid must be a string", 2) end
    if timeline ~= nil and type(timeline) ~= "string" then
        error("db:xact_status: timeline must be a string", 2)
    end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local status
    status, e = conn:xact_status(xid, timeline)
    conn:release()
    return status, e
end

--- Runs a script of several SQL statements separated by semicolons (DDL, a seed), with the
-- simple query protocol: no parameters, nothing returned. Unless it says BEGIN/COMMIT itself,
-- PostgreSQL runs the whole script as one implicit transaction: a failing statement undoes the
-- ones before it.
---@param sql string the statements
---@return boolean|nil ok true
---@return qx.Error? err `db`, `invalid`, `conflict`, ...: the first statement that failed
function Db:script(sql)
    if type(sql) ~= "string" then error("db:script: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local ok
    ok, e = conn:script(sql)
    conn:release()
    if not ok then return nil, e end
    return true
end

local uow_run -- qx.uow, required on first use

--- Runs fn(uow) in one transaction; see qx.store.uow and docs/unit-of-work.md. Any error rolls
-- everything back.
---@param fn fun(uow: qx.Uow): any
---@param opts qx.UnitOfWorkOptions|nil
---@return any result what fn returned (true for nothing), or nil
---@return qx.Error? err conflict, invalid, timeout, connection, db, or error for a raised Lua error
function Db:unit_of_work(fn, opts)
    if not uow_run then uow_run = require("qx.store.uow").run end
    return uow_run(self, fn, opts)
end

--- The pool's figures.
---@return table stats { size, open, idle, in_use, waiting, created, replaced }
function Db:stats()
    return self.pool:stats()
end

--- Closes idle connections; connections still leased close when released.
function Db:close()
    self.pool:close()
end

_M.Db = Db
return _M

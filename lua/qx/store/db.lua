-- qx.connect: a pool of PostgreSQL connections and the entry points that use it.
local core = require "qx.core"
local settings = require "qx.settings"
local options = require "qx.options"

local setmetatable = setmetatable
local type = type
local pairs = pairs
local error = error

local _M = { _VERSION = "0.1.0" }

local Db = {}
Db.__index = Db

-- options of qx.connect besides the settings of qx.settings
local KNOWN = { dispatcher = true }
for k in pairs(settings.DB_OPTIONS) do KNOWN[k] = true end

-- connect(opts) -> db | nil, err
-- opts: url, pool_size, pool_timeout_seconds, pool_recycle_seconds, statement_timeout_ms,
--       connect_timeout_seconds, dispatcher (default for units of work), cursor_key.
-- Options left out come from QX_DB__* variables, then defaults. The first connection is
-- opened at once, so a wrong url, refused connection or bad password is reported here.
function _M.connect(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.connect: options must be a table", 2)
    end
    opts = options.check(opts, KNOWN, "qx.connect")
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
    }
    if not pool then return nil, e end
    local conn
    conn, e = pool:acquire()
    if not conn then
        pool:close()
        return nil, e
    end
    conn:release()
    return setmetatable({
        pool = pool,
        settings = cfg,
        dispatcher = opts.dispatcher,
        statement_timeout_ms = cfg.statement_timeout_ms,
        session_timeout_ms = timeout, -- what every pooled connection has (0: the server's own)
    }, Db)
end

-- Leases a connection; the caller releases it (conn:release()). For code that needs one
-- connection for a while: LISTEN, a relay, a migration.
function Db:acquire()
    return self.pool:acquire()
end

-- db:query(sql, ...) -> rows | nil, err (its own connection, autocommit)
function Db:query(sql, ...)
    if type(sql) ~= "string" then error("db:query: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local rows, affected = conn:query(sql, ...)
    conn:release()
    return rows, affected
end

-- db:rows(sql, ...) -> rows, affected | nil, err: as db:query, with the NULL columns of a row
-- left out (they read as nil, not core.null)
function Db:rows(sql, ...)
    if type(sql) ~= "string" then error("db:rows: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local rows, affected = conn:rows(sql, ...)
    conn:release()
    return rows, affected
end

-- db:rows_upto(max, sql, ...) -> rows, count | nil, err: db:rows with only the first max rows
-- made into tables; count is every row the statement returned (a page reads one row more than
-- it shows, to know whether another follows)
function Db:rows_upto(max, sql, ...)
    if type(sql) ~= "string" then error("db:rows_upto: sql must be a string", 2) end
    local conn, e = self.pool:acquire()
    if not conn then return nil, e end
    local rows, count = conn:rows_upto(max, sql, ...)
    conn:release()
    return rows, count
end

-- db:exec(sql, ...) -> affected row count | nil, err
function Db:exec(sql, ...)
    if type(sql) ~= "string" then error("db:exec: sql must be a string", 2) end
    local rows, affected = self:query(sql, ...)
    if not rows then return nil, affected end
    return affected
end

--- Runs a script of several SQL statements separated by semicolons (DDL, a seed), with the
-- simple query protocol: no parameters, nothing returned. Unless it says BEGIN/COMMIT itself,
-- PostgreSQL runs the whole script as one implicit transaction: a failing statement undoes the
-- ones before it.
-- @tparam string sql the statements
-- @treturn boolean true
-- @return nil, err (`db`, `invalid`, `conflict`, ...: the first statement that failed)
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

-- db:unit_of_work(fn, opts): see qx.uow
function Db:unit_of_work(fn, opts)
    if not uow_run then uow_run = require("qx.store.uow").run end
    return uow_run(self, fn, opts)
end

function Db:stats()
    return self.pool:stats()
end

-- Closes idle connections; connections still leased close when released.
function Db:close()
    self.pool:close()
end

_M.Db = Db
return _M

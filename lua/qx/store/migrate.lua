--- qx.migrate(db): applies the steps of qx.migrations that the database has not seen.
-- Idempotent, and safe when several processes run it at once: the whole run holds a
-- transaction-scoped advisory lock, so a second runner waits and then finds nothing to do.
local steps = require "qx.store.migrations"
local options = require "qx.options"

local ipairs = ipairs
local type = type
local tostring = tostring

local _M = { _VERSION = "0.1.0" }

local LOCK_KEY = 7211300001 -- "qx" schema lock; any constant unique to qx

local function apply(conn, list)
    -- a long step (an index on a big table) or a long wait for the lock is not a runaway query:
    -- the connection's statement_timeout does not apply here
    local ok, e = conn:script("BEGIN; SET LOCAL statement_timeout = 0")
    if not ok then return nil, e end
    ok, e = conn:query("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
    if not ok then return nil, e end
    ok, e = conn:script([[
CREATE TABLE IF NOT EXISTS qx_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)]])
    if not ok then return nil, e end
    local rows
    rows, e = conn:query("SELECT version FROM qx_schema_migrations")
    if not rows then return nil, e end
    local done = {}
    for _, r in ipairs(rows) do done[r.version] = true end

    local applied = {}
    for _, step in ipairs(list) do
        if not done[step.version] then
            ok, e = conn:script(step.sql)
            if not ok then
                e.message = "migration " .. step.version .. " (" .. step.name .. "): " .. e.message
                return nil, e
            end
            ok, e = conn:query("INSERT INTO qx_schema_migrations (version, name) VALUES ($1, $2)",
                               step.version, step.name)
            if not ok then return nil, e end
            applied[#applied + 1] = step.version
        end
    end
    ok, e = conn:script("COMMIT")
    if not ok then return nil, e end
    return applied
end

local MIGRATE_OPTIONS = { "dir", "steps" }

--- Applies the steps of qx.migrations that the database has not seen (qx.migrate).
---@param db qx.Db
---@param opts table|nil { steps = list } instead of qx's own steps
---@return table|nil result { applied = { versions... }, current = n }
---@return qx.Error? err
function _M.run(db, opts)
    opts = options.check(opts, MIGRATE_OPTIONS, "qx.migrate")
    local list = opts.steps or steps
    local current = 0
    for _, step in ipairs(list) do
        if type(step.version) ~= "number" or step.version <= current then
            error("migration steps must have increasing versions, got " .. tostring(step.version)
                  .. " after " .. current, 2)
        end
        current = step.version
    end
    -- a folder that is wrong is refused before qx's schema is touched
    local app, app_list, e
    if opts.dir ~= nil then
        app = require "qx.store.app_migrations"
        app_list, e = app.scan(opts.dir)
        if not app_list then return nil, e end
    end
    local conn
    conn, e = db:acquire()
    if not conn then return nil, e end
    local applied
    applied, e = apply(conn, list)
    conn:release() -- rolls back whatever a failed step left open
    if not applied then return nil, e end
    local res = { applied = applied, current = current }
    if app then
        res.app, e = app.apply_scanned(db, app_list)
        if not res.app then return nil, e end
    end
    return res
end

--- The versions applied so far, for `qx migrate --status`.
---@param db qx.Db
---@return table|nil rows { { version, name, applied_at }... }
---@return qx.Error? err
function _M.status(db)
    local rows, e = db:query([[
SELECT version, name, applied_at::text AS applied_at FROM qx_schema_migrations ORDER BY version]])
    if not rows then
        if e.sqlstate == "42P01" then return {} end
        return nil, e
    end
    return rows
end

return _M

--- An application's own migrations: numbered files in a folder of the application's, applied in
-- order with their own history table (qx_app_migrations) and their own advisory lock, apart from
-- qx's schema (qx.store.migrate). The contract is in docs/migrations.md.
local core = require "qx.core"

local ipairs = ipairs
local type = type
local tostring = tostring
local tonumber = tonumber
local pcall = pcall
local loadfile = loadfile
local io_open = io.open
local sort = table.sort
local floor = math.floor

local _M = { _VERSION = "0.2.0" }

-- Not qx's own schema lock (7211300001): an application migration and qx's may run at once.
local LOCK_KEY = 7211300002
local NO_TX_MARK = "-- qx:no-transaction"

local HISTORY = [[
CREATE TABLE IF NOT EXISTS qx_app_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL
)]]

local fail = require("qx.error").fail

local function hex(bytes)
    return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local function read(path)
    local f, e = io_open(path, "rb")
    if not f then return nil, e end
    local text = f:read("a") -- "a": Lua 5.4; LuaJIT reads "a" as "*a"
    f:close()
    return text
end

-- The migrations of a folder, sorted by version: { version, name, file, kind, sql?, lua?,
-- checksum, no_transaction } | nil, err. A name that starts with a digit must be
-- NNNN_name.sql or NNNN_name.lua; other files (README, .gitkeep) are not migrations.
local function scan(dir)
    if type(dir) ~= "string" or dir == "" then
        require("qx.options").raise("qx migrations: dir must be a folder name, got " .. type(dir))
    end
    local names, e = core.dir_list(dir)
    if not names then
        e.message = "migrations folder: " .. e.message
        return nil, e
    end
    sort(names)
    local list, by_version = {}, {}
    for _, file in ipairs(names) do
        if file:match("^%d") then
            local digits, name, ext = file:match("^(%d+)_([%w_%-]+)%.(%a+)$")
            if not digits or (ext ~= "sql" and ext ~= "lua") then
                return fail("invalid", "migration file name " .. file
                    .. " is not NNNN_name.sql or NNNN_name.lua")
            end
            local version = tonumber(digits)
            if by_version[version] then
                return fail("invalid", "migrations " .. by_version[version].file .. " and " .. file
                    .. " have the same number " .. version)
            end
            local path = dir .. "/" .. file
            local text, re = read(path)
            if not text then
                return fail("invalid", "cannot read migration " .. path .. ": " .. re)
            end
            local m = {
                version = version, name = name, file = file, kind = ext,
                checksum = hex(core.sha256(text)),
                no_transaction = text:sub(1, #NO_TX_MARK) == NO_TX_MARK,
            }
            if ext == "sql" then
                m.sql = text
            else
                local chunk, le = loadfile(path)
                if not chunk then return fail("invalid", "migration " .. file .. ": " .. le) end
                local ok, body = pcall(chunk)
                if not ok then
                    return fail("invalid", "migration " .. file .. ": " .. tostring(body))
                end
                if type(body) ~= "function" and type(body) ~= "table" then
                    return fail("invalid", "migration " .. file
                        .. " must return a function(conn) or a table of SQL statements")
                end
                m.lua = body
            end
            by_version[version] = m
            list[#list + 1] = m
        end
    end
    sort(list, function(a, b) return a.version < b.version end)
    for i, m in ipairs(list) do
        if m.version ~= i then
            return fail("invalid", "migration " .. m.file .. " should be number " .. i
                .. (i == 1 and " (numbers start at 1)"
                    or " (no gaps: " .. (i - 1) .. " is the last before it)"))
        end
    end
    return list
end

local function history(conn)
    local rows, e = conn:query(
        "SELECT version, name, checksum, applied_at::text AS applied_at, duration_ms"
        .. " FROM qx_app_migrations ORDER BY version")
    if not rows then return nil, e end
    return rows
end

-- Refuses a folder that disagrees with what was applied: an edited file, or an applied one that
-- is gone. Nothing is applied then.
local function check_history(list, rows)
    for _, r in ipairs(rows) do
        local m = list[r.version]
        if not m then
            return fail("invalid", "migration " .. r.version .. " (" .. r.name
                .. ") was applied but has no file in the folder")
        end
        if m.checksum ~= r.checksum then
            return fail("invalid", "migration " .. m.file .. " was edited after it was applied"
                .. " (checksum " .. m.checksum:sub(1, 12) .. ", applied " .. r.checksum:sub(1, 12)
                .. "): add a new migration instead")
        end
    end
    return true
end

local function run_body(conn, m)
    if m.sql then return conn:script(m.sql) end
    if type(m.lua) == "function" then
        local ok, r, e = pcall(m.lua, conn)
        if not ok then return fail("invalid", tostring(r)) end
        if r == nil and e ~= nil then return nil, e end
        if r == false then return fail("invalid", tostring(e or "the migration returned false")) end
        return true
    end
    for i, stmt in ipairs(m.lua) do
        if type(stmt) ~= "string" then
            return fail("invalid", "statement " .. i .. " is a " .. type(stmt) .. ", not SQL text")
        end
        local ok, e = conn:script(stmt)
        if not ok then return nil, e end
    end
    return true
end

local function record(conn, m, started)
    return conn:query(
        "INSERT INTO qx_app_migrations (version, name, checksum, duration_ms)"
        .. " VALUES ($1, $2, $3, $4)",
        m.version, m.name, m.checksum, floor((core.clock() - started) * 1000 + 0.5))
end

local function apply_one(conn, m)
    local started = core.clock()
    local ok, e
    if m.no_transaction then
        ok, e = run_body(conn, m)
        if ok then ok, e = record(conn, m, started) end
        return ok, e
    end
    ok, e = conn:script("BEGIN; SET LOCAL statement_timeout = 0")
    if ok then ok, e = run_body(conn, m) end
    if ok then ok, e = record(conn, m, started) end
    if ok then ok, e = conn:script("COMMIT") end
    if not ok then conn:script("ROLLBACK") end
    return ok, e
end

local function apply_all(db, conn, list)
    -- the lock is held by the session (a no-transaction file cannot run in a transaction), and a
    -- long wait for it is not a runaway query
    local ok, e = conn:script("SET statement_timeout = 0")
    if not ok then return nil, e end
    ok, e = conn:query("SELECT pg_advisory_lock($1)", LOCK_KEY)
    if not ok then return nil, e end
    local applied = {}
    local res
    res, e = conn:script(HISTORY)
    local rows
    if res then rows, e = history(conn) end
    if rows then res, e = check_history(list, rows) else res = nil end
    if res then
        local done = {}
        for _, r in ipairs(rows) do done[r.version] = true end
        for _, m in ipairs(list) do
            if not done[m.version] then
                res, e = apply_one(conn, m)
                if not res then
                    e.message = "migration " .. m.file .. ": " .. tostring(e.message)
                    break
                end
                applied[#applied + 1] = { version = m.version, name = m.name, file = m.file }
            end
        end
    end
    conn:query("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    conn:script(("SET statement_timeout = %d"):format(db.session_timeout_ms or 0))
    if not res then return nil, e end
    return applied
end

--- Applies the migrations of a folder that the database has not seen, each in its own
-- transaction (or none, for a file marked `-- qx:no-transaction`), in order, under an advisory
-- lock: a second applier waits, then finds nothing to do. An edited applied file, a gap, a
-- duplicate number or a bad file name is an error and nothing is applied.
---@param db qx.Db the pool (`qx.connect`)
---@param dir string the folder of the migrations, e.g. "db/migrations"
---@return table|nil result { applied = { { version, name, file }... }, current = n }
---@return qx.Error? err invalid (a bad folder or file), db or conflict (a migration failed)
function _M.apply(db, dir)
    local list, e = scan(dir)
    if not list then return nil, e end
    return _M.apply_scanned(db, list)
end

--- apply() of what scan(dir) returned: qx.migrate scans the folder before it touches qx's schema,
-- so a wrong folder changes nothing.
---@param db qx.Db the pool
---@param list table what scan(dir) returned
---@return table|nil result as apply's
---@return qx.Error? err
function _M.apply_scanned(db, list)
    local conn, e = db:acquire()
    if not conn then return nil, e end
    local applied
    applied, e = apply_all(db, conn, list)
    conn:release()
    if not applied then return nil, e end
    return { applied = applied, current = #list }
end

--- The migrations of a folder and whether each is applied, for `qx migrate --dir DIR --status`.
-- One row per file, in order: `{ version, name, file, state, applied_at, duration_ms }`, state
-- "applied", "pending" or "edited" (the file changed after it was applied), and a row of state
-- "missing" for an applied version whose file is gone.
---@param db qx.Db the pool
---@param dir string the folder of the migrations
---@return table|nil rows
---@return qx.Error? err
function _M.status(db, dir)
    local list, e = scan(dir)
    if not list then return nil, e end
    local rows
    rows, e = db:query(
        "SELECT version, name, checksum, applied_at::text AS applied_at, duration_ms"
        .. " FROM qx_app_migrations ORDER BY version")
    if not rows then
        if e.sqlstate ~= "42P01" then return nil, e end
        rows = {}
    end
    local by_version = {}
    for _, r in ipairs(rows) do by_version[r.version] = r end
    local out = {}
    for _, m in ipairs(list) do
        local r = by_version[m.version]
        out[#out + 1] = {
            version = m.version, name = m.name, file = m.file,
            state = not r and "pending" or (r.checksum == m.checksum and "applied" or "edited"),
            applied_at = r and r.applied_at, duration_ms = r and r.duration_ms,
        }
    end
    for _, r in ipairs(rows) do
        if not list[r.version] then
            out[#out + 1] = { version = r.version, name = r.name, state = "missing",
                              applied_at = r.applied_at, duration_ms = r.duration_ms }
        end
    end
    return out
end

-- scan(dir) -> the migrations of a folder, checked, for apply_scanned | nil, err
_M.scan = scan
_M.NO_TRANSACTION_MARK = NO_TX_MARK
_M.LOCK_KEY = LOCK_KEY
return _M

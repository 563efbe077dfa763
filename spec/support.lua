-- Test support for the specs: where the servers are, a psql of our own to set up and inspect
-- the database independently of qx, shell quoting, unique names; and, at the end, the
-- fresh-database set-ups many specs share (those do use qx).
--
--   local support = require "support"      -- .busted puts spec/?.lua on the path
--   local url = support.db_url()
--   support.psql("CREATE TABLE " .. support.unique("t") .. " (id int)")
--   local db = support.migrated_db{ pool_size = 6 }   -- in setup; db:close() in teardown
--
-- The servers come from `scripts/servers.sh start DIR`, which writes DIR/env; `make test`
-- starts them and exports that file into the environment of busted.
local M = {}

local function env(name)
    local v = os.getenv(name)
    if v == nil or v == "" then
        error(name .. " is not set: run the specs with `make test`, or `scripts/servers.sh start DIR`"
            .. " and source DIR/env first", 3)
    end
    return v
end

--- Quote one shell word.
local function sh(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.sh = sh

--- A file's contents, "" when it cannot be read.
local function slurp(path)
    local f = io.open(path, "rb")
    if not f then return "" end
    local s = f:read("*a") or ""
    f:close()
    return s
end
M.slurp = slurp

local function trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- Run a shell command line without the sanitizer preload (psql hangs with the ASan runtime
-- preloaded). Returns ok, stdout, stderr. The exit status goes through a file because
-- LuaJIT's popen:close() does not report it.
local function run(cmdline)
    local errf, rcf = os.tmpname(), os.tmpname()
    local p = assert(io.popen("env -u LD_PRELOAD " .. cmdline .. " 2>" .. sh(errf)
        .. "; echo $? >" .. sh(rcf), "r"))
    local out = p:read("*a") or ""
    p:close()
    local err, rc = slurp(errf), tonumber((slurp(rcf):match("%d+")))
    os.remove(errf)
    os.remove(rcf)
    return rc == 0, out, err
end

--- postgresql://postgres@127.0.0.1:PORT/postgres (superuser, trust authentication).
function M.db_url() return env("QX_DB__URL") end

--- nats://127.0.0.1:PORT (JetStream enabled).
function M.nats_url() return env("QX_TEST_NATS_URL") end

--- http://127.0.0.1:MONPORT, the nats-server monitoring endpoint (/healthz, /jsz, /varz...).
function M.nats_monitor_url() return env("QX_TEST_NATS_MONITOR") end

--- PostgreSQL's bin folder (psql, pg_ctl, pgbench), the cluster's data folder, its port.
function M.pg_bin() return os.getenv("QX_TEST_PG_BIN") or "/usr/lib/postgresql/15/bin" end
function M.pg_data() return os.getenv("QX_TEST_PG_DATA") end
function M.pg_port() return tonumber((M.db_url():match(":(%d+)/"))) end

--- db_url() with another database name (its query part kept).
function M.url_for(dbname)
    local url = M.db_url()
    local base, query = url:match("^(.-)(%?.*)$")
    base, query = base or url, query or ""
    return (base:gsub("/[^/]*$", "/" .. dbname)) .. query
end

--- Run SQL (one or more statements) through psql in a session of its own, outside qx.
-- Returns stdout trimmed: unaligned, tuples only, columns separated by "|", rows by "\n".
-- Raises with psql's message when a statement fails (ON_ERROR_STOP).
function M.psql(sql)
    local f = os.tmpname()
    local h = assert(io.open(f, "wb"))
    h:write(sql)
    h:close()
    local ok, out, err = run(sh(M.pg_bin() .. "/psql") .. " -X -q -A -t -v ON_ERROR_STOP=1 -d "
        .. sh(M.db_url()) .. " -f " .. sh(f) .. " </dev/null")
    os.remove(f)
    if not ok then
        error("psql failed: " .. trim(err) .. "\nSQL: " .. sql, 2)
    end
    return trim(out)
end
M.pg_exec = M.psql

--- Rows of a query as arrays of strings (NULL is ""), through psql.
function M.rows(sql)
    local rows = {}
    for line in (M.psql(sql) .. "\n"):gmatch("([^\n]*)\n") do
        if line ~= "" then
            local row = {}
            for col in (line .. "|"):gmatch("([^|]*)|") do row[#row + 1] = col end
            rows[#rows + 1] = row
        end
    end
    return rows
end

--- GET a path of the nats-server monitor, e.g. support.nats_monitor("/jsz?streams=true").
-- Returns the body (JSON text); raises when the request fails.
function M.nats_monitor(path)
    path = path or "/healthz"
    local ok, out, err = run("curl -sf --max-time 5 " .. sh(M.nats_monitor_url() .. path))
    if not ok then error("nats monitor request failed: " .. path .. " " .. trim(err), 2) end
    return out
end

local counter = 0
local tag
do
    local f = io.open("/dev/urandom", "rb")
    local bytes = f and f:read(6) or tostring(os.time() + os.clock())
    if f then f:close() end
    tag = bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end):sub(1, 12)
end

--- A name unique to this process and call, safe as an SQL identifier and as a NATS subject
-- token (lower-case letters, digits, "_"): unique("orders") -> "orders_3fa81c09b2d4_1".
function M.unique(prefix)
    counter = counter + 1
    return (prefix or "t") .. "_" .. tag .. "_" .. counter
end

-- How many notifications on `channel` from backend `pid` a LISTENing connection receives within
-- wait_ms (it waits the whole time: a test of "none" must not stop early).
function M.notified_by(listener, channel, pid, wait_ms)
    local clock = require("qx.core").clock
    local n, deadline = 0, clock() + wait_ms / 1000
    repeat
        for _, ev in ipairs(assert(listener:notifications(50))) do
            if ev.channel == channel and ev.pid == pid then n = n + 1 end
        end
    until clock() > deadline
    return n
end

--- The values of one field of each item, in order: field(rows, "id") -> { id1, id2, ... }.
function M.field(items, key)
    local out = {}
    for i, item in ipairs(items) do out[i] = item[key] end
    return out
end

--- Waits s seconds on the monotonic clock, spinning: no sleep(1) process, no timer.
function M.spin(s)
    local clock = require("qx.core").clock
    local t = clock() + s
    while clock() < t do end
end

-- ---- databases set up through qx ------------------------------------------------------------

local function connect(url, opts, default_size)
    local qx = require "qx"
    local o = { url = url, pool_size = default_size }
    for k, v in pairs(opts or {}) do o[k] = v end
    return assert(qx.connect(o))
end

--- The test database through qx, with qx's schema migrated; opts go to qx.connect (pool_size 4
-- unless given; url = url_for(name) for another database). The specs share the test database:
-- each names its own tables, types and events with unique(). Close it in teardown.
function M.migrated_db(opts)
    local db = connect(M.db_url(), opts, 4)
    assert(require("qx").migrate(db))
    return db
end

--- A schema of its own in the test database, qx's schema migrated into it, and a db whose
-- connections use it: for specs that count or drain every outbox row (a relay sees only this
-- schema's rows). Returns db, schema, url; drop_schema(schema, db) after, then db:close().
-- Made and dropped through db rather than psql: the relay specs make one per test.
function M.schema_db(prefix, opts)
    local schema = M.unique(prefix)
    local url = M.db_url() .. "?options=-csearch_path%3D" .. schema
    local db = connect(url, opts, 4)
    assert(db:exec("CREATE SCHEMA " .. schema))
    assert(require("qx").migrate(db))
    return db, schema, url
end

--- Drops a schema and all in it, through db (a qx db) when given, else through psql.
function M.drop_schema(schema, db)
    if db then
        assert(db:exec("DROP SCHEMA " .. schema .. " CASCADE"))
    else
        M.psql("DROP SCHEMA " .. schema .. " CASCADE")
    end
end

--- Empty databases of their own on the test server, for specs that start from nothing (a
-- migration of a new database, `qx migrate`) or need exact counts. Make it in setup:
--   local dbs = support.fresh_databases("qx_mig")
--   local name = dbs.create()           -- CREATE DATABASE qx_mig_<12 hex>; url_for(name)
--   dbs.drop_all()                      -- in teardown: every one made, WITH (FORCE)
function M.fresh_databases(prefix)
    local core = require "qx.core"
    local admin = connect(M.db_url(), nil, 1)
    local made = {}
    local self = {}
    function self.create()
        local name = prefix .. "_" .. core.uuid():gsub("-", ""):sub(-12)
        assert(admin:exec("CREATE DATABASE " .. name))
        made[#made + 1] = name
        return name
    end
    function self.drop_all()
        for _, name in ipairs(made) do
            admin:exec("DROP DATABASE IF EXISTS " .. name .. " WITH (FORCE)")
        end
        made = {}
        admin:close()
    end
    return self
end

-- ---- tables the planner has no statistics for ---------------------------------------------------

--- Turns autovacuum off for `tbl` (a table name on db's search_path) right after it was made,
-- so that no ANALYZE gives the planner statistics for it: the specs of hot statements on a
-- fresh deployment's tables, whose plans must not depend on statistics.
function M.never_analyse(db, tbl)
    assert(tbl:match("^[%w_]+$"), "never_analyse: a plain table name")
    assert(db:exec("ALTER TABLE " .. tbl .. " SET (autovacuum_enabled = false)"))
end

--- Asserts that `tbl` has never been analysed: no (auto)analyze on record and no row estimate
-- (pg_class.reltuples -1, or 0 for a table emptied by VACUUM).
function M.assert_never_analysed(db, tbl)
    local r = assert(db:query([[
SELECT c.reltuples::float8 AS reltuples, s.last_analyze IS NULL AS no_analyze,
       s.last_autoanalyze IS NULL AS no_autoanalyze
FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = to_regclass($1)]], tbl))[1]
    assert(r, "assert_never_analysed: no table " .. tbl)
    assert(r.no_analyze and r.no_autoanalyze, tbl .. " has been analysed")
    assert(r.reltuples == -1 or r.reltuples == 0,
           tbl .. " has a row estimate: " .. tostring(r.reltuples))
end

-- ---- Lua child processes -------------------------------------------------------------------

-- the interpreter running the specs (lua5.4, luajit, or the ASan build of lua5.4)
local function interpreter()
    local i = -1
    while arg and arg[i - 1] ~= nil do i = i - 1 end
    return (arg and arg[i]) or (jit and "luajit" or "lua5.4")
end

--- Starts the Lua `code` in a child process of the spec's interpreter and module paths, with
-- the variables `vars` set; it runs while the spec goes on. Returns a handle for collect().
function M.spawn(code, vars)
    local file = os.tmpname()
    local f = assert(io.open(file, "w"))
    f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
    f:write(code)
    f:close()
    local parts = { "env ASAN_OPTIONS=detect_leaks=0" }
    for k, v in pairs(vars or {}) do parts[#parts + 1] = k .. "=" .. sh(v) end
    parts[#parts + 1] = sh(interpreter()) .. " " .. sh(file) .. " 2>&1"
    return { pipe = assert(io.popen(table.concat(parts, " "), "r")), file = file }
end

--- Waits for a child of spawn() to end; returns everything it printed (stdout and stderr).
function M.collect(child)
    local out = child.pipe:read("*a") or ""
    child.pipe:close()
    os.remove(child.file)
    return out
end

--- Runs bin/qx as a user runs it, with the interpreter running the specs and their module
-- paths; vars is a table of variables (false unsets one; QX_DB__URL is unset unless given).
-- Returns exit code, stdout, stderr (the code goes through the output: LuaJIT's popen:close()
-- does not report it).
function M.qx_cli(args, vars)
    local all = { LUA_PATH = package.path, LUA_CPATH = package.cpath, QX_DB__URL = false }
    for k, v in pairs(vars or {}) do all[k] = v end
    local unset, set = "", ""
    for k, v in pairs(all) do
        if v == false then unset = unset .. " -u " .. k else set = set .. " " .. k .. "=" .. sh(v) end
    end
    local words = {}
    for i, a in ipairs(args) do words[i] = sh(a) end
    local errf = os.tmpname()
    local p = assert(io.popen("env" .. unset .. set .. " " .. (jit and "luajit" or "lua5.4")
        .. " bin/qx " .. table.concat(words, " ") .. " 2>" .. sh(errf) .. "; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local err = M.slurp(errf)
    os.remove(errf)
    return tonumber(out:match("exit=(%d+)%s*$")), (out:gsub("exit=%d+%s*$", "")), err
end

return M

-- Unit-of-work benchmark: a command handler that inserts one row and records one integration
-- event (so one outbox row), committed as one transaction, at 1 and 2 clients (2 clients = 2 OS
-- processes), each running N transactions. In the same run, the same work as:
--   pgbench   BEGIN; INSERT row; INSERT outbox row; COMMIT (bench/uow_pgbench.sql, payloads of
--             the same sizes), with the default simple protocol and with -M prepared;
--   LuaSQL    the same four statements written plainly over luasql.postgres, values inlined
--             with conn:escape, the envelope encoded with cjson.
-- qx runs on Lua 5.4 and on LuaJIT; LuaSQL on both too. Rounds alternate the contenders and the
-- medians are reported, with the ratios qx/pgbench and qx/LuaSQL.
--
--   QX_DB__URL=postgresql://... lua5.4 bench/uow_bench.lua [N [ROUNDS]]
--   (environment UOW_BENCH_N, UOW_BENCH_ROUNDS, UOW_BENCH_CLIENTS="1,2", UOW_BENCH_SYNC="on,off"
--   override the defaults)
--
-- It runs twice: with synchronous_commit = on (every commit waits for its WAL flush: the durable
-- setting, bound by the disk's fsync) and off (the same SQL without the flush wait, which shows
-- what each client costs in CPU and round trips).
--
-- The run happens in a database of its own (created and dropped here), tables emptied and a
-- CHECKPOINT taken before every measurement. Needs `make` (build/lua5.4, build/luajit), pgbench
-- and lua-sql-postgres. `... uow_bench.lua client KIND URL N START_AT` is one client process.
local MODE = arg[1]

local function root()
    local src = debug.getinfo(1, "S").source:gsub("^@", "")
    local dir = src:match("^(.*)/bench/[^/]*$") or "."
    return dir
end
local ROOT = root()
package.path = ROOT .. "/bench/?.lua;" .. package.path
local B = require "bench_support"

if MODE ~= "client" then
    package.path = ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;" .. package.path
    package.cpath = ROOT .. "/build/lua5.4/?.so;" .. package.cpath
end

local NAME_FMT, EMAIL_FMT = "user-%010d", "user-%010d@bench.example.com"
local EVENT = "bench.user.registered"

-- ---- clients --------------------------------------------------------------------------------

-- Waits for the shared start time (CLOCK_MONOTONIC: the same clock in every process), runs n
-- transactions, prints "RESULT n start end cpu" (cpu: the process's CPU seconds in the loop).
local function timed(n, start_at, clock, one)
    for i = 1, 50 do one(-i) end -- warm: statements prepared, code compiled
    while clock() < start_at do end
    local t0, c0 = clock(), os.clock()
    for i = 1, n do one(i) end
    local t1, c1 = clock(), os.clock()
    io.write(string.format("RESULT %d %.6f %.6f %.6f\n", n, t0, t1, c1 - c0))
end

-- traced: the unit of work's context carries a W3C traceparent and tracestate, which go with
-- the outbox row (the "qx ... traced" contenders: what the trace columns cost)
local function qx_client(url, n, start_at, traced)
    local qx = require "qx"
    local core = require "qx.core"
    local db = assert(qx.connect{ url = url, pool_size = 1 })
    local Registered = qx.integration_event(EVENT)
    local User = qx.aggregate("BenchUser")
    local INSERT = "INSERT INTO uow_bench_users (id, name, email) VALUES ($1, $2, $3)"
    local opts = { context = { tenant_id = qx.uuid() } }
    if traced then
        opts.context.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        opts.context.tracestate = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    end
    local fmt = string.format
    local function one(i)
        local id, err = db:unit_of_work(function(uow)
            local u = uow:track(User.new{ name = fmt(NAME_FMT, i), email = fmt(EMAIL_FMT, i) })
            uow:queue(INSERT, u.id, u.name, u.email)
            u:record(Registered{ user_id = u.id, name = u.name, email = u.email })
            return u.id
        end, opts)
        if not id then error(tostring(err)) end
    end
    timed(n, start_at, core.clock, one)
    db:close()
end

local function luasql_client(url, n, start_at)
    local driver = require "luasql.postgres"
    local cjson = require "cjson"
    local clock = require("qx.core").clock -- for the start barrier and the timing only
    local env = assert(driver.postgres())
    local conn = assert(env:connect(url))
    local fmt, random = string.format, math.random
    do -- a seed of its own per process (two clients start in the same second)
        local f = assert(io.open("/dev/urandom", "rb"))
        local b = f:read(4)
        f:close()
        math.randomseed(b:byte(1) * 0x1000000 + b:byte(2) * 0x10000 + b:byte(3) * 0x100 + b:byte(4))
    end
    local function uuid4()
        return fmt("%08x-%04x-4%03x-%04x-%012x", random(0, 0x7fffffff) * 2 + random(0, 1),
                   random(0, 0xffff), random(0, 0xfff), 0x8000 + random(0, 0x3fff),
                   random(0, 0xffffff) * 0x1000000 + random(0, 0xffffff))
    end
    local tenant = uuid4()
    local function exec(sql)
        local ok, err = conn:execute(sql)
        if not ok then error(err) end
    end
    local function one(i)
        local id, event_id, corr = uuid4(), uuid4(), uuid4()
        local name, email = fmt(NAME_FMT, i), fmt(EMAIL_FMT, i)
        local at = os.date("!%Y-%m-%dT%H:%M:%S.000000Z")
        local envelope = cjson.encode{
            event_id = event_id, event_name = EVENT, event_version = 1, occurred_at = at,
            correlation_id = corr, causation_id = cjson.null, tenant_id = tenant, actor_id = cjson.null,
            payload = { user_id = id, name = name, email = email },
        }
        exec("BEGIN")
        exec(fmt("INSERT INTO uow_bench_users (id, name, email) VALUES ('%s', '%s', '%s')",
                 id, conn:escape(name), conn:escape(email)))
        exec(fmt("INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, "
                 .. "correlation_id, causation_id, tenant_id, partition_key) VALUES ('%s', '%s', 1, '%s', "
                 .. "'%s', '%s', NULL, '%s', '%s')", event_id, EVENT, conn:escape(envelope), at, corr,
                 tenant, "BenchUser:" .. id))
        exec("COMMIT")
    end
    timed(n, start_at, clock, one)
    conn:close()
    env:close()
end

if MODE == "client" then
    local kind, url, n, start_at = arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5])
    if kind == "qx" or kind == "qx_traced" then
        qx_client(url, n, start_at, kind == "qx_traced")
    elseif kind == "luasql" then
        luasql_client(url, n, start_at)
    else
        error("unknown client kind " .. tostring(kind))
    end
    os.exit(0)
end

-- ---- driver ---------------------------------------------------------------------------------

local qx = require "qx"
local core = require "qx.core"
local cjson = require "cjson"

local N = tonumber(arg[1]) or tonumber(os.getenv("UOW_BENCH_N")) or 2000
local ROUNDS = tonumber(arg[2]) or tonumber(os.getenv("UOW_BENCH_ROUNDS")) or 3
local CLIENTS = {}
for c in (os.getenv("UOW_BENCH_CLIENTS") or "1,2"):gmatch("%d+") do CLIENTS[#CLIENTS + 1] = tonumber(c) end

local SYNC = {}
for v in (os.getenv("UOW_BENCH_SYNC") or "on,off"):gmatch("%a+") do SYNC[#SYNC + 1] = v end

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set (make bench provides it)")

local sh, median = B.sh, B.median

local function slurp(cmd)
    local p = assert(io.popen(cmd))
    local s = p:read("*a")
    p:close()
    return (s:gsub("%s+$", ""))
end

local function url_for(dbname)
    local base, query = URL:match("^(.-)(%?.*)$")
    base, query = base or URL, query or ""
    return (base:gsub("/[^/]*$", "/" .. dbname)) .. query
end

local function cpu_times()
    local f = assert(io.open("/proc/stat"))
    local line = f:read("*l")
    f:close()
    local t, total = {}, 0
    for v in line:gmatch("%d+") do t[#t + 1] = tonumber(v) total = total + tonumber(v) end
    return total, t[4] + (t[5] or 0) -- idle + iowait
end

local function loadavg()
    local f = io.open("/proc/loadavg")
    local s = f and f:read("*l") or "?"
    if f then f:close() end
    return s:match("^(%S+ %S+ %S+)") or s
end

-- CPU seconds used so far by the PostgreSQL cluster: the postmaster, its live children (backends,
-- WAL writer, checkpointer, ...) and the children it has reaped (backends that ended count in its
-- cutime/cstime). nil when the postmaster is not ours to see.
local CLK_TCK = tonumber(slurp("getconf CLK_TCK 2>/dev/null")) or 100
local POSTMASTER = tonumber(os.getenv("QX_TEST_PG_PID") or "")
local function cluster_cpu()
    if not POSTMASTER then return nil end
    local total = 0
    for pid in slurp("ls /proc"):gmatch("%d+") do
        local f = io.open("/proc/" .. pid .. "/stat")
        if f then
            local st = f:read("*l") or ""
            f:close()
            local rest = st:match("%) (.*)$")
            if rest then
                local fields = {}
                for x in rest:gmatch("%S+") do fields[#fields + 1] = x end
                if tonumber(pid) == POSTMASTER then
                    total = total + tonumber(fields[12]) + tonumber(fields[13]) + tonumber(fields[14])
                                    + tonumber(fields[15])
                elseif tonumber(fields[2]) == POSTMASTER then
                    total = total + tonumber(fields[12]) + tonumber(fields[13])
                end
            end
        end
    end
    return total / CLK_TCK
end

-- the bench database
local DB = "qx_uow_bench_" .. core.uuid():gsub("-", ""):sub(-12)
local admin = assert(qx.connect{ url = URL, pool_size = 1 })
assert(admin:exec("CREATE DATABASE " .. DB))
local BENCH_URL = url_for(DB)
local db = assert(qx.connect{ url = BENCH_URL, pool_size = 1 })
local DB_PID = assert(db:query("SELECT pg_backend_pid() AS pid"))[1].pid
assert(qx.migrate(db))
assert(db:exec("CREATE TABLE uow_bench_users (id uuid PRIMARY KEY, name text NOT NULL, email text NOT NULL)"))

local function cleanup()
    if db then db:close() db = nil end
    admin:exec("DROP DATABASE IF EXISTS " .. DB .. " WITH (FORCE)")
end

-- pgbench script: a qx envelope of the size qx writes
local pgbench_script = os.tmpname()
do
    local Registered = qx.integration_event(EVENT)
    local id, tenant = qx.uuid(), qx.uuid()
    local name, email = NAME_FMT:format(1), EMAIL_FMT:format(1)
    local ev = Registered{ user_id = id, name = name, email = email, tenant_id = tenant, correlation_id = qx.uuid() }
    local f = assert(io.open(ROOT .. "/bench/uow_pgbench.sql"))
    local text = f:read("*a")
    f:close()
    -- a space after each key's colon: pgbench would read ':null' as a variable (jsonb drops it)
    local envelope = cjson.encode(ev:envelope()):gsub('":', '": ')
    local values = { NAME = name, EMAIL = email, ENVELOPE = envelope, TENANT = tenant,
                     PARTITION = "BenchUser:" .. id }
    text = text:gsub("{{(%u+)}}", function(k) return (assert(values[k], k):gsub("'", "''")) end)
    f = assert(io.open(pgbench_script, "w"))
    f:write(text)
    f:close()
end

-- Waits until the clients' backends have ended (and so count in the postmaster's cutime).
local function backends_gone()
    local deadline = core.clock() + 5
    repeat
        local n = assert(admin:query("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1 AND pid <> $2",
                                     DB, DB_PID))[1].n
        if n == 0 then return end
    until core.clock() > deadline
end

local function reset()
    assert(db:exec("TRUNCATE uow_bench_users, qx_outbox_events"))
    assert(db:exec("CHECKPOINT"))
end

local function lua_env(interp)
    local build = interp == "luajit" and "luajit" or "lua5.4"
    return "LUA_PATH=" .. sh(ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;;")
            .. " LUA_CPATH=" .. sh(ROOT .. "/build/" .. build .. "/?.so;;")
end

-- runs `clients` processes of one kind; returns transactions per second over the wall time
local function run_lua(interp, kind, clients)
    local start_at = core.clock() + 1.5 + 0.3 * clients
    local procs = {}
    for c = 1, clients do
        procs[c] = assert(io.popen(lua_env(interp) .. " " .. interp .. " " .. sh(ROOT .. "/bench/uow_bench.lua")
            .. " client " .. kind .. " " .. sh(BENCH_URL) .. " " .. N .. " " .. string.format("%.6f", start_at)))
    end
    local total, first, last, cpu = 0, math.huge, 0, 0
    for c = 1, clients do
        local out = procs[c]:read("*a")
        procs[c]:close()
        local n, t0, t1, used = out:match("RESULT (%d+) ([%d.]+) ([%d.]+) ([%d.]+)")
        assert(n, interp .. " " .. kind .. " client failed: " .. out)
        total = total + tonumber(n)
        first = math.min(first, tonumber(t0))
        last = math.max(last, tonumber(t1))
        cpu = cpu + tonumber(used)
    end
    local rows = assert(db:query("SELECT (SELECT count(*) FROM uow_bench_users) AS u,"
        .. " (SELECT count(*) FROM qx_outbox_events) AS o"))[1]
    assert(rows.u == total + 50 * clients and rows.o == rows.u, "rows written do not match the transactions")
    return total / (last - first), cpu / total
end

local function run_pgbench(protocol, clients)
    -- `times` reports the CPU time of the shell's children: pgbench's
    local out = slurp("pgbench -n -M " .. protocol .. " -c " .. clients .. " -j " .. clients .. " -t " .. N
        .. " -f " .. sh(pgbench_script) .. " " .. sh(BENCH_URL) .. " 2>&1; times")
    local tps = out:match("tps = ([%d.]+) %(without initial connection time%)")
    assert(tps, "pgbench failed: " .. out)
    local um, us, sm, ss = out:match("\n[^\n]*\n(%d+)m([%d.]+)s (%d+)m([%d.]+)s%s*$")
    local cpu = um and (tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)) / (N * clients)
    local rows = assert(db:query("SELECT count(*) AS n FROM qx_outbox_events"))[1].n
    assert(rows == N * clients, "pgbench wrote " .. rows .. " outbox rows")
    return tonumber(tps), cpu
end

local CONTENDERS = {
    { key = "qx_54", label = "qx, Lua 5.4", run = function(c) return run_lua("lua5.4", "qx", c) end },
    { key = "qx_jit", label = "qx, LuaJIT", run = function(c) return run_lua("luajit", "qx", c) end },
    { key = "qx_54_traced", label = "qx, Lua 5.4, traceparent",
      run = function(c) return run_lua("lua5.4", "qx_traced", c) end },
    { key = "qx_jit_traced", label = "qx, LuaJIT, traceparent",
      run = function(c) return run_lua("luajit", "qx_traced", c) end },
    { key = "pgb_simple", label = "pgbench (simple protocol)", run = function(c) return run_pgbench("simple", c) end },
    { key = "pgb_prepared", label = "pgbench -M prepared", run = function(c) return run_pgbench("prepared", c) end },
    { key = "luasql_54", label = "LuaSQL, Lua 5.4", run = function(c) return run_lua("lua5.4", "luasql", c) end },
    { key = "luasql_jit", label = "LuaSQL, LuaJIT", run = function(c) return run_lua("luajit", "luasql", c) end },
}

local function report(results, sync)
    local function m(key, c) return median(results[key .. ":" .. c].tps) end
    local function cpu(key, c, what)
        local xs = results[key .. ":" .. c][what]
        return #xs > 0 and string.format("%.0f", median(xs)) or "?"
    end
    print(string.format("\n### synchronous_commit = %s\n", sync))
    local head, rule = "| contender |", "|---|"
    for _, c in ipairs(CLIENTS) do
        head = head .. string.format(" %d client%s: tx/s | CPU us/tx client + server |", c, c > 1 and "s" or "")
        rule = rule .. "---:|---:|"
    end
    print(head)
    print(rule)
    for _, ct in ipairs(CONTENDERS) do
        local line = "| " .. ct.label .. " |"
        for _, c in ipairs(CLIENTS) do
            line = line .. string.format(" %.0f | %s + %s |", m(ct.key, c), cpu(ct.key, c, "client"),
                                         cpu(ct.key, c, "server"))
        end
        print(line)
    end
    print("")
    local cols = {}
    for i, c in ipairs(CLIENTS) do cols[i] = c .. " client" .. (c > 1 and "s" or "") end
    print("| ratio | " .. table.concat(cols, " | ") .. " | target |")
    print("|---|" .. string.rep("---:|", #CLIENTS) .. "---:|")
    local ratios = {
        { "qx Lua 5.4 / pgbench (simple)", "qx_54", "pgb_simple", "0.9" },
        { "qx Lua 5.4 / pgbench -M prepared", "qx_54", "pgb_prepared", "0.9" },
        { "qx LuaJIT / pgbench (simple)", "qx_jit", "pgb_simple", "0.9" },
        { "qx LuaJIT / pgbench -M prepared", "qx_jit", "pgb_prepared", "0.9" },
        { "qx Lua 5.4 / LuaSQL Lua 5.4", "qx_54", "luasql_54", "1.5" },
        { "qx LuaJIT / LuaSQL LuaJIT", "qx_jit", "luasql_jit", "1.5" },
        { "qx Lua 5.4 with / without a traceparent", "qx_54_traced", "qx_54", "0.97" },
        { "qx LuaJIT with / without a traceparent", "qx_jit_traced", "qx_jit", "0.97" },
    }
    for _, r in ipairs(ratios) do
        if results[r[2] .. ":" .. CLIENTS[1]] and results[r[3] .. ":" .. CLIENTS[1]] then
            local line = "| " .. r[1] .. " |"
            for _, c in ipairs(CLIENTS) do line = line .. string.format(" %.2f |", m(r[2], c) / m(r[3], c)) end
            print(line .. " >= " .. r[4] .. " |")
        end
    end
end

-- UOW_BENCH_ONLY="qx_54,pgb_prepared" runs only those contenders (keys above)
if os.getenv("UOW_BENCH_ONLY") then
    local keep = {}
    for k in os.getenv("UOW_BENCH_ONLY"):gmatch("[%w_]+") do keep[k] = true end
    for i = #CONTENDERS, 1, -1 do
        if not keep[CONTENDERS[i].key] then table.remove(CONTENDERS, i) end
    end
end

local ok, failure = pcall(function()
    local cpu0, idle0 = cpu_times()
    local load0 = loadavg()
    local t_start = core.clock()
    local all = {}
    for _, sync in ipairs(SYNC) do
        -- new sessions of the bench database (every client, pgbench) pick this up
        assert(admin:exec("ALTER DATABASE " .. DB .. " SET synchronous_commit = " .. (sync == "off" and "off" or "on")))
        local results = {}
        for round = 1, ROUNDS do
            for _, clients in ipairs(CLIENTS) do
                -- each round starts with another contender: a load that rises or falls during
                -- a round (a shared machine) does not always favour the same one
                for j = 1, #CONTENDERS do
                    local ct = CONTENDERS[(j + round - 2) % #CONTENDERS + 1]
                    reset()
                    local s0 = cluster_cpu()
                    local tps, client_cpu = ct.run(clients)
                    backends_gone()
                    local s1 = cluster_cpu()
                    local server_cpu = s0 and (s1 - s0) / (N * clients)
                    local k = ct.key .. ":" .. clients
                    results[k] = results[k] or { tps = {}, client = {}, server = {} }
                    table.insert(results[k].tps, tps)
                    if client_cpu then table.insert(results[k].client, client_cpu * 1e6) end
                    if server_cpu then table.insert(results[k].server, server_cpu * 1e6) end
                    io.stderr:write(string.format("synchronous_commit=%s round %d, %d client(s), %-26s %7.0f tx/s"
                        .. "  CPU/tx: client %s, server %s\n", sync, round, clients, ct.label, tps,
                        client_cpu and string.format("%.0f us", client_cpu * 1e6) or "?",
                        server_cpu and string.format("%.0f us", server_cpu * 1e6) or "?"))
                end
            end
        end
        all[#all + 1] = { sync = sync, results = results }
    end
    local cpu1, idle1 = cpu_times()
    local busy = 100 * (1 - (idle1 - idle0) / (cpu1 - cpu0))
    print(string.format("unit of work = 1 row + 1 integration event (outbox) per transaction; N = %d per client;"
        .. " %d rounds alternating the contenders, medians", N, ROUNDS))
    print(string.format("machine: CPU busy %.0f%% on average over the run (all processes, bench included);"
        .. " load average %s before, %s after; %.0f s", busy, load0, loadavg(), core.clock() - t_start))
    for _, r in ipairs(all) do report(r.results, r.sync) end
end)

os.remove(pgbench_script)
cleanup()
admin:close()
if not ok then
    io.stderr:write("uow_bench failed: ", tostring(failure), "\n")
    os.exit(1)
end

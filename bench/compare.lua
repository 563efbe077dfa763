-- The Lua half of bench/compare.sh: runs the unit-of-work, append, keyset-page and relay measures
-- of two trees of qx in turns and prints the comparison as Markdown. compare.sh makes the trees,
-- builds them and starts the servers; see bench/README.md.
--
--   lua5.4 bench/compare.lua drive OLD_DIR NEW_DIR ROUNDS OLD_REF NEW_REF
--       (QX_DB__URL, QX_TEST_NATS_URL from the servers' env file)
--   lua5.4 bench/compare.lua setup ADMIN_URL DBNAME
--       run with a tree's LUA_PATH/LUA_CPATH: makes that tree's database (migrated, with the
--       repository bench's table) and prints what the repository bench's worker needs
--   lua5.4 bench/compare.lua relay_drain N
--       run with a tree's LUA_PATH/LUA_CPATH (QX_DB__URL, QX_TEST_NATS_URL): that tree's
--       qx.relay drains N pre-filled outbox rows; prints its rate and its process CPU per event
--
-- Each tree runs its own bench scripts with its own lua/ and build/lua5.4, in a database of its
-- own, with the same knobs (environment, defaults in brackets):
--   QX_CMP_UOW_N          unit-of-work transactions per run (8000)
--   QX_CMP_SECONDS        seconds of each append and keyset-page run (3)
--   QX_CMP_RELAY_EVENTS   outbox rows per relay run (20000; the run also makes its baselines: ~10 s)
--   QX_CMP_ONLY           some of the measures, e.g. "uow,relay" (all: uow, append, keyset, relay,
--                         relay_cpu)
-- The driver needs no qx of its own: it only starts processes and reads what they print.
local fmt = string.format
local MODE = arg[1]

local function sh(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function url_with_db(url, dbname)
    local base, query = url:match("^(.-)(%?.*)$")
    base, query = base or url, query or ""
    return (base:gsub("/[^/]*$", "/" .. dbname)) .. query
end

-- ---- setup: one tree's database ----------------------------------------------------------------

if MODE == "setup" then
    local admin_url, dbname = arg[2], arg[3]
    local qx = require "qx"
    local admin = assert(qx.connect{ url = admin_url, pool_size = 1 })
    local exists = assert(admin:query("SELECT 1 AS x FROM pg_database WHERE datname = $1", dbname))
    if #exists == 0 then assert(admin:exec("CREATE DATABASE " .. dbname)) end
    -- commits that do not wait for their WAL flush: the disk is shared with whatever else runs,
    -- and its flush time is not the code's
    assert(admin:exec("ALTER DATABASE " .. dbname .. " SET synchronous_commit = off"))
    admin:close()
    local db = assert(qx.connect{ url = url_with_db(admin_url, dbname), pool_size = 1 })
    assert(qx.migrate(db))
    -- the table, rows and ids the repository bench's driver makes before it starts its workers
    local tbl, rows = "bench_repo_users", 5000
    assert(db:exec("DROP TABLE IF EXISTS " .. tbl))
    assert(db:exec("CREATE TABLE " .. tbl .. " (" .. qx.schema.id_column() .. ", email text NOT NULL, "
        .. "name text, is_active boolean NOT NULL DEFAULT true, " .. qx.schema.audit_columns() .. ")"))
    assert(db:exec("CREATE INDEX ON " .. tbl .. " (tenant_id, email)"))
    local tenant, other = qx.uuid(), qx.uuid()
    for _, t in ipairs({ tenant, other }) do
        assert(db:exec("INSERT INTO " .. tbl .. " (id, email, name, is_active, tenant_id, created_by) "
            .. "SELECT qx_uuid_v7(), 'user' || lpad(g::text, 6, '0') || '@example.com', 'User ' || g, "
            .. "g % 10 <> 0, $1, 'bench' FROM generate_series(1, $2) g", t, rows))
    end
    assert(db:exec("ANALYZE " .. tbl))
    local function id_of(n)
        return assert(db:query("SELECT id::text AS id FROM " .. tbl .. " WHERE tenant_id = $1 AND "
            .. "email = $2", tenant, ("user%06d@example.com"):format(n)))[1].id
    end
    print(table.concat({ "REPO", tbl, tenant, id_of(1234), id_of(11), id_of(12) }, " "))
    db:close()
    os.exit(0)
end

-- ---- relay_drain: one tree's relay over a pre-filled outbox, its CPU per event ---------------

-- The relay's rate moves 0.6-1.4x between identical runs on two cores shared with nats-server
-- and PostgreSQL; the CPU its process spends per event (every thread, os.clock) moves far less.
if MODE == "relay_drain" then
    local n = assert(tonumber(arg[2]), "relay_drain: N")
    local qx = require "qx"
    local db_url, nats_url = os.getenv("QX_DB__URL"), os.getenv("QX_TEST_NATS_URL")
    local admin = assert(qx.connect{ url = db_url, pool_size = 1 })
    local name = "cmp_relay_" .. qx.uuid():gsub("-", ""):sub(-10)
    assert(admin:exec("CREATE SCHEMA " .. name))
    local sep = db_url:find("?", 1, true) and "&" or "?"
    local db = assert(qx.connect{ url = db_url .. sep .. "options=-csearch_path%3D" .. name,
                                  pool_size = 2 })
    assert(qx.migrate(db))
    local conn = assert(qx.nats.connect{ servers = nats_url, stream = name:upper(),
                                         subject_prefix = "cmp." .. name })
    assert(conn:ensure_stream())
    -- rows like relay_bench.lua's, from the bench's shared helper beside this script
    package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
    require("bench_support").fill_outbox(db, n, 16)
    local function pending()
        return db:query("SELECT count(*) AS n FROM qx_outbox_events WHERE published_at IS NULL")[1].n
    end
    local relay = assert(qx.relay{ db = db, nats = conn })
    local clock = require("qx.core").clock
    local c0, t0 = os.clock(), clock()
    relay:run{ on_batch = function(r, e)
        assert(not e, tostring(e))
        if r.claimed < relay.settings.batch_size then return false end
    end }
    while pending() > 0 do assert(relay:run_once()) end
    local dt, dc = clock() - t0, os.clock() - c0
    assert(conn:stream_info().messages == n, "the stream does not hold every event")
    relay:close()
    print(fmt("RELAY %.1f %.2f", n / dt, dc / n * 1e6))
    conn:delete_stream()
    conn:close()
    db:close()
    assert(admin:exec("DROP SCHEMA " .. name .. " CASCADE"))
    admin:close()
    os.exit(0)
end

if MODE ~= "drive" then
    io.stderr:write("usage: lua5.4 bench/compare.lua drive OLD_DIR NEW_DIR ROUNDS OLD_REF NEW_REF\n")
    os.exit(2)
end

-- ---- driver ------------------------------------------------------------------------------------

local HERE = arg[0]:match("^(.*)/[^/]*$") or "."
local ROUNDS = tonumber(arg[4]) or 5
local UOW_N = tonumber(os.getenv("QX_CMP_UOW_N") or "8000")
local SECONDS = tonumber(os.getenv("QX_CMP_SECONDS") or "3")
local RELAY_EVENTS = tonumber(os.getenv("QX_CMP_RELAY_EVENTS") or "20000")
local BASE_URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set")

local function first_line(cmd)
    local p = io.popen(cmd .. " 2>/dev/null")
    local s = p and p:read("*l") or ""
    if p then p:close() end
    return s
end

-- what cmd prints, stdout and stderr together, whether it exited 0, and the CPU seconds (user +
-- system) its processes used, from the shell's `times`
local function run(cmd)
    local p = assert(io.popen("{ " .. cmd .. "; } 2>&1; s=$?; times; exit $s"))
    local out = p:read("*a")
    local ok = p:close()
    local um, us, sm, ss = out:match("\n(%d+)m([%d.]+)s (%d+)m([%d.]+)s%s*$")
    local cpu = um and tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
    return out, ok, cpu
end

local function tail(s, n)
    local lines = {}
    for l in s:gmatch("[^\n]+") do lines[#lines + 1] = l end
    return table.concat(lines, "\n", math.max(1, #lines - n + 1))
end

local function median(xs)
    local s = {}
    for i, v in ipairs(xs) do s[i] = v end
    table.sort(s)
    local n = #s
    if n == 0 then return nil end
    if n % 2 == 1 then return s[(n + 1) / 2] end
    return (s[n / 2] + s[n / 2 + 1]) / 2
end

local trees = {
    { key = "old", dir = arg[2], ref = arg[5] or "old", db = "qx_cmp_old" },
    { key = "new", dir = arg[3], ref = arg[6] or "new", db = "qx_cmp_new" },
}

-- a bench script of a tree, wherever under bench/ that tree keeps it
local function bench_file(tree, name)
    local path = first_line("find " .. sh(tree.dir .. "/bench") .. " -name " .. sh(name) .. " -type f | sort")
    if path == "" then return nil, tree.key .. " tree has no bench script " .. name end
    return path
end

for _, t in ipairs(trees) do
    t.url = url_with_db(BASE_URL, t.db)
    t.env = "env LUA_PATH=" .. sh(t.dir .. "/lua/?.lua;" .. t.dir .. "/lua/?/init.lua;;")
        .. " LUA_CPATH=" .. sh(t.dir .. "/build/lua5.4/?.so;;") .. " QX_DB__URL=" .. sh(t.url)
    local out, ok = run(t.env .. " lua5.4 " .. sh(HERE .. "/compare.lua") .. " setup " .. sh(BASE_URL)
        .. " " .. t.db)
    local tbl, tenant, get_id, save_id, defer_id = out:match("REPO (%S+) (%S+) (%S+) (%S+) (%S+)")
    if not (ok and tbl) then
        io.stderr:write(fmt("compare: setting up the %s tree's database failed:\n%s\n", t.key, tail(out, 20)))
        os.exit(1)
    end
    t.repo_args = table.concat({ tbl, tenant, get_id, save_id, defer_id }, " ")
end

-- Each measure runs one tree's bench script. parse(out, cpu) -> the rate, and the client's CPU
-- microseconds per operation where the bench lets us know it (nil for the relay's throughput
-- round, whose run does more than the relay; relay_cpu has it).
local MEASURES = {
    { key = "uow", label = "unit of work", unit = "tx/s", script = "uow_bench.lua",
      -- qx on Lua 5.4 alone, 1 client, one round; synchronous_commit off, so the figure is the
      -- client's and the server's CPU and round trips rather than the disk's flush
      cmd = function(t, file)
          return t.env .. " UOW_BENCH_ONLY=qx_54 UOW_BENCH_CLIENTS=1 UOW_BENCH_SYNC=off lua5.4 "
              .. sh(file) .. " " .. UOW_N .. " 1"
      end,
      parse = function(out)
          local rate, cpu = out:match("qx, Lua 5%.4%s+([%d.]+) tx/s%s+CPU/tx: client (%d+) us")
          return rate, cpu
      end },
    { key = "append", label = "event store append", unit = "tx/s", script = "event_store_bench.lua",
      -- the bench's own one-client append loop (its worker: a new stream per unit of work, one
      -- event, listeners woken), without the pgbench baselines around it; its CPU is the
      -- process's less that of a run of no seconds (start, connect, model)
      cmd = function(t, file)
          local worker = t.env .. " lua5.4 " .. sh(file) .. " worker "
          return worker .. "0 1 >/dev/null; times; " .. worker .. SECONDS .. " 1"
      end,
      parse = function(out, cpu)
          local um, us, sm, ss, n = out:match("^%s*%d+m[%d.]+s %d+m[%d.]+s%s*\n"
              .. "(%d+)m([%d.]+)s (%d+)m([%d.]+)s%s*\n(%d+)%s*\n")
          n = tonumber(n)
          if not n or n == 0 then return nil end
          local start = tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
          return n / SECONDS, cpu and (cpu - start) / n * 1e6
      end },
    { key = "keyset", label = "repository keyset page", unit = "pages/s", script = "repository_bench.lua",
      -- the bench's qx worker on its "keyset page" operation (a unit of work, the cursor checked
      -- and the next one signed), on the table setup made
      cmd = function(t, file)
          return t.env .. " lua5.4 " .. sh(file) .. " --worker qx " .. SECONDS .. " " .. t.repo_args
              .. " 'keyset page'"
      end,
      parse = function(out) return out:match("keyset page\t([%d.]+)\t([%d.]+)") end },
    { key = "relay", label = "outbox relay", unit = "events/s", script = "relay_bench.lua",
      -- one round of the throughput part; the rate is qx.relay's, marking rows published
      cmd = function(t, file)
          return t.env .. " QX_BENCH_RELAY_EVENTS=" .. RELAY_EVENTS .. " QX_BENCH_ROUNDS=1 lua5.4 "
              .. sh(file) .. " throughput"
      end,
      parse = function(out) return out:match("round 1: raw [%d.]+/s%s+relay ([%d.]+)/s") end },
    { key = "relay_cpu", label = "relay drain", unit = "events/s", here = true,
      -- this tree's driver (relay_drain above) run with each tree's qx: the relay's rate over a
      -- pre-filled outbox and the CPU its process spent per event
      cmd = function(t, file)
          return t.env .. " QX_TEST_NATS_URL=" .. sh(os.getenv("QX_TEST_NATS_URL") or "") .. " lua5.4 "
              .. sh(file) .. " relay_drain " .. RELAY_EVENTS
      end,
      parse = function(out) return out:match("RELAY ([%d.]+) ([%d.]+)") end },
}

if os.getenv("QX_CMP_ONLY") then
    local keep = {}
    for k in os.getenv("QX_CMP_ONLY"):gmatch("[%w_]+") do keep[k] = true end
    for i = #MEASURES, 1, -1 do
        if not keep[MEASURES[i].key] then table.remove(MEASURES, i) end
    end
    if #MEASURES == 0 then
        io.stderr:write("compare: QX_CMP_ONLY names none of uow, append, keyset, relay, relay_cpu\n")
        os.exit(2)
    end
end

local function measure(m, t)
    local file, why
    if m.here then file = HERE .. "/compare.lua" else file, why = bench_file(t, m.script) end
    if not file then return nil, why end
    local out, ok, cpu = run(m.cmd(t, file))
    local rate, per_op
    if ok then rate, per_op = m.parse(out, cpu) end
    if not tonumber(rate) then
        return nil, fmt("%s on the %s tree printed no rate (its interface may differ):\n%s",
                        m.script or m.key, t.key, tail(out, 15))
    end
    return tonumber(rate), tonumber(per_op)
end

-- Every run starts after a CHECKPOINT, with autovacuum off in this throwaway cluster, so that
-- what a run leaves in the server (dirty pages, WAL, vacuum work) is not paid by the next.
local PSQL = sh((os.getenv("QX_TEST_PG_BIN") or "/usr/lib/postgresql/15/bin") .. "/psql")
    .. " -X -q -v ON_ERROR_STOP=1 -d " .. sh(BASE_URL)
do
    local out, ok = run(PSQL .. " -c 'ALTER SYSTEM SET autovacuum = off' -c 'SELECT pg_reload_conf()'")
    if not ok then
        io.stderr:write("compare: cannot turn autovacuum off:\n" .. tail(out, 10) .. "\n")
        os.exit(1)
    end
end
local function settle()
    local out, ok = run(PSQL .. " -c CHECKPOINT")
    if not ok then io.stderr:write("compare: CHECKPOINT failed:\n" .. tail(out, 10) .. "\n") end
end

local function loadavg()
    return first_line("cat /proc/loadavg"):match("^(%S+ %S+ %S+)") or "?"
end

local started, load0 = os.time(), loadavg()
local results, cpus, failures = {}, {}, {}
for _, m in ipairs(MEASURES) do
    results[m.key], cpus[m.key] = { old = {}, new = {} }, { old = {}, new = {} }
end
local function counted(m, t, round, keep)
    settle()
    local t0 = os.time()
    local rate, extra = measure(m, t)
    if keep then
        results[m.key][t.key][round] = rate or false
        cpus[m.key][t.key][round] = rate and extra or false
        if not rate then failures[#failures + 1] = fmt("round %d: %s", round, extra) end
    end
    io.stderr:write(fmt("round %d/%d  %-24s %s %-18s (%d s)%s\n", round, ROUNDS, m.label, t.key,
                        rate and fmt("%.0f %s", rate, m.unit) or "failed", os.time() - t0,
                        keep and "" or "  not counted"))
end

-- The two trees' runs of a measure come back to back, which goes first alternating from round to
-- round, after a run of the second one that is not counted: so each counted run follows a run of
-- the same measure by the other tree. Without it the second of a pair was the slower in 13 append
-- pairs of 16 and the faster in 14 keyset-page pairs of 16 (the first following another measure),
-- which an odd number of rounds does not cancel out of the median.
for round = 1, ROUNDS do
    for _, m in ipairs(MEASURES) do
        local order = round % 2 == 1 and { trees[1], trees[2] } or { trees[2], trees[1] }
        counted(m, order[2], round, false)
        counted(m, order[1], round, true)
        counted(m, order[2], round, true)
    end
end

-- ---- report ------------------------------------------------------------------------------------

local function list(xs, f)
    local out = {}
    for i = 1, ROUNDS do out[i] = xs[i] and f(xs[i]) or "-" end
    return table.concat(out, ", ")
end

local cpu = first_line("grep -m1 'model name' /proc/cpuinfo"):gsub("^model name%s*:%s*", "")
print(fmt("Old tree `%s` against new tree `%s`: %d rounds, the trees taking turns measure by measure "
    .. "(which goes first alternating by round, after an uncounted run of the other).", trees[1].ref,
    trees[2].ref, ROUNDS))
print("")
print(fmt("Machine: %s, %s cores, kernel %s; %s; load average %s before, %s after; %.1f min.", cpu,
    first_line("nproc"), first_line("uname -r"), os.date("!%Y-%m-%d %H:%M UTC", started), load0,
    loadavg(), (os.time() - started) / 60))
print(fmt("Knobs: unit of work %d transactions; append and keyset page %g s each; relay %d events "
    .. "(one throughput round); 1 client, Lua 5.4, synchronous_commit off throughout, autovacuum off, "
    .. "a CHECKPOINT before each run.", UOW_N, SECONDS,
    RELAY_EVENTS))
print("")
-- one table row per measure: both trees' figures by round, the per-round ratio, its median and
-- range; `ratio` turns an old and a new figure into a "speed new/old"; a measure with no figures
-- at all is left out when `skip_empty`
local function table_of(data, unit_of, ratio, head, skip_empty)
    print("| measure | old, per round | new, per round | " .. head .. ", per round | median | spread (min-max) |")
    print("|---|---|---|---|---:|---|")
    for _, m in ipairs(MEASURES) do
        local d = data[m.key]
        local ratios, sorted = {}, {}
        for i = 1, ROUNDS do
            if d.old[i] and d.new[i] then
                ratios[i] = ratio(d.old[i], d.new[i])
                sorted[#sorted + 1] = ratios[i]
            end
        end
        table.sort(sorted)
        local med = median(sorted)
        if #sorted > 0 or not skip_empty then
            print(fmt("| %s (%s) | %s | %s | %s | %s | %s |", m.label, unit_of(m),
                list(d.old, function(v) return fmt(v < 100 and "%.1f" or "%.0f", v) end),
                list(d.new, function(v) return fmt(v < 100 and "%.1f" or "%.0f", v) end),
                list(ratios, function(v) return fmt("%.3f", v) end),
                med and fmt("**%.3f**", med) or "-",
                #sorted > 0 and fmt("%.3f-%.3f", sorted[1], sorted[#sorted]) or "-"))
        end
    end
end

print("Rates:")
print("")
table_of(results, function(m) return m.unit end, function(o, n) return n / o end, "new/old")
print("")
print("Client CPU per operation, as the bench counts it (the append: the worker process less its "
    .. "start; the server's CPU not included): less moved than a rate by what else the machine runs; "
    .. "old/new above 1 means the new tree uses less:")
print("")
table_of(cpus, function() return "us" end, function(o, n) return o / n end, "old/new", true)
if #failures > 0 then
    io.stderr:write("\ncompare: some runs failed:\n" .. table.concat(failures, "\n") .. "\n")
    os.exit(1)
end

-- Outbox relay benchmarks, each beside its baselines in the same run:
--   1. throughput: events/s from a pre-filled outbox until every row is published and the stream
--      holds them all, for
--        - raw nats.c js_PublishAsync of the same messages (bench/relay_bench.c, compiled here)
--        - qx.relay (windowed async publish, batches, two connections: one batch is marked
--          while the next is claimed and published), marking rows published, and with
--          delete_published (deleting them)
--        - a seed-style relay: one publish and one ack at a time, each row marked on its own
--        - `qx relay` processes: one, and two shards
--      taking turns over several rounds (medians reported: the machine may be shared);
--      also one hot partition key (the relay keeps one event of a key unacked at a time)
--   2. latency: commit returned -> a core NATS subscriber has the message, p50/p90/p99, at a
--      steady 1,000 events/s (5 per unit of work) through a `qx relay` process
--
--   lua5.4 bench/relay_bench.lua [throughput] [latency]    (QX_DB__URL, QX_TEST_NATS_URL;
--   QX_BENCH_RELAY_EVENTS events per relay run (default 50000), QX_BENCH_ROUNDS (default 3),
--   QX_BENCH_LATENCY_SECONDS (default 10), QX_BENCH_RATE (default 1000))
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local qx = require "qx"
local core = require "qx.core"

local clock = core.clock
local fmt = string.format
local env = os.getenv

local N = tonumber(env("QX_BENCH_RELAY_EVENTS") or "50000")
local SEED_N = math.max(1000, math.floor(N / 10))
local HOT_N = math.max(1000, math.floor(N / 10))
local ROUNDS = tonumber(env("QX_BENCH_ROUNDS") or "3")
local LAT_SECONDS = tonumber(env("QX_BENCH_LATENCY_SECONDS") or "10")
local RATE = tonumber(env("QX_BENCH_RATE") or "1000")
local KEYS = 1000
local DB_URL = assert(env("QX_DB__URL"), "QX_DB__URL is not set")
local NATS_URL = assert(env("QX_TEST_NATS_URL") or env("QX_NATS__SERVERS"), "no NATS url")

local sh, interpreter, run, median = B.sh, B.interpreter, B.run, B.median

local here = (arg[0]:match("^(.*)/[^/]*$") or ".")
local QX = here .. "/../bin/qx"
local tmpdir = os.tmpname()
os.remove(tmpdir)
assert(os.execute("mkdir -p " .. sh(tmpdir)))
local RAW = tmpdir .. "/relay_bench"

-- ---- a schema and a stream of their own --------------------------------------------------------

local admin = assert(qx.connect{ url = DB_URL, pool_size = 1 })
local made = {}

local function fresh(tag)
    local name = "bench_relay_" .. tag .. "_" .. core.uuid():gsub("-", ""):sub(-10)
    assert(admin:exec("CREATE SCHEMA " .. name))
    local db = assert(qx.connect{ url = DB_URL .. "?options=-csearch_path%3D" .. name, pool_size = 2 })
    assert(qx.migrate(db))
    local conn = assert(qx.nats.connect{ servers = NATS_URL, stream = name:upper(),
                                         subject_prefix = "bench." .. name })
    assert(conn:ensure_stream())
    local ctx = { name = name, db = db, conn = conn }
    made[#made + 1] = ctx
    return ctx
end

local function drop(ctx)
    if ctx.dropped then return end
    ctx.dropped = true
    ctx.conn:delete_stream()
    ctx.conn:close()
    ctx.db:close()
    admin:exec("DROP SCHEMA " .. ctx.name .. " CASCADE")
end

-- n envelopes over `keys` partition keys (bench_support.fill_outbox)
local function fill(ctx, n, keys)
    B.fill_outbox(ctx.db, n, keys)
end

local function pending(ctx)
    return ctx.db:query("SELECT count(*) AS n FROM qx_outbox_events WHERE published_at IS NULL")[1].n
end

-- ---- 1. throughput -------------------------------------------------------------------------------

local function raw_run(body_file, subject, n)
    local out = run(fmt("%s publish %s %s %s %d 1000", RAW, sh(NATS_URL), sh(subject), sh(body_file), n))
    local count, secs = out:match("published (%d+) in ([%d%.]+) s")
    assert(count, out)
    return tonumber(count) / tonumber(secs)
end

local function relay_run(n, keys, delete_published)
    local ctx = fresh("relay")
    fill(ctx, n, keys)
    local relay = assert(qx.relay{ db = ctx.db, nats = ctx.conn, delete_published = delete_published })
    local t0 = clock()
    relay:run{ on_batch = function(r, e)
        assert(not e, tostring(e))
        if r.claimed < relay.settings.batch_size then return false end
    end }
    while pending(ctx) > 0 do assert(relay:run_once()) end
    local dt = clock() - t0
    assert(ctx.conn:stream_info().messages == n, "the stream does not hold every event")
    relay:close()
    -- a sample body for the raw run: what the relay published
    local m = assert(ctx.conn:stream_get(1))
    drop(ctx)
    return n / dt, m
end

-- `shards` relay processes (qx relay --shard-id i --shard-count shards) draining n rows; the
-- time runs from their start until nothing is pending (it includes starting them).
local function sharded_run(n, shards)
    local ctx = fresh("shards")
    fill(ctx, n, KEYS)
    local url = DB_URL .. "?options=-csearch_path%3D" .. ctx.name
    local child_env = "LUA_PATH=" .. sh(package.path) .. " LUA_CPATH=" .. sh(package.cpath)
        .. " QX_DB__URL=" .. sh(url) .. " QX_NATS__SERVERS=" .. sh(NATS_URL)
        .. " QX_NATS__STREAM=" .. sh(ctx.name:upper())
        .. " QX_NATS__SUBJECT_PREFIX=" .. sh(ctx.conn.settings.subject_prefix)
    local sleeper = assert(ctx.db:acquire())
    local pids = {}
    local t0 = clock()
    for i = 0, shards - 1 do
        local p = io.popen(fmt("env %s %s %s relay --shard-id %d --shard-count %d"
            .. " --idle-interval 0.05 >/dev/null 2>&1 & echo $!", child_env, interpreter(), sh(QX), i, shards))
        pids[#pids + 1] = p:read("*l")
        p:close()
    end
    while pending(ctx) > 0 do sleeper:notifications(20) end
    local dt = clock() - t0
    for _, pid in ipairs(pids) do os.execute("kill -TERM " .. pid .. " 2>/dev/null") end
    sleeper:release()
    assert(ctx.conn:stream_info().messages == n)
    drop(ctx)
    return n / dt
end

-- The seed's way: claim a few rows, then for each one publish, wait for the ack, mark it.
local function seed_run(n)
    local ctx = fresh("seed")
    fill(ctx, n, KEYS)
    local conn = assert(ctx.db:acquire())
    local prefix = ctx.conn.settings.subject_prefix
    local t0 = clock()
    local done = 0
    while done < n do
        assert(conn:query("BEGIN"))
        local rows = assert(conn:query([[
SELECT id::text AS id, event_name, payload::text AS body FROM qx_outbox_events
WHERE published_at IS NULL ORDER BY occurred_at LIMIT 100 FOR UPDATE SKIP LOCKED]]))
        for _, r in ipairs(rows) do
            assert(ctx.conn:publish(prefix .. "." .. r.event_name, r.body,
                                    { ["qx.event_name"] = r.event_name }))
            assert(conn:query("UPDATE qx_outbox_events SET published_at = now() WHERE id = $1", r.id))
        end
        assert(conn:query("COMMIT"))
        done = done + #rows
        if #rows == 0 then break end
    end
    local dt = clock() - t0
    conn:release()
    assert(ctx.conn:stream_info().messages == n)
    drop(ctx)
    return n / dt
end

local function throughput()
    print(fmt("== throughput: %d events over %d keys (relay, raw), %d (seed-style), %d on one key; %d rounds",
              N, KEYS, SEED_N, HOT_N, ROUNDS))
    local raw, relay, del, seed, hot, one, two = {}, {}, {}, {}, {}, {}, {}
    local raw_ctx = fresh("raw")
    local body_file = tmpdir .. "/body.json"
    for round = 1, ROUNDS do
        local rate, sample = relay_run(N, KEYS)
        relay[round] = rate
        local f = assert(io.open(body_file, "wb"))
        f:write(sample.data)
        f:close()
        raw[round] = raw_run(body_file, raw_ctx.conn.settings.subject_prefix .. ".bench.thing_happened", N)
        del[round] = relay_run(N, KEYS, true)
        seed[round] = seed_run(SEED_N)
        hot[round] = relay_run(HOT_N, 1)
        one[round] = sharded_run(N, 1)
        two[round] = sharded_run(N, 2)
        print(fmt("round %d: raw %.0f/s  relay %.0f/s (%.2fx raw)  relay delete_published %.0f/s (%.2fx raw)"
                  .. "  seed-style %.0f/s  relay, one key %.0f/s  qx relay processes: 1 %.0f/s, 2 shards %.0f/s",
                  round, raw[round], relay[round], relay[round] / raw[round], del[round],
                  del[round] / raw[round], seed[round], hot[round], one[round], two[round]))
    end
    drop(raw_ctx)
    local mr, ml, md, ms, mh = median(raw), median(relay), median(del), median(seed), median(hot)
    print(fmt("median: raw js_PublishAsync %.0f/s | qx relay %.0f/s = %.2fx raw, %.1fx seed-style"
              .. " | delete_published %.0f/s = %.2fx raw, %.1fx seed-style | seed-style %.0f/s | one hot key %.0f/s",
              mr, ml, ml / mr, ml / ms, md, md / mr, md / ms, ms, mh))
    print(fmt("median: qx relay processes (from their start): 1 %.0f/s, 2 shards %.0f/s (%.2fx)",
              median(one), median(two), median(two) / median(one)))
end

-- ---- 2. latency ------------------------------------------------------------------------------------

local function latency()
    local total = math.floor(LAT_SECONDS * RATE)
    print(fmt("== latency: commit -> subscriber at %d events/s for %d s through a `qx relay` process",
              RATE, LAT_SECONDS))
    local ctx = fresh("latency")
    local url = DB_URL .. "?options=-csearch_path%3D" .. ctx.name
    local base_env = "LUA_PATH=" .. sh(package.path) .. " LUA_CPATH=" .. sh(package.cpath)
        .. " QX_DB__URL=" .. sh(url) .. " QX_NATS__SERVERS=" .. sh(NATS_URL)
        .. " QX_NATS__STREAM=" .. sh(ctx.name:upper())
        .. " QX_NATS__SUBJECT_PREFIX=" .. sh(ctx.conn.settings.subject_prefix)
    local rlog, llog = tmpdir .. "/relay.log", tmpdir .. "/listen.log"
    local p = io.popen("env " .. base_env .. " " .. interpreter() .. " " .. sh(QX) .. " relay >" .. sh(rlog)
        .. " 2>&1 & echo $!")
    local relay_pid = tonumber(p:read("*l"))
    p:close()
    p = io.popen(fmt("%s listen %s %s %d %d >%s 2>&1 & echo $!", RAW, sh(NATS_URL),
                     sh(ctx.conn.settings.subject_prefix .. ".>"), total, LAT_SECONDS + 30, sh(llog)))
    local listen_pid = tonumber(p:read("*l"))
    p:close()
    local sleeper = assert(ctx.db:acquire())
    local function sleep_ms(ms) if ms > 0 then sleeper:notifications(ms) end end
    -- wait for both to be ready
    for _ = 1, 200 do
        local f = io.open(llog)
        local s = f and f:read("*a") or ""
        if f then f:close() end
        local g = io.open(rlog)
        local r = g and g:read("*a") or ""
        if g then g:close() end
        if s:find("listening", 1, true) and r:find("leader", 1, true) then break end
        sleep_ms(50)
    end
    -- PER_TX events per unit of work, RATE events/s; core.clock() is CLOCK_MONOTONIC, as the
    -- listener's clock
    local PER_TX = 5
    local Ev = qx.integration_event("bench.latency_probe", { version = 1 })
    local committed = {}
    local t0 = clock()
    local i = 0
    while i < total do
        local due = t0 + i / RATE
        local now = clock()
        if due > now then sleep_ms(math.floor((due - now) * 1000)) end
        local first = i + 1
        assert(ctx.db:unit_of_work(function(uow)
            for k = first, math.min(first + PER_TX - 1, total) do
                local ev = Ev{ i = k }
                ev.aggregate_type, ev.aggregate_id = "probe", k % 50
                uow:record(ev)
            end
        end))
        local done = clock()
        for k = first, math.min(first + PER_TX - 1, total) do committed[k] = done end
        i = math.min(first + PER_TX - 1, total)
    end
    local took = clock() - t0
    -- wait for the listener to finish
    for _ = 1, 600 do
        local f = io.open(llog)
        local s = f and f:read("*a") or ""
        if f then f:close() end
        if s:find("received", 1, true) then break end
        sleep_ms(100)
    end
    sleeper:release()
    os.execute("kill -TERM " .. relay_pid .. " 2>/dev/null")
    os.execute("kill -TERM " .. listen_pid .. " 2>/dev/null")
    local lat = {}
    for line in io.lines(llog) do
        local k, at = line:match("^(%d+) ([%d%.]+)$")
        k = tonumber(k)
        if k and committed[k] then lat[#lat + 1] = (tonumber(at) - committed[k]) * 1000 end
    end
    table.sort(lat)
    local function pct(q) return lat[math.max(1, math.ceil(#lat * q))] or 0 end
    print(fmt("produced %d events in %.2f s (%.0f/s, %d per transaction)", total, took, total / took,
              PER_TX))
    print(fmt("commit returned -> subscriber got it: %d of %d received, p50 %.2f ms, p90 %.2f ms, "
              .. "p99 %.2f ms, max %.2f ms", #lat, total, pct(0.5), pct(0.9), pct(0.99), pct(1)))
    drop(ctx)
end

-- ---- main ------------------------------------------------------------------------------------------

local build = run(fmt("cc -O2 -Wall -Wextra -o %s %s/relay_bench.c -lnats && echo built", sh(RAW), sh(here)))
assert(build:find("built", 1, true), build)

local function machine()
    local cpu = run("grep -m1 'model name' /proc/cpuinfo"):match(":%s*(.-)%s*$") or "?"
    local mem = run("grep -m1 MemTotal /proc/meminfo"):match("(%d+)")
    print(fmt("machine: %s cores, %s, %.1f GiB RAM, load %s", run("nproc"):match("%d+"), cpu,
              (tonumber(mem) or 0) / 1048576, (run("cat /proc/loadavg"):match("^(%S+ %S+ %S+)"))))
    print("versions: " .. (_VERSION) .. (jit and (" / " .. jit.version) or "") .. ", "
        .. run("nats-server --version"):gsub("%s+$", "") .. ", "
        .. (admin:query("SHOW server_version")[1].server_version) .. ", nats.c "
        .. (run("dpkg-query -W -f='${Version}' libnats-dev 2>/dev/null"):gsub("%s+$", "")))
end

machine()
local which = {}
for _, a in ipairs(arg) do which[a] = true end
local all = next(which) == nil
local ok, e = pcall(function()
    if all or which.throughput then throughput() end
    if all or which.latency then latency() end
end)
for _, ctx in ipairs(made) do pcall(drop, ctx) end
admin:close()
os.execute("rm -rf " .. sh(tmpdir))
if not ok then error(e, 0) end

-- Event store benchmarks, each against a baseline taken in the same run:
--   1. append, 1 event per transaction (a unit of work that only writes: BEGIN, the append
--      insert, COMMIT and the wake-up of listeners in one round trip) vs pgbench executing the
--      same insert, and vs pgbench sending what the unit of work sends; 1, 2 and 4 clients
--   2. load of a 10,000-event aggregate without and with a snapshot
--   3. read_all over 1,000,000 events, batch by batch, with the process's RSS along the way,
--      vs the same keyset query through the binding without making records
--
--   lua5.4 bench/event_store_bench.lua [append|load|read ...]   (QX_DB__URL, PostgreSQL bin
--   from QX_TEST_PG_BIN; QX_BENCH_SECONDS per append run, default 3; QX_BENCH_ROUNDS, default 5;
--   QX_BENCH_EVENTS for the read, default 1000000, written once and kept for later runs)
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local qx = require "qx"
local core = require "qx.core"
local es_mod = require "qx.store.event_store"

local clock = core.clock
local fmt = string.format
local env = os.getenv

local SECONDS = tonumber(env("QX_BENCH_SECONDS") or "3")
local READ_EVENTS = tonumber(env("QX_BENCH_EVENTS") or "1000000")
local PG_BIN = env("QX_TEST_PG_BIN") or "/usr/lib/postgresql/15/bin"

local sh, interpreter, median = B.sh, B.interpreter, B.median

local function rss_kb()
    local f = io.open("/proc/self/status")
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function model(db, notify)
    local Deposited = qx.event("bench.money_deposited")
    local Account = qx.event_sourced("BenchAccount")
    Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
    return {
        Deposited = Deposited,
        Account = Account,
        store = qx.event_store{ db = db, notify = notify, snapshot_every = 0 },
    }
end

-- One client appending for `seconds`: a new stream per transaction, as pgbench does below.
local function append_loop(db, seconds, notify)
    local m = model(db, notify)
    local n = 0
    local stop = clock() + seconds
    while clock() < stop do
        assert(db:unit_of_work(function(uow)
            local acc = m.Account.new(qx.uuid())
            acc:record(m.Deposited{ amount = 10, note = "bench deposit", reference = "INV-0001" })
            assert(uow:store(m.store):append(acc))
        end))
        n = n + 1
    end
    return n
end

-- worker mode: `lua bench/event_store_bench.lua worker SECONDS NOTIFY` prints its count
if arg[1] == "worker" then
    local db = assert(qx.connect{ pool_size = 1 })
    print(append_loop(db, tonumber(arg[2]), arg[3] == "1"))
    db:close()
    return
end

local function pgbench(script, clients, seconds)
    local file = os.tmpname()
    local f = assert(io.open(file, "w"))
    f:write(script)
    f:close()
    local cmd = fmt("%s -n -M prepared -c %d -j %d -T %d -f %s %s 2>&1", sh(PG_BIN .. "/pgbench"),
                    clients, clients, seconds, sh(file), sh(env("QX_DB__URL")))
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    os.remove(file)
    local tps = tonumber(out:match("tps = ([%d%.]+) %(without initial connection time%)")
                        or out:match("tps = ([%d%.]+)"))
    assert(tps, "pgbench failed:\n" .. out)
    return tps
end

-- The append statement of the event store with its one parameter replaced by the same kind of
-- JSON text, built by the server for each transaction. `transaction` sends it the way a unit of
-- work that only writes does: BEGIN, the insert, COMMIT and the wake-up in one pipeline.
local function pgbench_script(transaction)
    local Q = "'"
    local expr = "(" .. Q .. '[{"type":"BenchPgbench","agg":"' .. Q .. " || gen_random_uuid() || "
        .. Q .. '","seq":1,"event":{"event_id":"' .. Q .. " || gen_random_uuid() || " .. Q
        .. '","event_name":"bench.money_deposited","event_version":1,'
        .. '"occurred_at":"2026-11-22T04:13:56.123456Z","correlation_id":"' .. Q
        .. " || gen_random_uuid() || " .. Q .. '","amount":10,"note":"bench deposit",'
        .. '"reference":"INV-0001"}}]' .. Q .. ")::jsonb"
    local sql = es_mod.APPEND_SQL:gsub("%$1::jsonb", function() return expr end):gsub("\n", " ")
    if not transaction then
        return sql .. ";\n"
    end
    return "\\startpipeline\nBEGIN;\n" .. sql .. ";\nCOMMIT;\n"
        .. "SELECT FROM (SELECT set_config('synchronous_commit', 'off', true), "
        .. "pg_notify('qx_events', '') OFFSET 1) AS s;\n"
        .. "\\endpipeline\n"
end

local function machine()
    local function first(cmd)
        local p = io.popen(cmd)
        local s = p and p:read("*l") or ""
        if p then p:close() end
        return s
    end
    local cpu = first("grep -m1 'model name' /proc/cpuinfo"):gsub("^model name%s*:%s*", "")
    local mem = first("grep MemTotal /proc/meminfo"):gsub("%s+", " ")
    return {
        nproc = first("nproc"),
        cpu = cpu,
        mem = mem,
        load = first("cat /proc/loadavg"),
        pg = first(sh(PG_BIN .. "/postgres") .. " --version"),
        lua = (jit and jit.version) or _VERSION,
    }
end

-- qx appends for SECONDS with `clients` processes (1: this one) -> transactions per second
local function qx_tps(db, clients, notify)
    local n = 0
    if clients == 1 then
        n = append_loop(db, SECONDS, notify)
    else
        local pipes = {}
        for c = 1, clients do
            pipes[c] = assert(io.popen(fmt("%s %s worker %d %s", sh(interpreter()), sh(arg[0]),
                                           SECONDS, notify and "1" or "0")))
        end
        for c = 1, clients do
            n = n + assert(tonumber(pipes[c]:read("*a")), "worker failed")
            pipes[c]:close()
        end
    end
    return n / SECONDS
end

-- Rounds alternate the baselines and qx, so that a machine busy with other work weighs on all
-- of them; each ratio reported is the median of the rounds' ratios. Baselines: pgbench running
-- the insert alone (autocommit: the target), and pgbench sending what the unit of work sends
-- (BEGIN, the insert, COMMIT and the wake-up after it, pipelined).
local function bench_append(db)
    local rounds = tonumber(env("QX_BENCH_ROUNDS") or "5")
    print(("-- append: 1 event per transaction, new stream each; %d rounds of %d s, runs "
           .. "alternating"):format(rounds, SECONDS))
    local single, tx = pgbench_script(false), pgbench_script(true)
    for _, clients in ipairs({ 1, 2, 4 }) do
        local b1, b2, q1, q2, r1, r2, r3 = {}, {}, {}, {}, {}, {}, {}
        for i = 1, rounds do
            -- every other round qx goes first: what a run leaves behind in the server (WAL to
            -- flush, autovacuum woken by the inserts) then weighs on each side as often
            if i % 2 == 1 then
                b1[i] = pgbench(single, clients, SECONDS)
                q1[i] = qx_tps(db, clients, true)
                b2[i] = pgbench(tx, clients, SECONDS)
                q2[i] = qx_tps(db, clients, false)
            else
                q1[i] = qx_tps(db, clients, true)
                b1[i] = pgbench(single, clients, SECONDS)
                q2[i] = qx_tps(db, clients, false)
                b2[i] = pgbench(tx, clients, SECONDS)
            end
            r1[i], r2[i], r3[i] = q1[i] / b1[i], q2[i] / b1[i], q1[i] / b2[i]
        end
        local function spread(t)
            local c = {}
            for i, v in ipairs(t) do c[i] = v end
            table.sort(c)
            return fmt("%.2f-%.2f", c[1], c[#c])
        end
        print(fmt("clients %d  pgbench insert %6.0f tps | pgbench as qx sends it %6.0f tps | "
                  .. "qx %6.0f tps (%.2fx insert [rounds %s], %.2fx as sent) | "
                  .. "qx notify=false %6.0f tps (%.2fx insert [rounds %s])", clients, median(b1),
                  median(b2), median(q1), median(r1), spread(r1), median(r3), median(q2),
                  median(r2), spread(r2)))
    end
end

local function bench_load(db)
    print("-- load of a 10,000-event aggregate")
    local m = model(db, false)
    local id = qx.uuid()
    -- 10,000 events written as the store writes them (one insert, sequences 1..10000)
    assert(db:unit_of_work(function(uow)
        local acc = m.Account.new(id)
        for _ = 1, 10000 do acc:record(m.Deposited{ amount = 1 }) end
        assert(uow:store(m.store):append(acc))
    end))
    -- a snapshot 25 events before the end, so the tail is replayed
    assert(db:exec([[
INSERT INTO qx_aggregate_snapshots (id, aggregate_type, aggregate_id, state, version, state_version)
VALUES ($1, 'BenchAccount', $2, '{"balance": 9975}', 9975, 1)]], qx.uuid(), id))
    local function time_load(opts, runs)
        local times = {}
        local acc
        for i = 1, runs do
            local t0 = clock()
            acc = assert(db:unit_of_work(function(uow)
                return uow:store(m.store):load(m.Account, id, opts)
            end))
            times[i] = clock() - t0
        end
        table.sort(times)
        assert(acc.version == 10000 and acc.balance == 10000, "wrong state loaded")
        return times[math.floor((runs + 1) / 2)]
    end
    time_load({ snapshot = false }, 2) -- warm up
    local full = time_load({ snapshot = false }, 9)
    local snap = time_load(nil, 51)
    print(fmt("without snapshot %8.2f ms   with snapshot (25-event tail) %6.2f ms   ratio %.0fx",
              full * 1000, snap * 1000, full / snap))
    return { full_ms = full * 1000, snap_ms = snap * 1000 }
end

local function bench_read(db)
    print(fmt("-- read_all over %d events", READ_EVENTS))
    local t = "BenchRead"
    local have = assert(db:query([[
SELECT count(*) AS n FROM qx_aggregate_events WHERE aggregate_type = $1]], t))[1].n
    if have < READ_EVENTS then
        local t0 = clock()
        local step = 20000
        local left = READ_EVENTS - have
        while left > 0 do
            local k = math.min(step, left)
            -- k one-event streams per transaction, shaped like the store's rows
            assert(db:exec([[
INSERT INTO qx_aggregate_events
    (id, aggregate_type, aggregate_id, sequence, event_type, event_name, payload, occurred_at)
SELECT u, $1, u::text, 1, 'bench.money_deposited', 'bench.money_deposited',
       jsonb_build_object('event_id', u, 'event_name', 'bench.money_deposited',
                          'event_version', 1, 'occurred_at', '2026-11-22T04:13:56.123456Z',
                          'correlation_id', gen_random_uuid(), 'amount', g,
                          'note', 'bench deposit', 'reference', 'INV-0001'),
       now()
FROM (SELECT gen_random_uuid() AS u, g FROM generate_series(1, $2) g) s]], t, k))
            left = left - k
        end
        print(fmt("(wrote %d events in %.1f s)", READ_EVENTS - have, clock() - t0))
    end
    local vc = assert(db:acquire())
    assert(vc:script("VACUUM ANALYZE qx_aggregate_events"))
    vc:release()
    local store = qx.event_store{ db = db }
    local results = {}
    for _, limit in ipairs({ 1000, 5000 }) do
        collectgarbage()
        local rss0, peak = rss_kb(), 0
        local n, cp = 0, nil
        local t0 = clock()
        local sum = 0
        while true do
            local recs
            recs, cp = assert(store:read_all{ after = cp, limit = limit, aggregate_type = t })
            for i = 1, #recs do sum = sum + recs[i].amount end
            n = n + #recs
            if n % 100000 < limit then
                local r = rss_kb()
                if r > peak then peak = r end
            end
            if #recs < limit then break end
        end
        local secs = clock() - t0
        -- baseline: the same keyset query through the binding, rows as they come, no records
        local conn = assert(db:acquire())
        local b0 = clock()
        local bn, tx, pos = 0, "0", "0"
        while true do
            local rows = assert(conn:query([[
SELECT e.tx_id::text AS tx_id, e.global_position::text AS pos, e.payload
FROM qx_aggregate_events e
WHERE e.aggregate_type = $1 AND (e.tx_id, e.global_position) > ($2::xid8, $3::bigint)
  AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY e.tx_id, e.global_position LIMIT $4]], t, tx, pos, limit))
            bn = bn + #rows
            if #rows < limit then break end
            tx, pos = rows[#rows].tx_id, rows[#rows].pos
        end
        conn:release()
        local bsecs = clock() - b0
        assert(n == bn and n >= READ_EVENTS, "read " .. n .. ", baseline " .. bn)
        results[#results + 1] = { limit = limit, rate = n / secs, base = bn / bsecs,
                                  rss0 = rss0, peak = peak }
        print(fmt("limit %5d  read_all %8.0f events/s   baseline query %8.0f rows/s   ratio %.2f"
                  .. "   RSS %d MB at start, peak %d MB", limit, n / secs, bn / bsecs,
                  (n / secs) / (bn / bsecs), math.floor(rss0 / 1024), math.floor(peak / 1024)))
    end
    return results
end

local db = assert(qx.connect{ pool_size = 2 })
assert(qx.migrate(db))
local m = machine()
print(fmt("machine: %s CPUs, %s, %s; load %s", m.nproc, m.cpu, m.mem, m.load))
print(fmt("%s; %s", m.pg, m.lua))
local parts = {}
for i = 1, #arg do parts[arg[i]] = true end
if next(parts) == nil then parts = { append = true, load = true, read = true } end
if parts.append then bench_append(db) end
if parts.load then bench_load(db) end
if parts.read then bench_read(db) end
db:close()

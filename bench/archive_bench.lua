-- Archived streams: what a large archived part costs the hot path, each figure a ratio against
-- a baseline measured in the same run, in schemas of their own with the same data:
--   base      qx_aggregate_events holds every stream, the archive guard trigger disabled (the
--             event store as it was before archiving existed)
--   hot       the same, the guard trigger on (its cost alone)
--   archived  the same streams, the dead ones archived (their events moved to the archive)
-- Measures, round after round, the three schemas alternating (which first rotating by round):
--   append    a unit of work that loads a live stream (20+ events), records one event, appends
--   load      a unit of work that loads a live stream
--   read      read_all of the last 500 events (the global read takes the union of both tables)
-- and once: the shared buffers each statement touches (EXPLAIN ANALYZE BUFFERS: the append's
-- insert with its triggers, the load, the read), the time store:archive takes per stream, the
-- hot table's rows and size on disk.
-- Synchronous commit is off, so that the flush time of a shared disk does not count.
--
--   lua5.4 bench/archive_bench.lua   (QX_DB__URL; QX_BENCH_SECONDS per measure and schema,
--   default 2; QX_BENCH_ROUNDS, default 5; QX_BENCH_DEAD_STREAMS, default 5000, and
--   QX_BENCH_LIVE_STREAMS, default 1000, of 20 events each)
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local qx = require "qx"
local core = require "qx.core"
local es_mod = require "qx.store.event_store"

local clock = core.clock
local fmt = string.format
local env = os.getenv
local median = B.median

local SECONDS = tonumber(env("QX_BENCH_SECONDS") or "2")
local ROUNDS = tonumber(env("QX_BENCH_ROUNDS") or "5")
local DEAD = tonumber(env("QX_BENCH_DEAD_STREAMS") or "5000")
local LIVE = tonumber(env("QX_BENCH_LIVE_STREAMS") or "1000")
local PER_STREAM = 20
local URL = assert(env("QX_DB__URL"), "QX_DB__URL")

local Deposited = qx.event("bench.archive_deposited")
local Account = qx.event_sourced("BenchArchiveAccount")
Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)

-- n streams of PER_STREAM events of the given type, written by the server in one statement
-- (through the same triggers as every append)
local FILL = [[
INSERT INTO qx_aggregate_events (id, aggregate_type, aggregate_id, sequence, event_type,
                                 event_name, payload)
SELECT x.eid, $1, x.id, x.q, 'bench.archive_deposited', 'bench.archive_deposited',
       jsonb_build_object('event_id', x.eid::text, 'event_name', 'bench.archive_deposited',
                          'event_version', 1, 'occurred_at',
                          to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                          'amount', 1, 'note', 'bench deposit', 'reference', 'INV-0001')
FROM (SELECT s.g, s.id, q, gen_random_uuid() AS eid
      FROM (SELECT g, qx_uuid_v7()::text AS id FROM generate_series(1, $2::int) g) s,
           generate_series(1, $3::int) q) x
ORDER BY x.g, x.q]]

local function schema_db(name)
    local admin = assert(qx.connect{ url = URL, pool_size = 1 })
    assert(admin:exec("DROP SCHEMA IF EXISTS " .. name .. " CASCADE"))
    assert(admin:exec("CREATE SCHEMA " .. name))
    admin:close()
    local db = assert(qx.connect{ url = URL .. "?options=-csearch_path%3D" .. name
                                      .. "%20-csynchronous_commit%3Doff",
                                  pool_size = 2, statement_timeout_ms = 0 })
    assert(qx.migrate(db))
    return db
end

-- Through a connection of its own that plans each statement of the triggers afresh: a plan
-- the session cached while the table was empty would otherwise serve the whole fill.
local function fill(name, agg_type, streams)
    local db = assert(qx.connect{ url = URL .. "?options=-csearch_path%3D" .. name
                                      .. "%20-cplan_cache_mode%3Dforce_custom_plan",
                                  pool_size = 1, statement_timeout_ms = 0 })
    for done = 0, streams - 1, 1000 do
        assert(db:query(FILL, agg_type, math.min(1000, streams - done), PER_STREAM))
    end
    db:close()
end

-- the ids of the type's streams in the hot table, less those of `but` (a set)
local function ids_of(db, agg_type, but)
    local rows = assert(db:query("SELECT DISTINCT aggregate_id FROM qx_aggregate_events "
                                 .. "WHERE aggregate_type = $1", agg_type))
    local ids, set = {}, {}
    for _, r in ipairs(rows) do
        if not (but and but[r.aggregate_id]) then
            ids[#ids + 1] = r.aggregate_id
            set[r.aggregate_id] = true
        end
    end
    return ids, set
end

local function size(db, tbl)
    return assert(db:query("SELECT pg_total_relation_size($1::regclass) AS b, "
                           .. "(SELECT count(*) FROM " .. tbl .. ") AS n", tbl))[1]
end

-- the checkpoint 500 events before the end of the global order (both tables)
local function tail_checkpoint(db)
    local r = assert(db:query([[
SELECT tx_id::text AS tx, global_position AS pos FROM (
    SELECT tx_id, global_position FROM qx_aggregate_events
    UNION ALL SELECT tx_id, global_position FROM qx_aggregate_events_archive) e
ORDER BY tx_id DESC, global_position DESC OFFSET 500 LIMIT 1]]))[1]
    return es_mod.encode_checkpoint(r.tx, tostring(r.pos))
end

local schemas = {}
local archive_seconds, archived_streams
for _, name in ipairs({ "base", "hot", "archived" }) do
    io.stderr:write("setting up ", name, "...\n")
    local sname = "qxbench_archive_" .. name
    local db = schema_db(sname)
    local s = { name = name, db = db, store = qx.event_store{ db = db, snapshot_every = 0 } }
    if name == "base" then
        assert(db:exec("ALTER TABLE qx_aggregate_events "
                       .. "DISABLE TRIGGER qx_aggregate_events_archived_guard"))
    end
    -- dead and live streams are of one type, so that the statistics know it
    fill(sname, "BenchArchiveAccount", DEAD)
    local dead, dead_set = ids_of(db, "BenchArchiveAccount")
    if name == "archived" then
        local t0 = clock()
        for _, id in ipairs(dead) do assert(s.store:archive("BenchArchiveAccount", id)) end
        archive_seconds, archived_streams = clock() - t0, #dead
    end
    -- VACUUM (as autovacuum would): the space the moved rows held is reused by new events
    assert(db:exec("VACUUM ANALYZE qx_aggregate_events"))
    assert(db:exec("VACUUM ANALYZE qx_aggregate_events_archive"))
    fill(sname, "BenchArchiveAccount", LIVE)
    assert(db:exec("VACUUM ANALYZE qx_aggregate_events"))
    s.live = ids_of(db, "BenchArchiveAccount", dead_set)
    s.tail = tail_checkpoint(db)
    s.hot = size(db, "qx_aggregate_events")
    s.archive = size(db, "qx_aggregate_events_archive")
    s.rates = { append = {}, load = {}, read = {} }
    schemas[#schemas + 1] = s
end

local function run(s, what)
    local db, store, live = s.db, s.store, s.live
    local n = 0
    local stop = clock() + SECONDS
    while clock() < stop do
        local id = live[math.random(#live)]
        if what == "append" then
            assert(db:unit_of_work(function(uow)
                local es = uow:store(store)
                local acc = assert(es:load(Account, id))
                acc:record(Deposited{ amount = 1, note = "bench deposit", reference = "INV-0001" })
                assert(es:append(acc))
            end))
        elseif what == "load" then
            assert(db:unit_of_work(function(uow)
                assert(uow:store(store):load(Account, id))
            end))
        else
            local recs = assert(store:read_all{ after = s.tail, limit = 500 })
            assert(#recs == 500)
        end
        n = n + 1
    end
    return n / SECONDS
end

-- Shared buffers a statement touches (hit + read, triggers' included), from EXPLAIN (ANALYZE,
-- BUFFERS): a figure the load of a shared machine does not move.
local es_sql = require "qx.store.event_store.sql"
local function buffers(db, sql, ...)
    local rows = assert(db:query("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " .. sql, ...))
    local top = rows[1]["QUERY PLAN"][1]
    local plan = top.Plan
    local n = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    for _, t in ipairs(top.Triggers or {}) do
        n = n + (t["Shared Hit Blocks"] or 0) + (t["Shared Read Blocks"] or 0)
    end
    return n
end

-- the append's insert of one event (in a transaction rolled back after)
local function append_buffers(s, id)
    local n
    s.db:unit_of_work(function(uow)
        local v = assert(uow:query("SELECT max(sequence) AS v FROM qx_aggregate_events "
                                   .. "WHERE aggregate_type = $1 AND aggregate_id = $2",
                                   "BenchArchiveAccount", id))[1].v
        local rows = { { type = "BenchArchiveAccount", agg = id, seq = v + 1, event = {
            event_id = qx.uuid(), event_name = "bench.archive_deposited", event_version = 1,
            occurred_at = core.now(), amount = 1 } } }
        local plan = assert(uow:query("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
                                      .. es_sql.APPEND_SQL, assert(core.json_encode(rows))))
        plan = plan[1]["QUERY PLAN"][1].Plan
        n = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        error({ code = "rolled_back", message = "measured only" })
    end)
    return n
end

-- the least of 5 (the first ones of a connection also read the catalogs)
for _, s in ipairs(schemas) do
    local id = s.live[1]
    local tx, pos = es_mod.decode_checkpoint(s.tail)
    s.append_buffers, s.load_buffers, s.read_buffers = math.huge, math.huge, math.huge
    for _ = 1, 5 do
        s.append_buffers = math.min(s.append_buffers, append_buffers(s, id))
        s.load_buffers = math.min(s.load_buffers, buffers(s.db, es_sql.LOAD,
            "BenchArchiveAccount", id, false, nil, nil))
        s.read_buffers = math.min(s.read_buffers, buffers(s.db, es_sql.read_sql(nil, nil), tx,
            pos, nil, nil, nil, 500))
    end
end

local MEASURES = { "append", "load", "read" }
for round = 1, ROUNDS do
    for _, what in ipairs(MEASURES) do
        for k = 0, #schemas - 1 do
            local s = schemas[(round + k - 1) % #schemas + 1]
            s.rates[what][round] = run(s, what)
        end
    end
    io.stderr:write("round ", round, " done\n")
end

local function ratios(a, b)
    local r = {}
    for i = 1, #a do r[i] = a[i] / b[i] end
    table.sort(r)
    return r
end

local by = {}
for _, s in ipairs(schemas) do by[s.name] = s end
print(fmt("%d dead streams and %d live ones of %d events each; %d rounds of %g s per measure "
          .. "and schema", DEAD, LIVE, PER_STREAM, ROUNDS, SECONDS))
print("")
print("| measure | base /s | hot (guard) /s | archived /s | hot/base | archived/base |")
print("|---|---|---|---|---|---|")
for _, what in ipairs(MEASURES) do
    local rh = ratios(by.hot.rates[what], by.base.rates[what])
    local ra = ratios(by.archived.rates[what], by.base.rates[what])
    print(fmt("| %s | %.0f | %.0f | %.0f | %.2f [%.2f-%.2f] | %.2f [%.2f-%.2f] |", what,
              median(by.base.rates[what]), median(by.hot.rates[what]),
              median(by.archived.rates[what]), median(rh), rh[1], rh[#rh], median(ra), ra[1],
              ra[#ra]))
end
print("")
print("| schema | hot rows | hot size (MB) | archive rows | archive size (MB) |")
print("|---|---|---|---|---|")
for _, s in ipairs(schemas) do
    print(fmt("| %s | %d | %.1f | %d | %.1f |", s.name, s.hot.n, s.hot.b / 1048576, s.archive.n,
              s.archive.b / 1048576))
end
print("")
print("| schema | append of 1 event: buffers | load of a 20-event stream | read_all of 500 events |")
print("|---|---|---|---|")
for _, s in ipairs(schemas) do
    print(fmt("| %s | %d | %d | %d |", s.name, s.append_buffers, s.load_buffers, s.read_buffers))
end
print("")
print(fmt("store:archive: %d streams of %d events in %.1f s (%.2f ms a stream)", archived_streams,
          PER_STREAM, archive_seconds, archive_seconds * 1000 / archived_streams))

for _, s in ipairs(schemas) do
    assert(s.db:exec("DROP SCHEMA qxbench_archive_" .. s.name .. " CASCADE"))
    s.db:close()
end

-- Consumer throughput: events pre-published to a stream of their own, then consumed until every
-- one is answered, in four ways side by side in one run:
--
--   raw       fetch + ack through the binding: no decoding, no handler (the baseline)
--   consumer  qx.consumer without a database: JSON -> registry -> event, a handler that does
--             nothing, ack
--   uow       qx.consumer with a database, inbox off: one unit of work per message whose handler
--             queues one INSERT
--   inbox     the same with the inbox: the (consumer, event id) row first, then the handler
--   batch     the same handler and inbox with commit = "batch": one unit of work per fetched
--             batch of 100 (the inbox rows in one statement, a savepoint per message)
--   and, for scale, the same unit of work per message without NATS (the database's share)
--
-- Environment: QX_DB__URL, QX_TEST_NATS_URL (or QX_NATS__SERVERS); QX_BENCH_CONSUMER_N messages
-- for raw/consumer/batch (default 20000), QX_BENCH_CONSUMER_DB_N for uow/inbox (default 5000).
local qx = require "qx"
local core = require "qx.core"
local cjson = require "cjson"

local clock = core.clock
local N = tonumber(os.getenv("QX_BENCH_CONSUMER_N")) or 20000
local DB_N = tonumber(os.getenv("QX_BENCH_CONSUMER_DB_N")) or 5000
local BATCH = 100

local db = assert(qx.connect{ pool_size = 2 })
assert(qx.migrate(db))
local conn = assert(qx.nats.connect{
    servers = os.getenv("QX_TEST_NATS_URL") or os.getenv("QX_NATS__SERVERS") })

local tag = core.uuid():sub(-12)
local stream = "BENCH_CONSUMER_" .. tag:upper()
local prefix = "bench_consumer_" .. tag
local effects = "bench_consumer_effects_" .. tag
assert(conn:ensure_stream{ name = stream, subjects = { prefix .. ".>" } })
assert(db:exec("CREATE TABLE " .. effects .. " (event_id uuid PRIMARY KEY, n int)"))

local Placed = qx.integration_event("bench.order_placed", { version = 1 })
local registry = qx.registry{ Placed }
local pub = assert(qx.publisher{ nats = conn, subject_prefix = prefix })

local t0 = clock()
for i = 1, N do
    assert(pub:publish(Placed{ n = i, order = "order-" .. i, total = i * 1.5,
                               correlation_id = core.uuid() }))
end
local publish_s = clock() - t0
local sample = cjson.encode(Placed{ n = 1, order = "order-1", total = 1.5,
                                    correlation_id = core.uuid() }:envelope())

local function consumer(durable, opts)
    local o = { nats = conn, stream = stream, durable = durable .. "_" .. tag, registry = registry,
                batch = BATCH, fetch_timeout_ms = 2000 }
    for k, v in pairs(opts or {}) do o[k] = v end
    return assert(qx.consumer(o))
end

local results = {}
local function report(name, count, seconds)
    local rate = count / seconds
    results[#results + 1] = { name = name, count = count, seconds = seconds, rate = rate }
end

-- raw: the binding alone
do
    local c = consumer("raw")
    local h = c.handle
    local got = 0
    local t = clock()
    while got < N do
        local msgs = assert(h:fetch(BATCH, 2000))
        assert(#msgs > 0, "stream ran dry at " .. got)
        for i = 1, #msgs do assert(msgs[i]:ack()) end
        got = got + #msgs
    end
    report("raw fetch + ack", got, clock() - t)
    c:close()
end

-- consumer, no database
do
    local c = consumer("consumer")
    local t = clock()
    local totals = assert(c:run(function() end, { max_messages = N }))
    assert(totals.handled == N, "handled " .. totals.handled)
    report("qx.consumer, no db", N, clock() - t)
    c:close()
end

local insert = "INSERT INTO " .. effects .. " (event_id, n) VALUES ($1, $2) ON CONFLICT DO NOTHING"
local function handler(ev, uow)
    uow:queue(insert, ev.event_id, ev.n)
end

-- the database part alone, for scale: the same unit of work per message without NATS
do
    local t = clock()
    for i = 1, DB_N do
        local ev = { event_id = core.uuid(), n = i }
        assert(db:unit_of_work(function(uow) handler(ev, uow) end))
    end
    report("unit of work alone (no NATS)", DB_N, clock() - t)
end

-- database, inbox off / on
for _, mode in ipairs({ { "uow", false }, { "inbox", true } }) do
    local c = consumer(mode[1], { db = db, inbox = mode[2] })
    local t = clock()
    local totals = assert(c:run(handler, { max_messages = DB_N }))
    assert(totals.handled == DB_N, "handled " .. totals.handled)
    report(mode[2] and "qx.consumer + db, inbox" or "qx.consumer + db, no inbox", DB_N, clock() - t)
    c:close()
end

-- database, inbox, commit = "batch"
do
    assert(db:exec("TRUNCATE " .. effects)) -- inserts, as in the other modes, not conflicts
    local c = consumer("batch", { db = db, commit = "batch" })
    local t = clock()
    local totals = assert(c:run(handler, { max_messages = N }))
    assert(totals.handled == N, "handled " .. totals.handled)
    report("qx.consumer + db, inbox, batch", N, clock() - t)
    c:close()
end

local base = results[1].rate
print(("consumer bench: %d messages (%d with a db), batch %d, body %d bytes, published at %.0f msg/s")
    :format(N, DB_N, BATCH, #sample, N / publish_s))
for _, r in ipairs(results) do
    print(("  %-28s %8.0f msg/s  (%.2fx raw)  %d in %.2f s")
        :format(r.name, r.rate, r.rate / base, r.count, r.seconds))
end
local alone, uow_rate, inbox_rate = results[3].rate, results[4].rate, results[5].rate
print(("  with a db: %.2fx the unit of work alone; the inbox keeps %.0f%% of the no-inbox rate")
    :format(uow_rate / alone, inbox_rate / uow_rate * 100))
local batch_rate = results[6].rate
print(("  commit = \"batch\" (batch %d): %.1fx one unit of work per message with the inbox,"
       .. " %.2fx raw fetch + ack"):format(BATCH, batch_rate / inbox_rate, batch_rate / base))

conn:delete_stream(stream)
db:exec("DROP TABLE " .. effects)
db:exec("DELETE FROM qx_inbox WHERE consumer = $1", "inbox_" .. tag)
db:exec("DELETE FROM qx_inbox WHERE consumer = $1", "batch_" .. tag)
conn:close()
db:close()

-- What serving /metrics and /health costs a runner's loop (docs/cli.md, "Metrics and health").
--
-- A loop of turns, each a fixed piece of Lua work (a JSON encoding, ~tens of microseconds), run
-- for DURATION seconds in three ways, rounds interleaved:
--   baseline   no server
--   served     a metrics server, tick() every turn (a heartbeat; once a second a relay-sized
--              Prometheus text made and handed over)
--   scraped    as served, while wrk scrapes /metrics back to back over one connection
-- Ratios are turns/s against the baseline of the same round. The cost of one scrape to the
-- loop is the scraped run's extra time over the served run's, divided by the scrapes answered
-- (an upper bound: on a small machine wrk and the server thread take CPU from the loop too).
--   lua5.4 bench/metrics_bench.lua [DURATION=3] [ROUNDS=3]
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local core = require "qx.core"
local relay = require "qx.messaging.relay"
local metrics_server = require "qx.metrics_server"

local DURATION = tonumber(arg[1]) or 3
local ROUNDS = tonumber(arg[2]) or 3
local clock = core.clock

local doc = { id = core.uuid(), items = {} }
for i = 1, 20 do doc.items[i] = { n = i, name = "item " .. i, price = i * 1.5 } end

local stats = { published = 123456, duplicates = 12, failed = 3, dead_lettered = 1, held = 0,
                batches = 4567, errors = 2, leader = true, last_batch_at = os.time(),
                shard_id = 0, shard_count = 1, nats = { state = "connected", reconnects = 1 } }
local outbox = { pending = 10, scheduled = 1, dead = 2, published = 100000,
                 oldest_pending_age_seconds = 0.25, max_attempts = 3 }
local function text()
    stats.published = stats.published + 1
    return relay.outbox_metrics(outbox) .. relay.relay_metrics(stats)
end

-- turns for DURATION seconds -> turns, seconds
local function loop(server)
    local n, t0 = 0, clock()
    local deadline = t0 + DURATION
    while true do
        for _ = 1, 20 do
            assert(core.json_encode(doc))
            n = n + 1
            if server then server:tick(true) end
        end
        if clock() >= deadline then break end
    end
    return n, clock() - t0
end

local function start()
    return assert(metrics_server.start({ metrics_listen = "127.0.0.1:0" }, "bench", 5000, text))
end

local rows = {}
for round = 1, ROUNDS do
    local bn, bt = loop(nil)
    local s = start()
    local sn, st = loop(s)
    s:close()
    s = start()
    local out = os.tmpname()
    os.execute(("wrk -t1 -c1 -d%ds http://127.0.0.1:%d/metrics > %s 2>&1 &")
        :format(math.ceil(DURATION) + 1, s:port(), out))
    B.run("sleep 0.3") -- wrk connected and scraping
    local cn, ct = loop(s)
    B.run("sleep " .. (math.ceil(DURATION) + 1.5 - DURATION - 0.3))
    s:close()
    local report = io.open(out):read("*a")
    os.remove(out)
    local requests = tonumber(report:match("(%d+) requests in")) or 0
    local seconds = tonumber(report:match("requests in ([%d%.]+)s")) or (DURATION + 1)
    local scrapes = requests * ct / seconds -- those answered while the loop ran
    local per_turn_b, per_turn_s, per_turn_c = bt / bn, st / sn, ct / cn
    rows[round] = {
        base = bn / bt, served = sn / st, scraped = cn / ct,
        tick_us = (per_turn_s - per_turn_b) * 1e6,
        scrape_us = scrapes > 0 and (per_turn_c - per_turn_s) * cn / scrapes * 1e6 or 0,
        scrapes_per_s = requests / seconds,
    }
    io.write(("round %d: baseline %.0f turns/s, served %.0f (%.3f), scraped %.0f (%.3f) while "
              .. "%.0f scrapes/s; tick %.2f us/turn, a scrape %.1f us of the loop\n")
        :format(round, rows[round].base, rows[round].served, rows[round].served / rows[round].base,
                rows[round].scraped, rows[round].scraped / rows[round].base,
                rows[round].scrapes_per_s, rows[round].tick_us, rows[round].scrape_us))
end

local function med(k, f)
    local t = {}
    for i, r in ipairs(rows) do t[i] = f and f(r) or r[k] end
    return B.median(t)
end

-- the loop's own calls: a heartbeat and handing over a text, alone and while wrk scrapes (the
-- server thread holds the lock only to copy the text: what a scrape can cost these calls)
local N = 200000
local function calls(s, t)
    local t0 = clock()
    for _ = 1, N do s.handle:beat(true) end
    local beat = (clock() - t0) / N * 1e9
    t0 = clock()
    for _ = 1, N / 10 do s.handle:publish(t) end
    return beat, (clock() - t0) / (N / 10) * 1e6
end
local s = start()
local t = text()
local beat_ns, publish_us = calls(s, t)
local wrk_out = os.tmpname()
os.execute(("wrk -t1 -c1 -d4s http://127.0.0.1:%d/metrics > %s 2>&1 &"):format(s:port(), wrk_out))
B.run("sleep 0.3")
local sbeat_ns, spublish_us = calls(s, t)
B.run("sleep 4")
os.remove(wrk_out)
local t0 = clock()
for _ = 1, N / 100 do text() end
local text_us = (clock() - t0) / (N / 100) * 1e6
s:close()

io.write(("\n%s, %d rounds of %g s; medians:\n"):format(jit and jit.version or _VERSION, ROUNDS,
                                                       DURATION))
io.write(("  served / baseline   %.3f\n"):format(med(nil, function(r) return r.served / r.base end)))
io.write(("  scraped / baseline  %.3f at %.0f scrapes/s\n")
    :format(med(nil, function(r) return r.scraped / r.base end), med("scrapes_per_s")))
io.write(("  a scrape costs the loop %.1f us (upper bound, CPU shared with wrk)\n")
    :format(med("scrape_us")))
io.write(("  beat %.0f ns (%.0f ns while scraped), publish of a %d-byte text %.2f us (%.2f us "
          .. "while scraped), making the text %.1f us (once a second)\n")
    :format(beat_ns, sbeat_ns, #t, publish_us, spublish_us, text_us))

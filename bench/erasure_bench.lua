-- Personal fields (docs/erasure.md) against the same events in clear, in the same run:
--   1. append, one event with two personal fields per transaction (a new stream each time), vs
--      the same event whose class has no personal fields; the subject's key known to the
--      process (the usual case: a subject's later events), and a new subject each time (the
--      first write, which makes the key)
--   2. read_all, pages of 500, of QX_BENCH_EVENTS events with two personal fields (100
--      subjects) vs as many of the same events in clear: the rate, and the reading process's
--      CPU time per event (steadier: the database's share and the machine's other load left out)
-- Rounds alternate between the two sides so that the machine's load falls on both alike.
--
--   lua5.4 bench/erasure_bench.lua   (QX_DB__URL; QX_BENCH_SECONDS per append round, default
--   2; QX_BENCH_ROUNDS, default 5; QX_BENCH_EVENTS read per round, default 20000;
--   QX_BENCH_ONLY=append or read for one of the two)
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local qx = require "qx"
local core = require "qx.core"

local clock = core.clock
local fmt = string.format
local env = os.getenv
local median = B.median

local SECONDS = tonumber(env("QX_BENCH_SECONDS") or "2")
local ROUNDS = tonumber(env("QX_BENCH_ROUNDS") or "5")
local EVENTS = tonumber(env("QX_BENCH_EVENTS") or "20000")
local ONLY = env("QX_BENCH_ONLY")

local db = assert(qx.connect{ pool_size = 2 })
assert(qx.migrate(db))

local run_tag = qx.uuid():sub(-12)
local Plain = qx.event("bench.erasure.plain_" .. run_tag)
local Personal = qx.event("bench.erasure.personal_" .. run_tag,
                          { personal = { "email", "name" }, subject = "user_id" })
local User = qx.event_sourced("BenchUser_" .. run_tag)
User:on(Plain, function() end)
User:on(Personal, function() end)
local store = qx.event_store{ db = db, notify = false }

local subjects = {}
for i = 1, 100 do subjects[i] = qx.uuid() end

local function fields(subject)
    return { user_id = subject, email = "someone.else@example.org", name = "Someone Else",
             plan = "pro" }
end

-- appends for `seconds`, one event per transaction; fresh = a new subject every time
local function append_loop(class, seconds, fresh, agg_type)
    local n = 0
    local stop = clock() + seconds
    while clock() < stop do
        local subject = fresh and qx.uuid() or subjects[n % #subjects + 1]
        assert(db:unit_of_work(function(uow)
            local u = User.new(qx.uuid())
            u:record(class(fields(subject)))
            assert(uow:store(store):append(u, { aggregate_type = agg_type }))
        end))
        n = n + 1
    end
    return n / seconds
end

-- reads every event of agg_type -> events/s, CPU microseconds per event
local function read_loop(agg_type)
    local t0, c0 = clock(), os.clock()
    local n, after = 0, nil
    repeat
        local recs, cp = assert(store:read_all{ after = after, limit = 500, aggregate_type = agg_type })
        n = n + #recs
        after = cp
    until #recs < 500
    return n / (clock() - t0), (os.clock() - c0) / n * 1e6
end

-- EVENTS events of class under agg_type, 100 to a unit of work (one per aggregate)
local function fill(class, agg_type)
    for b = 1, EVENTS / 100 do
        assert(db:unit_of_work(function(uow)
            local es = uow:store(store)
            for i = 1, 100 do
                local u = User.new(qx.uuid())
                u:record(class(fields(subjects[(b * 100 + i) % #subjects + 1])))
                assert(es:append(u, { aggregate_type = agg_type }))
            end
        end))
    end
end

-- warm up: keys of the subjects made and cached, statements prepared
append_loop(Personal, 0.3, false, "BenchWarm_" .. run_tag)
append_loop(Plain, 0.3, false, "BenchWarm_" .. run_tag)

local out = {}
local function line(s)
    print(s)
    out[#out + 1] = s
end

local interp = B.interpreter()
line(fmt("interpreter %s, %d rounds of %ss", interp, ROUNDS, SECONDS))

local plain, cached, fresh = {}, {}, {}
for r = 1, ONLY == "read" and 1 or ROUNDS do
    plain[r] = append_loop(Plain, SECONDS, false, "BenchPlain_" .. run_tag)
    cached[r] = append_loop(Personal, SECONDS, false, "BenchPersonal_" .. run_tag)
    fresh[r] = append_loop(Personal, SECONDS, true, "BenchFresh_" .. run_tag)
end
local mp, mc, mf = median(plain), median(cached), median(fresh)
line(fmt("append plain          %8.0f tx/s", mp))
line(fmt("append personal, key known   %8.0f tx/s  plain/personal %.2fx", mc, mp / mc))
line(fmt("append personal, new subject %8.0f tx/s  plain/personal %.2fx", mf, mp / mf))

if ONLY == "append" then
    db:close()
    return
end
fill(Plain, "BenchReadPlain_" .. run_tag)
fill(Personal, "BenchReadPersonal_" .. run_tag)
local rp, rc, cp, cc = {}, {}, {}, {}
for r = 1, ROUNDS do
    rp[r], cp[r] = read_loop("BenchReadPlain_" .. run_tag)
    rc[r], cc[r] = read_loop("BenchReadPersonal_" .. run_tag)
end
local mrp, mrc = median(rp), median(rc)
local mcp, mcc = median(cp), median(cc)
line(fmt("read_all of %d events, pages of 500", EVENTS))
line(fmt("read_all plain        %8.0f events/s  %6.2f us CPU/event", mrp, mcp))
line(fmt("read_all personal     %8.0f events/s  %6.2f us CPU/event  plain/personal %.2fx, "
         .. "CPU %.2fx", mrc, mcc, mrp / mrc, mcc / mcp))

db:close()

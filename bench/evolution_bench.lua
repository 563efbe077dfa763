-- Event evolution benchmarks, each against a baseline taken in the same run:
--   1. load of a 10,000-event aggregate whose events all need one upcast step (stored at v1,
--      read by a v2 class), vs the same stream stored at v2 read by a class without upcasters
--      (and by the class with upcasters, nothing to do); runs interleaved, medians compared
--   2. store:each over QX_BENCH_EVOLVE_EVENTS (default 200,000) events that all need a step,
--      with the process's RSS and the Lua heap along the way: constant memory, or it fails
--
--   lua5.4 bench/evolution_bench.lua [load|read ...]   (QX_DB__URL; QX_BENCH_ROUNDS, default
--   15; the read's events are written once and kept for later runs)
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local qx = require "qx"
local core = require "qx.core"

local clock = core.clock
local fmt = string.format
local env = os.getenv

local ROUNDS = tonumber(env("QX_BENCH_ROUNDS") or "15")
local READ_EVENTS = tonumber(env("QX_BENCH_EVOLVE_EVENTS") or "200000")
local median = B.median

local function rss_kb()
    local f = io.open("/proc/self/status")
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function on_deposit(self, ev) self.cents = (self.cents or 0) + ev.amount_cents end
local function step(p) p.amount_cents = p.amount * 100; p.amount = nil; return p end

-- a stream of n events written by `class` (fields from make(i)), in one unit of work
local function write_stream(db, agg_type, class, n, make)
    local Writer = qx.event_sourced(agg_type)
    Writer:on(class, function() end)
    local store = qx.event_store{ db = db }
    local id = qx.uuid()
    assert(db:unit_of_work(function(uow)
        local acc = Writer.new(id)
        for i = 1, n do acc:record(class(make(i))) end
        assert(uow:store(store):append(acc))
    end))
    return id
end

local function bench_load(db)
    print("-- load of a 10,000-event aggregate: every event one upcast step vs none")
    local name = "bench.evolve." .. qx.uuid():sub(-12)
    local agg_type = "BenchEvolve"
    local V1 = qx.event(name, { version = 1 })
    local V2plain = qx.event(name, { version = 2 })
    local old = write_stream(db, agg_type, V1, 10000, function()
        return { amount = 1, note = "bench deposit", reference = "INV-0001" }
    end)
    local current = write_stream(db, agg_type, V2plain, 10000, function()
        return { amount_cents = 100, note = "bench deposit", reference = "INV-0001" }
    end)

    -- the readers: a v2 class without upcasters (the baseline) and one with the v1 -> v2 step
    local Plain = qx.event_sourced(agg_type)
    Plain:on(V2plain, on_deposit)
    local V2 = qx.event(name, { version = 2 })
    V2:upcast(1, step)
    local Evolved = qx.event_sourced(agg_type)
    Evolved:on(V2, on_deposit)
    local store = qx.event_store{ db = db }

    -- -> wall seconds, CPU seconds of this process (the Lua side: rows, JSON, events, handlers;
    -- on a shared machine the steadier of the two)
    local function load(class, id)
        collectgarbage()
        local t0, c0 = clock(), os.clock()
        local acc = assert(db:unit_of_work(function(uow)
            return uow:store(store):load(class, id, { snapshot = false })
        end))
        local dt, dc = clock() - t0, os.clock() - c0
        assert(acc.version == 10000 and acc.cents == 1000000, "wrong state loaded")
        return dt, dc
    end
    load(Plain, current); load(Evolved, old); load(Evolved, current) -- warm up
    local wall = { plain = {}, upcast = {}, nothing = {} }
    local cpu = { plain = {}, upcast = {}, nothing = {} }
    local runs = {
        function(i) wall.plain[i], cpu.plain[i] = load(Plain, current) end,
        function(i) wall.upcast[i], cpu.upcast[i] = load(Evolved, old) end,
        function(i) wall.nothing[i], cpu.nothing[i] = load(Evolved, current) end,
    }
    for i = 1, ROUNDS do -- interleaved, in a turning order: the machine's load falls on all alike
        for k = 0, 2 do runs[(i + k) % 3 + 1](i) end
    end
    local r = {}
    for what, t in pairs({ wall = wall, cpu = cpu }) do
        local p, u, n = median(t.plain), median(t.upcast), median(t.nothing)
        print(fmt("%-4s no upcasters %8.2f ms   one step per event %8.2f ms (ratio %.3f)   "
                  .. "upcasters with nothing to do %8.2f ms (ratio %.3f)", what, p * 1000,
                  u * 1000, u / p, n * 1000, n / p))
        r[what] = u / p
    end
    return r
end

local function bench_read(db)
    print(fmt("-- store:each over %d events that all need one upcast step", READ_EVENTS))
    local name = "bench.evolve.read_deposited"
    local V1 = qx.event(name, { version = 1 })
    local have = assert(db:query("SELECT count(*) AS n FROM qx_aggregate_events WHERE event_name = $1",
                                 name))[1].n
    if have < READ_EVENTS then
        local t0 = clock()
        local Writer = qx.event_sourced("BenchEvolveRead")
        Writer:on(V1, function() end)
        local store = qx.event_store{ db = db, notify = false }
        while have < READ_EVENTS do
            local k = math.min(5000, READ_EVENTS - have)
            assert(db:unit_of_work(function(uow)
                local acc = Writer.new(qx.uuid())
                for _ = 1, k do acc:record(V1{ amount = 1, note = "bench deposit" }) end
                assert(uow:store(store):append(acc))
            end))
            have = have + k
        end
        print(fmt("wrote %d events in %.1f s", READ_EVENTS, clock() - t0))
    end
    local V2 = qx.event(name, { version = 2 })
    V2:upcast(1, step)
    local store = qx.event_store{ db = db, registry = qx.registry{ V2 } }
    collectgarbage()
    local rss0, heap0 = rss_kb(), collectgarbage("count")
    local n, cents = 0, 0
    local rss_max, heap_max, rss_first = rss0, heap0, nil
    local t0 = clock()
    for rec in store:each{ types = V2, batch = 1000 } do
        n = n + 1
        cents = cents + rec.amount_cents
        if n % 10000 == 0 then
            local r, h = rss_kb(), collectgarbage("count")
            rss_first = rss_first or r
            if r > rss_max then rss_max = r end
            if h > heap_max then heap_max = h end
        end
        if n == READ_EVENTS then break end
    end
    local dt = clock() - t0
    assert(n == READ_EVENTS and cents == n * 100, "wrong records read")
    local rss1 = rss_kb()
    print(fmt("%d records in %.2f s (%.0f/s); RSS %d kB before, %d kB at 10,000 records, "
              .. "at most %d kB, %d kB at the end; Lua heap at most %.0f kB", n, dt, n / dt, rss0,
              rss_first or rss0, rss_max, rss1, heap_max))
    -- 200,000 records held at once would be hundreds of MB: a growth past 32 MB after the
    -- first batches is a leak
    assert(rss_max - (rss_first or rss0) < 32768, "memory grew with the events read")
    print("constant memory: yes (RSS growth after the first 10,000 records: "
          .. (rss_max - (rss_first or rss0)) .. " kB)")
end

local db = assert(qx.connect{ pool_size = 2 })
assert(qx.migrate(db))
local m = {
    nproc = B.run("nproc"):gsub("%s+$", ""), load = B.run("cat /proc/loadavg"):gsub("%s+$", ""),
}
print(fmt("%s on %s CPUs; load %s", jit and jit.version or _VERSION, m.nproc, m.load))
local parts = {}
for i = 1, #arg do parts[arg[i]] = true end
if next(parts) == nil then parts = { load = true, read = true } end
if parts.load then bench_load(db) end
if parts.read then bench_read(db) end
db:close()

-- Blue/green projection versions: what a version costs against the same projection without
-- one, measured in the same run. (1) a rebuild's rate: a new version rebuilt beside the live
-- one vs an unversioned projection's rebuild, same handlers, same events; (2) a reader's point
-- query through the version's view vs the same query on its table; (3) the time of a switch
-- (two views repointed in one transaction). Bounded: EVENTS events, ROUNDS rounds each.
-- Usage: lua5.4 bench/projection_versions_bench.lua   (QX_DB__URL set, as make bench does)
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local qx = require "qx"
local projection = require "qx.store.projection"
local clock = require("qx.core").clock

local EVENTS = tonumber(os.getenv("BENCH_EVENTS") or "") or 6000
local ROUNDS = 5
local READS = 2000

local db = assert(qx.connect{ pool_size = 4 })
assert(qx.migrate(db))
local tag = tostring(os.time()) .. tostring(math.random(1000, 9999))
local name = "bench_bg_" .. tag
local Deposited = qx.event("bench.bg_deposited_" .. tag)
local Account = qx.event_sourced("BenchBg" .. tag)
Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
local store = qx.event_store{ db = db }

-- EVENTS events over EVENTS / 10 accounts, 50 accounts per unit of work
local ids = {}
local per = 10
for start = 1, EVENTS / per, 50 do
    assert(db:unit_of_work(function(uow)
        local es = uow:store(store)
        for _ = start, math.min(start + 49, EVENTS / per) do
            local id = qx.uuid()
            ids[#ids + 1] = id
            local acc = Account.new(id)
            for _ = 1, per do acc:record(Deposited{ amount = 1 }) end
            assert(es:append(acc))
        end
        return true
    end))
end

local function upsert(t)
    return "INSERT INTO " .. t .. " (id, balance) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE "
        .. "SET balance = " .. t .. ".balance + $2"
end

local plain_table = "bench_bg_plain_" .. tag
assert(db:exec("CREATE TABLE " .. plain_table .. " (id uuid PRIMARY KEY, balance bigint NOT NULL)"))
local plain = qx.projection{ name = name .. "_plain", db = db, on_progress = false,
    reset = function(uow) assert(uow:exec("TRUNCATE " .. plain_table)) end,
    handlers = { [Deposited] = function(ev, uow)
        assert(uow:queue(upsert(plain_table), ev.aggregate_id, ev.amount)) end } }

local tbl = "bench_bg_" .. tag
local function version(v)
    return qx.projection{ name = name, version = v, db = db, on_progress = false,
        tables = { tbl },
        setup = function(uow, p)
            assert(uow:exec("CREATE TABLE " .. p:table(tbl)
                            .. " (id uuid PRIMARY KEY, balance bigint NOT NULL)"))
        end,
        reset = function(uow, p) assert(uow:exec("TRUNCATE " .. p:table(tbl))) end,
        handlers = { [Deposited] = function(ev, uow, p)
            assert(uow:queue(upsert(p:table(tbl)), ev.aggregate_id, ev.amount)) end } }
end
local v1, v2 = version(1), version(2)
assert(v1:catch_up())

-- (1) rebuild rates, alternating so that the machine's load falls on both alike
local plain_rates, version_rates = {}, {}
for r = 1, ROUNDS do
    local t = clock()
    assert(assert(plain:rebuild()) == EVENTS)
    plain_rates[r] = EVENTS / (clock() - t)
    t = clock()
    assert(assert(v2:rebuild()) == EVENTS)
    version_rates[r] = EVENTS / (clock() - t)
end

-- (2) point reads through the view vs on the table (prepared once per connection either way)
local function reads(relation)
    local conn = assert(db:acquire())
    local sql = "SELECT balance FROM " .. relation .. " WHERE id = $1"
    local t = clock()
    for i = 1, READS do
        local rows = assert(conn:query(sql, ids[i % #ids + 1]))
        assert(rows[1].balance == per)
    end
    local el = clock() - t
    conn:release()
    return READS / el
end
local view_rates, table_rates = {}, {}
for r = 1, ROUNDS do
    table_rates[r] = reads(v1:table(tbl))
    view_rates[r] = reads(tbl)
end

-- (3) switches back and forth
local switch_ms = {}
for r = 1, ROUNDS * 4 do
    local t = clock()
    assert(projection.switch(db, name, r % 2 == 1 and 2 or 1))
    switch_ms[r] = (clock() - t) * 1000
end

local med = B.median
print(("events %d, rounds %d (medians)"):format(EVENTS, ROUNDS))
print(("rebuild, unversioned:          %8.0f events/s"):format(med(plain_rates)))
print(("rebuild, version beside live:  %8.0f events/s   ratio %.2f"):format(med(version_rates),
      med(version_rates) / med(plain_rates)))
print(("point read on the table:       %8.0f reads/s"):format(med(table_rates)))
print(("point read through the view:   %8.0f reads/s    ratio %.2f"):format(med(view_rates),
      med(view_rates) / med(table_rates)))
print(("switch (one view):             %8.2f ms"):format(med(switch_ms)))

-- leave nothing behind
assert(projection.switch(db, name, 1))
assert(v2:drop())
assert(db:exec("DROP VIEW " .. tbl))
assert(db:exec("DROP TABLE " .. v1:table(tbl)))
assert(db:exec("DELETE FROM qx_projection_versions WHERE projection_name = $1", name))
assert(db:exec("DELETE FROM qx_projection_checkpoints WHERE projection_name = ANY($1::text[])",
               "{" .. name .. "@v1," .. name .. "_plain}"))
assert(db:exec("DROP TABLE " .. plain_table))
db:close()

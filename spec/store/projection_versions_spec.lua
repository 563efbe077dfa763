-- Blue/green projection versions against a real PostgreSQL: a new version builds beside the
-- live one in tables of its own, switch repoints the readers' views in one transaction, drop
-- removes an old version; the cap on rebuilds, progress, and the refusals.
local support = require "support"
local qx = require "qx"
local projection = require "qx.store.projection"

describe("qx.store.projection versions", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 6 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- An account model; read model: balances (id, balance) and totals (one row: the sum), both
    -- per version. Version 2 counts cents (x100) and adds a column, so that a reader can tell
    -- the versions apart and see a mix.
    local function model()
        local m = { type = support.unique("Bg"), name = support.unique("bg"),
                    balances = support.unique("balances"), totals = support.unique("totals") }
        m.Deposited = qx.event(support.unique("bg.deposited"))
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        m.store = qx.event_store{ db = db }
        return m
    end

    local function version(m, v, extra)
        local scale = v == 1 and 1 or 100
        local o = {
            name = m.name, version = v, db = db, on_progress = false,
            tables = { m.balances, m.totals },
            setup = function(uow, p)
                local cents = v == 1 and "" or ", unit text NOT NULL DEFAULT 'cent'"
                assert(uow:exec("CREATE TABLE " .. p:table(m.balances)
                    .. " (id text PRIMARY KEY, balance bigint NOT NULL" .. cents .. ")"))
                assert(uow:exec("CREATE TABLE " .. p:table(m.totals) .. " (total bigint NOT NULL)"))
                assert(uow:exec("INSERT INTO " .. p:table(m.totals) .. " VALUES (0)"))
            end,
            reset = function(uow, p)
                assert(uow:exec("TRUNCATE " .. p:table(m.balances)))
                assert(uow:exec("UPDATE " .. p:table(m.totals) .. " SET total = 0"))
            end,
            handlers = {
                [m.Deposited] = function(ev, uow, p)
                    local b = p:table(m.balances)
                    assert(uow:queue("INSERT INTO " .. b .. " (id, balance) VALUES ($1, $2) "
                        .. "ON CONFLICT (id) DO UPDATE SET balance = " .. b .. ".balance + $2",
                        ev.aggregate_id, ev.amount * scale))
                    assert(uow:queue("UPDATE " .. p:table(m.totals) .. " SET total = total + $1",
                                     ev.amount * scale))
                end,
            },
        }
        for k, x in pairs(extra or {}) do o[k] = x end
        return qx.projection(o)
    end

    local function deposit(m, id, amount)
        return assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            acc:record(m.Deposited{ amount = amount })
            assert(es:append(acc))
            return acc
        end))
    end

    -- what a reader sees through the views
    local function read(m)
        local r = assert(db:query("SELECT (SELECT coalesce(sum(balance), 0) FROM " .. m.balances
            .. ")::bigint AS b, (SELECT total FROM " .. m.totals .. ") AS t"))[1]
        return r.b, r.t
    end

    local function relkind(name)
        local rows = assert(db:query("SELECT relkind::text AS k FROM pg_class "
                                     .. "WHERE oid = to_regclass($1)", name))
        return rows[1] and rows[1].k
    end

    it("the first version is live: handlers write p:table() names, readers read views", function()
        local m = model()
        local v1 = version(m, 1)
        assert.equal(m.balances .. "_v1", v1:table(m.balances))
        deposit(m, qx.uuid(), 5)
        deposit(m, qx.uuid(), 7)
        assert.equal(2, assert(v1:catch_up()))
        assert.equal("v", relkind(m.balances))
        assert.equal("r", relkind(m.balances .. "_v1"))
        assert.same({ 12, 12 }, { read(m) })
        local st = assert(v1:status())
        assert.equal(1, st.version)
        assert.is_true(st.live)
        assert.equal(0, st.behind)
    end)

    it("a new version builds beside the live one, which keeps serving and keeping up", function()
        local m = model()
        local v1 = version(m, 1)
        deposit(m, qx.uuid(), 3)
        assert(v1:catch_up())
        local v2 = version(m, 2)
        assert.equal(1, assert(v2:rebuild()))
        assert.equal("r", relkind(m.balances .. "_v2"))
        assert.same({ 3, 3 }, { read(m) })           -- readers still on version 1
        deposit(m, qx.uuid(), 4)
        assert.equal(1, assert(v1:catch_up()))
        assert.same({ 7, 7 }, { read(m) })
        local st2 = assert(v2:status())
        assert.is_false(st2.live)
        assert.equal(1, st2.behind)
        assert.equal(1, assert(v2:catch_up()))
        local list = assert(projection.list(db, m.name))
        assert.same({ 1, 2 }, support.field(list, "version"))
        assert.same({ true, false }, support.field(list, "live"))
        assert.same({ 0, 0 }, support.field(list, "behind"))
        assert.same({ 2, 2 }, support.field(list, "events_applied"))
    end)

    it("switch is refused while the new version is behind, and repoints every view once it has caught up", function()
        local m = model()
        local v1 = version(m, 1)
        local id = qx.uuid()
        deposit(m, id, 2)
        assert(v1:catch_up())
        local v2 = version(m, 2)
        local n, e = v2:switch()                      -- registered now, nothing applied
        assert.is_nil(n)
        assert.equal("conflict", e.code)
        assert.equal(1, e.behind)
        assert.truthy(e.message:find("1 event(s) behind", 1, true), e.message)
        assert.same({ 2, 2 }, { read(m) })           -- nothing changed
        assert.is_true(assert(v1:status()).live)
        assert.equal(1, assert(v2:catch_up()))
        local info = assert(v2:switch())
        assert.same({ version = 2, previous = 1, behind = 0 }, info)
        assert.same({ 200, 200 }, { read(m) })
        assert.is_false(assert(v1:status()).live)
        assert.is_true(assert(v2:status()).live)
        -- the old version keeps up after the switch, and readers can go back to it
        deposit(m, id, 1)
        assert.equal(1, assert(v1:catch_up()))
        assert.equal(1, assert(v2:catch_up()))
        assert.same({ 300, 300 }, { read(m) })
        assert.same({ version = 1, previous = 2, behind = 0 }, assert(projection.switch(db, m.name, 1)))
        assert.same({ 3, 3 }, { read(m) })
        -- max_behind lets a version that is close enough go live
        deposit(m, id, 1)
        assert(v1:catch_up())
        n, e = v2:switch()
        assert.is_nil(n)
        assert.equal("conflict", e.code)
        assert.equal(1, assert(v2:switch{ max_behind = 1 }).behind)
        -- switching to the live version again is harmless
        assert.same({ version = 2, behind = 0 }, assert(v2:switch()))
        -- wait_seconds: the database alone waits for the version's runner (none here), the
        -- projection catches up itself
        deposit(m, id, 1)
        assert(v2:catch_up())
        local clock = require("qx.core").clock
        local t = clock()
        n, e = projection.switch(db, m.name, 1, { wait_seconds = 0.3 })
        assert.is_nil(n)
        assert.equal("conflict", e.code)
        assert.is_true(clock() - t >= 0.25)
        assert.same({ version = 1, previous = 2, behind = 0 }, assert(v1:switch{ wait_seconds = 5 }))
        assert.same({ 5, 5 }, { read(m) })
        assert.has_error(function() v1:switch{ wait_seconds = -1 } end,
                         "projection switch: wait_seconds must be a number >= 0")
    end)

    it("a reader in a loop during switch never sees an error or a mix of versions #slow", function()
        local m = model()
        local v1, v2 = version(m, 1), version(m, 2)
        for i = 1, 20 do deposit(m, qx.uuid(), i) end
        assert(v1:catch_up())
        assert(v2:rebuild())
        local sum = 210
        local done = support.unique("reader_done")
        assert(db:exec("CREATE TABLE " .. done .. " (x int)"))
        -- the reader names its columns, as readers of a view whose columns change should
        local reader = support.spawn([[
local qx = require "qx"
local env = os.getenv
local db = assert(qx.connect{ url = env("QX_DB__URL"), pool_size = 1 })
local sql = "SELECT (SELECT coalesce(sum(balance), 0) FROM " .. env("R_B") .. ")::bigint AS b, "
  .. "(SELECT total FROM " .. env("R_T") .. ") AS t, "
  .. "(SELECT count(*) FROM " .. env("R_DONE") .. ") AS done"
local sum = tonumber(env("R_SUM"))
local reads, v1, v2, errors, mixes = 0, 0, 0, 0, 0
local first
local clock = require("qx.core").clock
local deadline = clock() + 60
while clock() < deadline do
  local rows, e = db:query(sql)
  reads = reads + 1
  if not rows then
    errors = errors + 1
    first = first or tostring(e)
  else
    local r = rows[1]
    if r.b == sum and r.t == sum then v1 = v1 + 1
    elseif r.b == sum * 100 and r.t == sum * 100 then v2 = v2 + 1
    else mixes = mixes + 1 first = first or ("mix " .. r.b .. " " .. r.t) end
    if r.done > 0 then break end
  end
end
print(("READS %d V1 %d V2 %d ERRORS %d MIXES %d %s"):format(reads, v1, v2, errors, mixes, first or ""))
]], { QX_DB__URL = support.db_url(), R_B = m.balances, R_T = m.totals, R_DONE = done,
      R_SUM = sum })
        -- wait until the reader reads, then switch back and forth under it
        local clock = require("qx.core").clock
        local deadline = clock() + 10
        repeat
            local rows = assert(db:query("SELECT count(*) AS n FROM pg_stat_activity "
                .. "WHERE query LIKE $1 AND pid <> pg_backend_pid()", "%" .. m.totals .. "%"))
        until rows[1].n > 0 or clock() > deadline
        for i = 1, 30 do
            assert(projection.switch(db, m.name, i % 2 == 1 and 2 or 1))
            support.spin(0.005)                  -- the reader reads each version a while
        end
        assert(db:exec("INSERT INTO " .. done .. " VALUES (1)"))
        local out = support.collect(reader)
        local reads, r1, r2, errors, mixes = out:match("READS (%d+) V1 (%d+) V2 (%d+) ERRORS (%d+) MIXES (%d+)")
        assert(reads, out)
        assert.equal(0, tonumber(errors), out)
        assert.equal(0, tonumber(mixes), out)
        assert.is_true(tonumber(r1) > 0 and tonumber(r2) > 0, out)
        assert.same({ sum, sum }, { read(m) })      -- 30 switches: version 1 again
        assert(db:exec("DROP TABLE " .. done))
    end)

    it("a rebuild under concurrent writers skips and doubles no event #slow", function()
        local m = model()
        local applied = support.unique("applied")
        assert(db:exec("CREATE TABLE " .. applied .. " (version int, event_id uuid, agg text)"))
        local function with_log(v)
            return version(m, v, { batch_size = 7, handlers = {
                [m.Deposited] = function(ev, uow, p)
                    assert(uow:queue("INSERT INTO " .. applied .. " VALUES ($1, $2, $3)", p.version,
                                     ev.event_id, ev.aggregate_id))
                    assert(uow:queue("UPDATE " .. p:table(m.totals) .. " SET total = total + $1",
                                     ev.amount))
                end } })
        end
        local v1 = with_log(1)
        local ids = {}
        for i = 1, 4 do ids[i] = qx.uuid() deposit(m, ids[i], 1) end
        assert(v1:catch_up())
        local writers = {}
        for w = 1, 3 do
            writers[w] = support.spawn([[
local qx = require "qx"
local env = os.getenv
local db = assert(qx.connect{ url = env("QX_DB__URL"), pool_size = 1 })
local Deposited = qx.event(env("W_EVENT"))
local Account = qx.event_sourced(env("W_TYPE"))
Account:on(Deposited, function() end)
local store = qx.event_store{ db = db }
local ids = {}
for id in env("W_IDS"):gmatch("[^,]+") do ids[#ids + 1] = id end
math.randomseed(tonumber(env("W_SEED")))
local wins = 0
for i = 1, 60 do
  local id = ids[math.random(#ids)]
  for _ = 1, 200 do
    local ok, e = db:unit_of_work(function(uow)
      local es = uow:store(store)
      local acc = es:load(Account, id) or Account.new(id)
      acc:record(Deposited{ amount = 1 })
      assert(es:append(acc))
      return true
    end, { pre_commit = function(uow)
      assert(uow:queue("SELECT pg_sleep($1)", math.random(0, 8) / 1000)) end })
    if ok then wins = wins + 1 break end
    if e.code ~= "conflict" then print("ERROR " .. tostring(e)) os.exit(0) end
  end
end
print("OK " .. wins)
]], { QX_DB__URL = support.db_url(), W_EVENT = m.Deposited.event_name, W_TYPE = m.type,
      W_IDS = table.concat(ids, ","), W_SEED = os.time() * 10 + w })
        end
        -- version 2 is rebuilt while they write (once they have written some), then both
        -- versions catch up repeatedly
        local clock = require("qx.core").clock
        local deadline = clock() + 30
        repeat
            local n = assert(db:query("SELECT count(*) AS n FROM qx_aggregate_events "
                                      .. "WHERE aggregate_type = $1", m.type))[1].n
        until n >= 24 or clock() > deadline
        local v2 = with_log(2)
        assert(v2:rebuild())
        -- and goes live while they write: it catches up and tries again until a try finds it
        -- caught up
        assert.equal(1, assert(v2:switch{ wait_seconds = 30 }).previous)
        local running = true
        local rounds = 0
        while running and rounds < 2000 do
            rounds = rounds + 1
            assert(v1:catch_up())
            assert(v2:catch_up())
            local n = assert(db:query("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE "
                .. "'%pg_sleep%' AND pid <> pg_backend_pid()"))[1].n
            running = n > 0 or rounds < 5
        end
        local total = 0
        for w, c in ipairs(writers) do
            local out = support.collect(c)
            local wins = out:match("OK (%d+)")
            assert(wins, "writer " .. w .. ":\n" .. out)
            total = total + tonumber(wins)
        end
        assert.equal(180, total)
        assert(v1:catch_up())
        assert(v2:catch_up())
        local events = assert(db:query("SELECT count(*) AS n FROM qx_aggregate_events "
            .. "WHERE aggregate_type = $1", m.type))[1].n
        assert.equal(184, events)
        for v = 1, 2 do
            local r = assert(db:query("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM "
                .. applied .. " WHERE version = $1", v))[1]
            assert.equal(events, r.n)              -- none skipped
            assert.equal(events, r.d)              -- none doubled
            local missing = assert(db:query("SELECT count(*) AS n FROM qx_aggregate_events e "
                .. "WHERE e.aggregate_type = $1 AND NOT EXISTS (SELECT 1 FROM " .. applied
                .. " a WHERE a.version = $2 AND a.event_id = e.id)", m.type, v))[1].n
            assert.equal(0, missing)
            local t = assert(db:query("SELECT total FROM " .. m.totals .. "_v" .. v))[1].total
            assert.equal(events, t)
        end
        assert(db:exec("DROP TABLE " .. applied))
    end)

    it("a switch that must make a view anew under a view of the user's fails whole", function()
        local m = model()
        local v1, v2 = version(m, 1), version(m, 2)
        deposit(m, qx.uuid(), 1)
        assert(v1:catch_up())
        assert(v2:catch_up())
        assert(v2:switch())                       -- v2 adds a column: the view is replaced
        local report = support.unique("report")
        assert(db:exec("CREATE VIEW " .. report .. " AS SELECT unit FROM " .. m.balances))
        local n, e = v1:switch()                  -- v1 lacks it: the view must be made anew
        assert.is_nil(n)
        assert.equal("db", e.code)
        assert.is_true(assert(v2:status()).live)
        assert.same({ 100, 100 }, { read(m) })
        assert(db:exec("DROP VIEW " .. report))
        assert.equal(2, assert(v1:switch()).previous)
        assert.same({ 1, 1 }, { read(m) })
    end)

    it("drop removes a version's tables and checkpoint; the live version is refused", function()
        local m = model()
        local v1, v2 = version(m, 1), version(m, 2)
        deposit(m, qx.uuid(), 1)
        assert(v1:catch_up())
        assert(v2:catch_up())
        local n, e = v1:drop()
        assert.is_nil(n)
        assert.equal("invalid", e.code)
        assert.truthy(e.message:find("is live", 1, true), e.message)
        assert.equal("r", relkind(m.balances .. "_v1"))   -- nothing dropped
        assert.equal(0, assert(v1:catch_up()))            -- and it keeps running
        assert(v2:switch())
        local info = assert(v1:drop())
        assert.same({ version = 1, tables = { m.balances .. "_v1", m.totals .. "_v1" } }, info)
        assert.is_nil(relkind(m.balances .. "_v1"))
        assert.is_nil(relkind(m.totals .. "_v1"))
        assert.same({ 100, 100 }, { read(m) })
        assert.same({ 2 }, support.field(assert(projection.list(db, m.name)), "version"))
        local cps = assert(db:query("SELECT count(*) AS n FROM qx_projection_checkpoints "
                                    .. "WHERE projection_name = $1", m.name .. "@v1"))[1].n
        assert.equal(0, cps)
        -- a runner of the dropped version stops instead of starting over
        n, e = v1:catch_up()
        assert.is_nil(n)
        assert.equal("not_found", e.code)
        assert.is_nil(relkind(m.balances .. "_v1"))
        n, e = projection.drop(db, m.name, 7)
        assert.is_nil(n)
        assert.equal("not_found", e.code)
    end)

    it("caps the rebuilds running at once on a database", function()
        local m = model()
        local other = model()
        for i = 1, 6 do deposit(m, qx.uuid(), i) end
        deposit(other, qx.uuid(), 1)
        local inner, inner_err
        local second = version(other, 1, { max_rebuilds = 1 })
        local first = version(m, 1, { max_rebuilds = 1, batch_size = 2,
            progress_interval_seconds = 0.000001,
            on_progress = function()
                if inner == nil and inner_err == nil then
                    local n, e = second:rebuild()
                    inner, inner_err = n, not n and e or nil
                end
            end })
        assert.equal(6, assert(first:rebuild()))
        assert.is_nil(inner)
        assert.equal("conflict", inner_err.code)
        assert.equal(1, inner_err.max_rebuilds)
        assert.truthy(inner_err.message:find("1 rebuild(s) already run", 1, true), inner_err.message)
        -- the slot is given back when the rebuild ends, and a cap of 2 lets two run
        assert.equal(1, assert(second:rebuild()))
        inner, inner_err = nil, nil
        first = version(m, 1, { max_rebuilds = 2, batch_size = 2,
            progress_interval_seconds = 0.000001,
            on_progress = function()
                if inner == nil and inner_err == nil then
                    local n, e = version(other, 1, { max_rebuilds = 2 }):rebuild()
                    inner, inner_err = n, not n and e or nil
                end
            end })
        assert.equal(6, assert(first:rebuild()))
        assert.is_nil(inner_err)
        assert.equal(1, inner)
        -- the slot goes back when a handler raises too
        local failing = version(m, 1, { max_rebuilds = 1, handlers = {
            [m.Deposited] = function() error("boom") end } })
        local n, e = failing:rebuild()
        assert.is_nil(n)
        assert.truthy(tostring(e):find("boom", 1, true))
        assert.equal(1, assert(second:rebuild()))
        -- the slot's connection is not the pool's: a pool of one rebuilds
        local small = support.migrated_db{ pool_size = 1 }
        local one = version(m, 1, { db = small, max_rebuilds = 1 })
        assert.equal(6, assert(one:rebuild()))
        small:close()
    end)

    it("reports rebuild progress: done and total, rate, estimated time, and a last report", function()
        local m = model()
        for i = 1, 9 do deposit(m, qx.uuid(), i) end
        local infos = {}
        local p = version(m, 1, { batch_size = 2, progress_interval_seconds = 0.000001,
                                  on_progress = function(info) infos[#infos + 1] = info end })
        assert.equal(9, assert(p:rebuild()))
        assert.is_true(#infos >= 4)
        local last = infos[#infos]
        assert.same({ 9, 9, 0 }, { last.done, last.total, last.remaining })
        for i, info in ipairs(infos) do
            assert.equal(m.name, info.name)
            assert.equal(1, info.version)
            assert.equal(9, info.total)
            assert.equal(info.done, info.applied)
            assert.is_true(info.rate >= 0)
            if i > 1 then assert.is_true(info.done >= infos[i - 1].done) end
            if info.remaining > 0 and info.rate > 0 then
                assert.near(info.remaining / info.rate, info.eta_seconds, 1e-9)
            end
        end
        assert.is_true(infos[1].done < 9)
    end)

    it("refuses bad definitions and a definition that differs from the registered one", function()
        local m = model()
        local function bad(extra, pattern)
            local ok, err = pcall(version, m, 1, extra)
            assert.is_false(ok)
            assert.truthy(tostring(err):find(pattern, 1, true), tostring(err))
        end
        bad({ version = 0 }, "version must be an integer from 1")
        bad({ version = 1.5 }, "version must be an integer from 1")
        bad({ version = "2" }, "version must be an integer from 1")
        bad({ tables = { "Balances" } }, "is not a table name")
        bad({ tables = { "a; DROP TABLE x" } }, "is not a table name")
        bad({ tables = { "ok", "ok" } }, "given twice")
        bad({ tables = "balances" }, "tables must be a list")
        bad({ tables = { string.rep("a", 62) } }, "longer than 63 bytes")
        bad({ setup = "CREATE TABLE" }, "setup must be a function")
        bad({ max_rebuilds = 0 }, "max_rebuilds")
        local ok, err = pcall(qx.projection, { name = m.name, db = db, tables = { "t" },
                                               handlers = { [m.Deposited] = function() end } })
        assert.is_false(ok)
        assert.truthy(tostring(err):find("give version", 1, true), tostring(err))
        ok, err = pcall(qx.projection, { name = m.name .. "@v2", db = db,
                                         handlers = { [m.Deposited] = function() end } })
        assert.is_false(ok)
        assert.truthy(tostring(err):find("is a version's checkpoint", 1, true), tostring(err))
        local v1 = version(m, 1)
        assert.has_error(function() v1:table("nope") end,
            "projection:table: projection " .. m.name .. " declares no table nope (tables: "
            .. m.balances .. ", " .. m.totals .. ")")
        local plain = qx.projection{ name = m.name, db = db,
                                     handlers = { [m.Deposited] = function() end } }
        assert.has_error(function() plain:switch() end)
        assert(v1:catch_up())
        -- version 1 again with other tables: invalid, nothing registered
        local other = version(m, 1, { tables = { m.balances } })
        local n, e = other:catch_up()
        assert.is_nil(n)
        assert.equal("invalid", e.code)
        assert.truthy(e.message:find("was registered with tables", 1, true), e.message)
        n, e = projection.switch(db, m.name, 3)
        assert.is_nil(n)
        assert.equal("not_found", e.code)
        assert.has_error(function() projection.switch(db, m.name, 2, { behind = 1 }) end)
    end)

    it("a view name taken by a table is refused, with nothing registered", function()
        local m = model()
        assert(db:exec("CREATE TABLE " .. m.balances .. " (id text)"))
        local v1 = version(m, 1)
        local n, e = v1:catch_up()
        assert.is_nil(n)
        assert.equal("invalid", e.code)
        assert.truthy(e.message:find("is not a view", 1, true), e.message)
        assert.same({}, assert(projection.list(db, m.name)))
        assert.is_nil(relkind(m.balances .. "_v1"))
    end)

    it("a version whose setup does not create its tables is refused, with nothing registered", function()
        local m = model()
        local v1 = version(m, 1, { setup = function() end })
        local n, e = v1:catch_up()
        assert.is_nil(n)
        assert.equal("invalid", e.code)
        assert.equal("table " .. m.balances .. "_v1 does not exist (create it in setup)", e.message)
        assert.same({}, assert(projection.list(db, m.name)))
        assert.is_nil(relkind(m.balances))
    end)
end)

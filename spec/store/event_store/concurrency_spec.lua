-- The event store under real concurrency: writers are separate OS processes (the C calls block,
-- so coroutines could not overlap their transactions), each transaction sleeps a random time
-- after its insert and before COMMIT, so positions are taken early and commit late and out of
-- order. Bounded in count and time.
local support = require "support"
local qx = require "qx"

local spawn, collect = support.spawn, support.collect

-- A writer: N commands, each on a random one of the ids, each a unit of work that loads the
-- account, records one or two deposits, appends, and sleeps before COMMIT; a conflict is run
-- again. Reports "OK wins conflicts", and always leaves a row in the done table.
local WRITER = [[
local qx = require "qx"
local env = os.getenv
local db = assert(qx.connect{ url = env("QX_DB__URL"), pool_size = 1 })
local Deposited = qx.event(env("W_EVENT"))
local Account = qx.event_sourced(env("W_TYPE"))
Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
local store = qx.event_store{ db = db }
local ids = {}
for id in env("W_IDS"):gmatch("[^,]+") do ids[#ids + 1] = id end
local writer, n, sleep_ms = tonumber(env("W_WRITER")), tonumber(env("W_N")), tonumber(env("W_SLEEP_MS"))
math.randomseed(tonumber(env("W_SEED")))
local wins, conflicts = 0, 0
local ok, problem = pcall(function()
  for i = 1, n do
    local id = ids[math.random(#ids)]
    local done = false
    for attempt = 1, 500 do
      local nap = math.random(0, sleep_ms) / 1000
      local k = math.random(1, 2)
      local r, e = db:unit_of_work(function(uow)
        local es = uow:store(store)
        local acc = es:load(Account, id) or Account.new(id)
        for j = 1, k do
          acc:record(Deposited{ amount = 1, writer = writer, n = i, attempt = attempt, j = j })
        end
        assert(es:append(acc))
        return true
      end, { pre_commit = function(uow) assert(uow:queue("SELECT pg_sleep($1)", nap)) end })
      if r then
        wins = wins + 1
        done = true
        break
      elseif e.code == "conflict" then
        conflicts = conflicts + 1
      else
        error(tostring(e))
      end
    end
    if not done then error("command " .. i .. " never won") end
  end
end)
assert(db:exec("INSERT INTO " .. env("W_DONE") .. " (writer, ok) VALUES ($1, $2)", writer, ok))
if ok then print("OK " .. wins .. " " .. conflicts) else print("ERROR " .. tostring(problem)) end
db:close()
]]

-- A projection runner in its own process, sharing the projection's name with the spec's own:
-- both apply batches while the writers run, and neither may apply an event twice.
local RUNNER = [[
local qx = require "qx"
local env = os.getenv
local db = assert(qx.connect{ url = env("QX_DB__URL"), pool_size = 2 })
local applied = env("P_APPLIED")
local p = qx.projection{ name = env("P_NAME"), db = db, batch_size = 7, on_progress = false,
  handlers = { [env("W_EVENT")] = function(ev, uow)
    assert(uow:queue("INSERT INTO " .. applied .. " (event_id, agg, seq, runner) VALUES ($1, $2, $3, 'child')",
      ev.event_id, ev.aggregate_id, ev._sequence))
  end } }
local writers = tonumber(env("P_WRITERS"))
local function done()
  local rows = assert(db:query("SELECT count(*) AS n FROM " .. env("W_DONE")))
  return rows[1].n >= writers
end
local n, e = p:run{ poll_ms = 50, max_seconds = 90, stop = done }
if not n then print("ERROR " .. tostring(e)) os.exit(0) end
local m, e2 = p:catch_up()
if not m then print("ERROR " .. tostring(e2)) os.exit(0) end
print("OK " .. (n + m))
db:close()
]]

describe("event store: concurrent writers #concurrency #slow", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function start_writers(count, ids, n, sleep_ms, agg_type, event_name, done_table)
        local children = {}
        for w = 1, count do
            children[w] = spawn(WRITER, {
          QX_DB__URL = support.db_url(), W_TYPE = agg_type, W_EVENT = event_name,
          W_IDS = table.concat(ids, ","), W_N = n, W_SLEEP_MS = sleep_ms, W_WRITER = w,
          W_SEED = os.time() * 10 + w, W_DONE = done_table,
            })
        end
        return children
    end

    local function results(children)
        local wins, conflicts = 0, 0
        for w, c in ipairs(children) do
            local out = collect(c)
            local a, b = out:match("OK (%d+) (%d+)")
            assert(a, "writer " .. w .. " failed:\n" .. out)
            wins, conflicts = wins + tonumber(a), conflicts + tonumber(b)
        end
        return wins, conflicts
    end

    it("N writers on one aggregate: one winner per version, sequences contiguous", function()
        local agg_type, event_name = support.unique("Hot"), support.unique("hot.deposited")
        local done = support.unique("done")
        support.psql("CREATE TABLE " .. done .. " (writer int, ok boolean)")
        local id = qx.uuid()
        local writers, per_writer = 4, 12
        local children = start_writers(writers, { id }, per_writer, 15, agg_type, event_name, done)
        local wins, conflicts = results(children)
        assert.equal(writers * per_writer, wins)
        assert.is_true(conflicts > 0, "no writer ever lost a race: the test did not overlap them")

        local rows = assert(db:query([[
SELECT sequence, payload->>'writer' AS writer, payload->>'n' AS n, payload->>'attempt' AS attempt,
       payload->>'j' AS j
FROM qx_aggregate_events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence]],
            agg_type, id))
        -- contiguous: 1..count, one row each (the unique key would refuse a second)
        for i, r in ipairs(rows) do assert.equal(i, r.sequence) end
        -- every command stored once, from one attempt only, its events in order
        local commands, attempt_of = {}, {}
        for _, r in ipairs(rows) do
            local key = r.writer .. "/" .. r.n
            if not commands[key] then commands[key] = 0 end
            commands[key] = commands[key] + 1
            assert.equal(tostring(commands[key]), r.j)
            attempt_of[key] = attempt_of[key] or r.attempt
            assert.equal(attempt_of[key], r.attempt, "two attempts of " .. key .. " were stored")
        end
        local distinct = 0
        for _ in pairs(commands) do distinct = distinct + 1 end
        assert.equal(wins, distinct)

        -- the aggregate loads back to the sum of what was stored
        local Deposited = qx.event(event_name)
        local Account = qx.event_sourced(agg_type)
        Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        local acc = assert(db:unit_of_work(function(uow)
            return uow:store(qx.event_store{}):load(Account, id)
        end))
        assert.equal(#rows, acc.version)
        assert.equal(#rows, acc.balance)
    end)

    it("gap-safety: a projection running alongside late-committing writers applies every event once, in stream order",
       function()
        local agg_type, event_name = support.unique("Gap"), support.unique("gap.deposited")
        local done, applied = support.unique("done"), support.unique("applied")
        support.psql("CREATE TABLE " .. done .. " (writer int, ok boolean)")
        support.psql("CREATE TABLE " .. applied .. " (event_id uuid PRIMARY KEY, agg text NOT NULL, "
            .. "seq int NOT NULL, runner text NOT NULL, apply_no bigserial)")
        local name = support.unique("gapproj")
        local ids = {}
        for i = 1, 6 do ids[i] = qx.uuid() end
        local writers, per_writer = 4, 25

        local children = start_writers(writers, ids, per_writer, 40, agg_type, event_name, done)
        local runner = spawn(RUNNER, { QX_DB__URL = support.db_url(), W_EVENT = event_name,
            W_DONE = done, P_APPLIED = applied, P_NAME = name, P_WRITERS = writers })

        local p = qx.projection{ name = name, db = db, batch_size = 5, on_progress = false,
            handlers = { [event_name] = function(ev, uow)
          assert(uow:queue("INSERT INTO " .. applied
                    .. " (event_id, agg, seq, runner) VALUES ($1, $2, $3, 'parent')",
                    ev.event_id, ev.aggregate_id, ev._sequence))
            end } }
        local applied_while_writing
        local function writers_done()
            local rows = assert(db:query("SELECT count(*) AS n FROM " .. done))
            if rows[1].n >= writers then
          if not applied_while_writing then
                    applied_while_writing = assert(db:query("SELECT count(*) AS n FROM " .. applied))[1].n
          end
          return true
            end
            return false
        end
        local n1 = assert(p:run{ poll_ms = 50, max_seconds = 90, stop = writers_done })
        local n2 = assert(p:catch_up())
        local wins = results(children)
        assert.equal(writers * per_writer, wins)
        local runner_out = collect(runner)
        local n_child = tonumber(runner_out:match("OK (%d+)"))
        assert(n_child, "the second runner failed:\n" .. runner_out)
        -- let the child's last batch be counted: catch up once more after it exited
        local n3 = assert(p:catch_up())

        local stored = assert(db:query([[
SELECT count(*) AS n FROM qx_aggregate_events WHERE aggregate_type = $1]], agg_type))[1].n
        local got = assert(db:query("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM " .. applied))[1]
        assert.equal(stored, got.n)                         -- every event ...
        assert.equal(got.n, got.d)                          -- ... once
        assert.equal(stored, n1 + n2 + n3 + n_child)        -- and the runners agree
        local missing = assert(db:query(([[
SELECT count(*) AS n FROM qx_aggregate_events e WHERE e.aggregate_type = $1
  AND NOT EXISTS (SELECT 1 FROM %s a WHERE a.event_id = e.id)]]):format(applied), agg_type))[1].n
        assert.equal(0, missing)
        assert.is_true(applied_while_writing > 0, "the projection did not run while writers wrote")

        -- per-aggregate order: in the order applied, each stream's sequences are 1, 2, 3, ...
        local order = assert(db:query("SELECT agg, seq FROM " .. applied .. " ORDER BY apply_no"))
        local last = {}
        for _, r in ipairs(order) do
            assert.equal((last[r.agg] or 0) + 1, r.seq, "stream " .. r.agg .. " applied out of order")
            last[r.agg] = r.seq
        end
        local status = assert(p:status())
        assert.equal(stored, status.events_applied)
        assert.equal(0, status.behind)
    end)
end)

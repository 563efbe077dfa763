-- The unit of work against a real PostgreSQL: one transaction around a command handler, the
-- transactional outbox, context stamping, domain handlers inside the transaction, rollback on
-- every kind of failure, hooks, savepoints, and the round trips it costs.
local qx = require "qx"
local core = require "qx.core"
local support = require "support"
local internal = require "qx.store.internal"

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set: source the servers' env file")
local SFX = core.uuid():gsub("-", ""):sub(-12)
local USERS = "uow_spec_users_" .. SFX

-- Every batch is one pipeline ending in one Sync: one round trip. Counting the calls that reach
-- the connection (batch, query, script) and the round trips of the unit of work's transaction
-- (tx:round_trips() moves on each one; tx:sent() lists what it sent) counts the round trips a
-- unit of work costs; a call with nothing to send makes none.
local conn_methods = debug.getregistry()["qx.conn"].__index
local tx_methods = debug.getregistry()["qx.tx"].__index
local unpack = table.unpack or unpack

-- The SQL texts of what a batch or query call sends, in order.
local function texts_of(m, stmts)
    local out = {}
    if m == "batch" then
        for _, s in ipairs(stmts) do out[#out + 1] = s[1] end
    else
        out[1] = stmts
    end
    return out
end

-- Runs fn with every call to the connection and the transaction watched; on_call(texts) sees
-- the SQL of each round trip. Returns the number of round trips and fn's results.
local function watch(on_call, fn)
    local n = 0
    local saved, saved_tx = {}, {}
    for _, m in ipairs({ "batch", "query", "script" }) do
        local real = conn_methods[m]
        saved[m] = real
        conn_methods[m] = function(c, ...)
            local texts = texts_of(m, ...)
            if #texts > 0 then
                n = n + 1
                if on_call then on_call(texts) end
            end
            return real(c, ...)
        end
    end
    for _, m in ipairs({ "query", "rows", "rows_upto", "exec", "flush", "rollback_to", "commit",
                         "rollback" }) do
        local real = tx_methods[m]
        saved_tx[m] = real
        tx_methods[m] = function(tx, ...)
            local before = tx:round_trips()
            local function after(...)
                if tx:round_trips() > before then
                    n = n + 1
                    if on_call then on_call(tx:sent()) end
                end
                return ...
            end
            return after(real(tx, ...))
        end
    end
    local r = { n = 0 }
    local function keep(ok, ...)
        r.n = select("#", ...)
        for i = 1, r.n do r[i] = select(i, ...) end
        return ok
    end
    local ok = keep(pcall(fn))
    for m, real in pairs(saved) do conn_methods[m] = real end
    for m, real in pairs(saved_tx) do tx_methods[m] = real end
    assert(ok, r[1])
    return n, unpack(r, 1, r.n)
end

local function round_trips(fn)
    return watch(nil, fn)
end

-- the SQL texts fn sends, in order
local function sent_sql(fn)
    local seen = {}
    watch(function(texts) for _, t in ipairs(texts) do seen[#seen + 1] = t end end, fn)
    return seen
end

describe("unit of work", function()
    local db, listener
    local Registered = qx.integration_event("uow_spec.user.registered", { version = 3 })
    local Welcomed = qx.integration_event("uow_spec.user.welcomed")
    local Renamed = qx.event("uow_spec.user.renamed") -- domain only
    local User = qx.aggregate("UowSpecUser")

    local function count_users(name)
        return assert(db:query("SELECT count(*) AS n FROM " .. USERS .. " WHERE name = $1", name))[1].n
    end
    local function outbox_row(id)
        return assert(db:query([[SELECT id::text AS id, event_name, event_version, payload,
        occurred_at, correlation_id::text AS correlation_id, causation_id::text AS causation_id,
        tenant_id::text AS tenant_id, published_at, attempts, last_error, partition_key
      FROM qx_outbox_events WHERE id = $1]], id))[1]
    end
    local function outbox_count_named(name)
        return assert(db:query("SELECT count(*) AS n FROM qx_outbox_events"
            .. " WHERE payload->'payload'->>'name' = $1", name))[1].n
    end
    -- forget notifications that earlier units of work sent
    -- until 50 ms pass without one: an earlier test's NOTIFY may still be on its way, and would
    -- be counted as this test's (same pooled backend, same pid)
    local function drain()
        repeat until #assert(listener:notifications(50)) == 0
    end
    -- notifications on qx_outbox sent by backend `pid`
    local function notified_by(pid, wait_ms)
        return support.notified_by(listener, "qx_outbox", pid, wait_ms)
    end
    local function no_open_transaction(pool_db)
        -- the next unit of work on the pool starts on a connection that is idle, not in a transaction
        local status
        assert(pool_db:unit_of_work(function(uow)
            status = uow.conn:status()
            return true
        end))
        return status == "idle"
    end

    setup(function()
        -- one connection listens; a nested unit of work needs two more
        db = assert(qx.connect{ url = URL, pool_size = 3, statement_timeout_ms = 5000, acquire_timeout_ms = 2000 })
        assert(qx.migrate(db))
        assert(db:exec("CREATE TABLE " .. USERS
            .. " (id uuid PRIMARY KEY, name text NOT NULL, visits int NOT NULL DEFAULT 0)"))
        listener = assert(db.pool:acquire())
        assert(listener:listen("qx_outbox"))
    end)

    teardown(function()
        listener:release()
        db:exec("DROP TABLE IF EXISTS " .. USERS)
        db:close()
    end)

    describe("commit", function()
        it("writes the aggregate row and its integration events in one transaction", function()
            local name = "ann-" .. SFX
            local id, err = db:unit_of_work(function(uow)
          local u = User.new{ name = name }
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", u.id, u.name))
          u:record(Registered{ name = name })
          u:record(Welcomed{ name = name })
          uow:track(u)
          return u.id
            end)
            assert.is_nil(err)
            assert.is_true(qx.is_uuid(id))
            assert.equal(1, count_users(name))
            local rows = assert(db:query([[SELECT event_name, xmin::text AS tx, partition_key FROM qx_outbox_events
        WHERE payload->'payload'->>'name' = $1 ORDER BY seq]], name))
            assert.equal(2, #rows)
            assert.equal("uow_spec.user.registered", rows[1].event_name)
            assert.equal("uow_spec.user.welcomed", rows[2].event_name)
            assert.equal("UowSpecUser:" .. id, rows[1].partition_key)
            -- written by the same transaction as the aggregate row
            local user_tx = assert(db:query("SELECT xmin::text AS tx FROM " .. USERS .. " WHERE id = $1", id))[1].tx
            assert.equal(user_tx, rows[1].tx)
            assert.equal(user_tx, rows[2].tx)
        end)

        it("stores the envelope exactly as the design says, and fills the columns from it", function()
            local name = "env-" .. SFX
            local ctx = { tenant_id = qx.uuid(), user_id = "actor-7", correlation_id = qx.uuid(),
                          causation_id = qx.uuid() }
            local ev
            assert(db:unit_of_work(function(uow)
          ev = uow:record(Registered{ name = name, tags = { "a", "b" } })
          return true
            end, { context = ctx }))
            local row = outbox_row(ev.event_id)
            local env = row.payload
            local keys = {}
            for k in pairs(env) do keys[#keys + 1] = k end
            table.sort(keys)
            assert.same({ "actor_id", "causation_id", "correlation_id", "event_id", "event_name",
                          "event_version", "occurred_at", "payload", "tenant_id" }, keys)
            assert.equal(ev.event_id, env.event_id)
            assert.equal("uow_spec.user.registered", env.event_name)
            assert.equal(3, env.event_version)
            assert.truthy(env.occurred_at:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d+Z$"))
            assert.equal(ctx.correlation_id, env.correlation_id)
            assert.equal(ctx.causation_id, env.causation_id)
            assert.equal(ctx.tenant_id, env.tenant_id)
            assert.equal("actor-7", env.actor_id)
            assert.same({ name = name, tags = { "a", "b" } }, env.payload)
            -- columns
            assert.equal(ev.event_id, row.id)
            assert.equal("uow_spec.user.registered", row.event_name)
            assert.equal(3, row.event_version)
            assert.equal(ctx.correlation_id, row.correlation_id)
            assert.equal(ctx.causation_id, row.causation_id)
            assert.equal(ctx.tenant_id, row.tenant_id)
            assert.equal(core.null, row.published_at)
            assert.equal(0, row.attempts)
            assert.equal(core.null, row.last_error)
            assert.equal(core.null, row.partition_key) -- not recorded by an aggregate
            local same = assert(db:query(
                "SELECT $1::timestamptz = occurred_at AS same FROM qx_outbox_events WHERE id = $2",
                                         env.occurred_at, ev.event_id))[1].same
            assert.is_true(same)
        end)

        it("writes every integration event of a unit of work in recording order, few or many", function()
            for _, count in ipairs({ 3, 40 }) do -- a VALUES row each, or one JSON array
          local name = "many-" .. count .. "-" .. SFX
          local ids = {}
          assert(db:unit_of_work(function(uow)
                    local u = uow:track(User.new{ name = name })
                    for i = 1, count do ids[i] = u:record(Registered{ name = name, i = i }).event_id end
                    return true
          end, { context = { tenant_id = qx.uuid() } }))
          local rows = assert(db:query([[SELECT id::text AS id, payload, partition_key, tenant_id::text AS tenant_id
          FROM qx_outbox_events WHERE payload->'payload'->>'name' = $1 ORDER BY seq]], name))
          assert.equal(count, #rows)
          for i, r in ipairs(rows) do
                    assert.equal(ids[i], r.id)
                    assert.equal(ids[i], r.payload.event_id)
                    assert.equal(i, r.payload.payload.i)
                    assert.equal(r.payload.tenant_id, r.tenant_id)
                    assert.truthy(r.partition_key:find("^UowSpecUser:"))
          end
            end
        end)

        it("sends NOTIFY qx_outbox on commit", function()
            drain()
            local pid
            assert(db:unit_of_work(function(uow)
          pid = uow.conn:pid()
          uow:record(Registered{ name = "notify-" .. SFX })
          return true
            end))
            assert.equal(1, notified_by(pid, 500))
        end)

        it("wakes listeners after COMMIT, in a transaction of its own, once per channel", function()
            -- inside the transaction the NOTIFY would serialise every notifying commit of the
            -- cluster through its WAL flush; after it, in the same round trip, it does not
            local name = "after-commit-" .. SFX
            local sent = sent_sql(function()
          assert(db:unit_of_work(function(uow)
                    uow:record(Registered{ name = name })
                    uow:record(Welcomed{ name = name })
                    internal.notify_after(uow, "qx_outbox") -- asked twice: still one
                    return true
          end))
            end)
            assert.truthy(sent[1]:find("^BEGIN"), sent[1])
            assert.truthy(sent[#sent - 1]:find("^COMMIT"), sent[#sent - 1])
            local wake = sent[#sent]
            assert.truthy(wake:find("pg_notify", 1, true), wake)
            assert.truthy(wake:find("synchronous_commit", 1, true), wake)
            local _, calls = wake:gsub("pg_notify", "")
            assert.equal(1, calls)
            assert.equal(2, outbox_count_named(name))
            assert.is_true(no_open_transaction(db))
        end)

        it("lets a woken listener see the rows, and a failed COMMIT wakes no one", function()
            drain()
            local pid, seen
            assert(db:unit_of_work(function(uow)
          pid = uow.conn:pid()
          uow:record(Registered{ name = "seen-" .. SFX })
          return true
            end))
            local deadline = core.clock() + 2
            repeat
          for _, ev in ipairs(assert(listener:notifications(50))) do
                    if ev.channel == "qx_outbox" and ev.pid == pid then
                  -- read at once on another connection: the row is committed
                  seen = assert(db:query("SELECT count(*) AS n FROM qx_outbox_events "
                .. "WHERE payload->'payload'->>'name' = $1", "seen-" .. SFX))[1].n
                    end
          end
            until seen or core.clock() > deadline
            assert.equal(1, seen)
            -- a deferred constraint fails at COMMIT: the wake-up behind it is skipped
            drain()
            local ok, err = db:unit_of_work(function(uow)
          pid = uow.conn:pid()
          assert(uow:queue("CREATE TEMP TABLE defer_spec (id int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP"))
          assert(uow:queue("INSERT INTO defer_spec VALUES (1), (1)"))
          uow:record(Registered{ name = "failed-commit-" .. SFX })
          return true
            end)
            assert.is_nil(ok)
            assert.equal("conflict", err.code)
            assert.equal(0, notified_by(pid, 300))
            assert.equal(0, outbox_count_named("failed-commit-" .. SFX))
        end)

        it("keeps a committed unit of work committed when only the wake-up after it fails", function()
            local name = "wake-fails-" .. SFX
            local reported
            local ok, err = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
          internal.notify_after(uow, string.rep("x", 100)) -- PostgreSQL refuses a channel name this long
          return "done"
            end, { on_hook_error = function(e, what) reported = { e = e, what = what } end })
            assert.equal("done", ok, tostring(err))
            assert.equal(1, count_users(name))
            assert.equal("notify", reported.what)
            assert.truthy(tostring(reported.e):find("channel name too long", 1, true), tostring(reported.e))
            assert.is_true(no_open_transaction(db))
        end)

        it("sends no NOTIFY when it rolls back, nor when there is no integration event", function()
            drain()
            local pid
            local ok = db:unit_of_work(function(uow)
          pid = uow.conn:pid()
          uow:record(Registered{ name = "no-notify-" .. SFX })
          assert(uow:exec("SELECT 1"))
          error("changed my mind")
            end)
            assert.is_nil(ok)
            assert.equal(0, notified_by(pid, 300))
            assert(db:unit_of_work(function(uow)
          pid = uow.conn:pid()
          uow:record(Renamed{ name = "x" })
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), "quiet-" .. SFX))
          return true
            end))
            assert.equal(0, notified_by(pid, 300))
        end)

        it("returns every value the function returns, and true when it returns none", function()
            local a, b, c = db:unit_of_work(function() return 1, nil, "three" end)
            assert.equal(1, a)
            assert.is_nil(b)
            assert.equal("three", c)
            assert.is_true(db:unit_of_work(function() end))
        end)
    end)

    describe("context stamping", function()
        it("stamps correlation, causation, tenant and actor onto events that lack them", function()
            local ctx = { tenant_id = qx.uuid(), actor_id = "svc-1", correlation_id = qx.uuid(),
                          causation_id = qx.uuid() }
            local ev
            assert(db:unit_of_work(function(uow)
          ev = uow:record(Registered{ name = "stamp-" .. SFX })
          return true
            end, { context = ctx }))
            local env = outbox_row(ev.event_id).payload
            assert.equal(ctx.tenant_id, env.tenant_id)
            assert.equal("svc-1", env.actor_id)
            assert.equal(ctx.correlation_id, env.correlation_id)
            assert.equal(ctx.causation_id, env.causation_id)
        end)

        it("does not override ids the event already has", function()
            local mine = { tenant_id = qx.uuid(), actor_id = "me", correlation_id = qx.uuid(),
                           causation_id = qx.uuid() }
            local ev
            assert(db:unit_of_work(function(uow)
          ev = uow:record(Registered{ name = "own-" .. SFX, tenant_id = mine.tenant_id, actor_id = mine.actor_id,
                                      correlation_id = mine.correlation_id, causation_id = mine.causation_id })
          return true
            end, { context = { tenant_id = qx.uuid(), user_id = "ctx-user", correlation_id = qx.uuid(),
                               causation_id = qx.uuid() } }))
            local env = outbox_row(ev.event_id).payload
            assert.equal(mine.tenant_id, env.tenant_id)
            assert.equal("me", env.actor_id)
            assert.equal(mine.correlation_id, env.correlation_id)
            assert.equal(mine.causation_id, env.causation_id)
        end)

        it("gives all events of a unit of work without a correlation id one of its own", function()
            local e1, e2, corr
            assert(db:unit_of_work(function(uow)
          corr = uow.correlation_id
          e1 = uow:record(Registered{ name = "corr1-" .. SFX })
          e2 = uow:record(Welcomed{ name = "corr2-" .. SFX })
          return true
            end))
            assert.is_true(qx.is_uuid(corr))
            assert.equal(corr, outbox_row(e1.event_id).correlation_id)
            assert.equal(corr, outbox_row(e2.event_id).correlation_id)
            assert.equal(core.null, outbox_row(e1.event_id).tenant_id)
            assert.equal(core.null, outbox_row(e1.event_id).payload.actor_id)
        end)

        it("refuses a context id that is not a uuid, before touching the database", function()
            local n, ok, err = round_trips(function()
          return db:unit_of_work(function() error("must not run") end, { context = { tenant_id = "tenant-1" } })
            end)
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            assert.truthy(err.message:find("tenant_id", 1, true))
            assert.equal(0, n)
        end)
    end)

    describe("domain handlers", function()
        it("run inside the transaction, write through the same uow, and commit with it", function()
            local d = qx.dispatcher()
            local seen_pid
            d:on(Renamed, function(ev, uow)
          seen_pid = uow.conn:pid()
          return uow:queue("UPDATE " .. USERS .. " SET visits = visits + 1 WHERE id = $1", ev.aggregate_id)
            end)
            local name = "handled-" .. SFX
            local id, uow_pid
            assert(db:unit_of_work(function(uow)
          uow_pid = uow.conn:pid()
          local u = uow:track(User.new{ name = name })
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", u.id, u.name))
          u:record(Renamed{ name = name })
          id = u.id
          return true
            end, { dispatcher = d }))
            assert.equal(uow_pid, seen_pid)
            assert.equal(1, assert(db:query("SELECT visits FROM " .. USERS .. " WHERE id = $1", id))[1].visits)
        end)

        it("drain the events their handlers record, and write the integration ones to the outbox", function()
            local d = qx.dispatcher()
            local name = "chain-" .. SFX
            d:on(Renamed, function(ev, uow) uow:record(Welcomed{ name = ev.name }) end)
            d:on(Welcomed, function(ev, uow) uow:record(Registered{ name = ev.name }) end)
            assert(db:unit_of_work(function(uow)
          uow:record(Renamed{ name = name })
          return true
            end, { dispatcher = d }))
            local rows = assert(db:query("SELECT event_name FROM qx_outbox_events"
                .. " WHERE payload->'payload'->>'name' = $1 ORDER BY seq", name))
            assert.equal(2, #rows)
            assert.equal("uow_spec.user.welcomed", rows[1].event_name)
            assert.equal("uow_spec.user.registered", rows[2].event_name)
        end)

        it("uses the dispatcher given to qx.connect by default", function()
            local d = qx.dispatcher()
            local n = 0
            d:on(Renamed, function() n = n + 1 end)
            local db2 = assert(qx.connect{ url = URL, pool_size = 1, dispatcher = d })
            assert(db2:unit_of_work(function(uow) uow:record(Renamed{ name = "x" }) return true end))
            assert.equal(1, n)
            db2:close()
        end)
    end)

    describe("failure", function()
        it("fails as invalid when an integration event cannot be JSON, and writes nothing", function()
            local name = "unjson-" .. SFX
            local cycle = {}
            cycle.self = cycle
            -- alone (the one-event insert) and after another event (the many-event one)
            for _, case in ipairs { { cycle, false }, { { [true] = 1 }, false }, { cycle, true },
                                    { { [true] = 1 }, true } } do
                local res, e = db:unit_of_work(function(uow)
                    assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
                    if case[2] then uow:record(Welcomed{ name = name }) end
                    uow:record(Registered{ name = name, bad = case[1] })
                    return true
                end)
                assert.is_nil(res)
                assert.equal("invalid", e.code)
                assert.matches("uow_spec.user.registered cannot be sent as JSON", e.message, 1, true)
            end
            assert.equal(0, count_users(name))
            assert.equal(0, outbox_count_named(name))
        end)

        local function assert_rolled_back(name, ok, err, code)
            assert.is_nil(ok)
            assert.equal(code, err.code)
            assert.equal(0, count_users(name))
            assert.equal(0, outbox_count_named(name))
            assert.is_true(no_open_transaction(db))
        end

        local function write(uow, name)
            local u = uow:track(User.new{ name = name })
            assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", u.id, u.name))
            u:record(Registered{ name = name })
            return u
        end

        it("rolls back on a Lua error, returning it with a traceback", function()
            local name = "lua-error-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          assert(uow:flush()) -- the insert reached the server
          error("boom")
            end)
            assert_rolled_back(name, ok, err, "error")
            assert.truthy(err.message:find("boom", 1, true))
            assert.equal("string", type(err.traceback))
        end)

        it("returns a qx error raised by the function unchanged", function()
            local name = "raised-" .. SFX
            local mine = qx.error.new("not_found", "no such account")
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          error(mine)
            end)
            assert_rolled_back(name, ok, err, "not_found")
            assert.equal(mine, err)
        end)

        it("rolls back when a domain handler fails", function()
            local d = qx.dispatcher()
            d:on(Registered, function() error("handler says no") end)
            local name = "handler-" .. SFX
            local ok, err = db:unit_of_work(function(uow) write(uow, name) return true end, { dispatcher = d })
            assert_rolled_back(name, ok, err, "error")
            assert.truthy(err.message:find("handler says no", 1, true))
        end)

        it("rolls back when a domain handler returns nil, err", function()
            local d = qx.dispatcher()
            d:on(Registered, function() return nil, qx.error.new("conflict", "taken") end)
            local name = "handler-ret-" .. SFX
            local ok, err = db:unit_of_work(function(uow) write(uow, name) return true end, { dispatcher = d })
            assert_rolled_back(name, ok, err, "conflict")
        end)

        it("rolls back when a statement fails", function()
            local name = "stmt-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          local r, e = uow:exec("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", "not-a-uuid", name)
          if not r then error(e) end
          return true
            end)
            assert_rolled_back(name, ok, err, "invalid")
            assert.equal("22P02", err.sqlstate)
        end)

        it("rolls back when a statement fails even if the function swallowed the error", function()
            local name = "swallowed-" .. SFX
            local later
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          uow:exec("SELECT * FROM uow_spec_no_such_table")      -- error ignored
          later = { uow:exec("SELECT 1") }                       -- the transaction is lost
          return true
            end)
            assert_rolled_back(name, ok, err, "db")
            assert.equal("42P01", err.sqlstate)
            assert.is_nil(later[1])
            assert.equal("42P01", later[2].sqlstate)
        end)

        it("rolls back when a queued statement fails at commit", function()
            local name = "queued-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, NULL)", qx.uuid())
          return true
            end)
            assert_rolled_back(name, ok, err, "invalid")
            assert.equal("23502", err.sqlstate)
        end)

        it("rolls back on a duplicate key as conflict", function()
            local id = qx.uuid()
            assert(db:exec("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, 'first')", id))
            local name = "dup-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", id, name)
          return true
            end)
            assert_rolled_back(name, ok, err, "conflict")
        end)

        it("rolls back when the COMMIT itself fails (a deferred constraint)", function()
            local name = "deferred-" .. SFX
            local parent, child = USERS .. "_dparent", USERS .. "_dchild"
            assert(db:exec("CREATE TABLE " .. parent .. " (id int PRIMARY KEY)"))
            assert(db:exec("CREATE TABLE " .. child
                .. " (pid int REFERENCES " .. parent .. " DEFERRABLE INITIALLY DEFERRED)"))
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          assert(uow:queue("INSERT INTO " .. child .. " VALUES (7)"))
          return true
            end)
            assert_rolled_back(name, ok, err, "invalid")
            assert.equal("23503", err.sqlstate)
            assert(db:exec("DROP TABLE " .. child))
            assert(db:exec("DROP TABLE " .. parent))
        end)

        it("rolls back an event whose payload JSON cannot hold", function()
            for what, bad in pairs({ ["a function"] = { f = function() end },
                                     ["a userdata"] = { out = io.stdout },
                                     ["a cyclic table"] = (function() local t = {} t.t = t return { t = t } end)() }) do
          local name = "payload-" .. SFX
          local ok, err = db:unit_of_work(function(uow)
                    write(uow, name)
                    uow:record(Welcomed{ name = name, bad = bad })
                    return true
          end)
          assert_rolled_back(name, ok, err, "invalid")
          assert.truthy(err.message:find("JSON", 1, true), what)
            end
        end)

        it("rolls back an event whose id is not a uuid", function()
            local name = "bad-id-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          uow:record(Welcomed{ name = name, event_id = "event-1" })
          return true
            end)
            assert_rolled_back(name, ok, err, "invalid")
        end)

        it("rolls back an unknown table or column as db", function()
            local name = "unknown-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          uow:queue("INSERT INTO " .. USERS .. " (id, name, nope) VALUES ($1, $2, 1)", qx.uuid(), name)
          return true
            end)
            assert_rolled_back(name, ok, err, "db")
            assert.equal("42703", err.sqlstate)
        end)

        it("turns a statement_timeout into timeout and rolls back", function()
            local name = "slow-" .. SFX
            local t0 = core.clock()
            local ok, err = db:unit_of_work(function(uow)
          write(uow, name)
          local r, e = uow:exec("SELECT pg_sleep(2)")
          if not r then error(e) end
          return true
            end, { statement_timeout_ms = 100 })
            assert.is_true(core.clock() - t0 < 1.9) -- cancelled, not slept through
            assert_rolled_back(name, ok, err, "timeout")
            assert.equal("57014", err.sqlstate)
        end)

        it("sends SET LOCAL statement_timeout only when it differs from the connection's", function()
            local seen = sent_sql(function()
          assert(db:unit_of_work(function(uow)
                    assert.equal("5s", assert(uow:query("SHOW statement_timeout"))[1].statement_timeout)
                    return true
          end))
            end)
            for _, sql in ipairs(seen) do assert.is_nil(sql:find("set_config('statement_timeout'", 1, true), sql) end
            seen = sent_sql(function()
          assert(db:unit_of_work(function(uow)
                    assert.equal("0", assert(uow:query("SHOW statement_timeout"))[1].statement_timeout)
                    return true
          end, { statement_timeout_ms = 0 }))
            end)
            assert.equal("BEGIN", seen[1])
            assert.truthy(seen[2]:find("set_config('statement_timeout'", 1, true))
        end)

        it("keeps the statement_timeout local to its transaction", function()
            assert(db:unit_of_work(function(uow)
          assert.equal("100ms", assert(uow:query("SHOW statement_timeout"))[1].statement_timeout)
          return true
            end, { statement_timeout_ms = 100 }))
            local conn = assert(db.pool:acquire())
            local other = conn:query("SHOW statement_timeout")[1].statement_timeout
            conn:release()
            assert.are_not.equal("100ms", other)
        end)

        it("returns a pool timeout when no connection is free, running nothing", function()
            local db1 = assert(qx.connect{ url = URL, pool_size = 1, acquire_timeout_ms = 100 })
            local ran = false
            local outer_ok, inner_ok, inner_err = db1:unit_of_work(function()
          return true, db1:unit_of_work(function() ran = true end)
            end)
            assert.is_true(outer_ok)
            assert.is_nil(inner_ok)
            assert.equal("timeout", inner_err.code)
            assert.is_false(ran)
            db1:close()
        end)
    end)

    describe("hooks", function()
        it("run pre_commit then post_commit around a commit", function()
            local log = {}
            assert(db:unit_of_work(function()
          log[#log + 1] = "fn"
          return true
            end, {
          pre_commit = function(uow) log[#log + 1] = "pre_commit:" .. uow.conn:status() end,
          post_commit = function() log[#log + 1] = "post_commit" end,
          pre_rollback = function() log[#log + 1] = "pre_rollback" end,
          post_rollback = function() log[#log + 1] = "post_rollback" end,
            }))
            assert.same({ "fn", "pre_commit:idle", "post_commit" }, log)
        end)

        it("run pre_rollback then post_rollback with the error", function()
            local log = {}
            local ok = db:unit_of_work(function(uow)
          assert(uow:exec("SELECT 1"))
          error("no")
            end, {
          pre_commit = function() log[#log + 1] = "pre_commit" end,
          post_commit = function() log[#log + 1] = "post_commit" end,
          pre_rollback = function(uow, e) log[#log + 1] = "pre_rollback:" .. e.code .. ":" .. uow.conn:status() end,
          post_rollback = function(_, e) log[#log + 1] = "post_rollback:" .. e.code end,
            })
            assert.is_nil(ok)
            assert.same({ "pre_rollback:error:intrans", "post_rollback:error" }, log)
        end)

        it("let pre_commit write in the transaction, and its error roll everything back", function()
            local name = "pre-commit-" .. SFX
            assert(db:unit_of_work(function() return true end, {
          pre_commit = function(uow)
                    assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
                    uow:record(Welcomed{ name = name })
          end,
            }))
            assert.equal(1, count_users(name))
            assert.equal(1, outbox_count_named(name))

            local name2 = "pre-commit-fails-" .. SFX
            local log = {}
            local ok, err = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name2))
          return true
            end, {
          pre_commit = function() error("audit refused") end,
          post_commit = function() log[#log + 1] = "post_commit" end,
          post_rollback = function() log[#log + 1] = "post_rollback" end,
            })
            assert.is_nil(ok)
            assert.truthy(err.message:find("audit refused", 1, true))
            assert.equal(0, count_users(name2))
            assert.same({ "post_rollback" }, log)
        end)

        it("do not change a commit when post_commit fails; the error goes to on_hook_error", function()
            local name = "post-commit-" .. SFX
            local reported
            local id = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
          return "done"
            end, {
          post_commit = function() error("mailer down") end,
          on_hook_error = function(e, hook) reported = hook .. ": " .. e.message end,
            })
            assert.equal("done", id)
            assert.equal(1, count_users(name))
            assert.truthy(reported:find("^post_commit: .*mailer down"))
        end)

        it("still roll back when pre_rollback fails, keeping the hook error on the error", function()
            local name = "pre-rollback-" .. SFX
            local reported
            local ok, err = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
          assert(uow:flush())
          error("first")
            end, {
          pre_rollback = function() error("second") end,
          post_rollback = function() error("third") end,
          on_hook_error = function(_, hook) reported = hook end,
            })
            assert.is_nil(ok)
            assert.truthy(err.message:find("first", 1, true))
            assert.truthy(err.hook_error.message:find("second", 1, true))
            assert.equal("post_rollback", reported)
            assert.equal(0, count_users(name))
            assert.is_true(no_open_transaction(db))
        end)

        it("raise on a hook that is not a function (misuse)", function()
            assert.has_error(function() db:unit_of_work(function() end, { pre_commit = "yes" }) end)
        end)
    end)

    describe("tracking", function()
        -- the names of the outbox rows written for names, in the order the unit of work wrote them
        local function outbox_names(prefix)
            local rows = assert(db:query("SELECT payload->'payload'->>'name' AS name FROM qx_outbox_events"
                .. " WHERE payload->'payload'->>'name' LIKE $1 ORDER BY seq", prefix .. "%"))
            local out = {}
            for i, r in ipairs(rows) do out[i] = r.name end
            return out
        end

        it("writes each tracked aggregate's events once, in the order of tracking, however often tracked", function()
            local p = "trk-" .. SFX .. "-"
            assert(db:unit_of_work(function(uow)
                local a, b, c = User.new{ name = "a" }, User.new{ name = "b" }, User.new{ name = "c" }
                a:record(Welcomed{ name = p .. "a" })
                b:record(Welcomed{ name = p .. "b" })
                c:record(Welcomed{ name = p .. "c" })
                for _, agg in ipairs { a, a, b, a, c, b, c, a } do
                    assert.equal(agg, uow:track(agg))
                end
                return true
            end))
            assert.same({ p .. "a", p .. "b", p .. "c" }, outbox_names(p))
        end)

        it("forgets what a rolled-back savepoint tracked, and tracks it again after", function()
            local p = "trk-sp-" .. SFX .. "-"
            assert(db:unit_of_work(function(uow)
                local a, b = User.new{ name = "a" }, User.new{ name = "b" }
                a:record(Welcomed{ name = p .. "a" })
                b:record(Welcomed{ name = p .. "b" })
                uow:track(a)
                assert.is_nil(uow:savepoint(function()
                    uow:track(b)
                    uow:track(a)
                    error("inner scope fails")
                end))
                uow:track(b)
                uow:track(b)
                return true
            end))
            -- b's events stay in b (a savepoint rewinds the tracking, not the aggregate): once
            assert.same({ p .. "a", p .. "b" }, outbox_names(p))
        end)
    end)

    describe("savepoints", function()
        it("roll back only the inner scope on error, and the transaction goes on", function()
            local outer, inner = "sp-outer-" .. SFX, "sp-inner-" .. SFX
            local sp_ok, sp_err
            assert(db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), outer))
          uow:record(Welcomed{ name = outer })
          sp_ok, sp_err = uow:savepoint(function()
                    assert(uow:exec("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), inner))
                    uow:record(Welcomed{ name = inner })
                    local r, e = uow:exec("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, NULL)", qx.uuid())
                    if not r then error(e) end
          end)
          return true
            end))
            assert.is_nil(sp_ok)
            assert.equal("23502", sp_err.sqlstate)
            assert.equal(1, count_users(outer))
            assert.equal(1, outbox_count_named(outer))
            assert.equal(0, count_users(inner))
            assert.equal(0, outbox_count_named(inner))
        end)

        it("keep the inner writes and return the function's values on success", function()
            local name = "sp-ok-" .. SFX
            local v
            assert(db:unit_of_work(function(uow)
          v = uow:savepoint(function()
                    assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
                    return 42
          end)
          return true
            end))
            assert.equal(42, v)
            assert.equal(1, count_users(name))
        end)

        it("drop queued writes of a failed scope that never reached the server", function()
            local name = "sp-queued-" .. SFX
            local n = round_trips(function()
          assert(db:unit_of_work(function(uow)
                    uow:savepoint(function()
              assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
              error("nope")
                    end)
                    return true
          end))
            end)
            assert.equal(0, n) -- nothing was left to send
            assert.equal(0, count_users(name))
        end)

        it("report the original error when a write queued before the savepoint fails", function()
            local name = "sp-before-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, NULL)", qx.uuid())
          uow:savepoint(function()
                    assert(uow:exec("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
          end)
          return true
            end)
            assert.is_nil(ok)
            assert.equal("23502", err.sqlstate)
            assert.equal(0, count_users(name))
            assert.is_true(no_open_transaction(db))
        end)

        it("roll back a scope whose parameter JSON cannot hold, once the savepoint is in place", function()
            local outer, inner = "sp-json-outer-" .. SFX, "sp-json-inner-" .. SFX
            local sp_ok, sp_err
            assert(db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), outer))
          sp_ok, sp_err = uow:savepoint(function()
                    assert(uow:exec("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), inner))
                    local r, e = uow:exec("SELECT $1::jsonb", { f = print })
                    if not r then error(e) end
          end)
          return true
            end))
            assert.is_nil(sp_ok)
            assert.equal("invalid", sp_err.code)
            assert.equal(1, count_users(outer))
            assert.equal(0, count_users(inner))
        end)

        it("fail the unit of work when such a parameter kept queued writes before the savepoint from leaving",
           function()
            local outer = "sp-json-lost-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), outer))
          uow:savepoint(function()
                    local r, e = uow:exec("SELECT $1::jsonb", { f = print })
                    if not r then error(e) end
          end)
          return true
            end)
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            assert.equal(0, count_users(outer))
            assert.is_true(no_open_transaction(db))
        end)
    end)

    describe("round trips", function()
        it("costs none for a unit of work that does nothing", function()
            local n = round_trips(function() assert(db:unit_of_work(function() return true end)) end)
            assert.equal(0, n)
        end)

        it("costs one for a write-only unit of work: timeout, writes, outbox, COMMIT and wake-up together", function()
            local name = "one-trip-" .. SFX
            local n = round_trips(function()
          assert(db:unit_of_work(function(uow)
                    local u = uow:track(User.new{ name = name })
                    assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", u.id, u.name))
                    assert(uow:queue("UPDATE " .. USERS .. " SET visits = 1 WHERE id = $1", u.id))
                    u:record(Registered{ name = name })
                    u:record(Welcomed{ name = name })
                    return true
          end, { context = { tenant_id = qx.uuid() }, statement_timeout_ms = 2000 }))
            end)
            assert.equal(1, n)
            assert.equal(1, count_users(name))
            assert.equal(2, outbox_count_named(name))
        end)

        it("sends a write-only unit of work without BEGIN and COMMIT: one implicit transaction", function()
            local name = "implicit-" .. SFX
            local sent = sent_sql(function()
          assert(db:unit_of_work(function(uow)
                    assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
                    assert(uow:queue("UPDATE " .. USERS .. " SET visits = 1 WHERE name = $1", name))
                    uow:record(Renamed{ name = name }) -- a domain event: nothing to wake
                    return true
          end))
            end)
            -- the insert, the update and the statement that learns the transaction's id
            assert.equal(3, #sent)
            assert.truthy(sent[3]:find("pg_current_xact_id_if_assigned", 1, true))
            for _, sql in ipairs(sent) do
          assert.is_nil(sql:find("^BEGIN"), sql)
          assert.is_nil(sql:find("^COMMIT"), sql)
            end
            assert.equal(1, count_users(name))
        end)

        it("uses BEGIN ... COMMIT when a queued statement needs a transaction block", function()
            local name = "locked-" .. SFX
            assert(db:unit_of_work(function(uow)
          assert(uow:queue("  lock table " .. USERS .. " IN SHARE ROW EXCLUSIVE MODE"))
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
          return true
            end))
            assert.equal(1, count_users(name))
        end)

        it("applies its own statement_timeout to a write-only unit of work too", function()
            local name = "implicit-slow-" .. SFX
            local ok, err = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
          assert(uow:queue("SELECT pg_sleep(2)"))
          return true
            end, { statement_timeout_ms = 100 })
            assert.is_nil(ok)
            assert.equal("timeout", err.code)
            assert.equal(0, count_users(name))
            assert.is_true(no_open_transaction(db))
        end)

        it("costs one per read, with the queued writes riding along, plus one for the commit", function()
            local name = "reads-" .. SFX
            local n = round_trips(function()
          assert(db:unit_of_work(function(uow)
                    assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), name))
                    local rows = assert(uow:query("SELECT count(*) AS n FROM " .. USERS .. " WHERE name = $1", name))
                    assert.equal(1, rows[1].n) -- the queued insert ran first, in the same transaction
                    uow:record(Welcomed{ name = name })
                    return true
          end))
            end)
            assert.equal(2, n)
            assert.equal(1, outbox_count_named(name))
        end)
    end)

    describe("nesting and misuse", function()
        it("runs a nested unit of work as an independent transaction", function()
            local inner, outer = "nested-inner-" .. SFX, "nested-outer-" .. SFX
            local ok = db:unit_of_work(function(uow)
          assert(uow:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), outer))
          assert(db:unit_of_work(function(uow2)
                    assert.are_not.equal(uow.conn, uow2.conn)
                    assert(uow2:queue("INSERT INTO " .. USERS .. " (id, name) VALUES ($1, $2)", qx.uuid(), inner))
                    return true
          end))
          error("outer fails")
            end)
            assert.is_nil(ok)
            assert.equal(1, count_users(inner))
            assert.equal(0, count_users(outer))
        end)

        it("raises when the uow is used after it ended", function()
            local kept
            assert(db:unit_of_work(function(uow) kept = uow return true end))
            assert.has_error(function() kept:queue("SELECT 1") end)
            assert.has_error(function() kept:query("SELECT 1") end)
            assert.has_error(function() kept:record(Welcomed{}) end)
        end)

        it("raises on a function that is not one, and on bad options", function()
            assert.has_error(function() db:unit_of_work("nope") end)
            assert.has_error(function() db:unit_of_work(function() end, "opts") end)
            assert.has_error(function() db:unit_of_work(function() end, { statement_timeout_ms = -1 }) end)
            -- misuse inside the function is an error like any other: rollback, nil, err
            local ok, err = db:unit_of_work(function(uow) uow:query(42) end)
            assert.is_nil(ok)
            assert.equal("error", err.code)
            assert.truthy(err.message:find("sql must be a string", 1, true))
        end)
    end)
end)

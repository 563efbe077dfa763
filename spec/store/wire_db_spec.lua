-- A db over the core's wire codec (qx.store.wire: the connections qx.openresty.connect makes on
-- cosockets), here on LuaSocket's sockets against the real PostgreSQL: units of work, readers
-- and plain queries behave as on libpq's connections; the pool keeps, reuses and closes its
-- connections; a reply lost mid-commit is resolved as on libpq.
local qx = require "qx"
local core = require "qx.core"
local settings = require "qx.settings"
local wire = require "qx.store.wire"
local wire_sockets = require "wire_sockets"
local internal = require "qx.store.internal"

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set: source the servers' env file")
local SFX = core.uuid():gsub("-", ""):sub(-12)
local ITEMS = "wire_db_spec_items_" .. SFX

-- as assert, raising the error itself (busted's assert raises its text)
local function must(ok, e, ...)
    if not ok then error(e, 0) end
    return ok, e, ...
end

local function wire_db(opts, sockets_opts)
    local cfg = assert(settings.db(opts or { url = URL, pool_size = 2 }))
    return assert(wire.db(cfg, wire_sockets.sockets(sockets_opts)))
end

describe("a db over the wire codec", function()
    local admin

    setup(function()
        admin = assert(qx.connect{ url = URL, pool_size = 2 })
        assert(admin:exec("CREATE TABLE " .. ITEMS .. " (id int PRIMARY KEY, name text, "
            .. "note text)"))
    end)

    teardown(function()
        if admin then
            admin:exec("DROP TABLE IF EXISTS " .. ITEMS)
            admin:close()
        end
    end)

    before_each(function()
        assert(admin:exec("TRUNCATE " .. ITEMS))
    end)

    it("runs a unit of work whose writes commit together, and reads them back", function()
        local db = wire_db()
        local res, e = db:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO " .. ITEMS .. " (id, name) VALUES ($1, $2)", 1, "one"))
            assert(uow:queue("INSERT INTO " .. ITEMS .. " (id, name) VALUES ($1, $2)", 2, "two"))
            local rows = assert(uow:query("SELECT count(*)::int AS n FROM " .. ITEMS))
            return rows[1].n
        end)
        assert.is_nil(e)
        assert.equals(2, res)
        assert.same({ { id = 1, name = "one", note = qx.null }, { id = 2, name = "two",
            note = qx.null } }, admin:query("SELECT * FROM " .. ITEMS .. " ORDER BY id"))
        db:close()
    end)

    it("rolls back every write of a unit of work whose statement fails, naming the error",
       function()
        local db = wire_db()
        assert(admin:exec("INSERT INTO " .. ITEMS .. " (id, name) VALUES (1, 'taken')"))
        local res, e = db:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO " .. ITEMS .. " (id, name) VALUES (2, 'new')"))
            must(uow:exec("INSERT INTO " .. ITEMS .. " (id, name) VALUES (1, 'again')"))
            return "not reached"
        end)
        assert.is_nil(res)
        assert.equals("conflict", e.code, e.message)
        assert.equals("23505", e.sqlstate)
        assert.same({ { id = 1 } }, admin:query("SELECT id FROM " .. ITEMS))
        -- the connection went back sound: the next unit of work runs
        assert(db:unit_of_work(function(uow)
            return uow:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (3)")
        end))
        db:close()
    end)

    it("goes back to a savepoint over the wire and keeps what came before it", function()
        local db = wire_db()
        assert(db:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (1)"))
            local ok, e = uow:savepoint(function(u)
                assert(u:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (2)"))
                must(u:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (1)"))
            end)
            assert.is_nil(ok)
            assert.equals("conflict", e.code)
            assert(uow:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (3)"))
        end))
        assert.same({ { id = 1 }, { id = 3 } }, admin:query("SELECT id FROM " .. ITEMS
            .. " ORDER BY id"))
        db:close()
    end)

    it("answers db:query, db:rows and db:rows_upto as a libpq db does", function()
        local db = wire_db()
        assert(admin:exec("INSERT INTO " .. ITEMS .. " (id, name) SELECT g, 'n' || g "
            .. "FROM generate_series(1, 5) g"))
        local sql = "SELECT id, name, note FROM " .. ITEMS .. " WHERE id <= $1 ORDER BY id"
        assert.same({ admin:query(sql, 3) }, { db:query(sql, 3) })
        assert.same({ admin:rows(sql, 3) }, { db:rows(sql, 3) })
        assert.same({ admin:rows_upto(2, sql, 5) }, { db:rows_upto(2, sql, 5) })
        local n, e = db:exec("UPDATE " .. ITEMS .. " SET note = 'x' WHERE id > $1", 2)
        assert.is_nil(e)
        assert.equals(3, n)
        local rows, qe = db:query("SELECT nope FROM " .. ITEMS)
        assert.is_nil(rows)
        assert.equals("db", qe.code)
        assert.equals("42703", qe.sqlstate)
        db:close()
    end)

    it("reuses a released connection: the same backend serves the next call", function()
        local made = {}
        local db = wire_db(nil, { made = made })
        local a = db:query("SELECT pg_backend_pid() AS pid")[1].pid
        local b = db:query("SELECT pg_backend_pid() AS pid")[1].pid
        assert.equals(a, b)
        assert.equals(1, #made)
        db:close()
    end)

    it("closes a connection released inside a transaction instead of keeping it", function()
        local made = {}
        local db = wire_db(nil, { made = made })
        local conn = assert(db:acquire())
        assert(conn:query("BEGIN"))
        conn:release()
        assert.same({ size = 2, busy = 0, idle = 0 }, db.pool:stats())
        assert(db:query("SELECT 1"))
        assert.equals(2, #made)
        db:close()
    end)

    it("ends a lease at its release: a second release does nothing, any other call raises",
       function()
        local db = wire_db()
        local conn = assert(db:acquire())
        conn:release()
        conn:release()
        assert.same({ size = 2, busy = 0, idle = 1 }, db.pool:stats())
        assert.has_error(function() conn:query("SELECT 1") end, "connection was released")
        -- the next lease of the same connection is not the stale holder's to release
        local again = assert(db:acquire())
        conn:release()
        assert.same({ size = 2, busy = 1, idle = 0 }, db.pool:stats())
        again:release()
        db:close()
    end)

    it("gives a lease's slot back when its holder drops it unreleased", function()
        local db = wire_db{ url = URL, pool_size = 1, acquire_timeout_ms = 100 }
        do
            local conn = assert(db:acquire())
            assert(conn:query("SELECT 1"))
        end
        collectgarbage()
        collectgarbage()
        assert.same({ size = 1, busy = 0, idle = 0 }, db.pool:stats())
        assert(db:query("SELECT 1"))
        db:close()
    end)

    it("times out an acquire when every connection is leased, and serves again after", function()
        local db = wire_db{ url = URL, pool_size = 1, acquire_timeout_ms = 100 }
        local conn = assert(db:acquire())
        local none, e = db:acquire()
        assert.is_nil(none)
        assert.equals("timeout", e.code)
        conn:release()
        assert(db:query("SELECT 1"))
        db:close()
    end)

    it("reports a server that cannot be reached as a connection error at first use", function()
        local db = wire_db{ url = "postgresql://postgres@127.0.0.1:1/postgres", pool_size = 1 }
        local rows, e = db:query("SELECT 1")
        assert.is_nil(rows)
        assert.equals("connection", e.code)
        assert.same({ size = 1, busy = 0, idle = 0 }, db.pool:stats())
    end)

    it("refuses what a wire connection cannot do: scripts and LISTEN", function()
        local db = wire_db()
        local conn = assert(db:acquire())
        assert.has_error(function() conn:script("SELECT 1") end,
            "conn:script: not over the wire codec (run migrations with qx.connect)")
        assert.has_error(function() conn:listen("x") end)
        assert.has_error(function() conn:notifications(0) end)
        conn:release()
        db:close()
    end)

    it("refuses a url the codec cannot use", function()
        local cfg = assert(settings.db{ url = "postgresql://127.0.0.1/x?sslmode=require" })
        local db, e = wire.db(cfg, wire_sockets.sockets())
        assert.is_nil(db)
        assert.equals("invalid", e.code)
        assert.matches("TLS", e.message)
    end)

    it("sets the session's statement timeout on each new connection", function()
        local db = wire_db{ url = URL, pool_size = 1, statement_timeout_ms = 1234 }
        assert.equals("1234ms", db:query("SHOW statement_timeout")[1].statement_timeout)
        local rows, e = db:query("SELECT pg_sleep(2)")
        assert.is_nil(rows)
        assert.equals("timeout", e.code)
        db:close()
    end)

    it("resolves a commit whose reply was lost: committed, the unit of work succeeds", function()
        local made = {}
        local db = wire_db(nil, { made = made })
        local res, e = db:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (7)"))
            -- the commit's reply comes but for its last 18 bytes: the COMMIT's CommandComplete
            -- (12) and the ReadyForQuery (6); the transaction's id before them has come
            made[1].drop_tail = 18
            return "done"
        end)
        assert.is_nil(e)
        assert.equals("done", res)
        assert.same({ { id = 7 } }, admin:query("SELECT id FROM " .. ITEMS))
        -- the lost connection was closed, not kept
        assert.same({ size = 2, busy = 0, idle = 1 }, db.pool:stats())
        db:close()
    end)

    it("reports a commit whose whole reply was lost as unknown_outcome, and closes the connection",
       function()
        local made = {}
        local db = wire_db(nil, { made = made })
        local res, e = db:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (9)"))
            made[1].fail_at = made[1].receives + 1
        end)
        assert.is_nil(res)
        assert.equals("unknown_outcome", e.code)
        assert.same({ size = 2, busy = 0, idle = 0 }, db.pool:stats())
        db:close()
    end)

    it("reports a connection lost before the commit as a connection error, nothing written",
       function()
        local made = {}
        local db = wire_db(nil, { made = made })
        local res, e = db:unit_of_work(function(uow)
            made[1].fail_at = made[1].receives + 1
            must(uow:exec("INSERT INTO " .. ITEMS .. " (id) VALUES (8)"))
        end)
        assert.is_nil(res)
        assert.equals("connection", e.code)
        assert.same({}, admin:query("SELECT id FROM " .. ITEMS))
        db:close()
    end)
end)

describe("wake-ups over the wire codec", function()
    local admin, listener
    local n_channels = 0
    local channel -- each test's own: a late notification of one test cannot count in another

    setup(function()
        admin = assert(qx.connect{ url = URL, pool_size = 2 })
        listener = assert(admin:acquire())
    end)

    teardown(function()
        if listener then listener:release() end
        if admin then admin:close() end
    end)

    before_each(function()
        n_channels = n_channels + 1
        channel = "wire_db_spec_" .. SFX .. "_" .. n_channels
        assert(listener:listen(channel))
    end)

    local function commit_waking(db)
        assert(db:unit_of_work(function(uow)
            assert(uow:query("SELECT 1"))
            internal.notify_after(uow, channel)
        end))
    end

    -- The notifications of this test's channel: waits up to 5 s for `expected` of them, then
    -- 200 ms more for any beyond.
    local function notifications(expected)
        local n = 0
        local deadline = os.time() + 5
        local function take(ms)
            for _, note in ipairs(assert(listener:notifications(ms))) do
                if note.channel == channel then n = n + 1 end
            end
        end
        while n < expected and os.time() <= deadline do take(100) end
        take(200)
        return n
    end

    it("wakes the listeners in the commit's own pipeline when the pool has no defer", function()
        local db = wire_db()
        commit_waking(db)
        commit_waking(db)
        assert.equals(2, notifications(2))
        db:close()
    end)

    -- A db whose pool coalesces wake-ups, as in nginx: what it defers waits in `deferred` until
    -- the test runs it (run); sockets_opts as for wire_sockets.sockets.
    local function deferring(sockets_opts)
        local deferred = {}
        local sockets = wire_sockets.sockets(sockets_opts)
        sockets.defer = function(fn, ...)
            deferred[#deferred + 1] = { fn, ... }
            return true
        end
        local db = assert(wire.db(assert(settings.db{ url = URL, pool_size = 2 }), sockets))
        return db, deferred, sockets
    end
    local function run(d) d[1](d[2], d[3], d[4]) end

    -- the least time between two wake-ups of a channel, set by a test
    local wire_pool = require "qx.store.wire.pool"
    local GAP = wire_pool.WAKE_GAP_SECONDS
    after_each(function() wire_pool.WAKE_GAP_SECONDS = GAP end)

    it("carries the wake-up in the commit's own pipeline when the channel's last one went a gap ago",
       function()
        local db, deferred = deferring()
        commit_waking(db)
        assert.equals(0, #deferred)
        assert.equals(1, notifications(1))
        db:close()
    end)

    it("leaves the wake-ups of commits within the gap to one deferred wake-up, sent after them all",
       function()
        wire_pool.WAKE_GAP_SECONDS = 3600
        local db, deferred = deferring()
        commit_waking(db) -- carries its own
        assert.equals(1, notifications(1))
        for _ = 1, 3 do commit_waking(db) end
        -- nothing sent yet: the three are owed one wake-up
        assert.equals(0, notifications(0))
        assert.equals(1, #deferred)
        run(table.remove(deferred, 1)) -- (these sockets cannot sleep: it goes at once)
        assert.equals(1, notifications(1))
        assert.equals(0, #deferred)
        -- a later commit within the gap is owed a new one
        commit_waking(db)
        assert.equals(1, #deferred)
        run(table.remove(deferred, 1))
        assert.equals(1, notifications(1))
        db:close()
    end)

    it("lets a commit after the gap carry what was owed: the deferred wake-up then sends nothing",
       function()
        wire_pool.WAKE_GAP_SECONDS = 3600
        local db, deferred = deferring()
        commit_waking(db) -- carries
        commit_waking(db) -- owed
        assert.equals(1, #deferred)
        wire_pool.WAKE_GAP_SECONDS = 0
        commit_waking(db) -- carries, after the one owed
        assert.equals(2, notifications(2))
        run(table.remove(deferred, 1))
        assert.equals(0, notifications(0))
        assert.equals(0, #deferred)
        db:close()
    end)

    it("leaves what a failed commit was to carry to the deferred wake-up", function()
        wire_pool.WAKE_GAP_SECONDS = 3600
        local db, deferred = deferring()
        commit_waking(db) -- carries
        commit_waking(db) -- owed
        assert.equals(1, notifications(1))
        wire_pool.WAKE_GAP_SECONDS = 0
        -- this commit would carry the wake-up owed, but it fails
        local ok, e = db:unit_of_work(function(uow)
            internal.notify_after(uow, channel)
            uow:queue("SELECT 1 / 0")
        end)
        assert.is_nil(ok)
        assert.matches("division by zero", tostring(e), 1, true)
        assert.equals(0, notifications(0))
        assert.equals(1, #deferred)
        run(table.remove(deferred, 1))
        assert.equals(1, notifications(1))
        db:close()
    end)

    it("waits out the gap before a deferred wake-up, and goes again for commits meanwhile",
       function()
        local made, slept = {}, {}
        local db, deferred, sockets = deferring{ made = made }
        sockets.sleep = function(seconds) slept[#slept + 1] = seconds end
        wire_pool.WAKE_GAP_SECONDS = 3600
        commit_waking(db) -- carries
        commit_waking(db) -- owed
        assert.equals(1, notifications(1))
        assert.equals(1, #deferred)
        -- a commit that comes while the deferred wake-up is on its way is owed another (the
        -- wake-up's statement is prepared by now: its bytes name the channel, not pg_notify)
        local during = 0
        for _, sock in ipairs(made) do
            local send = sock.send
            sock.send = function(sk, data)
                if during == 0 and data:find(channel, 1, true) then
                    during = 1
                    db.pool:_wake{ channel }
                end
                return send(sk, data)
            end
        end
        run(table.remove(deferred, 1))
        assert.equals(1, during)
        -- two wake-ups, each after the rest of the gap since the one before, none deferred anew
        assert.equals(2, #slept)
        assert.is_true(slept[1] > 3500 and slept[2] > 3500, table.concat(slept, ", "))
        assert.equals(0, #deferred)
        assert.equals(2, notifications(2))
        db:close()
    end)

    it("reports a wake-up that cannot be deferred and wakes again with a later commit", function()
        local logged = {}
        local sockets = wire_sockets.sockets()
        sockets.defer = function() return nil, "too many pending timers" end
        sockets.log = function(message) logged[#logged + 1] = message end
        local db = assert(wire.db(assert(settings.db{ url = URL, pool_size = 2 }), sockets))
        wire_pool.WAKE_GAP_SECONDS = 3600
        commit_waking(db) -- carries
        assert.equals(1, notifications(1))
        commit_waking(db) -- owed, and the deferral refused
        assert.equals(1, #logged)
        assert.matches("too many pending timers", logged[1], 1, true)
        wire_pool.WAKE_GAP_SECONDS = 0
        commit_waking(db) -- carries
        assert.equals(1, notifications(1))
        db:close()
    end)
end)

describe("core.tx over a wire codec", function()
    local function ready_wire()
        local w = assert(core.wire(URL))
        local sockets = wire_sockets.sockets()
        local sock = assert(sockets.connect(w:host(), w:port()))
        local conn = require("qx.store.wire.conn").new({}, w, "spec")
        assert(conn:start(sock))
        return w, sock, conn
    end

    it("returns core.PENDING for a call that needs a round trip, and its results on resume",
       function()
        local w, sock, conn = ready_wire()
        local tx = core.tx(w)
        assert.is_true(tx:queue("SELECT 1"))
        local first = tx:query("SELECT $1::int AS n", 5)
        assert.equals(core.PENDING, first)
        assert.is_true(tx:pending())
        assert.has_error(function() tx:queue("SELECT 2") end,
            "transaction waits for its reply (tx:resume() first)")
        assert.has_error(function() tx:resume() end)
        require("qx.store.wire.conn").exchange(sock, w)
        local rows, affected = tx:resume()
        assert.same({ { n = 5 } }, rows)
        assert.equals(1, affected)
        assert.is_false(tx:pending())
        assert.equals(core.PENDING, tx:commit())
        require("qx.store.wire.conn").exchange(sock, w)
        assert.is_true(tx:resume())
        assert.equals("committed", tx:status())
        tx:close()
        conn:close()
    end)

    it("ends a pending call cleanly when its transaction is closed before the reply", function()
        local w, _, conn = ready_wire()
        local tx = core.tx(w)
        assert.equals(core.PENDING, tx:query("SELECT 1 AS n"))
        tx:close()
        assert.is_true(w:broken())
        conn:close()
    end)

    it("frees a reply that came when its transaction is closed before tx:resume()", function()
        local w, sock, conn = ready_wire()
        local tx = core.tx(w)
        assert.equals(core.PENDING, tx:query("SELECT g AS n FROM generate_series(1, 50) g"))
        require("qx.store.wire.conn").exchange(sock, w)
        tx:close()
        -- the connection is given up: what it was in the middle of is unknown to its owner
        assert.is_true(w:broken())
        conn:close()
    end)

    it("refuses a closed wire", function()
        local w = assert(core.wire(URL))
        w:close()
        assert.has_error(function() core.tx(w) end)
    end)
end)

-- The transaction of the core (src/core/tx.c) through its binding, core.tx(conn[, timeout_ms]),
-- against a real PostgreSQL: the queue and the pipeline, the implicit transaction, poisoning,
-- savepoints, the wake-up after COMMIT, parameters and rows, and handles used after their end.
local core = require "qx.core"

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set: source the servers' env file")
local unpack = table.unpack or unpack
-- what a commit sends before its COMMIT: the transaction's id and the server's timeline
local XID_SQL = "SELECT pg_current_xact_id_if_assigned()::text, CASE WHEN pg_is_in_recovery() "
    .. "THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END"

describe("qx.core transaction", function()
    local pool, conn
    local tbl = "tx_spec_" .. core.uuid():gsub("-", ""):sub(-12)

    local function count(v)
        local c = assert(pool:acquire())
        local n = c:query("SELECT count(*) AS n FROM " .. tbl .. " WHERE v = $1", v)[1].n
        c:release()
        return n
    end

    local function insert_sql() return "INSERT INTO " .. tbl .. " (v) VALUES ($1)" end

    setup(function()
        pool = assert(core.pool{ conninfo = URL, size = 3 })
        conn = assert(pool:acquire())
        assert(conn:script("CREATE TABLE " .. tbl .. " (id serial PRIMARY KEY, v text UNIQUE, "
                           .. "j jsonb, d int UNIQUE DEFERRABLE INITIALLY DEFERRED)"))
    end)

    teardown(function()
        conn:script("DROP TABLE IF EXISTS " .. tbl)
        conn:release()
        pool:close()
    end)

    after_each(function()
        assert.equal("idle", conn:status())
    end)

    describe("pipelining", function()
        it("sends the queue and then the read in one round trip, returning the read's rows", function()
            local tx = core.tx(conn)
            assert.is_true(tx:queue("SELECT $1::int AS a", 5))
            assert.is_true(tx:queue("SELECT $1::int + $2::int AS b", 5, 6))
            assert.equal(2, tx:queued())
            assert.equal(0, tx:round_trips())
            local rows, affected = tx:query("SELECT $1::int AS c, $2::text AS d", 7, nil)
            assert.equal(7, rows[1].c)
            assert.equal(core.null, rows[1].d)
            assert.equal(1, affected)
            assert.equal(1, tx:round_trips())
            assert.equal(0, tx:queued())
            assert.same({ "BEGIN", "SELECT $1::int AS a", "SELECT $1::int + $2::int AS b",
                          "SELECT $1::int AS c, $2::text AS d" }, tx:sent())
            assert.is_true(tx:rollback())
            tx:close()
        end)

        it("runs the queued statements before the read, in the same transaction", function()
            local v = "queued-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), v))
            local rows = assert(tx:query("SELECT count(*) AS n FROM " .. tbl .. " WHERE v = $1", v))
            assert.equal(1, rows[1].n)
            assert.equal("intrans", conn:status())
            assert.equal(0, count(v)) -- not committed yet
            assert.is_true(tx:commit())
            assert.equal(1, count(v))
            assert.equal("committed", tx:status())
            tx:close()
        end)

        it("commits, wakes listeners after the COMMIT, in one round trip", function()
            local v = "wake-" .. core.uuid()
            local listener = assert(pool:acquire())
            assert(listener:listen("tx_spec_wake"))
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), v))
            assert.is_true(tx:commit("tx_spec_wake", "tx_spec_wake2"))
            assert.equal(1, tx:round_trips())
            local sent = tx:sent()
            assert.equal("BEGIN", sent[1])
            assert.equal("COMMIT", sent[#sent - 1])
            assert.truthy(sent[#sent]:find("synchronous_commit", 1, true))
            local _, calls = sent[#sent]:gsub("pg_notify", "")
            assert.equal(2, calls)
            local got = assert(listener:notifications(1000))
            assert.equal("tx_spec_wake", got[1].channel)
            assert.equal(conn:pid(), got[1].pid)
            listener:release()
            assert.equal(1, count(v))
            tx:close()
        end)

        it("makes no round trip when there is nothing to send", function()
            local tx = core.tx(conn)
            assert.is_true(tx:commit("tx_spec_nothing"))
            assert.equal(0, tx:round_trips())
            tx:close()
            tx = core.tx(conn)
            assert.is_true(tx:flush()) -- begins the transaction
            assert.equal(1, tx:round_trips())
            assert.is_true(tx:flush()) -- nothing queued since
            assert.equal(1, tx:round_trips())
            assert.is_true(tx:commit())
            assert.equal(2, tx:round_trips())
            assert.same({ XID_SQL, "COMMIT" }, tx:sent())
            tx:close()
        end)

        it("commits a queue that needs no block as one implicit transaction, without BEGIN and COMMIT", function()
            local v = "implicit-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), v))
            assert(tx:queue("UPDATE " .. tbl .. " SET j = $2 WHERE v = $1", v, { k = 1 }))
            assert.is_true(tx:commit())
            assert.equal(1, tx:round_trips())
            -- the two statements and, inside the same implicit transaction, the one that learns
            -- its id (a lost reply is resolved with it)
            assert.same(XID_SQL, tx:sent()[3])
            assert.equal(3, #tx:sent())
            assert.equal(1, count(v))
            tx:close()
            -- one implicit transaction: a later failure undoes the earlier statements
            local w = "implicit-fails-" .. core.uuid()
            tx = core.tx(conn)
            assert(tx:queue(insert_sql(), w))
            assert(tx:queue(insert_sql(), w)) -- unique violation
            local ok, e = tx:commit()
            assert.is_nil(ok)
            assert.equal("conflict", e.code)
            assert.equal(0, count(w))
            assert.is_true(tx:rollback())
            tx:close()
        end)

        it("reads the id with a queued statement that asks for it, and no statement of its own", function()
            local v = "queue-id-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue_id(insert_sql() .. " RETURNING " .. core.TX_ID_COLUMNS, v))
            assert.is_true(tx:commit("tx_spec_id"))
            assert.same({ "BEGIN", insert_sql() .. " RETURNING " .. core.TX_ID_COLUMNS, "COMMIT" },
                        { unpack(tx:sent(), 1, 3) })
            assert.equal(4, #tx:sent()) -- and the wake-up
            assert.equal(1, count(v))
            tx:close()
        end)

        it("uses a block for LOCK, DECLARE, SAVEPOINT and RELEASE", function()
            local tx = core.tx(conn)
            assert(tx:queue("  lock TABLE " .. tbl .. " IN SHARE MODE"))
            assert.is_true(tx:commit())
            local sent = tx:sent()
            assert.same({ "BEGIN", "  lock TABLE " .. tbl .. " IN SHARE MODE", XID_SQL, "COMMIT" },
                        sent)
            tx:close()
            tx = core.tx(conn)
            assert(tx:queue("LOCKED_OUT_IS_NOT_A_WORD_WE_KNOW")) -- not LOCK: no block
            local ok = tx:commit()
            assert.is_nil(ok)
            assert.is_nil(tx:sent()[1]:find("^BEGIN"))
            tx:rollback()
            tx:close()
        end)

        it("sets the statement_timeout of its own for the transaction only", function()
            local tx = core.tx(conn, 100)
            assert.equal("100ms", assert(tx:query("SHOW statement_timeout"))[1].statement_timeout)
            local sent = tx:sent()
            assert.equal("BEGIN", sent[1])
            assert.truthy(sent[2]:find("set_config('statement_timeout'", 1, true))
            local ok, e = tx:query("SELECT pg_sleep(2)")
            assert.is_nil(ok)
            assert.equal("timeout", e.code)
            assert.is_true(tx:rollback())
            tx:close()
            assert.are_not.equal("100ms", conn:query("SHOW statement_timeout")[1].statement_timeout)
            assert.has_error(function() core.tx(conn, -1) end)
            assert.has_error(function() core.tx(conn, 1.5) end)
        end)
    end)

    describe("failure", function()
        it("poisons the transaction with its first failure: later calls return it, rollback remains", function()
            local v = "poison-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), v))
            assert(tx:queue("INSERT INTO " .. tbl .. " (id) VALUES ($1)", "nope"))
            local rows, e = tx:query("SELECT 1 AS one")
            assert.is_nil(rows)
            assert.equal("invalid", e.code)
            assert.equal("failed", tx:status())
            for _, call in ipairs({
                function() return tx:queue("SELECT 1") end,
                function() return tx:query("SELECT 1") end,
                function() return tx:exec("SELECT 1") end,
                function() return tx:flush() end,
                function() return tx:savepoint() end,
                function() return tx:commit() end,
            }) do
          local ok, again = call()
          assert.is_nil(ok)
          assert.equal(e.message, again.message)
            end
            assert.equal(1, tx:round_trips()) -- none of them was sent
            assert.is_true(tx:rollback())
            assert.equal("rolled back", tx:status())
            assert.equal(0, count(v))
            tx:close()
        end)

        it("fails the send that would carry a parameter that cannot be sent, before any of it leaves", function()
            local v = "unsendable-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), v))
            local ok, e = tx:queue("SELECT $1::jsonb", { f = print })
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            assert.truthy(e.message:find("JSON", 1, true))
            ok, e = tx:commit()
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            assert.equal(0, tx:round_trips())
            tx:rollback()
            tx:close()
            assert.equal(0, count(v))
            -- the same for a read
            tx = core.tx(conn)
            local rows
            rows, e = tx:query("SELECT $1::jsonb AS j", { f = print })
            assert.is_nil(rows)
            assert.equal("invalid", e.code)
            assert.equal("failed", tx:status())
            tx:rollback()
            tx:close()
        end)

        it("reports a failed COMMIT (a deferred constraint) as the failure, and wakes no one", function()
            local d = math.random(1, 2^30)
            local tx = core.tx(conn)
            assert(tx:queue("INSERT INTO " .. tbl .. " (d) VALUES ($1), ($1)", d))
            local ok, e = tx:commit("tx_spec_never")
            assert.is_nil(ok)
            assert.equal("conflict", e.code)
            assert.equal("failed", tx:status())
            assert.is_true(tx:rollback())
            tx:close()
        end)

        it("keeps a committed transaction committed when only the wake-up after it fails", function()
            local v = "wake-fails-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), v))
            local ok, e = tx:commit(string.rep("x", 100)) -- a channel name PostgreSQL refuses
            assert.is_true(ok)
            assert.truthy(tostring(e):find("channel name too long", 1, true), tostring(e))
            assert.equal("committed", tx:status())
            assert.equal(1, count(v))
            tx:close()
        end)
    end)

    describe("savepoints", function()
        it("drop what was queued since a savepoint that never reached the server, with no round trip", function()
            local outer, inner = "sp-outer-" .. core.uuid(), "sp-inner-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), outer))
            assert.is_true(tx:savepoint())
            assert(tx:queue(insert_sql(), inner))
            assert.is_true(tx:rollback_to())
            assert.equal(1, tx:queued())
            assert.equal(0, tx:round_trips())
            assert.is_true(tx:commit())
            assert.equal(1, count(outer))
            assert.equal(0, count(inner))
            tx:close()
        end)

        it("go back with ROLLBACK TO after a failure past the savepoint, and the transaction goes on", function()
            local outer, inner = "sp2-outer-" .. core.uuid(), "sp2-inner-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), outer))
            assert.is_true(tx:savepoint())
            assert.equal(1, assert(tx:exec(insert_sql(), inner)))
            local ok, e = tx:exec(insert_sql(), inner) -- unique violation
            assert.is_nil(ok)
            assert.equal("conflict", e.code)
            assert.is_true(tx:rollback_to())
            assert.equal("ROLLBACK TO SAVEPOINT qx_sp_1", tx:sent()[1])
            assert.equal("active", tx:status())
            assert.is_true(tx:commit())
            assert.equal(1, count(outer))
            assert.equal(0, count(inner))
            tx:close()
        end)

        it("nest, and release keeps what was done inside", function()
            local a, b = "sp3-a-" .. core.uuid(), "sp3-b-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:savepoint())
            assert(tx:queue(insert_sql(), a))
            assert(tx:savepoint())
            assert(tx:queue(insert_sql(), b))
            assert(tx:flush())
            assert(tx:rollback_to()) -- the inner one
            assert(tx:release())     -- the outer one
            assert.is_true(tx:commit())
            assert.equal(1, count(a))
            assert.equal(0, count(b))
            tx:close()
            tx = core.tx(conn)
            local ok, e = tx:release()
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            tx:rollback()
            tx:close()
        end)

        it("cost no statement when released before anything was sent, keeping what was queued inside",
           function()
            local a, b = "sp5-a-" .. core.uuid(), "sp5-b-" .. core.uuid()
            local tx = core.tx(conn)
            assert(tx:queue(insert_sql(), a))
            for _ = 1, 3 do
                assert(tx:savepoint())
                assert(tx:savepoint()) -- nested, both unsent
                assert(tx:release())
                assert(tx:release())
            end
            assert(tx:savepoint())
            assert(tx:queue(insert_sql(), b))
            assert(tx:release())
            assert.equal(2, tx:queued()) -- the two inserts; no SAVEPOINT, no RELEASE
            assert.is_true(tx:commit())
            for _, text in ipairs(tx:sent()) do
                assert.is_nil(text:find("SAVEPOINT", 1, true))
            end
            assert.equal(1, count(a))
            assert.equal(1, count(b))
            tx:close()
            -- a failure among its statements fails the transaction, as the RELEASE would have
            tx = core.tx(conn)
            assert(tx:savepoint())
            assert(tx:queue(insert_sql(), a)) -- a exists: unique violation at the commit
            assert(tx:release())
            local ok, e = tx:commit()
            assert.is_nil(ok)
            assert.equal("conflict", e.code)
            tx:rollback()
            tx:close()
            -- one whose SAVEPOINT was sent is released on the server
            tx = core.tx(conn)
            assert(tx:savepoint())
            assert(tx:flush())
            assert(tx:release())
            assert.equal(1, tx:queued())
            assert.is_true(tx:commit())
            tx:close()
        end)

        it("keep the first error when the failure was before the savepoint", function()
            local tx = core.tx(conn)
            assert(tx:queue("INSERT INTO " .. tbl .. " (id) VALUES ($1)", "nope"))
            assert(tx:savepoint())
            local ok, e = tx:exec("SELECT 1")
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            local ok2, e2 = tx:rollback_to()
            assert.is_nil(ok2)
            assert.equal(e.message, e2.message)
            assert.equal("failed", tx:status())
            assert.is_true(tx:rollback())
            tx:close()
        end)
    end)

    describe("values", function()
        it("sends every Lua type that SQL can hold, and reads it back", function()
            local tx = core.tx(conn)
            local bytes = "a\0b\255"
            local rows = assert(tx:query("SELECT $1::text AS n, $2::text AS nn, $3::bool AS t, $4::bool AS f, "
                .. "$5::int8 AS i, $6::float8 AS x, $7::bytea AS b, $8::jsonb AS j, $9::text AS s",
                nil, core.null, true, false, 9007199254740993, 0.1,
                "\\x" .. ("%02x%02x%02x%02x"):format(bytes:byte(1, 4)),
                { a = { 1, 2 }, b = "x" }, "héllo"))
            local r = rows[1]
            assert.equal(core.null, r.n)
            assert.equal(core.null, r.nn)
            assert.is_true(r.t)
            assert.is_false(r.f)
            if math.type then assert.equal(9007199254740993, r.i) end
            assert.equal(0.1, r.x)
            assert.equal(bytes, r.b)
            assert.same({ a = { 1, 2 }, b = "x" }, r.j)
            assert.equal("héllo", r.s)
            tx:rollback()
            tx:close()
        end)

        it("keeps queued parameters of its own: the values may change or go after queueing", function()
            local v = "copied-" .. core.uuid()
            local tx = core.tx(conn)
            local t = { k = v }
            assert(tx:queue("INSERT INTO " .. tbl .. " (v, j) VALUES ($1, $2)", v .. "", t))
            t.k = "changed"
            t = nil -- luacheck: ignore 311 (dropped for the collector)
            collectgarbage()
            collectgarbage()
            local rows = assert(tx:query("SELECT j FROM " .. tbl .. " WHERE v = $1", v))
            assert.same({ k = v }, rows[1].j)
            tx:rollback()
            tx:close()
        end)

        it("takes many statements and parameters, table parameters as JSON", function()
            local tx = core.tx(conn)
            for i = 1, 40 do
          assert(tx:queue("SELECT $1::jsonb AS j, $2::int AS i", { k = i, list = { i, i + 1 } }, i))
            end
            local params, sql = {}, {}
            for i = 1, 100 do params[i], sql[i] = i, "$" .. i .. "::int" end
            local rows = assert(tx:query("SELECT " .. table.concat(sql, " + ") .. " AS total", unpack(params)))
            assert.equal(5050, rows[1].total)
            assert.equal(42, #tx:sent())
            tx:rollback()
            tx:close()
        end)

        it("reads sparse rows: NULL columns left out", function()
            local tx = core.tx(conn)
            local rows = assert(tx:rows("SELECT 1 AS a, NULL::text AS b, 'x' AS c"))
            assert.same({ a = 1, c = "x" }, rows[1])
            local only = assert(tx:rows("SELECT NULL::int AS only"))
            assert.equal(1, #only)
            assert.is_nil(next(only[1]))
            tx:rollback()
            tx:close()
            -- the same on a connection of its own
            rows = assert(conn:rows("SELECT 1 AS a, NULL::text AS b"))
            assert.same({ { a = 1 } }, rows)
        end)

        it("makes only the first N rows into tables with rows_upto, and counts every row", function()
            local sql = "SELECT g AS n, NULLIF(g, 2) AS m FROM generate_series(1, 5) g"
            for _, target in ipairs({ "tx", "conn" }) do
          local tx = core.tx(conn)
          local t = target == "tx" and tx or conn
          local rows, n = assert(t:rows_upto(3, sql))
          assert.equal(5, n)
          assert.same({ { n = 1, m = 1 }, { n = 2 }, { n = 3, m = 3 } }, rows)
          rows, n = assert(t:rows_upto(0, sql))
          assert.same({}, rows)
          assert.equal(5, n)
          rows, n = assert(t:rows_upto(9, sql))
          assert.equal(5, #rows)
          assert.equal(5, n)
          -- a limit that is not a count is refused before anything is sent
          local trips = tx:round_trips()
          for _, bad in ipairs({ -1, 2.5, 2^40, "3" }) do
                    assert.has_error(function() t:rows_upto(bad, sql) end)
          end
          assert.equal(trips, tx:round_trips())
          tx:rollback()
          tx:close()
            end
        end)

        it("returns the affected count of exec", function()
            local v = "exec-" .. core.uuid()
            local tx = core.tx(conn)
            assert.equal(1, assert(tx:exec(insert_sql(), v)))
            assert.equal(1, assert(tx:exec("UPDATE " .. tbl .. " SET j = '{}' WHERE v = $1", v)))
            assert.equal(0, assert(tx:exec("DELETE FROM " .. tbl .. " WHERE v = $1", "none")))
            tx:rollback()
            tx:close()
            assert.equal(0, count(v))
        end)
    end)

    describe("handles", function()
        it("raises on misuse: no SQL text, a closed tx, a finished tx, a released connection", function()
            local tx = core.tx(conn)
            assert.has_error(function() tx:queue(42) end)
            assert.has_error(function() tx:query() end)
            assert.has_error(function() tx:commit({}) end)
            assert.has_error(function() core.tx({}) end)
            assert.is_true(tx:commit())
            assert.has_error(function() tx:query("SELECT 1") end, "transaction is committed")
            assert.has_error(function() tx:queue("SELECT 1") end, "transaction is committed")
            assert.is_true(tx:rollback()) -- after the end: nothing to do
            tx:close()
            assert.has_error(function() tx:query("SELECT 1") end, "transaction is closed")
            assert.has_error(function() tx:queued() end, "transaction is closed")
            assert.equal("closed", tx:status())
            tx:close() -- twice is harmless
            assert.truthy(tostring(tx):find("closed", 1, true))

            local c = assert(pool:acquire())
            local t2 = core.tx(c)
            assert(t2:queue("SELECT 1"))
            c:release()
            assert.has_error(function() t2:flush() end, "connection was released")
            assert.has_error(function() core.tx(c) end, "connection was released")
            t2:close()
        end)

        it("keeps its connection alive while it lives, and lets both go", function()
            local in_use = pool:stats().in_use
            local tx = core.tx(assert(pool:acquire())) -- the tx holds the only reference
            collectgarbage()
            collectgarbage()
            assert.equal(1, assert(tx:query("SELECT 1 AS one"))[1].one)
            assert.equal(in_use + 1, pool:stats().in_use)
            tx:rollback()
            tx = nil -- luacheck: ignore 311 (dropped for the collector)
            for _ = 1, 4 do collectgarbage() end
            assert.equal(in_use, pool:stats().in_use)
        end)

        it("leases nothing when acquire fails (the handle is made before the lease)", function()
            local p = assert(core.pool{ conninfo = URL, size = 1, acquire_timeout_ms = 50 })
            local c = assert(p:acquire())
            local c2, e = p:acquire()
            assert.is_nil(c2)
            assert.equal("timeout", e.code)
            assert.equal(1, p:stats().in_use)
            c:release()
            collectgarbage()
            collectgarbage()
            assert.equal(0, p:stats().in_use)
            p:close()
        end)
    end)
end)

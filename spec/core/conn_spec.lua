-- qx.core connections against a real PostgreSQL: typed results, parameters, pipelined batches,
-- the prepared-statement cache, LISTEN/NOTIFY.
local core = require "qx.core"

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set: source the servers' env file")
local unpack = table.unpack or unpack

local function is_integer(v)
    if math.type then return math.type(v) == "integer" end
    return type(v) == "number" and v == math.floor(v)
end

describe("qx.core connection", function()
    local pool, conn
    local tbl = "conn_spec_" .. core.uuid():gsub("-", ""):sub(-12)

    local function count()
        return conn:query("SELECT count(*) AS n FROM " .. tbl)[1].n
    end

    setup(function()
        pool = assert(core.pool{ conninfo = URL, size = 2 })
        conn = assert(pool:acquire())
        assert(conn:script("CREATE TABLE " .. tbl .. " (id serial PRIMARY KEY, v text, j jsonb)"))
    end)

    teardown(function()
        conn:script("DROP TABLE IF EXISTS " .. tbl)
        conn:release()
        pool:close()
    end)

    describe("results", function()
        it("converts each column type to its Lua value", function()
            local rows = assert(conn:query([[
SELECT 7::int2 AS i2, -8::int4 AS i4, 9000000000::int8 AS i8, 1.5::float8 AS f8, 0.25::float4 AS f4,
       123.4500::numeric AS num, true AS yes, false AS no, 'héllo'::text AS txt,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id,
       '2026-01-02 03:04:05.123456+00'::timestamptz AS at,
       '{"a":[1,null,"x"],"b":{"c":true}}'::jsonb AS jb, '[1,2]'::json AS js,
       NULL::text AS nothing, '\x00ff41'::bytea AS bytes]]))
            assert.equal(1, #rows)
            local r = rows[1]
            assert.equal(7, r.i2); assert.is_true(is_integer(r.i2))
            assert.equal(-8, r.i4); assert.is_true(is_integer(r.i4))
            assert.equal(9000000000, r.i8); assert.is_true(is_integer(r.i8))
            assert.equal(1.5, r.f8)
            assert.equal(0.25, r.f4)
            assert.equal("123.4500", r.num)
            assert.is_true(r.yes)
            assert.is_false(r.no)
            assert.equal("héllo", r.txt)
            assert.equal("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", r.id)
            assert.equal("string", type(r.at))
            assert.truthy(r.at:find("^2026%-01%-02 03:04:05%.123456"))
            assert.same({ 1, core.null, "x" }, r.jb.a)
            assert.is_true(r.jb.b.c)
            assert.same({ 1, 2 }, r.js)
            assert.equal(core.null, r.nothing)
            assert.equal("\0\255A", r.bytes)
        end)

        it("keeps numeric digits that a double would lose", function()
            local r = assert(conn:query("SELECT 12345678901234567890.123456789::numeric AS n"))[1]
            assert.equal("12345678901234567890.123456789", r.n)
        end)

        it("returns bigint beyond 2^53 exactly: an integer on Lua 5.4, a decimal string on LuaJIT", function()
            local r = assert(conn:query("SELECT 9007199254740993::int8 AS big, '-9223372036854775808'::int8 AS min,"
                .. " 9007199254740992::int8 AS edge"))[1]
            if math.type then
          assert.equal(9007199254740993, r.big)
          assert.equal(math.mininteger, r.min)
            else
          assert.equal("9007199254740993", r.big)
          assert.equal("-9223372036854775808", r.min)
            end
            assert.equal(9007199254740992, r.edge) -- 2^53 is still exact as a number
        end)

        it("returns float specials as numbers", function()
            local r = assert(conn:query("SELECT 'NaN'::float8 AS nan, 'Infinity'::float8 AS inf,"
                .. " '-Infinity'::float4 AS ninf"))[1]
            assert.is_true(r.nan ~= r.nan)
            assert.equal(math.huge, r.inf)
            assert.equal(-math.huge, r.ninf)
        end)

        it("returns the affected row count of a write", function()
            local rows, affected = conn:query("INSERT INTO " .. tbl .. " (v) VALUES ($1), ($2)", "a", "b")
            assert.same({}, rows)
            assert.equal(2, affected)
            affected = select(2, conn:query("DELETE FROM " .. tbl .. " WHERE v IN ($1, $2)", "a", "b"))
            assert.equal(2, affected)
        end)
    end)

    describe("parameters", function()
        it("sends every Lua type that SQL can hold", function()
            local r = assert(conn:query(
          "SELECT $1::bool AS t, $2::bool AS f, $3::int8 AS i, $4::float8 AS x, $5::text AS s, $6::jsonb AS j,"
              .. " $7::text AS n, $8::text AS nn",
          true, false, 42, 2.5, "text", { a = { 1, 2 }, b = core.null }, nil, core.null))[1]
            assert.is_true(r.t)
            assert.is_false(r.f)
            assert.equal(42, r.i)
            assert.equal(2.5, r.x)
            assert.equal("text", r.s)
            assert.same({ 1, 2 }, r.j.a)
            assert.equal(core.null, r.j.b)
            assert.equal(core.null, r.n)
            assert.equal(core.null, r.nn)
        end)

        it("keeps the positions of a nil in the middle and at the end", function()
            local r = assert(conn:query("SELECT $1::int AS a, $2::int AS b, $3::int AS c, $4::int AS d",
                1, nil, 3, nil))[1]
            assert.equal(1, r.a)
            assert.equal(core.null, r.b)
            assert.equal(3, r.c)
            assert.equal(core.null, r.d)
        end)

        it("sends floats without losing precision, and integral floats as integers", function()
            local r = assert(conn:query("SELECT $1::float8 AS x, $2::int8 AS y, $3::float8 AS z",
                0.1, 2 ^ 53, 1 / 3))[1]
            assert.equal(0.1, r.x)
            assert.equal(9007199254740992, r.y)
            assert.equal(1 / 3, r.z)
        end)

        it("sends strings byte for byte", function()
            local s = "quote ' backslash \\ dollar $1 utf8 ✓ newline \n tab \t"
            assert.equal(s, assert(conn:query("SELECT $1::text AS s", s))[1].s)
        end)

        it("refuses a string with a NUL byte, and writes nothing", function()
            local before = count()
            local rows, e = conn:query("INSERT INTO " .. tbl .. " (v) VALUES ($1)", "a\0b")
            assert.is_nil(rows)
            assert.equal("invalid", e.code)
            assert.truthy(e.message:find("NUL", 1, true))
            assert.equal(before, count())
        end)

        local unsendable = {
            ["a function"] = function() return function() end end,
            ["a table holding a function"] = function() return { f = function() end } end,
            ["a cyclic table"] = function() local t = {} t.self = t return t end,
            ["a userdata"] = function() return io.stdout end,
            ["a table holding a userdata"] = function() return { out = io.stdout } end,
            ["a coroutine"] = function() return coroutine.create(function() end) end,
        }
        for what, make in pairs(unsendable) do
            it("returns invalid for " .. what .. " and writes nothing", function()
          local before = count()
          local rows, e = conn:query("INSERT INTO " .. tbl .. " (v, j) VALUES ($1, $2)", "x", make())
          assert.is_nil(rows)
          assert.equal("invalid", e.code)
          assert.truthy(e.message:find("$2", 1, true))
          assert.equal(before, count())
          assert.equal("idle", conn:status())
            end)
        end

        it("reports a wrong parameter count as invalid", function()
            local rows, e = conn:query("SELECT $1::int AS a, $2::int AS b", 1)
            assert.is_nil(rows)
            assert.equal("invalid", e.code)
        end)

        it("reports a non-uuid for a uuid as invalid with its SQLSTATE", function()
            local rows, e = conn:query("SELECT $1::uuid AS u", "not-a-uuid")
            assert.is_nil(rows)
            assert.equal("invalid", e.code)
            assert.equal("22P02", e.sqlstate)
        end)

        it("reports an unknown table or column as db with its SQLSTATE", function()
            local _, e = conn:query("SELECT nope FROM " .. tbl)
            assert.equal("db", e.code)
            assert.equal("42703", e.sqlstate)
            _, e = conn:query("SELECT 1 FROM conn_spec_no_such_table")
            assert.equal("db", e.code)
            assert.equal("42P01", e.sqlstate)
        end)

        it("maps a unique violation to conflict", function()
            assert(conn:query("INSERT INTO " .. tbl .. " (id, v) VALUES (-1, 'u')"))
            local rows, e = conn:query("INSERT INTO " .. tbl .. " (id, v) VALUES (-1, 'u')")
            assert.is_nil(rows)
            assert.equal("conflict", e.code)
            assert.equal("23505", e.sqlstate)
            assert(conn:query("DELETE FROM " .. tbl .. " WHERE id = -1"))
        end)
    end)

    describe("batch", function()
        it("returns one result per statement", function()
            local res = assert(conn:batch{
          { "SELECT $1::int AS a", 5 },
          { "SELECT $1::int + $2::int AS b", n = 2, 5, 6 },
          { "SELECT $1::text AS c", n = 1, nil },
            })
            assert.equal(3, #res)
            assert.equal(5, res[1].rows[1].a)
            assert.equal(11, res[2].rows[1].b)
            assert.equal(core.null, res[3].rows[1].c)
        end)

        it("stops at a failing statement: later ones do not run, earlier ones are undone, the index is reported",
           function()
            local before = count()
            local res, e, idx = conn:batch{
          { "INSERT INTO " .. tbl .. " (v) VALUES ($1)", "batch-1" },
          { "INSERT INTO " .. tbl .. " (id, v) VALUES ($1, $2)", "not-an-int", "batch-2" },
          { "INSERT INTO " .. tbl .. " (v) VALUES ($1)", "batch-3" },
            }
            assert.is_nil(res)
            assert.equal("invalid", e.code)
            assert.equal(2, idx)
            assert.equal(before, count())
            assert.equal("idle", conn:status())
        end)

        it("reports the index of a statement whose parameter cannot be sent, and sends nothing", function()
            local before = count()
            local res, e, idx = conn:batch{
          { "INSERT INTO " .. tbl .. " (v) VALUES ($1)", "ok" },
          { "INSERT INTO " .. tbl .. " (v, j) VALUES ($1, $2)", "x", { f = print } },
            }
            assert.is_nil(res)
            assert.equal("invalid", e.code)
            assert.equal(2, idx)
            assert.equal(before, count())
        end)

        it("reports a failure at the commit of a batch without BEGIN (a deferred constraint)", function()
            local parent, child = tbl .. "_dparent", tbl .. "_dchild"
            assert(conn:script("CREATE TABLE " .. parent .. " (id int PRIMARY KEY); CREATE TABLE " .. child
          .. " (pid int REFERENCES " .. parent .. " DEFERRABLE INITIALLY DEFERRED)"))
            local rows, e = conn:query("INSERT INTO " .. child .. " VALUES (1)")
            assert.is_nil(rows)
            assert.equal("invalid", e.code)
            assert.equal("23503", e.sqlstate)
            local res, e2, idx = conn:batch{ { "INSERT INTO " .. child .. " VALUES (1)" }, { "SELECT 1 AS one" } }
            assert.is_nil(res)
            assert.equal("23503", e2.sqlstate)
            assert.is_nil(idx) -- the commit failed, not a statement
            assert.equal(0, conn:query("SELECT count(*) AS n FROM " .. child)[1].n)
            assert.equal("idle", conn:status())
            assert(conn:script("DROP TABLE " .. child .. "; DROP TABLE " .. parent))
        end)

        it("makes rows only from the index given as second argument", function()
            local res = assert(conn:batch({ { "SELECT 1 AS a" }, { "SELECT 2 AS b" }, { "SELECT 3 AS c" } }, 3))
            assert.equal(3, #res)
            assert.is_true(res[1])
            assert.is_true(res[2])
            assert.equal(3, res[3].rows[1].c)
        end)

        it("takes an empty statement as one that does nothing", function()
            local before = count()
            local res = assert(conn:batch{
          { "INSERT INTO " .. tbl .. " (v) VALUES ('empty-1')" }, { "" }, { "SELECT 1 AS one" },
            })
            assert.same({}, res[2].rows)
            assert.equal(1, res[3].rows[1].one)
            assert.equal(before + 1, count())
            assert(conn:query("DELETE FROM " .. tbl .. " WHERE v = 'empty-1'"))
        end)

        it("does not hang on COPY: TO STDOUT is read and dropped, FROM STDIN fails and writes nothing", function()
            local c2 = assert(pool:acquire())
            assert(c2:query("INSERT INTO " .. tbl .. " (v) VALUES ('copy-1')"))
            local rows, affected = c2:query("COPY (SELECT v FROM " .. tbl .. " WHERE v = 'copy-1') TO STDOUT")
            assert.same({}, rows)
            assert.equal(1, affected)
            assert(c2:script("COPY (SELECT 1) TO STDOUT"))
            local ok, e = c2:script("COPY " .. tbl .. " (v) FROM STDIN") -- simple protocol: refused cleanly
            assert.is_nil(ok)
            assert.equal("invalid", e.code)
            assert.equal("idle", c2:status())
            local before = count()
            local res, e2, idx = c2:batch{
          { "INSERT INTO " .. tbl .. " (v) VALUES ('copy-2')" },
          { "COPY " .. tbl .. " (v) FROM STDIN" },
          { "INSERT INTO " .. tbl .. " (v) VALUES ('copy-3')" },
            }
            assert.is_nil(res)
            assert.equal("invalid", e2.code)
            assert.truthy(e2.message:find("COPY FROM STDIN", 1, true))
            assert.equal(2, idx)
            assert.equal("bad", c2:status()) -- given up: what was sent behind the COPY cannot be taken back
            c2:release()
            assert.equal(before, count())
            assert(conn:query("DELETE FROM " .. tbl .. " WHERE v = 'copy-1'"))
        end)

        it("runs an empty batch without a round trip", function()
            assert.same({}, conn:batch{})
        end)

        it("raises on a malformed statement (misuse)", function()
            assert.has_error(function() conn:batch{ { 42 } } end)
            assert.has_error(function() conn:batch{ "SELECT 1" } end)
            assert.has_error(function() conn:batch("SELECT 1") end)
        end)
    end)

    describe("prepared-statement cache", function()
        local function prepared(sql)
            return conn:query("SELECT count(*) AS n FROM pg_prepared_statements WHERE statement = $1", sql)[1].n
        end

        it("prepares a SQL text once per connection and reuses it", function()
            local sql = "SELECT $1::int * 2 AS doubled /* " .. tbl .. " reuse */"
            for i = 1, 5 do
          assert.equal(i * 2, conn:query(sql, i)[1].doubled)
            end
            assert.equal(1, prepared(sql))
        end)

        it("survives a failed prepare: the same text works once it is valid", function()
            local t2 = tbl .. "_late"
            local sql = "SELECT count(*) AS n FROM " .. t2
            local rows, e = conn:query(sql)
            assert.is_nil(rows)
            assert.equal("42P01", e.sqlstate)
            assert.equal(0, prepared(sql))
            assert(conn:script("CREATE TABLE " .. t2 .. " (x int)"))
            assert.equal(0, assert(conn:query(sql))[1].n)
            assert.equal(1, prepared(sql))
            assert(conn:script("DROP TABLE " .. t2))
        end)

        it("keeps working after thousands of distinct failing texts #slow", function()
            local c2 = assert(pool:acquire())
            for i = 1, 6000 do
          local rows, e = c2:query("SELECT conn_spec_missing_" .. i)
          assert.is_nil(rows)
          assert.equal("42703", e.sqlstate)
            end
            assert.equal(42, assert(c2:query("SELECT 42 AS x /* after failures */"))[1].x)
            c2:release()
        end)

        it("runs more distinct texts than the cache holds", function()
            local c2 = assert(pool:acquire())
            for i = 1, 600 do
          assert.equal(i, assert(c2:query("SELECT $1::int AS v /* distinct " .. i .. " */", i))[1].v)
            end
            assert.equal(7, assert(c2:query("SELECT $1::int AS v /* distinct 7 */", 7))[1].v)
            c2:release()
        end)
    end)

    describe("script", function()
        it("runs several statements without parameters", function()
            assert(conn:script("INSERT INTO " .. tbl .. " (v) VALUES ('s1');"
                .. " INSERT INTO " .. tbl .. " (v) VALUES ('s2')"))
            local _, deleted = conn:query("DELETE FROM " .. tbl .. " WHERE v IN ('s1', 's2')")
            assert.equal(2, deleted)
        end)

        it("returns nil, err for a failing statement", function()
            local ok, e = conn:script("SELECT * FROM conn_spec_no_such_table")
            assert.is_nil(ok)
            assert.equal("db", e.code)
            assert.equal("idle", conn:status())
        end)
    end)

    describe("LISTEN / NOTIFY", function()
        it("delivers notifications with channel, payload and sender pid", function()
            local listener = assert(pool:acquire())
            local channel = "Conn Spec " .. tbl -- needs quoting
            assert(listener:listen(channel))
            assert(conn:query("SELECT pg_notify($1, $2)", channel, "hello"))
            local got = assert(listener:notifications(2000))
            assert.equal(1, #got)
            assert.equal(channel, got[1].channel)
            assert.equal("hello", got[1].payload)
            assert.equal(conn:pid(), got[1].pid)
            listener:release()
        end)

        it("returns an empty list after the timeout when nothing comes", function()
            local listener = assert(pool:acquire())
            assert(listener:listen(tbl .. "_quiet"))
            local t0 = core.clock()
            local got = assert(listener:notifications(150))
            local waited = core.clock() - t0
            assert.same({}, got)
            assert.is_true(waited >= 0.1 and waited < 2, "waited " .. waited)
            listener:release()
        end)

        it("collects several notifications sent in one transaction", function()
            local listener = assert(pool:acquire())
            local channel = tbl .. "_many"
            assert(listener:listen(channel))
            assert(conn:batch{
          { "BEGIN" },
          { "SELECT pg_notify($1, '1')", channel },
          { "SELECT pg_notify($1, '2')", channel },
          { "COMMIT" },
            })
            local got, deadline = {}, core.clock() + 2
            while #got < 2 and core.clock() < deadline do
          for _, n in ipairs(assert(listener:notifications(200))) do got[#got + 1] = n.payload end
            end
            assert.same({ "1", "2" }, got)
            listener:release()
        end)
    end)

    describe("handle", function()
        it("reports status and raises once released", function()
            local c2 = assert(pool:acquire())
            assert.equal("idle", c2:status())
            assert(c2:query("BEGIN"))
            assert.equal("intrans", c2:status())
            assert(c2:query("ROLLBACK"))
            c2:release()
            c2:release() -- twice is harmless
            assert.has_error(function() c2:query("SELECT 1") end, "connection was released")
        end)

        it("unpacks results of a multi-row query in order", function()
            local rows = assert(conn:query("SELECT g AS n FROM generate_series(1, 5) AS g ORDER BY g"))
            local ns = {}
            for i, r in ipairs(rows) do ns[i] = r.n end
            assert.same({ 1, 2, 3, 4, 5 }, ns)
            assert.equal(5, select("#", unpack(ns)))
        end)
    end)
end)

-- qx.core's wire codec (core.wire) against a real PostgreSQL, driven over a LuaSocket TCP
-- connection the spec owns (spec/wire_helper.lua): start-up with each password method, batches
-- whose results are compared with conn:batch's, failures, and what the codec does with bytes
-- that make no sense. The roles qx_wire_password, qx_wire_md5, qx_wire_scram and qx_wire_reject
-- have lines of their own in the throwaway cluster's pg_hba.conf (scripts/servers.sh).
local core = require "qx.core"
local support = require "support"
local h = require "wire_helper"

local URL = support.db_url()
local PORT = support.pg_port()

local ROLES = {
    { name = "qx_wire_password", encryption = "scram-sha-256", password = "pass-word", auth = "password" },
    { name = "qx_wire_md5", encryption = "md5", password = "md5-secret", auth = "md5" },
    { name = "qx_wire_scram", encryption = "scram-sha-256", password = "scram-secret", auth = "scram-sha-256" },
}

local function url_as(user, password)
    return "postgresql://" .. user .. (password and (":" .. password) or "") .. "@127.0.0.1:"
        .. PORT .. "/postgres"
end

describe("qx.core wire codec", function()
    local pool, conn
    local tbl = "wire_spec_" .. core.uuid():gsub("-", ""):sub(-12)
    local open = {} -- codecs and sockets to close at the end

    -- A codec of URL (or the given conninfo) with its start-up done over a socket of its own.
    local function connected(conninfo, chunk)
        local w = assert(core.wire(conninfo or URL))
        local sock, err, s = h.connect(w, chunk)
        open[#open + 1] = { w = w, sock = sock or s }
        assert(sock, err and tostring(err))
        return w, sock
    end

    -- The start-up of a codec, failing: its error.
    local function refused(conninfo)
        local w = assert(core.wire(conninfo))
        local sock, err, s = h.connect(w)
        open[#open + 1] = { w = w, sock = sock or s }
        assert.is_nil(sock)
        assert.is_true(w:broken())
        return err, w
    end

    setup(function()
        pool = assert(core.pool{ conninfo = URL, size = 2 })
        conn = assert(pool:acquire())
        for _, r in ipairs(ROLES) do
            assert(conn:script("DROP ROLE IF EXISTS " .. r.name))
            assert(conn:script("BEGIN; SET LOCAL password_encryption = '" .. r.encryption
                .. "'; CREATE ROLE " .. r.name .. " LOGIN SUPERUSER PASSWORD '" .. r.password
                .. "'; COMMIT"))
        end
        assert(conn:script("DROP ROLE IF EXISTS qx_wire_reject; CREATE ROLE qx_wire_reject LOGIN"))
        assert(conn:script("CREATE TABLE " .. tbl .. " (id int PRIMARY KEY, v text)"))
    end)

    teardown(function()
        for _, o in ipairs(open) do
            o.w:close()
            if o.sock then o.sock:close() end
        end
        conn:script("DROP TABLE IF EXISTS " .. tbl)
        for _, r in ipairs(ROLES) do conn:script("DROP ROLE IF EXISTS " .. r.name) end
        conn:script("DROP ROLE IF EXISTS qx_wire_reject")
        conn:release()
        pool:close()
    end)

    before_each(function()
        assert(conn:script("TRUNCATE " .. tbl))
    end)

    describe("settings", function()
        it("takes a URL's host and port", function()
            local w = assert(core.wire(URL))
            assert.equal("127.0.0.1", w:host())
            assert.equal(PORT, w:port())
            assert.equal("", w:auth())
            assert.is_false(w:ready())
            assert.equal("unknown", w:tx_status())
            w:close()
        end)

        it("uses the first of several hosts and ports, and hostaddr over host", function()
            local w = assert(core.wire("host=db1,db2 port=6001,6002 user=u dbname=d"))
            assert.equal("db1", w:host())
            assert.equal(6001, w:port())
            w:close()
            w = assert(core.wire("host=db.example hostaddr=10.1.2.3 user=u"))
            assert.equal("10.1.2.3", w:host())
            w:close()
        end)

        it("defaults to libpq's socket directory when no host is given", function()
            if os.getenv("PGHOST") or os.getenv("PGHOSTADDR") then
                pending("PGHOST is set") return
            end
            local w = assert(core.wire("user=u dbname=d"))
            assert.equal("/var/run/postgresql", w:host())
            w:close()
        end)

        it("returns libpq's message for a connection string it cannot read", function()
            local w, err = core.wire("host=x port")
            assert.is_nil(w)
            assert.equal("invalid", err.code)
            assert.truthy(err.message:find("port", 1, true))
            w, err = core.wire("postgresql://[::1")
            assert.is_nil(w)
            assert.equal("invalid", err.code)
        end)

        it("refuses sslmode require and stronger: the codec does not do TLS", function()
            for _, mode in ipairs{ "require", "verify-ca", "verify-full" } do
                local w, err = core.wire(URL .. "?sslmode=" .. mode)
                assert.is_nil(w)
                assert.equal("invalid", err.code)
                assert.truthy(err.message:find("TLS", 1, true), err.message)
            end
            assert(core.wire(URL .. "?sslmode=prefer")):close()
        end)

        it("raises on a connection string that is not a string", function()
            assert.has_error(function() core.wire(42) end)
            assert.has_error(function() core.wire() end)
        end)

        it("is one metatable whose close is also __gc and __close, closing twice harmless", function()
            local w = assert(core.wire(URL))
            assert.truthy(tostring(w):find("^qx.wire %(127.0.0.1:" .. PORT))
            w:close()
            w:close()
            assert.truthy(tostring(w):find("closed", 1, true))
            assert.has_error(function() w:output() end, "wire codec is closed")
        end)
    end)

    describe("start-up", function()
        it("logs in with trust and reports its backend, auth and transaction status", function()
            local w, sock = connected()
            assert.is_true(w:ready())
            assert.equal("trust", w:auth())
            assert.equal("idle", w:tx_status())
            assert.truthy(w:parameter("server_version"))
            assert.equal("qx", w:parameter("application_name"))
            local res = assert(h.batch(w, sock, { { "SELECT pg_backend_pid() AS pid" } }))
            assert.equal(w:pid(), res[1].rows[1].pid)
        end)

        for _, r in ipairs(ROLES) do
            it("logs in with " .. r.auth, function()
                local w, sock = connected(url_as(r.name, r.password))
                assert.equal(r.auth, w:auth())
                local res = assert(h.batch(w, sock, { { "SELECT current_user AS u" } }))
                assert.equal(r.name, res[1].rows[1].u)
            end)

            it("refuses a wrong " .. r.auth .. " password with the server's message", function()
                local err = refused(url_as(r.name, "wrong"))
                assert.equal("connection", err.code)
                assert.equal("28P01", err.sqlstate)
                assert.truthy(err.message:find('password authentication failed for user "' .. r.name
                    .. '"', 1, true), err.message)
            end)

            it("says when " .. r.auth .. " needs a password and none was given", function()
                if os.getenv("PGPASSWORD") then pending("PGPASSWORD is set") return end
                local err = refused(url_as(r.name))
                assert.equal("connection", err.code)
                assert.truthy(err.message:find("none was given", 1, true), err.message)
            end)
        end

        it("starts up with scram-sha-256 fed one byte at a time", function()
            local w, sock = connected(url_as("qx_wire_scram", "scram-secret"), 1)
            assert.equal("scram-sha-256", w:auth())
            assert.same({ { rows = { { one = 1 } }, affected = 1 } },
                assert(h.batch(w, sock, { { "SELECT 1 AS one" } }, false, 1)))
        end)

        it("reports the server's refusal of a role (pg_hba.conf reject)", function()
            local err = refused(url_as("qx_wire_reject"))
            assert.equal("connection", err.code)
            assert.truthy(err.message:find("pg_hba.conf rejects connection", 1, true), err.message)
        end)

        it("refuses an authentication method it does not support", function()
            local w = assert(core.wire(URL))
            w:start()
            assert.truthy(w:output())
            -- AuthenticationKerberosV5
            local ok, err = w:feed("R\0\0\0\8\0\0\0\2")
            assert.is_nil(ok)
            assert.equal("connection", err.code)
            assert.equal("authentication method 2 is not supported by qx's protocol codec"
                .. " (trust, password, md5, scram-sha-256)", err.message)
            assert.is_true(w:broken())
            assert.equal("bad", w:tx_status())
            w:close()
        end)

        it("refuses a server whose SCRAM signature is wrong", function()
            -- a server that offers SCRAM, then answers the first message with a made-up one
            local w = assert(core.wire(url_as("someone", "pw")))
            w:start()
            w:output()
            local function msg(t, body)
                local n = #body + 4
                return t .. string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                    math.floor(n / 256) % 256, n % 256) .. body
            end
            assert.is_false(w:feed(msg("R", "\0\0\0\10SCRAM-SHA-256\0\0")))
            local first = assert(w:output())
            local nonce = first:match("r=([%w+/=]+)")
            assert.is_false(w:feed(msg("R", "\0\0\0\11r=" .. nonce .. "srv,s=c2FsdA==,i=4096")))
            assert.truthy(w:output():find("c=biws,r=", 1, true))
            local ok, err = w:feed(msg("R", "\0\0\0\12v=" .. ("A"):rep(43) .. "="))
            assert.is_nil(ok)
            assert.equal("connection", err.code)
            assert.truthy(err.message:find("signature", 1, true), err.message)
            assert.is_true(w:broken())
            w:close()
        end)
    end)

    describe("batches", function()
        local w, sock

        setup(function()
            w, sock = connected()
        end)

        -- The statements through conn:batch, then (the table emptied again) through the codec.
        local function both(stmts)
            local a, aerr, ai = conn:batch(stmts)
            assert(conn:script("TRUNCATE " .. tbl))
            local b, berr, bi = h.batch(w, sock, stmts)
            return a, b, aerr, berr, ai, bi
        end

        it("gives what conn:batch gives: rows, NULLs, types and affected counts", function()
            local stmts = {
                { "INSERT INTO " .. tbl .. " (id, v) VALUES ($1, $2), ($3, $4), ($5, NULL)", 1, "a", 2, "b", 3 },
                { "SELECT id, v FROM " .. tbl .. " ORDER BY id" },
                { "UPDATE " .. tbl .. " SET v = $1 WHERE id > $2", "z", 1 },
                { "SELECT $1::int AS i, $2::text AS t, $3::bool AS yes, $4::bool AS no, $5::jsonb AS j,"
                    .. " $6::numeric AS n, $7::bytea AS b, $8::float8 AS f, $9::int8 AS big, $10::text AS null_",
                    n = 10, 42, "héllo", true, false, { a = { 1, 2 }, b = "x" }, "12345678901234567890.5",
                    "\\x00ff41", 1.5, 9000000000, core.null },
                { "SELECT '[1,null]'::json AS js, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id,"
                    .. " '\\x00ff'::bytea AS raw, NULL::int AS nothing" },
                { "DELETE FROM " .. tbl .. " WHERE id = $1", 2 },
                { "SELECT id FROM " .. tbl .. " WHERE false" },
            }
            local a, b = both(stmts)
            assert.is_table(a)
            assert.same(a, b)
            assert.equal(3, b[1].affected)
            assert.equal(3, b[2].affected)
            assert.same({ id = 3, v = core.null }, b[2].rows[3])
            assert.equal(2, b[3].affected)
            local r = b[4].rows[1]
            assert.equal(42, r.i); assert.equal("héllo", r.t); assert.is_true(r.yes); assert.is_false(r.no)
            assert.same({ a = { 1, 2 }, b = "x" }, r.j)
            assert.equal("12345678901234567890.5", r.n)
            assert.equal("\0\255A", r.b)
            assert.equal(1.5, r.f)
            assert.equal(core.null, r.null_)
            assert.equal(1, b[6].affected)
            assert.same({}, b[7].rows)
            assert.equal("idle", w:tx_status())
        end)

        it("prepares each SQL text once: a second batch adds no statement on the server", function()
            local count = { "SELECT count(*) AS n FROM pg_prepared_statements" }
            local stmts = { { "SELECT $1::int + 1 AS x", 1 }, { "SELECT $1::text AS y", "q" }, count }
            local first = assert(h.batch(w, sock, stmts))
            local again = assert(h.batch(w, sock, stmts))
            assert.equal(first[3].rows[1].n, again[3].rows[1].n)
            assert.same(first[1], again[1])
            local names = assert(h.batch(w, sock, {
                { "SELECT count(*) AS n FROM pg_prepared_statements WHERE name LIKE 'qxw%'" } }))
            -- all the codec's, and one more: the statement that counts them
            assert.equal(again[3].rows[1].n + 1, names[1].rows[1].n)
        end)

        it("keeps texts apart that differ only in their last bytes or their length", function()
            -- lengths around the cache's eight-byte hashing steps, each a prefix of the next,
            -- and pairs that differ in one byte of their partial last word
            local stmts = {}
            for pad = 0, 17 do
                stmts[#stmts + 1] = { "SELECT " .. pad .. " AS v" .. string.rep(" ", pad) }
            end
            for _, tail in ipairs { "a", "b", "ab", "ba", "abcdefg", "abcdefh" } do
                stmts[#stmts + 1] = { "SELECT '" .. tail .. "'::text AS v" }
            end
            for round = 1, 2 do
                local res = assert(h.batch(w, sock, stmts))
                for pad = 0, 17 do
                    assert.equal(pad, res[pad + 1].rows[1].v, "round " .. round)
                end
                assert.same({ "a", "b", "ab", "ba", "abcdefg", "abcdefh" },
                            { res[19].rows[1].v, res[20].rows[1].v, res[21].rows[1].v,
                              res[22].rows[1].v, res[23].rows[1].v, res[24].rows[1].v })
            end
        end)

        it("stops at an error in the middle: its index, SQLSTATE, nothing after it, nothing kept", function()
            local stmts = {
                { "INSERT INTO " .. tbl .. " (id, v) VALUES (10, 'x')" },
                { "SELECT 1 / $1::int AS boom", 0 },
                { "INSERT INTO " .. tbl .. " (id, v) VALUES (11, 'y')" },
            }
            local a, b, aerr, berr, ai, bi = both(stmts)
            assert.is_nil(a); assert.is_nil(b)
            assert.equal(2, bi); assert.equal(ai, bi)
            assert.equal("22012", berr.sqlstate)
            assert.same(aerr, berr)
            assert.equal("idle", w:tx_status())
            assert.same({}, assert(conn:query("SELECT * FROM " .. tbl)))
            -- and the codec goes on
            assert(h.batch(w, sock, { { "SELECT 1" } }))
        end)

        it("keeps the completed results with keep", function()
            local res, err, index, kept = h.batch(w, sock, {
                { "SELECT 1 AS a" }, { "SELECT 1 / 0" }, { "SELECT 3" } }, true)
            assert.is_nil(res)
            assert.equal("invalid", err.code)
            assert.equal(2, index)
            assert.same({ { rows = { { a = 1 } }, affected = 1 }, false, false }, kept)
        end)

        it("maps a unique violation to what conn:batch gives", function()
            local stmts = {
                { "INSERT INTO " .. tbl .. " (id) VALUES (1)" },
                { "INSERT INTO " .. tbl .. " (id) VALUES (1)" },
            }
            local _, _, aerr, berr, ai, bi = both(stmts)
            assert.equal("conflict", berr.code)
            assert.equal("23505", berr.sqlstate)
            assert.same(aerr, berr)
            assert.equal(2, bi); assert.equal(ai, bi)
        end)

        it("reports a deferred constraint failing at the Sync as no statement's (index nil)", function()
            local c = "wire_spec_deferred_" .. core.uuid():gsub("-", ""):sub(-8)
            assert(conn:script("CREATE TABLE " .. c .. " (id int PRIMARY KEY, parent int REFERENCES "
                .. c .. " DEFERRABLE INITIALLY DEFERRED)"))
            local stmts = { { "INSERT INTO " .. c .. " VALUES (1, 99)" }, { "SELECT 1 AS ok" } }
            local a, b, aerr, berr, ai, bi = both(stmts)
            conn:script("DROP TABLE " .. c)
            assert.is_nil(a); assert.is_nil(b)
            assert.is_nil(ai); assert.is_nil(bi)
            assert.equal("23503", berr.sqlstate)
            assert.same(aerr, berr)
        end)

        it("takes an empty query as done, and the batch goes on", function()
            local stmts = { { "" }, { "SELECT 2 AS two" } }
            local a, b = both(stmts)
            assert.same({ { rows = {}, affected = 0 }, { rows = { { two = 2 } }, affected = 1 } }, b)
            assert.same(a, b)
        end)

        it("reads COPY TO STDOUT's rows and drops them: the statement counts as done", function()
            local stmts = { { "COPY (SELECT generate_series(1, 5)) TO STDOUT" }, { "SELECT 7 AS seven" } }
            local a, b = both(stmts)
            assert.same(a, b)
            assert.equal(5, b[1].affected)
            assert.equal(7, b[2].rows[1].seven)
        end)

        it("gives the same results fed one byte at a time", function()
            local stmts = { { "SELECT g, g::text AS t, NULL AS n FROM generate_series(1, 50) g" },
                { "SELECT $1::jsonb AS j", { x = { 1, 2, 3 } } } }
            local whole = assert(h.batch(w, sock, stmts))
            assert.same(whole, assert(h.batch(w, sock, stmts, false, 1)))
            assert.same(whole, assert(h.batch(w, sock, stmts, false, 7)))
        end)

        it("refuses misuse: a batch while one is in progress, bad statements, a bad parameter", function()
            assert(w:batch({ { "SELECT 1" } }))
            assert.is_true(w:busy())
            assert.equal("active", w:tx_status())
            local ok, err = w:batch({ { "SELECT 2" } })
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            ok, err = w:batch_end()
            assert.is_nil(ok)
            assert.equal("invalid", err.code) -- not ended yet
            assert(h.run(w, sock))
            assert(w:batch_end())
            assert.is_false(w:busy())
            ok, err = w:batch_end()
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            assert.has_error(function() w:batch("SELECT 1") end)
            assert.has_error(function() w:batch({ "SELECT 1" }) end, "batch statement 1 is not a table")
            assert.has_error(function() w:batch({ { 1 } }) end, "batch statement 1 has no SQL text")
            local index
            ok, err, index = w:batch({ { "SELECT 1" }, { "SELECT $1", print } })
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            assert.equal(2, index)
            assert.is_true(w:ready())
            assert.same({}, assert(h.batch(w, sock, {})))
        end)

        it("refuses a batch before the start-up is done", function()
            local fresh = assert(core.wire(URL))
            local ok, err = fresh:batch({ { "SELECT 1" } })
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            fresh:start()
            ok, err = fresh:batch({ { "SELECT 1" } })
            assert.is_nil(ok)
            assert.equal("invalid", err.code)
            fresh:close()
        end)
    end)

    describe("failures that cost the connection", function()
        it("refuses COPY FROM STDIN and is broken after it", function()
            local w, sock = connected()
            local res, err, index = h.batch(w, sock, {
                { "SELECT 1" }, { "COPY " .. tbl .. " FROM STDIN" }, { "SELECT 2" } })
            assert.is_nil(res)
            assert.equal("invalid", err.code)
            assert.equal("COPY FROM STDIN is not supported (the connection is closed)", err.message)
            assert.equal(2, index)
            assert.is_true(w:broken())
            assert.equal("bad", w:tx_status())
            local ok, berr = w:batch({ { "SELECT 1" } })
            assert.is_nil(ok)
            assert.equal("connection", berr.code)
        end)

        it("ends a batch with the socket's error when it is lost mid-way, keeping what completed", function()
            for _, keep in ipairs{ false, true } do
                local w, sock = connected()
                assert(w:batch({ { "SELECT 1 AS a" }, { "SELECT 2 AS b" } }, keep))
                assert(sock:send(w:output()))
                -- the whole reply, then only what precedes the second statement's end is fed
                local reply = ""
                repeat
                    local d, e, partial = sock:receive(4096)
                    sock:settimeout(0.5)
                    reply = reply .. (d or partial or "")
                until reply:sub(-6, -2) == "Z\0\0\0\5" or (e and e ~= "timeout")
                local cut = assert(reply:find("C\0\0\0\13SELECT 1\0", 1, true)) + 13
                assert.is_false(w:feed(reply:sub(1, cut)))
                w:lost("timeout")
                assert.is_true(w:broken())
                local res, err, index, kept = w:batch_end()
                assert.is_nil(res)
                assert.equal("connection", err.code)
                assert.equal("connection lost: timeout", err.message)
                assert.equal(2, index)
                if keep then
                    assert.same({ { rows = { { a = 1 } }, affected = 1 }, false }, kept)
                else
                    assert.is_nil(kept)
                end
            end
        end)

        it("takes the server's FATAL (pg_terminate_backend) as a connection error and is broken", function()
            local w, sock = connected()
            -- the backend gone (true: waits for it), its FATAL and end are what the batch meets
            assert(conn:query("SELECT pg_terminate_backend($1, 5000)", w:pid()))
            local res, err = h.batch(w, sock, { { "SELECT 1" } })
            assert.is_nil(res)
            assert.equal("connection", err.code)
            assert.is_true(w:broken())
            assert.is_false(w:ready())
        end)

        it("is broken by bytes that are no protocol message, and says so", function()
            local w = assert(core.wire(URL))
            w:start()
            local ok, err = w:feed("Z\0\0\0\1")
            assert.is_nil(ok)
            assert.equal("connection", err.code)
            assert.truthy(err.message:find("protocol violation", 1, true))
            assert.is_true(w:broken())
            w:close()
            -- in a batch: the batch ends with the same error
            local sock
            w, sock = connected()
            assert(w:batch({ { "SELECT 1" } }))
            assert(sock:send(w:output()))
            ok, err = w:feed("\255\255\255\255\255garbage")
            assert.is_nil(ok)
            assert.equal("connection", err.code)
            local res, berr = w:batch_end()
            assert.is_nil(res)
            assert.same(err, berr)
            assert.is_true(w:broken())
            -- a message the state does not expect
            w, sock = connected()
            assert(w:batch({ { "SELECT 1" } }))
            assert(sock:send(w:output()))
            ok, err = w:feed("K\0\0\0\12\0\0\0\1\0\0\0\2")
            assert.is_nil(ok)
            assert.truthy(err.message:find("unexpected message 'K'", 1, true), err.message)
            assert.is_nil((w:batch_end()))
        end)
    end)
end)

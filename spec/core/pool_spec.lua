-- The connection pool against a real PostgreSQL: size, acquire timeout, broken and old connections
-- replaced, failures to connect reported within the connect timeout, connections handed back clean.
local core = require "qx.core"
local qx = require "qx"

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set: source the servers' env file")
local PG_DATA = os.getenv("QX_TEST_PG_DATA")

local function suffix()
    return core.uuid():gsub("-", ""):sub(-12)
end

local sleep = require("support").spin

-- A URL for the same server with another user and password.
local function url_as(user, password)
    local rest = URL:match("^postgres[%w+]*://[^@]*@(.*)$") or URL:match("^postgres[%w+]*://(.*)$")
    assert(rest, "QX_DB__URL must be a postgresql:// URL for this spec")
    return "postgresql://" .. user .. ":" .. password .. "@" .. rest
end

-- A TCP port on 127.0.0.1 that accepts connections (the kernel's backlog) but never answers: a
-- server that hangs. A LuaJIT helper process holds it for `seconds`.
local function silent_port(seconds)
    local code = [[
local ffi = require "ffi"
ffi.cdef[=[
int socket(int, int, int);
int bind(int, const void *, unsigned int);
int listen(int, int);
int getsockname(int, void *, unsigned int *);
unsigned int sleep(unsigned int);
struct sa_in { unsigned short family; unsigned short port; unsigned int addr; char zero[8]; };
]=]
local fd = ffi.C.socket(2, 1, 0)
local sa = ffi.new("struct sa_in")
sa.family = 2
sa.addr = 0x0100007f
assert(ffi.C.bind(fd, sa, ffi.sizeof(sa)) == 0)
assert(ffi.C.listen(fd, 16) == 0)
local len = ffi.new("unsigned int[1]", ffi.sizeof(sa))
ffi.C.getsockname(fd, sa, len)
io.write(bit.bor(bit.lshift(bit.band(sa.port, 0xff), 8), bit.rshift(sa.port, 8)), "\n")
io.stdout:flush()
io.stdout:close()
ffi.C.sleep(]] .. seconds .. [[)
]]
    -- without a sanitizer runtime the specs may have preloaded
    local f = assert(io.popen("env -u LD_PRELOAD luajit -e '" .. code:gsub("'", "'\\''") .. "' &"))
    local port = tonumber(f:read("*l"))
    f:close()
    assert(port, "helper did not report a port")
    return port
end

describe("qx.core pool", function()
    local admin

    setup(function()
        admin = assert(core.pool{ conninfo = URL, size = 1 })
    end)

    teardown(function()
        admin:close()
    end)

    local function sql(q, ...)
        local c = assert(admin:acquire())
        local rows, e = c:query(q, ...)
        c:release()
        return assert(rows, e)
    end

    it("opens no more than size connections", function()
        local p = assert(core.pool{ conninfo = URL, size = 2, acquire_timeout_ms = 100 })
        local a = assert(p:acquire())
        local b = assert(p:acquire())
        assert.are_not.equal(a:pid(), b:pid())
        local c, e = p:acquire()
        assert.is_nil(c)
        assert.equal("timeout", e.code)
        local s = p:stats()
        assert.equal(2, s.size)
        assert.equal(2, s.open)
        assert.equal(2, s.in_use)
        assert.equal(2, sql("SELECT count(*) AS n FROM pg_stat_activity WHERE pid IN ($1, $2)", a:pid(), b:pid())[1].n)
        a:release()
        b:release()
        assert.equal(2, p:stats().idle)
        p:close()
    end)

    it("reuses an idle connection before opening another", function()
        local p = assert(core.pool{ conninfo = URL, size = 3 })
        local a = assert(p:acquire())
        local pid = a:pid()
        a:release()
        a = assert(p:acquire())
        assert.equal(pid, a:pid())
        assert.equal(1, p:stats().open)
        a:release()
        p:close()
    end)

    it("times out an acquire on an exhausted pool after about the acquire timeout", function()
        local p = assert(core.pool{ conninfo = URL, size = 1, acquire_timeout_ms = 400 })
        local a = assert(p:acquire())
        local t0 = core.clock()
        local c, e = p:acquire()
        local waited = core.clock() - t0
        assert.is_nil(c)
        assert.equal("timeout", e.code)
        assert.truthy(e.message:find("exhausted", 1, true))
        assert.is_true(waited >= 0.38 and waited < 3, "waited " .. waited)
        a:release()
        c = assert(p:acquire()) -- usable again once one is back
        c:release()
        p:close()
    end)

    it("detects a connection terminated while idle and replaces it", function()
        local p = assert(core.pool{ conninfo = URL, size = 1 })
        local a = assert(p:acquire())
        local pid = a:pid()
        a:release()
        assert.is_true(sql("SELECT pg_terminate_backend($1) AS t", pid)[1].t)
        local deadline = core.clock() + 5
        while sql("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", pid)[1].n > 0
              and core.clock() < deadline do
            sleep(0.02)
        end
        local b = assert(p:acquire())
        assert.are_not.equal(pid, b:pid())
        assert.equal(1, assert(b:query("SELECT 1 AS one"))[1].one)
        assert.equal(1, p:stats().replaced)
        b:release()
        p:close()
    end)

    it("reports connection loss in use, then replaces the connection", function()
        local p = assert(core.pool{ conninfo = URL, size = 1 })
        local a = assert(p:acquire())
        local pid = a:pid()
        assert.is_true(sql("SELECT pg_terminate_backend($1) AS t", pid)[1].t)
        sleep(0.05)
        local rows, e = a:query("SELECT 1 AS one")
        assert.is_nil(rows)
        assert.equal("connection", e.code)
        assert.equal("bad", a:status())
        a:release()
        assert.equal(0, p:stats().open)
        local b = assert(p:acquire())
        assert.are_not.equal(pid, b:pid())
        assert.equal(1, assert(b:query("SELECT 1 AS one"))[1].one)
        b:release()
        p:close()
    end)

    it("replaces connections older than the recycle age", function()
        local p = assert(core.pool{ conninfo = URL, size = 1, recycle_ms = 150 })
        local a = assert(p:acquire())
        local pid = a:pid()
        a:release()
        a = assert(p:acquire())
        assert.equal(pid, a:pid()) -- still young
        a:release()
        sleep(0.2)
        a = assert(p:acquire())
        assert.are_not.equal(pid, a:pid())
        assert.equal(1, p:stats().replaced)
        a:release()
        p:close()
    end)

    it("hands back a connection left inside a transaction idle, its writes undone", function()
        local t = "pool_spec_" .. suffix()
        sql("CREATE TABLE " .. t .. " (x int)")
        local p = assert(core.pool{ conninfo = URL, size = 1 })
        local a = assert(p:acquire())
        assert(a:query("BEGIN"))
        assert(a:query("INSERT INTO " .. t .. " VALUES (1)"))
        assert.equal("intrans", a:status())
        a:release()
        a = assert(p:acquire())
        assert.equal("idle", a:status())
        assert.equal(0, assert(a:query("SELECT count(*) AS n FROM " .. t))[1].n)
        -- a failed transaction too
        assert(a:query("BEGIN"))
        assert.is_nil(a:query("SELECT 1/0"))
        assert.equal("inerror", a:status())
        a:release()
        a = assert(p:acquire())
        assert.equal("idle", a:status())
        a:release()
        assert.equal(1, p:stats().created)
        p:close()
        sql("DROP TABLE " .. t)
    end)

    it("hands back a connection that LISTENed listening to nothing", function()
        local p = assert(core.pool{ conninfo = URL, size = 1 })
        local channel = "pool_spec_" .. suffix()
        local a = assert(p:acquire())
        local pid = a:pid()
        assert(a:listen(channel))
        sql("SELECT pg_notify($1, 'before release')", channel)
        a:release()
        sql("SELECT pg_notify($1, 'after release')", channel)
        a = assert(p:acquire())
        assert.equal(pid, a:pid())
        assert.same({}, assert(a:notifications(200)))
        assert.equal(0, #assert(a:query("SELECT pg_listening_channels() AS c")))
        a:release()
        p:close()
    end)

    it("reports a refused connection as a connection error at once", function()
        local port = silent_port(0) -- bound, then released when the helper exits: nothing listens
        sleep(0.1)
        local p = assert(core.pool{ conninfo = "postgresql://postgres@127.0.0.1:" .. port .. "/postgres",
                                    size = 1, connect_timeout_ms = 2000 })
        local t0 = core.clock()
        local c, e = p:acquire()
        assert.is_nil(c)
        assert.equal("connection", e.code)
        assert.is_true(core.clock() - t0 < 2)
        assert.equal(0, p:stats().open)
        p:close()
    end)

    it("gives up on a server that never answers within the connect timeout #slow", function()
        local port = silent_port(8)
        local p = assert(core.pool{ conninfo = "postgresql://postgres@127.0.0.1:" .. port .. "/postgres",
                                    size = 1, connect_timeout_ms = 2000 })
        local t0 = core.clock()
        local c, e = p:acquire()
        local waited = core.clock() - t0
        assert.is_nil(c)
        assert.equal("connection", e.code)
        -- libpq counts the 2 s on a clock of whole seconds: it ends between 1 and 3 s after the start
        assert.is_true(waited >= 1 and waited < 5, "waited " .. waited)
        p:close()
    end)

    describe("with a password-protected role", function()
        local role = "qx_pool_spec_" .. suffix()
        local hba = PG_DATA and (PG_DATA .. "/pg_hba.conf")
        local original

        local function reload_and_wait(want_scram)
            sql("SELECT pg_reload_conf()")
            local deadline = core.clock() + 5
            repeat
            local p = assert(core.pool{ conninfo = url_as(role, "wrong"), size = 1, connect_timeout_ms = 2000 })
            local c = p:acquire()
            if c then c:release() end
            p:close()
            if (c == nil) == want_scram then return end
            sleep(0.05)
            until core.clock() > deadline
            error("pg_hba.conf reload did not take effect")
        end

        setup(function()
            if not hba then return end
            sql("CREATE ROLE " .. role .. " LOGIN PASSWORD 'right-password'")
            local f = assert(io.open(hba, "r"))
            original = f:read("*a")
            f:close()
            f = assert(io.open(hba, "w"))
            f:write("host all ", role, " 127.0.0.1/32 scram-sha-256\n", original)
            f:close()
            reload_and_wait(true)
        end)

        teardown(function()
            if not original then return end
            local f = assert(io.open(hba, "w"))
            f:write(original)
            f:close()
            sql("SELECT pg_reload_conf()")
            sql("DROP ROLE IF EXISTS " .. role)
        end)

        it("reports a wrong password as a connection error within the connect timeout", function()
            if not hba then pending("needs QX_TEST_PG_DATA (a cluster of our own)") return end
            local t0 = core.clock()
            local p = assert(core.pool{ conninfo = url_as(role, "wrong"), size = 1, connect_timeout_ms = 2000 })
            local c, e = p:acquire()
            assert.is_nil(c)
            assert.equal("connection", e.code)
            assert.truthy(e.message:find("password", 1, true))
            assert.is_true(core.clock() - t0 < 2)
            p:close()
            -- and the right one works, so it was the password that failed
            p = assert(core.pool{ conninfo = url_as(role, "right-password"), size = 1 })
            c = assert(p:acquire())
            c:release()
            p:close()
        end)

        it("makes qx.connect return nil, err for a wrong password", function()
            if not hba then pending("needs QX_TEST_PG_DATA (a cluster of our own)") return end
            local db, e = qx.connect{ url = url_as(role, "wrong"), connect_timeout_seconds = 2 }
            assert.is_nil(db)
            assert.equal("connection", e.code)
            assert.is_nil(e.message:find("wrong", 1, true)) -- the password is not repeated
        end)
    end)

    it("makes qx.connect return nil, err for a refused connection", function()
        local port = silent_port(0)
        sleep(0.1)
        local t0 = core.clock()
        local db, e = qx.connect{ url = "postgresql://postgres@127.0.0.1:" .. port .. "/postgres",
                                  connect_timeout_seconds = 2 }
        assert.is_nil(db)
        assert.equal("connection", e.code)
        assert.is_true(core.clock() - t0 < 2)
    end)

    it("makes qx.connect raise on an unknown option name instead of dropping it", function()
        assert.has_error(function() qx.connect{ url = URL, pool_sise = 50 } end,
                         "qx.connect: unknown option 'pool_sise' (known: acquire_timeout_ms, connect_timeout_ms, "
                         .. "connect_timeout_seconds, cursor_key, dispatcher, pool_recycle_seconds, pool_size, "
                         .. "pool_timeout_seconds, shared_pool, statement_timeout_ms, url)")
        local ok, e = pcall(function() qx.connect{ url = URL, [1] = "x" } end)
        assert.is_false(ok)
        assert.matches("pool_spec.lua:%d+: qx.connect: unknown option '1' %(known: acquire_timeout_ms, ", e)
        local db = assert(qx.connect{ url = URL, pool_size = 3, dispatcher = qx.dispatcher() })
        assert.equal(3, db:stats().size)
        db:close()
    end)

    it("runs init_sql once on each new connection", function()
        local p = assert(core.pool{ conninfo = URL, size = 2,
            init_sql = "SET statement_timeout = 1234; SET application_name = 'pool-spec'" })
        local a = assert(p:acquire())
        local b = assert(p:acquire())
        for _, c in ipairs({ a, b }) do
            local r = assert(c:query("SELECT current_setting('statement_timeout') AS t,"
                .. " current_setting('application_name') AS n"))[1]
            assert.equal("1234ms", r.t)
            assert.equal("pool-spec", r.n)
        end
        a:release()
        b:release()
        p:close()
    end)

    it("fails the acquire when init_sql fails, keeping no connection", function()
        local p = assert(core.pool{ conninfo = URL, size = 1, init_sql = "SET no_such_setting_at_all = 1" })
        local c, e = p:acquire()
        assert.is_nil(c)
        assert.equal("db", e.code)
        assert.equal(0, p:stats().open)
        assert.equal(0, p:stats().in_use)
        p:close()
    end)

    it("makes qx.connect set the statement_timeout on every pooled connection", function()
        local db = assert(qx.connect{ url = URL, pool_size = 2, statement_timeout_ms = 4321 })
        assert.equal("4321ms", assert(db:query("SHOW statement_timeout"))[1].statement_timeout)
        db:close()
        db = assert(qx.connect{ url = URL, pool_size = 1, statement_timeout_ms = 0 })
        assert.equal("0", assert(db:query("SHOW statement_timeout"))[1].statement_timeout)
        db:close()
    end)

    it("checks its options", function()
        local p, e = core.pool{ conninfo = URL, size = 0 }
        assert.is_nil(p)
        assert.equal("invalid", e.code)
        assert.has_error(function() core.pool{ conninfo = URL, size = -1 } end)
        assert.has_error(function() core.pool{ conninfo = URL, acquire_timeout_ms = "soon" } end)
        assert.has_error(function() core.pool{ size = 1 } end)
    end)

    it("raises on acquire after close; a connection leased before close is released safely", function()
        local p = assert(core.pool{ conninfo = URL, size = 1 })
        local a = assert(p:acquire())
        p:close()
        assert.has_error(function() p:acquire() end, "pool is closed")
        assert.equal(1, assert(a:query("SELECT 1 AS one"))[1].one)
        a:release()
        p:close() -- twice is harmless
    end)

    it("shares one pool by name: its size holds for every handle, each close drops one hold",
       function()
        local name = "spec-shared-" .. suffix()
        local a = assert(core.pool{ conninfo = URL, size = 2, acquire_timeout_ms = 100,
                                    shared = name })
        local b = assert(core.pool{ conninfo = URL, size = 2, acquire_timeout_ms = 100,
                                    shared = name })
        local c1, c2 = assert(a:acquire()), assert(b:acquire())
        local none, e = b:acquire()
        assert.is_nil(none)
        assert.equal("timeout", e.code)
        assert.same({ size = 2, open = 2, idle = 0, in_use = 2 },
            { size = a:stats().size, open = a:stats().open, idle = a:stats().idle,
              in_use = b:stats().in_use })
        local pid = c1:pid()
        c1:release()
        local again = assert(b:acquire())
        assert.equal(pid, again:pid()) -- the connection a released serves b
        again:release()
        c2:release()

        a:close()
        local c3 = assert(b:acquire()) -- b still holds the pool and its connections
        assert.equal(2, b:stats().open)
        c3:release()
        b:close()
        local fresh = assert(core.pool{ conninfo = URL, size = 2, shared = name })
        assert.equal(0, fresh:stats().open) -- the last close closed it; the name makes a new one
        fresh:close()
    end)

    it("refuses a shared name taken with another url or size, and an empty name", function()
        local name = "spec-shared-" .. suffix()
        local a = assert(core.pool{ conninfo = URL, size = 2, shared = name })
        local p, e = core.pool{ conninfo = URL, size = 3, shared = name }
        assert.is_nil(p)
        assert.equal("invalid", e.code)
        assert.matches("exists with another url or size", e.message, 1, true)
        p, e = core.pool{ conninfo = URL .. "?application_name=other", size = 2, shared = name }
        assert.is_nil(p)
        assert.equal("invalid", e.code)
        p, e = core.pool{ conninfo = URL, size = 2, shared = "" }
        assert.is_nil(p)
        assert.equal("invalid", e.code)
        assert.equal(0, a:stats().in_use)
        a:close()
    end)

    it("makes qx.connect share a pool by name (shared_pool)", function()
        local name = "spec-shared-" .. suffix()
        local d1 = assert(qx.connect{ url = URL, pool_size = 1, shared_pool = name })
        local d2 = assert(qx.connect{ url = URL, pool_size = 1, shared_pool = name })
        local p1 = assert(d1:query("SELECT pg_backend_pid() AS pid"))[1].pid
        local p2 = assert(d2:query("SELECT pg_backend_pid() AS pid"))[1].pid
        assert.equal(p1, p2)
        assert.equal(1, d2.pool:stats().open)
        d1:close()
        assert.equal(p1, assert(d2:query("SELECT pg_backend_pid() AS pid"))[1].pid)
        d2:close()
        assert.has_error(function() qx.connect{ url = URL, shared_pool = "" } end,
            "qx.connect: shared_pool must be a non-empty name")
    end)
end)

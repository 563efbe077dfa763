-- qx.openresty: command handlers in nginx worker threads, tested in a real nginx (Debian's nginx
-- + lua-nginx-module, the module OpenResty bundles) started here on a free 127.0.0.1 port with
-- one worker, against a database of its own made for this run.
local qx = require "qx"
local cjson = require "cjson"
local openresty = require "qx.openresty"
local support = require "support"
local clock = require("qx.core").clock

local ADMIN_URL = support.db_url()
local THREADS = 2          -- threads of the "qx" pool, and calls one worker runs at once
local SLOW_SECONDS = 2     -- how long a slow command holds its transaction

-- ---- processes and files ---------------------------------------------------------------------

local sh = support.sh

local function slurp(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return s
end

local function spit(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

-- Runs a shell command line (without a sanitizer preload, which nginx and curl must not
-- inherit). Returns ok, stdout+stderr. The status goes through a file: LuaJIT's popen:close()
-- does not report it.
local function run(cmdline)
    local rcf = os.tmpname()
    local p = assert(io.popen("unset LD_PRELOAD; { " .. cmdline .. "\n} 2>&1; echo $? >"
        .. sh(rcf)))
    local out = p:read("*a") or ""
    p:close()
    local rc = tonumber(((slurp(rcf) or ""):match("%d+")))
    os.remove(rcf)
    return rc == 0, out
end

local function sleep(s)
    run("sleep " .. string.format("%.3f", s))
end

local ROOT
do
    local src = debug.getinfo(1, "S").source:gsub("^@", "")
    local dir = src:match("^(.*)/[^/]*$") or "."
    local ok, out = run("cd " .. sh(dir .. "/../..") .. " && pwd")
    assert(ok, out)
    ROOT = out:match("[^\n]+")
end

local function decode(text)
    local ok, v = pcall(cjson.decode, text or "")
    if ok then return v end
    return text
end

-- ---- the database of this run ----------------------------------------------------------------

-- ADMIN_URL with another database (and an application_name).
local function url_for(dbname, appname)
    local url = ADMIN_URL
    if url:match("^postgres[%w+]*://") then
        local base, query = url:match("^([^?]*)%??(.*)$")
        base = base:match("^(postgres[%w+]*://[^/]*)") .. "/" .. dbname
        local params = {}
        for kv in query:gmatch("[^&]+") do
            if not kv:match("^application_name=") then params[#params + 1] = kv end
        end
        if appname then params[#params + 1] = "application_name=" .. appname end
        return base .. (#params > 0 and ("?" .. table.concat(params, "&")) or "")
    end
    return url .. " dbname=" .. dbname .. (appname and (" application_name=" .. appname) or "")
end

-- ---- nginx ------------------------------------------------------------------------------------

local RUN_DIR = (os.getenv("QX_TEST_RUN_DIR") or (ROOT .. "/.run")) .. "/"
    .. support.unique("openresty")
local LAUNCHER = ROOT .. "/examples/openresty/run.sh"

-- Starts the example's nginx in RUN_DIR/name with the spec's modules and locations.
local function start_nginx(name, db_url, env)
    local prefix = RUN_DIR .. "/" .. name
    local vars = {
        QX_DB__URL = db_url,
        QX_NGINX_WORKERS = "1",
        QX_NGINX_THREADS = tostring(THREADS),
        QX_NGINX_LUA_PATH = RUN_DIR .. "/lua/?.lua;",
        QX_NGINX_INCLUDE = RUN_DIR .. "/spec_locations.conf",
    }
    for k, v in pairs(env or {}) do vars[k] = v end
    local assign = {}
    for k, v in pairs(vars) do assign[#assign + 1] = k .. "=" .. sh(v) end
    local ok, out = run("env " .. table.concat(assign, " ") .. " bash " .. sh(LAUNCHER) .. " start "
        .. sh(prefix))
    assert(ok, "the example's nginx did not start:\n" .. out)
    local envtext = assert(slurp(prefix .. "/env"), "no " .. prefix .. "/env")
    return {
        prefix = prefix,
        url = assert(envtext:match("QX_HTTP_URL=(%S+)")),
        pid = tonumber(envtext:match("QX_NGINX_PID=(%d+)")),
    }
end

local function stop_nginx(n)
    if n then run("bash " .. sh(LAUNCHER) .. " stop " .. sh(n.prefix)) end
end

local function error_log(n)
    return slurp(n.prefix .. "/logs/error.log") or ""
end

-- Starts `bin/qx relay` as its own process (Lua 5.4, the tree's paths) with env; returns
-- { pid, log }.
local function start_relay(env)
    local logf, pidf = RUN_DIR .. "/relay.log", RUN_DIR .. "/relay.pid"
    local assign = {
        "LUA_PATH=" .. sh(ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;;"),
        "LUA_CPATH=" .. sh(ROOT .. "/build/lua5.4/?.so;;"),
    }
    for k, v in pairs(env) do assign[#assign + 1] = k .. "=" .. sh(v) end
    assert(os.execute("(unset LD_PRELOAD; exec env " .. table.concat(assign, " ") .. " lua5.4 "
        .. sh(ROOT .. "/bin/qx") .. " relay --ensure-stream --poll-interval 0.2 --verbose </dev/null >"
        .. sh(logf) .. " 2>&1) & echo $! >" .. sh(pidf)))
    local pid = tonumber((slurp(pidf) or ""):match("%d+"))
    assert(pid, "the relay did not start")
    return { pid = pid, log = logf }
end

local function alive(pid)
    local stat = slurp("/proc/" .. pid .. "/stat")
    return stat ~= nil and not stat:match("^%d+ %b() [ZX]")
end

local req_n = 0

-- One HTTP request through curl. Returns status, decoded body (or text), seconds.
local function http(n, method, path, body, headers, max_time, may_time_out)
    req_n = req_n + 1
    local out = RUN_DIR .. "/resp-" .. req_n
    local cmd = { "curl -s -S --max-time", tostring(max_time or 30), "-X", method,
                  "-o", sh(out), "-w", sh("%{http_code} %{time_total}") }
    for k, v in pairs(headers or {}) do cmd[#cmd + 1] = "-H " .. sh(k .. ": " .. v) end
    if body ~= nil then
        local bf = out .. ".req"
        spit(bf, type(body) == "string" and body or cjson.encode(body))
        cmd[#cmd + 1] = "-H 'content-type: application/json' --data-binary @" .. sh(bf)
    end
    cmd[#cmd + 1] = sh(n.url .. path)
    local ok, res = run(table.concat(cmd, " "))
    local status, t = res:match("(%d%d%d) ([%d.]+)%s*$")
    if may_time_out and res:match("^curl: %(28%)") then return nil end
    assert(ok and status, "curl failed: " .. res)
    return tonumber(status), decode(slurp(out)), tonumber(t)
end

-- Starts a request in the background; the returned function waits for it and returns
-- status, body, seconds.
local function http_async(n, path, body, max_time)
    req_n = req_n + 1
    local out = RUN_DIR .. "/resp-" .. req_n
    local bf, wf = out .. ".req", out .. ".status"
    spit(bf, cjson.encode(body))
    os.execute("(unset LD_PRELOAD; curl -s --max-time " .. tostring(max_time or 60)
        .. " -X POST -H 'content-type: application/json' --data-binary @" .. sh(bf)
        .. " -o " .. sh(out) .. " -w '%{http_code} %{time_total}' " .. sh(n.url .. path)
        .. " >" .. sh(wf .. ".part") .. " 2>/dev/null; mv " .. sh(wf .. ".part") .. " " .. sh(wf)
        .. ") >/dev/null 2>&1 &")
    return function(timeout)
        local deadline = os.time() + (timeout or 60)
        repeat
            local s = slurp(wf)
            if s then
                local status, t = s:match("(%d+) ([%d.]+)")
                return tonumber(status), decode(slurp(out)), tonumber(t)
            end
            sleep(0.05)
        until os.time() > deadline
        error("background request to " .. path .. " did not finish")
    end
end

-- `count` GETs of path on one keep-alive connection; returns their times in seconds.
local function sample(n, path, count)
    local cfg = RUN_DIR .. "/sample.cfg"
    local lines = { 'write-out = "%{http_code} %{time_total}\\n"', "silent" }
    for _ = 1, count do
        lines[#lines + 1] = 'url = "' .. n.url .. path .. '"'
        lines[#lines + 1] = 'output = "/dev/null"'
    end
    spit(cfg, table.concat(lines, "\n") .. "\n")
    local ok, out = run("curl -K " .. sh(cfg))
    assert(ok, out)
    local times, bad = {}, {}
    for status, t in out:gmatch("(%d%d%d) ([%d.]+)") do
        if status ~= "200" then bad[#bad + 1] = status end
        times[#times + 1] = tonumber(t)
    end
    assert(#bad == 0, "non-200 answers: " .. table.concat(bad, " "))
    assert(#times == count, "expected " .. count .. " samples, got " .. #times)
    table.sort(times)
    return times
end

local function quantile(sorted, q)
    return sorted[math.max(1, math.ceil(#sorted * q))]
end

-- ---- what the spec adds to the example ------------------------------------------------------

-- Handler modules, written into RUN_DIR/lua (first on lua_package_path).
local MODULES = {
    -- slow, backend and boom as the worker's (below), and more, for the thread VMs
    openresty_spec_handlers = [[
local openresty = require "qx.openresty"
local M = {}
for name, fn in pairs(require "openresty_spec_worker") do M[name] = fn end
function M.returns_function()
  return { f = function() end }
end
function M.returns_cycle()
  local t = {}
  t.again = t
  return t
end
function M.echo(db, cmd, context)
  return { command = cmd, context = context, null = cmd.maybe == require("qx").null }
end
return openresty.handlers(M)
]],
    -- not made with qx.openresty.handlers: the usual result | nil, err
    openresty_spec_plain = [[
return {
  hello = function(cmd) return { hi = cmd.name } end,
  taken = function() return nil, { code = "conflict", message = "that name is taken" } end,
}
]],
    openresty_spec_baddb = [[
return require("qx.openresty").handlers({
  ping = function(db) return db:query("SELECT 1") end,
}, { db = { url = "postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_seconds = 2 } })
]],
    -- every thread VM of the worker on one shared pool of one connection
    openresty_spec_shared = [[
return require("qx.openresty").handlers({
  backend = function(db)
    local rows = assert(db:query("SELECT pg_backend_pid() AS pid, pg_sleep(0.2)::text AS slept"))
    return { pid = rows[1].pid }
  end,
}, { db = { pool_size = 1, shared_pool = "openresty_spec_shared" } })
]],
    -- raw handlers, for the worker itself (qx.openresty.connect) and, wrapped, for the threads:
    -- fn(db, cmd) -> res | nil, err
    openresty_spec_worker = [[
local M = {}
-- holds a transaction open for cmd.seconds, having written a row
function M.slow(db, cmd)
  return db:unit_of_work(function(uow)
    assert(uow:exec("INSERT INTO spec_slow (tag) VALUES ($1)", cmd.tag))
    assert(uow:query("SELECT pg_sleep($1)", cmd.seconds))
    return { tag = cmd.tag }
  end)
end
function M.backend(db)
  local rows = assert(db:query("SELECT pg_backend_pid() AS pid"))
  return { pid = rows[1].pid }
end
function M.boom()
  error("the secret detail of a bug")
end
return M
]],
    openresty_spec_broken = "return {\n",
    openresty_spec_number = "return 42\n",
}

local LOCATIONS = [[
# the spec's own locations (RUN_DIR/spec_locations.conf)
location = /spec/run {
    content_by_lua_block {
        local openresty = require "qx.openresty"
        local b = assert(openresty.read_json())
        local res, err = openresty.run(b.pool or "qx", b.module, b.func, b.command, b.context)
        openresty.respond(res, err)
    }
}
location = /spec/run_json {
    content_by_lua_block {
        local openresty = require "qx.openresty"
        local a = ngx.req.get_uri_args()
        local body, err = openresty.read_body()
        local res
        if body then res, err = openresty.run_json("qx", a.module, a.func, body) end
        openresty.respond_json(res, err, 201)
    }
}
location = /spec/abortable {
    lua_check_client_abort on;
    content_by_lua_block {
        local openresty = require "qx.openresty"
        local b = assert(openresty.read_json())
        openresty.respond(openresty.run("qx", b.module, b.func, b.command))
    }
}
location = /spec/stats {
    content_by_lua_block {
        if ngx.var.arg_gc then collectgarbage() collectgarbage() end
        ngx.say(require("cjson").encode(require("qx.openresty").stats()))
    }
}
# a raw handler run in the worker itself, on the worker's cosocket connections
location = /spec/worker {
    content_by_lua_block {
        local openresty = require "qx.openresty"
        local db = package.loaded.openresty_spec_worker_db
        if not db then
            -- an application_name of its own: the thread pools' backends are counted apart
            local url = os.getenv("QX_DB__URL")
            url = url .. (url:find("?", 1, true) and "&" or "?") .. "application_name=qx-spec-worker"
            db = assert(openresty.connect{ url = url, pool_size = tonumber(ngx.var.arg_pool) or 4 })
            package.loaded.openresty_spec_worker_db = db
        end
        local b = assert(openresty.read_json())
        local m = require "openresty_spec_worker"
        local ok, res, err = xpcall(m[b.func], debug.traceback, db, b.command)
        if not ok then
            ngx.log(ngx.ERR, "worker handler raised: ", res)
            return openresty.respond(nil, { code = "error", message = "internal error" })
        end
        openresty.respond(res, err)
    }
}
# what qx.openresty exists to prevent: a blocking call on the event loop
location = /spec/blocking {
    content_by_lua_block {
        local db = assert(require("qx").connect{ pool_size = 1 })
        assert(db:query("SELECT pg_sleep($1)", tonumber(ngx.var.arg_seconds)))
        db:close()
        ngx.say("done")
    }
}
]]

-- ---- outside nginx ----------------------------------------------------------------------------

describe("qx.openresty outside nginx", function()
    it("refuses connect outside nginx, and options that are not qx.connect's", function()
        assert.has_error(function() openresty.connect() end,
            "qx.openresty.connect: needs nginx's Lua module (ngx.socket.tcp)")
        assert.has_error(function() openresty.connect("url") end,
            "qx.openresty.connect: options must be a table")
        assert.has_error(function() openresty.connect{ shared_pool = "x" } end)
    end)

    it("maps error codes to HTTP statuses", function()
        local s = openresty.http_status
        assert.equal(409, s(qx.error.new("conflict", "x")))
        assert.equal(422, s(qx.error.new("invalid", "x")))
        assert.equal(404, s(qx.error.new("not_found", "x")))
        assert.equal(504, s(qx.error.new("timeout", "x")))
        assert.equal(500, s(qx.error.new("db", "x")))
        assert.equal(500, s(qx.error.new("connection", "x")))
        assert.equal(500, s(qx.error.new("config", "x")))
        assert.equal(500, s(qx.error.new("error", "x")))
        assert.equal(400, s(qx.error.new("invalid", "x", { http_status = 400 })))
        assert.equal(422, s(qx.error.new("invalid", "x", { http_status = 200 })))
    end)

    it("shows the code and message of an error, but not those of a raised Lua error", function()
        local body = openresty.error_body(qx.error.new("conflict", "taken", { sqlstate = "23505" }))
        assert.same({ error = { code = "conflict", message = "taken", sqlstate = "23505" } }, body)
        body = openresty.error_body(qx.error.from_raised("x.lua:3: secret", "stack traceback: ..."))
        assert.same({ error = { code = "error", message = "internal error" } }, body)
    end)

    it("names the first value that cannot cross into a thread", function()
        assert.is_true(openresty.is_plain({ a = { 1, 2, "x", true, qx.null }, [2] = false }))
        local ok, why = openresty.is_plain({ a = { b = print } }, "command")
        assert.is_nil(ok)
        assert.equal("command.a.b is a function", why)
        local t = {}
        t.self = t
        ok, why = openresty.is_plain(t, "command")
        assert.is_nil(ok)
        assert.matches("command.self refers back", why, 1, true)
        why = select(2, openresty.is_plain({ [{}] = 1 }, "command"))
        assert.equal("command has a table key", why)
        why = select(2, openresty.is_plain({ x = io.stdout }, "command"))
        assert.equal("command.x is a userdata", why)
    end)

    it("raises a clear misuse error when run outside nginx", function()
        assert.has_error(function() openresty.run("qx", "m", "f", {}) end,
            "qx.openresty.run: needs nginx with lua-nginx-module 0.10.23 or later "
            .. "(ngx.run_worker_thread)")
        assert.has_error(function() openresty.run("qx", "m", "f", { f = print }) end,
            "qx.openresty.run: command.f is a function; only plain data crosses into a thread")
        assert.has_error(function() openresty.run(nil, "m", "f", {}) end,
            "qx.openresty.run: pool must be a thread pool name")
    end)

    it("wraps handlers: one pool per VM made on the first call, results and errors as plain data",
       function()
        local connects = 0
        local m = openresty.handlers({
            ok = function(db, cmd) return { v = db:query("SELECT $1::text AS v", cmd.v)[1].v } end,
            fails = function() return nil, qx.error.new("conflict", "taken", { sqlstate = "23505" }) end,
            raises = function() error("oops") end,
            raises_qx = function() error(qx.error.new("not_found", "gone")) end,
            leaks = function(db) return { db = db } end,
        }, { connect = function()
            connects = connects + 1
            return qx.connect{ url = ADMIN_URL, pool_size = 1 }
        end })
        assert.is_nil(m.__qx_db())
        local mark, ok, res = m.ok({ v = "a" })
        assert.equal(openresty.MARK, mark)
        assert.is_true(ok)
        assert.same({ v = "a" }, res)
        for i = 1, 5 do assert.same({ v = tostring(i) }, select(3, m.ok({ v = tostring(i) }))) end
        assert.equal(1, connects)

        local _, ok2, e = m.fails()
        assert.is_false(ok2)
        assert.same({ code = "conflict", message = "taken", sqlstate = "23505" }, e)
        assert.is_nil(getmetatable(e))
        _, ok2, e = m.raises()
        assert.is_false(ok2)
        assert.equal("error", e.code)
        assert.matches("oops", e.message)
        assert.equal("string", type(e.traceback))
        _, _, e = m.raises_qx()
        assert.same({ code = "not_found", message = "gone" }, e)
        _, ok2, e = m.leaks()
        assert.is_false(ok2)
        assert.matches("handler 'leaks' returned data that cannot leave its thread: result.db",
            e.message, 1, true)
        assert.is_true(openresty.is_plain(e))
        m.__qx_db():close()
    end)

    it("decodes a JSON command and encodes the result in the thread for run_json", function()
        local seen
        local m = openresty.handlers({
            echo = function(_, cmd, context)
                seen = cmd
                return { got = cmd, ctx = context, big = 9007199254740993 }
            end,
            nothing = function() end,
            leaks = function() return { f = print } end,
        }, { db = false })
        local _
        local mark, ok, text = m.echo('{"a":[1,2,{"b":null}],"n":2.5,"s":"x\\"y"}', { t = 1 }, "json")
        assert.equal(openresty.MARK, mark)
        assert.is_true(ok)
        assert.equal("string", type(text))
        assert.equal(qx.null, seen.a[3].b)
        local back = cjson.decode(text)
        assert.same({ a = { 1, 2, { b = cjson.null } }, n = 2.5, s = 'x"y' }, back.got)
        assert.same({ t = 1 }, back.ctx)
        if math.type then
            assert.matches('"big":9007199254740993', text, 1, true) -- exact on 5.4
        end
        -- a table command passes as it is; the result is still JSON text
        _, ok, text = m.echo({ k = "v" }, nil, "json")
        assert.is_true(ok)
        assert.same({ k = "v" }, cjson.decode(text).got)
        _, ok, text = m.nothing("{}", nil, "json")
        assert.is_true(ok)
        assert.is_nil(text)
        local e
        _, ok, e = m.leaks("{}", nil, "json")
        assert.is_false(ok)
        assert.matches("handler 'leaks' returned data that JSON cannot hold", e.message, 1, true)
    end)

    it("refuses a run_json body that is not a JSON object before the handler runs", function()
        local calls = 0
        local m = openresty.handlers({ count = function() calls = calls + 1 return {} end },
            { db = false })
        for _, text in ipairs({ "[1,2]", "[]", '"ann"', "42", "null", "true", "{bad", "", " " }) do
            local _, ok, e = m.count(text, nil, "json")
            assert.is_false(ok, text)
            assert.equal("invalid", e.code, text)
            assert.equal(400, e.http_status, text)
            assert.matches("not a JSON object", e.message, 1, true)
        end
        local _, ok, e = m.count(nil, nil, "json")
        assert.is_false(ok)
        assert.equal(400, e.http_status)
        assert.equal(0, calls)
        _, ok = m.count(" \n {}", nil, "json")
        assert.is_true(ok)
        assert.equal(1, calls)
    end)

    it("raises a clear misuse error for run_json's arguments", function()
        assert.has_error(function() openresty.run_json("qx", "m", "f", "{}") end,
            "qx.openresty.run_json: needs nginx with lua-nginx-module 0.10.23 or later "
            .. "(ngx.run_worker_thread)")
        assert.has_error(function() openresty.run_json("qx", "m", "f", 42) end,
            "qx.openresty.run_json: body must be the JSON text of the command or a table")
        assert.has_error(function() openresty.run_json("qx", "m", "f", "{}", { f = print }) end,
            "qx.openresty.run_json: context.f is a function; only plain data crosses into a thread")
        assert.has_error(function() openresty.run_json("qx", "m", "f", { f = print }) end,
            "qx.openresty.run_json: command.f is a function; only plain data crosses into a thread")
    end)

    it("retries a failed connect on the next call and reports it as a connection error", function()
        local m = openresty.handlers({ ping = function() return "pong" end },
            { db = { url = "postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_seconds = 2 } })
        for _ = 1, 2 do
            local _, ok, e = m.ping()
            assert.is_false(ok)
            assert.equal("connection", e.code)
        end
        assert.is_nil(m.__qx_db())
    end)

    it("makes no pool for handlers that use no database", function()
        local m = openresty.handlers({
            add = function(db, cmd) return { db = db == nil, sum = cmd.a + cmd.b } end,
        }, { db = false })
        local _, ok, res = m.add({ a = 1, b = 2 })
        assert.is_true(ok)
        assert.same({ db = true, sum = 3 }, res)
        assert.is_nil(m.__qx_db())
    end)

    it("refuses handler tables that are not functions", function()
        assert.has_error(function() openresty.handlers({ x = 1 }) end,
            "qx.openresty.handlers: x must be a function")
        assert.has_error(function() openresty.handlers({}, { db = {}, connect = print }) end,
            "qx.openresty.handlers: pass db or connect, not both")
    end)
end)

-- ---- in nginx -----------------------------------------------------------------------------------

describe("qx.openresty in nginx #slow", function()
    local admin, db, dbname, app_url
    local nginx, bare -- the example with the spec's locations; one without a thread_pool
    local relay, stream_conn

    local function count(sql, ...)
        return db:query(sql, ...)[1].n
    end

    -- the PostgreSQL backends nginx's thread VMs hold (application_name 'qx' in this run's db)
    local function nginx_backends()
        local rows = assert(admin:query([[SELECT pid, backend_start::text AS since FROM pg_stat_activity
      WHERE datname = $1 AND application_name = 'qx' ORDER BY pid]], dbname))
        local out = {}
        for _, r in ipairs(rows) do out[#out + 1] = r.pid .. "@" .. r.since end
        return out
    end

    -- statements of this run's database sleeping in pg_sleep right now
    local function sleeping()
        return assert(admin:query([[SELECT count(*) AS n FROM pg_stat_activity
      WHERE datname = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%']], dbname))[1].n
    end

    local function post_order(cmd, headers)
        return http(nginx, "POST", "/orders", cmd, headers)
    end

    -- the example with its commands in the worker itself (QX_OPENRESTY_MODE=worker)
    local worker
    local function worker_nginx()
        if not worker then
            worker = start_nginx("worker", url_for(dbname, "qx-worker"),
                { QX_OPENRESTY_MODE = "worker" })
        end
        return worker
    end

    setup(function()
        assert(run("command -v nginx"), "nginx is not installed: run scripts/deps.sh")
        assert(run("test -f /usr/lib/nginx/modules/ngx_http_lua_module.so"),
            "libnginx-mod-http-lua is not installed: run scripts/deps.sh")
        assert(run("command -v curl"), "curl is not installed: run scripts/deps.sh")
        assert(run("test -f " .. sh(ROOT .. "/build/luajit/qx/core.so")),
            "build/luajit/qx/core.so is missing: run make")

        assert(run("mkdir -p " .. sh(RUN_DIR .. "/lua") .. " && chmod 755 " .. sh(RUN_DIR) .. " "
            .. sh(RUN_DIR .. "/lua")))
        for name, text in pairs(MODULES) do spit(RUN_DIR .. "/lua/" .. name .. ".lua", text) end
        spit(RUN_DIR .. "/spec_locations.conf", LOCATIONS)
        assert(run("chmod 644 " .. sh(RUN_DIR) .. "/lua/*.lua "
            .. sh(RUN_DIR .. "/spec_locations.conf")))

        admin = assert(qx.connect{ url = ADMIN_URL, pool_size = 2 })
        dbname = support.unique("qx_openresty")
        assert(admin:exec('CREATE DATABASE "' .. dbname .. '"'))
        app_url = url_for(dbname)
        db = assert(qx.connect{ url = url_for(dbname, "qx_openresty_spec"), pool_size = 2 })
        assert(db:exec("CREATE TABLE spec_slow (tag text NOT NULL)"))

        nginx = start_nginx("main", app_url)
    end)

    teardown(function()
        if relay and alive(relay.pid) then run("kill -KILL " .. relay.pid) end
        if stream_conn then
            stream_conn:delete_stream()
            stream_conn:close()
        end
        stop_nginx(nginx)
        stop_nginx(bare)
        stop_nginx(worker)
        if db then db:close() end
        if admin and dbname then
            admin:exec('DROP DATABASE IF EXISTS "' .. dbname .. '" WITH (FORCE)')
            admin:close()
        end
        if not os.getenv("QX_KEEP_SPEC_RUN") then run("rm -rf " .. sh(RUN_DIR)) end
    end)

    it("places an order: 201, the row and its outbox event commit together; GET returns it",
       function()
        local correlation = qx.uuid()
        local status, body = post_order({ customer = "ann", sku = "AB-1", quantity = 2 },
            { ["X-Correlation-Id"] = correlation })
        assert.equal(201, status, cjson.encode(body))
        assert.is_true(qx.is_uuid(body.id))
        assert.equal(1, body.version)

        local rows = db:query("SELECT customer, sku, quantity, status FROM shop_orders WHERE id = $1",
            body.id)
        assert.same({ { customer = "ann", sku = "AB-1", quantity = 2, status = "placed" } }, rows)
        local events = db:query([[SELECT event_name, correlation_id::text AS correlation_id, payload
      FROM qx_outbox_events WHERE payload->'payload'->>'order_id' = $1]], body.id)
        assert.equal(1, #events)
        assert.equal("shop.order.placed", events[1].event_name)
        assert.equal(correlation, events[1].correlation_id)
        assert.same({ order_id = body.id, customer = "ann", sku = "AB-1", quantity = 2 },
            events[1].payload.payload)

        local got
        status, got = http(nginx, "GET", "/orders/" .. body.id)
        assert.equal(200, status)
        assert.equal(body.id, got.id)
        assert.equal("placed", got.status)
        assert.equal(2, got.quantity)
        assert.equal(1, got.version)
    end)

    it("lists orders through the repository's allow-listed filters", function()
        local customer = support.unique("lister")
        for i = 1, 3 do
            assert.equal(201, (post_order({ customer = customer, sku = "L-" .. i, quantity = i })))
        end
        local status, page = http(nginx, "GET", "/orders?customer=" .. customer)
        assert.equal(200, status)
        assert.equal(3, page.total)
        assert.same({ "L-3", "L-2", "L-1" },
            { page.items[1].sku, page.items[2].sku, page.items[3].sku })
        status, page = http(nginx, "GET", "/orders?page=0")
        assert.equal(422, status)
        assert.equal("invalid", page.error.code)
    end)

    it("cancels at the version read; a stale version is a 409 and writes nothing", function()
        local _, placed = post_order({ customer = "bo", sku = "C-3", quantity = 1 })
        local path = "/orders/" .. placed.id .. "/cancel"
        local status, body = http(nginx, "POST", path, { version = 7 })
        assert.equal(409, status)
        assert.equal("conflict", body.error.code)
        assert.matches("stale version 7 (now 1)", body.error.message, 1, true)
        assert.equal(7, body.error.expected_version)
        assert.equal(1, body.error.actual_version)
        assert.equal(0, count([[SELECT count(*) AS n FROM qx_outbox_events
      WHERE event_name = 'shop.order.cancelled'
        AND payload->'payload'->>'order_id' = $1]], placed.id))

        status, body = http(nginx, "POST", path, { version = 1, reason = "changed my mind" })
        assert.equal(200, status)
        assert.same({ id = placed.id, version = 2 }, body)
        status, body = http(nginx, "POST", path, { version = 2 })
        assert.equal(409, status)
        assert.matches("cancelled already", body.error.message)
        assert.equal(1, count([[SELECT count(*) AS n FROM qx_outbox_events
      WHERE event_name = 'shop.order.cancelled'
        AND payload->'payload'->>'order_id' = $1]], placed.id))

        status, body = http(nginx, "POST", "/orders/" .. qx.uuid() .. "/cancel", { version = 1 })
        assert.equal(404, status)
        assert.equal("not_found", body.error.code)
    end)

    it("a duplicate order id is a 409 conflict and writes nothing more", function()
        local id = qx.uuid()
        assert.equal(201, (post_order({ id = id, customer = "cy", sku = "D-4", quantity = 1 })))
        local status, body = post_order({ id = id, customer = "cy", sku = "D-4", quantity = 5 })
        assert.equal(409, status)
        assert.equal("conflict", body.error.code)
        assert.equal("23505", body.error.sqlstate)
        assert.equal(1, count("SELECT quantity AS n FROM shop_orders WHERE id = $1", id))
        assert.equal(1, count([[SELECT count(*) AS n FROM qx_outbox_events
      WHERE payload->'payload'->>'order_id' = $1]], id))
    end)

    it("rejects an invalid command with 422 and a malformed body with 400, writing nothing",
       function()
        local before = count("SELECT count(*) AS n FROM qx_outbox_events")
        local orders = count("SELECT count(*) AS n FROM shop_orders")
        local status, body = post_order({ customer = "dee", sku = "E-5", quantity = 0 })
        assert.equal(422, status)
        assert.same({ error = { code = "invalid",
            message = "quantity must be an integer from 1 to 1000" } }, body)
        status, body = post_order({ customer = "dee", sku = "E-5", quantity = 1 },
            { ["X-Tenant-Id"] = "not-a-uuid" })
        assert.equal(422, status)
        assert.matches("tenant_id must be a uuid", body.error.message)
        status, body = post_order('{"customer": "dee",')
        assert.equal(400, status)
        assert.equal("invalid", body.error.code)
        assert.matches("not a JSON object", body.error.message)
        status = http(nginx, "DELETE", "/orders")
        assert.equal(405, status)
        assert.equal(before, count("SELECT count(*) AS n FROM qx_outbox_events"))
        assert.equal(orders, count("SELECT count(*) AS n FROM shop_orders"))
    end)

    it("refuses a JSON body that is not an object with 400, before any command runs", function()
        local before = count("SELECT count(*) AS n FROM shop_orders")
        for _, text in ipairs({ "[1,2]", "[]", '"ann"', "42", "null", "true" }) do
            local status, body = post_order(text)
            assert.equal(400, status, text)
            assert.equal("invalid", body.error.code, text)
            assert.matches("not a JSON object", body.error.message, 1, true)
        end
        local status = post_order(" \n {}")
        assert.equal(422, status) -- an object: the command then finds what it lacks
        assert.equal(before, count("SELECT count(*) AS n FROM shop_orders"))
    end)

    it("answers a path that names no order, or nothing at all, with a JSON 404 not_found",
       function()
        for _, path in ipairs({ "/orders/nope", "/orders/" .. qx.uuid(),
                                "/orders/" .. qx.uuid() .. "x", "/orders/nope/cancel",
                                "/nothing/here" }) do
            local status, body = http(nginx, "GET", path)
            assert.equal(404, status, path)
            assert.equal("table", type(body), path .. ": " .. tostring(body))
            assert.equal("not_found", body.error.code, path)
        end
    end)

    it("starts and serves whatever LUA_PATH/LUA_CPATH the caller has for another Lua", function()
        -- what `eval "$(luarocks path)"` for Lua 5.4 leaves: modules nginx's LuaJIT cannot load
        local other = RUN_DIR .. "/other-lua"
        assert(run("mkdir -p " .. sh(other .. "/qx") .. " && : >" .. sh(other .. "/cjson.so")
            .. " && echo 'error(\"the caller'\\''s Lua modules\")' >" .. sh(other .. "/qx/init.lua")))
        local n = start_nginx("callers_paths", app_url, {
            LUA_PATH = other .. "/?.lua;" .. other .. "/?/init.lua;;",
            LUA_CPATH = other .. "/?.so;;",
        })
        finally(function() stop_nginx(n) end)
        local status, body = http(n, "POST", "/orders", { customer = "eve", sku = "P-1", quantity = 1 })
        assert.equal(201, status, tostring(body) .. error_log(n))
    end)

    it("carries plain data and qx.null both ways", function()
        local status, body = http(nginx, "POST", "/spec/run", { module = "openresty_spec_handlers",
            func = "echo", command = { a = { 1, 2, { b = "c" } }, maybe = cjson.null, n = 2.5 },
            context = { tenant_id = "t" } })
        assert.equal(200, status)
        assert.same({ command = { a = { 1, 2, { b = "c" } }, maybe = cjson.null, n = 2.5 },
            context = { tenant_id = "t" }, null = true }, body)
        status, body = http(nginx, "POST", "/spec/run", { module = "openresty_spec_plain",
            func = "hello", command = { name = "eve" } })
        assert.equal(200, status)
        assert.same({ hi = "eve" }, body)
        status, body = http(nginx, "POST", "/spec/run", { module = "openresty_spec_plain",
            func = "taken", command = {} })
        assert.equal(409, status)
        assert.same({ error = { code = "conflict", message = "that name is taken" } }, body)
    end)

    it("passes a JSON body to the thread and its JSON result back with run_json", function()
        local text = '{"a":[1,2,{"b":"c"}],"maybe":null,"n":2.5}'
        local status, body = http(nginx, "POST",
            "/spec/run_json?module=openresty_spec_handlers&func=echo", text)
        assert.equal(201, status, tostring(body))
        assert.same({ command = { a = { 1, 2, { b = "c" } }, maybe = cjson.null, n = 2.5 },
            null = true }, body)
        status, body = http(nginx, "POST", "/spec/run_json?module=openresty_spec_handlers&func=boom",
            "{}")
        assert.equal(500, status)
        assert.same({ error = { code = "error", message = "internal error" } }, body)
        status = http(nginx, "POST",
            "/spec/run_json?module=openresty_spec_handlers&func=returns_function", "{}")
        assert.equal(500, status)
        assert.matches("JSON cannot hold", error_log(nginx), 1, true)
        -- a module not made by handlers() is refused: it cannot decode or encode
        status, body = http(nginx, "POST", "/spec/run_json?module=openresty_spec_plain&func=hello",
            '{"name":"eve"}')
        assert.equal(500, status)
        assert.equal("config", body.error.code)
        assert.matches("not made by qx.openresty.handlers", body.error.message, 1, true)
    end)

    it("refuses a run_json body that is not a JSON object with 400 and runs nothing", function()
        local tag = support.unique("nojson")
        local before = count("SELECT count(*) AS n FROM spec_slow")
        for _, text in ipairs({ "[1]", "{bad", '"x"', "null" }) do
            local status, body = http(nginx, "POST",
                "/spec/run_json?module=openresty_spec_handlers&func=slow", text)
            assert.equal(400, status, text)
            assert.equal("invalid", body.error.code, text)
        end
        local status = http(nginx, "POST", "/spec/run_json?module=openresty_spec_handlers&func=slow",
            cjson.encode({ tag = tag, seconds = 0 }))
        assert.equal(201, status)
        assert.equal(before + 1, count("SELECT count(*) AS n FROM spec_slow"))
    end)

    -- Sends 2 x THREADS commands that each hold a transaction open for SLOW_SECONDS to path
    -- (body(tag) the request's), samples /health while THREADS of them sleep in PostgreSQL and
    -- checks it stayed fast, then that every command answered and wrote its row.
    local function health_while_slow(path, body, what)
        local tag = support.unique("slow")
        local waits = {}
        for i = 1, 2 * THREADS do waits[i] = http_async(nginx, path, body(tag)) end
        -- wait until the first THREADS commands are sleeping in PostgreSQL
        local deadline = os.time() + 20
        while sleeping() < THREADS do
            assert(os.time() < deadline, "the slow commands did not start")
            sleep(0.02)
        end
        local times = sample(nginx, "/health", 300)
        local still = sleeping()
        assert.is_true(still >= 1, "the samples outlasted the slow commands; nothing was measured")
        assert.is_true(still <= THREADS, "more commands ran at once than the pool has " .. what)

        local median, p95, max = quantile(times, 0.5), quantile(times, 0.95), times[#times]
        local summary = string.format("/health while %d commands slept: median %.2f ms, p95 %.2f ms,"
            .. " max %.2f ms", THREADS, median * 1000, p95 * 1000, max * 1000)
        assert.is_true(median < 0.050, summary)
        assert.is_true(p95 < 0.250, summary)
        assert.is_true(max < SLOW_SECONDS / 2, summary)

        for i = 1, #waits do
            local status, res = waits[i]()
            assert.equal(200, status, cjson.encode(res))
            assert.same({ tag = tag }, res)
        end
        assert.equal(2 * THREADS, count("SELECT count(*) AS n FROM spec_slow WHERE tag = $1", tag))
    end

    it("keeps /health fast on the one worker while slow commands hold transactions", function()
        local t0 = clock()
        health_while_slow("/spec/run", function(tag)
            return { module = "openresty_spec_handlers", func = "slow",
                     command = { tag = tag, seconds = SLOW_SECONDS } }
        end, "threads")
        -- THREADS at a time: two rounds
        assert.is_true(clock() - t0 >= 2 * SLOW_SECONDS - 0.1)
    end)

    it("keeps /health fast while commands in the worker itself (cosockets) hold transactions",
       function()
        health_while_slow("/spec/worker?pool=" .. THREADS, function(tag)
            return { func = "slow", command = { tag = tag, seconds = SLOW_SECONDS } }
        end, "connections")
    end)

    it("keeps the worker's cosocket connections between requests: the same backends serve them",
       function()
        local pids = {}
        for _ = 1, 40 do
            local status, body = http(nginx, "POST", "/spec/worker?pool=" .. THREADS,
                { func = "backend" })
            assert.equal(200, status, cjson.encode(body))
            pids[body.pid] = true
        end
        local n = 0
        for _ in pairs(pids) do n = n + 1 end
        -- one request at a time: the connection released last is the one taken next
        assert.equal(1, n)
    end)

    it("answers a handler raised in the worker with a 500 that hides the detail, and logs it",
       function()
        local status, body = http(nginx, "POST", "/spec/worker", { func = "boom" })
        assert.equal(500, status)
        assert.is_nil(cjson.encode(body):find("secret detail", 1, true))
        assert.matches("the secret detail of a bug", error_log(nginx), 1, true)
    end)

    it("runs the shop in the worker itself ($qx_mode worker): place, read, cancel, conflict",
       function()
        local w = worker_nginx()
        local status, body = http(w, "POST", "/orders", { customer = "wan", sku = "W-1",
            quantity = 3 })
        assert.equal(201, status, cjson.encode(body))
        assert.equal(1, count("SELECT count(*) AS n FROM qx_outbox_events "
            .. "WHERE payload->'payload'->>'order_id' = $1", body.id))
        local got
        status, got = http(w, "GET", "/orders/" .. body.id)
        assert.equal(200, status)
        assert.equal("placed", got.status)
        assert.equal(3, got.quantity)
        status = http(w, "POST", "/orders/" .. body.id .. "/cancel", { version = 1 })
        assert.equal(200, status)
        status = http(w, "POST", "/orders/" .. body.id .. "/cancel", { version = 1 })
        assert.equal(409, status)
        status = http(w, "POST", "/orders", { customer = "wan", sku = "W-1", quantity = 3,
            id = body.id })
        assert.equal(409, status)
        status = http(w, "POST", "/orders", { customer = "", sku = "W-1", quantity = 0 })
        assert.equal(422, status)
        status = http(w, "GET", "/orders/" .. qx.uuid())
        assert.equal(404, status)
        -- the worker's own connections, not the thread pool's
        local rows = assert(admin:query([[SELECT count(*) AS n FROM pg_stat_activity
      WHERE datname = $1 AND application_name = 'qx-worker']], dbname))
        assert.is_true(rows[1].n >= 1)
    end)

    it("wakes the outbox's listeners after a command in the worker itself commits", function()
        local w = worker_nginx()
        local listener = assert(db:acquire())
        assert(listener:listen("qx_outbox"))
        local status, body = http(w, "POST", "/orders", { customer = "wake", sku = "W-2",
            quantity = 1 })
        assert.equal(201, status, cjson.encode(body))
        local woken = {}
        local deadline = os.time() + 5
        while #woken == 0 and os.time() < deadline do
            woken = assert(listener:notifications(200))
        end
        listener:release()
        assert.is_true(#woken >= 1, "no wake-up came")
        assert.equal("qx_outbox", woken[1].channel)
    end)

    it("stalls /health when a handler blocks the worker itself, which the threads prevent",
       function()
        local wait = http_async(nginx, "/spec/blocking?seconds=" .. SLOW_SECONDS / 2, {})
        local deadline = os.time() + 20
        while sleeping() < 1 do
            assert(os.time() < deadline, "the blocking request did not start")
            sleep(0.01)
        end
        local _, _, t = http(nginx, "GET", "/health")
        assert.equal(200, (wait()))
        assert.is_true(t > 0.2, string.format("/health took only %.1f ms", t * 1000))
    end)

    it("keeps the worker's pools over many requests: the same backends serve them all", function()
        local cfg = RUN_DIR .. "/many.cfg"
        local function burst(n)
            local lines = { "silent", 'header = "content-type: application/json"',
                            'data = "{\\"customer\\":\\"many\\",\\"sku\\":\\"M-1\\",\\"quantity\\":1}"',
                            'write-out = "%{http_code}\\n"' }
            for _ = 1, n do
              lines[#lines + 1] = 'url = "' .. nginx.url .. '/orders"'
              lines[#lines + 1] = 'output = "/dev/null"'
            end
            spit(cfg, table.concat(lines, "\n") .. "\n")
            local ok, out = run("curl --parallel --parallel-max 8 -K " .. sh(cfg))
            assert(ok, out)
            local created = select(2, out:gsub("201", ""))
            assert.equal(n, created, out)
        end
        burst(20) -- every thread VM has served shop.commands
        local before = nginx_backends()
        assert.is_true(#before >= 1)
        burst(150)
        for _ = 1, 30 do
            assert.equal(201, (post_order({ customer = "one", sku = "O-1", quantity = 1 })))
        end
        local after = nginx_backends()
        assert.same(before, after)
        -- the shop's handlers share one pool per worker (at most THREADS connections in use at
        -- once); the spec's own handler module has a pool per thread VM (at most THREADS VMs)
        assert.is_true(#after <= 2 * THREADS, #after .. " backends")
    end)

    it("serves every thread VM of a worker from one shared pool (shared_pool)", function()
        local pids, waits = {}, {}
        for round = 1, 2 do
            for i = 1, 2 * THREADS do
                waits[i] = http_async(nginx, "/spec/run", { module = "openresty_spec_shared",
                    func = "backend", command = { round = round } })
            end
            for i = 1, #waits do
                local status, body = waits[i]()
                assert.equal(200, status, cjson.encode(body))
                pids[body.pid] = true
            end
        end
        local distinct = 0
        for _ in pairs(pids) do distinct = distinct + 1 end
        -- the calls overlapped on THREADS threads, each in a VM of its own; one connection
        -- served them all
        assert.equal(1, distinct)
    end)

    it("gives a call's thread slot back when its client goes away mid-command", function()
        for _ = 1, THREADS + 1 do
            http(nginx, "POST", "/spec/abortable", { module = "openresty_spec_handlers", func = "slow",
              command = { tag = "abort", seconds = 0.6 } }, nil, 0.2, true)
        end
        sleep(0.8)
        local _, stats = http(nginx, "GET", "/spec/stats?gc=1")
        assert.same({ concurrency = THREADS, running = 0, waiting = 0 }, stats.qx)
        local status, body = http(nginx, "POST", "/spec/run", { module = "openresty_spec_handlers",
            func = "backend", command = {} }, nil, 5)
        assert.equal(200, status, cjson.encode(body))
    end)

    it("hides a handler's raised error from the client and logs it with its traceback", function()
        local status, body = http(nginx, "POST", "/spec/run", { module = "openresty_spec_handlers",
            func = "boom", command = {} })
        assert.equal(500, status)
        assert.same({ error = { code = "error", message = "internal error" } }, body)
        local log = error_log(nginx)
        assert.matches("the secret detail of a bug", log, 1, true)
        assert.matches("stack traceback", log, 1, true)
    end)

    it("refuses results that cannot leave the thread, naming the culprit", function()
        for func, culprit in pairs({ returns_function = "result.f is a function",
                                     returns_cycle = "result.again refers back" }) do
            local status, body = http(nginx, "POST", "/spec/run", { module = "openresty_spec_handlers",
              func = func, command = {} })
            assert.equal(500, status)
            assert.equal("error", body.error.code)
            assert.matches("handler '" .. func .. "' returned data that cannot leave its thread: "
              .. culprit, error_log(nginx), 1, true)
        end
    end)

    it("the relay beside nginx puts a POSTed command's event on JetStream", function()
        local stream = support.unique("QX_OPENRESTY"):upper()
        local prefix = support.unique("openresty")
        relay = start_relay({ QX_DB__URL = app_url, QX_NATS__SERVERS = support.nats_url(),
                              QX_NATS__STREAM = stream, QX_NATS__SUBJECT_PREFIX = prefix })
        stream_conn = assert(qx.nats.connect{ servers = support.nats_url(), stream = stream,
                                              subject_prefix = prefix })
        local function wait_for(what, fn)
            local deadline = clock() + 20
            while not fn() do
              assert(alive(relay.pid), "the relay exited:\n" .. (slurp(relay.log) or ""))
              assert(clock() < deadline, what .. "\n" .. (slurp(relay.log) or ""))
              sleep(0.05)
            end
        end
        -- what the earlier examples left in the outbox goes out first
        wait_for("the relay did not drain the outbox", function()
            return count([[SELECT count(*) AS n FROM qx_outbox_events
        WHERE published_at IS NULL AND dead_at IS NULL]]) == 0
        end)

        local status, body = post_order({ customer = "relayed", sku = "R-1", quantity = 4 })
        assert.equal(201, status)
        local event_id = db:query([[SELECT id::text AS id FROM qx_outbox_events
      WHERE payload->'payload'->>'order_id' = $1]], body.id)[1].id
        wait_for("the event was not published", function()
            return count("SELECT count(*) AS n FROM qx_outbox_events WHERE id = $1 "
              .. "AND published_at IS NOT NULL", event_id) == 1
        end)

        local info = assert(stream_conn:stream_info())
        assert.equal(count("SELECT count(*) AS n FROM qx_outbox_events"), info.messages)
        local msg
        for seq = info.last_seq, info.first_seq, -1 do
            local m = assert(stream_conn:stream_get(seq))
            if m.headers["Nats-Msg-Id"] == event_id then
              msg = m
              break
            end
        end
        assert.is_table(msg, "event " .. event_id .. " is not on stream " .. stream)
        assert.equal(prefix .. ".shop.order.placed", msg.subject)
        local envelope = cjson.decode(msg.data)
        assert.equal(event_id, envelope.event_id)
        assert.equal("shop.order.placed", envelope.event_name)
        assert.same({ order_id = body.id, customer = "relayed", sku = "R-1", quantity = 4 },
            envelope.payload)

        -- SIGTERM: the relay finishes its batch and exits
        run("kill -TERM " .. relay.pid)
        local deadline = clock() + 15
        while alive(relay.pid) and clock() < deadline do sleep(0.05) end
        assert.is_false(alive(relay.pid), "the relay did not stop on SIGTERM")
        assert.matches("stopped: %d+ published", slurp(relay.log))
    end)

    it("ships a systemd unit for the relay that systemd accepts", function()
        local ok = run("command -v systemd-analyze")
        if not ok then
            pending("systemd-analyze is not installed: qx-relay.service was not checked")
            return
        end
        local unit = RUN_DIR .. "/qx-relay.service"
        local text = assert(slurp(ROOT .. "/examples/openresty/qx-relay.service"))
        assert.matches("ExecStart=/usr/local/bin/qx relay", text, 1, true)
        -- the same unit, started from this tree's bin/qx instead of an installed one
        spit(unit, (text:gsub("/usr/local/bin/qx", ROOT .. "/bin/qx")))
        local verified, out = run("systemd-analyze verify " .. sh(unit))
        assert.is_true(verified, out)
        assert.is_nil(out:find("Unknown") or out:find("ignoring"), out)
    end)

    describe("reports configuration mistakes as clear errors", function()
        local function call(pool, module, func)
            return http(nginx, "POST", "/spec/run", { pool = pool, module = module, func = func,
            command = {} })
        end

        it("an unknown thread pool", function()
            local status, body = call("nope", "openresty_spec_handlers", "backend")
            assert.equal(500, status)
            assert.same({ error = { code = "config", message = "thread pool 'nope' not found: declare "
            .. "`thread_pool nope threads=N;` in the main (top-level) context of nginx.conf" } }, body)
        end)

        it("a handler module that is missing, does not load, or is not a table", function()
            local status, body = call("qx", "openresty_spec_missing", "x")
            assert.equal(500, status)
            assert.same({ code = "config",
            message = "handler module 'openresty_spec_missing' not found on lua_package_path" },
            body.error)
            assert.matches("no file '" .. RUN_DIR .. "/lua/openresty_spec_missing.lua'",
            error_log(nginx), 1, true)

            status, body = call("qx", "openresty_spec_broken", "x")
            assert.equal(500, status)
            assert.same({ code = "config", message = "handler module 'openresty_spec_broken' does not "
            .. "load (see the error log)" }, body.error)

            status, body = call("qx", "openresty_spec_number", "x")
            assert.equal(500, status)
            assert.same({ code = "config", message = "handler module 'openresty_spec_number' does not "
            .. "return a table" }, body.error)
        end)

        it("a handler function that does not exist", function()
            local status, body = call("qx", "openresty_spec_handlers", "nope")
            assert.equal(500, status)
            assert.same({ code = "config",
            message = "handler module 'openresty_spec_handlers' has no function 'nope'" }, body.error)
        end)

        it("a database that cannot be reached", function()
            local status, body = call("qx", "openresty_spec_baddb", "ping")
            assert.equal(500, status)
            assert.equal("connection", body.error.code)
            assert.matches("127.0.0.1", body.error.message, 1, true)
        end)

        it("an nginx.conf without any thread_pool directive", function()
            bare = start_nginx("bare", app_url, { QX_NGINX_THREADS = "0" })
            local status, body = http(bare, "POST", "/orders",
            { customer = "f", sku = "F-1", quantity = 1 })
            assert.equal(500, status)
            assert.equal("config", body.error.code)
            assert.matches("thread pool 'qx' not found: declare `thread_pool qx threads=N;`",
            body.error.message, 1, true)
            assert.matches("thread pool 'qx' not found", error_log(bare), 1, true)
            stop_nginx(bare)
            bare = nil
        end)
    end)
end)

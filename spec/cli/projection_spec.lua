-- `qx projection` run as a child process against a real PostgreSQL: the application's
-- projections come from --app (a file path or a module name); list, status, run, rebuild with
-- progress (plain lines when stderr is no terminal, a bar when asked), switch, drop, and the
-- refusals.
local support = require "support"
local qx = require "qx"

local qx_cli, sh = support.qx_cli, support.sh

-- The application: versions 1 and 2 of one projection (version 2 counts cents), and an
-- unversioned one, all named from the environment so that each test has its own.
local APP = [[
local qx = require "qx"
local env = os.getenv
return function(db)
  local Deposited = env("BG_EVENT")
  local function version(v)
    local p
    p = qx.projection{
      name = env("BG_NAME"), version = v, db = db, batch_size = 2,
      tables = { env("BG_TABLE") },
      setup = function(uow)
        assert(uow:exec("CREATE TABLE " .. p:table(env("BG_TABLE"))
                        .. " (id text PRIMARY KEY, balance bigint NOT NULL)"))
      end,
      reset = function(uow) assert(uow:exec("TRUNCATE " .. p:table(env("BG_TABLE")))) end,
      handlers = { [Deposited] = function(ev, uow)
        local t = p:table(env("BG_TABLE"))
        assert(uow:queue("INSERT INTO " .. t .. " (id, balance) VALUES ($1, $2) ON CONFLICT (id) "
          .. "DO UPDATE SET balance = " .. t .. ".balance + $2", ev.aggregate_id,
          ev.amount * (v == 1 and 1 or 100)))
      end },
    }
    return p
  end
  return { version(1), version(2),
           qx.projection{ name = env("BG_NAME") .. "_plain", db = db, on_progress = false,
                          handlers = { [Deposited] = function() end } } }
end
]]

describe("qx projection #slow", function()
    local db, dir, app

    setup(function()
        db = support.migrated_db{ pool_size = 2 }
        dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. sh(dir)))
        app = dir .. "/bg_app.lua"
        local f = assert(io.open(app, "w"))
        f:write(APP)
        f:close()
    end)

    teardown(function()
        if db then db:close() end
        if dir then os.execute("rm -rf " .. sh(dir)) end
    end)

    local function model()
        local m = { name = support.unique("cli_bg"), table = support.unique("cli_bal"),
                    type = support.unique("CliBg") }
        m.Deposited = qx.event(support.unique("clibg.deposited"))
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function() end)
        m.store = qx.event_store{ db = db }
        m.env = { QX_DB__URL = support.db_url(), BG_NAME = m.name, BG_TABLE = m.table,
                  BG_EVENT = m.Deposited.event_name }
        return m
    end

    local function deposit(m, amount)
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = m.Account.new(qx.uuid())
            acc:record(m.Deposited{ amount = amount })
            return assert(es:append(acc))
        end))
    end

    local function cli(m, args)
        return qx_cli(args, m.env)
    end

    local function total(m)
        return assert(db:query("SELECT coalesce(sum(balance), 0)::bigint AS s FROM " .. m.table))[1].s
    end

    it("rebuilds, runs, switches and drops versions, with progress lines off a terminal", function()
        local m = model()
        for i = 1, 5 do deposit(m, i) end
        local code, out, err = cli(m, { "projection", "list", "--app", app })
        assert.equal(0, code, err)
        assert.matches(m.name .. "%s+1%s+not registered", out)
        assert.matches(m.name .. "%s+2%s+not registered", out)
        assert.matches(m.name .. "_plain%s+%-%s+unversioned", out)

        code, out, err = cli(m, { "projection", "rebuild", m.name, "--version", "1", "--app", app,
                                  "--progress-interval", "0.000001" })
        assert.equal(0, code, err)
        assert.truthy(out:find("projection " .. m.name .. " version 1 rebuilt: 5 event(s) applied",
                               1, true), out)
        assert.truthy(err:find("projection " .. m.name .. " version 1: 2/5 events (40%)", 1, true), err)
        assert.truthy(err:find("version 1: 5/5 events (100%), ", 1, true), err)
        assert.falsy(err:find("\r", 1, true))
        assert.equal(15, total(m))                 -- the first version is live

        code, out, err = cli(m, { "projection", "rebuild", m.name, "--version", "2", "--app", app,
                                  "--progress", "none" })
        assert.equal(0, code, err)
        assert.equal("", err)
        assert.truthy(out:find("version 2 rebuilt: 5 event(s) applied", 1, true), out)
        deposit(m, 10)
        code, out, err = cli(m, { "projection", "list", "--app", app })
        assert.equal(0, code, err)
        assert.matches(m.name .. "%s+1%s+live%s+1%s+5%s+" .. m.table, out)
        assert.matches(m.name .. "%s+2%s+standby%s+1%s+5%s+" .. m.table, out)

        -- switch before version 2 caught up: refused, nothing changes (--wait: after trying again)
        code, out, err = cli(m, { "projection", "switch", m.name, "--version", "2" })
        assert.equal(1, code, out)
        assert.truthy(err:find("conflict: projection " .. m.name .. " version 2 is 1 event(s) behind",
                               1, true), err)
        code, out, err = cli(m, { "projection", "switch", m.name, "--version", "2", "--wait", "0.2" })
        assert.equal(1, code, out)
        assert.truthy(err:find("1 event(s) behind", 1, true), err)
        assert.equal(15, total(m))

        code, out, err = cli(m, { "projection", "run", m.name, "--version", "2", "--app", app,
                                  "--max-seconds", "0" })
        assert.equal(0, code, err)
        assert.truthy(out:find("version 2: 1 event(s) applied", 1, true), out)
        code, out, err = cli(m, { "projection", "status", m.name, "--version", "2", "--app", app })
        assert.equal(0, code, err)
        assert.matches("live:%s+false", out)
        assert.matches("behind:%s+0", out)
        assert.matches("events applied:%s+6", out)

        code, out, err = cli(m, { "projection", "switch", m.name, "--version", "2" })
        assert.equal(0, code, err)
        assert.truthy(out:find("version 2 is live (was version 1; 0 event(s) behind)", 1, true), out)
        assert.equal(2500, total(m))

        -- the live version cannot be dropped; the old one can
        code, out, err = cli(m, { "projection", "drop", m.name, "--version", "2" })
        assert.equal(1, code, out)
        assert.truthy(err:find("invalid: projection " .. m.name .. " version 2 is live", 1, true), err)
        code, out, err = cli(m, { "projection", "drop", m.name, "--version", "1" })
        assert.equal(0, code, err)
        assert.truthy(out:find("version 1 dropped (tables: " .. m.table .. "_v1)", 1, true), out)
        code, out = cli(m, { "projection", "list", "--app", app })
        assert.equal(0, code)
        assert.matches(m.name .. "%s+1%s+not registered", out)
        assert.matches(m.name .. "%s+2%s+live", out)
    end)

    it("draws a bar when asked, and finds the application as a module name", function()
        local m = model()
        for i = 1, 4 do deposit(m, i) end
        local env = {}
        for k, v in pairs(m.env) do env[k] = v end
        env.LUA_PATH = dir .. "/?.lua;" .. package.path
        local code, out, err = qx_cli({ "projection", "rebuild", m.name, "--version", "1",
                                        "--app", "bg_app", "--progress", "bar",
                                        "--progress-interval", "0.000001" }, env)
        assert.equal(0, code, err)
        assert.truthy(out:find("rebuilt: 4 event(s) applied", 1, true), out)
        assert.truthy(err:find("\r" .. m.name .. " v1 [", 1, true), err)
        assert.truthy(err:find("] 100% 4/4 events", 1, true), err)
        assert.truthy(err:find("\n$"), err)
    end)

    it("draws the bar by itself when stderr is a terminal", function()
        local m = model()
        for i = 1, 3 do deposit(m, i) end
        -- script(1) gives the command a terminal; everything it writes comes back on stdout
        local vars = { "LUA_PATH=" .. sh(package.path), "LUA_CPATH=" .. sh(package.cpath) }
        for k, v in pairs(m.env) do vars[#vars + 1] = k .. "=" .. sh(v) end
        local cmd = "env " .. table.concat(vars, " ") .. " " .. (jit and "luajit" or "lua5.4")
            .. " bin/qx projection rebuild " .. sh(m.name) .. " --version 1 --app " .. sh(app)
            .. " --progress-interval 0.000001"
        local p = assert(io.popen("script -qec " .. sh(cmd) .. " /dev/null"))
        local out = p:read("*a")
        p:close()
        assert.truthy(out:find("\r" .. m.name .. " v1 [", 1, true), out)
        assert.truthy(out:find("] 100% 3/3 events", 1, true), out)
        assert.truthy(out:find("rebuilt: 3 event(s) applied", 1, true), out)
    end)

    it("refuses bad input with exit 2 and a clear message, and writes nothing", function()
        local m = model()
        deposit(m, 1)
        local function refused(args, pattern)
            local code, out, err = cli(m, args)
            assert.equal(2, code, out .. err)
            assert.truthy(err:find(pattern, 1, true), err)
        end
        refused({ "projection", "rebuild", m.name, "--version", "3", "--app", app },
                "invalid: projection " .. m.name .. " has no version 3 (" .. app
                .. " declares: 1, 2)")
        refused({ "projection", "rebuild", m.name, "--app", app },
                "invalid: projection " .. m.name .. " has versions 1, 2: give --version")
        refused({ "projection", "run", "nope", "--app", app }, "declares no projection nope")
        refused({ "projection", "rebuild", m.name, "--version", "x", "--app", app },
                "--version must be an integer >= 1")
        refused({ "projection", "rebuild", m.name, "--version", "1" }, "needs --app MODULE")
        refused({ "projection", "switch", m.name }, "needs --version N")
        refused({ "projection", "rebuild" }, "needs the projection's NAME")
        refused({ "projection", "bogus" }, "unknown projection command 'bogus'")
        refused({ "projection", "rebuild", m.name, "--version", "1", "--app", app,
                  "--progress", "fancy" }, "--progress must be bar, lines or none")
        refused({ "projection", "list", "--app", dir .. "/missing.lua" }, "cannot load --app")
        refused({ "projection", "switch", m.name, "--version", "1", "--max-behind", "-1" },
                "--max-behind must be an integer >= 0")
        refused({ "projection", "list", "--bogus" }, "unknown flag --bogus")
        refused({ "projection", "switch", m.name, "--version", "1", "--wait", "soon" },
                "--wait must be a number of seconds >= 0")
        -- nothing was registered or built
        local rows = assert(db:query("SELECT count(*) AS n FROM qx_projection_versions "
                                     .. "WHERE projection_name = $1", m.name))
        assert.equal(0, rows[1].n)
        local code, _, err = cli(m, { "projection", "switch", m.name, "--version", "1" })
        assert.equal(1, code)
        assert.truthy(err:find("not_found: projection " .. m.name .. " has no version 1", 1, true), err)
    end)
end)

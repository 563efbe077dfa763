-- bin/qx as a user runs it: `qx migrate` with --url or QX_DB__URL, and clear failures.
local qx = require "qx"
local support = require "support"

local INTERP = jit and "luajit" or "lua5.4"
local sh, slurp, url_for = support.sh, support.slurp, support.url_for


-- Runs bin/qx with the interpreter running the specs and the module paths it uses; env is a
-- table of variables (false unsets one). Returns exit code, stdout, stderr. The code goes through
-- the output because LuaJIT's popen:close() does not report it.
local function qx_cli(args, env)
    local vars = { LUA_PATH = package.path, LUA_CPATH = package.cpath, QX_DB__URL = false }
    for k, v in pairs(env or {}) do vars[k] = v end
    local unset, set = "", ""
    for k, v in pairs(vars) do
        if v == false then unset = unset .. " -u " .. k else set = set .. " " .. k .. "=" .. sh(v) end
    end
    local prefix = "env" .. unset .. set -- env takes -u before the assignments
    local words = {}
    for i, a in ipairs(args) do words[i] = sh(a) end
    local errf = os.tmpname()
    local p = assert(io.popen(prefix .. " " .. INTERP .. " bin/qx " .. table.concat(words, " ")
        .. " 2>" .. sh(errf) .. "; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local err = slurp(errf)
    os.remove(errf)
    local code = tonumber(out:match("exit=(%d+)%s*$"))
    return code, (out:gsub("exit=%d+%s*$", "")), err
end

describe("bin/qx #slow", function()
    local dbs
    local function fresh_db() return dbs.create() end

    local function versions(name)
        local db = assert(qx.connect{ url = url_for(name), pool_size = 1 })
        local rows = db:query("SELECT count(*) AS n FROM qx_schema_migrations")
        db:close()
        return rows and rows[1].n or 0
    end

    setup(function()
        dbs = support.fresh_databases("qx_cli")
    end)

    teardown(function()
        if dbs then dbs.drop_all() end
    end)

    local n_steps = #require("qx.store.migrations")

    it("migrates the database given with --url, then finds nothing to do", function()
        local name = fresh_db()
        local code, out, err = qx_cli({ "migrate", "--url", url_for(name) })
        assert.equal(0, code, err)
        assert.truthy(out:find("applied " .. n_steps .. " migration", 1, true), out)
        assert.equal(n_steps, versions(name))
        code, out = qx_cli({ "migrate", "--url=" .. url_for(name) })
        assert.equal(0, code)
        assert.truthy(out:find("up to date", 1, true), out)
    end)

    it("migrates the database in QX_DB__URL", function()
        local name = fresh_db()
        local code, out, err = qx_cli({ "migrate" }, { QX_DB__URL = url_for(name) })
        assert.equal(0, code, err)
        assert.truthy(out:find("applied", 1, true), out)
        assert.equal(n_steps, versions(name))
    end)

    it("prefers --url over QX_DB__URL", function()
        local name, other = fresh_db(), fresh_db()
        local code = qx_cli({ "migrate", "--url", url_for(name) }, { QX_DB__URL = url_for(other) })
        assert.equal(0, code)
        assert.equal(n_steps, versions(name))
        assert.equal(0, versions(other))
    end)

    it("brings a database up to date with --dir: qx's schema, then the application's files", function()
        local name = fresh_db()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. sh(dir)))
        local f = assert(io.open(dir .. "/0001_create_accounts.sql", "w"))
        f:write("CREATE TABLE accounts (id uuid PRIMARY KEY);\n")
        f:close()
        f = assert(io.open(dir .. "/0002_add_owner.sql", "w"))
        f:write("ALTER TABLE accounts ADD COLUMN owner text;\n")
        f:close()
        local code, out, err = qx_cli({ "migrate", "--url", url_for(name), "--dir", dir, "--status" })
        assert.equal(0, code, err)
        assert.matches("pending%s+0001_create_accounts.sql", out)
        code, out, err = qx_cli({ "migrate", "--url", url_for(name), "--dir", dir })
        assert.equal(0, code, err)
        assert.truthy(out:find("applied " .. n_steps .. " migration", 1, true), out)
        assert.truthy(out:find("applied " .. dir .. "/0002_add_owner.sql", 1, true), out)
        assert.equal(n_steps, versions(name))
        code, out = qx_cli({ "migrate", "--url", url_for(name), "--dir=" .. dir })
        assert.equal(0, code)
        assert.truthy(out:find(dir .. ": up to date (version 2)", 1, true), out)
        code, out = qx_cli({ "migrate", "--url", url_for(name), "--dir", dir, "--status" })
        assert.equal(0, code)
        assert.matches("applied%s+0002_add_owner.sql", out)
        -- an edited file is refused, naming it
        f = assert(io.open(dir .. "/0001_create_accounts.sql", "a"))
        f:write("-- edited\n")
        f:close()
        local _
        code, _, err = qx_cli({ "migrate", "--url", url_for(name), "--dir", dir })
        assert.equal(1, code)
        assert.matches("0001_create_accounts.sql was edited", err, 1, true)
        os.execute("rm -rf " .. sh(dir))
        code, _, err = qx_cli({ "migrate", "--url", url_for(name), "--dir", dir })
        assert.equal(1, code)
        assert.matches("migrations folder", err, 1, true)
    end)

    it("lists the applied versions with --status", function()
        local name = fresh_db()
        local code, out = qx_cli({ "migrate", "--status", "--url", url_for(name) })
        assert.equal(0, code)
        assert.truthy(out:find("no migrations applied", 1, true), out)
        assert.equal(0, (qx_cli({ "migrate", "--url", url_for(name) })))
        code, out = qx_cli({ "migrate", "--status", "--url", url_for(name) })
        assert.equal(0, code)
        assert.truthy(out:find("^1  outbox  "), out)
    end)

    it("exits non-zero with a clear message for a url that is not one", function()
        local code, out, err = qx_cli({ "migrate", "--url", "not a url" })
        assert.are_not.equal(0, code)
        assert.equal("", out)
        assert.truthy(err:find("cannot connect", 1, true), err)
        assert.truthy(err:find("url", 1, true), err)
    end)

    it("exits non-zero with a clear message when the server refuses, without repeating the password", function()
        local code, _, err = qx_cli({ "migrate", "--url", "postgresql://postgres:s3cret-pw@127.0.0.1:1/postgres" })
        assert.are_not.equal(0, code)
        assert.truthy(err:find("cannot connect: connection", 1, true), err)
        assert.is_nil(err:find("s3cret-pw", 1, true))
    end)

    it("exits non-zero when no url is given at all", function()
        local code, _, err = qx_cli({ "migrate" })
        assert.are_not.equal(0, code)
        assert.truthy(err:find("QX_DB__URL", 1, true) or err:find("url", 1, true), err)
    end)

    it("exits 2 on an unknown command or a flag without its value", function()
        local code, _, err = qx_cli({ "migrat" })
        assert.equal(2, code)
        assert.truthy(err:find("unknown command", 1, true), err)
        code, _, err = qx_cli({ "migrate", "--url" })
        assert.equal(2, code)
        assert.truthy(err:find("needs a value", 1, true), err)
    end)

    it("prints usage for help", function()
        local code, out = qx_cli({ "help" })
        assert.equal(0, code)
        assert.truthy(out:find("migrate", 1, true), out)
    end)
end)

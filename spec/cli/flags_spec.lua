-- The strict flag parser of bin/qx: a flag a command does not know, a switch given a value, or a
-- flag that needs a value and gets none (or gets another flag) prints the command's usage on
-- stderr and exits 2, before anything is done.
local qx = require "qx"
local support = require "support"

local INTERP = jit and "luajit" or "lua5.4"
local sh, slurp, url_for = support.sh, support.slurp, support.url_for

-- Runs bin/qx with the interpreter running the specs; returns exit code, stdout, stderr.
local function qx_cli(args)
    local words = {}
    for i, a in ipairs(args) do words[i] = sh(a) end
    local errf = os.tmpname()
    local p = assert(io.popen("env -u QX_DB__URL LUA_PATH=" .. sh(package.path) .. " LUA_CPATH="
        .. sh(package.cpath) .. " " .. INTERP .. " bin/qx " .. table.concat(words, " ")
        .. " 2>" .. sh(errf) .. "; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local err = slurp(errf)
    os.remove(errf)
    return tonumber(out:match("exit=(%d+)%s*$")), (out:gsub("exit=%d+%s*$", "")), err
end

describe("bin/qx flags #slow", function()
    local dbs

    setup(function() dbs = support.fresh_databases("qx_flags") end)
    teardown(function() if dbs then dbs.drop_all() end end)

    local function migrated(name)
        local db = assert(qx.connect{ url = url_for(name), pool_size = 1 })
        local rows = db:query("SELECT to_regclass('qx_schema_migrations') IS NOT NULL AS t")
        db:close()
        return rows[1].t
    end

    it("refuses an unknown flag with the usage and exit 2, and does not migrate (--bogus x)", function()
        local name = dbs.create()
        local code, _, err = qx_cli({ "migrate", "--url", url_for(name), "--bogus", "x" })
        assert.equal(2, code, err)
        assert.matches("unknown flag %-%-bogus", err)
        assert.matches("usage: qx migrate", err)
        assert.is_false(migrated(name))
    end)

    it("says a misspelt switch is unknown, not that it needs a value (--statuss)", function()
        local code, _, err = qx_cli({ "migrate", "--statuss" })
        assert.equal(2, code, err)
        assert.matches("unknown flag %-%-statuss", err)
        assert.is_nil(err:find("needs a value", 1, true))
    end)

    it("does not let a misspelt flag swallow the switch after it (relay --delete-publish --once)", function()
        local code, _, err = qx_cli({ "relay", "--delete-publish", "--once" })
        assert.equal(2, code, err)
        assert.matches("unknown flag %-%-delete%-publish", err)
        assert.matches("usage: qx relay", err)
    end)

    it("refuses a flag that needs a value and gets none or gets another flag", function()
        local code, _, err = qx_cli({ "migrate", "--url" })
        assert.equal(2, code, err)
        assert.matches("flag %-%-url needs a value", err)
        assert.matches("usage: qx migrate", err)
        code, _, err = qx_cli({ "migrate", "--url", "--status" })
        assert.equal(2, code, err)
        assert.matches("flag %-%-url needs a value", err)
    end)

    it("refuses a value given to a switch (--status=yes, --once=no)", function()
        local code, _, err = qx_cli({ "migrate", "--status=yes" })
        assert.equal(2, code, err)
        assert.matches("flag %-%-status takes no value", err)
        code, _, err = qx_cli({ "relay", "--once=no" })
        assert.equal(2, code, err)
        assert.matches("flag %-%-once takes no value", err)
    end)

    it("prints a command's usage for --help and exits 0, doing nothing else", function()
        local code, out = qx_cli({ "migrate", "--help" })
        assert.equal(0, code)
        assert.matches("usage: qx migrate", out)
    end)

    it("refuses unknown flags of qx outbox", function()
        local code, _, err = qx_cli({ "outbox", "dead", "--limt", "5" })
        assert.equal(2, code, err)
        assert.matches("unknown flag %-%-limt", err)
        assert.matches("usage: qx outbox", err)
    end)
end)

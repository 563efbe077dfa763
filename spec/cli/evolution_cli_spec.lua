-- `qx events check` and `qx snapshots rebuild` as a deploy runs them: the application's classes
-- come from --require MODULE; events stored by an older deploy are written through qx first.
local qx = require "qx"
local support = require "support"

local INTERP = jit and "luajit" or "lua5.4"
local sh, slurp = support.sh, support.slurp

-- bin/qx with the spec's module paths plus dir; -> exit code, stdout, stderr
local function qx_cli(args, dir, env)
    local vars = { LUA_PATH = dir .. "/?.lua;" .. package.path, LUA_CPATH = package.cpath }
    for k, v in pairs(env or {}) do vars[k] = v end
    local set = ""
    for k, v in pairs(vars) do set = set .. " " .. k .. "=" .. sh(v) end
    local words = {}
    for i, a in ipairs(args) do words[i] = sh(a) end
    local errf = os.tmpname()
    local p = assert(io.popen("env" .. set .. " " .. INTERP .. " bin/qx " .. table.concat(words, " ")
        .. " 2>" .. sh(errf) .. "; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local err = slurp(errf)
    os.remove(errf)
    return tonumber(out:match("exit=(%d+)%s*$")), (out:gsub("exit=%d+%s*$", "")), err
end

-- today's deploy as a module: Deposited v3 (v1 and v2 upcast) handled by an Account with
-- snapshot_version 2; EVO_NAME and EVO_TYPE name them
local APP = [[
local qx = require "qx"
local Deposited = qx.event(os.getenv("EVO_NAME"), { version = 3 })
Deposited:upcast(1, function(p) p.amount_cents = p.amount * 100; p.amount = nil; return p end)
Deposited:upcast(2, function(p) p.currency = p.currency or "EUR"; return p end)
local Account = qx.event_sourced(os.getenv("EVO_TYPE"), { snapshot_version = 2 })
Account:on(Deposited, function(self, ev) self.cents = (self.cents or 0) + ev.amount_cents end)
return { Account = Account, events = { Deposited } }
]]

describe("qx events check and qx snapshots rebuild #slow", function()
    local db, dir, module

    setup(function()
        db = support.migrated_db{ pool_size = 2 }
        dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. sh(dir)))
        module = support.unique("evo_app")
        local f = assert(io.open(dir .. "/" .. module .. ".lua", "w"))
        f:write(APP)
        f:close()
    end)

    teardown(function()
        os.execute("rm -rf " .. sh(dir))
        if db then db:close() end
    end)

    -- yesterday's deploy stores `per` accounts' events at `version`, snapshotted (v1 state)
    local function old_events(name, agg_type, version, per)
        local Deposited = qx.event(name, { version = version })
        local Account = qx.event_sourced(agg_type, { snapshot_version = 1 })
        Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        local store = qx.event_store{ db = db, snapshot_every = 1 }
        for _ = 1, per do
            assert(db:unit_of_work(function(uow)
                local acc = Account.new(qx.uuid())
                acc:record(Deposited{ amount = 2 })
                return uow:store(store):append(acc)
            end))
        end
    end

    local function env_for(name, agg_type)
        return { EVO_NAME = name, EVO_TYPE = agg_type, QX_DB__URL = support.db_url() }
    end

    it("events check exits 0 when every stored version is readable, 1 listing those that are not", function()
        local name, agg_type = support.unique("evo.cli.deposited"), support.unique("EvoCli")
        old_events(name, agg_type, 1, 1)
        local code, out, err = qx_cli({ "events", "check", "--require", module }, dir, env_for(name, agg_type))
        assert.equal(0, code, err .. out)
        assert.matches("ok: every stored version", out)
        assert.is_nil(out:find("unreadable: ", 1, true))

        old_events(name, agg_type, 4, 2) -- a newer deploy wrote v4
        code, out, err = qx_cli({ "events", "check", "--require", module }, dir, env_for(name, agg_type))
        assert.equal(1, code, err)
        assert.truthy(out:find("unreadable: 2 event(s) " .. name .. " v4", 1, true), out)
        assert.matches("1 stored name/version pair%(s%) cannot be read", out)
    end)

    it("snapshots rebuild rewrites the stale snapshots with a line per batch", function()
        local name, agg_type = support.unique("evo.cli.deposited"), support.unique("EvoCli")
        old_events(name, agg_type, 1, 3)
        local code, out, err = qx_cli({ "snapshots", "rebuild", "--require", module, "--aggregate", agg_type,
                                        "--batch", "2" }, dir, env_for(name, agg_type))
        assert.equal(0, code, err)
        assert.truthy(out:find(agg_type .. ": 2/3 snapshots rebuilt", 1, true), out)
        assert.truthy(out:find(agg_type .. ": 3/3 snapshots rebuilt", 1, true), out)
        assert.truthy(out:find(agg_type .. ": 3 snapshot(s) rebuilt", 1, true), out)
        local rows = assert(db:query([[SELECT state, state_version FROM qx_aggregate_snapshots
WHERE aggregate_type = $1]], agg_type))
        assert.equal(3, #rows)
        for _, r in ipairs(rows) do
            assert.equal(2, r.state_version)
            assert.same({ cents = 200 }, r.state)
        end
    end)

    it("refuses a missing or unknown module, aggregate type or bad flag with exit 2", function()
        local env = env_for(support.unique("evo.cli.x"), support.unique("EvoCli"))
        local code, _, err = qx_cli({ "events", "check" }, dir, env)
        assert.equal(2, code)
        assert.matches("%-%-require MODULE", err)
        code, _, err = qx_cli({ "events", "check", "--require", "no_such_module_here" }, dir, env)
        assert.equal(2, code)
        assert.matches("no_such_module_here", err)
        code, _, err = qx_cli({ "events", "verify", "--require", module }, dir, env)
        assert.equal(2, code)
        assert.matches("usage: qx events check", err)
        code, _, err = qx_cli({ "snapshots", "rebuild", "--require", module, "--aggregate", "Nope" }, dir, env)
        assert.equal(2, code)
        assert.matches("no event%-sourced class Nope %(it has: " .. env.EVO_TYPE, err)
        code, _, err = qx_cli({ "snapshots", "rebuild", "--require", module, "--aggregate", env.EVO_TYPE,
                                "--batch", "0" }, dir, env)
        assert.equal(2, code)
        assert.matches("%-%-batch must be", err)
        code, _, err = qx_cli({ "snapshots", "rebuild", "--require", module, "--aggregate", env.EVO_TYPE,
                                "--bacth", "2" }, dir, env)
        assert.equal(2, code)
        assert.matches("unknown flag %-%-bacth", err)
    end)
end)

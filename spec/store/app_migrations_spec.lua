-- An application's migrations (qx.migrate(db, { dir = ... }), qx.migrations.apply/status)
-- against a real PostgreSQL, each case in a fresh database and a fresh folder.
local qx = require "qx"
local core = require "qx.core"
local support = require "support"

local sh, url_for = support.sh, support.url_for

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

-- a fresh folder holding files = { name = text }
local function folder(files)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. sh(dir)))
    for name, text in pairs(files) do write(dir .. "/" .. name, text) end
    return dir
end

local function remove(dir)
    os.execute("rm -rf " .. sh(dir))
end

local ACCOUNTS = "CREATE TABLE accounts (id uuid PRIMARY KEY, owner text NOT NULL);\n"
    .. "CREATE INDEX accounts_owner ON accounts (owner);\n"
local BALANCE = "ALTER TABLE accounts ADD COLUMN balance bigint NOT NULL DEFAULT 0;\n"

describe("application migrations", function()
    local dbs
    setup(function() dbs = support.fresh_databases("qx_appmig") end)
    teardown(function() if dbs then dbs.drop_all() end end)

    local function fresh()
        return assert(qx.connect{ url = url_for(dbs.create()), pool_size = 2 })
    end

    local function history(db)
        return assert(db:query("SELECT version, name, checksum, duration_ms FROM qx_app_migrations ORDER BY version"))
    end

    it("applies the files in order with qx's schema first, and nothing the second time", function()
        local db = fresh()
        local dir = folder{
            ["0001_create_accounts.sql"] = ACCOUNTS,
            ["0002_add_balance.sql"] = BALANCE,
            ["0003_seed.lua"] = [[
return function(conn)
    return conn:query("INSERT INTO accounts (id, owner) VALUES ($1, $2)", "018f0000-0000-7000-8000-000000000001", "ann")
end]],
            ["0004_more.lua"] = [[
return { "ALTER TABLE accounts ADD COLUMN note text", "UPDATE accounts SET note = 'x'" }]],
            ["README.md"] = "# migrations\n",
            [".gitkeep"] = "",
        }
        local r = assert(qx.migrate(db, { dir = dir }))
        assert.is_true(#r.applied > 0) -- qx's own schema came first
        assert.equal(4, #r.app.applied)
        assert.equal(4, r.app.current)
        assert.same({ version = 1, name = "create_accounts", file = "0001_create_accounts.sql" }, r.app.applied[1])
        local rows = history(db)
        assert.equal(4, #rows)
        assert.equal("add_balance", rows[2].name)
        assert.matches("^%x+$", rows[1].checksum)
        assert.equal(64, #rows[1].checksum)
        assert.equal("number", type(rows[1].duration_ms))
        assert.equal("x", db:query("SELECT note FROM accounts")[1].note)
        -- applications no longer write into qx's own history
        local qx_rows = assert(db:query("SELECT name FROM qx_schema_migrations WHERE name = 'create_accounts'"))
        assert.equal(0, #qx_rows)

        r = assert(qx.migrate(db, { dir = dir }))
        assert.equal(0, #r.applied)
        assert.equal(0, #r.app.applied)
        assert.equal(4, r.app.current)
        local st = assert(qx.migrations.status(db, dir))
        assert.equal(4, #st)
        for _, s in ipairs(st) do assert.equal("applied", s.state) end
        db:close()
        remove(dir)
    end)

    it("applies a newly added file only, and reports pending ones", function()
        local db = fresh()
        local dir = folder{ ["0001_create_accounts.sql"] = ACCOUNTS }
        assert(qx.migrations.apply(db, dir))
        write(dir .. "/0002_add_balance.sql", BALANCE)
        local st = assert(qx.migrations.status(db, dir))
        assert.equal("applied", st[1].state)
        assert.equal("pending", st[2].state)
        local r = assert(qx.migrations.apply(db, dir))
        assert.equal(1, #r.applied)
        assert.equal(2, r.applied[1].version)
        db:close()
        remove(dir)
    end)

    it("refuses an edited file that was applied, naming it, and applies nothing", function()
        local db = fresh()
        local dir = folder{ ["0001_create_accounts.sql"] = ACCOUNTS }
        assert(qx.migrations.apply(db, dir))
        write(dir .. "/0001_create_accounts.sql", ACCOUNTS .. "-- edited\n")
        write(dir .. "/0002_add_balance.sql", BALANCE)
        local r, e = qx.migrations.apply(db, dir)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("0001_create_accounts.sql was edited", e.message, 1, true)
        assert.equal(1, #history(db))
        assert.equal(0, #db:query("SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts'"
            .. " AND column_name = 'balance'"))
        assert.equal("edited", assert(qx.migrations.status(db, dir))[1].state)
        db:close()
        remove(dir)
    end)

    it("runs a file marked qx:no-transaction outside a transaction (CREATE INDEX CONCURRENTLY)", function()
        local db = fresh()
        local dir = folder{
            ["0001_create_accounts.sql"] = ACCOUNTS,
            ["0002_index_concurrently.sql"] = "-- qx:no-transaction\n"
                .. "CREATE INDEX CONCURRENTLY accounts_id_owner ON accounts (id, owner)\n",
        }
        local r = assert(qx.migrations.apply(db, dir))
        assert.equal(2, #r.applied)
        assert.equal(1, #db:query("SELECT 1 FROM pg_indexes WHERE indexname = 'accounts_id_owner'"))
        -- without the mark, the same statement fails in the file's transaction
        local dir2 = folder{ ["0001_index.sql"] = "CREATE INDEX CONCURRENTLY accounts_owner2 ON accounts (owner)\n" }
        local db2 = assert(qx.connect{ url = db.settings.url, pool_size = 1 })
        local _, e = qx.migrations.apply(db2, dir2)
        assert.is_not_nil(e)
        assert.matches("0001_index.sql", e.message, 1, true)
        db2:close()
        db:close()
        remove(dir)
        remove(dir2)
    end)

    it("rolls a failing migration back and stops there", function()
        local db = fresh()
        local dir = folder{
            ["0001_create_accounts.sql"] = ACCOUNTS,
            ["0002_broken.sql"] = "ALTER TABLE accounts ADD COLUMN half int;\nSELECT no_such_column FROM accounts;\n",
            ["0003_add_balance.sql"] = BALANCE,
        }
        local r, e = qx.migrations.apply(db, dir)
        assert.is_nil(r)
        assert.equal("db", e.code)
        assert.matches("migration 0002_broken.sql: ", e.message, 1, true)
        assert.equal(1, #history(db)) -- the first file stays applied
        assert.equal(0, #db:query("SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts'"
            .. " AND column_name IN ('half', 'balance')"))
        -- a failing Lua migration stops the same way
        write(dir .. "/0002_broken.sql", BALANCE)
        os.remove(dir .. "/0003_add_balance.sql")
        write(dir .. "/0003_add_balance.lua", "return function(conn) error('not today') end")
        r, e = qx.migrations.apply(db, dir)
        assert.is_nil(r)
        assert.matches("0003_add_balance.lua: .*not today", e.message)
        assert.equal(2, #history(db))
        -- the pooled connection came back clean: not in a transaction, its timeout restored
        local conn = assert(db:acquire())
        assert.equal("idle", conn:status())
        conn:release()
        db:close()
        remove(dir)
    end)

    it("lets concurrent appliers take turns #slow", function()
        local name = dbs.create()
        local dir = folder{
            ["0001_create_accounts.sql"] = ACCOUNTS,
            ["0002_slow.sql"] = "SELECT pg_sleep(0.3);\n" .. BALANCE,
        }
        local interp = jit and "luajit" or "lua5.4"
        local start_at = core.clock() + 1.0
        local script = os.tmpname()
        write(script, [[
local core = require "qx.core"
local qx = require "qx"
local db = assert(qx.connect{ url = arg[1], pool_size = 1 })
while core.clock() < tonumber(arg[3]) do end
local r, e = qx.migrations.apply(db, arg[2])
if not r then io.write("ERR ", tostring(e), "\n") os.exit(1) end
io.write("OK ", #r.applied, "\n")
]])
        local env = "LUA_PATH=" .. sh(package.path) .. " LUA_CPATH=" .. sh(package.cpath) .. " "
        local procs = {}
        for i = 1, 3 do
            procs[i] = assert(io.popen(env .. interp .. " " .. sh(script) .. " " .. sh(url_for(name)) .. " "
                .. sh(dir) .. " " .. string.format("%.3f", start_at) .. " 2>&1"))
        end
        local total = 0
        for i = 1, #procs do
            local out = procs[i]:read("*a")
            procs[i]:close()
            local n = out:match("^OK (%d+)")
            assert.is_not_nil(n, "process " .. i .. ": " .. out)
            total = total + tonumber(n)
        end
        os.remove(script)
        assert.equal(2, total) -- one applied both files, the others found nothing to do
        local db = assert(qx.connect{ url = url_for(name), pool_size = 1 })
        assert.equal(2, #history(db))
        db:close()
        remove(dir)
    end)

    it("refuses a missing folder, bad names, gaps and duplicate numbers before applying anything", function()
        local db = fresh()
        local _, e = qx.migrations.apply(db, "/nonexistent/migrations")
        assert.equal("not_found", e.code)
        assert.matches("migrations folder", e.message, 1, true)
        -- qx.migrate with a wrong folder touches nothing, qx's own schema included
        local r
        r, e = qx.migrate(db, { dir = "/nonexistent/migrations" })
        assert.is_nil(r)
        assert.equal("not_found", e.code)
        assert.is_nil(db:query("SELECT 1 FROM qx_schema_migrations"))
        assert.has_error(function() qx.migrations.apply(db, nil) end)
        assert.has_error(function() qx.migrate(db, { dir = 42 }) end)

        local cases = {
            { files = { ["0001-create.sql"] = ACCOUNTS }, says = "0001%-create.sql is not NNNN_name" },
            { files = { ["0001_create.txt"] = ACCOUNTS }, says = "0001_create.txt is not NNNN_name" },
            { files = { ["0001_a.sql"] = ACCOUNTS, ["0003_c.sql"] = BALANCE }, says = "0003_c.sql should be number 2" },
            { files = { ["0002_b.sql"] = ACCOUNTS }, says = "0002_b.sql should be number 1" },
            { files = { ["0001_a.sql"] = ACCOUNTS, ["001_b.sql"] = BALANCE }, says = "the same number 1" },
            { files = { ["0001_a.lua"] = "return 42" }, says = "must return a function" },
            { files = { ["0001_a.lua"] = "return {" }, says = "0001_a.lua" },
        }
        for _, c in ipairs(cases) do
            local dir = folder(c.files)
            local res, err = qx.migrations.apply(db, dir)
            assert.is_nil(res)
            assert.equal("invalid", err.code)
            assert.matches(c.says, err.message)
            remove(dir)
        end
        assert.is_nil(db:query("SELECT 1 FROM qx_app_migrations")) -- never created
        db:close()
    end)
end)

describe("db:script", function()
    it("runs several statements with the simple protocol, and reports a failure", function()
        local db = support.migrated_db{ pool_size = 1 }
        assert(db:script("CREATE TEMP TABLE IF NOT EXISTS s (x int); DROP TABLE s; SELECT 1"))
        local ok, e = db:script("SELECT 1; SELECT * FROM no_such_table_here")
        assert.is_nil(ok)
        assert.equal("db", e.code)
        assert.has_error(function() db:script(42) end)
        db:close()
    end)
end)

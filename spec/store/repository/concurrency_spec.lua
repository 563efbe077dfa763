-- One winner per version: units of work that save the same version at the same time — in one
-- process, interleaved, and in separate processes racing through a barrier — end with exactly
-- one commit, the others get "conflict", and the row's version rose by one.
local qx = require "qx"
local core = require "qx.core"
local support = require "support"
local H = require "repository_support"

local LUA = jit and "luajit" or "lua5.4"
local CPATH = jit and "build/luajit/?.so" or "build/lua5.4/?.so"

local sh, sleep = support.sh, support.spin

-- A child process that loads the row, waits at the barrier (a shared advisory lock the spec
-- holds exclusively), renames and saves; it prints "ok" or the error code.
local CHILD = [[
local qx = require "qx"
local tbl, id, tenant, key, name = arg[1], arg[2], arg[3], tonumber(arg[4]), arg[5]
local db = assert(qx.connect{ pool_size = 1 })
local users = qx.repository{ table = tbl, tenanted = true, soft_delete = true }
local r, e = db:unit_of_work(function(uow)
  local repo = uow:repo(users)
  local u = assert(repo:get(id))
  assert(uow:query("SELECT pg_advisory_lock_shared($1)", key))
  assert(uow:query("SELECT pg_advisory_unlock_shared($1)", key))
  u.name = name
  local ok, err = repo:save(u)
  if not ok then error(err, 0) end
  return true
end, { context = { tenant_id = tenant, user_id = name } })
io.write(r and "ok" or e.code, "\n")
db:close()
]]

describe("repository concurrency", function()
    local db, tbl, users, T

    setup(function()
        db = H.db({ pool_size = 6 })
        tbl = H.users_table(db)
        users = H.users(tbl)
        T = qx.uuid()
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function one(email)
        return H.seed(db, users, T, 1, function() return { email = email, name = "start" } end)[1]
    end

    local function version_of(id)
        return tonumber(support.psql("SELECT version FROM " .. tbl .. " WHERE id = '" .. id .. "'"))
    end

    it("interleaved in one process: the later save of the same version gets conflict", function()
        local id = one("interleave@example.com")
        local out = assert(H.with(db, users, T, function(repo)
            local mine = assert(repo:get(id))
            -- another unit of work (another connection) saves the same version and commits first
            assert(H.with(db, users, T, function(other)
            local theirs = assert(other:get(id))
            theirs.name = "theirs"
            return other:save(theirs)
            end))
            mine.name = "mine"
            local r, e = repo:save(mine)
            assert.is_nil(r)
            return e
        end))
        assert.equal("conflict", out.code)
        assert.equal(2, version_of(id))
        assert.equal("theirs", support.psql("SELECT name FROM " .. tbl .. " WHERE id = '" .. id .. "'"))
    end)

    it("a deferred save loses at commit to one that committed first", function()
        local id = one("deferred-race@example.com")
        local r, e = H.with(db, users, T, function(repo)
            local mine = assert(repo:get(id))
            mine.name = "mine"
            assert(repo:save(mine, { defer = true }))
            assert(H.with(db, users, T, function(other)
            local theirs = assert(other:get(id))
            theirs.name = "theirs"
            return other:save(theirs)
            end))
            return true
        end)
        assert.is_nil(r)
        assert.equal("conflict", e.code)
        assert.equal(2, version_of(id))
    end)

    it("separate processes racing through a barrier: exactly one commits", function()
        local n = 4
        local id = one("race@example.com")
        local key = tonumber(qx.uuid():sub(-7), 16) -- unique enough per run
        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write(CHILD)
        f:close()
        -- hold the barrier
        local holder = assert(db:acquire())
        assert(holder:query("SELECT pg_advisory_lock($1)", key))
        local children = {}
        for i = 1, n do
            children[i] = assert(io.popen("env -u LD_PRELOAD LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
            .. "LUA_CPATH=" .. sh(CPATH .. ";;") .. " QX_DB__URL=" .. sh(support.db_url()) .. " "
            .. LUA .. " " .. sh(script) .. " " .. sh(tbl) .. " " .. sh(id) .. " " .. sh(T) .. " "
            .. key .. " child" .. i .. " 2>&1", "r"))
        end
        -- wait until every child has loaded the row and waits at the barrier
        local waiting, deadline = 0, core.clock() + 30
        while waiting < n and core.clock() < deadline do
            sleep(0.05)
            local rows = assert(db:query("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
            .. "AND NOT granted AND objid = ($1::bigint & 4294967295)::oid", key))
            waiting = rows[1].n
        end
        assert.equal(n, waiting)
        assert(holder:query("SELECT pg_advisory_unlock($1)", key))
        holder:release()
        local results = {}
        for i = 1, n do
            local out = children[i]:read("*a")
            children[i]:close()
            results[#results + 1] = (out:gsub("%s+$", ""))
        end
        os.remove(script)
        table.sort(results)
        local expect = { "ok" }
        for _ = 2, n do table.insert(expect, 1, "conflict") end
        assert.same(expect, results)
        assert.equal(2, version_of(id))
    end)
end)

-- Shared set-up for the repository specs: a database with qx's schema, a users-like table of
-- its own per call, and an aggregate class to map it to.
local qx = require "qx"
local support = require "support"

local M = {}

M.KEY = "spec-cursor-key-0123456789"

function M.db(opts)
    local o = { cursor_key = M.KEY }
    for k, v in pairs(opts or {}) do o[k] = v end
    return support.migrated_db(o)
end

-- A fresh table: id, email (unique), name, is_active, score, plus the audit columns.
function M.users_table(db, extra)
    local name = support.unique("repo_users")
    assert(db:exec("CREATE TABLE " .. name .. " (\n" .. qx.schema.id_column() .. ",\n"
        .. "email text NOT NULL UNIQUE,\nname text,\nis_active boolean NOT NULL DEFAULT true,\n"
        .. "score integer,\n" .. (extra and (extra .. ",\n") or "") .. qx.schema.audit_columns()
        .. "\n)"))
    return name
end

M.User = qx.aggregate("SpecUser")
M.Renamed = qx.integration_event("spec.user.renamed", { version = 1 })
function M.User:rename(name)
    self.name = name
    self:record(M.Renamed{ user_id = self.id, name = name })
end

function M.users(tbl, extra)
    local o = { table = tbl, entity = M.User, filterable = { "email", "name", "is_active", "score" },
                sortable = { "created_at", "email", "name", "score" }, tenanted = true,
                soft_delete = true }
    for k, v in pairs(extra or {}) do o[k] = v end
    return qx.repository(o)
end

-- Adds n users in one unit of work for tenant t; returns their ids in order.
function M.seed(db, desc, t, n, make)
    local ids = {}
    assert(db:unit_of_work(function(uow)
        local repo = uow:repo(desc)
        for i = 1, n do
            local fields = make and make(i) or { email = ("user%03d@example.com"):format(i),
                                                 name = "User " .. i, score = i }
            local u = M.User.new(fields)
            assert(repo:add(u))
            ids[i] = u.id
        end
        return true
    end, { context = { tenant_id = t, user_id = "seeder" } }))
    return ids
end

function M.ctx(t, user)
    return { context = { tenant_id = t, user_id = user or "tester" } }
end

-- Runs fn(repo, uow) in a unit of work for tenant t; returns what unit_of_work returns, except
-- that a Lua error raised inside fn (a failed assertion) is raised again here, so it fails the
-- spec instead of being returned as the unit of work's error. qx errors are returned.
function M.with(db, desc, t, fn, user)
    local r = table.pack and table.pack or function(...) return { n = select("#", ...), ... } end
    local out = r(db:unit_of_work(function(uow) return fn(uow:repo(desc), uow) end, M.ctx(t, user)))
    local e = out[2]
    if out[1] == nil and type(e) == "table" and e.code == "error" then
        error(e.value or (tostring(e.message) .. "\n" .. tostring(e.traceback)), 0)
    end
    return (table.unpack or unpack)(out, 1, out.n)
end

-- The raised error of fn, or nil when it did not raise.
function M.raised(fn)
    local ok, e = pcall(fn)
    if ok then return nil end
    return e
end

return M

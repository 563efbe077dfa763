--- Internal to qx.store.repository: the two classes (Description, Repo) that the files of this
-- folder add methods to, the limits, and the helpers they all use. Not part of the API.
local core = require "qx.core"
local qx_error = require "qx.error"
local options = require "qx.options"

local type = type
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local fmt = string.format
local gsub = string.gsub
local null = core.null
local is_uuid = core.is_uuid

local _M = {
    DEFAULT_PAGE_SIZE = 20,
    MAX_PAGE_SIZE = 100,
    EACH_BATCH_SIZE = 500,
    MAX_BATCH_SIZE = 100000,
    MAX_PAGE = 1000000000,
}

--- A table described once (qx.repository).
---@class qx.RepositoryDescription
local Description = {}
Description.__index = Description
_M.Description = Description

--- A repository bound to a unit of work, or a reader bound to a database.
---@class qx.Repo
local Repo = {}
Repo.__index = Repo
_M.Repo = Repo

function _M.quote(name)
    return '"' .. gsub(name, '"', '""') .. '"'
end

local function fail(code, msg, fields)
    return nil, qx_error.new(code, msg, fields)
end
_M.fail = fail

function _M.is_int(v, lo, hi)
    return type(v) == "number" and v % 1 == 0 and v >= lo and v <= hi
end

-- the one option checker (qx.options): raises at the caller's line, listing the known options
_M.check_opts = options.check

local function new_repo(d, target, db, ctx, uow)
    local self = setmetatable({ d = d, t = target, db = db, ctx = ctx, uow = uow,
                                c = d._by_db[db] }, Repo)
    if d.tenanted then
        self.tenant = ctx.tenant_id
        if self.tenant == nil and not d.allow_cross_tenant then
            self.refused = qx_error.new("invalid", "repository " .. d.what .. " is tenanted and "
                .. "the context has no tenant_id (set allow_cross_tenant = true to read and "
                .. "write across tenants)")
        end
    end
    local actor = ctx.actor_id or ctx.user_id
    if actor ~= nil then self.actor = type(actor) == "string" and actor or tostring(actor) end
    return self
end

-- bind(description, uow) -> repository bound to the unit of work (what uow:repo calls)
function _M.bind(d, uow)
    if getmetatable(d) ~= Description then
        options.raise("uow:repo: expected a description made by qx.repository{...}")
    end
    return new_repo(d, uow, uow.db, uow.context or {}, uow)
end
_M.new_repo = new_repo

function _M.ready(self)
    if self.refused then return nil, self.refused end
    return self:_catalog()
end

function _M.need_uow(self, what)
    if not self.uow then
        error("repository " .. self.d.what .. ": " .. what .. " needs a unit of work "
              .. "(uow:repo(description)); this repository only reads", 3)
    end
end

function _M.check_id(self, c, id)
    if id == nil or id == null then error("repository " .. self.d.what .. ": id is missing", 3) end
    local t = type(id)
    if t ~= "string" and t ~= "number" then
        error("repository " .. self.d.what .. ": id must be a string or a number, got " .. t, 3)
    end
    if c.pk_col.uuid and not is_uuid(id) then
        return fail("invalid", c.what .. ": id must be a uuid, got " .. fmt("%q", tostring(id)))
    end
    return true
end

-- a row read with rows (its NULL columns are absent, so they read as nil) -> an entity
function _M.map_row(d, row)
    local from = d.from_row
    if from then return from(row) end
    return row
end

-- the rows become the items in place
function _M.map_rows(d, rows, skip_total)
    local from = d.from_row
    if not from and not skip_total then return rows end
    for i = 1, #rows do
        local row = rows[i]
        if skip_total then row.__qx_total = nil end
        if from then rows[i] = from(row) end
    end
    return rows
end

return _M

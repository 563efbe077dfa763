--- Internal to qx.store.repository: description:reader(db[, context]), a repository that reads
-- outside any transaction, each statement on its own pooled connection.
local core = require "qx.core"
local base = require "qx.store.repository.base"

local type = type
local error = error
local setmetatable = setmetatable
local is_uuid = core.is_uuid
local new_repo = base.new_repo
local Description = base.Description

-- A read-only target that runs each statement on its own pooled connection.
local Reader = {}
Reader.__index = Reader
--- Runs a statement on a pooled connection of its own.
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or the affected row count
function Reader:query(sql, ...)
    return self.db:query(sql, ...)
end

--- Rows without their NULL columns (as uow:rows).
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err
function Reader:rows(sql, ...)
    return self.db:rows(sql, ...)
end

--- Only the first max rows made into tables (as uow:rows_upto).
---@param max integer
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or count
function Reader:rows_upto(max, sql, ...)
    return self.db:rows_upto(max, sql, ...)
end

--- A repository that reads outside any transaction, one pooled connection per statement.
-- Writes raise.
---@param db qx.Db
---@param ctx table|nil the context: { tenant_id = ... } for a tenanted table
---@return qx.Repo
function Description:reader(db, ctx)
    if type(db) ~= "table" or db.pool == nil then
        error("reader: expected a db from qx.connect", 2)
    end
    if ctx ~= nil and type(ctx) ~= "table" then error("reader: context must be a table", 2) end
    ctx = ctx or {}
    if ctx.tenant_id ~= nil and not is_uuid(ctx.tenant_id) then
        error("reader: context.tenant_id must be a uuid", 2)
    end
    return new_repo(self, setmetatable({ db = db }, Reader), db, ctx, nil)
end

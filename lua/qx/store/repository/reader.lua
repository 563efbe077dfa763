-- Internal to qx.store.repository: description:reader(db[, context]), a repository that reads
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
function Reader:query(sql, ...)
    return self.db:query(sql, ...)
end

-- rows without their NULL columns, all or only the first max made into tables (as uow:rows,
-- uow:rows_upto)
function Reader:rows(sql, ...)
    return self.db:rows(sql, ...)
end

function Reader:rows_upto(max, sql, ...)
    return self.db:rows_upto(max, sql, ...)
end

-- description:reader(db[, context]) -> a repository that reads outside any transaction, one
-- pooled connection per statement; context gives tenant_id. Writes raise.
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

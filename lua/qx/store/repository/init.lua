--- qx.repository{...}: a table described once, bound to a unit of work (or to a database for
-- reads) to load and store entities.
--
--   local users = qx.repository{ table = "users", entity = User,
--     filterable = { "email", "name" }, sortable = { "created_at" }, tenanted = true }
--   db:unit_of_work(function(uow)
--     local u = assert(uow:repo(users):get(id))
--     u:rename("Ada")
--     assert(uow:repo(users):save(u))     -- nil, { code = "conflict" } when someone saved first
--   end, { context = { tenant_id = t, user_id = a } })
--   local page = assert(users:reader(db, { tenant_id = t }):list{ page_size = 20 })
--
-- The files of this folder each add one part; see docs/repository.md for options and failures.
local base = require "qx.store.repository.base"
local description = require "qx.store.repository.description"
require "qx.store.repository.catalog"
require "qx.store.repository.reader"
require "qx.store.repository.reads"
require "qx.store.repository.keyset"
require "qx.store.repository.stream"
require "qx.store.repository.writes"

local _M = {
    _VERSION = "0.1.0",
    DEFAULT_PAGE_SIZE = base.DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE = base.MAX_PAGE_SIZE,
    EACH_BATCH_SIZE = base.EACH_BATCH_SIZE,
    Description = base.Description,
    Repo = base.Repo,
}

-- new(opts) -> description (raises on a bad description; no I/O)
_M.new = description.new

-- bind(description, uow) -> repository bound to the unit of work (what uow:repo calls)
_M.bind = base.bind

--- The repository bound to a unit of work (what uow:repo calls).
---@param uow qx.Uow
---@return qx.Repo
function base.Description:bind(uow)
    return base.bind(self, uow)
end

--- The description this repository was bound from.
---@return qx.RepositoryDescription
function base.Repo:description()
    return self.d
end

return _M

--- Internal to qx.store.repository: get, exists, count, list (offset pages with their total)
-- and search.
local S = require "qx.store.repository.spec"
local base = require "qx.store.repository.base"
local query = require "qx.store.repository.query"

local pairs = pairs
local error = error
local tostring = tostring
local unpack = table.unpack or unpack
local concat = table.concat
local ceil = math.ceil
local fail, is_int, check_opts = base.fail, base.is_int, base.check_opts
local ready, check_id = base.ready, base.check_id
local map_row, map_rows = base.map_row, base.map_rows
local new_query, scope, listing_where = query.new_query, query.scope, query.listing_where
local order_by, sort_of = query.order_by, query.sort_of
local MAX_PAGE = base.MAX_PAGE
local Repo = base.Repo

local GET_OPTS = { include_deleted = true, for_update = true }

--- One entity by id.
---@param id any the primary key
---@param opts table|nil { include_deleted = false, for_update = false }
---@return table|nil entity
---@return qx.Error? err not_found, invalid, ...
function Repo:get(id, opts)
    opts = check_opts(opts, GET_OPTS, "get")
    local c, e = ready(self)
    if not c then return nil, e end
    local ok
    ok, e = check_id(self, c, id)
    if not ok then return nil, e end
    -- the statement per variant is built once; its parameters are the id and the tenant
    local variant = (opts.include_deleted and 1 or 0) + (opts.for_update and 2 or 0)
    if self.tenant ~= nil then variant = variant + 4 end
    local sql = c.get_sql[variant]
    if not sql then
        local q = new_query(self, c)
        local parts = scope(self, c, q, opts.include_deleted, { c.pkq .. " = " .. q:param(id) })
        sql = "SELECT " .. c.select .. " FROM " .. c.qtable .. " WHERE " .. concat(parts, " AND ")
              .. (opts.for_update and " FOR UPDATE" or "")
        c.get_sql[variant] = sql
    end
    local rows
    if self.tenant ~= nil then
        rows, e = self.t:rows(sql, id, self.tenant)
    else
        rows, e = self.t:rows(sql, id)
    end
    if not rows then return nil, e end
    if rows[1] == nil then
        return fail("not_found", c.what .. " " .. tostring(id) .. " not found", { id = id })
    end
    return map_row(self.d, rows[1])
end

--- Whether a row with that id exists (and is visible: tenant, soft delete).
---@param id any
---@param opts table|nil { include_deleted = false }
---@return boolean|nil exists
---@return qx.Error? err
function Repo:exists(id, opts)
    opts = check_opts(opts, GET_OPTS, "exists")
    local c, e = ready(self)
    if not c then return nil, e end
    local ok
    ok, e = check_id(self, c, id)
    if not ok then return nil, e end
    local q = new_query(self, c)
    local parts = scope(self, c, q, opts.include_deleted, { c.pkq .. " = " .. q:param(id) })
    local rows
    rows, e = self.t:query("SELECT EXISTS (SELECT 1 FROM " .. c.qtable .. " WHERE "
                           .. concat(parts, " AND ") .. ") AS found", unpack(q.params, 1, q.n))
    if not rows then return nil, e end
    return rows[1].found
end

local COUNT_OPTS = { filters = true, where = true, include_deleted = true }

--- How many rows match.
---@param opts table|nil { filters = { col = value }, where = spec, include_deleted }
---@return integer|nil n
---@return qx.Error? err
function Repo:count(opts)
    opts = check_opts(opts, COUNT_OPTS, "count")
    local c, e = ready(self)
    if not c then return nil, e end
    local q = new_query(self, c)
    local w = listing_where(self, c, q, opts)
    local rows
    rows, e = self.t:query("SELECT count(*) AS n FROM " .. c.qtable .. " WHERE " .. w,
                           unpack(q.params, 1, q.n))
    if not rows then return nil, e end
    return rows[1].n
end

local LIST_OPTS = { filters = true, where = true, sort = true, page = true, page_size = true,
                    include_deleted = true, with_total = true }

--- One page and the total, from one snapshot in one statement. with_total = false skips the
-- count (total and pages are nil; has_next is still right). opts: filters = { col = value },
-- where = spec, sort = { { "col", "desc" } }, page = 1, page_size, include_deleted,
-- with_total = true.
---@param opts table|nil
---@return table|nil page { items, page, page_size, total, pages, has_next }
---@return qx.Error? err invalid for a bad filter, sort or page
function Repo:list(opts)
    opts = check_opts(opts, LIST_OPTS, "list")
    local d = self.d
    local c, e = ready(self)
    if not c then return nil, e end
    local page, size = opts.page or 1, opts.page_size or d.default_page_size
    if not is_int(page, 1, MAX_PAGE) then
        return fail("invalid", "page must be an integer from 1 to " .. MAX_PAGE .. ", got "
                    .. tostring(page))
    end
    if not is_int(size, 1, d.max_page_size) then
        return fail("invalid", "page_size must be an integer from 1 to " .. d.max_page_size
                    .. ", got " .. tostring(size))
    end
    local q = new_query(self, c)
    local w = listing_where(self, c, q, opts)
    local keys = sort_of(self, c, opts)
    local with_total = opts.with_total ~= false
    local limit = q:param(with_total and size or size + 1)
    local offset = q:param((page - 1) * size)
    local inner = "SELECT " .. c.select .. " FROM " .. c.qtable .. " WHERE " .. w .. " ORDER BY "
                  .. order_by(c, keys) .. " LIMIT " .. limit .. " OFFSET " .. offset
    local sql = inner
    if with_total then
        sql = "SELECT t.n AS __qx_total, p.* FROM (SELECT count(*) AS n FROM " .. c.qtable
              .. " WHERE " .. w .. ") t LEFT JOIN LATERAL (" .. inner .. ") p ON true ORDER BY "
              .. order_by(c, keys, "p.")
    end
    local rows
    rows, e = self.t:rows(sql, unpack(q.params, 1, q.n))
    if not rows then return nil, e end
    local out = { page = page, page_size = size }
    if with_total then
        out.total = rows[1].__qx_total
        if rows[1][d.pk] == nil then rows = {} end -- the count's row alone: an empty page
        out.pages = ceil(out.total / size)
        out.has_next = page * size < out.total
    else
        out.has_next = #rows > size
        rows[size + 1] = nil
    end
    out.items = map_rows(d, rows, with_total)
    return out
end

--- Like list, for a specification (and whatever filters opts has).
---@param spec qx.Spec from qx.spec.where, and_, or_, not_
---@param opts table|nil as list
---@return table|nil page { items, page, page_size, total, pages, has_next }
---@return qx.Error? err
function Repo:search(spec, opts)
    if spec == nil then error("search: expected a specification", 2) end
    opts = check_opts(opts, LIST_OPTS, "search")
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.where = opts.where ~= nil and S.and_(spec, opts.where) or spec
    return self:list(o)
end

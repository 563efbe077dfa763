-- Internal to qx.store.repository: the query compiler. A query holds the parameters of one
-- statement; the functions here make the WHERE text of the scope (tenant, soft delete), the
-- filters and specifications, and the ORDER BY of a parsed sort (kept per catalog).
local core = require "qx.core"
local S = require "qx.store.repository.spec"

local type = type
local ipairs = ipairs
local setmetatable = setmetatable
local next = next
local concat = table.concat
local fmt = string.format
local lower = string.lower
local sub = string.sub
local null = core.null
local compile_spec = S.compile
local spec_of = S.of
local invalid = S.invalid

local _M = {}

-- sort specs: "email", "-email", { "email", "desc" }, { field = "email", dir = "desc" }
local function parse_sort(list, allowed, pk, what)
    if type(list) ~= "table" then invalid("sort must be a list of sort keys") end
    if type(list[1]) == "string" and (list[2] == "asc" or list[2] == "desc"
                                      or list[2] == "ASC" or list[2] == "DESC") then
        list = { list } -- a single { field, dir }
    end
    local out, seen = {}, {}
    for i = 1, #list do
        local item = list[i]
        local field, dir
        if type(item) == "string" then
            if sub(item, 1, 1) == "-" then
                field, dir = sub(item, 2), "desc"
            else
                field, dir = item, "asc"
            end
        elseif type(item) == "table" then
            field, dir = item.field or item[1], item.dir or item[2] or "asc"
        else
            invalid("sort key " .. i .. " must be a string or { field, dir }")
        end
        if type(field) ~= "string" then invalid("sort key " .. i .. " has no field name") end
        if type(dir) ~= "string" then
            invalid("sort direction of '" .. field .. "' must be a string")
        end
        local d = lower(dir)
        if d ~= "asc" and d ~= "desc" then
            invalid("sort direction of '" .. field .. "' must be asc or desc, got "
                    .. fmt("%q", dir), { field = field })
        end
        if allowed and not allowed[field] and field ~= pk then
            invalid("field '" .. field .. "' is not sortable on " .. what, { field = field })
        end
        if seen[field] then invalid("field '" .. field .. "' is sorted on twice") end
        seen[field] = true
        out[#out + 1] = { field = field, desc = d == "desc" }
    end
    if not seen[pk] then out[#out + 1] = { field = pk, desc = false } end
    return out
end
_M.parse_sort = parse_sort

local Query = {}
Query.__index = Query

-- "$1", "$2", ...: made once each
local placeholders = setmetatable({}, { __index = function(t, n)
    local p = "$" .. n
    t[n] = p
    return p
end })

function Query:param(v)
    local n = self.n + 1
    self.n = n
    if v == nil then v = null end
    self.params[n] = v
    return placeholders[n]
end

-- A query holds only its parameters; what it reads of the table (columns, allow-list, names for
-- messages) comes from the catalog's query class, made once.
local function new_query(self, c)
    local class = c.query_class
    if class == nil then
        local d = self.d
        local fields = { columns = c.columns, allowed = d.filterable, what = c.what,
                         allowed_hint = d.filter_hint, param = Query.param }
        class = { __index = fields }
        c.query_class = class
    end
    return setmetatable({ params = { nil, nil, nil, nil, nil, nil, nil, nil }, n = 0 }, class)
end

-- the tenant and soft-delete conditions, as a list of SQL parts
local function scope(self, c, q, include_deleted, parts)
    parts = parts or {}
    if self.tenant ~= nil then
        parts[#parts + 1] = c.columns.tenant_id.qname .. " = " .. q:param(self.tenant)
    end
    if self.d.soft_delete and not include_deleted then
        parts[#parts + 1] = c.columns.deleted_at.qname .. " IS NULL"
    end
    return parts
end

-- The scope of a listing as one text (its first parameter, when tenanted, is the tenant), per
-- variant made once: with or without a tenant, with or without deleted rows. q is a new query
-- (every listing starts with one), so the text's numbering is its own.
local function listing_scope(self, c, q, include_deleted)
    local variant = (self.tenant ~= nil and 2 or 0) + (include_deleted and 1 or 0)
    local text = c.scope_sql[variant]
    if text == nil then
        local probe = new_query(self, c)
        text = concat(scope(self, c, probe, include_deleted), " AND ")
        c.scope_sql[variant] = text
    end
    if self.tenant ~= nil then q:param(self.tenant) end
    return text
end

-- w AND the compiled specification x (filters or where), when there is one
local function and_spec(w, x, q)
    if x == nil then return w end
    local f = compile_spec(spec_of(x), q)
    return w == "" and f or (w .. " AND " .. f)
end

-- WHERE text of a listing: scope, filters and where (a specification)
local function listing_where(self, c, q, opts)
    local w = listing_scope(self, c, q, opts.include_deleted)
    w = and_spec(and_spec(w, opts.filters, q), opts.where, q)
    if w == "" then return "TRUE" end
    return w
end

local function order_by(c, keys, prefix)
    local out = {}
    for i, k in ipairs(keys) do
        local col = c.columns[k.field]
        out[i] = (prefix or "") .. col.qname .. (k.desc and " DESC" or " ASC")
        if not col.notnull then out[i] = out[i] .. (k.desc and " NULLS FIRST" or " NULLS LAST") end
    end
    return concat(out, ", ")
end

-- Parsed sorts given as lists of strings are kept per catalog: a one-string sort by its string,
-- a longer one by its strings each with its length (so that no two lists share a key), in a
-- table of their own (so that no one-string sort shares a key with a longer one). A listing
-- called again with the same sort gets the same keys table, and what was built for it (see
-- listing_plan) is found again. A sort that does not parse raises before anything is kept.
local SORT_CACHE_LIMIT = 64

-- the key of a sort list and the table it is kept in, or nil when it is not all strings
local function sort_key(c, list)
    local n = #list
    if n == 1 then
        local s = list[1]
        if type(s) == "string" then return s, c.sorts end
        return nil
    end
    local parts = {}
    for i = 1, n do
        local s = list[i]
        if type(s) ~= "string" then return nil end
        parts[i] = #s .. ":" .. s
    end
    return concat(parts), c.multi_sorts
end

-- the sort keys of a listing, and whether they are a kept table (the same for the same sort)
local function sort_of(self, c, opts)
    local list = opts.sort
    if list == nil then return self.d.default_sort, true end
    local key, kept
    if type(list) == "table" and next(list) ~= nil then key, kept = sort_key(c, list) end
    if key then
        local keys = kept[key]
        if keys then return keys, true end
        keys = parse_sort(list, self.d.sortable, self.d.pk, c.what)
        if c.nsorts >= SORT_CACHE_LIMIT then
            c.sorts, c.multi_sorts, c.nsorts = {}, {}, 0
            kept = #list == 1 and c.sorts or c.multi_sorts
        end
        kept[key] = keys
        c.nsorts = c.nsorts + 1
        return keys, true
    end
    return parse_sort(list, self.d.sortable, self.d.pk, c.what), false
end

_M.new_query = new_query
_M.scope = scope
_M.listing_where = listing_where
_M.order_by = order_by
_M.sort_of = sort_of

return _M

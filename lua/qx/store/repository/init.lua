-- qx.repository{...}: a table described once, bound to a unit of work (or to a database for
-- reads) to load and store entities.
--
--   local users = qx.repository{ table = "users", entity = User,
--     filterable = { "email", "name", "is_active" }, sortable = { "created_at", "email" },
--     tenanted = true, soft_delete = true }
--
--   db:unit_of_work(function(uow)
--     local repo = uow:repo(users)
--     local u = assert(repo:get(id))
--     u:rename("Ada")
--     assert(repo:save(u))          -- nil, { code = "conflict" } when someone saved first
--   end, { context = { tenant_id = t, user_id = a } })
--
--   local reader = users:reader(db, { tenant_id = t })   -- reads only, no transaction
--   local page = assert(reader:list{ filters = {{ "email", "ends_with", "@example.com" }} })
--
-- Description options (all but `table` optional):
--   table, schema          the table (schema: else the first match on the search_path)
--   entity                 class of the entities: a row becomes an entity by setmetatable(row,
--                          entity), or entity.from_row(row) when the class has one; an entity
--                          becomes a row by its fields named like the columns, or
--                          entity.to_row(e) when the class has one
--   from_row, to_row       mapping functions that take precedence over the entity's
--   filterable, sortable   allow-lists of column names; anything else raises. The primary key
--                          is always sortable and is always the last sort key.
--   default_sort           e.g. { { "created_at", "desc" } } (default: the primary key)
--   tenanted               every read and write is limited to context.tenant_id
--   allow_cross_tenant     with tenanted: a context without tenant_id reads and writes across
--                          tenants instead of being refused
--   soft_delete            soft_delete(id) stamps deleted_at/deleted_by; reads skip deleted
--                          rows unless include_deleted = true
--   default_page_size (20), max_page_size (100)
--   cursor_key             key (>= 16 bytes) or list of keys (the first signs) for keyset
--                          cursors; default: the database setting cursor_key (QX_CURSOR_KEY)
--   primary_key ("id")     a uuid key is made with qx.uuid() when an added entity has none
--   readonly               columns the repository never writes (filled by the database)
--
-- Columns are read from the catalog once per database and table. The repository manages those
-- of them that exist: the primary key, version, created_at/created_by, updated_at/updated_by,
-- and with tenanted tenant_id, with soft_delete deleted_at/deleted_by. Every other column
-- (save for generated ones) is written from the entity; a NULL column reads as nil.
--
-- Failures: reads and writes return nil, err (not_found, conflict, invalid, db, ...). Filters
-- and sorts outside the allow-lists, unknown operators, unknown options and misuse raise;
-- filter problems raise a qx error table with code "invalid", which a unit of work returns as
-- its error.
local core = require "qx.core"
local qx_error = require "qx.error"
local aggregate = require "qx.model.aggregate"
local S = require "qx.store.repository.spec"
local cursor = require "qx.store.repository.cursor"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local rawget = rawget
local rawset = rawset
local setmetatable = setmetatable
local getmetatable = getmetatable
local next = next
local unpack = table.unpack or unpack
local concat = table.concat
local fmt = string.format
local gsub = string.gsub
local lower = string.lower
local sub = string.sub
local find = string.find
local ceil = math.ceil
local null = core.null
local is_uuid = core.is_uuid
local is_aggregate = aggregate.is_aggregate
local compile_spec = S.compile
local spec_of = S.of
local invalid = S.invalid

local _M = { _VERSION = "0.1.0" }

_M.DEFAULT_PAGE_SIZE = 20
_M.MAX_PAGE_SIZE = 100
_M.EACH_BATCH_SIZE = 500
local MAX_BATCH_SIZE = 100000
local MAX_PAGE = 1000000000

local TEXT_TYPES = { text = true, ["character varying"] = true, character = true,
                     citext = true, name = true }
local UNSORTABLE = { json = true, jsonb = true, bytea = true }

local OPTIONS = {
    table = "string", schema = "string", entity = "table", from_row = "function",
    to_row = "function", filterable = "table", sortable = "table", default_sort = "table",
    tenanted = "boolean", allow_cross_tenant = "boolean", soft_delete = "boolean",
    default_page_size = "number", max_page_size = "number", cursor_key = "any",
    primary_key = "string", readonly = "table",
}

local Description = {}
Description.__index = Description
_M.Description = Description

local Repo = {}
Repo.__index = Repo
_M.Repo = Repo

-- ---- small helpers --------------------------------------------------------------------------

local function quote(name)
    return '"' .. gsub(name, '"', '""') .. '"'
end

local function fail(code, msg, fields)
    return nil, qx_error.new(code, msg, fields)
end

local function is_int(v, lo, hi)
    return type(v) == "number" and v % 1 == 0 and v >= lo and v <= hi
end

local function strings(list, what)
    if type(list) ~= "table" then error("qx.repository: " .. what .. " must be a list", 3) end
    local set, out = {}, {}
    for i, v in ipairs(list) do
        if type(v) ~= "string" or v == "" then
            error("qx.repository: " .. what .. "[" .. i .. "] must be a column name", 3)
        end
        if not set[v] then
            set[v] = true
            out[#out + 1] = v
        end
    end
    return out, set
end

local NO_OPTIONS = setmetatable({}, { __newindex = function() error("read-only", 2) end })

local function check_opts(opts, allowed, fname)
    if opts == nil then return NO_OPTIONS end
    if type(opts) ~= "table" then error(fname .. ": options must be a table", 3) end
    for k in pairs(opts) do
        if not allowed[k] then
            error(fname .. ": unknown option '" .. tostring(k) .. "'", 3)
        end
    end
    return opts
end

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
        if type(dir) ~= "string" then invalid("sort direction of '" .. field .. "' must be a string") end
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

-- ---- descriptions -------------------------------------------------------------------------

-- new(opts) -> description (raises on a bad description; no I/O)
function _M.new(opts)
    if type(opts) ~= "table" then error("qx.repository: expected a table of options", 2) end
    for k, v in pairs(opts) do
        local want = OPTIONS[k]
        if not want then error("qx.repository: unknown option '" .. tostring(k) .. "'", 2) end
        if want ~= "any" and type(v) ~= want then
            error("qx.repository: " .. k .. " must be a " .. want .. ", got " .. type(v), 2)
        end
    end
    if type(opts.table) ~= "string" or opts.table == "" or find(opts.table, "%z") then
        error("qx.repository: table must be a non-empty string", 2)
    end
    if opts.schema ~= nil and (opts.schema == "" or find(opts.schema, "%z")) then
        error("qx.repository: schema must be a non-empty string", 2)
    end
    local d = setmetatable({
        table = opts.table,
        schema = opts.schema,
        entity = opts.entity,
        tenanted = opts.tenanted == true,
        allow_cross_tenant = opts.allow_cross_tenant == true,
        soft_delete = opts.soft_delete == true,
        pk = opts.primary_key or "id",
        default_page_size = opts.default_page_size or _M.DEFAULT_PAGE_SIZE,
        max_page_size = opts.max_page_size or _M.MAX_PAGE_SIZE,
        _by_db = setmetatable({}, { __mode = "k" }),
    }, Description)
    d.what = (d.schema and (d.schema .. ".") or "") .. d.table
    if not is_int(d.max_page_size, 1, MAX_BATCH_SIZE) then
        error("qx.repository: max_page_size must be an integer from 1 to " .. MAX_BATCH_SIZE, 2)
    end
    if not is_int(d.default_page_size, 1, d.max_page_size) then
        error("qx.repository: default_page_size must be an integer from 1 to max_page_size", 2)
    end
    d.filterable_list, d.filterable = strings(opts.filterable or {}, "filterable")
    d.sortable_list, d.sortable = strings(opts.sortable or {}, "sortable")
    d.readonly_list, d.readonly = strings(opts.readonly or {}, "readonly")
    d.filter_hint = #d.filterable_list > 0
        and (" (filterable: " .. concat(d.filterable_list, ", ") .. ")")
        or " (it has no filterable fields)"
    local ok, e = pcall(parse_sort, opts.default_sort or {}, nil, d.pk, d.what)
    if not ok then error("qx.repository: default_sort: " .. tostring(e.message or e), 2) end
    d.default_sort = e
    if opts.cursor_key ~= nil then
        local keys, why = cursor.keys(opts.cursor_key)
        if not keys then error("qx.repository: cursor_key: " .. why, 2) end
        d.cursor_keys = keys
    end

    -- row -> entity (NULL columns are absent from the row, see map_row)
    local entity = d.entity
    local from = opts.from_row or (entity and type(rawget(entity, "from_row")) == "function"
                                   and rawget(entity, "from_row"))
    if from then
        d.from_row = from
    elseif entity then
        d.from_row = function(row) return setmetatable(row, entity) end
    end
    d.to_row = opts.to_row or (entity and type(rawget(entity, "to_row")) == "function"
                               and rawget(entity, "to_row")) or nil
    return d
end

-- ---- the catalog ----------------------------------------------------------------------------

local CATALOG_SQL = [[
SELECT a.attname AS name, format_type(a.atttypid, NULL) AS type, a.attnotnull AS notnull,
       a.attgenerated <> '' AS generated, a.attidentity = 'a' AS identity_always,
       n.nspname AS schema, to_regproc('qx_raise') IS NOT NULL AS has_raise
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relname = $1 AND c.relkind IN ('r', 'p', 'v', 'f', 'm')
  AND CASE WHEN $2::text IS NULL THEN pg_table_is_visible(c.oid) ELSE n.nspname = $2 END
ORDER BY a.attnum]]

local MANAGED = { "version", "created_at", "created_by", "updated_at", "updated_by" }

local function build(d, rows)
    local c = { what = d.what, get_sql = {}, save_sql = {}, save_params = {}, scope_sql = {},
                sorts = {}, multi_sorts = {}, nsorts = 0,
                page_plans = setmetatable({}, { __mode = "k" }), nplans = 0, columns = {}, order = {},
                has = {},
                managed = {}, writable = {}, has_raise = rows[1].has_raise }
    c.qtable = (d.schema and (quote(d.schema) .. ".") or "") .. quote(d.table)
    for i, r in ipairs(rows) do
        local col = {
            name = r.name, type = r.type, notnull = r.notnull, qname = quote(r.name),
            text = TEXT_TYPES[r.type] or false, json = r.type == "json" or r.type == "jsonb",
            uuid = r.type == "uuid", generated = r.generated or r.identity_always,
        }
        c.columns[r.name] = col
        c.order[i] = r.name
    end
    local function need(name, why)
        if not c.columns[name] then
            return fail("invalid", "repository " .. d.what .. ": " .. why .. " '" .. name
                        .. "' is not a column of the table")
        end
        return true
    end
    local ok, e = need(d.pk, "primary key")
    if not ok then return nil, e end
    if d.tenanted then
        ok, e = need("tenant_id", "tenanted, but")
        if not ok then return nil, e end
    end
    if d.soft_delete then
        ok, e = need("deleted_at", "soft_delete, but")
        if not ok then return nil, e end
    end
    for _, list in ipairs({ { d.filterable_list, "filterable field" },
                            { d.sortable_list, "sortable field" },
                            { d.readonly_list, "readonly column" } }) do
        for _, name in ipairs(list[1]) do
            ok, e = need(name, list[2])
            if not ok then return nil, e end
        end
    end
    for _, s in ipairs(d.default_sort) do
        ok, e = need(s.field, "default_sort field")
        if not ok then return nil, e end
    end
    for _, name in ipairs(d.sortable_list) do
        if UNSORTABLE[c.columns[name].type] then
            return fail("invalid", "repository " .. d.what .. ": sortable field '" .. name
                        .. "' is of type " .. c.columns[name].type .. ", which cannot be sorted")
        end
    end
    c.has = {}
    for _, name in ipairs(MANAGED) do
        if c.columns[name] then
            c.has[name] = true
            c.managed[name] = true
        end
    end
    c.managed[d.pk] = true
    if d.tenanted then c.managed.tenant_id, c.has.tenant_id = true, true end
    if d.soft_delete then
        c.managed.deleted_at, c.has.deleted_at = true, true
        if c.columns.deleted_by then c.managed.deleted_by, c.has.deleted_by = true, true end
    end
    local sel = {}
    c.nullable = {}
    for i, name in ipairs(c.order) do
        sel[i] = c.columns[name].qname
        if not c.columns[name].notnull then c.nullable[#c.nullable + 1] = name end
        if not c.managed[name] and not c.columns[name].generated and not d.readonly[name] then
            c.writable[#c.writable + 1] = name
        end
    end
    c.select = concat(sel, ", ")
    c.pkq = c.columns[d.pk].qname
    c.pk_col = c.columns[d.pk]
    return c
end

-- ---- binding ------------------------------------------------------------------------------

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
        error("uow:repo: expected a description made by qx.repository{...}", 3)
    end
    return new_repo(d, uow, uow.db, uow.context or {}, uow)
end

function Description:bind(uow)
    return _M.bind(self, uow)
end

-- description:reset(): forget the columns read from the catalog (on every database), e.g.
-- after the table was altered while the process runs; the next use reads them again.
function Description:reset()
    self._by_db = setmetatable({}, { __mode = "k" })
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

function Repo:_catalog()
    local c = self.c
    if c then return c end
    local d = self.d
    local rows, e = self.t:query(CATALOG_SQL, d.table, d.schema or null)
    if not rows then return nil, e end
    if #rows == 0 then
        return fail("db", "repository: table " .. d.what .. " does not exist"
                    .. (d.schema and "" or " on the search_path"), { sqlstate = "42P01" })
    end
    c, e = build(d, rows)
    if not c then return nil, e end
    d._by_db[self.db] = c
    self.c = c
    return c
end

local function ready(self)
    if self.refused then return nil, self.refused end
    return self:_catalog()
end

local function need_uow(self, what)
    if not self.uow then
        error("repository " .. self.d.what .. ": " .. what .. " needs a unit of work "
              .. "(uow:repo(description)); this repository only reads", 3)
    end
end

local function check_id(self, c, id)
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

-- ---- query building -----------------------------------------------------------------------

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

-- a row read with rows (its NULL columns are absent, so they read as nil) -> an entity
local function map_row(d, row)
    local from = d.from_row
    if from then return from(row) end
    return row
end

-- the rows become the items in place
local function map_rows(d, rows, skip_total)
    local from = d.from_row
    if not from and not skip_total then return rows end
    for i = 1, #rows do
        local row = rows[i]
        if skip_total then row.__qx_total = nil end
        if from then rows[i] = from(row) end
    end
    return rows
end

-- ---- reads --------------------------------------------------------------------------------

local GET_OPTS = { include_deleted = true, for_update = true }

-- get(id[, { include_deleted, for_update }]) -> entity | nil, err (not_found)
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

-- exists(id[, { include_deleted }]) -> boolean | nil, err
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

-- count{ filters, where, include_deleted } -> n | nil, err
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

-- list{ filters, where, sort, page = 1, page_size, include_deleted, with_total = true }
--   -> { items, page, page_size, total, pages, has_next } | nil, err
-- One statement returns the page and the total, from one snapshot. with_total = false skips
-- the count (total, pages are nil; has_next is still right).
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

-- search(spec[, opts]) -> like list, for a specification (and whatever filters opts has)
function Repo:search(spec, opts)
    if spec == nil then error("search: expected a specification", 2) end
    opts = check_opts(opts, LIST_OPTS, "search")
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.where = opts.where ~= nil and S.and_(spec, opts.where) or spec
    return self:list(o)
end

-- ---- keyset pages -------------------------------------------------------------------------

-- the keys of a database's cursor_key setting, checked once per setting value
local setting_keys = setmetatable({}, { __mode = "k" })

local function cursor_keys(self)
    local keys = self.d.cursor_keys
    if keys then return keys end
    local configured = self.db.settings and self.db.settings.cursor_key
    local known = setting_keys[self.db]
    if known and known[1] == configured then return known[2] end
    if configured == nil then
        error("repository " .. self.d.what .. ": keyset paging needs a cursor key to sign "
              .. "cursors: set QX_CURSOR_KEY (or cursor_key in qx.connect or the description)", 3)
    end
    local why
    keys, why = cursor.keys(configured)
    if not keys then error("repository " .. self.d.what .. ": cursor_key setting: " .. why, 3) end
    setting_keys[self.db] = { configured, keys }
    return keys
end

-- the text of after_sql, given the placeholders of the non-NULL values
local function after_text(c, keys, vals, ph)
    local n = #keys
    local same_dir, all_notnull = true, true
    for i = 1, n do
        local v = vals[i]
        if keys[i].desc ~= keys[1].desc then same_dir = false end
        if v == null or not c.columns[keys[i].field].notnull then all_notnull = false end
    end
    if same_dir and all_notnull then -- a row comparison, which an index can serve
        local cols = {}
        for i = 1, n do cols[i] = c.columns[keys[i].field].qname end
        return "(" .. concat(cols, ", ") .. ") " .. (keys[1].desc and "<" or ">")
               .. " (" .. concat(ph, ", ") .. ")"
    end
    local terms, eqs = {}, {}
    for i = 1, n do
        local col = c.columns[keys[i].field]
        local cn, v, after = col.qname, vals[i], nil
        if keys[i].desc then
            if v == null then after = cn .. " IS NOT NULL" else after = cn .. " < " .. ph[i] end
        elseif v ~= null then
            after = col.notnull and (cn .. " > " .. ph[i])
                    or ("(" .. cn .. " > " .. ph[i] .. " OR " .. cn .. " IS NULL)")
        end
        if after then
            local t = {}
            for j = 1, #eqs do t[j] = eqs[j] end
            t[#t + 1] = after
            terms[#terms + 1] = "(" .. concat(t, " AND ") .. ")"
        end
        eqs[#eqs + 1] = v == null and (cn .. " IS NULL") or (cn .. " = " .. ph[i])
    end
    if #terms == 0 then return "FALSE" end
    return "(" .. concat(terms, " OR ") .. ")"
end

-- The rows after a cursor position in the order of `keys` (mixed directions, NULLs sorting
-- last ascending and first descending, the primary key breaking ties).
-- The plan keeps the text per pattern of NULL values (the second result): the parameters are
-- numbered the same way whenever the listing before it is the same.
local function after_sql(c, q, keys, vals, plan)
    local n = #keys
    local ph = {}
    local nulls, bit = 0, 1
    for i = 1, n do
        local v = vals[i]
        if v ~= null then ph[i] = q:param(v) else nulls = nulls + bit end
        bit = bit * 2
    end
    local text = plan.after[nulls]
    if text == nil then
        text = after_text(c, keys, vals, ph)
        plan.after[nulls] = text
    end
    return text, nulls
end

local TYPE_TAG = { string = "s", number = "n", boolean = "b", table = "t", userdata = "u" }

-- what a cursor is bound to: the table, the order, the filters with their values. The part
-- before the values depends only on the listing's shape (see listing_plan).
local function context_prefix(c, keys, w)
    local parts = { c.what, "" }
    for i, k in ipairs(keys) do parts[i + 2] = k.field .. (k.desc and ":d" or ":a") end
    parts[#parts + 1] = w
    return concat(parts, "\n")
end

local function tagged(v)
    local t = type(v)
    if t == "string" then return "s" .. #v .. ":" .. v end
    local s = v == null and "" or (t == "number" and S.scalar_text(v))
              or (t == "table" and "") or tostring(v)
    if t == "table" then
        local ok, json = pcall(require("cjson").encode, v)
        s = ok and json or tostring(v)
    end
    return (TYPE_TAG[t] or sub(t, 1, 1)) .. #s .. ":" .. s
end

local function listing_context(prefix, q)
    local n, params = q.n, q.params
    if n == 0 then return prefix end
    if n == 1 then return prefix .. "\n" .. tagged(params[1]) end
    if n == 2 then return prefix .. "\n" .. tagged(params[1]) .. "\n" .. tagged(params[2]) end
    local parts = { prefix }
    for i = 1, n do parts[i + 1] = tagged(params[i]) end
    return concat(parts, "\n")
end

-- What a keyset page of one shape needs besides its values, made once per shape: the shape is
-- the sort (a kept keys table, see sort_of) and the WHERE text of the scope and the filters,
-- which names every field and operator and numbers the parameters. Different shapes have
-- different texts, so they never share a plan; the filters are still checked (allow-list,
-- operators, values) on every call, as the text is compiled from them each time.
local PLAN_LIMIT = 256

local function new_plan(c, keys, w)
    return { context = context_prefix(c, keys, w), after = {}, sql = {},
             head = "SELECT " .. c.select .. " FROM " .. c.qtable .. " WHERE " .. w,
             order = " ORDER BY " .. order_by(c, keys) .. " LIMIT " }
end

local function listing_plan(c, keys, w)
    local by_sort = c.page_plans[keys]
    if by_sort == nil then
        by_sort = {}
        c.page_plans[keys] = by_sort
    end
    local plan = by_sort[w]
    if plan then return plan end
    if c.nplans >= PLAN_LIMIT then -- many shapes: start again rather than grow without end
        c.page_plans = setmetatable({}, { __mode = "k" })
        c.nplans = 0
        by_sort = {}
        c.page_plans[keys] = by_sort
    end
    plan = new_plan(c, keys, w)
    by_sort[w] = plan
    c.nplans = c.nplans + 1
    return plan
end

local PAGE_OPTS = { filters = true, where = true, sort = true, limit = true, after = true,
                    include_deleted = true }

-- page{ limit, after = cursor, sort, filters, where, include_deleted }
--   -> { items, next_cursor, has_next } | nil, err (invalid for a bad cursor)
-- next_cursor is nil on the last page. A cursor only fits the listing it came from.
function Repo:page(opts)
    opts = check_opts(opts, PAGE_OPTS, "page")
    local d = self.d
    local keyring = cursor_keys(self)
    local c, e = ready(self)
    if not c then return nil, e end
    local limit = opts.limit or d.default_page_size
    if not is_int(limit, 1, d.max_page_size) then
        return fail("invalid", "limit must be an integer from 1 to " .. d.max_page_size
                    .. ", got " .. tostring(limit))
    end
    local q = new_query(self, c)
    local w = listing_where(self, c, q, opts)
    local keys, kept = sort_of(self, c, opts)
    -- a sort given otherwise than as strings gets a plan of its own, used once
    local plan = kept and listing_plan(c, keys, w) or new_plan(c, keys, w)
    local context = listing_context(plan.context, q)
    local variant, after = -1, nil
    if opts.after ~= nil then
        local vals
        vals, e = cursor.decode(keyring, context, opts.after, #keys)
        if not vals then return nil, e end
        after, variant = after_sql(c, q, keys, vals, plan)
    end
    -- the text is the same for every page of the plan with the same NULL pattern (variant)
    local limit_ph = q:param(limit + 1)
    local sql = plan.sql[variant]
    if sql == nil then
        sql = plan.head .. (after and (" AND " .. after) or "") .. plan.order .. limit_ph
        plan.sql[variant] = sql
    end
    -- one row more than the page tells whether another follows; it is not made into a table
    local rows, count = self.t:rows_upto(limit, sql, unpack(q.params, 1, q.n))
    if not rows then return nil, count end
    local out = { has_next = count > limit }
    if out.has_next then
        local last, vals = rows[limit], {}
        for i, k in ipairs(keys) do vals[i] = cursor.text(last[k.field]) end
        out.next_cursor = cursor.encode(keyring, context, vals, #keys)
    end
    out.items = map_rows(d, rows)
    return out
end

-- ---- streaming ----------------------------------------------------------------------------

local cursor_counter = setmetatable({}, { __mode = "k" })
local EACH_OPTS = { filters = true, where = true, sort = true, include_deleted = true,
                    batch_size = true }

-- each(opts, fn) -> count | nil, err
-- Calls fn(entity) for every matching row, in order, holding at most batch_size rows (default
-- 500) at a time: a server-side cursor inside the unit of work's transaction (a reader opens
-- its own). fn returning false stops early.
function Repo:each(opts, fn)
    if type(opts) == "function" and fn == nil then opts, fn = nil, opts end
    if type(fn) ~= "function" then error("each: expected a function", 2) end
    opts = check_opts(opts, EACH_OPTS, "each")
    local batch = opts.batch_size or _M.EACH_BATCH_SIZE
    if not is_int(batch, 1, MAX_BATCH_SIZE) then
        error("each: batch_size must be an integer from 1 to " .. MAX_BATCH_SIZE, 2)
    end
    if not self.uow then
        local d = self.d
        return self.db:unit_of_work(function(uow)
            local n, e = _M.bind(d, uow):each(opts, fn)
            if not n then error(e, 0) end
            return n
        end, { context = self.ctx })
    end
    local c, e = ready(self)
    if not c then return nil, e end
    local q = new_query(self, c)
    local w = listing_where(self, c, q, opts)
    local keys = sort_of(self, c, opts)
    local uow = self.uow
    local k = (cursor_counter[uow] or 0) + 1
    cursor_counter[uow] = k
    local name = "qx_each_" .. k
    local ok
    ok, e = uow:queue("DECLARE " .. name .. " NO SCROLL CURSOR FOR SELECT " .. c.select .. " FROM "
                      .. c.qtable .. " WHERE " .. w .. " ORDER BY " .. order_by(c, keys),
                      unpack(q.params, 1, q.n))
    if not ok then return nil, e end
    local fetch = "FETCH " .. batch .. " FROM " .. name
    local d, n = self.d, 0
    while true do
        local rows
        rows, e = uow:rows(fetch)
        if not rows then return nil, e end
        local got, stop = #rows, false
        for i = 1, got do
            local row = rows[i]
            rows[i] = nil -- the batch is the only thing held
            n = n + 1
            if fn(map_row(d, row)) == false then stop = true break end
        end
        if stop or got < batch then break end
    end
    uow:queue("CLOSE " .. name)
    return n
end

-- ---- writes -------------------------------------------------------------------------------

-- the entity's fields as column values (writable columns only)
local function row_of(self, c, entity)
    local to = self.d.to_row
    if to then
        local row = to(entity)
        if type(row) ~= "table" then
            error("repository " .. c.what .. ": to_row must return a table", 3)
        end
        for k in pairs(row) do
            if type(k) ~= "string" or not c.columns[k] then
                error("repository " .. c.what .. ": to_row returned '" .. tostring(k)
                      .. "', which is not a column", 3)
            end
        end
        return row
    end
    local row = {}
    local w = c.writable
    for i = 1, #w do
        local v = rawget(entity, w[i])
        if v ~= nil then row[w[i]] = v end
    end
    return row
end

-- the id: to_row's row's (when given), else the entity's own field
local function id_of(self, entity, row)
    local id = row and row[self.d.pk]
    if id == nil then id = rawget(entity, self.d.pk) end
    if id == null then id = nil end
    return id
end

local function track(self, entity)
    if is_aggregate(entity) then self.uow:track(entity) end
end

local function check_entity(entity, fname)
    if type(entity) ~= "table" then
        error(fname .. ": expected an entity table, got " .. type(entity), 3)
    end
end

-- the guard that turns "touched no row" into an error that fails the transaction (QX409 when
-- the row exists under the same scope, QX404 when it does not)
local function guarded(c, dml, q, exists_where, what)
    local m409 = q:param(what .. ": stale version (someone else saved it first)")
    local m404 = q:param(what .. " not found")
    return "WITH w AS (" .. dml .. " RETURNING 1) SELECT CASE WHEN (SELECT count(*) FROM w) > 0 "
           .. "THEN 1 WHEN EXISTS (SELECT 1 FROM " .. c.qtable .. " WHERE " .. exists_where
           .. ") THEN qx_raise('QX409', " .. m409 .. ") ELSE qx_raise('QX404', " .. m404
           .. ") END AS ok"
end

local function need_raise(c)
    if c.has_raise then return true end
    return fail("invalid", "repository " .. c.what .. ": this needs qx_raise(): run "
                .. "qx.migrate(db) (step 2)")
end

local ADD_OPTS = {}

-- add(entity) -> entity | nil, err
-- Queued in the unit of work's pipeline (a duplicate key fails the unit of work with
-- "conflict"); stamps created_at (server time), created_by, tenant_id and version = 1, and
-- tracks the entity so its events reach the outbox. An entity without an id gets a UUID v7 (a
-- uuid key) or the database's default, read back at once (any other key).
function Repo:add(entity, opts)
    need_uow(self, "add")
    check_entity(entity, "add")
    check_opts(opts, ADD_OPTS, "add")
    local c, e = ready(self)
    if not c then return nil, e end
    local d = self.d
    local row = row_of(self, c, entity)
    local id = id_of(self, entity, row)
    if id == nil and c.pk_col.uuid then id = core.uuid() end
    if id ~= nil then
        local ok
        ok, e = check_id(self, c, id)
        if not ok then return nil, e end
    end
    local tenant
    if d.tenanted then
        local own = rawget(entity, "tenant_id")
        if own == null then own = nil end
        tenant = self.tenant
        if tenant == nil then
            tenant = own
        elseif own ~= nil and own ~= tenant then
            return fail("invalid", c.what .. ": the entity belongs to another tenant")
        end
    end
    local q = new_query(self, c)
    local cols, vals = {}, {}
    local function put(name, v)
        cols[#cols + 1] = c.columns[name].qname
        vals[#vals + 1] = v
    end
    if id ~= nil and not c.pk_col.generated then put(d.pk, q:param(id)) end
    local w = c.writable
    for i = 1, #w do
        local v = row[w[i]]
        if v ~= nil then put(w[i], q:param(v)) end
    end
    if c.has.created_at then put("created_at", "now()") end
    if c.has.created_by and self.actor then put("created_by", q:param(self.actor)) end
    if c.has.version then put("version", "1") end
    if c.has.tenant_id and tenant ~= nil then put("tenant_id", q:param(tenant)) end
    local sql = "INSERT INTO " .. c.qtable .. " (" .. concat(cols, ", ") .. ") VALUES ("
                .. concat(vals, ", ") .. ")"
    if id == nil or c.pk_col.generated then
        local rows
        rows, e = self.uow:query(sql .. " RETURNING " .. c.pkq .. " AS id", unpack(q.params, 1, q.n))
        if not rows then return nil, e end
        id = rows[1].id
    else
        local ok
        ok, e = self.uow:queue(sql, unpack(q.params, 1, q.n))
        if not ok then return nil, e end
    end
    rawset(entity, d.pk, id)
    if c.has.version then rawset(entity, "version", 1) end
    if c.has.tenant_id and tenant ~= nil then rawset(entity, "tenant_id", tenant) end
    if c.has.created_by and self.actor then rawset(entity, "created_by", self.actor) end
    track(self, entity)
    return entity
end

local SAVE_OPTS = { defer = true }

-- save(entity[, { defer = false }]) -> entity | nil, err
-- UPDATE ... WHERE id = $ AND version = $ (and the tenant, and not deleted): bumps version,
-- stamps updated_at/updated_by, writes every writable column (nil -> NULL). A stale version is
-- nil, { code = "conflict", expected_version, actual_version }; a missing row (or another
-- tenant's, or a deleted one) is nil, { code = "not_found" }. The unit of work goes on either
-- way. With defer = true the statement is queued instead (no round trip of its own): a stale
-- version or missing row then fails the unit of work at its next flush or commit.
function Repo:save(entity, opts)
    need_uow(self, "save")
    check_entity(entity, "save")
    opts = check_opts(opts, SAVE_OPTS, "save")
    local c, e = ready(self)
    if not c then return nil, e end
    local d = self.d
    -- with the default mapping the row is the entity's own fields: they are read from it
    -- directly (rawget, as row_of does), without a copy
    local row = d.to_row and row_of(self, c, entity)
    local id = id_of(self, entity, row)
    if id == nil then return fail("invalid", c.what .. ": cannot save an entity without an id") end
    local ok
    ok, e = check_id(self, c, id)
    if not ok then return nil, e end
    local version = rawget(entity, "version")
    if c.has.version and not is_int(version, 0, 2147483647) then
        return fail("invalid", c.what .. " " .. tostring(id) .. ": the entity has no version "
                    .. "(load it with get, or add it first)")
    end
    if opts.defer then
        ok, e = need_raise(c)
        if not ok then return nil, e end
    end
    -- The statement per variant (tenant or not, deferred or not) is built once; its parameters,
    -- in the order the text numbers them: the writable columns, updated_by, the id, the tenant,
    -- the version, and for a deferred save the guard's two messages.
    local defer = opts.defer
    local key = (self.tenant and 2 or 0) + (defer and 1 or 0)
    local sql = c.save_sql[key]
    local w = c.writable
    local params, n
    if not sql then
        local q = new_query(self, c)
        row = row or row_of(self, c, entity)
        local sets = {}
        for i = 1, #w do
            local v = row[w[i]]
            sets[i] = c.columns[w[i]].qname .. " = " .. q:param(v == nil and null or v)
        end
        local actor = c.has.updated_by and q:param(self.actor)
        local where = { c.pkq .. " = " .. q:param(id) }
        if self.tenant ~= nil then
            where[#where + 1] = c.columns.tenant_id.qname .. " = " .. q:param(self.tenant)
        end
        if d.soft_delete then where[#where + 1] = c.columns.deleted_at.qname .. " IS NULL" end
        local exists_where = concat(where, " AND ")
        if c.has.version then where[#where + 1] = '"version" = ' .. q:param(version) end
        if c.has.version then sets[#sets + 1] = '"version" = "version" + 1' end
        if c.has.updated_at then sets[#sets + 1] = '"updated_at" = now()' end
        if c.has.updated_by then sets[#sets + 1] = '"updated_by" = ' .. actor end
        local dml = "UPDATE " .. c.qtable .. " SET " .. concat(sets, ", ") .. " WHERE "
                    .. concat(where, " AND ")
        if defer then
            sql = guarded(c, dml, q, exists_where, c.what .. " " .. tostring(id))
        else
            local ret = { c.pkq }
            if c.has.version then ret[#ret + 1] = '"version"' end
            if c.has.updated_at then ret[#ret + 1] = '"updated_at"' end
            sql = dml .. " RETURNING " .. concat(ret, ", ")
        end
        c.save_sql[key] = sql
        params, n = q.params, q.n
    else
        -- the parameters go out through unpack before anything else runs, so one array per
        -- catalog serves every call
        params, n = c.save_params, #w
        local from = row or entity -- to_row's row, or the entity's own fields
        for i = 1, n do
            local v = rawget(from, w[i])
            if v == nil then v = null end
            params[i] = v
        end
        if c.has.updated_by then
            n = n + 1
            params[n] = self.actor == nil and null or self.actor
        end
        n = n + 1
        params[n] = id
        if self.tenant ~= nil then
            n = n + 1
            params[n] = self.tenant
        end
        if c.has.version then
            n = n + 1
            params[n] = version
        end
        if defer then -- the guard's two messages, as guarded() adds them
            local what = c.what .. " " .. tostring(id)
            params[n + 1] = what .. ": stale version (someone else saved it first)"
            params[n + 2] = what .. " not found"
            n = n + 2
        end
    end
    if defer then
        ok, e = self.uow:queue(sql, unpack(params, 1, n))
        if not ok then return nil, e end
        if c.has.version then rawset(entity, "version", version + 1) end
        if c.has.updated_by then rawset(entity, "updated_by", self.actor) end
        track(self, entity)
        return entity
    end
    local rows
    rows, e = self.uow:query(sql, unpack(params, 1, n))
    if not rows then return nil, e end
    local r = rows[1]
    if r == nil then
        -- why nothing was updated: a stale version, or no such row for this tenant
        local pq = new_query(self, c)
        local pw = scope(self, c, pq, false, { c.pkq .. " = " .. pq:param(id) })
        local found
        found, e = self.uow:query("SELECT " .. (c.has.version and '"version"' or "1")
                                  .. " AS v FROM " .. c.qtable .. " WHERE " .. concat(pw, " AND "),
                                  unpack(pq.params, 1, pq.n))
        if not found then return nil, e end
        if found[1] == nil then
            return fail("not_found", c.what .. " " .. tostring(id) .. " not found", { id = id })
        end
        return fail("conflict", c.what .. " " .. tostring(id) .. ": stale version " ..
                    tostring(version) .. " (now " .. tostring(found[1].v) .. ")",
                    { id = id, expected_version = version, actual_version = found[1].v })
    end
    if c.has.version then rawset(entity, "version", r.version) end
    if c.has.updated_at then rawset(entity, "updated_at", r.updated_at) end
    if c.has.updated_by then rawset(entity, "updated_by", self.actor) end
    track(self, entity)
    return entity
end

local DELETE_OPTS = { missing_ok = true }

-- the id and expected version of an id or an entity
local function target_of(self, c, x, fname)
    if type(x) == "table" then
        local id = id_of(self, x, self.d.to_row and self.d.to_row(x))
        local v = rawget(x, "version")
        if c.has.version and not is_int(v, 0, 2147483647) then
            return nil, nil, nil, qx_error.new("invalid", c.what .. " " .. tostring(id)
                                               .. ": the entity has no version")
        end
        return id, c.has.version and v or nil, x
    end
    return x, nil, nil
end

local function queue_change(self, c, q, dml, exists_where, id, opts)
    local sql = dml
    if not opts.missing_ok then
        local ok, e = need_raise(c)
        if not ok then return nil, e end
        sql = guarded(c, dml, q, exists_where, c.what .. " " .. tostring(id))
    end
    return self.uow:queue(sql, unpack(q.params, 1, q.n))
end

-- the WHERE of a change to one row: id, tenant, (live), and the version when given
local function change_where(self, c, q, id, version, live)
    local where = { c.pkq .. " = " .. q:param(id) }
    if self.tenant ~= nil then
        where[#where + 1] = c.columns.tenant_id.qname .. " = " .. q:param(self.tenant)
    end
    if live == true then where[#where + 1] = c.columns.deleted_at.qname .. " IS NULL" end
    if live == false then where[#where + 1] = c.columns.deleted_at.qname .. " IS NOT NULL" end
    local exists_where = concat(where, " AND ")
    if version ~= nil then where[#where + 1] = '"version" = ' .. q:param(version) end
    return concat(where, " AND "), exists_where
end

-- soft_delete(id_or_entity[, { missing_ok }]) -> true | nil, err
-- Queued: stamps deleted_at/deleted_by and bumps version. Given an entity, its version is
-- checked and it is tracked (so an event it recorded is published). A row that is missing,
-- already deleted or another tenant's fails the unit of work with not_found (a stale version
-- with conflict) unless missing_ok.
function Repo:soft_delete(x, opts)
    need_uow(self, "soft_delete")
    if not self.d.soft_delete then
        error("soft_delete: repository " .. self.d.what .. " has no soft_delete = true", 2)
    end
    opts = check_opts(opts, DELETE_OPTS, "soft_delete")
    local c, e = ready(self)
    if not c then return nil, e end
    local id, version, entity, bad = target_of(self, c, x, "soft_delete")
    if bad then return nil, bad end
    local ok
    ok, e = check_id(self, c, id)
    if not ok then return nil, e end
    local q = new_query(self, c)
    local sets = { c.columns.deleted_at.qname .. " = now()" }
    if c.has.deleted_by then sets[#sets + 1] = '"deleted_by" = ' .. q:param(self.actor) end
    if c.has.version then sets[#sets + 1] = '"version" = "version" + 1' end
    local where, exists_where = change_where(self, c, q, id, version, true)
    ok, e = queue_change(self, c, q, "UPDATE " .. c.qtable .. " SET " .. concat(sets, ", ")
                         .. " WHERE " .. where, exists_where, id, opts)
    if not ok then return nil, e end
    if entity then
        if version ~= nil then rawset(entity, "version", version + 1) end
        track(self, entity)
    end
    return true
end

-- restore(id[, { missing_ok }]) -> true | nil, err: undoes a soft delete (queued)
function Repo:restore(id, opts)
    need_uow(self, "restore")
    if not self.d.soft_delete then
        error("restore: repository " .. self.d.what .. " has no soft_delete = true", 2)
    end
    opts = check_opts(opts, DELETE_OPTS, "restore")
    local c, e = ready(self)
    if not c then return nil, e end
    local ok
    ok, e = check_id(self, c, id)
    if not ok then return nil, e end
    local q = new_query(self, c)
    local sets = { c.columns.deleted_at.qname .. " = NULL" }
    if c.has.deleted_by then sets[#sets + 1] = '"deleted_by" = NULL' end
    if c.has.version then sets[#sets + 1] = '"version" = "version" + 1' end
    local where, exists_where = change_where(self, c, q, id, nil, false)
    return queue_change(self, c, q, "UPDATE " .. c.qtable .. " SET " .. concat(sets, ", ")
                        .. " WHERE " .. where, exists_where, id, opts)
end

-- hard_delete(id_or_entity[, { missing_ok }]) -> true | nil, err
-- Queued DELETE (also of soft-deleted rows); like soft_delete for versions, tenants, missing
-- rows and tracking.
function Repo:hard_delete(x, opts)
    need_uow(self, "hard_delete")
    opts = check_opts(opts, DELETE_OPTS, "hard_delete")
    local c, e = ready(self)
    if not c then return nil, e end
    local id, version, entity, bad = target_of(self, c, x, "hard_delete")
    if bad then return nil, bad end
    local ok
    ok, e = check_id(self, c, id)
    if not ok then return nil, e end
    local q = new_query(self, c)
    local where, exists_where = change_where(self, c, q, id, version, nil)
    ok, e = queue_change(self, c, q, "DELETE FROM " .. c.qtable .. " WHERE " .. where,
                         exists_where, id, opts)
    if not ok then return nil, e end
    if entity then track(self, entity) end
    return true
end

-- the description this repository was bound from
function Repo:description()
    return self.d
end

return _M

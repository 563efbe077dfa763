--- Internal to qx.store.repository: the columns of a described table, read from the catalog
-- once per database and table, and everything derived from them that statements reuse.
local core = require "qx.core"
local base = require "qx.store.repository.base"

local ipairs = ipairs
local setmetatable = setmetatable
local concat = table.concat
local null = core.null
local quote, fail = base.quote, base.fail
local Description, Repo = base.Description, base.Repo

local TEXT_TYPES = { text = true, ["character varying"] = true, character = true,
                     citext = true, name = true }
local UNSORTABLE = { json = true, jsonb = true, bytea = true }

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
                inserts = {}, ninserts = 0, -- Repo:add's texts (writes.lua)
                sorts = {}, multi_sorts = {}, nsorts = 0,
                page_plans = setmetatable({}, { __mode = "k" }), nplans = 0,
                columns = {}, order = {},
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

--- Forgets the columns read from the catalog (on every database), e.g. after the table was
-- altered while the process runs; the next use reads them again.
function Description:reset()
    self._by_db = setmetatable({}, { __mode = "k" })
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

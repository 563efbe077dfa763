--- Internal to qx.store.repository: qx.repository{...}, a table described once (options checked,
-- no I/O). See docs/repository.md for the options.
local cursor = require "qx.store.repository.cursor"
local base = require "qx.store.repository.base"
local query = require "qx.store.repository.query"
local options = require "qx.options"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local rawget = rawget
local setmetatable = setmetatable
local pcall = pcall
local concat = table.concat
local find = string.find
local is_int = base.is_int
local parse_sort = query.parse_sort
--- Options of qx.repository (docs/repository.md).
---@class qx.RepositoryOptions
---@field table string the table (required)
---@field schema string? else the first match on the search_path
---@field entity table? class of the entities (setmetatable(row, entity), or entity.from_row)
---@field from_row (fun(row: table): table)? takes precedence over the entity's
---@field to_row (fun(entity: table): table)? takes precedence over the entity's
---@field filterable string[]? columns filters and where may name
---@field sortable string[]? columns sort may name (the primary key always is)
---@field default_sort table? e.g. { { "created_at", "desc" } } (default: the primary key)
---@field tenanted boolean? every read and write limited to context.tenant_id (false)
---@field allow_cross_tenant boolean? with tenanted: no tenant_id reads across tenants (false)
---@field soft_delete boolean? soft_delete stamps deleted_at; reads skip deleted rows (false)
---@field default_page_size integer? (20)
---@field max_page_size integer? (100)
---@field cursor_key string|string[]? keyset cursor key(s) (default: the db's cursor_key)
---@field primary_key string? ("id")
---@field readonly string[]? columns never written (filled by the database)
---@field extra_fields string? "refuse" (default) or "ignore" entity fields without a column
local Description = base.Description
local MAX_BATCH_SIZE = base.MAX_BATCH_SIZE

local _M = {}

local OPTIONS = {
    table = "string", schema = "string", entity = "table", from_row = "function",
    to_row = "function", filterable = "table", sortable = "table", default_sort = "table",
    tenanted = "boolean", allow_cross_tenant = "boolean", soft_delete = "boolean",
    default_page_size = "number", max_page_size = "number", cursor_key = "any",
    primary_key = "string", readonly = "table", extra_fields = "string",
}

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

--- A table described once (qx.repository). Raises on a bad description; no I/O.
---@param opts qx.RepositoryOptions
---@return qx.RepositoryDescription
function _M.new(opts)
    if type(opts) ~= "table" then error("qx.repository: expected a table of options", 2) end
    options.check(opts, OPTIONS, "qx.repository")
    for k, v in pairs(opts) do
        local want = OPTIONS[k]
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
        default_page_size = opts.default_page_size or base.DEFAULT_PAGE_SIZE,
        max_page_size = opts.max_page_size or base.MAX_PAGE_SIZE,
        _by_db = setmetatable({}, { __mode = "k" }),
    }, Description)
    if opts.extra_fields ~= nil and opts.extra_fields ~= "refuse" and opts.extra_fields ~= "ignore"
    then
        error("qx.repository: extra_fields must be \"refuse\" (the default) or \"ignore\"", 2)
    end
    d.ignore_extra_fields = opts.extra_fields == "ignore"
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

return _M

--- DDL fragments for users' own migrations: the id and audit columns a repository manages.
--
--   local sql = "CREATE TABLE users (\n  " .. qx.schema.id_column() .. ",\n"
--            .. "  email text NOT NULL,\n  " .. qx.schema.audit_columns() .. "\n)"
--
-- The column names and types are qx-db's (created_at, updated_at, created_by, updated_by,
-- version, tenant_id, deleted_at, deleted_by), so a table made for a Python qx service works
-- here too. id_column's default needs qx.migrate (step 2 defines qx_uuid_v7()); qx.uuid()
-- makes the same kind of id in Lua.
local type = type
local error = error
local concat = table.concat
local find = string.find
local gsub = string.gsub

local _M = { _VERSION = "0.1.0" }

_M.AUDIT_COLUMNS = { "created_at", "updated_at", "created_by", "updated_by", "version",
                     "tenant_id", "deleted_at", "deleted_by" }

local ACTOR_TYPES = { text = true, uuid = true, ["varchar(255)"] = true }

local function quote(name)
    if type(name) ~= "string" or name == "" then
        error("qx.schema: a column name must be a non-empty string", 3)
    end
    if find(name, "^[a-z_][a-z0-9_]*$") then return name end
    return '"' .. gsub(name, '"', '""') .. '"'
end

--- A uuid primary key column definition: 'id uuid PRIMARY KEY DEFAULT qx_uuid_v7()'.
---@param name string|nil the column name ("id")
---@return string sql
function _M.id_column(name)
    return quote(name or "id") .. " uuid PRIMARY KEY DEFAULT qx_uuid_v7()"
end

--- The audit column definitions, comma-separated, one per line. tenanted = false leaves
-- tenant_id out, soft_delete = false leaves deleted_at and deleted_by out; actor_type is the
-- type of the *_by columns ("text", "varchar(255)" or "uuid").
---@param opts table|nil { tenanted = true, soft_delete = true, actor_type = "text" }
---@return string sql
function _M.audit_columns(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.schema.audit_columns: options must be a table", 2)
    end
    opts = require("qx.options").check(opts, { "tenanted", "soft_delete", "actor_type" },
                                       "qx.schema.audit_columns")
    local actor = opts.actor_type or "text"
    if not ACTOR_TYPES[actor] then
        error("qx.schema.audit_columns: actor_type must be text, varchar(255) or uuid", 2)
    end
    local cols = {
        "created_at timestamptz NOT NULL DEFAULT now()",
        "updated_at timestamptz",
        "created_by " .. actor,
        "updated_by " .. actor,
        "version    integer NOT NULL DEFAULT 1",
    }
    if opts.tenanted ~= false then cols[#cols + 1] = "tenant_id  uuid" end
    if opts.soft_delete ~= false then
        cols[#cols + 1] = "deleted_at timestamptz"
        cols[#cols + 1] = "deleted_by " .. actor
    end
    return concat(cols, ",\n")
end

return _M

--- Blue/green versions of a projection. A version has its own checkpoint row (name@vN) and its
-- own tables (<table>_v<N>); readers read views named <table> that point at the live version's
-- tables. A new version builds beside the live one; switch repoints every view in one
-- transaction once it has caught up; drop removes a version that is not live. The registry is
-- qx_projection_versions. See docs/projections.md, "Versions".
local qx_error = require "qx.error"
local options = require "qx.options"
local core = require "qx.core"

local type = type
local getmetatable = getmetatable
local ipairs = ipairs
local error = error
local tostring = tostring
local floor = math.floor
local min = math.min
local fmt = string.format
local concat = table.concat
local sort = table.sort
local null = core.null
local clock = core.clock

local _M = {}

local MAX_VERSION = 1000000
local MAX_KEY = 255
local MAX_IDENT = 63


-- One transaction per projection name changes its registry at a time.
local LOCK_NAME = [[
SELECT pg_advisory_xact_lock(hashtext('qx_projection_versions'), hashtext($1)) IS NULL AS x]]

local ROWS = [[
SELECT version, checkpoint_name, tables, live FROM qx_projection_versions
WHERE projection_name = $1 ORDER BY version FOR UPDATE]]

local REGISTER = [[
INSERT INTO qx_projection_versions
    (projection_name, version, checkpoint_name, tables, event_names, aggregate_types, live)
VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb, $7)]]

local DEFINE = [[
UPDATE qx_projection_versions SET event_names = $3::jsonb, aggregate_types = $4::jsonb
WHERE projection_name = $1 AND version = $2
  AND (event_names, aggregate_types) IS DISTINCT FROM ($3::jsonb, $4::jsonb)]]

local CHECKPOINT = [[
INSERT INTO qx_projection_checkpoints (projection_name) VALUES ($1)
ON CONFLICT (projection_name) DO NOTHING]]

local LOCK_CHECKPOINT = [[
SELECT 1 AS one FROM qx_projection_checkpoints WHERE projection_name = $1 FOR UPDATE]]

-- The events with a handler of version v after its checkpoint c, from what the registry keeps:
-- one index range of qx_aggregate_events_name per event name (a scan of every event after the
-- checkpoint would read all the others too).
-- per event name, one index range of the hot table and one of the archive
local BEHIND_IN = [[
              SELECT count(*) FROM %s e
              WHERE e.event_name = en.name
                AND (e.tx_id, e.global_position) > (c.tx_id, c.global_position)
                AND (v.aggregate_types IS NULL
                     OR e.aggregate_type IN (SELECT jsonb_array_elements_text(v.aggregate_types)))]]
local BEHIND_OF = [[
coalesce((SELECT sum(k.n) FROM jsonb_array_elements_text(v.event_names) AS en(name)
          CROSS JOIN LATERAL (
              SELECT (]] .. BEHIND_IN:format("qx_aggregate_events") .. [[)
                   + (]] .. BEHIND_IN:format("qx_aggregate_events_archive") .. [[) AS n
          ) k), 0)::bigint]]

local BEHIND = "SELECT " .. BEHIND_OF .. [[ AS n
FROM qx_projection_versions v
JOIN qx_projection_checkpoints c ON c.projection_name = v.checkpoint_name
WHERE v.projection_name = $1 AND v.version = $2]]

local UNLIVE = [[
UPDATE qx_projection_versions SET live = false WHERE projection_name = $1 AND live]]

local LIVE = [[
UPDATE qx_projection_versions SET live = true, switched_at = now()
WHERE projection_name = $1 AND version = $2]]

local FORGET = [[
DELETE FROM qx_projection_versions WHERE projection_name = $1 AND version = $2]]

local FORGET_CHECKPOINT = [[
DELETE FROM qx_projection_checkpoints WHERE projection_name = $1]]

-- a relation's kind and columns (name and type, in order); no row when there is none
local RELATION = [[
SELECT c.relkind::text AS kind,
       coalesce((SELECT jsonb_agg(jsonb_build_array(a.attname::text,
                                                    format_type(a.atttypid, a.atttypmod))
                                  ORDER BY a.attnum)
                 FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                '[]'::jsonb) AS columns
FROM pg_class c WHERE c.oid = to_regclass($1)]]

local LIST = [[
SELECT v.projection_name AS name, v.version, v.live, v.tables, v.checkpoint_name,
       to_char(v.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at,
       to_char(v.switched_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS switched_at,
       c.events_applied, CASE WHEN c.projection_name IS NOT NULL THEN ]] .. BEHIND_OF .. [[ END
           AS behind,
       to_char(c.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS updated_at
FROM qx_projection_versions v
LEFT JOIN qx_projection_checkpoints c ON c.projection_name = v.checkpoint_name
WHERE $1::text IS NULL OR v.projection_name = $1
ORDER BY v.projection_name, v.version]]


-- A table name the read model declares: lower-case letters, digits and _, optionally after a
-- schema name of the same kind. Returns schema-or-nil, table | nil.
local function split_table(t)
    if type(t) ~= "string" then
        return nil
    end
    local schema, tbl = t:match("^([a-z_][a-z0-9_]*)%.([a-z_][a-z0-9_]*)$")
    if not schema then
        tbl = t:match("^[a-z_][a-z0-9_]*$")
    end
    return schema, tbl
end


-- The version options of qx.projection -> { version, key, tables, setup } ({} without a
-- version) | nil, message.
function _M._parse(opts)
    local v = opts.version
    if v == nil then
        if opts.tables ~= nil or opts.setup ~= nil then
            return nil, "tables and setup belong to a versioned projection (give version)"
        end
        if opts.name:find("@v%d+$") then
            return nil, "a name ending in @v<N> is a version's checkpoint: give version instead"
        end
        return {}
    end
    if type(v) ~= "number" or v ~= floor(v) or v < 1 or v > MAX_VERSION then
        return nil, "version must be an integer from 1 to " .. MAX_VERSION
    end
    local key = opts.name .. "@v" .. fmt("%d", v)
    if #key > MAX_KEY then
        return nil, fmt("name must be at most %d bytes for version %d", MAX_KEY - #key
                        + #opts.name, v)
    end
    local suffix = fmt("_v%d", v)
    local tables, seen = {}, {}
    if opts.tables ~= nil and type(opts.tables) ~= "table" then
        return nil, "tables must be a list of table names"
    end
    for i, t in ipairs(opts.tables or {}) do
        local _, tbl = split_table(t)
        if not tbl then
            return nil, "tables: " .. (type(t) == "string" and fmt("%q", t) or type(t))
                .. " is not a table name (lower-case letters, digits and _, schema.table allowed)"
        end
        if #tbl + #suffix > MAX_IDENT then
            return nil, fmt("tables: %s%s is longer than %d bytes", tbl, suffix, MAX_IDENT)
        end
        if seen[t] then
            return nil, "tables: " .. t .. " is given twice"
        end
        seen[t] = true
        tables[i] = t
    end
    if opts.tables ~= nil and #tables ~= #opts.tables then
        return nil, "tables must be a list of table names"
    end
    if opts.setup ~= nil and type(opts.setup) ~= "function" then
        return nil, "setup must be a function(uow, p)"
    end
    return { version = v, key = key, tables = tables, setup = opts.setup }
end


-- the table of version `version` behind the view `t`
local function versioned_table(t, version)
    return fmt("%s_v%d", t, version)
end


local function same_set(a, b)
    if #a ~= #b then
        return false
    end
    local x, y = {}, {}
    for i = 1, #a do x[i] = a[i] end
    for i = 1, #b do y[i] = b[i] end
    sort(x)
    sort(y)
    for i = 1, #x do
        if x[i] ~= y[i] then
            return false
        end
    end
    return true
end


local function must(rows, e)
    if not rows then
        error(e, 0)
    end
    return rows
end


-- Points the views of `tables` at version `version`'s tables and drops the views of `old`
-- that the new version has not; one transaction (the caller's). A view keeps its identity
-- (CREATE OR REPLACE) when the new table's columns start with the view's; else it is made
-- anew, which readers that name their columns do not notice either.
local function point_views(uow, tables, version, old)
    local keep = {}
    for _, t in ipairs(tables) do
        keep[t] = true
        local target = versioned_table(t, version)
        local new = must(uow:query(RELATION, target))[1]
        if not new then
            error(qx_error.new("invalid", fmt("table %s does not exist (create it in setup)",
                                              target)), 0)
        end
        local view = must(uow:query(RELATION, t))[1]
        local replace = true
        if view then
            if view.kind ~= "v" then
                error(qx_error.new("invalid", fmt("%s is not a view (a %s relation): a versioned "
                    .. "projection's readers read through a view of that name; rename it away",
                    t, view.kind == "r" and "table" or view.kind)), 0)
            end
            for i, col in ipairs(view.columns) do
                local c = new.columns[i]
                if not c or c[1] ~= col[1] or c[2] ~= col[2] then
                    replace = false
                    break
                end
            end
            if not replace then
                must(uow:query("DROP VIEW " .. t))
            end
        end
        must(uow:query((replace and "CREATE OR REPLACE VIEW " or "CREATE VIEW ") .. t
                       .. " AS SELECT * FROM " .. target))
    end
    for _, t in ipairs(old or {}) do
        if not keep[t] then
            must(uow:query("DROP VIEW IF EXISTS " .. t))
        end
    end
end


local function find(rows, version)
    local target, live
    for _, r in ipairs(rows) do
        if r.version == version then target = r end
        if r.live then live = r end
    end
    return target, live
end


local function json_or_null(list)
    return list or null
end


-- Registers the version of projection p when it is not (the first version of a name becomes
-- live and gets its views), creates its checkpoint row and runs setup(uow, p) on the first
-- registration -> true | nil, err (invalid when the stored version has other tables).
function _M._register(p)
    return p.db:unit_of_work(function(uow)
        must(uow:query(LOCK_NAME, p.name))
        local rows = must(uow:query(ROWS, p.name))
        local row, live = find(rows, p.version)
        if row then
            if not same_set(row.tables, p.tables) then
                error(qx_error.new("invalid", fmt("projection %s version %d was registered with "
                    .. "tables {%s}; this definition declares {%s}", p.name, p.version,
                    concat(row.tables, ", "), concat(p.tables, ", "))), 0)
            end
            must(uow:query(DEFINE, p.name, p.version, p.types, json_or_null(p.categories)))
            must(uow:query(CHECKPOINT, p.key))
            return true
        end
        local first = live == nil
        local tables = #p.tables > 0 and p.tables or "[]"  -- an empty table encodes as {}
        must(uow:query(REGISTER, p.name, p.version, p.key, tables, p.types,
                       json_or_null(p.categories), first))
        must(uow:query(CHECKPOINT, p.key))
        if p.setup then
            p.setup(uow, p)
        end
        if first then
            point_views(uow, p.tables, p.version, nil)
        end
        return true
    end)
end


-- One attempt at the switch -> info | nil, err
local function switch_once(db, name, version, max_behind)
    local info
    local ok, e = db:unit_of_work(function(uow)
        must(uow:query(LOCK_NAME, name))
        local rows = must(uow:query(ROWS, name))
        local target, live = find(rows, version)
        if not target then
            error(qx_error.new("not_found", fmt("projection %s has no version %d", name,
                                                version)), 0)
        end
        if live == target then
            info = { version = version, behind = 0 }
            return true
        end
        -- its runner's batch in flight ends first; then nothing moves its checkpoint until COMMIT
        must(uow:query(LOCK_CHECKPOINT, target.checkpoint_name))
        local behind = must(uow:query(BEHIND, name, version))[1].n
        if behind > max_behind then
            error(qx_error.new("conflict", fmt("projection %s version %d is %d event(s) behind "
                .. "(max_behind %d): let it catch up first", name, version, behind, max_behind),
                { behind = behind }), 0)
        end
        if live then
            must(uow:query(UNLIVE, name))
        end
        must(uow:query(LIVE, name, version))
        point_views(uow, target.tables, version, live and live.tables)
        info = { version = version, previous = live and live.version, behind = behind }
        return true
    end)
    if not ok then
        return nil, e
    end
    return info
end


local SWITCH_OPTIONS = { "max_behind", "wait_seconds" }

-- The switch, tried again while the version is behind until wait_seconds pass; catch_up (when
-- given: the version's own projection) runs before each try, else it waits 50 ms for the
-- version's runner.
local function switch(db, name, version, opts, catch_up, level)
    opts = options.check(opts, SWITCH_OPTIONS, "projection switch")
    local max_behind = opts.max_behind or 0
    if type(max_behind) ~= "number" or max_behind < 0 or max_behind ~= floor(max_behind) then
        error("projection switch: max_behind must be an integer >= 0", level)
    end
    local wait = opts.wait_seconds or 0
    if type(wait) ~= "number" or wait < 0 then
        error("projection switch: wait_seconds must be a number >= 0", level)
    end
    local deadline = clock() + wait
    while true do
        if catch_up then
            local n, e = catch_up()
            if not n then
                return nil, e
            end
        end
        local info, e = switch_once(db, name, version, max_behind)
        if info or e.code ~= "conflict" or clock() >= deadline then
            return info, e
        end
        if not catch_up then
            local rows, se = db:query("SELECT pg_sleep($1::float8) IS NULL AS x",
                                      min(0.05, deadline - clock()))
            if not rows then
                return nil, se
            end
        end
    end
end


--- Makes version `version` of projection `name` live: in one transaction every view points at
-- its tables, once it is at most max_behind events behind (tried again for wait_seconds while
-- it is behind, for its runner to catch up). Needs only the database.
---@param db qx.Db
---@param name string the projection's name
---@param version integer the version to make live
---@param opts table|nil { max_behind = 0, wait_seconds = 0 }
---@return table|nil info { version, previous, behind } (previous nil when it was live already)
---@return qx.Error? err not_found (no such version), conflict (behind by more than max_behind)
function _M.switch(db, name, version, opts)
    if type(name) ~= "string" then error("projection switch: name must be a string", 2) end
    if type(version) ~= "number" or version ~= floor(version) then
        error("projection switch: version must be an integer", 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("projection switch: options must be a table", 2)
    end
    return switch(db, name, version, opts, nil, 3)
end


--- Drops version `version` of projection `name`: its tables (<table>_v<N>), its checkpoint and
-- its registry row, in one transaction. The live version is refused. Needs only the database.
---@param db qx.Db
---@param name string the projection's name
---@param version integer the version to drop
---@return table|nil info { version, tables } the tables dropped
---@return qx.Error? err not_found (no such version), invalid (it is live)
function _M.drop(db, name, version)
    if type(name) ~= "string" then error("projection drop: name must be a string", 2) end
    if type(version) ~= "number" or version ~= floor(version) then
        error("projection drop: version must be an integer", 2)
    end
    local info
    local ok, e = db:unit_of_work(function(uow)
        must(uow:query(LOCK_NAME, name))
        local rows = must(uow:query(ROWS, name))
        local target = find(rows, version)
        if not target then
            error(qx_error.new("not_found", fmt("projection %s has no version %d", name,
                                                version)), 0)
        end
        if target.live then
            error(qx_error.new("invalid", fmt("projection %s version %d is live: switch to "
                .. "another version before dropping it", name, version)), 0)
        end
        -- a runner of this version in a batch finishes it first (it holds the row)
        must(uow:query(LOCK_CHECKPOINT, target.checkpoint_name))
        local dropped = {}
        for i, t in ipairs(target.tables) do
            dropped[i] = versioned_table(t, version)
            must(uow:query("DROP TABLE IF EXISTS " .. dropped[i]))
        end
        must(uow:query(FORGET_CHECKPOINT, target.checkpoint_name))
        must(uow:query(FORGET, name, version))
        info = { version = version, tables = dropped }
        return true
    end)
    if not ok then
        return nil, e
    end
    return info
end


--- The registered versions, of one projection or of all: { name, version, live, tables,
-- events_applied, behind, created_at, switched_at, updated_at } ordered by name and version.
---@param db qx.Db
---@param name string|nil one projection's name; nil: every projection
---@return table|nil versions
---@return qx.Error? err
function _M.list(db, name)
    if name ~= nil and type(name) ~= "string" then
        error("projection list: name must be a string or nil", 2)
    end
    local rows, e = db:query(LIST, name or null)
    if not rows then
        return nil, e
    end
    local out = {}
    for i, r in ipairs(rows) do
        out[i] = {
            name = r.name, version = r.version, live = r.live, tables = r.tables,
            events_applied = r.events_applied ~= null and r.events_applied or 0,
            behind = r.behind ~= null and r.behind or 0,
            created_at = r.created_at,
            switched_at = r.switched_at ~= null and r.switched_at or nil,
            updated_at = r.updated_at ~= null and r.updated_at or nil,
        }
    end
    return out
end


-- The methods versions add to qx.Projection; ensure registers the projection's version.
function _M._methods(Projection, ensure)
    local function check(self, method)
        if getmetatable(self) ~= Projection then
            error("projection:" .. method .. ": call as p:" .. method .. "(...)", 3)
        end
        if not self.version then
            error("projection:" .. method .. ": projection " .. self.name .. " has no version", 3)
        end
    end

    --- The name of this version's table behind the view `t` (`p:table("balances")` ->
    -- "balances_v2"). Raises for a table the projection does not declare.
    ---@param t string one of the tables given to qx.projection
    ---@return string name
    function Projection:table(t)
        check(self, "table")
        for _, d in ipairs(self.tables) do
            if d == t then
                return versioned_table(t, self.version)
            end
        end
        error(fmt("projection:table: projection %s declares no table %s (tables: %s)", self.name,
                  tostring(t), concat(self.tables, ", ")), 2)
    end

    --- Makes this version live (see qx.projection.switch): every view points at its tables, in
    -- one transaction, when it is at most max_behind events behind. With wait_seconds, it
    -- catches up and tries again while new events keep it behind.
    ---@param opts table|nil { max_behind = 0, wait_seconds = 0 }
    ---@return table|nil info { version, previous, behind }
    ---@return qx.Error? err conflict when behind, not_found
    function Projection:switch(opts)
        check(self, "switch")
        if opts ~= nil and type(opts) ~= "table" then
            error("projection:switch: options must be a table", 2)
        end
        local ok, e = ensure(self)
        if not ok then
            return nil, e
        end
        local catch_up = (opts and opts.wait_seconds) and function() return self:catch_up() end
        return switch(self.db, self.name, self.version, opts, catch_up, 3)
    end

    --- Drops this version (see qx.projection.drop): refused while it is live.
    ---@return table|nil info { version, tables }
    ---@return qx.Error? err invalid when live, not_found
    function Projection:drop()
        check(self, "drop")
        return _M.drop(self.db, self.name, self.version)
    end
end


return _M

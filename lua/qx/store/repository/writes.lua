--- Internal to qx.store.repository: add, save, soft_delete, restore and hard_delete, queued in
-- (or run on) the unit of work's transaction; the entities written are tracked for the outbox.
local core = require "qx.core"
local qx_error = require "qx.error"
local aggregate = require "qx.model.aggregate"
local base = require "qx.store.repository.base"
local query = require "qx.store.repository.query"

local type = type
local pairs = pairs
local error = error
local tostring = tostring
local rawget = rawget
local rawset = rawset
local unpack = table.unpack or unpack
local concat = table.concat
local sort = table.sort
local null = core.null
local is_aggregate = aggregate.is_aggregate
local fail, is_int, check_opts, ready = base.fail, base.is_int, base.check_opts, base.ready
local need_uow, check_id = base.need_uow, base.check_id
local new_query, scope = query.new_query, query.scope
local Repo = base.Repo

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

-- nil | nil, err naming the entity's fields that have no column (a field dropped without a word
-- is data lost), unless the description says extra_fields = "ignore"; with to_row the row is
-- checked instead (see row_of). version is the aggregate's own and may have no column.
local function unmapped(self, c, entity)
    if self.d.to_row or self.d.ignore_extra_fields then return nil end
    local cols, extra = c.columns, nil
    for k in pairs(entity) do
        if not (type(k) == "string" and cols[k]) and k ~= "version" then
            extra = extra or {}
            extra[#extra + 1] = tostring(k)
        end
    end
    if extra == nil then return nil end
    sort(extra)
    return fail("invalid", c.what .. ": no column for the entity's field"
                .. (#extra > 1 and "s " or " ") .. concat(extra, ", ")
                .. " (extra_fields = \"ignore\" in the description leaves them out)",
                { fields = extra })
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

-- Repo:add's INSERT texts are made once per set of columns given: c.inserts is a tree whose
-- steps are the writable columns' positions present (and these three), its nodes' sql the text.
-- Bounded: past INSERTS_MAX texts (entities whose optional fields vary widely) it starts over.
local PK_STEP, ACTOR_STEP, TENANT_STEP = -1, -2, -3
local INSERTS_MAX = 256

local function step(node, key)
    local next_node = node[key]
    if next_node == nil then
        next_node = {}
        node[key] = next_node
    end
    return next_node
end

-- INSERT INTO t (the id's column when given, the row's columns, the stamps) VALUES ($1, ...)
-- (row: to_row's row, or nil: the entity's own fields are read in place)
local function insert_sql(self, c, with_id, row, entity, actor, tenanted)
    local cols, vals = {}, {}
    local function put(name, v)
        cols[#cols + 1] = c.columns[name].qname
        vals[#vals + 1] = v
    end
    local n = 0
    local function param()
        n = n + 1
        return "$" .. n
    end
    if with_id then put(self.d.pk, param()) end
    local w = c.writable
    for i = 1, #w do
        local v
        if row then v = row[w[i]] else v = rawget(entity, w[i]) end
        if v ~= nil then put(w[i], param()) end
    end
    if c.has.created_at then put("created_at", "now()") end
    if actor then put("created_by", param()) end
    if c.has.version then put("version", "1") end
    if tenanted then put("tenant_id", param()) end
    return "INSERT INTO " .. c.qtable .. " (" .. concat(cols, ", ") .. ") VALUES ("
           .. concat(vals, ", ") .. ")"
end

--- Queued in the unit of work's pipeline (a duplicate key fails the unit of work with
-- "conflict"); stamps created_at (server time), created_by, tenant_id and version = 1, and
-- tracks the entity so its events reach the outbox. An entity without an id gets a UUID v7 (a
-- uuid key) or the database's default, read back at once (any other key).
---@param entity table
---@param opts table|nil
---@return table|nil entity
---@return qx.Error? err invalid
function Repo:add(entity, opts)
    need_uow(self, "add")
    check_entity(entity, "add")
    check_opts(opts, ADD_OPTS, "add")
    local c, e = ready(self)
    if not c then return nil, e end
    local d = self.d
    local _, ue = unmapped(self, c, entity)
    if ue then return nil, ue end
    -- with the default mapping the row is the entity's own fields, read from it directly
    local row = d.to_row and row_of(self, c, entity)
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
    -- the parameters in the order of the columns, and the INSERT for that set of columns
    local params, n = {}, 0
    local node = c.inserts
    local with_id = id ~= nil and not c.pk_col.generated
    if with_id then
        n = 1
        params[1] = id
        node = step(node, PK_STEP)
    end
    local w = c.writable
    for i = 1, #w do
        local v
        if row then v = row[w[i]] else v = rawget(entity, w[i]) end
        if v ~= nil then
            n = n + 1
            params[n] = v
            node = step(node, i)
        end
    end
    local has = c.has
    local actor = has.created_by and self.actor or nil
    if actor then
        n = n + 1
        params[n] = actor
        node = step(node, ACTOR_STEP)
    end
    if has.tenant_id and tenant ~= nil then
        n = n + 1
        params[n] = tenant
        node = step(node, TENANT_STEP)
    end
    local sql = node.sql
    if sql == nil then
        sql = insert_sql(self, c, with_id, row, entity, actor, has.tenant_id and tenant ~= nil)
        if c.ninserts >= INSERTS_MAX then
            c.inserts, c.ninserts = {}, 0 -- this text is not kept: node hangs off the old tree
        else
            node.sql = sql
            c.ninserts = c.ninserts + 1
        end
    end
    if not with_id then
        local rows
        rows, e = self.uow:query(sql .. " RETURNING " .. c.pkq .. " AS id", unpack(params, 1, n))
        if not rows then return nil, e end
        id = rows[1].id
    else
        local ok
        ok, e = self.uow:queue(sql, unpack(params, 1, n))
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

--- UPDATE ... WHERE id = $ AND version = $ (and the tenant, and not deleted): bumps version,
-- stamps updated_at/updated_by, writes every writable column (nil -> NULL). A stale version is
-- conflict (with expected_version, actual_version); a missing row (or another tenant's, or a
-- deleted one) is not_found. The unit of work goes on either way. With defer = true the
-- statement is queued: a stale version or missing row then fails the unit of work at its
-- next flush or commit.
---@param entity table
---@param opts table|nil { defer = false }
---@return table|nil entity
---@return qx.Error? err conflict, not_found, invalid
function Repo:save(entity, opts)
    need_uow(self, "save")
    check_entity(entity, "save")
    opts = check_opts(opts, SAVE_OPTS, "save")
    local c, e = ready(self)
    if not c then return nil, e end
    local d = self.d
    local _, ue = unmapped(self, c, entity)
    if ue then return nil, ue end
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
local function target_of(self, c, x)
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

--- Queued: stamps deleted_at/deleted_by and bumps version. Given an entity, its version is
-- checked and it is tracked. A row that is missing, already deleted or another tenant's fails
-- the unit of work with not_found (a stale version with conflict) unless missing_ok.
---@param x any an id or an entity
---@param opts table|nil { missing_ok = false }
---@return true|nil ok
---@return qx.Error? err
function Repo:soft_delete(x, opts)
    need_uow(self, "soft_delete")
    if not self.d.soft_delete then
        error("soft_delete: repository " .. self.d.what .. " has no soft_delete = true", 2)
    end
    opts = check_opts(opts, DELETE_OPTS, "soft_delete")
    local c, e = ready(self)
    if not c then return nil, e end
    local id, version, entity, bad = target_of(self, c, x)
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

--- Undoes a soft delete (queued).
---@param id any
---@param opts table|nil { missing_ok = false }
---@return true|nil ok
---@return qx.Error? err
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

--- Queued DELETE (also of soft-deleted rows); like soft_delete for versions, tenants, missing
-- rows and tracking.
---@param x any an id or an entity
---@param opts table|nil { missing_ok = false }
---@return true|nil ok
---@return qx.Error? err
function Repo:hard_delete(x, opts)
    need_uow(self, "hard_delete")
    opts = check_opts(opts, DELETE_OPTS, "hard_delete")
    local c, e = ready(self)
    if not c then return nil, e end
    local id, version, entity, bad = target_of(self, c, x)
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

--- Internal to qx.store.event_store: records, and the reads of a store outside a unit of work
-- (read_all, read_category, each, read_stream, head, stall). The global read is gap-safe: see
-- docs/event-store.md.
local core = require "qx.core"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local checkpoint = require "qx.store.event_store.checkpoint"
local sql = require "qx.store.event_store.sql"
local options = require "qx.options"
local personal = require "qx.store.personal"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local getmetatable = getmetatable
local floor = math.floor
local fmt = string.format
local null = core.null
local dec, later = checkpoint.dec, checkpoint.later
local encode_checkpoint = checkpoint.encode_checkpoint
local decode_checkpoint = checkpoint.decode_checkpoint
local READ_STREAM, STALL, read_sql = sql.READ_STREAM, sql.STALL, sql.read_sql

local _M = {}

local MAX_LIMIT = 100000
local MAX_VERSION = 2147483647

--- The event store (qx.event_store).
---@class qx.EventStore
local Store = {}
Store.__index = Store
_M.Store = Store

local function check_store(self, method)
    if getmetatable(self) ~= Store then
        error("store:" .. method .. ": call as store:" .. method .. "(...)", 3)
    end
end


local function need_db(self, method)
    if not self.db then
        error("store:" .. method .. ": this store has no db (qx.event_store{ db = db })", 3)
    end
    return self.db
end

-- ---- records --------------------------------------------------------------------------------

-- A row of RECORD_COLUMNS -> a record (the decoded payload table, completed).
local function to_record(r)
    local rec = r.payload
    if type(rec) ~= "table" then
        rec = {}
    end
    if rec.event_name == nil then rec.event_name = r.event_name end
    local v = r.row_id
    if v ~= nil and v ~= null then rec.event_id = v end
    v = r.row_occurred_at
    if v ~= nil and v ~= null then rec.occurred_at = v end
    v = r.row_tenant_id
    if v ~= nil and v ~= null then rec.tenant_id = v end
    rec.aggregate_type = r.aggregate_type
    rec.aggregate_id = r.aggregate_id
    rec._sequence = r.sequence
    rec._global_position = r.global_position
    rec._tx_id = r.tx_id
    return rec
end

_M.to_record = to_record

-- A list of names from a string, an event class / aggregate class, or a list of them.
local function name_list(method, what, v, name_of)
    if v == nil then
        return nil
    end
    local list = (type(v) == "table" and not name_of(v)) and v or { v }
    local out = {}
    for i = 1, #list do
        local name = name_of(list[i])
        if name == nil then
            error(fmt("%s: %s must be names or classes (item %d is a %s)", method, what, i,
                      type(list[i])), 3)
        end
        out[i] = name
    end
    if #out == 0 then
        error(method .. ": " .. what .. " is empty", 3)
    end
    return out
end

local function event_name_of(x)
    if type(x) == "string" then return x end
    if event.is_class(x) then return x.event_name end
    return nil
end

local function aggregate_type_of(x)
    if type(x) == "string" then return x end
    if aggregate.is_class(x) then return x.aggregate_type end
    return nil
end

local function check_limit(method, v, dflt)
    if v == nil then return dflt end
    if type(v) ~= "number" or v ~= floor(v) or v < 1 or v > MAX_LIMIT then
        error(method .. ": limit must be an integer between 1 and " .. MAX_LIMIT, 3)
    end
    return v
end

local READ_OPTS = { "after", "limit", "types", "aggregate_type", "tenant_id" }

-- The global read, given something with :query (a db or a unit of work).
-- -> records, next_checkpoint | nil, err
local function read_all(q, method, opts)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error(method .. ": options must be a table", 3)
    end
    options.check(opts, READ_OPTS, method)
    local limit = check_limit(method, opts.limit, 500)
    local types = name_list(method, "types", opts.types, event_name_of)
    local categories = name_list(method, "aggregate_type", opts.aggregate_type, aggregate_type_of)
    local tenant = opts.tenant_id
    if tenant ~= nil and type(tenant) ~= "string" then
        error(method .. ": tenant_id must be a string", 3)
    end
    local tx, pos = decode_checkpoint(opts.after)
    if not tx then
        return nil, pos
    end

    -- (personal.read: q:query, and outside a unit of work the keys' generation with the rows)
    local rows, e, gen = personal.read(q, read_sql(types, categories), tx, pos, types, categories,
                                       tenant, limit)
    if not rows then
        return nil, e
    end
    local out = {}
    local horizon = rows[1] and rows[1].horizon or "0"
    for i = 1, #rows do
        local r = rows[i]
        if r.tx_id ~= null then
            out[#out + 1] = to_record(r)
        end
    end
    local ok, pe = personal.open_all(q, out, nil, gen)
    if not ok then return nil, pe end
    local last = out[#out]
    if last then
        tx, pos = last._tx_id, dec(last._global_position)
    end
    if #out < limit then
        -- caught up: every row below the horizon has been seen, matching or not
        tx, pos = later(tx, pos, horizon, "0")
    end
    return out, encode_checkpoint(tx, pos)
end

_M.read_all = read_all


local STREAM_OPTS = { "after_sequence", "limit" }

local function stream_args(method, agg_type, id, opts)
    local t = aggregate_type_of(agg_type)
    if t == nil then
        error(method .. ": expected an aggregate type (a name or a class), got "
              .. type(agg_type), 3)
    end
    if type(id) ~= "string" and type(id) ~= "number" then
        error(method .. ": id must be a string or a number, got " .. type(id), 3)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error(method .. ": options must be a table", 3)
    end
    opts = options.check(opts, STREAM_OPTS, method)
    local after = opts.after_sequence or 0
    if type(after) ~= "number" or after ~= floor(after) or after < 0 then
        error(method .. ": after_sequence must be a non-negative integer", 3)
    end
    local limit = opts.limit or MAX_VERSION
    if type(limit) ~= "number" or limit ~= floor(limit) or limit < 1 then
        error(method .. ": limit must be a positive integer", 3)
    end
    return t, tostring(id), after, limit
end


local function read_stream(q, method, agg_type, id, opts, tenant)
    local t, sid, after, limit = stream_args(method, agg_type, id, opts)
    local rows, e, gen = personal.read(q, READ_STREAM, t, sid, after, tenant, limit)
    if not rows then
        return nil, e
    end
    for i = 1, #rows do
        rows[i] = to_record(rows[i])
    end
    local ok, pe = personal.open_all(q, rows, nil, gen)
    if not ok then return nil, pe end
    return rows
end


--- Events in a gap-safe global order (docs/event-store.md: records and checkpoints). opts:
-- after = checkpoint, limit = 500, types = { names }, aggregate_type, tenant_id.
---@param opts table|nil
---@return table|nil records
---@return any next_checkpoint, or the error
function Store:read_all(opts)
    check_store(self, "read_all")
    return read_all(need_db(self, "read_all"), "store:read_all", opts)
end


--- read_all for one aggregate type.
---@param agg_type string
---@param opts table|nil { after, limit, types, tenant_id }
---@return table|nil records
---@return any next_checkpoint, or the error
function Store:read_category(agg_type, opts)
    check_store(self, "read_category")
    if aggregate_type_of(agg_type) == nil then
        error("store:read_category: expected an aggregate type (a name or a class)", 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("store:read_category: options must be a table", 2)
    end
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.aggregate_type = agg_type
    return read_all(need_db(self, "read_category"), "store:read_category", o)
end


local EACH_OPTS = { "after", "batch", "types", "aggregate_type", "tenant_id" }

--- for record, checkpoint in store:each{...} do ... end - reads batch by batch (constant
-- memory); checkpoint is where to resume after that record. A read error raises.
---@param opts table|nil { after, batch = 500, types, aggregate_type, tenant_id }
---@return function iterator
function Store:each(opts)
    check_store(self, "each")
    local db = need_db(self, "each")
    options.check(opts, EACH_OPTS, "store:each")
    local o = {}
    for k, v in pairs(opts or {}) do
        if k == "batch" then o.limit = v else o[k] = v end
    end
    local batch, i = {}, 0
    local done = false
    local after = o.after
    return function()
        i = i + 1
        while batch[i] == nil do
            if done then
                return nil
            end
            o.after = after
            local recs, cp = read_all(db, "store:each", o)
            if not recs then
                error(cp, 0)
            end
            batch, i, after = recs, 1, cp
            done = #recs < (o.limit or 500)
        end
        local rec = batch[i]
        return rec, (batch[i + 1] == nil and after or checkpoint.checkpoint_after(rec))
    end
end


--- One aggregate's events, in order.
---@param agg_type string
---@param id string
---@param opts table|nil { after_sequence = 0, limit }
---@return table|nil records
---@return qx.Error? err
function Store:read_stream(agg_type, id, opts)
    check_store(self, "read_stream")
    return read_stream(need_db(self, "read_stream"), "store:read_stream", agg_type, id, opts)
end


--- The checkpoint at the horizon now: reading from it returns only events that commit (or
-- become readable) after this call. For a reader that wants only new events.
---@return any|nil checkpoint
---@return qx.Error? err
function Store:head()
    check_store(self, "head")
    local rows, e = need_db(self, "head"):query(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon")
    if not rows then
        return nil, e
    end
    return encode_checkpoint(rows[1].horizon, "0")
end


--- Why reading is held back: a transaction that has written (holds an xid) stays open; its
-- events and every event committed after it wait until it ends. The report: { stalled,
-- horizon = xid, withheld = n committed events not yet readable, oldest_withheld_at,
-- holders = { { kind = "backend" | "prepared", pid, xid, gid, xact_start, age_seconds,
-- state, wait_event, application_name, usename, client_addr, query } } }.
---@return table|nil report
---@return qx.Error? err
function Store:stall()
    check_store(self, "stall")
    local rows, e = need_db(self, "stall"):query(STALL)
    if not rows then
        return nil, e
    end
    local first = rows[1]
    local report = {
        horizon = first.horizon,
        withheld = first.withheld,
        holders = {},
    }
    if first.oldest_withheld_at ~= null then
        report.oldest_withheld_at = first.oldest_withheld_at
    end
    report.stalled = report.withheld > 0
    for _, r in ipairs(rows) do
        if r.kind ~= null then
            local h = {}
            for _, k in ipairs({ "kind", "pid", "xid", "gid", "xact_start", "age_seconds",
                                 "state", "wait_event", "application_name", "usename",
                                 "client_addr", "query" }) do
                if r[k] ~= null then h[k] = r[k] end
            end
            report.holders[#report.holders + 1] = h
        end
    end
    return report
end


_M.read_stream = read_stream
_M.aggregate_type_of = aggregate_type_of

return _M

--- Internal to qx.store.event_store: records, and the reads of a store outside a unit of work
-- (read_all, read_category, each, read_stream, head, stall). The global read is gap-safe: see
-- docs/event-store.md.
local core = require "qx.core"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local checkpoint = require "qx.store.event_store.checkpoint"
local sql = require "qx.store.event_store.sql"
local options = require "qx.options"
local evolve_record = require("qx.model.registry").evolve_record
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
local ARCHIVE = sql.ARCHIVE
local new_error = require("qx.error").new

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
    v = r.traceparent -- the W3C trace context of the unit of work that appended it
    if v ~= nil and v ~= null then
        rec._traceparent = v
        v = r.tracestate
        if v ~= nil and v ~= null then rec._tracestate = v end
    end
    return rec
end

_M.to_record = to_record

-- The rows of a read (q, gen and sealed as personal.read gave them) -> records | nil, err.
-- Sealed personal fields are opened first (those personal.read did not), as stored: their
-- ciphertext is bound to the event's id and the stored field's name, which an upcaster may
-- rename; then each record is read as its registry class (upcast, renamed from an alias). Rows
-- without a tx_id (markers) are skipped.
local function read_records(q, rows, reg, gen, sealed)
    local out, record_of = {}, nil
    for i = 1, #rows do
        local r = rows[i]
        if r.tx_id ~= null then
            out[#out + 1] = to_record(r)
            if record_of then record_of[i] = #out end
        elseif record_of == nil and type(sealed) == "table" then
            record_of = {}
            for j = 1, #out do record_of[j] = j end
        end
    end
    local ok, pe
    if gen == nil then
        ok, pe = personal.open_all(q, out, nil, gen)
    else
        ok, pe = personal.open_read(q, out, gen, sealed, record_of)
    end
    if not ok then return nil, pe end
    if reg then
        for i = 1, #out do
            local rec = out[i]
            local class = reg:reader(rec.event_name, rec.event_version)
            if class ~= nil then
                local er
                rec, er = evolve_record(class, rec)
                if not rec then return nil, er end
                out[i] = rec
            end
        end
    end
    return out
end

_M.read_records = read_records

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

-- the names a class's events are stored under: its own and its aliases
local function with_aliases(names, list)
    local out = {}
    for i = 1, #names do
        out[#out + 1] = names[i]
        local x = list[i]
        if type(x) == "table" and event.is_class(x) then
            for _, alias in ipairs(x.aliases) do out[#out + 1] = alias end
        end
    end
    return out
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
local function read_all(q, method, opts, reg)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error(method .. ": options must be a table", 3)
    end
    options.check(opts, READ_OPTS, method)
    local limit = check_limit(method, opts.limit, 500)
    local types = name_list(method, "types", opts.types, event_name_of)
    if types then
        local t = opts.types
        types = with_aliases(types, (type(t) == "table" and not event.is_class(t)) and t or { t })
    end
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
    local rows, e, gen, sealed = personal.read(q, read_sql(types, categories), tx, pos, types,
                                               categories, tenant, limit)
    if not rows then
        return nil, e
    end
    local horizon = rows[1] and rows[1].horizon or "0"
    local out, re = read_records(q, rows, reg, gen, sealed)
    if not out then return nil, re end
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


local STREAM_OPTS = { "after_sequence", "limit", "archived" }

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
    if opts.archived ~= nil and type(opts.archived) ~= "boolean" then
        error(method .. ": archived must be a boolean", 3)
    end
    return t, tostring(id), after, limit, opts.archived == true
end


-- The error of a read of an archived stream that did not ask for archived ones.
local function archived_error(agg_type, id)
    return new_error("not_found", fmt("%s %s: stream archived (read it with { archived = true })",
                                      agg_type, tostring(id)), { archived = true })
end

_M.archived_error = archived_error

local function read_stream(q, method, agg_type, id, opts, tenant, reg)
    local t, sid, after, limit, archived = stream_args(method, agg_type, id, opts)
    local rows, e, gen, sealed = personal.read(q, READ_STREAM, t, sid, after, tenant, limit,
                                               archived)
    if not rows then
        return nil, e
    end
    if rows[1].archived and not archived then
        return nil, archived_error(t, sid)
    end
    return read_records(q, rows, reg, gen, sealed)
end


-- Archives one stream through q (a db or a unit of work): the events move to the archive in
-- q's transaction (docs/event-store.md, "Archived streams"). -> info | nil, err
local function archive_stream(q, agg_type, id, tenant, expected)
    if not core.is_uuid(id) then
        return nil, new_error("invalid", fmt("%s: id must be a uuid, got %q", agg_type,
                                             tostring(id)))
    end
    local rows, e = q:query(ARCHIVE, agg_type, id, tenant, expected)
    if not rows then
        if e.code == "conflict" and tostring(e.message):find("stream archived", 1, true) then
            e.archived = true
        end
        return nil, e
    end
    local r = rows[1]
    return { aggregate_type = agg_type, aggregate_id = id, events = r.events,
             last_sequence = r.last_sequence, archived_at = r.archived_at }
end

_M.archive_stream = archive_stream


--- Events in a gap-safe global order (docs/event-store.md: records and checkpoints). opts:
-- after = checkpoint, limit = 500, types = { names }, aggregate_type, tenant_id.
---@param opts table|nil
---@return table|nil records
---@return any next_checkpoint, or the error
function Store:read_all(opts)
    check_store(self, "read_all")
    return read_all(need_db(self, "read_all"), "store:read_all", opts, self.registry)
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
    return read_all(need_db(self, "read_category"), "store:read_category", o, self.registry)
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
            local recs, cp = read_all(db, "store:each", o, self.registry)
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


--- One aggregate's events, in order. An archived stream is not_found (err.archived) unless
-- opts.archived.
---@param agg_type string
---@param id string
---@param opts table|nil { after_sequence = 0, limit, archived = true }
---@return table|nil records
---@return qx.Error? err
function Store:read_stream(agg_type, id, opts)
    check_store(self, "read_stream")
    return read_stream(need_db(self, "read_stream"), "store:read_stream", agg_type, id, opts,
                       nil, self.registry)
end


local ARCHIVE_OPTS = { "tenant_id" }

--- Closes a stream in a transaction of its own (es:archive inside a unit of work): its events
-- move to the archive table, its snapshot is dropped, later appends are conflict "stream
-- archived", loads not_found with err.archived. Global reads still return its events.
---@param agg_type string|table an aggregate type (a name or a class)
---@param id string the aggregate id (a uuid)
---@param opts table|nil { tenant_id = t } archives only that tenant's stream
---@return table|nil info { aggregate_type, aggregate_id, events, last_sequence, archived_at }
---@return qx.Error? err not_found (no stream), conflict (archived already: err.archived), invalid
function Store:archive(agg_type, id, opts)
    check_store(self, "archive")
    local t = aggregate_type_of(agg_type)
    if t == nil then
        error("store:archive: expected an aggregate type (a name or a class), got "
              .. type(agg_type), 2)
    end
    if type(id) ~= "string" then
        error("store:archive: id must be a string, got " .. type(id), 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("store:archive: options must be a table", 2)
    end
    opts = options.check(opts, ARCHIVE_OPTS, "store:archive")
    if opts.tenant_id ~= nil and type(opts.tenant_id) ~= "string" then
        error("store:archive: tenant_id must be a string", 2)
    end
    return archive_stream(need_db(self, "archive"), t, id, opts.tenant_id)
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

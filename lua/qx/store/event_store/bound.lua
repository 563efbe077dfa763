--- Internal to qx.store.event_store: the store bound to a unit of work (uow:store(store)): load,
-- append, append_batch and the reads inside that transaction. Appends are queued in the unit
-- of work's pipeline; see docs/event-store.md for why.
local core = require "qx.core"
local qx_error = require "qx.error"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local es_class = require "qx.model.event_sourced"
local internal = require "qx.store.internal"
local options = require "qx.options"
local raise = options.raise
local sql = require "qx.store.event_store.sql"
local reads = require "qx.store.event_store.reads"
local registry = require "qx.model.registry"
local evolve_record = registry.evolve_record
local personal = require "qx.store.personal"

local type = type
local ipairs = ipairs
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local rawget = rawget
local floor = math.floor
local fmt = string.format
local is_uuid = core.is_uuid
local null = core.null
local new_error = qx_error.new
local APPEND, APPEND_TRACED, SNAPSHOT, LOAD = sql.APPEND, sql.APPEND_TRACED, sql.SNAPSHOT, sql.LOAD
local LOAD_ARCHIVED = sql.LOAD_ARCHIVED
local read_all, read_stream = reads.read_all, reads.read_stream
local archive_stream, archived_error = reads.archive_stream, reads.archived_error
local Store = reads.Store

local _M = {}

_M.CHANNEL = "qx_events"          -- NOTIFY channel of every append

local MAX_VERSION = 2147483647

-- JSON for what the store writes: the binding's encoder, which keeps numbers exact (the
-- distributions' lua-cjson rounds to 14 digits). Encoding here, before anything is queued, is
-- what lets append report a value JSON cannot hold while the aggregate keeps its events.
local function encode(v)
    local text, e = core.json_encode(v)
    if not text then return nil, e.message end
    return text
end

--- The event store inside a unit of work (uow:store(store)).
---@class qx.BoundEventStore
local Bound = {}
Bound.__index = Bound
_M.Bound = Bound

-- bind(store, uow) -> the store's operations inside that transaction
function _M.bind(store, uow)
    if getmetatable(store) ~= Store then
        raise("uow:store: expected a store made by qx.event_store{...}")
    end
    return setmetatable({ store = store, uow = uow }, Bound)
end


local function check_bound(self, method)
    if getmetatable(self) ~= Bound then
        raise("es:" .. method .. ": call as es:" .. method .. "(...)")
    end
    local uow = self.uow
    internal.check_open(uow, 3) -- raises, saying what state it is in
end


local function tenant_of(uow)
    local t = uow.context and uow.context.tenant_id
    if t ~= nil then
        return tostring(t)
    end
    return nil
end


local LOAD_OPTIONS = { "snapshot", "archived" }
local APPEND_OPTIONS = { "aggregate_type" }

--- An aggregate from its snapshot and events; nil (and no error) when it has none.
---@param class table an event-sourced class
---@param id string
---@param opts table|nil { snapshot = false }: every event; { archived = true }: archived too
---@return table|nil instance
---@return qx.Error? err invalid (bad stored data), not_found + err.archived (archived stream)
function Bound:load(class, id, opts)
    check_bound(self, "load")
    if not es_class.is_class(class) then
        local what = aggregate.is_class(class) and ("aggregate class " .. class.aggregate_type
            .. ", which is not event-sourced (use qx.event_sourced)") or type(class)
        raise("es:load: expected an event-sourced class, got " .. what)
    end
    if type(id) ~= "string" and type(id) ~= "number" then
        raise("es:load: id must be a string or a number, got " .. type(id))
    end
    if opts ~= nil and type(opts) ~= "table" then
        raise("es:load: options must be a table")
    end
    options.check(opts, LOAD_OPTIONS, "es:load")
    if opts and opts.archived ~= nil and type(opts.archived) ~= "boolean" then
        raise("es:load: archived must be a boolean")
    end
    -- ids are uuids, as a repository's keys: an id from outside that is not one (a typo, a
    -- path segment) must not read as an empty stream that load-or-new then starts
    if not is_uuid(id) then
        return nil, new_error("invalid", fmt("%s: id must be a uuid, got %q", class.aggregate_type,
                                             tostring(id)))
    end
    local use_snapshot = not (opts and opts.snapshot == false)
    local spec = es_class.spec(class)
    if personal.may_hold(spec.handlers) then
        local held, he = personal.hold_stream(self.uow, class.aggregate_type, tostring(id))
        if not held then
            return nil, he
        end
    end
    local rows, e = self.uow:query(LOAD, class.aggregate_type, tostring(id), use_snapshot,
                                   spec.snapshot_version, tenant_of(self.uow))
    if not rows then
        return nil, e
    end
    if #rows == 0 then
        return nil
    end
    if rows[#rows].kind == 2 then
        -- archived: its events are in the archive (the guard keeps the hot table free of them)
        if not (opts and opts.archived) then
            return nil, archived_error(class.aggregate_type, id)
        end
        rows, e = self.uow:query(LOAD_ARCHIVED, class.aggregate_type, tostring(id),
                                 tenant_of(self.uow))
        if not rows then
            return nil, e
        end
    end

    local self_ = class.new(id)
    local first = 1
    if rows[1].kind == 0 then
        local state = rows[1].payload
        if type(state) ~= "table" then
            return nil, new_error("invalid", tostring(self_) .. ": snapshot state is not an object")
        end
        self_:restore(personal.snapshot_in(state))
        self_.version = rows[1].sequence
        first = 2
    end

    -- sealed personal fields opened (or qx.forgotten) before any handler sees them
    local recs, ids = {}, {}
    for i = first, #rows do
        local rec = rows[i].payload
        if type(rec) == "table" then
            local n = #recs + 1
            recs[n] = rec
            ids[n] = rows[i].row_id ~= null and rows[i].row_id or rec.event_id
        end
    end
    local opened, pe = personal.open_all(self.uow, recs, ids)
    if not opened then
        return nil, pe
    end

    local events, sequences = {}, {}
    local handlers = spec.handlers
    for i = first, #rows do
        local r = rows[i]
        local rec = r.payload
        if type(rec) ~= "table" then
            return nil, new_error("invalid", fmt("%s: event %d is not an object", tostring(self_),
                                                 r.sequence))
        end
        if rec.event_name == nil then rec.event_name = r.event_name end
        if r.row_id ~= null then rec.event_id = r.row_id end
        if r.row_occurred_at ~= null then rec.occurred_at = r.row_occurred_at end
        if r.row_tenant_id ~= null then rec.tenant_id = r.row_tenant_id end
        local h = handlers[r.event_name]
        local ev = rec
        if h and h.class then
            rec.aggregate_type = class.aggregate_type
            rec.aggregate_id = id
            local ec = h.class
            if ec.__first_step and not ec.__chain_ok then -- upcasters added after the store
                registry.check_chain(ec, "es:load")
                ec.__chain_ok = true
            end
            local er
            rec, er = evolve_record(ec, rec)
            if not rec then return nil, er end
            -- rebuild the instance the handler was written for: the stored object holds the
            -- metadata and the payload side by side, as the fields of Class{...} do, and the
            -- constructor checks them (a stored value of the wrong kind is invalid data)
            rec.aggregate_type = class.aggregate_type
            rec.aggregate_id = id
            local built, inst = pcall(h.class.new, rec)
            if not built then
                return nil, new_error("invalid", fmt("%s: event %d: %s", tostring(self_),
                    r.sequence, (tostring(inst):gsub("^[^:\n]*:%d+: ", ""))))
            end
            ev = inst
        else
            rec.aggregate_type = class.aggregate_type
            rec.aggregate_id = id
        end
        events[#events + 1] = ev
        sequences[#sequences + 1] = r.sequence
    end
    local ok, perr = es_class.replay_stored(self_, events, sequences)
    if not ok then
        return nil, perr
    end
    return self_
end


-- The stored events with their personal fields sealed (a new list of copies where there are
-- any; stored itself when there are none) | nil, err (invalid: a bad subject, a forgotten one).
-- The events themselves keep their values: the aggregate and the handlers read them.
local function seal_stored(uow, stored, hold)
    local subjects, of
    for i = 1, #stored do
        local ev = stored[i]
        local subject, e = personal.subject_of(ev)
        if subject == nil then return nil, e end
        if subject then
            if subjects == nil then subjects, of = {}, {} end
            subjects[subject] = true
            of[i] = subject
        end
    end
    if subjects == nil then return stored end
    local keys, e = personal.keys_for_write(uow, subjects, hold)
    if not keys then return nil, e end
    local out = {}
    for i = 1, #stored do
        local ev, subject = stored[i], of[i]
        if subject then
            local copy, se = personal.sealed_copy(ev, keys[subject], subject)
            if not copy then return nil, se end
            out[i] = copy
        else
            out[i] = ev
        end
    end
    return out
end


-- Checks one aggregate and stamps its events. Returns the aggregate type, the id as text, the
-- version, the events to store (the pending list itself when none of them is an integration
-- event), how many they are, and the snapshot row or nil | nil, err. Nothing is drained here.
-- The rows themselves are written by core.json_rows (EVENT_ROW): each stored event is the
-- event's own fields, metadata and payload side by side, less the routing fields and "_" keys.
local function prepare(store, uow, agg, opts)
    local class = es_class.class_of(agg)
    if class == nil then
        raise("es:append: expected an event-sourced aggregate instance, got "
              .. (aggregate.is_aggregate(agg) and tostring(agg) or type(agg)))
    end
    local agg_type = class.aggregate_type
    if opts and opts.aggregate_type ~= nil then
        if type(opts.aggregate_type) ~= "string" or opts.aggregate_type == "" then
            raise("es:append: aggregate_type must be a non-empty string")
        end
        agg_type = opts.aggregate_type
    end
    local sid = rawget(agg, "id")
    if not is_uuid(sid) then
        return nil, new_error("invalid", fmt("%s: id must be a uuid, got %q", tostring(agg),
                                             tostring(sid)))
    end
    local pending = aggregate.pending_list(agg) -- not a copy: only read here
    local version = rawget(agg, "version")
    local stored = pending
    local n = 0
    for i = 1, #pending do
        local ev = pending[i]
        internal.stamp(uow, ev)
        if event.class_of(ev).integration then
            if stored == pending then -- the first one: from here on the stored events are a list
                stored = {}
                for k = 1, n do stored[k] = pending[k] end
            end
        else
            if not is_uuid(ev.event_id) then
                return nil, new_error("invalid", fmt("%s: event %s has an event_id that is not "
                    .. "a uuid", tostring(agg), tostring(ev.event_name)))
            end
            n = n + 1
            if stored ~= pending then stored[n] = ev end
        end
    end
    if version + n > MAX_VERSION then
        return nil, new_error("invalid", tostring(agg) .. ": version would pass " .. MAX_VERSION)
    end
    local snap
    local every = store.snapshot_every
    if every > 0 and n > 0 and floor((version + n) / every) > floor(version / every) then
        local state = agg:snapshot()
        if type(state) ~= "table" then
            return nil, new_error("invalid", tostring(agg) .. ": snapshot() must return a table")
        end
        state = personal.snapshot_out(state)
        local tenant = tenant_of(uow)
        snap = {
            id = core.uuid(),
            type = agg_type,
            agg = sid,
            state = state,
            version = version + n,
            tenant = tenant,
            state_version = es_class.spec(class).snapshot_version,
        }
    end
    -- sealed last: with a snapshot, the subjects' keys are held until the commit
    local e
    stored, e = seal_stored(uow, stored, snap ~= nil)
    if not stored then return nil, e end
    return agg_type, sid, version, stored, n, snap
end

-- the append rows: [{"type", "agg", "seq" (counting up), "event": less routing fields, "_" keys}]
local EVENT_ROW = core.json_shape{ fields = { "type", "agg", "seq" }, item = "event",
                                  omit = { "aggregate_type", "aggregate_id" }, omit_prefix = "_" }
local json_rows = core.json_rows
local function event_rows(...) return json_rows(EVENT_ROW, ...) end

local function rows_invalid(e)
    return nil, new_error("invalid", "an event cannot be stored as JSON: " .. tostring(e.message))
end

local function snaps_json_of(snaps)
    local text, e = encode(snaps)
    if not text then
        return nil, new_error("invalid", "a snapshot cannot be stored as JSON: " .. tostring(e))
    end
    return text
end

-- Queues the insert (and the snapshot upsert) and asks for the wake-up. Nothing failed before;
-- the unit of work was found open (check_bound).
local function queue_append(uow, store, rows_json, snaps_json)
    local ok, e
    if uow.traceparent then -- the unit of work's trace context goes with each stored event
        ok, e = internal.queue_id(uow, APPEND_TRACED, rows_json, uow.traceparent,
                                  uow.tracestate or null)
    else
        ok, e = internal.queue_id(uow, APPEND, rows_json)
    end
    if not ok then return nil, e end
    if snaps_json then
        ok, e = internal.queue(uow, SNAPSHOT, snaps_json)
        if not ok then return nil, e end
    end
    -- sent once per unit of work, after its COMMIT (see the unit of work)
    if store.notify then internal.notify_after(uow, _M.CHANNEL) end
    return true
end

-- The aggregate's events go to the unit of work; its version moves past the stored ones.
local function drain(uow, agg, n)
    local evs = agg:pull_events()
    agg.version = rawget(agg, "version") + n
    internal.record_list(uow, evs)
end

local function append_all(self, list, opts, method)
    local uow, store = self.uow, self.store
    if opts ~= nil and type(opts) ~= "table" then
        raise(method .. ": options must be a table")
    end
    options.check(opts, APPEND_OPTIONS, method)
    local args, snaps, ns = {}, {}, {} -- args: type, id, first sequence, events, ... per aggregate
    local nargs, total = 0, 0
    for i, agg in ipairs(list) do
        local agg_type, sid, version, stored, n, snap = prepare(store, uow, agg, opts)
        if not agg_type then
            return nil, sid
        end
        ns[i] = n
        if n > 0 then
            args[nargs + 1], args[nargs + 2], args[nargs + 3], args[nargs + 4] =
                agg_type, sid, version + 1, stored
            nargs = nargs + 4
            total = total + n
        end
        if snap then snaps[#snaps + 1] = snap end
    end
    local rows_json, snaps_json, e
    if total > 0 then
        rows_json, e = event_rows(args)
        if not rows_json then return rows_invalid(e) end
    end
    if #snaps > 0 then
        snaps_json, e = snaps_json_of(snaps)
        if not snaps_json then return nil, e end
    end

    -- nothing failed: queue, then drain
    if rows_json then
        local ok
        ok, e = queue_append(uow, store, rows_json, snaps_json)
        if not ok then return nil, e end
    end
    for i, agg in ipairs(list) do
        drain(uow, agg, ns[i])
    end
    return true
end


--- Queues the insert of the aggregate's recorded events at sequences version+1...; a concurrent
-- append of the same version is conflict at commit (or at uow:flush(), called right after).
---@param agg table
---@param opts table|nil { aggregate_type = name }
---@return true|nil ok
---@return qx.Error? err invalid, conflict
function Bound:append(agg, opts)
    check_bound(self, "append")
    if opts ~= nil and type(opts) ~= "table" then
        raise("es:append: options must be a table")
    end
    options.check(opts, APPEND_OPTIONS, "es:append")
    local uow, store = self.uow, self.store
    local agg_type, sid, version, stored, n, snap = prepare(store, uow, agg, opts)
    if not agg_type then
        return nil, sid
    end
    if n > 0 then
        local rows_json, e = event_rows(agg_type, sid, version + 1, stored)
        if not rows_json then return rows_invalid(e) end
        local snaps_json
        if snap then
            snaps_json, e = snaps_json_of({ snap })
            if not snaps_json then return nil, e end
        end
        local ok
        ok, e = queue_append(uow, store, rows_json, snaps_json)
        if not ok then return nil, e end
    end
    drain(uow, agg, n)
    return true
end


--- Appends several aggregates in one insert.
---@param list table aggregates
---@param opts table|nil as append
---@return true|nil ok
---@return qx.Error? err
function Bound:append_batch(list, opts)
    check_bound(self, "append_batch")
    if type(list) ~= "table" or aggregate.is_aggregate(list) then
        raise("es:append_batch: expected a list of aggregates")
    end
    local seen = {}
    for i, agg in ipairs(list) do
        if seen[agg] then
            raise("es:append_batch: aggregate " .. i .. " is in the list twice")
        end
        seen[agg] = true
    end
    return append_all(self, list, opts, "es:append_batch")
end


--- Closes a stream (docs/event-store.md, "Archived streams"): its events move to the archive,
-- its snapshot is dropped, and later appends are conflict "stream archived". Given an
-- instance, the stream must be at the instance's version and the instance must have no events
-- left to append. Runs at once in this transaction (its lock is held until the commit); a
-- failure aborts the unit of work, as every failed statement does (uow:savepoint to go on).
---@param agg table|string an event-sourced instance, or an aggregate type (a name or a class)
---@param id string|nil the id, when agg is a type
---@return table|nil info { events = n moved, last_sequence = n, archived_at = ISO-8601 }
---@return qx.Error? err not_found, conflict (archived already: err.archived; moved on), invalid
function Bound:archive(agg, id)
    check_bound(self, "archive")
    local agg_type, expected
    local class = not es_class.is_class(agg) and es_class.class_of(agg)
    if class then
        if id ~= nil then
            raise("es:archive: give an instance, or a type and an id, not both")
        end
        agg_type, id, expected = class.aggregate_type, rawget(agg, "id"), rawget(agg, "version")
        if #aggregate.pending_list(agg) > 0 then
            return nil, new_error("invalid", tostring(agg) .. ": has recorded events not "
                .. "appended; append them (or drop the instance) before archiving")
        end
    else
        agg_type = reads.aggregate_type_of(agg)
        if agg_type == nil then
            raise("es:archive: expected an event-sourced instance, or an aggregate type (a name "
                  .. "or a class) and an id, got " .. type(agg))
        end
        if type(id) ~= "string" then
            raise("es:archive: id must be a string, got " .. type(id))
        end
    end
    return archive_stream(self.uow, agg_type, id, tenant_of(self.uow), expected)
end


--- In this transaction; limited to the context's tenant when it has one.
---@param agg_type string
---@param id string
---@param opts table|nil { after_sequence, limit, archived = true }
---@return table|nil records
---@return qx.Error? err
function Bound:read_stream(agg_type, id, opts)
    check_bound(self, "read_stream")
    return read_stream(self.uow, "es:read_stream", agg_type, id, opts, tenant_of(self.uow),
                       self.store.registry)
end


--- The global read inside this transaction (same rules as store:read_all).
---@param opts table|nil
---@return table|nil records
---@return any next_checkpoint, or the error
function Bound:read_all(opts)
    check_bound(self, "read_all")
    return read_all(self.uow, "es:read_all", opts, self.store.registry)
end


return _M

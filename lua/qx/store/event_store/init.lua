-- The event store: event-sourced aggregates in qx_aggregate_events, snapshots in
-- qx_aggregate_snapshots, and gap-safe global reads.
--
--   local store = qx.event_store{ db = db, snapshot_every = 50 }
--   db:unit_of_work(function(uow)
--     local es = uow:store(store)
--     local acc = es:load(Account, id) or Account.new(id)
--     acc:deposit(10)
--     assert(es:append(acc))
--   end)
--   local events, checkpoint = store:read_all{ after = checkpoint, limit = 500 }
--
-- APPEND. es:append(agg) drains the aggregate's recorded events and queues, in the unit of
-- work's pipeline, one INSERT ... SELECT FROM jsonb_array_elements($1) for all of them (one for
-- all aggregates with append_batch), with sequences version+1.., a snapshot upsert when the
-- version crosses a multiple of snapshot_every, and asks the unit of work to wake qx_events
-- listeners after its commit. Nothing is sent yet: the inserts, the outbox insert, COMMIT and the
-- wake-up go out in the one round trip of the commit. So append
-- returns true, and a concurrent append of the same version makes db:unit_of_work return
-- nil, { code = "conflict" } with nothing of the transaction written (the unique key
-- (aggregate_type, aggregate_id, sequence) refuses the second writer). Call uow:flush() after
-- append to see the conflict at that point instead (it returns nil, err). Queued rather than
-- sent at once on purpose: a failed statement aborts the transaction anyway, so an early
-- conflict only helps inside a savepoint, and sending it at once would cost every append a
-- second round trip. Bad input - an event
-- or snapshot JSON cannot hold, an event_id that is not a uuid - is found before anything is
-- queued: append returns nil, { code = "invalid" } and the aggregate keeps its events.
-- Every recorded event is handed to the unit of work (uow:record), which dispatches it
-- in-process and writes integration events to the outbox in the same transaction; only
-- domain events are stored in the stream. append drains the aggregate, so the events cannot
-- be drained twice. After append the instance's version is its new last sequence.
--
-- GAP-SAFE READS. Every row records the id of the transaction that wrote it (tx_id, set by a
-- trigger to pg_current_xact_id()) and a global_position (bigserial). A reader returns only
-- rows whose tx_id is below the xmin of its own statement's snapshot, ordered by
-- (tx_id, global_position), and its checkpoint is the (tx_id, global_position) of the last
-- row. Why this never skips an event that commits late, without serialising writers:
--   1. xmin of a snapshot is the oldest transaction id still running when the snapshot was
--      taken; every transaction with a smaller id has committed or aborted, and its committed
--      rows are visible in that snapshot (PostgreSQL's documented meaning of
--      pg_snapshot_xmin). A transaction takes its id at its first write, from a counter that
--      only grows, and is listed as running before any later id is handed out; so every id
--      taken after the snapshot is at least xmin.
--   2. So the set of rows with tx_id < xmin is final when the statement runs: no row can
--      appear below the horizon afterwards, whatever commits later. (tx_id is the top-level
--      transaction's id even for rows written in a savepoint.)
--   3. The reader returns a prefix of that final set in a total order (tx_id, global_position)
--      and the next read starts strictly after the last row returned. Everything before the
--      checkpoint was in a final set and was returned; nothing is returned twice. A read that
--      comes back short has seen every row below its horizon, matching its filters or not, so
--      its checkpoint moves on to (xmin, 0) - the horizon never moves back, as the oldest
--      running id only grows.
-- A position taken from a sequence (bigserial alone) has no such property: a transaction can
-- hold position 10 while position 11 commits, and a reader that moves past 11 never sees 10.
-- Writers never wait for each other; a long transaction that holds an xid holds the horizon
-- back (events after it wait, none are lost) - store:stall() names it.
-- Per-aggregate order: a stream's event n+1 must be read after event n. The trigger refuses
-- (as a conflict) an event n+1 whose transaction id is lower than that of event n - possible
-- only when the writing transaction took its id before event n committed and then read it -
-- so (tx_id, global_position) order is always sequence order within a stream.
--
-- Reads return plain tables ("records"): the stored event's fields side by side as on an
-- event instance (event_id, event_name, event_version, occurred_at, correlation_id,
-- causation_id, tenant_id, actor_id and the payload fields), aggregate_type, aggregate_id, and
-- the store's own fields _sequence, _global_position and _tx_id ("_" keys are never payload).
local core = require "qx.core"
local qx_error = require "qx.error"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local es_class = require "qx.model.event_sourced"
local internal = require "qx.store.internal"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local rawget = rawget
local floor = math.floor
local fmt = string.format
local match = string.match
local sub = string.sub
local is_uuid = core.is_uuid
local null = core.null
local new_error = qx_error.new

local _M = { _VERSION = "0.1.0" }

_M.CHANNEL = "qx_events"          -- NOTIFY channel of every append

local MAX_LIMIT = 100000
local MAX_VERSION = 2147483647

-- JSON for what the store writes: the binding's encoder, which keeps numbers exact (the
-- distributions' lua-cjson rounds to 14 digits). Encoding here, before anything is queued, is
-- what lets append report a value JSON cannot hold while the aggregate keeps its events.
local function encode(v)
    local text, e = core.json_encode(v)
    if not text then return nil, e.message end
    return text
end


-- ---- checkpoints ------------------------------------------------------------------------
--
-- Opaque to users: base64url (no padding) of "v1.<tx_id>.<global_position>", both decimal.
-- Decoding is strict: canonical base64url, the exact layout, no leading zeros, and values
-- within xid8 / bigint range. Anything else is nil, { code = "invalid" }.

local CHECKPOINT_VERSION = "v1"
local XID8_MAX = "18446744073709551615"
local BIGINT_MAX = "9223372036854775807"

-- compares two non-negative decimal strings without leading zeros
local function dec_cmp(a, b)
    if #a ~= #b then
        return #a < #b and -1 or 1
    end
    if a == b then
        return 0
    end
    return a < b and -1 or 1
end

_M.dec_cmp = dec_cmp

-- a bigint column value as a decimal string (LuaJIT hands values beyond 2^53 over as strings)
local function dec(v)
    if type(v) == "string" then
        return v
    end
    return fmt("%d", v)
end

_M.dec = dec

local function encode_checkpoint(tx, pos)
    return core.b64url_encode(CHECKPOINT_VERSION .. "." .. tx .. "." .. pos)
end

local function valid_dec(s, max)
    return s ~= nil and #s <= #max and (s == "0" or sub(s, 1, 1) ~= "0")
           and dec_cmp(s, max) <= 0
end

-- checkpoint (string or nil) -> tx, pos (decimal strings) | nil, err
local function decode_checkpoint(cp)
    if cp == nil or cp == null then
        return "0", "0"
    end
    if type(cp) ~= "string" then
        return nil, new_error("invalid", "checkpoint must be a string, got " .. type(cp))
    end
    local raw = #cp <= 128 and core.b64url_decode(cp)
    local v, tx, pos
    if raw then
        v, tx, pos = match(raw, "^(v%d+)%.(%d+)%.(%d+)$")
    end
    if v ~= CHECKPOINT_VERSION or not valid_dec(tx, XID8_MAX) or not valid_dec(pos, BIGINT_MAX) then
        return nil, new_error("invalid", "not a checkpoint of this event store")
    end
    return tx, pos
end

_M.encode_checkpoint = encode_checkpoint
_M.decode_checkpoint = decode_checkpoint

-- the later of two (tx, pos) pairs
local function later(tx1, pos1, tx2, pos2)
    local c = dec_cmp(tx1, tx2)
    if c > 0 or (c == 0 and dec_cmp(pos1, pos2) >= 0) then
        return tx1, pos1
    end
    return tx2, pos2
end

_M.later = later


-- ---- SQL ---------------------------------------------------------------------------------

local APPEND = [[
INSERT INTO qx_aggregate_events
    (id, aggregate_type, aggregate_id, sequence, event_type, event_name, payload, occurred_at,
     tenant_id)
SELECT (r->'event'->>'event_id')::uuid, r->>'type', r->>'agg', (r->>'seq')::int,
       r->'event'->>'event_name', r->'event'->>'event_name', r->'event',
       (r->'event'->>'occurred_at')::timestamptz, r->'event'->>'tenant_id'
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS x(r, i)
ORDER BY i]]
_M.APPEND_SQL = APPEND

local SNAPSHOT = [[
INSERT INTO qx_aggregate_snapshots
    (id, aggregate_type, aggregate_id, state, version, taken_at, tenant_id, state_version)
SELECT (r->>'id')::uuid, r->>'type', r->>'agg', r->'state', (r->>'version')::int, now(),
       r->>'tenant', (r->>'state_version')::int
FROM jsonb_array_elements($1::jsonb) AS x(r)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
SET state = EXCLUDED.state, version = EXCLUDED.version, taken_at = EXCLUDED.taken_at,
    tenant_id = EXCLUDED.tenant_id, state_version = EXCLUDED.state_version
WHERE qx_aggregate_snapshots.version < EXCLUDED.version]]

-- The columns a record is made of. occurred_at/id/tenant come from the row only when the
-- stored event lacks them (rows written by another writer).
local RECORD_COLUMNS = [[
e.tx_id::text AS tx_id, e.global_position, e.aggregate_type, e.aggregate_id, e.sequence,
e.event_name, e.payload,
CASE WHEN e.payload ? 'event_id' THEN NULL ELSE e.id::text END AS row_id,
CASE WHEN e.payload ? 'occurred_at' THEN NULL
     ELSE to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END
     AS row_occurred_at,
CASE WHEN e.payload ? 'tenant_id' THEN NULL ELSE e.tenant_id END AS row_tenant_id]]
_M.RECORD_COLUMNS = RECORD_COLUMNS

-- snapshot (when wanted and of the class's state_version) + the events after it, one query
local LOAD = [[
WITH s AS (
    SELECT state, version FROM qx_aggregate_snapshots
    WHERE $3::boolean AND aggregate_type = $1 AND aggregate_id = $2
      AND state_version IS NOT DISTINCT FROM $4::int
      AND ($5::text IS NULL OR tenant_id = $5::text)
)
SELECT 0 AS kind, version AS sequence, NULL::text AS event_name, state AS payload,
       NULL::text AS row_id, NULL::text AS row_occurred_at, NULL::text AS row_tenant_id
FROM s
UNION ALL
SELECT 1, e.sequence, e.event_name, e.payload,
       CASE WHEN e.payload ? 'event_id' THEN NULL ELSE e.id::text END,
       CASE WHEN e.payload ? 'occurred_at' THEN NULL
            ELSE to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END,
       CASE WHEN e.payload ? 'tenant_id' THEN NULL ELSE e.tenant_id END
FROM qx_aggregate_events e
WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
  AND e.sequence > coalesce((SELECT version FROM s), 0)
  AND ($5::text IS NULL OR e.tenant_id = $5::text)
ORDER BY 1, 2]]

local READ_STREAM = [[
SELECT ]] .. RECORD_COLUMNS .. [[

FROM qx_aggregate_events e
WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence > $3
  AND ($4::text IS NULL OR e.tenant_id = $4::text)
ORDER BY e.sequence
LIMIT $5]]

-- The events after a position and below the horizon, in (tx_id, global_position) order, at
-- most `limit` of them, as a subquery with the columns of qx_aggregate_events. `x` gives the SQL
-- of each input: after (a row value), horizon, names and types (JSON arrays or NULL), tenant
-- (text or NULL), limit.
--   "all":   one range scan of the (tx_id, global_position) index
--   "names": one range scan of the (event_name, tx_id, global_position) index per event name
--            (k of them, one UNION ALL branch each), each stopping after `limit` rows, merged;
--            so a reader of rare events does not walk past every other event in the log
--   "types": the same over (aggregate_type, tx_id, global_position) per aggregate type
-- The merge is exact: every row of the first `limit` of all matching rows is among the first
-- `limit` rows of its own name (or type). One branch per name, rather than a join with the
-- list, lets the planner see k * limit rows: with a set-returning function it assumes 100 per
-- call, and the inflated cost made PostgreSQL JIT-compile every read (half a second each).
local MAX_KEYS = 64

local function candidates(mode, x, k)
    local function filters(skip)
        local f = {
            "(e.tx_id, e.global_position) > " .. x.after,
            "e.tx_id < " .. x.horizon,
            "(" .. x.tenant .. " IS NULL OR e.tenant_id = " .. x.tenant .. ")",
        }
        if skip ~= "names" then
            f[#f + 1] = "(" .. x.names .. " IS NULL OR e.event_name IN "
                .. "(SELECT jsonb_array_elements_text(" .. x.names .. ")))"
        end
        if skip ~= "types" then
            f[#f + 1] = "(" .. x.types .. " IS NULL OR e.aggregate_type IN "
                .. "(SELECT jsonb_array_elements_text(" .. x.types .. ")))"
        end
        return table.concat(f, "\n      AND ")
    end
    local order = "\n    ORDER BY e.tx_id, e.global_position\n    LIMIT " .. x.limit
    if mode == "all" then
        return "    SELECT * FROM qx_aggregate_events e\n    WHERE " .. filters() .. order
    end
    local key, list = "event_name", x.names
    if mode == "types" then
        key, list = "aggregate_type", x.types
    end
    local branches = {}
    for i = 1, k do
        branches[i] = "    (SELECT * FROM qx_aggregate_events e\n    WHERE e." .. key .. " = ("
            .. list .. " ->> " .. (i - 1) .. ")\n      AND " .. filters(mode) .. order .. ")"
    end
    return "    SELECT * FROM (\n" .. table.concat(branches, "\n    UNION ALL\n")
        .. "\n    ) e" .. order
end

_M.candidates = candidates
_M.MAX_KEYS = MAX_KEYS

-- The mode of a read and its number of keys: by event name when at most MAX_KEYS names are
-- given, else by aggregate type (at most MAX_KEYS), else all, with the lists as filters.
local function read_mode(names, types)
    if names and #names <= MAX_KEYS then
        return "names", #names
    elseif types and #types <= MAX_KEYS then
        return "types", #types
    end
    return "all", 0
end

_M.read_mode = read_mode

-- The global read. One row always comes back (the horizon), with the event columns NULL when
-- there is no event. $1, $2 the checkpoint, $3 event names and $4 aggregate types as JSON
-- arrays or NULL, $5 the tenant or NULL, $6 the limit. One text per mode and key count.
local read_sql_cache = {}

local function read_sql(names, types)
    local mode, k = read_mode(names, types)
    local key = mode .. k
    local sql = read_sql_cache[key]
    if sql == nil then
        sql = [[
SELECT h.horizon::text AS horizon, ]] .. RECORD_COLUMNS .. [[

FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h
LEFT JOIN LATERAL (
]] .. candidates(mode, { after = "($1::xid8, $2::bigint)", horizon = "h.horizon",
                           names = "$3::jsonb", types = "$4::jsonb", tenant = "$5::text",
                           limit = "$6::int" }, k) .. [[

) e ON true
ORDER BY e.tx_id, e.global_position]]
        read_sql_cache[key] = sql
    end
    return sql
end

-- Who holds the horizon: the backend (or prepared transaction) whose transaction id is the
-- horizon, and how many committed events wait above it.
local STALL = [[
WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon)
SELECT h.horizon::text AS horizon,
       (SELECT count(*) FROM qx_aggregate_events w WHERE w.tx_id >= h.horizon) AS withheld,
       (SELECT to_char(min(w.occurred_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        FROM qx_aggregate_events w WHERE w.tx_id >= h.horizon) AS oldest_withheld_at,
       k.kind, k.pid, k.xid, k.gid, k.xact_start, k.age_seconds, k.state, k.wait_event,
       k.application_name, k.usename, k.client_addr, k.query
FROM h LEFT JOIN LATERAL (
    SELECT 'backend' AS kind, a.pid, a.backend_xid::text AS xid, NULL::text AS gid,
           to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
               AS xact_start,
           extract(epoch FROM clock_timestamp() - a.xact_start)::float8 AS age_seconds,
           a.state, a.wait_event_type || ':' || a.wait_event AS wait_event, a.application_name,
           a.usename::text AS usename, a.client_addr::text AS client_addr,
           left(a.query, 500) AS query
    FROM pg_stat_activity a WHERE a.backend_xid = xid(h.horizon)
    UNION ALL
    SELECT 'prepared', NULL, p.transaction::text, p.gid,
           to_char(p.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           extract(epoch FROM clock_timestamp() - p.prepared)::float8, NULL, NULL, NULL,
           p.owner::text, NULL, NULL
    FROM pg_prepared_xacts p WHERE p.transaction = xid(h.horizon)
) k ON true]]


-- ---- the store description ----------------------------------------------------------------

local Store = {}
Store.__index = Store
_M.Store = Store

local STORE_OPTS = { db = true, snapshot_every = true, notify = true }

-- new{ db = db?, snapshot_every = n?, notify = true }
-- db is needed for reads outside a unit of work (read_all, read_stream, stall).
-- notify = false leaves out the wake-up of qx_events listeners (sent after the commit, outside
-- the transaction: see the unit of work); projections then find events by polling.
function _M.new(opts)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error("qx.event_store: options must be a table", 2)
    end
    for k in pairs(opts) do
        if not STORE_OPTS[k] then
            error("qx.event_store: unknown option '" .. tostring(k)
                  .. "' (known: db, snapshot_every, notify)", 2)
        end
    end
    local n = opts.snapshot_every
    if n ~= nil and (type(n) ~= "number" or n ~= floor(n) or n < 0 or n > MAX_VERSION) then
        error("qx.event_store: snapshot_every must be a non-negative integer (0 = never)", 2)
    end
    if opts.db ~= nil and (type(opts.db) ~= "table" or not opts.db.pool) then
        error("qx.event_store: db must come from qx.connect", 2)
    end
    if opts.notify ~= nil and type(opts.notify) ~= "boolean" then
        error("qx.event_store: notify must be a boolean", 2)
    end
    return setmetatable({
        db = opts.db,
        snapshot_every = n or 0,
        notify = opts.notify ~= false,
    }, Store)
end

function _M.is_store(x)
    return getmetatable(x) == Store
end


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


-- the opaque checkpoint just after a record
function _M.checkpoint_after(rec)
    if type(rec) ~= "table" or type(rec._tx_id) ~= "string" or rec._global_position == nil then
        error("checkpoint_after: expected a record returned by a read", 2)
    end
    return encode_checkpoint(rec._tx_id, dec(rec._global_position))
end


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

local READ_OPTS = { after = true, limit = true, types = true, aggregate_type = true,
                    tenant_id = true }

-- The global read, given something with :query (a db or a unit of work).
-- -> records, next_checkpoint | nil, err
local function read_all(q, method, opts)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error(method .. ": options must be a table", 3)
    end
    for k in pairs(opts) do
        if not READ_OPTS[k] then
            error(method .. ": unknown option '" .. tostring(k)
                  .. "' (known: after, limit, types, aggregate_type, tenant_id)", 3)
        end
    end
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

    local rows, e = q:query(read_sql(types, categories), tx, pos, types, categories, tenant,
                            limit)
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
    opts = opts or {}
    for k in pairs(opts) do
        if k ~= "after_sequence" and k ~= "limit" then
            error(method .. ": unknown option '" .. tostring(k)
                  .. "' (known: after_sequence, limit)", 3)
        end
    end
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
    local rows, e = q:query(READ_STREAM, t, sid, after, tenant, limit)
    if not rows then
        return nil, e
    end
    for i = 1, #rows do
        rows[i] = to_record(rows[i])
    end
    return rows
end


-- store:read_all{ after = checkpoint, limit = 500, types = {...}, aggregate_type = ...,
--                 tenant_id = ... } -> records, next_checkpoint | nil, err
function Store:read_all(opts)
    check_store(self, "read_all")
    return read_all(need_db(self, "read_all"), "store:read_all", opts)
end


-- store:read_category(aggregate_type, { after, limit, types, tenant_id })
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


-- store:each{ after, batch = 500, types, aggregate_type, tenant_id } -> iterator
-- for record, checkpoint in store:each{...} do ... end - reads batch by batch (constant
-- memory); checkpoint is where to resume after that record. A read error raises.
function Store:each(opts)
    check_store(self, "each")
    local db = need_db(self, "each")
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
        return rec, (batch[i + 1] == nil and after or _M.checkpoint_after(rec))
    end
end


-- store:read_stream(aggregate_type, id, { after_sequence = 0, limit }) -> records
function Store:read_stream(agg_type, id, opts)
    check_store(self, "read_stream")
    return read_stream(need_db(self, "read_stream"), "store:read_stream", agg_type, id, opts)
end


-- store:head() -> checkpoint at the horizon now: reading from it returns only events that
-- commit (or become readable) after this call. For a reader that wants only new events.
function Store:head()
    check_store(self, "head")
    local rows, e = need_db(self, "head"):query(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon")
    if not rows then
        return nil, e
    end
    return encode_checkpoint(rows[1].horizon, "0")
end


-- store:stall() -> report | nil, err
-- { stalled = bool, horizon = xid, withheld = n committed events not yet readable,
--   oldest_withheld_at = iso | nil,
--   holders = { { kind = "backend" | "prepared", pid, xid, gid, xact_start, age_seconds,
--                 state, wait_event, application_name, usename, client_addr, query } } }
-- Reading is held back when a transaction that has written (holds an xid) stays open; its
-- events and every event committed after it wait until it ends.
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


-- ---- bound to a unit of work ------------------------------------------------------------

local Bound = {}
Bound.__index = Bound
_M.Bound = Bound

-- bind(store, uow) -> the store's operations inside that transaction
function _M.bind(store, uow)
    if getmetatable(store) ~= Store then
        error("uow:store: expected a store made by qx.event_store{...}", 3)
    end
    return setmetatable({ store = store, uow = uow }, Bound)
end


local function check_bound(self, method)
    if getmetatable(self) ~= Bound then
        error("es:" .. method .. ": call as es:" .. method .. "(...)", 3)
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


-- es:load(Class, id[, { snapshot = true }]) -> instance | nil (no events) | nil, err
function Bound:load(class, id, opts)
    check_bound(self, "load")
    if not es_class.is_class(class) then
        local what = aggregate.is_class(class) and ("aggregate class " .. class.aggregate_type
            .. ", which is not event-sourced (use qx.event_sourced)") or type(class)
        error("es:load: expected an event-sourced class, got " .. what, 2)
    end
    if type(id) ~= "string" and type(id) ~= "number" then
        error("es:load: id must be a string or a number, got " .. type(id), 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("es:load: options must be a table", 2)
    end
    for k in pairs(opts or {}) do
        if k ~= "snapshot" then
            error("es:load: unknown option '" .. tostring(k) .. "' (known: snapshot)", 2)
        end
    end
    local use_snapshot = not (opts and opts.snapshot == false)
    local spec = es_class.spec(class)
    local rows, e = self.uow:query(LOAD, class.aggregate_type, tostring(id), use_snapshot,
                                   spec.snapshot_version, tenant_of(self.uow))
    if not rows then
        return nil, e
    end
    if #rows == 0 then
        return nil
    end

    local self_ = class.new(id)
    local first = 1
    if rows[1].kind == 0 then
        local state = rows[1].payload
        if type(state) ~= "table" then
            return nil, new_error("invalid", tostring(self_) .. ": snapshot state is not an object")
        end
        self_:restore(state)
        self_.version = rows[1].sequence
        first = 2
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


-- Checks one aggregate and stamps its events. Returns the aggregate type, the id as text, the
-- version, the events to store (the pending list itself when none of them is an integration
-- event), how many they are, and the snapshot row or nil | nil, err. Nothing is drained here.
-- The rows themselves are written by core.json_rows (EVENT_ROW): each stored event is its own
-- fields, metadata and payload side by side, less the routing fields and "_" keys.
local function prepare(store, uow, agg, opts)
    local class = es_class.class_of(agg)
    if class == nil then
        error("es:append: expected an event-sourced aggregate instance, got "
              .. (aggregate.is_aggregate(agg) and tostring(agg) or type(agg)), 3)
    end
    local agg_type = class.aggregate_type
    if opts and opts.aggregate_type ~= nil then
        if type(opts.aggregate_type) ~= "string" or opts.aggregate_type == "" then
            error("es:append: aggregate_type must be a non-empty string", 3)
        end
        agg_type = opts.aggregate_type
    end
    local id = rawget(agg, "id")
    local sid = id
    if type(id) ~= "string" then
        if type(id) ~= "number" then
            return nil, new_error("invalid", tostring(agg) .. ": id must be a string or a number")
        end
        sid = tostring(id)
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
    local ok, e = internal.queue(uow, APPEND, rows_json)
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
        error(method .. ": options must be a table", 3)
    end
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


-- es:append(aggregate[, { aggregate_type = name }]) -> true | nil, err
function Bound:append(agg, opts)
    check_bound(self, "append")
    if opts ~= nil and type(opts) ~= "table" then
        error("es:append: options must be a table", 2)
    end
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


-- es:append_batch({ aggregates... }[, opts]) -> true | nil, err: one insert for all
function Bound:append_batch(list, opts)
    check_bound(self, "append_batch")
    if type(list) ~= "table" or aggregate.is_aggregate(list) then
        error("es:append_batch: expected a list of aggregates", 2)
    end
    local seen = {}
    for i, agg in ipairs(list) do
        if seen[agg] then
            error("es:append_batch: aggregate " .. i .. " is in the list twice", 2)
        end
        seen[agg] = true
    end
    return append_all(self, list, opts, "es:append_batch")
end


-- es:read_stream(aggregate_type, id, { after_sequence, limit }) -> records (in this
-- transaction; limited to the context's tenant when it has one)
function Bound:read_stream(agg_type, id, opts)
    check_bound(self, "read_stream")
    return read_stream(self.uow, "es:read_stream", agg_type, id, opts, tenant_of(self.uow))
end


-- es:read_all{...}: the global read inside this transaction (same rules as store:read_all)
function Bound:read_all(opts)
    check_bound(self, "read_all")
    return read_all(self.uow, "es:read_all", opts)
end


return _M

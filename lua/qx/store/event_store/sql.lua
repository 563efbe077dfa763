-- Internal to qx.store.event_store: the statements of the event store, and the builder of the
-- global read's text (one text per read mode and key count). See docs/event-store.md.
local core = require "qx.core"

local _M = {}

-- %s: the trace columns and their values ($2, $3) for a unit of work with a trace context
local APPEND_SHAPE = [[
INSERT INTO qx_aggregate_events
    (id, aggregate_type, aggregate_id, sequence, event_type, event_name, payload, occurred_at,
     tenant_id%s)
SELECT (r->'event'->>'event_id')::uuid, r->>'type', r->>'agg', (r->>'seq')::int,
       r->'event'->>'event_name', r->'event'->>'event_name', r->'event',
       (r->'event'->>'occurred_at')::timestamptz, r->'event'->>'tenant_id'%s
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS x(r, i)
ORDER BY i]]
local APPEND = APPEND_SHAPE:format("", "")
_M.APPEND_SQL = APPEND -- the insert alone (the bench's baseline runs it)
-- the insert as queued by a unit of work: it also reads the transaction's id and timeline, so
-- the commit sends no statement of its own to learn them (tx:queue_id)
_M.APPEND = "WITH a AS (" .. APPEND .. ")\nSELECT " .. core.TX_ID_COLUMNS
-- the same for a unit of work with a trace context: every row takes $2 and $3 (traceparent,
-- tracestate); one without it sends the text above, unchanged
_M.APPEND_TRACED = "WITH a AS (" .. APPEND_SHAPE:format(", traceparent, tracestate",
                                                       ", $2::text, $3::text")
    .. ")\nSELECT " .. core.TX_ID_COLUMNS

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
CASE WHEN e.payload ? 'tenant_id' THEN NULL ELSE e.tenant_id END AS row_tenant_id,
e.traceparent, e.tracestate]]
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
UNION ALL
SELECT 2, a.last_sequence, NULL, NULL, NULL, NULL, NULL
FROM qx_archived_streams a
WHERE a.aggregate_type = $1 AND a.aggregate_id = $2
  AND ($5::text IS NULL OR a.tenant_id = $5::text)
ORDER BY 1, 2]]

-- An archived stream's events, for es:load(..., { archived = true }): no snapshot (archiving
-- drops it), the rows of the same shape as LOAD's events.
local LOAD_ARCHIVED = [[
SELECT 1 AS kind, e.sequence, e.event_name, e.payload,
       CASE WHEN e.payload ? 'event_id' THEN NULL ELSE e.id::text END AS row_id,
       CASE WHEN e.payload ? 'occurred_at' THEN NULL
            ELSE to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') END
            AS row_occurred_at,
       CASE WHEN e.payload ? 'tenant_id' THEN NULL ELSE e.tenant_id END AS row_tenant_id
FROM qx_aggregate_events_archive e
WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
  AND ($3::text IS NULL OR e.tenant_id = $3::text)
ORDER BY e.sequence]]

-- Archives one stream (qx_archive_stream, migration "archived streams"): $1 type, $2 id,
-- $3 tenant or NULL, $4 the expected version or NULL.
local ARCHIVE = [[
SELECT events, last_sequence, archived_at FROM qx_archive_stream($1, $2, $3::text, $4::int)]]

-- The columns the reads take from either table: the union of the hot table and the archive is
-- read by name, so a column only one of them has does not break it. A record column added to
-- RECORD_COLUMNS must be added here (and to both tables).
local EVENT_COLUMNS = "e.id, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, "
    .. "e.event_name, e.payload, e.occurred_at, e.tenant_id, e.global_position, e.tx_id, "
    .. "e.traceparent, e.tracestate"
_M.EVENT_COLUMNS = EVENT_COLUMNS

-- One stream's events after a sequence; the archive's too when $6 (archived = true) and the
-- stream is archived. One row always comes back: archived says whether the stream is, the
-- event columns are NULL when there is no event.
local READ_STREAM = [[
SELECT a.archived, ]] .. RECORD_COLUMNS .. [[

FROM (SELECT EXISTS (SELECT 1 FROM qx_archived_streams s
                     WHERE s.aggregate_type = $1 AND s.aggregate_id = $2
                       AND ($4::text IS NULL OR s.tenant_id = $4::text)) AS archived) a
LEFT JOIN LATERAL (
    (SELECT ]] .. EVENT_COLUMNS .. [[ FROM qx_aggregate_events e
     WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence > $3
       AND ($4::text IS NULL OR e.tenant_id = $4::text)
     ORDER BY e.sequence LIMIT $5)
    UNION ALL
    (SELECT ]] .. EVENT_COLUMNS .. [[ FROM qx_aggregate_events_archive e
     WHERE a.archived AND $6::boolean
       AND e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence > $3
       AND ($4::text IS NULL OR e.tenant_id = $4::text)
     ORDER BY e.sequence LIMIT $5)
    ORDER BY sequence LIMIT $5
) e ON true
ORDER BY e.sequence]]

-- The events after a position and below the horizon, in (tx_id, global_position) order, at most
-- `limit`, as a subquery: one index range scan, or one per event name (or aggregate type),
-- merged. See docs/event-store.md ("The global read, by index") for why one branch per name.
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
    -- the hot table and the archive, each one range scan of its own index (archived streams)
    local function both(where)
        return "    (SELECT " .. EVENT_COLUMNS .. " FROM qx_aggregate_events e\n    WHERE " .. where
            .. order .. ")\n    UNION ALL\n    (SELECT " .. EVENT_COLUMNS
            .. " FROM qx_aggregate_events_archive e\n    WHERE " .. where .. order .. ")"
    end
    if mode == "all" then
        return "    SELECT * FROM (\n" .. both(filters()) .. "\n    ) e" .. order
    end
    local key, list = "event_name", x.names
    if mode == "types" then
        key, list = "aggregate_type", x.types
    end
    local branches = {}
    for i = 1, k do
        branches[i] = both("e." .. key .. " = (" .. list .. " ->> " .. (i - 1) .. ")\n      AND "
                           .. filters(mode))
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
       (SELECT count(*) FROM (SELECT 1 FROM qx_aggregate_events w WHERE w.tx_id >= h.horizon
                              UNION ALL
                              SELECT 1 FROM qx_aggregate_events_archive w
                              WHERE w.tx_id >= h.horizon) w) AS withheld,
       (SELECT to_char(min(w.occurred_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        FROM (SELECT occurred_at FROM qx_aggregate_events w WHERE w.tx_id >= h.horizon
              UNION ALL
              SELECT occurred_at FROM qx_aggregate_events_archive w WHERE w.tx_id >= h.horizon) w)
           AS oldest_withheld_at,
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


_M.SNAPSHOT = SNAPSHOT
_M.LOAD = LOAD
_M.LOAD_ARCHIVED = LOAD_ARCHIVED
_M.ARCHIVE = ARCHIVE
_M.READ_STREAM = READ_STREAM
_M.read_sql = read_sql
_M.STALL = STALL

return _M

-- Internal to qx.projection: what a projection counts for its metrics (batch apply times, events
-- applied by this process) and its Prometheus text, lag included. See docs/projections.md.
local metrics = require "qx.metrics"

local _M = { _VERSION = "0.1.0" }

-- seconds a batch takes, from a read of a few events to a long catch-up's full batch
_M.BOUNDS = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }

-- lag: the events with a handler not applied yet (in the hot table and the archive), and the
-- age of the oldest of them; per event name, one index range of each table
local LAG_IN = [[
        SELECT e.occurred_at, e.aggregate_type FROM %s e
        WHERE e.event_name = en.name
          AND (e.tx_id, e.global_position) > (c.tx_id, c.global_position)]]
local LAG = [[
SELECT coalesce(sum(k.n), 0)::bigint AS n,
       coalesce(extract(epoch FROM now() - min(k.oldest)), 0)::float8 AS seconds
FROM qx_projection_checkpoints c
CROSS JOIN LATERAL jsonb_array_elements_text($2::jsonb) AS en(name)
CROSS JOIN LATERAL (
    SELECT count(*) AS n, min(u.occurred_at) AS oldest
    FROM (]] .. LAG_IN:format("qx_aggregate_events") .. [[

          UNION ALL
]] .. LAG_IN:format("qx_aggregate_events_archive") .. [[) u
    WHERE $3::jsonb IS NULL OR u.aggregate_type IN (SELECT jsonb_array_elements_text($3::jsonb))
) k
WHERE c.projection_name = $1]]

-- the counters a new projection starts with
function _M.counters()
    return { applied = 0, batches = 0, apply = metrics.histogram(_M.BOUNDS) }
end

-- a batch of n events took seconds (its unit of work, commit included)
function _M.observe(c, seconds, n)
    c.applied = c.applied + n
    c.batches = c.batches + 1
    c.apply:observe(seconds)
end

-- p: the projection -> { events, seconds } | nil, err
function _M.lag(p)
    local rows, e = p.db:query(LAG, p.key, p.types, p.categories)
    if not rows then return nil, e end
    local r = rows[1]
    return { events = r and r.n or 0, seconds = r and r.seconds or 0 }
end

-- p: the projection -> Prometheus text | nil, err (the lag could not be read)
function _M.text(p)
    local lag, e = _M.lag(p)
    if not lag then return nil, e end
    local c = p._counters
    local m = metrics.new(p.version and metrics.labels("projection", p.name, "version", p.version)
                          or metrics.labels("projection", p.name))
    m:add("qx_projection_lag_events", "gauge",
          "Events with a handler in the event store not applied yet.", lag.events)
    m:add("qx_projection_lag_seconds", "gauge",
          "Age of the oldest event not applied yet (0 when caught up).", lag.seconds)
    m:add("qx_projection_events_applied_total", "counter",
          "Events applied by this process.", c.applied)
    m:add("qx_projection_batches_total", "counter",
          "Batches that applied events, by this process.", c.batches)
    m:add_histogram("qx_projection_batch_apply_seconds",
                    "Time to apply one batch (its unit of work, commit included).", c.apply)
    return m:text()
end

return _M

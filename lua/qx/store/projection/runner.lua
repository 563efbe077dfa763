--- Projections: read models kept up to date from the event store, exactly once.
--
--   local balances = qx.projection{ name = "account_balances", db = db,
--       handlers = { [Deposited] = function(ev, uow) ... end },
--       reset = function(uow) assert(uow:exec("TRUNCATE balances")) end }
--   balances:catch_up()    -- or :run() (then wait for NOTIFY qx_events), :rebuild()
--
-- Each batch is one unit of work that locks the checkpoint row, reads with the event store's
-- gap-safe read, runs the handlers and moves the checkpoint. See docs/projections.md.
local core = require "qx.core"
local options = require "qx.options"
local qx_error = require "qx.error"
local store_mod = require "qx.store.event_store"
local slots = require "qx.store.projection.rebuild_slots"
local versions = require "qx.store.projection.versions"
local definition = require "qx.store.projection.definition"
local registry_mod = require "qx.model.registry"
local metrics_server = require "qx.metrics_server"
local pmetrics = require "qx.store.projection.metrics"
local tracing = require "qx.tracing"
local personal = require "qx.store.personal"
local forget = require "qx.store.forget"

local type = type
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local xpcall = xpcall
local floor = math.floor
local min = math.min
local max = math.max
local fmt = string.format
local clock = core.clock
local signals_watch, signals_sleep = core.signals_watch, core.signals_sleep
local null = core.null
local to_record = store_mod.to_record
local evolve_record = registry_mod.evolve_record
local encode_checkpoint = store_mod.encode_checkpoint
local later = store_mod.later
local dec = store_mod.dec

local _M = { _VERSION = "0.1.0" }

--- Options of qx.projection. on_progress gets { name, version, applied (= done), total,
-- remaining, elapsed_seconds, rate, eta_seconds, global_position } at most every
-- progress_interval_seconds; false: no report.
---@class qx.ProjectionOptions
---@field name string the checkpoint's name (required)
---@field db qx.Db (required)
---@field handlers table { [EventClass or "event.name"] = fn(ev, uow, p) } (required)
---@field aggregate_type string? only this aggregate type's events
---@field batch_size integer? events per unit of work (500)
---@field reset (fun(uow: qx.Uow, p: qx.Projection))? empties the read model, for rebuild()
---@field on_progress (fun(info: table)|false)? long catch-ups: default a line on stderr
---@field progress_interval_seconds number? (5)
---@field version integer? a blue/green version (1 or more): own tables and checkpoint
---@field tables string[]? with version: the read model's tables, each read through a view
---@field setup (fun(uow: qx.Uow, p: qx.Projection))? with version: creates its tables, once
---@field max_rebuilds integer? rebuilds at once per database (QX_PROJECTION__MAX_REBUILDS, 2)
---@field on_forget (fun(subject_id: string, uow: qx.Uow, p: qx.Projection))? erases a
--- forgotten subject from the read model (docs/erasure.md)

--- A projection (qx.projection).
---@class qx.Projection
local Projection = {}
Projection.__index = Projection
_M.Projection = Projection


local ENSURE = [[
INSERT INTO qx_projection_checkpoints (projection_name) VALUES ($1)
ON CONFLICT (projection_name) DO NOTHING]]

-- One batch: lock the checkpoint row, read the events after it below the horizon. One row
-- always comes back while the checkpoint row exists (event columns NULL when there is none);
-- withheld says whether committed events wait above the horizon (a transaction holds it).
local function batch_sql(names, types)
    local mode, k = store_mod.read_mode(names, types)
    return [[
WITH cp AS (
    SELECT tx_id, global_position FROM qx_projection_checkpoints
    WHERE projection_name = $1 FOR UPDATE
), h AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon
)
SELECT cp.tx_id::text AS cp_tx, cp.global_position AS cp_pos, h.horizon::text AS horizon,
       (EXISTS (SELECT 1 FROM qx_aggregate_events w WHERE w.tx_id >= h.horizon)
        OR EXISTS (SELECT 1 FROM qx_aggregate_events_archive w WHERE w.tx_id >= h.horizon))
           AS withheld,
       ]] .. store_mod.RECORD_COLUMNS .. [[

FROM cp CROSS JOIN h
LEFT JOIN LATERAL (
]] .. store_mod.candidates(mode, { after = "(cp.tx_id, cp.global_position)", horizon = "h.horizon",
                                     names = "$2::jsonb", types = "$3::jsonb",
                                     tenant = "NULL::text", limit = "$4::int" }, k) .. [[

) e ON true
ORDER BY e.tx_id, e.global_position]]
end

local ADVANCE = [[
UPDATE qx_projection_checkpoints
SET tx_id = $2::xid8, global_position = $3::bigint, events_applied = events_applied + $4,
    last_sequence = least($3::bigint, 2147483647)::int, updated_at = now()
WHERE projection_name = $1]]

local RESET = [[
UPDATE qx_projection_checkpoints
SET tx_id = '0', global_position = 0, events_applied = 0, last_sequence = 0,
    rebuilt_at = now(), updated_at = now()
WHERE projection_name = $1]]

local LOCK = [[
SELECT 1 AS one FROM qx_projection_checkpoints WHERE projection_name = $1 FOR UPDATE]]

-- one index range of qx_aggregate_events_name per event name: progress reports run it often,
-- and a scan of every event after the checkpoint would read the other names' too
local REMAINING = [[
SELECT coalesce(sum(k.n), 0)::bigint AS n
FROM qx_projection_checkpoints c
CROSS JOIN LATERAL jsonb_array_elements_text($2::jsonb) AS en(name)
CROSS JOIN LATERAL (
    SELECT (SELECT count(*) FROM qx_aggregate_events e
            WHERE e.event_name = en.name
              AND (e.tx_id, e.global_position) > (c.tx_id, c.global_position)
              AND ($3::jsonb IS NULL
                   OR e.aggregate_type IN (SELECT jsonb_array_elements_text($3::jsonb))))
         + (SELECT count(*) FROM qx_aggregate_events_archive e
            WHERE e.event_name = en.name
              AND (e.tx_id, e.global_position) > (c.tx_id, c.global_position)
              AND ($3::jsonb IS NULL
                   OR e.aggregate_type IN (SELECT jsonb_array_elements_text($3::jsonb)))) AS n
) k
WHERE c.projection_name = $1]]

-- global_position: that of the last event the projection applied, in its reading order. The
-- checkpoint's own position is not it: a caught-up checkpoint is (horizon, 0).
local STATUS = [[
SELECT c.tx_id::text AS tx_id, c.global_position AS cp_pos, c.events_applied, c.last_sequence,
       to_char(c.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS updated_at,
       to_char(c.rebuilt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS rebuilt_at,
       coalesce((SELECT e.global_position
                 FROM (SELECT tx_id, global_position, event_name, aggregate_type
                       FROM qx_aggregate_events
                       UNION ALL
                       SELECT tx_id, global_position, event_name, aggregate_type
                       FROM qx_aggregate_events_archive) e
                 WHERE (e.tx_id, e.global_position) <= (c.tx_id, c.global_position)
                   AND ($2::jsonb IS NULL
                        OR e.event_name IN (SELECT jsonb_array_elements_text($2::jsonb)))
                   AND ($3::jsonb IS NULL
                        OR e.aggregate_type IN (SELECT jsonb_array_elements_text($3::jsonb)))
                 ORDER BY e.tx_id DESC, e.global_position DESC LIMIT 1), 0) AS global_position,
       (SELECT v.live FROM qx_projection_versions v
        WHERE v.checkpoint_name = c.projection_name) AS live
FROM qx_projection_checkpoints c WHERE c.projection_name = $1]]


local RUN_OPTIONS = { "poll_ms", "stop", "max_seconds", "metrics_listen", "health_stale_ms",
                      "handle_signals" }





--- A projection: a read model fed from the event store, exactly once (qx.projection).
-- Raises on bad options. See docs/projections.md.
---@param opts qx.ProjectionOptions
---@return qx.Projection
function _M.new(opts)
    local d = definition.parse(opts)
    local self = setmetatable({
        name = d.name,
        key = d.key,
        version = d.version,
        tables = d.tables,
        setup = d.setup,
        max_rebuilds = d.max_rebuilds,
        db = opts.db,
        on_forget = opts.on_forget,
        handlers = d.handlers,
        classes = d.classes,
        types = d.types,
        categories = d.categories,
        batch_size = d.batch_size,
        reset = opts.reset,
        _batch_sql = batch_sql(d.types, d.categories),
        on_progress = d.on_progress,
        progress_interval = d.progress_interval,
        _ready = false,
        _stopping = false,
        _counters = pmetrics.counters(),
    }, Projection)
    -- (a version's tables are made at its registration: forget ensures it before its hook)
    if self.on_forget then forget.register(self.db, self, _M._ensure) end
    return self
end


local function check(self, method)
    if getmetatable(self) ~= Projection then
        error("projection:" .. method .. ": call as p:" .. method .. "(...)", 3)
    end
end


local function ensure(self)
    if self._ready then
        return true
    end
    if self.version then
        local ok, e = versions._register(self)
        if not ok then
            return nil, e
        end
        self._ready = true
        return true
    end
    local n, e = self.db:exec(ENSURE, self.key)
    if not n then
        return nil, e
    end
    self._ready = true
    return true
end


_M._ensure = ensure


-- Runs one handler; a raised error or a nil/false, err return fails the batch, annotated with
-- the event it was handling.
local function apply(self, fn, rec, uow)
    local start = rec._traceparent and tracing._spans_wanted() and tracing._time()
    local ok, r1, r2 = xpcall(fn, qx_error.handler, rec, uow, self)
    if start then
        tracing._span("qx.projection.apply", start, rec._traceparent, rec._tracestate, {
            ["qx.projection"] = self.name, ["qx.event_name"] = rec.event_name,
            ["qx.event_id"] = rec.event_id, ["qx.global_position"] = rec._global_position,
            ["qx.outcome"] = (not ok or ((r1 == nil or r1 == false) and r2 ~= nil))
                and "failed" or "applied",
        })
    end
    local failure
    if not ok then
        failure = r1
    elseif (r1 == nil or r1 == false) and r2 ~= nil then
        failure = qx_error.is(r2) and r2 or qx_error.new("error", tostring(r2))
    end
    if failure then
        failure.projection = self.name
        failure.event_id = rec.event_id
        failure.event_name = rec.event_name
        failure.global_position = rec._global_position
        failure.message = fmt("projection %s, %s %s (position %s): %s", self.name,
            tostring(rec.event_name), tostring(rec.event_id), tostring(rec._global_position),
            tostring(failure.message))
        error(failure, 0)
    end
end


-- One batch in one unit of work -> { n, caught_up, withheld, global_position } | nil, err
local function run_batch(self)
    local result
    local ok, e = self.db:unit_of_work(function(uow)
        local rows, qe = uow:query(self._batch_sql, self.key, self.types, self.categories,
                                   self.batch_size)
        if not rows then
            error(qe, 0)
        end
        local head = rows[1]
        if head == nil then
            result = { missing = true }
            return true
        end
        local tx, pos = head.cp_tx, dec(head.cp_pos)
        local recs = {}
        for i = 1, #rows do
            local r = rows[i]
            if r.tx_id ~= null then recs[#recs + 1] = to_record(r) end
        end
        -- opened as stored (the ciphertext is bound to the stored field names), then upcast;
        -- the subjects' keys are held until this batch commits: a concurrent forget waits and
        -- then runs on_forget over what the batch wrote
        local opened, pe = personal.open_all(uow, recs)
        if not opened then
            pe.projection = self.name
            pe.message = fmt("projection %s: %s", self.name, pe.message)
            error(pe, 0)
        end
        local n = #recs
        local last = recs[n]
        for i = 1, n do
            local rec = recs[i]
            local class = self.classes[rec.event_name]
            if class then
                local er
                rec, er = evolve_record(class, rec)
                if not rec then
                    er.projection = self.name
                    er.message = fmt("projection %s: %s", self.name, er.message)
                    error(er, 0)
                end
            end
            apply(self, self.handlers[rec.event_name], rec, uow)
        end
        local new_tx, new_pos = tx, pos
        if last then
            new_tx, new_pos = last._tx_id, dec(last._global_position)
        end
        local caught_up = n < self.batch_size
        if caught_up then
            new_tx, new_pos = later(new_tx, new_pos, head.horizon, "0")
        end
        if new_tx ~= tx or new_pos ~= pos then
            local qok, ue = uow:queue(ADVANCE, self.key, new_tx, new_pos, n)
            if not qok then
                error(ue, 0)
            end
        end
        result = { n = n, caught_up = caught_up, withheld = head.withheld,
                   global_position = last and last._global_position }
        return true
    end)
    if not ok then
        return nil, e
    end
    return result
end


local function remaining(self)
    local rows = self.db:query(REMAINING, self.key, self.types, self.categories)
    return rows and rows[1] and rows[1].n or nil
end


local function progress_info(self, started, done, position, left)
    local elapsed = clock() - started
    local rate = elapsed > 0 and done / elapsed or 0
    return {
        name = self.name,
        version = self.version,
        applied = done,
        done = done,
        total = left and done + left or nil,
        remaining = left,
        elapsed_seconds = elapsed,
        rate = rate,
        eta_seconds = (left and rate > 0) and left / rate or nil,
        global_position = position,
    }
end


-- The catch-up loop; final: report once more when done (a rebuild's last line says 100%).
local function catch_up(self, final)
    local ok, e = ensure(self)
    if not ok then
        return nil, e
    end
    self._stopping = false
    local total = 0
    local started = clock()
    local next_report = started + self.progress_interval
    local position
    while true do
        local r
        local t0 = clock()
        r, e = run_batch(self)
        if not r then
            return nil, e
        end
        if r.n and r.n > 0 then pmetrics.observe(self._counters, clock() - t0, r.n) end
        if self._server then self._server:tick(true) end
        if r.missing then
            if self.version then
                -- a dropped version stays dropped: its tables are gone
                return nil, qx_error.new("not_found", fmt("projection %s version %d was dropped",
                                                          self.name, self.version))
            end
            -- the row went away (deleted by hand): create it again, start over
            self._ready = false
            ok, e = ensure(self)
            if not ok then
                return nil, e
            end
        else
            total = total + r.n
            position = r.global_position or position
            local now = clock()
            if self.on_progress and now >= next_report and not r.caught_up then
                next_report = now + self.progress_interval
                self.on_progress(progress_info(self, started, total, position, remaining(self)))
            end
            if r.caught_up or self._stopping or (self._signals and signals_sleep(0)) then
                if final and self.on_progress then
                    self.on_progress(progress_info(self, started, total, position, 0))
                end
                return total, { withheld = r.withheld }
            end
        end
    end
end


--- Applies batches until one comes back short: everything readable now is applied. withheld
-- is true when committed events wait behind an open transaction (store:stall() says which).
---@return integer|nil applied events applied
---@return table|qx.Error info { withheld = boolean }, or the error
function Projection:catch_up()
    check(self, "catch_up")
    return catch_up(self, false)
end


--- A running run() or catch_up() returns after the current batch (call it from a handler,
-- on_progress, or the stop function given to run).
function Projection:stop()
    check(self, "stop")
    self._stopping = true
end


-- Waits up to ms for a NOTIFY; watching signals, in slices, so that one ends the wait soon.
local function wait_for_append(conn, ms, signals)
    if not signals then
        return conn:notifications(floor(ms))
    end
    local deadline = clock() + ms / 1000
    repeat
        local notes, e = conn:notifications(floor(max(0, min(100, (deadline - clock()) * 1000))))
        if not notes or #notes > 0 then
            return notes, e
        end
    until signals_sleep(0) or clock() >= deadline
    return {}
end


--- Catches up, then sleeps on LISTEN qx_events until an append commits (or poll_ms passes) and
-- catches up again, until stop() returns true, p:stop() is called, or max_seconds pass. While
-- events are withheld behind an open transaction it polls sooner (10 ms, doubling up to
-- poll_ms). A database error ends the run with nil, err; the checkpoint keeps what was applied.
-- With handle_signals, SIGTERM and SIGINT stop it too, after the batch in flight commits (they
-- no longer end the process while it runs; the handlers before it come back when it returns).
-- With metrics_listen = "HOST:PORT" it serves /metrics (Projection:metrics()) and /health there
-- while it runs, /health stale after health_stale_ms (default 5000 + poll_ms): see
-- docs/projections.md; an address that cannot be bound: nil, err at once.
---@param opts table|nil { poll_ms = 1000, stop = fn() -> boolean, max_seconds, metrics_listen,
---  health_stale_ms, handle_signals }
---@return integer|nil applied events applied
---@return qx.Error? err
function Projection:run(opts)
    check(self, "run")
    if opts ~= nil and type(opts) ~= "table" then
        error("projection:run: options must be a table", 2)
    end
    opts = options.check(opts, RUN_OPTIONS, "projection:run")
    local poll = opts.poll_ms or 1000
    if type(poll) ~= "number" or poll < 1 then
        error("projection:run: poll_ms must be a positive number", 2)
    end
    if opts.stop ~= nil and type(opts.stop) ~= "function" then
        error("projection:run: stop must be a function", 2)
    end
    if opts.max_seconds ~= nil and (type(opts.max_seconds) ~= "number" or opts.max_seconds < 0) then
        error("projection:run: max_seconds must be a non-negative number", 2)
    end
    if opts.handle_signals ~= nil and type(opts.handle_signals) ~= "boolean" then
        error("projection:run: handle_signals must be a boolean", 2)
    end
    local signals = opts.handle_signals == true
    local deadline = opts.max_seconds and clock() + opts.max_seconds
    local server, se = metrics_server.start(opts, "projection:run", 5000 + floor(poll),
                                            function() return pmetrics.text(self) end)
    if se then
        return nil, se
    end

    -- listen first, so that an append committing during the first catch-up still wakes us
    local conn, e = self.db:acquire()
    if not conn then
        if server then server:close() end
        return nil, e
    end
    local ok
    ok, e = conn:listen(store_mod.CHANNEL)
    if not ok then
        conn:release()
        if server then server:close() end
        return nil, e
    end
    self._server = server
    if server then server:tick(true) end -- listening: the loop is up
    self._stopping = false
    if signals then
        signals_watch(true)
        self._signals = true
    end
    -- the loop runs protected so that the LISTEN connection goes back to the pool whatever
    -- happens in a handler or the stop function
    local done, total, failure = pcall(function()
        local sum, soon = 0, nil
        while true do
            local n, info = self:catch_up()
            if not n then
                return nil, info
            end
            sum = sum + n
            if self._stopping or (opts.stop and opts.stop())
               or (deadline and clock() >= deadline) or (signals and signals_sleep(0)) then
                return sum
            end
            local wait = poll
            if info.withheld then
                soon = soon and min(soon * 2, poll) or 10
                wait = soon
            else
                soon = nil
            end
            if deadline then
                wait = max(0, min(wait, (deadline - clock()) * 1000))
            end
            if server then server:tick(conn:status() ~= "bad", "the LISTEN connection is lost") end
            local notes, ne = wait_for_append(conn, wait, signals)
            if not notes then
                return nil, ne
            end
        end
    end)
    conn:release()
    self._server = nil
    if server then server:close() end
    if signals then
        self._signals = nil
        signals_watch(false)
    end
    if not done then
        error(total, 0)
    end
    return total, failure
end


--- Prometheus text: lag in events and seconds (the age of the oldest event not applied yet),
-- events applied and batches by this process, and the batch apply time as a histogram.
---@return string|nil text
---@return qx.Error? err
function Projection:metrics()
    check(self, "metrics")
    local ok, e = ensure(self)
    if not ok then
        return nil, e
    end
    return pmetrics.text(self)
end


--- In one transaction: reset(uow, p) (when given) and the checkpoint back to the start; then a
-- catch-up replays every event, reporting progress (and once more at the end). Without reset,
-- handlers replay over the read model as it is. At most max_rebuilds rebuilds run at once on a
-- database: one more gets conflict at once.
---@return integer|nil applied events applied
---@return qx.Error? err conflict when the cap is reached
function Projection:rebuild()
    check(self, "rebuild")
    local ok, e = ensure(self)
    if not ok then
        return nil, e
    end
    local slot
    slot, e = slots.acquire(self.db, self.max_rebuilds, self.name)
    if not slot then
        return nil, e
    end
    -- protected, so that the slot is given back whatever a handler or reset raises
    local done, n, info = pcall(function()
        local rok, re = self.db:unit_of_work(function(uow)
            local rows, le = uow:query(LOCK, self.key)
            if not rows then
                error(le, 0)
            end
            if self.reset then
                self.reset(uow, self)
            end
            local qok, qe = uow:queue(RESET, self.key)
            if not qok then
                error(qe, 0)
            end
            return true
        end)
        if not rok then
            return nil, re
        end
        return catch_up(self, true)
    end)
    slot:release()
    if not done then
        error(n, 0)
    end
    return n, info
end


--- { name, version, live, checkpoint, global_position, events_applied, updated_at, rebuilt_at,
-- behind } (version and live for a versioned projection);
-- behind counts the events with a handler not applied yet; global_position is that of the last
-- event applied (0 before the first).
---@return table|nil status
---@return qx.Error? err
function Projection:status()
    check(self, "status")
    local ok, e = ensure(self)
    if not ok then
        return nil, e
    end
    local rows
    rows, e = self.db:query(STATUS, self.key, self.types, self.categories)
    if not rows then
        return nil, e
    end
    local r = rows[1]
    if r == nil then
        return nil, qx_error.new("not_found", "projection " .. self.name
                                 .. " has no checkpoint row")
    end
    local st = {
        name = self.name,
        version = self.version,
        checkpoint = encode_checkpoint(r.tx_id, dec(r.cp_pos)),
        global_position = r.global_position,
        events_applied = r.events_applied,
        updated_at = r.updated_at,
        rebuilt_at = r.rebuilt_at ~= null and r.rebuilt_at or nil,
        behind = remaining(self),
    }
    if r.live ~= null then
        st.live = r.live
    end
    return st
end


return _M

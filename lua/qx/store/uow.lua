--- The unit of work: one transaction around a command handler.
--
--   local result, err = db:unit_of_work(function(uow) ... return result end, {
--       context = { tenant_id =, user_id =, correlation_id =, causation_id =,
--                   traceparent =, tracestate = },
--       dispatcher = d, statement_timeout_ms = n,
--       pre_commit = fn(uow), post_commit = fn(uow), pre_rollback = fn(uow, err),
--       post_rollback = fn(uow, err), on_hook_error = fn(err, name) })
--
-- Statements are queued in the core's transaction (core.tx) and sent in one pipelined round
-- trip with the next read or the commit; at commit the tracked aggregates' events are
-- dispatched and integration events written to the outbox. Any error rolls everything back:
-- unit_of_work returns nil, err. On success it returns what fn returned (true for nothing).
-- See docs/unit-of-work.md.
local core = require "qx.core"
local err = require "qx.error"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local internal = require "qx.store.internal"
local options = require "qx.options"
local tracing = require "qx.tracing"
local personal = require "qx.store.personal"

local setmetatable = setmetatable
local type = type
local ipairs = ipairs
local pairs = pairs
local select = select
local error = error
local xpcall = xpcall
local pcall = pcall
local unpack = table.unpack or unpack
local tostring = tostring
local is_uuid = core.is_uuid
local stderr = io.stderr

local _M = { _VERSION = "0.1.0" }

_M.OUTBOX_CHANNEL = "qx_outbox"
local MAX_DISPATCH_ROUNDS = 100

-- the insert of more than OUTBOX_VALUES_MAX events; %s: the trace columns and their values
-- when the unit of work has a trace context ($2, $3), else nothing
local OUTBOX_INSERT_SHAPE = [[
WITH o AS (
INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at,
                              correlation_id, causation_id, tenant_id, partition_key%s)
SELECT (e->'envelope'->>'event_id')::uuid, e->'envelope'->>'event_name',
       (e->'envelope'->>'event_version')::int, e->'envelope',
       (e->'envelope'->>'occurred_at')::timestamptz, (e->'envelope'->>'correlation_id')::uuid,
       (e->'envelope'->>'causation_id')::uuid, (e->'envelope'->>'tenant_id')::uuid,
       e->>'partition_key'%s
FROM jsonb_array_elements($1::jsonb) AS e)
SELECT ]] .. core.TX_ID_COLUMNS
local OUTBOX_INSERT = string.format(OUTBOX_INSERT_SHAPE, "", "")
local OUTBOX_INSERT_TRACED = string.format(OUTBOX_INSERT_SHAPE, ", traceparent, tracestate",
                                           ", $2::text, $3::text")

--- Options of db:unit_of_work.
---@class qx.UnitOfWorkOptions
---@field context table? ids stamped on events, and the W3C trace context (docs/tracing.md)
---@field dispatcher qx.Dispatcher? default: the db's
---@field statement_timeout_ms integer? SET LOCAL when it differs from the db's
---@field pre_commit (fun(uow: qx.Uow))? before COMMIT; raising rolls back
---@field post_commit (fun(uow: qx.Uow))? after COMMIT; errors go to on_hook_error
---@field pre_rollback (fun(uow: qx.Uow, err: qx.Error))? before ROLLBACK
---@field post_rollback (fun(uow: qx.Uow, err: qx.Error))? after ROLLBACK
---@field on_hook_error (fun(err: qx.Error, name: string))? default: a line on stderr

--- A unit of work: one transaction around a command handler.
---@class qx.Uow
---@field context table { tenant_id, user_id, correlation_id, causation_id, traceparent, ... }
---@field traceparent string? the context's traceparent when it is valid W3C syntax
---@field tracestate string? the context's tracestate when it and the traceparent are valid
local Uow = {}
Uow.__index = Uow
_M.Uow = Uow

local function pack(...)
    return { n = select("#", ...), ... }
end

local CONTEXT_IDS = { "tenant_id", "correlation_id", "causation_id" } -- user_id/actor_id: any
local HOOKS = { "pre_commit", "post_commit", "pre_rollback", "post_rollback", "on_hook_error" }

-- the hooks of a unit of work that has none, and what published is without events
local READ_ONLY = { __newindex = function() error("read-only table", 2) end }
local NO_HOOKS = setmetatable({}, READ_ONLY)
local NO_EVENTS = setmetatable({}, READ_ONLY)
Uow.hooks = NO_HOOKS
Uow.published = NO_EVENTS

local function check_context(ctx)
    if ctx == nil then return {} end
    if type(ctx) ~= "table" then error("unit_of_work: context must be a table", 3) end
    for i = 1, #CONTEXT_IDS do
        local k = CONTEXT_IDS[i]
        local v = ctx[k]
        if v ~= nil and not is_uuid(v) then
            return nil, err.new("invalid",
                                "context." .. k .. " must be a uuid, got " .. tostring(v))
        end
    end
    return ctx
end

-- ---- statements -------------------------------------------------------------------------------

local check_open = internal.check_open
local stamp = internal.stamp

--- Runs a statement in the transaction (the queue is sent first, in the same round trip).
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or the affected row count
function Uow:query(sql, ...)
    check_open(self, 2)
    if type(sql) ~= "string" then error("uow:query: sql must be a string", 2) end
    return self._tx:query(sql, ...)
end

--- Runs a statement in the transaction for its effect.
---@param sql string
---@param ... any the parameters
---@return integer|nil affected
---@return qx.Error? err
function Uow:exec(sql, ...)
    check_open(self, 2)
    if type(sql) ~= "string" then error("uow:exec: sql must be a string", 2) end
    return self._tx:exec(sql, ...)
end

--- As uow:query, with the NULL columns of a row left out (they read as nil, not qx.null).
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or the affected row count
function Uow:rows(sql, ...)
    check_open(self, 2)
    return self._tx:rows(sql, ...)
end

--- uow:rows with only the first max rows made into tables; count is every row the statement
-- returned (a page reads one more than it shows to know whether another follows).
---@param max integer
---@param sql string
---@param ... any the parameters
---@return table|nil rows
---@return qx.Error|integer err the error, or count
function Uow:rows_upto(max, sql, ...)
    check_open(self, 2)
    return self._tx:rows_upto(max, sql, ...)
end

--- Queues a statement: sent with the next read or at commit; a failure fails the unit of work.
---@param sql string
---@param ... any the parameters
function Uow:queue(sql, ...)
    check_open(self, 2)
    if type(sql) ~= "string" then error("uow:queue: sql must be a string", 2) end
    return self._tx:queue(sql, ...)
end

--- Sends whatever is queued now (e.g. to see a failure before doing more work).
---@return true|nil ok
---@return qx.Error? err
function Uow:flush()
    check_open(self, 2)
    return self._tx:flush()
end

-- ---- aggregates and events ----------------------------------------------------------------

--- Tracks an aggregate: its events are drained and dispatched at commit. Tracking twice is a
-- no-op.
---@param agg table an aggregate instance
---@return table agg the aggregate
function Uow:track(agg)
    check_open(self, 2)
    if not aggregate.is_aggregate(agg) then
        error("uow:track: expected an aggregate, got " .. type(agg), 2)
    end
    local tracked = self._tracked
    if not tracked then
        -- the usual unit of work tracks one aggregate: its list is all it needs
        self._tracked = { agg }
        return agg
    end
    local set = self._tracked_set
    if not set then
        if tracked[1] == agg then return agg end -- (without the set it holds at most one)
        set = {}
        for i = 1, #tracked do set[tracked[i]] = true end
        self._tracked_set = set
    end
    if not set[agg] then
        set[agg] = true
        tracked[#tracked + 1] = agg
    end
    return agg
end

--- An event that belongs to no aggregate, dispatched and (for integration events) written to the
-- outbox at commit like the others.
---@param ev table an event
---@return table|nil ev
---@return qx.Error? err invalid: personal fields without a uuid subject (nothing recorded)
function Uow:record(ev)
    check_open(self, 2)
    if not event.is_event(ev) then error("uow:record: expected an event", 2) end
    if event.class_of(ev).personal then
        local subject, e = personal.subject_of(ev)
        if subject == nil then return nil, e end
    end
    local loose = self._loose
    if not loose then
        loose = {}
        self._loose = loose
    end
    loose[#loose + 1] = ev
    return ev
end

-- Drains tracked aggregates and loose events until handlers stop producing more; returns the
-- integration events in the order they were recorded (nil when there are none).
function Uow:_drain_and_dispatch()
    local outgoing
    local d = self.dispatcher
    for _ = 1, MAX_DISPATCH_ROUNDS do
        local batch = self._loose
        self._loose = nil
        local tracked = self._tracked
        if tracked then
            for i = 1, #tracked do
                local evs = tracked[i]:pull_events()
                if evs[1] ~= nil then
                    if batch == nil then
                        batch = evs -- the aggregate gave its list up: no one else holds it
                    else
                        for k = 1, #evs do batch[#batch + 1] = evs[k] end
                    end
                end
            end
        end
        if batch == nil or batch[1] == nil then return outgoing end
        for i = 1, #batch do
            local ev = batch[i]
            stamp(self, ev)
            if event.class_of(ev).integration then
                outgoing = outgoing or {}
                outgoing[#outgoing + 1] = ev
            end
        end
        if d then
            for i = 1, #batch do d:publish(batch[i], self) end
        end
    end
    error("event handlers kept recording events for " .. MAX_DISPATCH_ROUNDS .. " rounds", 0)
end

local function partition_key(ev)
    if ev.aggregate_id ~= nil then
        return (ev.aggregate_type or "") .. ":" .. tostring(ev.aggregate_id)
    end
    return nil
end

local function outbox_rows(events, sealed)
    local rows = {}
    for i, ev in ipairs(events) do
        rows[i] = { envelope = sealed and sealed[i] or ev:envelope(),
                    partition_key = partition_key(ev) or core.null }
    end
    return rows
end

-- The envelopes of the events with personal fields, those fields sealed under their subject's
-- key: { [i] = envelope } | false (none has any) | nil, err. An outbox row never holds a
-- personal field in clear.
local function sealed_envelopes(uow, events)
    local subjects, of
    for i = 1, #events do
        local subject, e = personal.subject_of(events[i])
        if subject == nil then return nil, e end
        if subject then
            if subjects == nil then subjects, of = {}, {} end
            subjects[subject] = true
            of[i] = subject
        end
    end
    if subjects == nil then return false end
    local keys, e = personal.keys_for_write(uow, subjects)
    if not keys then return nil, e end
    local out = {}
    for i, subject in pairs(of) do
        local env, se = personal.sealed_envelope(events[i], keys[subject], subject)
        if not env then return nil, se end
        out[i] = env
    end
    return out
end

-- Up to OUTBOX_VALUES_MAX events go as INSERT ... VALUES with nine parameters a row (less work
-- for the server than taking one JSON array apart); more go as the JSON array, so that the
-- number of distinct statement texts stays small.
local OUTBOX_VALUES_MAX = 32
local OUTBOX_VALUES_HEAD = "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, "
    .. "occurred_at, correlation_id, causation_id, tenant_id, partition_key) VALUES "
local outbox_values_sql = {}

-- The same with the trace columns: every row takes the last two parameters (the unit of work's
-- traceparent and tracestate). A unit of work without them sends the text above, unchanged.
local OUTBOX_VALUES_TRACED_HEAD = "INSERT INTO qx_outbox_events (id, event_name, event_version, "
    .. "payload, occurred_at, correlation_id, causation_id, tenant_id, partition_key, "
    .. "traceparent, tracestate) VALUES "
local outbox_values_traced_sql = {}

local function outbox_values(n, traced)
    local cache = traced and outbox_values_traced_sql or outbox_values_sql
    local sql = cache[n]
    if sql then return sql end
    local rows = {}
    local t1, t2 = 9 * n + 1, 9 * n + 2
    for i = 0, n - 1 do
        local b = 9 * i
        local row = string.format("($%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d", b + 1, b + 2,
                                  b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9)
        if traced then row = row .. string.format(", $%d, $%d", t1, t2) end
        rows[i + 1] = row .. ")"
    end
    -- each row returns the transaction's id: the commit needs no statement of its own
    sql = (traced and OUTBOX_VALUES_TRACED_HEAD or OUTBOX_VALUES_HEAD)
        .. table.concat(rows, ", ") .. " RETURNING " .. core.TX_ID_COLUMNS
    cache[n] = sql
    return sql
end

local envelope_json = event.envelope_json

-- the error of an event whose envelope cannot be JSON (a cycle, a key JSON cannot hold)
local function unsendable(ev, e)
    return err.new("invalid", "event " .. tostring(ev.event_name) .. " cannot be sent as JSON: "
                   .. e.message)
end

-- Queues the outbox insert of the integration events, their personal fields sealed, with the
-- unit of work's trace context when it has one.
local function queue_outbox(uow, tx, events, traceparent, tracestate)
    local sealed, se = sealed_envelopes(uow, events)
    if sealed == nil then return nil, se end
    local n = #events
    local null = core.null
    if n > OUTBOX_VALUES_MAX then
        if traceparent then
            return tx:queue_id(OUTBOX_INSERT_TRACED, outbox_rows(events, sealed), traceparent,
                               tracestate or null)
        end
        return tx:queue_id(OUTBOX_INSERT, outbox_rows(events, sealed))
    end
    local sql = outbox_values(n, traceparent ~= nil)
    if n == 1 and not sealed then
        -- the whole envelope is the payload: its JSON written from the event by the core
        local ev = events[1]
        local text, je = envelope_json(ev)
        if not text then return nil, unsendable(ev, je) end
        if traceparent then
            return tx:queue_id(sql, ev.event_id, ev.event_name, ev.event_version, text,
                               ev.occurred_at, ev.correlation_id or null,
                               ev.causation_id or null, ev.tenant_id or null,
                               partition_key(ev) or null, traceparent, tracestate or null)
        end
        return tx:queue_id(sql, ev.event_id, ev.event_name, ev.event_version, text,
                           ev.occurred_at, ev.correlation_id or null, ev.causation_id or null,
                           ev.tenant_id or null, partition_key(ev) or null)
    end
    local p = {}
    for i = 1, n do
        local ev = events[i]
        local env = sealed and sealed[i]
        local b = 9 * (i - 1)
        if env then
            p[b + 1] = env.event_id
            p[b + 2] = env.event_name
            p[b + 3] = env.event_version
            p[b + 4] = env
            p[b + 5] = env.occurred_at
            p[b + 6] = env.correlation_id
            p[b + 7] = env.causation_id
            p[b + 8] = env.tenant_id
        else
            local text, je = envelope_json(ev)
            if not text then return nil, unsendable(ev, je) end
            p[b + 1] = ev.event_id
            p[b + 2] = ev.event_name
            p[b + 3] = ev.event_version
            p[b + 4] = text
            p[b + 5] = ev.occurred_at
            p[b + 6] = ev.correlation_id or null
            p[b + 7] = ev.causation_id or null
            p[b + 8] = ev.tenant_id or null
        end
        p[b + 9] = partition_key(ev) or null
    end
    if traceparent then
        p[9 * n + 1], p[9 * n + 2] = traceparent, tracestate or null
        return tx:queue_id(sql, unpack(p, 1, 9 * n + 2))
    end
    return tx:queue_id(sql, unpack(p, 1, 9 * n))
end

-- ---- bound views -------------------------------------------------------------------------

local repository_bind, event_store_bind -- required on first use: they require this module

--- The repository described by qx.repository{...}, bound to this transaction.
---@param description qx.RepositoryDescription
---@return qx.Repo
function Uow:repo(description)
    check_open(self, 2)
    if not repository_bind then repository_bind = require("qx.store.repository").bind end
    return repository_bind(description, self)
end

--- The event store made by qx.event_store{...}, bound to this transaction.
---@param store qx.EventStore
---@return qx.BoundEventStore
function Uow:store(store)
    check_open(self, 2)
    if not event_store_bind then event_store_bind = require("qx.store.event_store").bind end
    return event_store_bind(store, self)
end

-- ---- savepoints ---------------------------------------------------------------------------

local function forget_after(list, n)
    if list then
        for i = #list, n + 1, -1 do list[i] = nil end
    end
end

--- Runs fn(uow) inside a savepoint. On an error the savepoint is rolled back, the transaction
-- goes on, and savepoint returns nil, err; otherwise it returns fn's results. Events recorded
-- through uow:record inside fn are dropped with it (aggregates' own pending events live in the
-- aggregates and are not rewound).
---@param fn fun(uow: qx.Uow): any
---@return any ... fn's results, or nil
---@return qx.Error? err
function Uow:savepoint(fn)
    check_open(self, 2)
    if type(fn) ~= "function" then error("uow:savepoint: expected a function", 2) end
    local tx = self._tx
    local ok, e = tx:savepoint()
    if not ok then return nil, e end
    local loose_n = self._loose and #self._loose or 0
    local tracked_n = self._tracked and #self._tracked or 0
    local r = pack(xpcall(fn, err.handler, self))
    local cause
    if r[1] then
        ok, cause = tx:release()
        if ok then return unpack(r, 2, r.n) end
    else
        cause = r[2]
    end
    -- back to the savepoint: what fn queued is dropped when none of it reached the server; a
    -- failure after it is forgotten; one before it (or a pipeline that never left) stays
    ok, e = tx:rollback_to()
    if not ok then return nil, e end
    forget_after(self._loose, loose_n)
    local tracked = self._tracked
    if tracked then
        for i = #tracked, tracked_n + 1, -1 do
            if self._tracked_set then self._tracked_set[tracked[i]] = nil end
            tracked[i] = nil
        end
    end
    return nil, cause
end

-- ---- the protocol -------------------------------------------------------------------------

local function run_hook(uow, name, ...)
    local h = uow.hooks[name]
    if h then h(uow, ...) end
end

-- Hooks after the outcome cannot change it; their errors go to on_hook_error (or stderr).
local function run_after_hook(uow, name, ...)
    local h = uow.hooks[name]
    if not h then return end
    local ok, e = xpcall(h, err.handler, uow, ...)
    if not ok then
        if uow.hooks.on_hook_error then
            pcall(uow.hooks.on_hook_error, e, name)
        else
            stderr:write("qx: ", name, " hook failed: ", tostring(e), "\n")
        end
    end
end

-- A commit whose reply was lost: the transaction's id, learned before the COMMIT, tells a
-- fresh connection what became of it. Returns nil when it committed (the listeners are woken
-- then, from another connection), else the error to raise: "connection" when it aborted (the
-- rollback path), e itself ("unknown_outcome") when no one can tell.
local function resolve(uow, e, channels)
    -- the lost connection goes back first: the pool closes it and never hands it out again
    uow._lost = true
    uow.conn:release()
    if not e.xid then return e end
    local db = uow.db
    local status = db:xact_status(e.xid, e.timeline)
    if status == "committed" then
        if channels then
            for i = 1, #channels do
                local ok, we = db:query("SELECT pg_notify($1, '')", channels[i])
                if not ok then
                    -- listeners find the rows when they poll
                    if uow.hooks.on_hook_error then
                        pcall(uow.hooks.on_hook_error, we, "notify")
                    else
                        stderr:write("qx: waking listeners after commit failed: ",
                                     tostring(we), "\n")
                    end
                    break
                end
            end
        end
        return nil
    end
    if status == "aborted" then
        return err.new("connection", "the connection was lost before the reply to the commit "
            .. "came; the transaction did not commit", { xid = e.xid })
    end
    return e
end

-- The commit, once fn has returned; fn's results pass through.
local function committed(uow, ...)
    local outgoing
    if uow._loose or uow._tracked then outgoing = uow:_drain_and_dispatch() end
    if uow.hooks.pre_commit then
        run_hook(uow, "pre_commit")
        -- pre_commit may have recorded more
        local more = uow:_drain_and_dispatch()
        if more then
            outgoing = outgoing or {}
            for i = 1, #more do outgoing[#outgoing + 1] = more[i] end
        end
    end
    local tx = uow._tx
    local notify = uow._notify
    if outgoing then
        local ok, e = queue_outbox(uow, tx, outgoing, uow.traceparent, uow.tracestate)
        if not ok then error(e, 0) end
        internal.notify_after(uow, _M.OUTBOX_CHANNEL)
        notify = uow._notify
    end
    local ok, e
    if notify then
        ok, e = tx:commit(unpack(notify))
    else
        ok, e = tx:commit()
    end
    if not ok then
        if e.code ~= "unknown_outcome" then error(e, 0) end
        local lost = resolve(uow, e, notify)
        if lost then error(lost, 0) end
        e = nil
    end
    if e then
        -- the transaction committed; only the wake-up failed: listeners find the rows when they
        -- poll. Reported like a failed post_commit hook, not as a failed unit of work.
        if uow.hooks.on_hook_error then
            pcall(uow.hooks.on_hook_error, e, "notify")
        else
            stderr:write("qx: waking listeners after commit failed: ", tostring(e), "\n")
        end
    end
    if outgoing then uow.published = outgoing end
    return ...
end

local function rollback(uow)
    uow._tx:rollback() -- release() would roll back too; this keeps order
end

-- fn, then the commit, in one protected call; fn's results pass through
local function body(uow, fn)
    return committed(uow, fn(uow))
end

local function finish(uow, ok, ...)
    local conn = uow.conn
    if ok then
        uow._state = "committed"
        uow._tx:close()
        conn:release()
        if uow.hooks.post_commit then run_after_hook(uow, "post_commit") end
        -- fn returned nothing: success must not read as nil
        if select("#", ...) == 0 then return true end
        return ...
    end
    local cause = ...
    if not err.is(cause) then cause = err.from_raised(cause) end
    if cause.code == "unknown_outcome" and uow._lost then
        -- neither committed nor rolled back as far as anyone can tell: no hook claims either
        uow._state = "unknown"
        uow._tx:close()
        return nil, cause
    end
    local hok, he = true, nil
    if uow.hooks.pre_rollback then
        hok, he = xpcall(run_hook, err.handler, uow, "pre_rollback", cause)
    end
    if not uow._lost then rollback(uow) end -- a lost transaction was rolled back by the server
    uow._state = "rolled back"
    uow._tx:close()
    conn:release()
    run_after_hook(uow, "post_rollback", cause)
    if not hok then cause.hook_error = he end
    return nil, cause
end

local trace_context = tracing._context

-- Reports the unit of work's span once it has finished; its results pass through.
local function traced(uow, start, ...)
    local attributes = { ["qx.outcome"] = uow._state, ["qx.outbox.events"] = #uow.published }
    local r1, r2 = ...
    if r1 == nil and err.is(r2) then attributes["qx.error.code"] = r2.code end
    tracing._span("qx.unit_of_work", start, uow.traceparent, uow.tracestate, attributes)
    return ...
end

local NO_OPTIONS = {}
local UOW_OPTIONS = { "context", "dispatcher", "statement_timeout_ms", unpack(HOOKS) }

function _M.run(db, fn, opts)
    if type(fn) ~= "function" then error("unit_of_work: expected a function", 2) end
    local timeout = db.statement_timeout_ms
    local hooks
    if opts == nil then
        opts = NO_OPTIONS
    else
        if type(opts) ~= "table" then error("unit_of_work: options must be a table", 2) end
        options.check(opts, UOW_OPTIONS, "unit_of_work")
        for i = 1, #HOOKS do
            local h = opts[HOOKS[i]]
            if h ~= nil then
                if type(h) ~= "function" then
                    error("unit_of_work: " .. HOOKS[i] .. " must be a function", 2)
                end
                hooks = opts
            end
        end
        if opts.statement_timeout_ms ~= nil then timeout = opts.statement_timeout_ms end
    end
    if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0 or timeout % 1 ~= 0) then
        error("unit_of_work: statement_timeout_ms must be a non-negative integer", 2)
    end
    local ctx, e = check_context(opts.context)
    if not ctx then return nil, e end
    local traceparent, tracestate
    if ctx.traceparent ~= nil then
        traceparent, tracestate = trace_context(ctx.traceparent, ctx.tracestate, "unit_of_work")
    end

    -- the span (only of a traced unit of work, and only when someone takes spans) counts the
    -- wait for a connection too
    local start = traceparent and tracing._spans_wanted() and tracing._time()
    local conn
    conn, e = db.pool:acquire()
    if not conn then return nil, e end

    -- SET LOCAL statement_timeout only when the unit of work asks for another timeout than the
    -- one every pooled connection has
    if timeout and timeout == (db.session_timeout_ms or 0) then timeout = nil end
    -- a connection of another kind (the wire codec's) makes its own
    local tx = conn.tx and conn:tx(timeout) or core.tx(conn, timeout)
    local uow = setmetatable({
        db = db,
        conn = conn,
        context = ctx,
        correlation_id = ctx.correlation_id or core.uuid(),
        dispatcher = opts.dispatcher or db.dispatcher,
        hooks = hooks, -- else the class's NO_HOOKS
        traceparent = traceparent,
        tracestate = tracestate,
        _tx = tx,
        _state = "active",
    }, Uow)

    if start then
        return traced(uow, start, finish(uow, xpcall(body, err.handler, uow, fn)))
    end
    return finish(uow, xpcall(body, err.handler, uow, fn))
end

return _M

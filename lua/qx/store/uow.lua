-- The unit of work: one transaction around a command handler.
--
--   local result, err = db:unit_of_work(function(uow) ... return result end, {
--       context = { tenant_id =, user_id =, correlation_id =, causation_id = },
--       dispatcher = d, statement_timeout_ms = n,
--       pre_commit = fn(uow), post_commit = fn(uow), pre_rollback = fn(uow, err),
--       post_rollback = fn(uow, err), on_hook_error = fn(err, name) })
--
-- Statements are queued and sent in one pipelined round trip with the next read or the commit;
-- at commit the tracked aggregates' events are dispatched and integration events written to
-- the outbox. Any error rolls everything back: unit_of_work returns nil, err. On success it
-- returns what fn returned (true for nothing). See docs/unit-of-work.md.
local core = require "qx.core"
local err = require "qx.error"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"

local setmetatable = setmetatable
local type = type
local ipairs = ipairs
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

local OUTBOX_INSERT = [[
INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at,
                              correlation_id, causation_id, tenant_id, partition_key)
SELECT (e->'envelope'->>'event_id')::uuid, e->'envelope'->>'event_name',
       (e->'envelope'->>'event_version')::int, e->'envelope',
       (e->'envelope'->>'occurred_at')::timestamptz, (e->'envelope'->>'correlation_id')::uuid,
       (e->'envelope'->>'causation_id')::uuid, (e->'envelope'->>'tenant_id')::uuid,
       e->>'partition_key'
FROM jsonb_array_elements($1::jsonb) AS e]]

local Uow = {}
Uow.__index = Uow
_M.Uow = Uow

-- Fields most units of work never change live here, in the class, instead of in every
-- instance: a smaller table to make. _sends > 0 means the transaction has begun.
Uow._sends = 0
Uow._sp = 0
Uow._head = 1

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
            return nil, err.new("invalid", "context." .. k .. " must be a uuid, got "
                                .. tostring(v))
        end
    end
    return ctx
end

-- ---- statements -------------------------------------------------------------------------------

local function stmt(sql, ...)
    local s = { sql, n = select("#", ...), ... }
    return s
end

-- statements every unit of work sends, made once (the binding only reads them)
local BEGIN, COMMIT, ROLLBACK = stmt("BEGIN"), stmt("COMMIT"), stmt("ROLLBACK")

-- Wake-ups go after the COMMIT, in a transaction of their own that does not wait for the disk:
-- a NOTIFY inside would serialise every notifying commit (docs/unit-of-work.md). OFFSET 1 skips
-- the one row, so the calls run but the client gets nothing to parse.
local notify_stmts = {} -- channels joined by "," -> statement
local function notify_stmt(channels)
    local key = channels[2] == nil and channels[1] or table.concat(channels, ",")
    local s = notify_stmts[key]
    if not s then
        local calls = {}
        for i = 1, #channels do calls[i] = "pg_notify($" .. i .. ", '')" end
        s = { "SELECT FROM (SELECT set_config('synchronous_commit', 'off', true), "
              .. table.concat(calls, ", ") .. " OFFSET 1) AS s", n = #channels }
        for i = 1, #channels do s[i + 1] = channels[i] end
        notify_stmts[key] = s
    end
    return s
end
local timeout_stmts = {}
local function timeout_stmt(ms)
    local s = timeout_stmts[ms]
    if not s then
        s = stmt("SELECT set_config('statement_timeout', $1, true)", tostring(ms))
        timeout_stmts[ms] = s
    end
    return s
end

-- The queue is self._q[1..self._n], led by self._head statements (BEGIN, the SET LOCAL of the
-- timeout) until the first send; entries past _n are left over and get overwritten.

local function failed_send(self, e)
    self._failed = e
    return nil, e
end

-- Sends the queue plus (mode ~= nil) one statement in one round trip; returns what conn:send
-- returns for it. A failure is remembered: the uow will only roll back. implicit: the batch is
-- the whole transaction, sent without BEGIN and COMMIT (docs/unit-of-work.md).
local function send(self, implicit, mode, sql, ...)
    if self._failed then return nil, self._failed end
    local from = 1
    local sends = self._sends
    if implicit and sends == 0 then from = 2 end -- past BEGIN
    local n = self._n
    self._n = 0
    self._sends = sends + 1 -- the transaction has begun
    local r, e, at = self.conn:send(self._q, from, n, mode, sql, ...)
    if not r then
        failed_send(self, e)
        return nil, e, at
    end
    return r, e
end

local function check_open(self, level)
    if self._state ~= "active" then
        error("unit of work is " .. self._state, level + 1)
    end
end

function Uow:_check_open()
    check_open(self, 3)
end

-- uow:query(sql, ...) -> rows | nil, err   (sends the queue first, same round trip)
function Uow:query(sql, ...)
    check_open(self, 2)
    if type(sql) ~= "string" then error("uow:query: sql must be a string", 2) end
    return send(self, false, "rows", sql, ...)
end

-- uow:exec(sql, ...) -> affected | nil, err
function Uow:exec(sql, ...)
    check_open(self, 2)
    if type(sql) ~= "string" then error("uow:exec: sql must be a string", 2) end
    local ok, affected = send(self, false, "count", sql, ...)
    if not ok then return nil, affected end
    return affected
end

-- For the repository and the event store: rows whose NULL columns are absent (nil), not
-- core.null - what an entity wants, and fewer table slots to fill.
function Uow:_rows(sql, ...)
    check_open(self, 2)
    return send(self, false, "sparse", sql, ...)
end

-- Uow:_rows, with only the first max rows made into tables; the second result counts every row
-- the statement returned (a page reads one more than it shows to know whether another follows).
function Uow:_rows_upto(max, sql, ...)
    check_open(self, 2)
    return send(self, false, max, sql, ...)
end

-- Statements PostgreSQL runs only inside BEGIN ... COMMIT (not in the implicit transaction of a
-- batch without BEGIN); a unit of work that queues one uses an explicit transaction block.
local NEEDS_BLOCK = { LOCK = true, DECLARE = true, SAVEPOINT = true, RELEASE = true }
-- SQL text -> whether it needs a block, so that a text queued again is not matched again
local needs_block_of, needs_block_n = {}, 0

local function needs_block(sql)
    local b = needs_block_of[sql]
    if b == nil then
        local word = sql:match("^%s*(%a+)")
        b = word ~= nil and NEEDS_BLOCK[word:upper()] == true
        if needs_block_n >= 1000 then needs_block_of, needs_block_n = {}, 0 end
        needs_block_of[sql] = b
        needs_block_n = needs_block_n + 1
    end
    return b
end

local function push(self, s)
    local n = self._n + 1
    self._q[n] = s
    self._n = n
end

-- uow:queue(sql, ...): sent with the next read or at commit; a failure fails the unit of work.
function Uow:queue(sql, ...)
    check_open(self, 2)
    if type(sql) ~= "string" then error("uow:queue: sql must be a string", 2) end
    if self._failed then return nil, self._failed end
    if not self._block and needs_block(sql) then self._block = true end
    push(self, { sql, n = select("#", ...), ... })
    return true
end

-- For the event store: uow:queue of a statement of its own (one that needs no transaction
-- block) with one parameter, the unit of work known to be open.
function Uow:_queue1(sql, p1)
    if self._failed then return nil, self._failed end
    push(self, { sql, n = 1, p1 })
    return true
end

-- how many statements wait for the next send (BEGIN and the timeout not counted)
function Uow:_queued()
    return self._sends > 0 and self._n or self._n - self._head
end

-- uow:_notify_after(channel): wake the channel's listeners once the transaction has committed
-- (see notify_stmt). A channel is notified once however often it is asked for.
function Uow:_notify_after(channel)
    check_open(self, 2)
    local list = self._notify
    if not list then
        self._notify = { channel }
        return
    end
    for i = 1, #list do
        if list[i] == channel then return end
    end
    list[#list + 1] = channel
end

-- Sends whatever is queued now (e.g. to see a failure before doing more work).
function Uow:flush()
    check_open(self, 2)
    if self._n == 0 and self._sends > 0 then return true end
    local ok, e = send(self, false)
    if not ok then return nil, e end
    return true
end

-- ---- aggregates and events ----------------------------------------------------------------

-- uow:track(aggregate): its events are drained and dispatched at commit. Tracking twice is a
-- no-op. Returns the aggregate.
function Uow:track(agg)
    check_open(self, 2)
    if not aggregate.is_aggregate(agg) then
        error("uow:track: expected an aggregate, got " .. type(agg), 2)
    end
    local tracked = self._tracked
    if not tracked then
        tracked = {}
        self._tracked, self._tracked_set = tracked, {}
    end
    if not self._tracked_set[agg] then
        self._tracked_set[agg] = true
        tracked[#tracked + 1] = agg
    end
    return agg
end

-- uow:record(event): an event that belongs to no aggregate, dispatched and (for integration
-- events) written to the outbox at commit like the others.
function Uow:record(ev)
    check_open(self, 2)
    if not event.is_event(ev) then error("uow:record: expected an event", 2) end
    local loose = self._loose
    if not loose then
        loose = {}
        self._loose = loose
    end
    loose[#loose + 1] = ev
    return ev
end

-- For the event store: the events an aggregate just gave up (pull_events, a list no one else
-- holds), recorded as uow:record would, without the checks - record() made sure they are events,
-- and the store checked that the unit of work is open. The list itself becomes the queue of
-- loose events when there is none yet.
function Uow:_record_list(evs)
    local loose = self._loose
    if not loose then
        if evs[1] ~= nil then self._loose = evs end
        return
    end
    local n = #loose
    for i = 1, #evs do loose[n + i] = evs[i] end
end

function Uow:_stamp(ev)
    local ctx = self.context
    if ev.correlation_id == nil then ev.correlation_id = self.correlation_id end
    -- the context first: a field an event lacks is looked up in its methods too
    if ctx.causation_id ~= nil and ev.causation_id == nil then
        ev.causation_id = ctx.causation_id
    end
    if ctx.tenant_id ~= nil and ev.tenant_id == nil then ev.tenant_id = ctx.tenant_id end
    local actor = ctx.actor_id or ctx.user_id
    if actor ~= nil and ev.actor_id == nil then ev.actor_id = tostring(actor) end
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
                    batch = batch or {}
                    for k = 1, #evs do batch[#batch + 1] = evs[k] end
                end
            end
        end
        if batch == nil or batch[1] == nil then return outgoing end
        for i = 1, #batch do
            local ev = batch[i]
            self:_stamp(ev)
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

local function outbox_rows(events)
    local rows = {}
    for i, ev in ipairs(events) do
        rows[i] = { envelope = ev:envelope(), partition_key = partition_key(ev) or core.null }
    end
    return rows
end

-- Up to OUTBOX_VALUES_MAX events go as INSERT ... VALUES (cheaper for the server than a JSON
-- array); more as the JSON array, so that the number of distinct statement texts stays small.
local OUTBOX_VALUES_MAX = 32
local OUTBOX_VALUES_HEAD = "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, "
    .. "occurred_at, correlation_id, causation_id, tenant_id, partition_key) VALUES "
local outbox_values_sql = {}

local function outbox_stmt(events)
    local n = #events
    if n > OUTBOX_VALUES_MAX then return stmt(OUTBOX_INSERT, outbox_rows(events)) end
    local sql = outbox_values_sql[n]
    if not sql then
        local rows = {}
        for i = 0, n - 1 do
            local b = 9 * i
            rows[i + 1] = string.format("($%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d)",
                                        b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8,
                                        b + 9)
        end
        sql = OUTBOX_VALUES_HEAD .. table.concat(rows, ", ")
        outbox_values_sql[n] = sql
    end
    local s = { sql, n = 9 * n }
    local null = core.null
    for i = 1, n do
        local ev = events[i]
        local env = ev:envelope()
        local b = 9 * (i - 1) + 1 -- s[1] is the SQL text
        s[b + 1] = env.event_id
        s[b + 2] = env.event_name
        s[b + 3] = env.event_version
        s[b + 4] = env -- the whole envelope is the payload (JSON)
        s[b + 5] = env.occurred_at
        s[b + 6] = env.correlation_id
        s[b + 7] = env.causation_id
        s[b + 8] = env.tenant_id
        s[b + 9] = partition_key(ev) or null
    end
    return s
end

-- ---- bound views -------------------------------------------------------------------------

local repository_bind, event_store_bind -- required on first use: they require this module

-- uow:repo(description): the repository described by qx.repository{...}, bound to this
-- transaction.
function Uow:repo(description)
    check_open(self, 2)
    if not repository_bind then repository_bind = require("qx.store.repository").bind end
    return repository_bind(description, self)
end

-- uow:store(store): the event store made by qx.event_store{...}, bound to this transaction.
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

-- uow:savepoint(fn): runs fn(uow) inside a savepoint. On an error the savepoint is rolled back,
-- the transaction goes on, and savepoint returns nil, err; otherwise it returns fn's results.
-- Events recorded through uow:record inside fn are dropped with it (aggregates' own pending
-- events live in the aggregates and are not rewound).
function Uow:savepoint(fn)
    check_open(self, 2)
    if type(fn) ~= "function" then error("uow:savepoint: expected a function", 2) end
    if self._failed then return nil, self._failed end
    self._sp = self._sp + 1
    local name = "qx_sp_" .. self._sp
    local sends_before = self._sends
    push(self, stmt("SAVEPOINT " .. name))
    local queued_before = self._n - 1
    local loose_n = self._loose and #self._loose or 0
    local tracked_n = self._tracked and #self._tracked or 0
    local r = pack(xpcall(fn, err.handler, self))
    if r[1] and not self._failed then
        push(self, stmt("RELEASE SAVEPOINT " .. name))
        return unpack(r, 2, r.n)
    end
    local cause = r[1] and self._failed or r[2]
    if self._sends == sends_before then
        -- nothing since the SAVEPOINT reached the server: forget what fn queued
        self._n = queued_before
    else
        local failed = self._failed
        self._failed = nil
        self._n = 0
        local ok, e = self.conn:send({ stmt("ROLLBACK TO SAVEPOINT " .. name) }, 1, 1)
        if not ok then
            -- no savepoint to go back to: what failed was queued before it, or its batch never
            -- left (a parameter JSON cannot hold); the transaction is lost with that first error
            self._failed = failed or e
            return nil, self._failed
        end
    end
    forget_after(self._loose, loose_n)
    local tracked = self._tracked
    if tracked then
        for i = #tracked, tracked_n + 1, -1 do
            self._tracked_set[tracked[i]] = nil
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
    if uow._failed then error(uow._failed, 0) end

    local begun = uow._sends > 0
    if outgoing then
        push(uow, outbox_stmt(outgoing))
        uow:_notify_after(_M.OUTBOX_CHANNEL)
    elseif not begun and uow._n == uow._head then
        return ... -- nothing was done: no round trip at all
    end
    local notify = uow._notify
    -- savepoints and a few statements need a transaction block, and so does a wake-up (it goes
    -- after the COMMIT); otherwise a unit of work that sends everything at commit needs neither
    -- BEGIN nor COMMIT
    local implicit = not begun and uow._sp == 0 and not uow._block and not notify
    if not implicit then push(uow, COMMIT) end
    if notify then push(uow, notify_stmt(notify)) end
    local last = uow._n
    local ok, e, at = send(uow, implicit)
    if not ok then
        if not (notify and at == last) then error(e, 0) end
        -- the transaction committed; only the wake-up failed: listeners find the rows when they
        -- poll. Reported like a failed post_commit hook, not as a failed unit of work.
        uow._failed = nil
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
    if uow._sends > 0 and uow.conn:status() ~= "idle" then
        uow.conn:send({ ROLLBACK }, 1, 1) -- release() would roll back too; this keeps order
    end
end

-- fn, then the commit, in one protected call; fn's results pass through
local function body(uow, fn)
    return committed(uow, fn(uow))
end

local function finish(uow, ok, ...)
    local conn = uow.conn
    if ok then
        uow._state = "committed"
        conn:release()
        if uow.hooks.post_commit then run_after_hook(uow, "post_commit") end
        -- fn returned nothing: success must not read as nil
        if select("#", ...) == 0 then return true end
        return ...
    end
    local cause = ...
    if not err.is(cause) then cause = err.from_raised(cause) end
    local hok, he = true, nil
    if uow.hooks.pre_rollback then
        hok, he = xpcall(run_hook, err.handler, uow, "pre_rollback", cause)
    end
    rollback(uow)
    uow._state = "rolled back"
    conn:release()
    run_after_hook(uow, "post_rollback", cause)
    if not hok then cause.hook_error = he end
    return nil, cause
end

local NO_OPTIONS = {}

function _M.run(db, fn, opts)
    if type(fn) ~= "function" then error("unit_of_work: expected a function", 2) end
    local timeout = db.statement_timeout_ms
    local hooks
    if opts == nil then
        opts = NO_OPTIONS
    else
        if type(opts) ~= "table" then error("unit_of_work: options must be a table", 2) end
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

    local conn
    conn, e = db.pool:acquire()
    if not conn then return nil, e end

    -- BEGIN, and SET LOCAL statement_timeout when the unit of work asks for another timeout
    -- than the one every pooled connection has, lead the queue (see send). Made with room for
    -- what a unit of work that writes once queues - BEGIN, the write, COMMIT, the wake-up - so
    -- that it does not grow twice on the way (slots past _n are not part of the queue).
    local q = { BEGIN, false, false, false }
    local uow = setmetatable({
        db = db,
        conn = conn,
        context = ctx,
        correlation_id = ctx.correlation_id or core.uuid(),
        dispatcher = opts.dispatcher or db.dispatcher,
        hooks = hooks, -- else the class's NO_HOOKS
        _q = q,
        _n = 1,
        _sends = 0,
        _state = "active",
    }, Uow)
    if timeout and timeout ~= (db.session_timeout_ms or 0) then
        q[2] = timeout_stmt(timeout)
        uow._n, uow._head = 2, 2
    end

    return finish(uow, xpcall(body, err.handler, uow, fn))
end

return _M

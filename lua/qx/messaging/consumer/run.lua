--- Internal to qx.consumer: the run loop. A fetch, and for each message: decode, the handler in
-- a unit of work with the inbox row, then ack, nak with backoff, or dead-letter and term.
local core = require "qx.core"
local err = require "qx.error"
local metrics = require "qx.metrics"
local base = require "qx.messaging.consumer.base"
local options = require "qx.options"
local metrics_server = require "qx.metrics_server"
local tracing = require "qx.tracing"

local type = type
local pairs = pairs
local error = error
local xpcall = xpcall
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local floor = math.floor
local min = math.min
local fmt = string.format
local byte = string.byte
local gsub = string.gsub
local is_uuid = core.is_uuid
local clock = core.clock
local signals_watch, signals_sleep = core.signals_watch, core.signals_sleep
local is_int, is_callable, check_handler = base.is_int, base.is_callable, base.check_handler
local INBOX_INSERT, DEAD_LETTER_INSERT = base.INBOX_INSERT, base.DEAD_LETTER_INSERT
local DUPLICATE = base.DUPLICATE
local Consumer = base.Consumer

--- What a handler learns about the message besides the event (its third argument).
---@class qx.MsgInfo
---@field subject string
---@field stream string
---@field consumer string
---@field stream_seq integer
---@field consumer_seq integer
---@field delivered integer deliveries so far (1 the first time)
---@field pending integer
---@field published_at string
---@field headers table
---@field traceparent string? the message's traceparent header when it is valid W3C syntax
---@field tracestate string? its tracestate header when that and the traceparent are valid
---@field replay boolean? true when consumer:replay_dead runs the handler
local MsgInfo = {}
MsgInfo.__index = MsgInfo

--- Tells the server the handler is still at work, restarting the ack wait.
function MsgInfo:in_progress()
    return self._msg:in_progress()
end

local function msg_info(self, m)
    local headers = m.headers
    local traceparent, tracestate
    if headers.traceparent ~= nil then
        traceparent, tracestate = tracing._context(headers.traceparent, headers.tracestate,
                                                  "consumer " .. self.name)
    end
    return setmetatable({
        subject = m.subject,
        stream = m.stream,
        consumer = self.name,
        stream_seq = m.stream_seq,
        consumer_seq = m.consumer_seq,
        delivered = m.delivered,
        pending = m.pending,
        published_at = m.published_at,
        headers = headers,
        traceparent = traceparent,
        tracestate = tracestate,
        _msg = m,
    }, MsgInfo)
end

-- Runs the handler; true, or false and the error. A handler fails by raising or by returning
-- nil, err / false[, err].
local function handler_outcome(ok, r1, r2)
    if not ok then return false, r1 end
    if r1 == false or (r1 == nil and r2 ~= nil) then
        local e = r2
        if e == nil then e = err.new("error", "handler returned false") end
        if not err.is(e) then e = err.from_raised(e) end
        return false, e
    end
    return true
end

local function call_handler(handler, ev, uow, info)
    if type(handler) == "table" and not is_callable(handler) then
        return handler_outcome(xpcall(handler.publish, err.handler, handler, ev, uow, info))
    end
    return handler_outcome(xpcall(handler, err.handler, ev, uow, info))
end

-- what commit = "batch" (batch.lua) shares with the per-message path
base.msg_info, base.call_handler = msg_info, call_handler

-- Context of the unit of work: the event's ids (only valid uuids, the uow checks them) and the
-- message's trace context (checked already), so that what the handler records carries it on.
local function context_of(ev, info)
    local ctx = { traceparent = info.traceparent, tracestate = info.tracestate }
    if is_uuid(ev.correlation_id) then ctx.correlation_id = ev.correlation_id end
    if is_uuid(ev.event_id) then ctx.causation_id = ev.event_id end
    if is_uuid(ev.tenant_id) then ctx.tenant_id = ev.tenant_id end
    if ev.actor_id ~= nil then ctx.actor_id = ev.actor_id end
    return ctx
end
base.context_of = context_of

-- Runs the handler for ev: in a unit of work when the consumer has a db, whose first statements
-- are first(uow) (when given; it may return DUPLICATE) and the inbox row; sealed personal fields
-- are opened there (env: a message _decode left to open and read, sealed.lua). Returns true and
-- whether it was a duplicate, or false and the error (err.unopenable: dead-letter it).
function Consumer:_handle(handler, ev, info, first, env)
    if not self.db then
        return call_handler(handler, ev, nil, info)
    end
    local uow_opts = { context = context_of(ev, info), dispatcher = self.dispatcher }
    if self.uow_opts then
        for k, v in pairs(self.uow_opts) do
            if k ~= "context" then uow_opts[k] = v end
        end
    end
    local name, inbox = self.name, self.inbox
    local r, e = self.db:unit_of_work(function(uow)
        if first and first(uow) == DUPLICATE then return DUPLICATE end
        if inbox then
            local n, ie = uow:exec(INBOX_INSERT, name, ev.event_id, ev.event_name)
            if not n then error(ie, 0) end
            if n == 0 then return DUPLICATE end
        end
        -- sealed personal fields opened in the handler's transaction (the keys held until it
        -- commits); a forgotten subject's read qx.forgotten
        local read = self:_read_sealed(uow, ev, env)
        local ok, he = call_handler(handler, read, uow, info)
        if not ok then error(he, 0) end
        return true
    end, uow_opts)
    if r == nil then return false, e end
    return true, r == DUPLICATE
end

local function hex(s)
    return (gsub(s, ".", function(c) return fmt("%02x", byte(c)) end))
end

local function as_int(v)
    v = tonumber(v)
    if v and v == floor(v) and v >= -2147483648 and v <= 2147483647 then return v end
    return nil
end

-- Dead-letters message m (reason: "invalid_message", "unknown_event", "max_deliver") and
-- terminates it. When the dead letter cannot be written the message is negatively
-- acknowledged instead (the longest backoff), so it comes back and nothing is lost.
function Consumer:_dead(m, reason, cause, counts, ev)
    local h = m.headers or {}
    local event_id = ev and ev.event_id or h["qx.event_id"]
    local event_name = ev and ev.event_name or h["qx.event_name"]
    local event_version = ev and ev.event_version or as_int(h["qx.event_version"])
    local message = cause ~= nil and tostring(cause) or nil
    local dead = {
        consumer = self.name, stream = m.stream, subject = m.subject, stream_seq = m.stream_seq,
        published_at = m.published_at, event_id = event_id, event_name = event_name,
        event_version = event_version, headers = h, data = m.data, reason = reason,
        error = message, deliveries = m.delivered,
    }
    local ok, e = true, nil
    if self.write_dead_letters then
        ok, e = self.db:exec(DEAD_LETTER_INSERT, core.uuid(), self.name, m.stream, m.subject,
                             m.stream_seq, m.published_at, event_id, event_name, event_version,
                             h, hex(m.data), reason, message, m.delivered)
    end
    if ok and self.on_dead_letter then
        local cok, ce = xpcall(self.on_dead_letter, err.handler, dead)
        if not cok then ok, e = false, ce end
    end
    if not ok then
        self.last_error = e
        counts.failed = counts.failed + 1
        self:_reply("nak", m, self.backoff[#self.backoff])
        return
    end
    if self.write_dead_letters then self.totals.dead_lettered = self.totals.dead_lettered + 1 end
    counts.termed = counts.termed + 1
    self:_reply("term", m)
end

function Consumer:_reply(kind, m, delay)
    local ok, e
    if kind == "ack" and self.ack_sync then
        ok, e = m:ack_sync()
    else
        ok, e = m[kind](m, delay)
    end
    if not ok then
        -- the server redelivers after the ack wait; the inbox catches the repeat
        self.totals.reply_errors = self.totals.reply_errors + 1
        self.last_error = e
    end
    return ok
end

function Consumer:_process(handler, m, counts)
    -- (env: an envelope whose sealed fields the unit of work opens before reading it)
    local ev, env = self:_decode(m.data)
    if not ev then
        return self:_dead(m, env.code == "not_found" and "unknown_event" or "invalid_message",
                          env, counts)
    end
    if self.inbox and not is_uuid(ev.event_id) then
        return self:_dead(m, "invalid_message", err.new("invalid",
            "event_id " .. tostring(ev.event_id) .. " is not a uuid (the inbox keys on it)"),
            counts, ev)
    end
    local delivered = tonumber(m.delivered) or 1
    if delivered > self.max_deliver then
        -- the max_deliver-th delivery was never answered (a crash, an ack wait passed)
        return self:_dead(m, "max_deliver", err.new("error", fmt(
            "delivery %d: no reply within %d deliveries", delivered, self.max_deliver)), counts, ev)
    end
    local info = msg_info(self, m)
    local start = info.traceparent and tracing._spans_wanted() and tracing._time()
    local ok, r = self:_handle(handler, ev, info, nil, env)
    if start then
        tracing._span("qx.consumer.handle", start, info.traceparent, info.tracestate, {
            ["messaging.system"] = "nats", ["messaging.destination.name"] = m.subject,
            ["qx.consumer"] = self.name, ["qx.event_name"] = ev.event_name,
            ["qx.event_id"] = ev.event_id, ["qx.delivered"] = delivered,
            ["qx.outcome"] = not ok and "failed" or r and "duplicate" or "handled",
        })
    end
    if ok then
        if r then
            counts.duplicates = counts.duplicates + 1
        else
            counts.handled = counts.handled + 1
        end
        self:_reply("ack", m)
        return
    end
    -- tampered, or sealed under no key of this database: no redelivery makes it better
    if type(r) == "table" and r.unopenable then
        return self:_dead(m, "invalid_message", r, counts, ev)
    end
    counts.failed = counts.failed + 1
    self.last_error = r
    if delivered >= self.max_deliver then
        return self:_dead(m, "max_deliver", r, counts, ev)
    end
    local b = self.backoff
    self:_reply("nak", m, b[min(delivered, #b)])
end

local function add(totals, counts)
    for k, v in pairs(counts) do totals[k] = (totals[k] or 0) + v end
end

--- One fetch (waiting up to timeout_ms, default fetch_timeout_ms, for the first message) and
-- every message of it handled and answered. failed counts handler failures (and dead letters
-- that could not be written); termed counts messages given up on.
---@param handler fun(ev: table, uow: qx.Uow?, msg: qx.MsgInfo): any
---@param opts table|nil { timeout_ms = n, batch = n }
---@return table|nil counts { fetched, handled, failed, termed, duplicates }
---@return qx.Error? err
function Consumer:run_once(handler, opts)
    self:_check_open(2)
    check_handler(handler)
    if opts ~= nil and type(opts) ~= "table" then error("run_once: options must be a table", 2) end
    opts = options.check(opts, { "timeout_ms", "batch" }, "run_once")
    local timeout = opts.timeout_ms or self.fetch_timeout_ms
    local batch = opts.batch or self.batch
    if not is_int(timeout, 1, 2147483647) then error("run_once: timeout_ms must be >= 1", 2) end
    if not is_int(batch, 1, 10000) then error("run_once: batch must be between 1 and 10000", 2) end
    local msgs, e = self.handle:fetch(batch, timeout)
    if not msgs then
        self.last_error = e
        return nil, e
    end
    local counts = { fetched = #msgs, handled = 0, failed = 0, termed = 0, duplicates = 0 }
    local totals = self.totals
    for i = 1, #msgs do
        if (tonumber(msgs[i].delivered) or 1) > 1 then
            totals.redelivered = totals.redelivered + 1
        end
    end
    if self.commit_batch then
        counts.held = 0
        if msgs[1] ~= nil then self:_process_batch(handler, msgs, counts) end
    else
        for i = 1, #msgs do
            self:_process(handler, msgs[i], counts)
        end
    end
    add(self.totals, counts)
    return counts
end

local RUN_OPTIONS = { "max_messages", "idle_timeout_ms", "metrics_listen", "health_stale_ms",
                      "handle_signals" }

-- a fetch waits at most this long while signals are watched: one then ends the wait soon
local SIGNAL_FETCH_MS = 250

local function run_loop(self, handler, max_messages, idle, server, signals)
    local fetched, last_seen = 0, clock()
    local errors_in_a_row = 0
    local timeout = signals and min(self.fetch_timeout_ms, SIGNAL_FETCH_MS) or nil
    while not self.stopped and not (signals and signals_sleep(0)) do
        local batch = self.batch
        if max_messages then batch = min(batch, max_messages - fetched) end
        local counts, e = self:run_once(handler, { batch = batch, timeout_ms = timeout })
        if server then
            server:tick(counts ~= nil, counts == nil and ("the last fetch failed: " .. tostring(e)))
        end
        if not counts then
            if e.code == "closed" then return nil, e end
            errors_in_a_row = errors_in_a_row + 1
            if errors_in_a_row >= 1000 then return nil, e end
        else
            errors_in_a_row = 0
            fetched = fetched + counts.fetched
            if counts.fetched > 0 then last_seen = clock() end
            if max_messages and fetched >= max_messages then break end
            if idle and (clock() - last_seen) * 1000 >= idle then break end
        end
    end
    return self:stats()
end

--- Fetches and handles until stop() (from a handler, a hook or a signal handler), finishing
-- the batch in flight; or until max_messages were fetched, or nothing came for
-- idle_timeout_ms. A fetch error that is not a closed connection is retried on the next
-- round; a closed consumer or connection ends run with nil, err. With handle_signals, SIGTERM
-- and SIGINT stop it too, after the batch in flight is handled and answered (they no longer end
-- the process while it runs; the handlers before it come back when it returns). With
-- metrics_listen = "HOST:PORT" it serves /metrics (consumer:metrics()) and /health there while
-- it runs; /health is 503 after a failed fetch or when no fetch ended for health_stale_ms
-- (default 5000 + fetch_timeout_ms): docs/consumer.md. An address that cannot be bound:
-- nil, err at once.
---@param handler fun(ev: table, uow: qx.Uow?, msg: qx.MsgInfo): any
---@param opts table|nil { max_messages, idle_timeout_ms, metrics_listen, health_stale_ms,
---  handle_signals = false }
---@return table|nil totals
---@return qx.Error? err
function Consumer:run(handler, opts)
    self:_check_open(2)
    check_handler(handler)
    if opts ~= nil and type(opts) ~= "table" then error("run: options must be a table", 2) end
    opts = options.check(opts, RUN_OPTIONS, "run")
    local max_messages, idle = opts.max_messages, opts.idle_timeout_ms
    if max_messages ~= nil and not is_int(max_messages, 1) then
        error("run: max_messages must be an integer >= 1", 2)
    end
    if idle ~= nil and not is_int(idle, 1) then error("run: idle_timeout_ms must be >= 1", 2) end
    if opts.handle_signals ~= nil and type(opts.handle_signals) ~= "boolean" then
        error("run: handle_signals must be a boolean", 2)
    end
    local function text()
        if self.handle then return self:metrics() end -- closed from a handler: keep the last
    end
    local server, se = metrics_server.start(opts, "consumer:run", 5000 + self.fetch_timeout_ms,
                                            text)
    if se then return nil, se end
    self.stopped = false
    local signals = opts.handle_signals == true
    if signals then signals_watch(true) end
    local ok, r1, r2 = pcall(run_loop, self, handler, max_messages, idle, server, signals)
    if signals then signals_watch(false) end
    if server then server:close() end
    if not ok then error(r1, 0) end
    return r1, r2
end

--- run() returns after the batch in flight.
function Consumer:stop()
    self.stopped = true
end

--- Totals since the consumer was made: { fetched, handled, failed, termed, duplicates,
-- dead_lettered, reply_errors, redelivered, last_error }.
---@return table stats
function Consumer:stats()
    local out = {}
    for k, v in pairs(self.totals) do out[k] = v end
    out.last_error = self.last_error and tostring(self.last_error) or nil
    return out
end

--- The server's view: { num_pending, num_ack_pending, num_redelivered, num_waiting,
-- delivered_stream_seq, ack_floor_stream_seq, max_deliver, ack_wait_ms, max_ack_pending,
-- stream, durable }.
---@return table|nil info
---@return qx.Error? err
function Consumer:info()
    self:_check_open(2)
    return self.handle:info()
end


--- Prometheus text of stats() and the server's pending counts (when reachable).
---@return string text
function Consumer:metrics()
    self:_check_open(2)
    local t = self.totals
    local m = metrics.new(metrics.labels("stream", self.stream, "consumer", self.name))
    local function metric(name, kind, help, value)
        m:add("qx_consumer_" .. name, kind, help, value)
    end
    metric("messages_fetched_total", "counter", "Messages fetched from the stream.", t.fetched)
    metric("messages_handled_total", "counter", "Messages handled and acknowledged.", t.handled)
    metric("messages_failed_total", "counter",
           "Handler failures (message negatively acknowledged or dead-lettered).", t.failed)
    metric("messages_termed_total", "counter", "Messages given up on (terminated).", t.termed)
    metric("messages_duplicate_total", "counter", "Redelivered messages the inbox had seen.",
           t.duplicates)
    metric("dead_letters_total", "counter", "Dead-letter rows written.", t.dead_lettered)
    metric("messages_redelivered_total", "counter",
           "Messages fetched again after an earlier delivery.", t.redelivered)
    if self.commit_batch then
        metric("messages_held_total", "counter",
               "Messages held back behind a failed message of their partition key.", t.held)
        metric("batch_commits_total", "counter", "Units of work committed for a fetched batch.",
               t.batch_commits)
    end
    local info = self.handle:info()
    if info then
        metric("pending_messages", "gauge",
               "Messages on the stream not yet delivered to this consumer.", info.num_pending)
        metric("ack_pending_messages", "gauge", "Messages delivered and not yet answered.",
               info.num_ack_pending)
        metric("redelivered_messages", "gauge",
               "Messages delivered more than once and not yet answered.", info.num_redelivered)
    end
    return m:text()
end

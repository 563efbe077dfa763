--- Internal to qx.consumer: the run loop. A fetch, and for each message: decode, the handler in
-- a unit of work with the inbox row, then ack, nak with backoff, or dead-letter and term.
local core = require "qx.core"
local err = require "qx.error"
local metrics = require "qx.metrics"
local base = require "qx.messaging.consumer.base"
local options = require "qx.options"
local personal = require "qx.store.personal"

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
---@field replay boolean? true when consumer:replay_dead runs the handler
local MsgInfo = {}
MsgInfo.__index = MsgInfo

--- Tells the server the handler is still at work, restarting the ack wait.
function MsgInfo:in_progress()
    return self._msg:in_progress()
end

local function msg_info(self, m)
    return setmetatable({
        subject = m.subject,
        stream = m.stream,
        consumer = self.name,
        stream_seq = m.stream_seq,
        consumer_seq = m.consumer_seq,
        delivered = m.delivered,
        pending = m.pending,
        published_at = m.published_at,
        headers = m.headers,
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

-- Context of the unit of work: the event's ids (only valid uuids, the uow checks them).
local function context_of(ev)
    local ctx = {}
    if is_uuid(ev.correlation_id) then ctx.correlation_id = ev.correlation_id end
    if is_uuid(ev.event_id) then ctx.causation_id = ev.event_id end
    if is_uuid(ev.tenant_id) then ctx.tenant_id = ev.tenant_id end
    if ev.actor_id ~= nil then ctx.actor_id = ev.actor_id end
    return ctx
end

-- Runs the handler for ev: in a unit of work when the consumer has a db, whose first statements
-- are first(uow) (when given; it may return DUPLICATE) and the inbox row. Returns true and
-- whether it was a duplicate, or false and the error.
-- Whether the consumer's database has qx's key table (asked once): a consumer whose database
-- has none hands sealed personal fields to its handler as they came.
function Consumer:_keys_reachable()
    local r = self._keys_table
    if r == nil then
        local rows = self.db:query("SELECT to_regclass('qx_subject_keys') IS NOT NULL AS here")
        r = rows ~= nil and rows[1].here == true
        if rows ~= nil then self._keys_table = r end
    end
    return r
end

function Consumer:_handle(handler, ev, info, first)
    if not self.db then
        return call_handler(handler, ev, nil, info)
    end
    local uow_opts = { context = context_of(ev), dispatcher = self.dispatcher }
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
        if self:_keys_reachable() then
            -- sealed personal fields opened in the handler's transaction (the keys held until
            -- it commits); a forgotten subject's read qx.forgotten
            local opened, pe = personal.open_all(uow, { ev })
            if not opened then
                if pe.code == "invalid" then pe.unopenable = true end
                error(pe, 0)
            end
        end
        local ok, he = call_handler(handler, ev, uow, info)
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
    local ev, e = self.registry:decode(m.data, self.decode_opts)
    if not ev then
        return self:_dead(m, e.code == "not_found" and "unknown_event" or "invalid_message",
                          e, counts)
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
    local ok, r = self:_handle(handler, ev, msg_info(self, m))
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
    for i = 1, #msgs do
        self:_process(handler, msgs[i], counts)
    end
    add(self.totals, counts)
    return counts
end

local RUN_OPTIONS = { "max_messages", "idle_timeout_ms" }

--- Fetches and handles until stop() (from a handler, a hook or a signal handler), finishing
-- the batch in flight; or until max_messages were fetched, or nothing came for
-- idle_timeout_ms. A fetch error that is not a closed connection is retried on the next
-- round; a closed consumer or connection ends run with nil, err.
---@param handler fun(ev: table, uow: qx.Uow?, msg: qx.MsgInfo): any
---@param opts table|nil { max_messages = n, idle_timeout_ms = n }
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
    self.stopped = false
    local fetched, last_seen = 0, clock()
    local errors_in_a_row = 0
    while not self.stopped do
        local batch = self.batch
        if max_messages then batch = min(batch, max_messages - fetched) end
        local counts, e = self:run_once(handler, { batch = batch })
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

--- run() returns after the batch in flight.
function Consumer:stop()
    self.stopped = true
end

--- Totals since the consumer was made: { fetched, handled, failed, termed, duplicates,
-- dead_lettered, reply_errors, last_error }.
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
    local info = self.handle:info()
    if info then
        metric("pending_messages", "gauge",
               "Messages on the stream not yet delivered to this consumer.", info.num_pending)
        metric("ack_pending_messages", "gauge", "Messages delivered and not yet answered.",
               info.num_ack_pending)
    end
    return m:text()
end

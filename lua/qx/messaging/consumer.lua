-- qx.consumer: a JetStream pull consumer that turns messages back into events and hands them
-- to a handler, with an inbox for effectively-once handling and dead letters for what it gives
-- up on.
--
--   local c = assert(qx.consumer{
--       nats = conn,                 -- a NATS connection (qx.nats.connect), or servers = "nats://..."
--       stream = "ORDERS", durable = "billing", filter_subject = "orders.>",
--       registry = qx.registry{ OrderPlaced, OrderCancelled },
--       db = db,                     -- optional: inbox + dead-letter rows + a unit of work per message
--       batch = 10, max_deliver = 5, ack_wait = 30, backoff = { 1000, 5000, 30000 },
--   })
--   c:run(function(ev, uow, msg) ... end)   -- until c:stop()
--   local counts = c:run_once(handler)       -- { handled, failed, termed, duplicates, fetched }
--
-- For every message: the body (an envelope, DESIGN.md section 4) becomes an event through the
-- registry, and handler(event, uow, msg) runs. With a db the handler runs inside
-- db:unit_of_work, whose first statement records (consumer, event id) in qx_inbox; when that row
-- exists already the message is a duplicate and is acknowledged without running the handler.
-- The message is acknowledged after the commit.
--
-- A handler fails by raising, or by returning nil, err / false[, err] (its unit of work rolls
-- back). A failed message is negatively acknowledged with a delay taken from backoff (the n-th
-- delivery waits backoff[n], the last entry repeating), until its max_deliver-th delivery fails:
-- then it is dead-lettered (a qx_dead_letters row, written before the message is terminated, and
-- on_dead_letter) and terminated. A body that is not an envelope, or names an event the registry
-- does not know, is dead-lettered at once: a bad message never stops the consumer. If the dead
-- letter cannot be written, the message is negatively acknowledged instead, so nothing is lost.
--
-- qx enforces max_deliver itself and creates the JetStream consumer with no delivery limit: a
-- message whose last delivery was never answered (the process died) arrives once more and is
-- dead-lettered, instead of being dropped silently by the server.
--
-- Options (registry and durable are required):
--   nats / servers    a qx.nats connection, a core NATS handle or NATS options; or urls
--                     (default: connect with the QX_NATS__* settings)
--   stream            default: the NATS settings' stream (QX_NATS__STREAM, QX_EVENTS)
--   durable           the JetStream consumer's name; created, or updated to these options
--   bind = true       bind to a durable the deployment declared: never create or update it
--   filter_subject    only these subjects of the stream
--   name              the consumer's name in qx_inbox / qx_dead_letters (default: durable)
--   db                enables the unit of work per message, the inbox and dead-letter rows
--   inbox = false     a unit of work per message but no inbox; dead_letters = false: no rows
--   batch (10), fetch_timeout_ms (1000), max_deliver (5), backoff (ms list, default
--   1000, 5000, 15000, 30000, 60000), ack_wait (seconds) or ack_wait_ms (30000),
--   max_ack_pending (1000), ack_sync (false: wait for the server to confirm each ack)
--   latest_version    rebuild an unregistered version with the latest registered class
--   on_dead_letter    fn(dead) after a dead letter is recorded; raising keeps the message
--   unit_of_work      extra options for db:unit_of_work (hooks, statement_timeout_ms)
--   dispatcher        in-process dispatcher for events the handler records
local core = require "qx.core"
local err = require "qx.error"
local registry_mod = require "qx.model.registry"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local xpcall = xpcall
local pcall = pcall
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local getmetatable = getmetatable
local floor = math.floor
local min = math.min
local fmt = string.format
local byte = string.byte
local gsub = string.gsub
local concat = table.concat
local sort = table.sort
local is_uuid = core.is_uuid
local clock = core.clock

local _M = { _VERSION = "0.1.0" }

local Consumer = {}
Consumer.__index = Consumer
_M.Consumer = Consumer

_M.DEFAULTS = {
    batch = 10,
    max_deliver = 5,
    ack_wait_ms = 30000,
    max_ack_pending = 1000,
    backoff = { 1000, 5000, 15000, 30000, 60000 },
    fetch_timeout_ms = 1000,
}

local INBOX_INSERT = [[
INSERT INTO qx_inbox (consumer, event_id, event_name) VALUES ($1, $2::uuid, $3)
ON CONFLICT (consumer, event_id) DO NOTHING]]

local DEAD_LETTER_INSERT = [[
INSERT INTO qx_dead_letters (id, consumer, stream, subject, stream_seq, published_at, event_id,
                             event_name, event_version, headers, data, reason, error, deliveries)
VALUES ($1, $2, $3, $4, $5, $6::timestamptz, $7, $8, $9, $10::jsonb, decode($11, 'hex'), $12,
        left($13, 8192), $14)
ON CONFLICT (consumer, stream, stream_seq, published_at) DO NOTHING]]

local DEAD_COLUMNS = [[id::text AS id, consumer, stream, subject, stream_seq,
    published_at::text AS published_at, event_id, event_name, event_version, headers,
    data, reason, error, deliveries, dead_at::text AS dead_at, replayed_at::text AS replayed_at]]

local OPTIONS = {
    nats = true, servers = true, stream = true, durable = true, filter_subject = true,
    name = true, registry = true, db = true, inbox = true, dead_letters = true, batch = true,
    max_deliver = true, ack_wait = true, ack_wait_ms = true, max_ack_pending = true,
    backoff = true, fetch_timeout_ms = true, latest_version = true, dispatcher = true,
    on_dead_letter = true, ack_sync = true, bind = true, unit_of_work = true,
}

-- ---- options ----------------------------------------------------------------------------

local function is_int(v, lo, hi)
    return type(v) == "number" and v == floor(v) and v >= lo and (hi == nil or v <= hi)
end

local function opt_int(opts, name, dflt, lo, hi)
    local v = opts[name]
    if v == nil then return dflt end
    if not is_int(v, lo, hi) then
        error(fmt("qx.consumer: %s must be an integer %s%s", name,
                  hi and fmt("between %d and %d", lo, hi) or fmt(">= %d", lo), ""), 4)
    end
    return v
end

local function opt_string(opts, name, required)
    local v = opts[name]
    if v == nil and not required then return nil end
    if type(v) ~= "string" or v == "" then
        error("qx.consumer: " .. name .. " must be a non-empty string", 4)
    end
    return v
end

local function is_callable(f)
    if type(f) == "function" then return true end
    local mt = getmetatable(f)
    return type(mt) == "table" and type(mt.__call) == "function"
end

local function check_backoff(list)
    if list == nil then return _M.DEFAULTS.backoff end
    if type(list) ~= "table" or #list == 0 then
        error("qx.consumer: backoff must be a non-empty list of delays in milliseconds", 4)
    end
    local out = {}
    for i, v in ipairs(list) do
        if not is_int(v, 0, 2147483647) then
            error("qx.consumer: backoff[" .. i .. "] must be a delay in milliseconds (>= 0)", 4)
        end
        out[i] = v
    end
    return out
end

local function check_options(opts)
    if type(opts) ~= "table" then error("qx.consumer: expected an options table", 3) end
    for k in pairs(opts) do
        if not OPTIONS[k] then
            local names = {}
            for n in pairs(OPTIONS) do names[#names + 1] = n end
            sort(names)
            error("qx.consumer: unknown option '" .. tostring(k) .. "' (known: "
                  .. concat(names, ", ") .. ")", 3)
        end
    end
    local o = {}
    o.stream = opt_string(opts, "stream")
    o.durable = opt_string(opts, "durable", true)
    o.filter_subject = opt_string(opts, "filter_subject")
    o.name = opt_string(opts, "name") or o.durable
    if getmetatable(opts.registry) ~= registry_mod.Registry then
        error("qx.consumer: registry must be a qx.registry{...}", 3)
    end
    o.registry = opts.registry
    if opts.db ~= nil and (type(opts.db) ~= "table" or type(opts.db.unit_of_work) ~= "function") then
        error("qx.consumer: db must be a database from qx.connect", 3)
    end
    o.db = opts.db
    for _, k in ipairs({ "inbox", "dead_letters", "latest_version", "ack_sync", "bind" }) do
        if opts[k] ~= nil and type(opts[k]) ~= "boolean" then
            error("qx.consumer: " .. k .. " must be a boolean", 3)
        end
    end
    if opts.inbox and not o.db then error("qx.consumer: inbox = true needs a db", 3) end
    o.inbox = o.db ~= nil and opts.inbox ~= false
    o.write_dead_letters = o.db ~= nil and opts.dead_letters ~= false
    o.latest_version = opts.latest_version == true
    o.ack_sync = opts.ack_sync == true
    o.bind = opts.bind == true
    o.batch = opt_int(opts, "batch", _M.DEFAULTS.batch, 1, 10000)
    o.max_deliver = opt_int(opts, "max_deliver", _M.DEFAULTS.max_deliver, 1, 1000000)
    if opts.ack_wait ~= nil and opts.ack_wait_ms ~= nil then
        error("qx.consumer: give ack_wait (seconds) or ack_wait_ms, not both", 3)
    end
    if opts.ack_wait ~= nil then
        local s = opts.ack_wait
        if type(s) ~= "number" or s <= 0 or s > 2147483 then
            error("qx.consumer: ack_wait must be a number of seconds > 0", 3)
        end
        o.ack_wait_ms = floor(s * 1000 + 0.5)
    else
        o.ack_wait_ms = opt_int(opts, "ack_wait_ms", _M.DEFAULTS.ack_wait_ms, 1, 2147483647)
    end
    o.max_ack_pending = opt_int(opts, "max_ack_pending", _M.DEFAULTS.max_ack_pending, 1, 2147483647)
    o.fetch_timeout_ms = opt_int(opts, "fetch_timeout_ms", _M.DEFAULTS.fetch_timeout_ms, 1,
                                 2147483647)
    o.backoff = check_backoff(opts.backoff)
    if opts.on_dead_letter ~= nil and not is_callable(opts.on_dead_letter) then
        error("qx.consumer: on_dead_letter must be a function", 3)
    end
    o.on_dead_letter = opts.on_dead_letter
    if opts.unit_of_work ~= nil and type(opts.unit_of_work) ~= "table" then
        error("qx.consumer: unit_of_work must be a table of unit-of-work options", 3)
    end
    o.uow_opts = opts.unit_of_work
    o.dispatcher = opts.dispatcher
    return o
end

-- ---- construction -----------------------------------------------------------------------

-- new(opts) -> consumer | nil, err
function _M.new(opts)
    local o = check_options(opts)
    if opts.nats ~= nil and opts.servers ~= nil then
        error("qx.consumer: give nats (a connection or NATS options) or servers, not both", 2)
    end
    if opts.servers ~= nil and type(opts.servers) ~= "string" and type(opts.servers) ~= "table" then
        error("qx.consumer: servers must be nats:// urls", 2)
    end
    local target = opts.nats
    if target == nil then target = { servers = opts.servers } end
    local conn, opened = require("qx.messaging.nats").resolve(target)
    if not conn then return nil, opened end
    local owned = opened and conn or nil
    o.stream = o.stream or conn.settings.stream

    local handle, e = core.consumer(conn.handle, {
        stream = o.stream,
        durable = o.durable,
        filter_subject = o.filter_subject,
        max_deliver = -1,          -- qx counts deliveries itself (see above)
        ack_wait_ms = o.ack_wait_ms,
        max_ack_pending = o.max_ack_pending,
        create = not o.bind,
    })
    if not handle then
        if owned then owned:close() end
        return nil, e
    end
    o.handle = handle
    o.owned_nats = owned
    o.stopped = false
    o.totals = { fetched = 0, handled = 0, failed = 0, termed = 0, duplicates = 0,
                 dead_lettered = 0, reply_errors = 0 }
    o.decode_opts = o.latest_version and { latest = true } or nil
    return setmetatable(o, Consumer)
end

-- ---- one message ------------------------------------------------------------------------

-- What a handler learns about the message besides the event.
local MsgInfo = {}
MsgInfo.__index = MsgInfo

-- msg:in_progress(): tells the server the handler is still at work, restarting the ack wait.
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

local DUPLICATE = {}

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
    counts.failed = counts.failed + 1
    self.last_error = r
    if delivered >= self.max_deliver then
        return self:_dead(m, "max_deliver", r, counts, ev)
    end
    local b = self.backoff
    self:_reply("nak", m, b[min(delivered, #b)])
end

-- ---- the loop ---------------------------------------------------------------------------

local function check_handler(handler)
    if is_callable(handler) then return end
    if type(handler) == "table" and type(handler.publish) == "function" then return end
    error("consumer: handler must be a function(event, uow, msg) or a dispatcher", 3)
end

local function add(totals, counts)
    for k, v in pairs(counts) do totals[k] = (totals[k] or 0) + v end
end

-- consumer:run_once(handler[, { timeout_ms = n, batch = n }])
--   -> { fetched, handled, failed, termed, duplicates } | nil, err
-- One fetch (waiting up to timeout_ms, default fetch_timeout_ms, for the first message) and
-- every message of it handled and answered. failed counts handler failures (and dead letters
-- that could not be written); termed counts messages given up on.
function Consumer:run_once(handler, opts)
    self:_check_open(2)
    check_handler(handler)
    if opts ~= nil and type(opts) ~= "table" then error("run_once: options must be a table", 2) end
    opts = opts or {}
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

-- consumer:run(handler[, { max_messages = n, idle_timeout_ms = n }]) -> totals | nil, err
-- Fetches and handles until stop() (from a handler, a hook or a signal handler), finishing the
-- batch in flight; or until max_messages were fetched, or nothing came for idle_timeout_ms.
-- A fetch error that is not a closed connection is retried on the next round (nats.c reconnects
-- in the background); a closed consumer or connection ends run with nil, err.
function Consumer:run(handler, opts)
    self:_check_open(2)
    check_handler(handler)
    if opts ~= nil and type(opts) ~= "table" then error("run: options must be a table", 2) end
    opts = opts or {}
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

-- consumer:stop(): run() returns after the batch in flight.
function Consumer:stop()
    self.stopped = true
end

-- consumer:stats() -> totals since the consumer was made:
--   { fetched, handled, failed, termed, duplicates, dead_lettered, reply_errors, last_error }
function Consumer:stats()
    local out = {}
    for k, v in pairs(self.totals) do out[k] = v end
    out.last_error = self.last_error and tostring(self.last_error) or nil
    return out
end

-- consumer:info() -> the server's view: { num_pending, num_ack_pending, num_redelivered,
--   num_waiting, delivered_stream_seq, ack_floor_stream_seq, max_deliver, ack_wait_ms,
--   max_ack_pending, stream, durable } | nil, err
function Consumer:info()
    self:_check_open(2)
    return self.handle:info()
end

-- Prometheus text exposition of stats() and the server's pending counts (when reachable).
function Consumer:metrics()
    self:_check_open(2)
    local labels = fmt('{stream="%s",consumer="%s"}', self.stream, self.name)
    local t = self.totals
    local lines = {}
    local function metric(name, kind, help, value)
        lines[#lines + 1] = "# HELP qx_consumer_" .. name .. " " .. help
        lines[#lines + 1] = "# TYPE qx_consumer_" .. name .. " " .. kind
        lines[#lines + 1] = "qx_consumer_" .. name .. labels .. " " .. tostring(value)
    end
    metric("messages_fetched_total", "counter", "Messages fetched from the stream.", t.fetched)
    metric("messages_handled_total", "counter", "Messages handled and acknowledged.", t.handled)
    metric("messages_failed_total", "counter", "Handler failures (message negatively acknowledged or dead-lettered).", t.failed)
    metric("messages_termed_total", "counter", "Messages given up on (terminated).", t.termed)
    metric("messages_duplicate_total", "counter", "Redelivered messages the inbox had seen.", t.duplicates)
    metric("dead_letters_total", "counter", "Dead-letter rows written.", t.dead_lettered)
    local info = self.handle:info()
    if info then
        metric("pending_messages", "gauge", "Messages on the stream not yet delivered to this consumer.", info.num_pending)
        metric("ack_pending_messages", "gauge", "Messages delivered and not yet answered.", info.num_ack_pending)
    end
    return concat(lines, "\n") .. "\n"
end

-- ---- inbox and dead letters ---------------------------------------------------------------

local function need_db(self, method)
    if not self.db then error("consumer:" .. method .. ": the consumer has no db", 3) end
end

-- consumer:purge_inbox{ older_than_seconds = n } -> rows deleted. An inbox row only has to
-- outlive the redeliveries of its message (max_deliver x (ack wait + backoff)); keep a margin.
function Consumer:purge_inbox(opts)
    need_db(self, "purge_inbox")
    local s = type(opts) == "table" and opts.older_than_seconds
    if type(s) ~= "number" or s < 0 then
        error("consumer:purge_inbox: give { older_than_seconds = n }", 2)
    end
    return self.db:exec([[
DELETE FROM qx_inbox WHERE consumer = $1 AND handled_at < now() - make_interval(secs => $2::float8)]],
        self.name, s)
end

-- consumer:dead_letters{ limit = 100, offset = 0, include_replayed = false } -> rows, oldest first
function Consumer:dead_letters(opts)
    need_db(self, "dead_letters")
    opts = opts or {}
    local limit, offset = opts.limit or 100, opts.offset or 0
    if not is_int(limit, 0, 10000) or not is_int(offset, 0) then
        error("consumer:dead_letters: limit must be 0..10000 and offset >= 0", 2)
    end
    return self.db:query("SELECT " .. DEAD_COLUMNS .. " FROM qx_dead_letters WHERE consumer = $1"
        .. (opts.include_replayed and "" or " AND replayed_at IS NULL")
        .. " ORDER BY dead_at, id LIMIT $2 OFFSET $3", self.name, limit, offset)
end

-- consumer:replay_dead(handler[, ids]) -> { handled, failed, duplicates } | nil, err
-- Runs dead letters of this consumer (all, or the ids given) through the handler again, each in
-- its own unit of work that also marks the row replayed (and, with the inbox, records the
-- event), so a replay that commits is never repeated. A dead letter whose body is still not an
-- event stays dead and counts as failed.
function Consumer:replay_dead(handler, ids)
    need_db(self, "replay_dead")
    check_handler(handler)
    local rows, e
    if ids == nil then
        rows, e = self.db:query("SELECT " .. DEAD_COLUMNS .. [[ FROM qx_dead_letters
WHERE consumer = $1 AND replayed_at IS NULL ORDER BY dead_at, id]], self.name)
    else
        if type(ids) == "string" then ids = { ids } end
        if type(ids) ~= "table" then error("consumer:replay_dead: ids must be a list", 2) end
        for i, id in ipairs(ids) do
            if not is_uuid(id) then
                return nil, err.new("invalid", "id " .. i .. " is not a uuid: " .. tostring(id))
            end
        end
        rows, e = self.db:query("SELECT " .. DEAD_COLUMNS .. [[ FROM qx_dead_letters
WHERE consumer = $1 AND replayed_at IS NULL AND id = ANY($2::uuid[]) ORDER BY dead_at, id]],
            self.name, "{" .. concat(ids, ",") .. "}")
    end
    if not rows then return nil, e end
    local counts = { handled = 0, failed = 0, duplicates = 0 }
    local function replay_info() return true end
    for _, row in ipairs(rows) do
        local ev, de = self.registry:decode(row.data, self.decode_opts)
        if ev and self.inbox and not is_uuid(ev.event_id) then
            ev, de = nil, err.new("invalid", "event_id is not a uuid (the inbox keys on it)")
        end
        if not ev then
            counts.failed = counts.failed + 1
            self.last_error = de
        else
            local info = setmetatable({
                subject = row.subject, stream = row.stream, consumer = self.name,
                stream_seq = row.stream_seq, delivered = row.deliveries,
                published_at = row.published_at, headers = row.headers, replay = true,
            }, { __index = { in_progress = replay_info } })
            local id = row.id
            local ok, r = self:_handle(handler, ev, info, function(uow)
                local n, me = uow:exec(
                    "UPDATE qx_dead_letters SET replayed_at = now() WHERE id = $1 AND replayed_at IS NULL",
                    id)
                if not n then error(me, 0) end
                if n == 0 then return DUPLICATE end -- replayed meanwhile elsewhere
            end)
            if not ok then
                counts.failed = counts.failed + 1
                self.last_error = r
            elseif r then
                counts.duplicates = counts.duplicates + 1
            else
                counts.handled = counts.handled + 1
            end
        end
    end
    return counts
end

-- ---- closing ------------------------------------------------------------------------------

function Consumer:_check_open(level)
    if self.handle == nil then error("consumer is closed", level + 1) end
end

-- consumer:close(): drops the subscription (the durable consumer stays on the server; messages
-- fetched and not answered come back after the ack wait). Closing twice is harmless.
function Consumer:close()
    if self.handle ~= nil then
        self.handle:close()
        self.handle = nil
    end
    if self.owned_nats ~= nil then
        self.owned_nats:close()
        self.owned_nats = nil
    end
end

function Consumer:__tostring()
    return fmt("qx.consumer (%s/%s%s)", self.stream, self.durable,
               self.handle == nil and ", closed" or "")
end

return _M

--- qx.consumer{...}: a JetStream pull consumer that turns messages back into events and hands
-- them to a handler, with an inbox for effectively-once handling and dead letters for what it
-- gives up on.
--
--   local c = assert(qx.consumer{ nats = conn, stream = "ORDERS", durable = "billing",
--                                 registry = qx.registry{ OrderPlaced }, db = db })
--   c:run(function(ev, uow, msg) ... end)   -- until c:stop()
--   local counts = c:run_once(handler)       -- { handled, failed, termed, duplicates, fetched }
--
-- The files of this folder: options.lua, run.lua (the loop), batch.lua (commit = "batch"),
-- dead_letters.lua, sealed.lua (personal fields). Options and what happens to each message:
-- docs/consumer.md.
local core = require "qx.core"
local base = require "qx.messaging.consumer.base"
local options = require "qx.messaging.consumer.options"
require "qx.messaging.consumer.sealed"
require "qx.messaging.consumer.run"
require "qx.messaging.consumer.dead_letters"
require "qx.messaging.consumer.batch"

local type = type
local error = error
local setmetatable = setmetatable
local fmt = string.format
--- A JetStream pull consumer (qx.consumer).
---@class qx.Consumer
local Consumer = base.Consumer

local _M = { _VERSION = "0.1.0", Consumer = Consumer, DEFAULTS = options.DEFAULTS }

--- A pull consumer (qx.consumer); registry and durable are required. Options and defaults:
-- docs/consumer.md (nats, stream, durable, bind, filter_subject, name, db, inbox,
-- dead_letters, batch = 10, fetch_timeout_ms = 1000, max_deliver = 5, backoff, ack_wait_ms =
-- 30000, max_ack_pending = 1000, ack_sync, latest_version, on_dead_letter, unit_of_work,
-- commit = "message" | "batch").
---@param opts table
---@return qx.Consumer|nil consumer
---@return qx.Error? err connection, nats, invalid
function _M.new(opts)
    local o = options.check(opts)
    -- a gap in an upcaster chain is a deploy's mistake: refused here, not at the first message
    local ok, why = o.registry:check_chains()
    if not ok then error("qx.consumer: " .. why, 2) end
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
        deliver = o.deliver,
        start_sequence = o.start_sequence,
        start_time = o.start_time,
    })
    if not handle then
        if owned then owned:close() end
        return nil, e
    end
    o.handle = handle
    o.owned_nats = owned
    o.stopped = false
    o.totals = { fetched = 0, handled = 0, failed = 0, termed = 0, duplicates = 0,
                 dead_lettered = 0, reply_errors = 0, held = 0, batch_commits = 0,
                 redelivered = 0 }
    o.decode_opts = o.latest_version and { latest = true } or nil
    return setmetatable(o, Consumer)
end

--- Drops the subscription (the durable consumer stays on the server; messages fetched and not
-- answered come back after the ack wait). Closing twice is harmless.
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

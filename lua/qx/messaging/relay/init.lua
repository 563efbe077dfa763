--- qx.relay{...}: the outbox relay, publishing committed integration events from
-- qx_outbox_events to NATS JetStream. The loop runs in C (src/core/relay.c); this module reads
-- the settings, starts it and formats its figures.
--
--   local relay = assert(qx.relay{ db = db, nats = conn, shard_id = 0, shard_count = 1 })
--   relay:run()                      -- until relay:stop() (e.g. from on_batch) or a signal
--   relay:run_once()                 -- one batch: { published, failed, dead_lettered, ... }
--   relay:stats(), relay:metrics()   -- counters; Prometheus text
--
-- Options, their QX_RELAY__* variables and defaults, and the guarantees (order, shards,
-- overlapped batches): see docs/relay.md.
local core = require "qx.core"
local nats = require "qx.messaging.nats"
local settings = require "qx.settings"
local relay_settings = require "qx.messaging.relay.settings"
local metrics = require "qx.metrics"
local options = require "qx.options"
local metrics_server = require "qx.metrics_server"

local type = type
local error = error
local setmetatable = setmetatable
local tostring = tostring
local max = math.max
local clock = core.clock

local _M = {
    _VERSION = "0.1.0",
    ENV = relay_settings.ENV,
    DEFAULTS = relay_settings.DEFAULTS,
    settings = relay_settings.settings,
}
local OPTIONS = relay_settings.OPTIONS

--- The outbox relay (qx.relay).
---@class qx.Relay
local Relay = {}
Relay.__index = Relay
_M.Relay = Relay

--- The relay (qx.relay). Options, their QX_RELAY__* variables and defaults: docs/relay.md
-- (db or url, nats, shard_id = 0, shard_count = 1, batch_size = 1000, max_attempts = 10,
-- poll_interval_seconds = 0.5, ...).
---@param opts table
---@return qx.Relay|nil relay
---@return qx.Error? err connection, invalid
function _M.new(opts)
    if type(opts) ~= "table" then error("qx.relay: expected a table of options", 2) end
    options.check(opts, OPTIONS, "qx.relay")
    local url = opts.url
    if opts.db ~= nil then
        if type(opts.db) ~= "table" or not opts.db.settings then
            error("qx.relay: db must come from qx.connect", 2)
        end
        url = opts.db.settings.url
    elseif url == nil then
        local s, e = settings.db({})
        if not s then return nil, e end
        url = s.url
    end
    if type(url) ~= "string" then error("qx.relay: url must be a string", 2) end

    local cfg, e = _M.settings(opts)
    if not cfg then return nil, e end
    local conn, owned = nats.resolve(opts.nats)
    if not conn then return nil, owned end
    cfg.subject_prefix = cfg.subject_prefix or conn.settings.subject_prefix
    if cfg.connect_timeout_ms == nil and opts.db then
        cfg.connect_timeout_ms = opts.db.settings.connect_timeout_ms
    end
    cfg.ack_timeout_ms = cfg.ack_timeout_ms or conn.settings.publish_timeout_ms
    cfg.conninfo = url
    cfg.nats = conn.handle
    local handle
    handle, e = core.relay(cfg)
    cfg.nats = nil
    if owned then conn:close() end -- the relay holds its own reference
    if not handle then return nil, e end
    return setmetatable({ handle = handle, settings = cfg, db = opts.db, url = url }, Relay)
end

-- run{ on_batch = fn(result, err) -> false to stop, handle_signals = false } -> true
-- Blocks until stop() (call it from on_batch), on_batch returning false, or with
-- handle_signals SIGTERM/SIGINT; the batch in flight is finished first.
local RUN_OPTIONS = { "on_batch", "handle_signals", "metrics_listen", "health_stale_ms" }

-- the outbox figures count the table's rows: read again at most this often while serving
local OUTBOX_REFRESH_SECONDS = 15

--- Runs batches until relay:stop() or on_batch returns false, or, with handle_signals, a
-- SIGTERM/SIGINT; the batch in flight is finished first. With metrics_listen = "HOST:PORT" it
-- serves /metrics (relay:metrics()) and /health there while it runs; /health is 503 after a
-- failed batch, with NATS down, or when no batch ran for health_stale_ms (default 5000 plus
-- the longest wait of the loop): docs/relay.md. An address that cannot be bound: nil, err.
---@param opts table|nil { on_batch, handle_signals, metrics_listen, health_stale_ms }
---@return true|nil ok
---@return qx.Error? err invalid (metrics_listen)
function Relay:run(opts)
    if opts ~= nil and type(opts) ~= "table" then error("relay:run: expected a table", 2) end
    opts = options.check(opts, RUN_OPTIONS, "relay:run")
    if opts.metrics_listen == nil then
        return self.handle:run(opts)
    end
    local s = self.settings
    local outbox_text, outbox_at = "", -OUTBOX_REFRESH_SECONDS
    local server, e = metrics_server.start(opts, "relay:run",
        5000 + max(s.idle_interval_ms, s.poll_interval_ms, s.lock_retry_ms), function()
            if clock() - outbox_at >= OUTBOX_REFRESH_SECONDS then
                outbox_at = clock()
                local db = self.db or self:_db()
                local st = db and require("qx.store.outbox").new(db):status()
                if st then outbox_text = _M.outbox_metrics(st) end
            end
            return outbox_text .. _M.relay_metrics(self:stats())
        end)
    if not server then return nil, e end
    local on_batch = opts.on_batch
    local ok, r = pcall(self.handle.run, self.handle, {
        handle_signals = opts.handle_signals,
        on_batch = function(res, err)
            local nats_state = self.handle:stats().nats.state
            if err then
                server:tick(false, "the last batch failed: " .. tostring(err))
            elseif nats_state ~= "connected" then
                server:tick(false, "NATS is " .. tostring(nats_state))
            else
                server:tick(true)
            end
            if on_batch then return on_batch(res, err) end
        end,
    })
    server:close()
    if self._own_db then self._own_db:close() self._own_db = nil end
    if not ok then error(r, 0) end
    return r
end

-- a pool of one for the outbox figures of a relay made with a url (nil while it cannot be made)
function Relay:_db()
    if not self._own_db then
        self._own_db = require("qx.store.db").connect{ url = self.url, pool_size = 1 }
    end
    return self._own_db
end

--- One batch.
---@return table|nil counts { leader, database, lock_lost, claimed, published, duplicates, failed,
---  retried, dead_lettered, held, failures = { { event_id, error, counted, dead }, ... (the first
---  16) } }
---@return qx.Error? err
function Relay:run_once() return self.handle:run_once() end
--- run() returns after the batch in flight.
function Relay:stop() return self.handle:stop() end

--- Counters since start: { batches, claimed, published, duplicates, failed, dead_lettered,
-- held, errors, leader_changes, leader, running, last_batch_at, started_at, last_error,
-- shard_id, shard_count, nats = { state, reconnects } }.
---@return table stats
function Relay:stats()
    local s = self.handle:stats()
    s.shard_id, s.shard_count = self.settings.shard_id, self.settings.shard_count
    return s
end

--- Prometheus text for the figures of outbox:status().
---@param st table
---@return string
function _M.outbox_metrics(st)
    local m = metrics.new()
    m:add("qx_outbox_pending", "gauge", "Outbox rows waiting to be published.", st.pending)
    m:add("qx_outbox_scheduled", "gauge",
          "Pending outbox rows waiting for their next attempt after a failure.", st.scheduled)
    m:add("qx_outbox_dead", "gauge", "Dead-lettered outbox rows.", st.dead)
    m:add("qx_outbox_published", "gauge", "Published outbox rows not purged yet.", st.published)
    m:add("qx_outbox_oldest_pending_age_seconds", "gauge",
          "Age of the oldest pending outbox row.", st.oldest_pending_age_seconds)
    m:add("qx_outbox_max_attempts", "gauge",
          "Most failed attempts of a pending outbox row.", st.max_attempts)
    return m:text()
end

--- Prometheus text for relay:stats().
---@param s table
---@return string
function _M.relay_metrics(s)
    local m = metrics.new(metrics.labels("shard", s.shard_id or 0,
                                         "shard_count", s.shard_count or 1))
    m:add("qx_relay_published_total", "counter", "Events acked by JetStream.", s.published)
    m:add("qx_relay_duplicates_total", "counter",
          "Events JetStream already had (a retried publish).", s.duplicates)
    m:add("qx_relay_failed_total", "counter", "Failed publish attempts (retried later).", s.failed)
    m:add("qx_relay_retried_total", "counter",
          "Failed publish attempts that were the transport's (not counted toward max_attempts).",
          s.retried)
    m:add("qx_relay_dead_lettered_total", "counter", "Events dead-lettered.", s.dead_lettered)
    m:add("qx_relay_held_total", "counter",
          "Claimed events held back behind a failed event of their key.", s.held)
    m:add("qx_relay_batches_total", "counter", "Batches committed.", s.batches)
    m:add("qx_relay_errors_total", "counter", "Batches that failed (database or NATS).", s.errors)
    m:add("qx_relay_leader", "gauge", "1 when this relay holds its shard's lock.", s.leader)
    m:add("qx_relay_last_batch_timestamp_seconds", "gauge", "Unix time of the last batch.",
          s.last_batch_at)
    if s.nats then
        m:add("qx_relay_nats_connected", "gauge", "1 when the NATS connection is up.",
              s.nats.state == "connected")
        if s.nats.reconnects then
            m:add("qx_relay_nats_reconnects_total", "counter", "NATS reconnections.",
                  s.nats.reconnects)
        end
    end
    return m:text()
end

--- Prometheus text: the outbox figures and this relay's counters.
---@return string|nil text
---@return qx.Error? err
function Relay:metrics()
    local db = self.db
    local opened
    if not db then
        local e
        db, e = require("qx.store.db").connect{ url = self.url, pool_size = 1 }
        if not db then return nil, e end
        opened = true
    end
    local st, e = require("qx.store.outbox").new(db):status()
    if opened then db:close() end
    if not st then return nil, e end
    return _M.outbox_metrics(st) .. _M.relay_metrics(self:stats())
end

--- Closes the relay: its database session ends (and with it its shard lock).
function Relay:close() self.handle:close() end

return _M


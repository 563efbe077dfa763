--- NATS connections: connect with the NATS settings, publish, streams.
--
--   local nats = require "qx.messaging.nats"
--   local conn = assert(nats.connect{ servers = "nats://127.0.0.1:4222" })
--   assert(conn:ensure_stream())            -- QX_EVENTS on "qx.events.>" (development, tests)
--   local ack = assert(conn:publish("qx.events.x", body, { ["qx.event_id"] = id }, id))
local core = require "qx.core"
local nats_settings = require "qx.messaging.nats.settings"
local options = require "qx.options"

local type = type
local error = error
local setmetatable = setmetatable
local getmetatable = getmetatable
local gmatch = string.gmatch
local gsub = string.gsub
local find = string.find
local concat = table.concat


local _M = {
    _VERSION = "0.1.0",
    ENV = nats_settings.ENV,
    DEFAULTS = nats_settings.DEFAULTS,
    OPTIONS = nats_settings.OPTIONS,
    settings = nats_settings.settings,
}


-- the options core.nats takes, from normalised settings
local function core_options(s)
    return {
        servers = s.servers, name = s.client_name,
        user = s.user, password = s.password, token = s.token, creds_file = s.creds_file,
        tls = s.tls, tls_ca = s.tls_ca, tls_cert = s.tls_cert, tls_key = s.tls_key,
        connect_timeout_ms = s.connect_timeout_ms,
        reconnect_attempts = s.reconnect_attempts,
        reconnect_wait_ms = s.reconnect_wait_ms,
        ping_interval_ms = s.ping_interval_ms,
        max_pings_out = s.max_pings_outstanding,
        send_asap = s.send_asap,
    }
end


--- A NATS connection (qx.nats.connect).
---@class qx.NatsConn
---@field handle userdata the core connection (for bindings that take a NATS connection)
---@field settings table the normalised settings (servers, stream, subject_prefix, ...)
local Conn = {}
Conn.__index = Conn
_M.Conn = Conn

--- Connects at once: an unreachable server is a "connection" error within the connect timeout.
-- Options left out come from QX_NATS__* (docs/settings.md): servers, client_name,
-- connect_timeout_seconds, reconnect_attempts, reconnect_wait_seconds, ping_interval_seconds,
-- max_pings_outstanding, user, password, token,
-- creds_file, tls, tls_ca, tls_cert, tls_key, send_asap, stream, subject_prefix,
-- publish_timeout_seconds.
---@param opts table|nil
---@return qx.NatsConn|nil conn
---@return qx.Error? err connection, invalid
function _M.connect(opts)
    local s, e = _M.settings(opts)
    if not s then return nil, e end
    local handle
    handle, e = core.nats(core_options(s))
    if not handle then
        -- "No server available" alone does not say where qx looked
        if type(e) == "table" and e.code == "connection" and type(e.message) == "string" then
            e.message = e.message .. " (tried " .. _M.shown_servers(s.servers) .. ")"
        end
        return nil, e
    end
    return setmetatable({ handle = handle, settings = s }, Conn)
end

--- The servers (a comma-separated list) as they may be shown: user and password left out.
---@param servers string
---@return string
function _M.shown_servers(servers)
    local out = {}
    for url in gmatch(servers, "[^,%s]+") do
        local shown, n = gsub(url, "^([%a][%w+.-]*://)[^/@]*@", "%1")
        if n == 0 and not find(url, "://", 1, true) then shown = gsub(url, "^[^/@]*@", "") end
        out[#out + 1] = shown
    end
    return concat(out, ", ")
end

--- Accepts a Conn, a core NATS userdata or options; returns a Conn and whether it was opened
-- here (the caller closes what it opened).
---@param x any
---@return qx.NatsConn|nil conn
---@return boolean|qx.Error owned, or the error
function _M.resolve(x)
    if getmetatable(x) == Conn then return x, false end
    if core.is_nats(x) then
        local s, e = _M.settings({})
        if not s then return nil, e end
        return setmetatable({ handle = x, settings = s }, Conn), false
    end
    if x ~= nil and type(x) ~= "table" then
        error("expected a NATS connection (qx.nats.connect) or NATS options", 3)
    end
    local c, e = _M.connect(x)
    if not c then return nil, e end
    return c, true
end

--- The subject of an event name: prefix .. "." .. name.
---@param event_name string
---@return string
function Conn:subject(event_name)
    return self.settings.subject_prefix .. "." .. event_name
end

--- Creates or updates a stream. For development and tests; deployments declare their streams.
-- opts: name = the settings' stream, subjects = { prefix .. ".>" }, duplicate_window_ms
-- (server default: 2 minutes), replicas (1; up to 5 on a JetStream cluster), max_msg_size
-- (bytes; default: the server's max payload).
---@param opts table|nil
---@return true|nil ok
---@return qx.Error? err nats
function Conn:ensure_stream(opts)
    if opts ~= nil and type(opts) ~= "table" then error("ensure_stream: expected a table", 2) end
    opts = options.check(opts, { "name", "subjects", "duplicate_window_ms", "replicas",
                                 "max_msg_size" }, "ensure_stream")
    local subjects = opts.subjects or { self.settings.subject_prefix .. ".>" }
    if type(subjects) == "string" then subjects = { subjects } end
    return self.handle:ensure_stream{
        name = opts.name or self.settings.stream,
        subjects = subjects,
        duplicate_window_ms = opts.duplicate_window_ms,
        replicas = opts.replicas,
        max_msg_size = opts.max_msg_size,
    }
end

--- Publishes to JetStream and waits for the ack; msg_id is the Nats-Msg-Id (deduplication).
---@param subject string
---@param data string the body
---@param headers table|nil { name = value }
---@param msg_id string|nil
---@return table|nil ack { stream, sequence, duplicate }
---@return qx.Error? err nats, timeout
function Conn:publish(subject, data, headers, msg_id)
    if type(subject) ~= "string" then error("publish: subject must be a string", 2) end
    if type(data) ~= "string" then error("publish: data must be a string", 2) end
    return self.handle:publish(subject, data, headers, msg_id, self.settings.publish_timeout_ms)
end

--- A stream's figures.
---@param name string|nil the stream (default: the settings' stream)
---@return table|nil info { messages, bytes, first_seq, last_seq, consumers, subjects }
---@return qx.Error? err
function Conn:stream_info(name)
    return self.handle:stream_info(name or self.settings.stream)
end

--- One stored message.
---@param seq integer the stream sequence
---@param name string|nil the stream (default: the settings' stream)
---@return table|nil msg { sequence, subject, data, headers }
---@return qx.Error? err not_found
function Conn:stream_get(seq, name)
    return self.handle:stream_get(name or self.settings.stream, seq)
end

--- Deletes a stream (tests, tools).
---@param name string|nil the stream (default: the settings' stream)
---@return true|nil ok
---@return qx.Error? err
function Conn:delete_stream(name)
    return self.handle:delete_stream(name or self.settings.stream)
end

--- The connection's state.
---@return string state connected, connecting, reconnecting, disconnected or closed
function Conn:state() return self.handle:state() end
--- The connection's state, reconnect count and server url.
---@return table stats { state, reconnects, url, ... }
function Conn:stats() return self.handle:stats() end

--- Closes the connection (a relay or consumer still using it keeps it open until it is done).
function Conn:close() self.handle:close() end

return _M

--- qx.publisher{...}: publishes one integration event straight to JetStream and waits for its
-- ack, without the outbox. For events that need no transaction (or tools and tests); events a
-- unit of work records go through the outbox and the relay.
--
--   local pub = assert(qx.publisher{ nats = conn })        -- or nats = { servers = ... }
--   local ack, err = pub:publish(UserRegistered{ ... })     -- or a decoded envelope table
--   -- ack = { stream = "QX_EVENTS", sequence = 42, duplicate = false }
--
-- The message is what the relay sends for the same event: subject `<prefix>.<event_name>`, the
-- envelope as JSON body, headers qx.event_name, qx.event_version, qx.event_id,
-- qx.correlation_id and qx.tenant_id (when set), and Nats-Msg-Id = event_id, so publishing the
-- same event twice within the stream's duplicate window stores it once (ack.duplicate = true).
local core = require "qx.core"
local options = require "qx.options"
local qx_error = require "qx.error"
local nats = require "qx.messaging.nats"
local event = require "qx.model.event"
local personal = require "qx.store.personal"

local type = type
local error = error
local tostring = tostring
local setmetatable = setmetatable

local _M = { _VERSION = "0.1.0" }

local null = core.null

--- Publishes events straight to JetStream (qx.publisher).
---@class qx.Publisher
local Publisher = {}
Publisher.__index = Publisher
_M.Publisher = Publisher

local PUBLISHER_OPTIONS = { "nats", "subject_prefix" }

--- A publisher (qx.publisher). nats: a connection, a core handle or NATS options (default:
-- from QX_NATS__*); subject_prefix: default the connection's.
---@param opts table|nil { nats, subject_prefix }
---@return qx.Publisher|nil publisher
---@return qx.Error? err connection
function _M.new(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.publisher: options must be a table", 2)
    end
    opts = options.check(opts, PUBLISHER_OPTIONS, "qx.publisher")
    local conn, owned = nats.resolve(opts.nats)
    if not conn then return nil, owned end
    local prefix = opts.subject_prefix or conn.settings.subject_prefix
    if type(prefix) ~= "string" or not core.nats_subject_valid(prefix) then
        if owned then conn:close() end
        error("qx.publisher: subject_prefix must be a valid subject", 2)
    end
    return setmetatable({ conn = conn, owned = owned, prefix = prefix }, Publisher)
end

local function text_or_nil(v)
    if v == nil or v == null then return nil end
    return tostring(v)
end

--- The qx.* headers of a message for an envelope.
---@param env table
---@return table headers
function _M.headers(env)
    return {
        ["qx.event_name"] = env.event_name,
        ["qx.event_version"] = tostring(env.event_version),
        ["qx.event_id"] = env.event_id,
        ["qx.correlation_id"] = text_or_nil(env.correlation_id),
        ["qx.tenant_id"] = text_or_nil(env.tenant_id),
    }
end

--- Publishes one event (or a decoded envelope) and waits for its ack.
---@param ev table an event or an envelope
---@return table|nil ack { stream, sequence, duplicate }
---@return qx.Error? err nats, timeout, invalid (also: personal values, which need the outbox)
function Publisher:publish(ev)
    local env
    if event.is_event(ev) then
        if event.class_of(ev).personal then
            -- sealing needs the key table: only the outbox seals (docs/erasure.md)
            local subject, pe = personal.subject_of(ev)
            if subject == nil then return nil, pe end
            if subject then
                return nil, qx_error.new("invalid", ev.event_name .. ": an event with personal "
                    .. "values is published through the outbox (uow:record), which seals them")
            end
        end
        env = ev:envelope()
    elseif type(ev) == "table" then
        env = ev
    else
        error("publisher:publish: expected an event or an envelope table", 2)
    end
    if not core.is_uuid(env.event_id) then
        return nil, qx_error.new("invalid", "envelope: event_id must be a uuid")
    end
    if type(env.event_name) ~= "string" or env.event_name == "" then
        return nil, qx_error.new("invalid", "envelope: event_name must be a non-empty string")
    end
    if type(env.event_version) ~= "number" then
        return nil, qx_error.new("invalid", "envelope: event_version must be a number")
    end
    local subject = self.prefix .. "." .. env.event_name
    if not core.nats_subject_valid(subject) then
        return nil, qx_error.new("invalid", "event name gives an invalid subject: " .. subject)
    end
    local body, e = core.json_encode(env)
    if not body then
        return nil, qx_error.new("invalid", "envelope cannot be encoded: " .. e.message)
    end
    return self.conn:publish(subject, body, _M.headers(env), env.event_id)
end

--- Closes the connection when the publisher opened it.
function Publisher:close()
    if self.owned then self.conn:close() end
end

return _M

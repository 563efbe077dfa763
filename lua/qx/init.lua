--- qx: the persistence half of CQRS/DDD for Lua on PostgreSQL and NATS JetStream.
--
--   local qx = require "qx"
--   local db = assert(qx.connect{ url = ... })
--   assert(qx.migrate(db))
--   local id, err = db:unit_of_work(function(uow) ... end, { context = { ... } })
local core = require "qx.core"
local err = require "qx.error"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local dispatcher = require "qx.model.dispatcher"
local db = require "qx.store.db"

local _M = { _VERSION = require "qx.version" }

_M.null = core.null       -- SQL NULL inside tables; the same value as cjson.null
_M.uuid = core.uuid       -- UUID v7, time-ordered
_M.is_uuid = core.is_uuid
_M.now = core.now         -- ISO-8601 UTC with microseconds

_M.connect = db.connect
_M.error = err

--- Creates or upgrades qx's own tables (outbox, event store, inbox, checkpoints), then, with
-- `dir`, applies the application's migrations of that folder (docs/migrations.md). Idempotent;
-- concurrent callers take turns on an advisory lock.
---@param database qx.Db
---@param opts table|nil { dir = the folder of the application's migrations }
---@return table|nil result { applied = { versions... }, current = n, app = { applied, current }? }
---@return qx.Error? err
function _M.migrate(database, opts)
    return require("qx.store.migrate").run(database, opts)
end

-- The application's migrations alone: apply(db, dir), status(db, dir) (docs/migrations.md)
_M.migrations = require "qx.store.app_migrations"

--- Defines a domain event class (dispatched in-process, not written to the outbox).
---@param name string the event name, e.g. "user.registered"
---@param opts table|nil { version = 1, aliases = { old names } }: docs/model.md, docs/evolution.md
---@return table class call Class{ fields } or Class.new{ fields } for an event
function _M.event(name, opts)
    if type(opts) == "table" and opts.integration ~= nil then
        error("qx.event: 'integration' is not an option here: qx.event defines a domain event; "
              .. "qx.integration_event defines one that is written to the outbox", 2)
    end
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.integration = false
    return event.define(name, o)
end

--- Defines an integration event class: dispatched, and written to the outbox at commit for the
-- relay to publish.
---@param name string the event name, also the subject suffix
---@param opts table|nil { version = 1, aliases = { old names } }: docs/model.md, docs/evolution.md
---@return table class
function _M.integration_event(name, opts)
    if type(opts) == "table" and opts.integration ~= nil then
        error("qx.integration_event: 'integration' is not an option here: it always defines an "
              .. "integration event (qx.event defines a domain event)", 2)
    end
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.integration = true
    return event.define(name, o)
end

_M.aggregate = aggregate.define
_M.dispatcher = dispatcher.new

--- The outbox table as a repository: pending rows, dead letters, retries, purge, status.
---@param database qx.Db
---@return qx.Outbox
function _M.outbox(database)
    return require("qx.store.outbox").new(database)
end

-- qx.event_sourced(name[, { strict =, snapshot_version = }]): an aggregate whose state is the
-- fold of its events; qx.event_store{ db =, snapshot_every = }: uow:store(store) appends and
-- loads them, store:read_all reads them in a gap-safe global order; qx.projection{ name =,
-- db =, handlers = }: read models from the events, exactly once
_M.event_sourced = require("qx.model.event_sourced").define
_M.event_store = require("qx.store.event_store").new
_M.projection = require("qx.store.projection").new
-- qx.forget(db, subject_id): personal fields (qx.event(name, { personal =, subject = })) of
-- that subject read qx.forgotten from then on (docs/erasure.md)
_M.forget = require("qx.store.forget").forget
_M.forgotten = require("qx.store.personal").forgotten

-- qx.repository{ table =, entity =, filterable =, sortable =, tenanted =, soft_delete =, ... }:
-- a table described once; uow:repo(description) binds it, description:reader(db, ctx) reads
_M.repository = require("qx.store.repository").new
_M.spec = require "qx.store.repository.spec"      -- specifications: where, and_, or_, not_
_M.schema = require "qx.store.repository.schema"   -- DDL fragments: id_column(), audit_columns()

--- A registry: event name + version -> class, for consumers.
---@param classes table|nil a list of event classes
---@return qx.Registry
function _M.registry(classes)
    return require("qx.model.registry").new(classes)
end

--- A JetStream pull consumer (qx.messaging.consumer.new).
---@param opts table { nats, stream, durable, registry, db, ... }: docs/consumer.md
---@return qx.Consumer|nil consumer
---@return qx.Error? err
function _M.consumer(opts)
    return require("qx.messaging.consumer").new(opts)
end

-- qx.tracing: W3C Trace Context (traceparent, tracestate) and the span and warning hooks
_M.tracing = require "qx.tracing"

-- qx.nats: NATS settings (QX_NATS__*) and connections: qx.nats.connect{ servers = ... }
_M.nats = require "qx.messaging.nats"

--- Publishes one event straight to JetStream, without the outbox (qx.messaging.publisher.new).
---@param opts table|nil { nats = conn or NATS options }
---@return qx.Publisher|nil publisher
---@return qx.Error? err
function _M.publisher(opts)
    return require("qx.messaging.publisher").new(opts)
end

--- The outbox relay (qx.messaging.relay.new).
---@param opts table { db, nats, shard_id, shard_count, ... }: docs/relay.md
---@return qx.Relay|nil relay
---@return qx.Error? err
function _M.relay(opts)
    return require("qx.messaging.relay").new(opts)
end

return _M

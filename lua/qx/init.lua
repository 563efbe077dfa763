-- qx: the persistence half of CQRS/DDD for Lua on PostgreSQL and NATS JetStream.
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

--- Creates or upgrades qx's own tables, then, with `dir`, applies the application's migrations
-- of that folder (docs/migrations.md). Idempotent; concurrent callers take turns.
-- @tparam qx.Db db the pool (`qx.connect`)
-- @tparam[opt] table opts `dir`: the folder of the application's migrations
-- @treturn table `{ applied = { qx versions... }, current = n, app = { applied = { { version,
--   name, file }... }, current = n } }` (`app` only with `dir`)
-- @return nil, err
function _M.migrate(database, opts)
    return require("qx.store.migrate").run(database, opts)
end

-- The application's migrations alone: apply(db, dir), status(db, dir) (docs/migrations.md)
_M.migrations = require "qx.store.app_migrations"

function _M.event(name, opts)
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.integration = false
    return event.define(name, o)
end

function _M.integration_event(name, opts)
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.integration = true
    return event.define(name, o)
end

_M.aggregate = aggregate.define
_M.dispatcher = dispatcher.new

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

-- qx.repository{ table =, entity =, filterable =, sortable =, tenanted =, soft_delete =, ... }:
-- a table described once; uow:repo(description) binds it, description:reader(db, ctx) reads
_M.repository = require("qx.store.repository").new
_M.spec = require "qx.store.repository.spec"      -- specifications: where, and_, or_, not_
_M.schema = require "qx.store.repository.schema"   -- DDL fragments: id_column(), audit_columns()

-- qx.registry{ classes... }: event name + version -> class, for consumers
function _M.registry(classes)
    return require("qx.model.registry").new(classes)
end

-- qx.consumer{ nats =, stream =, durable =, registry =, db =, ... }: a JetStream pull consumer
function _M.consumer(opts)
    return require("qx.messaging.consumer").new(opts)
end

-- qx.nats: NATS settings (QX_NATS__*) and connections: qx.nats.connect{ servers = ... }
_M.nats = require "qx.messaging.nats"

-- qx.publisher{ nats = conn }: publishes one event straight to JetStream (no outbox)
function _M.publisher(opts)
    return require("qx.messaging.publisher").new(opts)
end

-- qx.relay{ db = db, nats = conn, shard_id =, shard_count =, ... }: the outbox relay
function _M.relay(opts)
    return require("qx.messaging.relay").new(opts)
end

return _M

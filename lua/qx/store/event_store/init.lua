--- qx.event_store{...}: event-sourced aggregates in qx_aggregate_events, snapshots in
-- qx_aggregate_snapshots, and gap-safe global reads.
--
--   local store = qx.event_store{ db = db, snapshot_every = 50 }
--   db:unit_of_work(function(uow)
--     local es = uow:store(store)
--     local acc = es:load(Account, id) or Account.new(id)
--     acc:deposit(10)
--     assert(es:append(acc))
--   end)
--   local events, checkpoint = store:read_all{ after = checkpoint, limit = 500 }
--
-- See docs/event-store.md for append, the gap-safety argument and the shape of records.
local checkpoint = require "qx.store.event_store.checkpoint"
local sql = require "qx.store.event_store.sql"
local reads = require "qx.store.event_store.reads"
local bound = require "qx.store.event_store.bound"
require "qx.store.event_store.evolution" -- store:check, store:rebuild_snapshots
local options = require "qx.options"
local registry_mod = require "qx.model.registry"
local es_class = require "qx.model.event_sourced"

local type = type
local ipairs = ipairs
local error = error
local setmetatable = setmetatable
local getmetatable = getmetatable
local floor = math.floor

local Store = reads.Store

local _M = {
    _VERSION = "0.1.0",
    CHANNEL = bound.CHANNEL,
    Store = Store,
    Bound = bound.Bound,
    bind = bound.bind,
    dec_cmp = checkpoint.dec_cmp,
    dec = checkpoint.dec,
    encode_checkpoint = checkpoint.encode_checkpoint,
    decode_checkpoint = checkpoint.decode_checkpoint,
    later = checkpoint.later,
    checkpoint_after = checkpoint.checkpoint_after,
    APPEND_SQL = sql.APPEND_SQL,
    RECORD_COLUMNS = sql.RECORD_COLUMNS,
    candidates = sql.candidates,
    MAX_KEYS = sql.MAX_KEYS,
    read_mode = sql.read_mode,
    to_record = reads.to_record,
    read_all = reads.read_all,
}

local MAX_VERSION = 2147483647

local STORE_OPTS = { "db", "snapshot_every", "notify", "registry" }

--- The event store (qx.event_store). db is needed for reads outside a unit of work (read_all,
-- read_stream, stall). notify = false leaves out the wake-up of qx_events listeners;
-- projections then find events by polling. registry: the classes reads, read_all and check()
-- read stored events as (renamed from aliases, upcast); their upcaster chains, and those of the
-- event classes every event-sourced class handles, are checked here (docs/evolution.md).
---@param opts table|nil { db, snapshot_every = n, notify = true, registry = qx.registry{...} }
---@return qx.EventStore
function _M.new(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.event_store: options must be a table", 2)
    end
    opts = options.check(opts, STORE_OPTS, "qx.event_store")
    local n = opts.snapshot_every
    if n ~= nil and (type(n) ~= "number" or n ~= floor(n) or n < 0 or n > MAX_VERSION) then
        error("qx.event_store: snapshot_every must be a non-negative integer (0 = never)", 2)
    end
    if opts.db ~= nil and (type(opts.db) ~= "table" or not opts.db.pool) then
        error("qx.event_store: db must come from qx.connect", 2)
    end
    if opts.notify ~= nil and type(opts.notify) ~= "boolean" then
        error("qx.event_store: notify must be a boolean", 2)
    end
    local reg = opts.registry
    if reg ~= nil and getmetatable(reg) ~= registry_mod.Registry then
        error("qx.event_store: registry must be a qx.registry{...}", 2)
    end
    if reg then
        local ok, why = reg:check_chains()
        if not ok then error("qx.event_store: " .. why, 2) end
    end
    for _, class in ipairs(es_class.event_classes()) do
        registry_mod.check_chain(class, "qx.event_store")
    end
    return setmetatable({
        registry = reg,
        db = opts.db,
        snapshot_every = n or 0,
        notify = opts.notify ~= false,
    }, Store)
end

--- Forgets a data subject (qx.forget on the store's db): its personal fields read
-- qx.forgotten from then on, and the snapshots of its streams are dropped.
---@param subject_id string the subject's uuid
---@param opts table|nil as qx.forget
---@return true|nil ok
---@return qx.Error? err invalid, or as qx.forget
function Store:forget(subject_id, opts)
    if getmetatable(self) ~= Store then
        error("store:forget: call as store:forget(subject_id)", 2)
    end
    if not self.db then
        error("store:forget: this store has no db (qx.event_store{ db = db })", 2)
    end
    return require("qx.store.forget").forget(self.db, subject_id, opts)
end

--- Whether x is an event store made by qx.event_store.
---@param x any
---@return boolean
function _M.is_store(x)
    return getmetatable(x) == Store
end

return _M

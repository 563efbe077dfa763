--- Internal to qx.consumer: the inbox and dead-letter administration of a consumer with a db
-- (purge_inbox, dead_letters, replay_dead, republish_dead). The functions of the module take a
-- db and the consumer's name, so that `qx consumer` can run them without a NATS subscription.
local core = require "qx.core"
local err = require "qx.error"
local base = require "qx.messaging.consumer.base"
local options = require "qx.options"
local tracing = require "qx.tracing"

local type = type
local ipairs = ipairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local concat = table.concat
local is_uuid = core.is_uuid
local is_int, check_handler = base.is_int, base.check_handler
local DEAD_COLUMNS, DUPLICATE = base.DEAD_COLUMNS, base.DUPLICATE
local Consumer = base.Consumer
local pairs = pairs

local _M = {}

local function need_db(self, method)
    if not self.db then error("consumer:" .. method .. ": the consumer has no db", 3) end
end

--- Deletes old inbox rows. An inbox row only has to outlive the redeliveries of its message
-- (max_deliver x (ack wait + backoff)); keep a margin.
---@param opts table { older_than_seconds = n }
---@return integer|nil rows deleted
---@return qx.Error? err
function Consumer:purge_inbox(opts)
    need_db(self, "purge_inbox")
    return _M.purge_inbox(self.db, self.name, opts)
end

--- purge_inbox for the consumer named name (its inbox name: the durable unless given).
---@param db qx.Db
---@param name string
---@param opts table { older_than_seconds = n }
---@return integer|nil rows deleted
---@return qx.Error? err
function _M.purge_inbox(db, name, opts)
    if type(opts) == "table" then
        options.check(opts, { "older_than_seconds" }, "consumer:purge_inbox")
    end
    local s = type(opts) == "table" and opts.older_than_seconds
    if type(s) ~= "number" or s < 0 or s ~= s or s == math.huge then
        options.raise("consumer:purge_inbox: give { older_than_seconds = n >= 0 }")
    end
    return db:exec([[
DELETE FROM qx_inbox
WHERE consumer = $1 AND handled_at < now() - make_interval(secs => $2::float8)]],
        name, s)
end

--- This consumer's dead letters, oldest first.
---@param opts table|nil { limit = 100, offset = 0, include_replayed = false }
---@return table|nil rows
---@return qx.Error? err
function Consumer:dead_letters(opts)
    need_db(self, "dead_letters")
    return _M.dead_letters(self.db, self.name, opts)
end

--- dead_letters for the consumer named name.
---@param db qx.Db
---@param name string
---@param opts table|nil { limit = 100, offset = 0, include_replayed = false }
---@return table|nil rows
---@return qx.Error? err
function _M.dead_letters(db, name, opts)
    opts = options.check(opts, { "limit", "offset", "include_replayed" }, "consumer:dead_letters")
    local limit, offset = opts.limit or 100, opts.offset or 0
    if not is_int(limit, 0, 10000) or not is_int(offset, 0) then
        options.raise("consumer:dead_letters: limit must be 0..10000 and offset >= 0")
    end
    return db:query("SELECT " .. DEAD_COLUMNS .. " FROM qx_dead_letters WHERE consumer = $1"
        .. (opts.include_replayed and "" or " AND replayed_at IS NULL")
        .. " ORDER BY dead_at, id LIMIT $2 OFFSET $3", name, limit, offset)
end

-- the dead letters not replayed yet of the consumer: all, or the ids given -> rows | nil, err
local function pending_dead(db, name, ids, what)
    if ids == nil then
        return db:query("SELECT " .. DEAD_COLUMNS .. [[ FROM qx_dead_letters
WHERE consumer = $1 AND replayed_at IS NULL ORDER BY dead_at, id]], name)
    end
    if type(ids) == "string" then ids = { ids } end
    if type(ids) ~= "table" then options.raise(what .. ": ids must be a list") end
    for i, id in ipairs(ids) do
        if not is_uuid(id) then
            return nil, err.new("invalid", "id " .. i .. " is not a uuid: " .. tostring(id))
        end
    end
    return db:query("SELECT " .. DEAD_COLUMNS .. [[ FROM qx_dead_letters
WHERE consumer = $1 AND replayed_at IS NULL AND id = ANY($2::uuid[]) ORDER BY dead_at, id]],
        name, "{" .. concat(ids, ",") .. "}")
end

--- Publishes dead letters of the consumer named name (all, or the ids given) to their subject
-- again, with their body and headers, for the consumer to fetch and handle anew; each is marked
-- replayed once JetStream acked it. The message id is the event's (or the dead letter's) id
-- and the dead letter's, so a republish that is repeated within the stream's duplicate window
-- is dropped; other consumers of the subject skip the event by their inbox.
---@param db qx.Db
---@param conn table a connection from qx.nats.connect
---@param name string
---@param ids table|nil dead letter ids (default: all not replayed yet)
---@return table|nil counts { republished, failed, errors = { [id] = err } }
---@return qx.Error? err
function _M.republish_dead(db, conn, name, ids)
    local rows, e = pending_dead(db, name, ids, "consumer:republish_dead")
    if not rows then return nil, e end
    local counts = { republished = 0, failed = 0, errors = {} }
    for _, row in ipairs(rows) do
        local headers = {}
        if type(row.headers) == "table" then
            for k, v in pairs(row.headers) do
                if k ~= "Nats-Msg-Id" and type(v) == "string" then headers[k] = v end
            end
        end
        local event_id = type(row.event_id) == "string" and row.event_id or row.id
        local ok, pe = conn:publish(row.subject, row.data, headers,
                                    event_id .. ":replay:" .. row.id)
        if ok then
            ok, pe = db:exec("UPDATE qx_dead_letters SET replayed_at = now() "
                             .. "WHERE id = $1 AND replayed_at IS NULL", row.id)
        end
        if ok then
            counts.republished = counts.republished + 1
        else
            counts.failed = counts.failed + 1
            counts.errors[row.id] = pe
        end
    end
    return counts
end

--- Runs dead letters of this consumer (all, or the ids given) through the handler again, each in
-- its own unit of work that also marks the row replayed, so a replay that commits is never
-- repeated. A dead letter whose body is still not an event stays dead and counts as failed.
---@param handler fun(ev: table, uow: qx.Uow?, msg: qx.MsgInfo): any
---@param ids table|nil dead letter ids (default: all)
---@return table|nil counts { handled, failed, duplicates }
---@return qx.Error? err
function Consumer:replay_dead(handler, ids)
    need_db(self, "replay_dead")
    check_handler(handler)
    local rows, e = pending_dead(self.db, self.name, ids, "consumer:replay_dead")
    if not rows then return nil, e end
    local counts = { handled = 0, failed = 0, duplicates = 0 }
    local function replay_info() return true end
    for _, row in ipairs(rows) do
        local ev, de = self:_decode(row.data)
        local env = ev and de or nil
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
            local h = row.headers
            if type(h) == "table" and h.traceparent ~= nil then
                info.traceparent, info.tracestate = tracing._context(h.traceparent, h.tracestate,
                    "consumer " .. self.name)
            end
            local id = row.id
            local ok, r = self:_handle(handler, ev, info, function(uow)
                local n, me = uow:exec(
                    "UPDATE qx_dead_letters SET replayed_at = now() "
                    .. "WHERE id = $1 AND replayed_at IS NULL",
                    id)
                if not n then error(me, 0) end
                if n == 0 then return DUPLICATE end -- replayed meanwhile elsewhere
            end, env)
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

return _M

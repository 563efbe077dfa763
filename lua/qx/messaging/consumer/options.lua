-- Internal to qx.consumer: the consumer's options, checked and given their defaults.
local registry_mod = require "qx.model.registry"
local options = require "qx.options"
local base = require "qx.messaging.consumer.base"

local type = type
local ipairs = ipairs
local pairs = pairs
local error = error
local getmetatable = getmetatable
local floor = math.floor
local fmt = string.format
local is_int, is_callable = base.is_int, base.is_callable

local _M = {}

_M.DEFAULTS = {
    batch = 10,
    max_deliver = 5,
    ack_wait_ms = 30000,
    max_ack_pending = 1000,
    backoff = { 1000, 5000, 15000, 30000, 60000 },
    fetch_timeout_ms = 1000,
}

local OPTIONS = {
    nats = true, servers = true, stream = true, durable = true, filter_subject = true,
    name = true, registry = true, db = true, inbox = true, dead_letters = true, batch = true,
    max_deliver = true, ack_wait = true, ack_wait_ms = true, max_ack_pending = true,
    backoff = true, fetch_timeout_ms = true, latest_version = true, dispatcher = true,
    on_dead_letter = true, ack_sync = true, bind = true, unit_of_work = true, deliver = true,
    commit = true,
}

-- deliver = "all" | "new" | { from_time = ISO-8601 } | { from_sequence = n }: where a new durable
-- starts -> the core's deliver, start_sequence, start_time
local function check_deliver(v)
    if v == nil or v == "all" then return "all" end
    if v == "new" then return "new" end
    if type(v) == "table" then
        local seq, time = v.from_sequence, v.from_time
        local n = 0
        for _ in pairs(v) do n = n + 1 end
        if n == 1 and seq ~= nil and is_int(seq, 1, 9007199254740992) then
            return "from_sequence", seq
        end
        if n == 1 and type(time) == "string" then
            return "from_time", nil, time
        end
    end
    error("qx.consumer: deliver must be \"all\", \"new\", { from_time = ISO-8601 } or"
          .. " { from_sequence = n >= 1 }", 4)
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

function _M.check(opts)
    if type(opts) ~= "table" then error("qx.consumer: expected an options table", 3) end
    options.check(opts, OPTIONS, "qx.consumer")
    local o = {}
    o.stream = opt_string(opts, "stream")
    o.durable = opt_string(opts, "durable", true)
    o.filter_subject = opt_string(opts, "filter_subject")
    o.name = opt_string(opts, "name") or o.durable
    if getmetatable(opts.registry) ~= registry_mod.Registry then
        error("qx.consumer: registry must be a qx.registry{...}", 3)
    end
    o.registry = opts.registry
    if opts.db ~= nil and (type(opts.db) ~= "table"
                           or type(opts.db.unit_of_work) ~= "function") then
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
    o.deliver, o.start_sequence, o.start_time = check_deliver(opts.deliver)
    if opts.on_dead_letter ~= nil and not is_callable(opts.on_dead_letter) then
        error("qx.consumer: on_dead_letter must be a function", 3)
    end
    o.on_dead_letter = opts.on_dead_letter
    if opts.unit_of_work ~= nil and type(opts.unit_of_work) ~= "table" then
        error("qx.consumer: unit_of_work must be a table of unit-of-work options", 3)
    end
    o.uow_opts = opts.unit_of_work
    -- commit = "message" (a unit of work per message) or "batch" (one per fetched batch, a
    -- savepoint per message): docs/consumer.md, "Committing a batch at once"
    local commit = opts.commit
    if commit ~= nil and commit ~= "message" and commit ~= "batch" then
        error("qx.consumer: commit must be \"message\" or \"batch\"", 3)
    end
    if commit == "batch" and not o.db then
        error("qx.consumer: commit = \"batch\" needs a db (it commits the batch's unit of work)", 3)
    end
    o.commit_batch = commit == "batch"
    o.dispatcher = opts.dispatcher
    return o
end

return _M

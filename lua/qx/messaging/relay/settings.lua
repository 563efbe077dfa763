-- Internal to qx.relay: the relay's settings, explicit options over QX_RELAY__* variables over
-- defaults, read with qx.settings' readers (docs/settings.md lists them). The result is the
-- option table core.relay takes, without conninfo and nats.
local core = require "qx.core"
local settings = require "qx.settings"

local type = type
local ipairs = ipairs
local floor = math.floor
local find = string.find
local os_getenv = os.getenv

local _M = {}

_M.ENV = {
    shard_id = "QX_RELAY__SHARD_ID",
    shard_count = "QX_RELAY__SHARD_COUNT",
    batch_size = "QX_RELAY__BATCH_SIZE",
    max_in_flight = "QX_RELAY__MAX_IN_FLIGHT",
    max_attempts = "QX_RELAY__MAX_ATTEMPTS",
    poll_interval_seconds = "QX_RELAY__POLL_INTERVAL_SECONDS",
    idle_interval_seconds = "QX_RELAY__IDLE_INTERVAL_SECONDS",
    lock_retry_seconds = "QX_RELAY__LOCK_RETRY_SECONDS",
    delete_published = "QX_RELAY__DELETE_PUBLISHED",
}

_M.DEFAULTS = {
    shard_id = 0, shard_count = 1, batch_size = 1000, max_in_flight = 1000, max_attempts = 10,
    poll_interval_seconds = 0.5, idle_interval_seconds = 2, lock_retry_seconds = 1,
    base_delay_ms = 500, max_delay_ms = 60000, channel = "qx_outbox", delete_published = false,
}


local OPTIONS = {
    db = true, url = true, nats = true, shard_id = true, shard_count = true, batch_size = true,
    max_in_flight = true, max_attempts = true, poll_interval_seconds = true,
    poll_interval_ms = true, idle_interval_seconds = true, idle_interval_ms = true,
    lock_retry_seconds = true, lock_retry_ms = true, ack_timeout_ms = true,
    base_delay_ms = true, max_delay_ms = true, subject_prefix = true, channel = true,
    connect_timeout_ms = true, statement_timeout_ms = true, delete_published = true,
}

local bad, pick, ranged, boolean = settings.bad, settings.pick, settings.ranged, settings.boolean

-- an integer in lo..hi from an option or its variable, else the default
local function int_setting(opts, getenv, name, lo, hi)
    local src = pick(opts, getenv, name, _M.ENV[name])
    if src == nil then return _M.DEFAULTS[name] end
    return ranged(src, "int", lo, hi, 1)
end

local function bool_setting(opts, getenv, name)
    local src = pick(opts, getenv, name, _M.ENV[name])
    if src == nil then return _M.DEFAULTS[name] end
    return boolean(src)
end

-- a duration in ms from name_ms (option) or name_seconds (option or variable)
local function ms_setting(opts, getenv, name)
    local seconds = name .. "_seconds"
    return settings.duration_ms(opts, getenv, name .. "_ms", seconds, _M.ENV[seconds],
                                _M.DEFAULTS[seconds], 0, 86400)
end

-- settings(opts, getenv?) -> the options core.relay takes (without conninfo and nats) | nil, err
function _M.settings(opts, getenv)
    getenv = getenv or os_getenv
    local out = {}
    local e
    out.shard_count, e = int_setting(opts, getenv, "shard_count", 1, 100000)
    if not out.shard_count then return nil, e end
    out.shard_id, e = int_setting(opts, getenv, "shard_id", 0, out.shard_count - 1)
    if not out.shard_id then
        if e.setting and find(e.message, "must be from", 1, true) then
            e.message = e.message .. " (shard_id must be below shard_count "
                        .. out.shard_count .. ")"
        end
        return nil, e
    end
    out.batch_size, e = int_setting(opts, getenv, "batch_size", 1, 100000)
    if not out.batch_size then return nil, e end
    out.max_in_flight, e = int_setting(opts, getenv, "max_in_flight", 1, 100000)
    if not out.max_in_flight then return nil, e end
    out.max_attempts, e = int_setting(opts, getenv, "max_attempts", 0, 1000000)
    if not out.max_attempts then return nil, e end
    for _, name in ipairs({ "poll_interval", "idle_interval", "lock_retry" }) do
        out[name .. "_ms"], e = ms_setting(opts, getenv, name)
        if not out[name .. "_ms"] then return nil, e end
    end
    if out.lock_retry_ms < 1 then return nil, bad("lock_retry", "must be at least 1 ms") end
    for _, name in ipairs({ "ack_timeout_ms", "base_delay_ms", "max_delay_ms",
                            "connect_timeout_ms", "statement_timeout_ms" }) do
        local v = opts[name]
        if v ~= nil and (type(v) ~= "number" or v ~= floor(v) or v < 0 or v > 2147483647) then
            return nil, bad(name, "expected an integer >= 0")
        end
        out[name] = v
    end
    if out.ack_timeout_ms == 0 then return nil, bad("ack_timeout_ms", "must be at least 1") end
    out.base_delay_ms = out.base_delay_ms or _M.DEFAULTS.base_delay_ms
    out.max_delay_ms = out.max_delay_ms or _M.DEFAULTS.max_delay_ms
    if opts.channel ~= nil and (type(opts.channel) ~= "string" or opts.channel == "") then
        return nil, bad("channel", "expected a non-empty string")
    end
    out.channel = opts.channel or _M.DEFAULTS.channel
    if opts.subject_prefix ~= nil and not core.nats_subject_valid(opts.subject_prefix) then
        return nil, bad("subject_prefix", "not a valid subject")
    end
    out.subject_prefix = opts.subject_prefix
    out.delete_published, e = bool_setting(opts, getenv, "delete_published")
    if out.delete_published == nil then return nil, e end
    return out
end

_M.OPTIONS = OPTIONS

return _M

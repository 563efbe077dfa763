-- NATS settings: explicit options over QX_NATS__* variables (qx-events' NatsSettings, so a Lua
-- and a Python service share one configuration) over defaults, read with qx.settings' readers.
-- The variables and options are listed in docs/settings.md. Error messages never repeat the
-- servers (urls may carry credentials), password or token.
local core = require "qx.core"
local settings = require "qx.settings"
local raise = require("qx.options").raise

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local fmt = string.format
local match = string.match
local find = string.find
local concat = table.concat
local sort = table.sort
local os_getenv = os.getenv


local _M = {}


local INT_MAX = 2147483647

_M.ENV = {
    servers = "QX_NATS__SERVERS",
    client_name = "QX_NATS__CLIENT_NAME",
    connect_timeout_seconds = "QX_NATS__CONNECT_TIMEOUT_SECONDS",
    reconnect_attempts = "QX_NATS__RECONNECT_ATTEMPTS",
    reconnect_wait_seconds = "QX_NATS__RECONNECT_WAIT_SECONDS",
    ping_interval_seconds = "QX_NATS__PING_INTERVAL_SECONDS",
    max_pings_outstanding = "QX_NATS__MAX_PINGS_OUTSTANDING",
    user = "QX_NATS__USER",
    password = "QX_NATS__PASSWORD",
    token = "QX_NATS__TOKEN",
    creds_file = "QX_NATS__CREDS_FILE",
    tls = "QX_NATS__TLS",
    tls_ca = "QX_NATS__TLS_CA",
    tls_cert = "QX_NATS__TLS_CERT",
    tls_key = "QX_NATS__TLS_KEY",
    send_asap = "QX_NATS__SEND_ASAP",
    stream = "QX_NATS__STREAM",
    subject_prefix = "QX_NATS__SUBJECT_PREFIX",
    publish_timeout_seconds = "QX_NATS__PUBLISH_TIMEOUT_SECONDS",
}

_M.DEFAULTS = {
    servers = "nats://127.0.0.1:4222",
    client_name = "qx",
    connect_timeout_seconds = 2,
    reconnect_attempts = -1,
    reconnect_wait_seconds = 2,
    ping_interval_seconds = 2,
    max_pings_outstanding = 2,
    stream = "QX_EVENTS",
    subject_prefix = "qx.events",
    publish_timeout_seconds = 5,
    send_asap = true,
}

-- option name -> true; aliases map to their canonical name
local OPTIONS = {
    servers = true, client_name = true, name = "client_name",
    connect_timeout_seconds = true, connect_timeout_ms = true,
    reconnect_attempts = true, reconnect_wait_seconds = true, reconnect_wait_ms = true,
    ping_interval_seconds = true, ping_interval_ms = true, max_pings_outstanding = true,
    user = true, password = true, token = true, creds_file = true,
    tls = true, tls_ca = true, tls_cert = true, tls_key = true, send_asap = true,
    stream = true, subject_prefix = true,
    publish_timeout_seconds = true, publish_timeout_ms = true,
}
_M.OPTIONS = OPTIONS

local function option_list()
    local names = {}
    for k in pairs(OPTIONS) do names[#names + 1] = k end
    sort(names)
    return concat(names, ", ")
end

local bad, pick, ranged = settings.bad, settings.pick, settings.ranged

-- a duration given in seconds (option or variable) or in ms (option only)
local function duration(opts, getenv, name, dflt_seconds, lo_ms)
    return settings.duration_ms(opts, getenv, name .. "_ms", name .. "_seconds",
                                _M.ENV[name .. "_seconds"], dflt_seconds, lo_ms)
end

local function text(opts, getenv, name)
    local src = pick(opts, getenv, name, _M.ENV[name])
    if not src then return nil end
    if type(src.value) ~= "string" or src.value == "" then
        return nil, bad(src.source, "expected a non-empty string")
    end
    return src.value
end

-- settings(opts?, getenv?) -> normalised table | nil, err
--   { servers, client_name, connect_timeout_ms, reconnect_attempts, reconnect_wait_ms,
--     ping_interval_ms, max_pings_outstanding, user,
--     password, token, creds_file, tls, tls_ca, tls_cert, tls_key, send_asap, stream,
--     subject_prefix, publish_timeout_ms }
function _M.settings(opts, getenv)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        raise("qx.nats: options must be a table, got " .. type(opts))
    end
    getenv = getenv or os_getenv
    local o = {}
    for k, v in pairs(opts) do
        local canon = OPTIONS[k]
        if not canon then
            raise("qx.nats: unknown option '" .. tostring(k) .. "' (known: " .. option_list()
                  .. ")")
        end
        canon = canon == true and k or canon
        if o[canon] ~= nil then raise("qx.nats: pass " .. canon .. " once") end
        o[canon] = v
    end
    for _, pair in ipairs({ { "connect_timeout_seconds", "connect_timeout_ms" },
                            { "reconnect_wait_seconds", "reconnect_wait_ms" },
                            { "ping_interval_seconds", "ping_interval_ms" },
                            { "publish_timeout_seconds", "publish_timeout_ms" } }) do
        if o[pair[1]] ~= nil and o[pair[2]] ~= nil then
            raise("qx.nats: pass " .. pair[1] .. " or " .. pair[2] .. ", not both")
        end
    end

    local D, out = _M.DEFAULTS, {}
    local v, e, src

    -- servers: a list or a comma-separated string
    src = pick(o, getenv, "servers", _M.ENV.servers)
    v = src and src.value or D.servers
    if type(v) == "table" then
        for i, s in ipairs(v) do
            if type(s) ~= "string" or s == "" then
                return nil, bad("servers", "entry " .. i .. " is not a url")
            end
        end
        if #v == 0 then return nil, bad("servers", "the list is empty") end
        v = concat(v, ",")
    elseif type(v) ~= "string" or not find(v, "%S") then
        return nil, bad(src and src.source or "servers", "expected urls")
    end
    for url in v:gmatch("[^,]+") do
        local u = match(url, "^%s*(.-)%s*$")
        local scheme = match(u, "^([%w+.%-]*)://")
        if scheme and scheme ~= "nats" and scheme ~= "tls" then
            return nil, bad(src and src.source or "servers",
                            "unsupported scheme \"" .. scheme .. "\" (expected nats:// or tls://)")
        end
    end
    out.servers = v

    out.client_name, e = text(o, getenv, "client_name")
    if e then return nil, e end
    out.client_name = out.client_name or D.client_name

    out.connect_timeout_ms, e = duration(o, getenv, "connect_timeout", D.connect_timeout_seconds, 1)
    if not out.connect_timeout_ms then return nil, e end
    out.reconnect_wait_ms, e = duration(o, getenv, "reconnect_wait", D.reconnect_wait_seconds, 0)
    if not out.reconnect_wait_ms then return nil, e end
    out.publish_timeout_ms, e = duration(o, getenv, "publish_timeout", D.publish_timeout_seconds, 1)
    if not out.publish_timeout_ms then return nil, e end
    out.ping_interval_ms, e = duration(o, getenv, "ping_interval", D.ping_interval_seconds, 1)
    if not out.ping_interval_ms then return nil, e end

    src = pick(o, getenv, "max_pings_outstanding", _M.ENV.max_pings_outstanding)
    if src then
        v, e = ranged(src, "int", 1, INT_MAX, 1)
        if not v then return nil, e end
        out.max_pings_outstanding = v
    else
        out.max_pings_outstanding = D.max_pings_outstanding
    end

    src = pick(o, getenv, "reconnect_attempts", _M.ENV.reconnect_attempts)
    if src then
        v, e = ranged(src, "int", -1, INT_MAX, 1)
        if not v then return nil, e end
        out.reconnect_attempts = v
    else
        out.reconnect_attempts = D.reconnect_attempts
    end

    for _, name in ipairs({ "user", "password", "token", "creds_file", "tls_ca", "tls_cert",
                            "tls_key" }) do
        out[name], e = text(o, getenv, name)
        if e then return nil, e end
    end
    if out.password and not out.user then
        return nil, bad("password", "a password needs a user")
    end
    if (out.tls_cert == nil) ~= (out.tls_key == nil) then
        return nil, bad("tls_cert", "tls_cert and tls_key go together")
    end

    for _, name in ipairs({ "tls", "send_asap" }) do
        src = pick(o, getenv, name, _M.ENV[name])
        if src then
            v, e = settings.boolean(src)
            if v == nil then return nil, e end
            out[name] = v
        else
            out[name] = D[name] or false
        end
    end

    out.stream, e = text(o, getenv, "stream")
    if e then return nil, e end
    out.stream = out.stream or D.stream
    if find(out.stream, "[%s%.%*>]") then
        return nil, bad("stream", "a stream name has no spaces, dots, * or >")
    end
    out.subject_prefix, e = text(o, getenv, "subject_prefix")
    if e then return nil, e end
    out.subject_prefix = out.subject_prefix or D.subject_prefix
    if not core.nats_subject_valid(out.subject_prefix) then
        return nil, bad("subject_prefix", "not a valid subject: " .. fmt("%q", out.subject_prefix))
    end
    return out
end

return _M

-- Settings: explicit options over environment over defaults. settings.db() reads the database
-- settings (QX_DB__*, QX_CURSOR_KEY: qx-db's names); the readers below it (pick, number_of,
-- ranged, boolean, bad) are the one way every other QX_* setting is read (qx.nats, qx.relay).
-- The variables, defaults and options are listed in docs/settings.md.
--
-- A bad value is a runtime failure (nil and an "invalid" error naming the setting); an unknown
-- option or conflicting options raise. Messages never repeat the URL or the cursor key.

local qx_error = require "qx.error"
local options = require "qx.options"

local type = type
local error = error
local tostring = tostring
local tonumber = tonumber
local floor = math.floor
local tointeger = math.tointeger
local fmt = string.format
local match = string.match
local find = string.find
local lower = string.lower
local os_getenv = os.getenv


local _M = { _VERSION = "0.1.0" }


local INT_MAX = 2147483647
local MAX_POOL_SIZE = 10000
local MAX_SECONDS = 2147483    -- INT_MAX milliseconds

_M.ENV = {
    url = "QX_DB__URL",
    pool_size = "QX_DB__POOL_SIZE",
    pool_timeout_seconds = "QX_DB__POOL_TIMEOUT_SECONDS",
    pool_recycle_seconds = "QX_DB__POOL_RECYCLE_SECONDS",
    statement_timeout_ms = "QX_DB__STATEMENT_TIMEOUT_MS",
    connect_timeout_seconds = "QX_DB__CONNECT_TIMEOUT_SECONDS",
    cursor_key = "QX_CURSOR_KEY",
}

_M.DB_DEFAULTS = {
    pool_size = 10,
    pool_timeout_seconds = 30,
    pool_recycle_seconds = 1800,  -- qx-db's defaults
    statement_timeout_ms = 10000,
    connect_timeout_seconds = 10,
}

-- the option names settings.db() accepts
local DB_OPTIONS = {
    url = true,
    pool_size = true,
    pool_timeout_seconds = true,
    acquire_timeout_ms = true,
    pool_recycle_seconds = true,
    statement_timeout_ms = true,
    connect_timeout_ms = true,
    connect_timeout_seconds = true,
    cursor_key = true,
}
_M.DB_OPTIONS = DB_OPTIONS


-- the error for a bad value of `setting` (an option or a variable name)
local function bad(setting, msg)
    return qx_error.new("invalid", "invalid setting " .. setting .. ": " .. msg,
                        { setting = setting })
end


local function to_int(n)
    n = floor(n)
    if tointeger then
        return tointeger(n) or n
    end
    return n
end


-- Where a setting comes from: the explicit option, else the environment variable (when
-- set and not empty), else nil. Returns { source = option or variable name, value =,
-- from_env = bool }.
local function pick(opts, getenv, option, env_name)
    local v = opts[option]
    if v ~= nil then
        return { source = option, value = v, from_env = false }
    end
    if env_name ~= nil then
        local s = getenv(env_name)
        if s ~= nil and s ~= "" then
            if type(s) ~= "string" then
                error("settings: getenv returned a " .. type(s) .. " for " .. env_name, 3)
            end
            return { source = env_name, value = s, from_env = true }
        end
    end
    return nil
end


-- The number a source holds: environment strings are parsed strictly (no hex, no
-- exponent), options must already be numbers. kind "int" accepts integers only, "num"
-- decimals too. Returns the number, or nil and an error.
local function number_of(src, kind)
    local v = src.value
    local want = kind == "int" and "an integer" or "a number"
    if src.from_env then
        local s = match(v, "^%s*(.-)%s*$")
        local ok
        if kind == "int" then
            ok = find(s, "^[+-]?%d+$")
        else
            ok = find(s, "^[+-]?%d+%.?%d*$") or find(s, "^[+-]?%.%d+$")
        end
        if not ok then
            return nil, bad(src.source, "expected " .. want .. ", got " .. fmt("%q", v))
        end
        return tonumber(s)
    end
    if type(v) ~= "number" or v ~= v then
        return nil, bad(src.source, "expected " .. want .. ", got " .. type(v))
    end
    if kind == "int" and v ~= floor(v) then
        return nil, bad(src.source, "expected " .. want .. ", got " .. tostring(v))
    end
    return v
end


-- number_of, checked against lo..hi (in the source's unit) and multiplied by `scale`
-- (1000 for seconds -> ms); the result is an integer
local function ranged(src, kind, lo, hi, scale)
    local n, err = number_of(src, kind)
    if n == nil then
        return nil, err
    end
    if n < lo or n > hi then
        return nil, bad(src.source, fmt("must be from %s to %s, got %s", tostring(lo),
                                        tostring(hi), tostring(src.value)))
    end
    return to_int(n * scale + 0.5)
end


-- A duration in milliseconds, from `ms_option` (an integer, lo_ms or more), else from
-- `seconds_option` given as an option or in `env_name` (decimals allowed, at most max_seconds),
-- else default_seconds.
local function duration_ms(opts, getenv, ms_option, seconds_option, env_name, default_seconds,
                           lo_ms, max_seconds)
    lo_ms = lo_ms or 0
    local src = pick(opts, getenv, ms_option, nil)
    if src ~= nil then
        return ranged(src, "int", lo_ms, INT_MAX, 1)
    end
    src = pick(opts, getenv, seconds_option, env_name)
    if src == nil then
        return to_int(default_seconds * 1000 + 0.5)
    end
    return ranged(src, "num", lo_ms / 1000, max_seconds or MAX_SECONDS, 1000)
end


-- The boolean a source holds: a variable reads true/false, 1/0, yes/no, on/off (any case),
-- an option must be a boolean. Returns it, or nil and an error.
local BOOLEAN_WORDS = { ["true"] = true, ["1"] = true, yes = true, on = true,
                        ["false"] = false, ["0"] = false, no = false, off = false }

local function boolean(src)
    local v = src.value
    if src.from_env then
        local b = BOOLEAN_WORDS[lower(match(v, "^%s*(.-)%s*$"))]
        if b == nil then
            return nil, bad(src.source, "expected true or false, got " .. fmt("%q", v))
        end
        return b
    end
    if type(v) ~= "boolean" then return nil, bad(src.source, "expected a boolean") end
    return v
end


-- postgres URL or libpq conninfo; drops a SQLAlchemy "+driver" from the scheme
local function normalise_url(src)
    local url = src.value
    if type(url) ~= "string" then
        return nil, bad(src.source, "expected a string, got " .. type(url))
    end
    url = match(url, "^%s*(.-)%s*$")
    if url == "" then
        return nil, bad(src.source, "must not be empty")
    end
    local scheme, rest = match(url, "^([%w+.%-]+)://(.*)$")
    if scheme == nil then
        -- key=value conninfo: "host=... dbname=..."
        if not find(url, "=", 1, true) then
            return nil, bad(src.source,
                            "expected a postgresql:// URL or a key=value conninfo string")
        end
        return url
    end
    local base = lower(match(scheme, "^([^+]*)"))
    if base ~= "postgresql" and base ~= "postgres" then
        return nil, bad(src.source, "unsupported URL scheme \"" .. scheme
                                    .. "\" (expected postgresql://)")
    end
    return base .. "://" .. rest
end


function _M.db(opts, getenv)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error("settings: options must be a table, got " .. type(opts), 2)
    end
    if getenv == nil then
        getenv = os_getenv
    elseif type(getenv) ~= "function" then
        error("settings: getenv must be a function, got " .. type(getenv), 2)
    end
    options.check(opts, DB_OPTIONS, "settings")
    if opts.pool_timeout_seconds ~= nil and opts.acquire_timeout_ms ~= nil then
        error("settings: pass pool_timeout_seconds or acquire_timeout_ms, not both", 2)
    end
    if opts.connect_timeout_seconds ~= nil and opts.connect_timeout_ms ~= nil then
        error("settings: pass connect_timeout_seconds or connect_timeout_ms, not both", 2)
    end

    local ENV, DEFAULTS = _M.ENV, _M.DB_DEFAULTS
    local out = {}
    local src, v, err

    -- url
    src = pick(opts, getenv, "url", ENV.url)
    if src == nil then
        return nil, qx_error.new("invalid", "no database url: pass url or set " .. ENV.url,
                                 { setting = ENV.url })
    end
    v, err = normalise_url(src)
    if v == nil then
        return nil, err
    end
    out.url = v

    -- pool size
    src = pick(opts, getenv, "pool_size", ENV.pool_size)
    if src == nil then
        v = DEFAULTS.pool_size
    else
        v, err = ranged(src, "int", 1, MAX_POOL_SIZE, 1)
        if v == nil then
            return nil, err
        end
    end
    out.pool_size = v

    -- acquire timeout: acquire_timeout_ms, else pool_timeout_seconds (option or variable)
    v, err = duration_ms(opts, getenv, "acquire_timeout_ms", "pool_timeout_seconds",
                         ENV.pool_timeout_seconds, DEFAULTS.pool_timeout_seconds)
    if v == nil then
        return nil, err
    end
    out.acquire_timeout_ms = v

    -- recycle age in whole seconds; 0 or -1 = never
    src = pick(opts, getenv, "pool_recycle_seconds", ENV.pool_recycle_seconds)
    if src == nil then
        v = to_int(DEFAULTS.pool_recycle_seconds * 1000)
    else
        v, err = number_of(src, "int")
        if v == nil then
            return nil, err
        end
        if v == 0 or v == -1 then
            v = 0
        elseif v < 1 or v > MAX_SECONDS then
            return nil, bad(src.source, fmt("must be from 1 to %d seconds, or 0 / -1 for "
                                            .. "never, got %s", MAX_SECONDS, tostring(src.value)))
        else
            v = to_int(v * 1000)
        end
    end
    out.recycle_ms = v

    -- statement timeout; 0 = no limit
    src = pick(opts, getenv, "statement_timeout_ms", ENV.statement_timeout_ms)
    if src == nil then
        v = DEFAULTS.statement_timeout_ms
    else
        v, err = ranged(src, "int", 0, INT_MAX, 1)
        if v == nil then
            return nil, err
        end
    end
    out.statement_timeout_ms = v

    -- connect timeout: connect_timeout_ms, else connect_timeout_seconds (option or variable)
    v, err = duration_ms(opts, getenv, "connect_timeout_ms", "connect_timeout_seconds",
                         ENV.connect_timeout_seconds, DEFAULTS.connect_timeout_seconds)
    if v == nil then
        return nil, err
    end
    out.connect_timeout_ms = v

    -- cursor key (a secret: never echoed)
    src = pick(opts, getenv, "cursor_key", ENV.cursor_key)
    if src ~= nil then
        if type(src.value) ~= "string" or src.value == "" then
            return nil, bad(src.source, "expected a non-empty string, got " .. type(src.value))
        end
        out.cursor_key = src.value
    end

    return out
end



-- The readers the other settings (qx.nats, qx.relay) use: where a setting comes from, the
-- error for a bad value, strict numbers and ranges (kind "int" or "num"), booleans, durations.
_M.pick = pick
_M.bad = bad
_M.number_of = number_of
_M.ranged = ranged
_M.boolean = boolean
_M.duration_ms = duration_ms

return _M

-- Keyset pagination cursors: opaque tokens signed with HMAC-SHA256 over the listing they belong
-- to (table, sort, filters, tenant) and the last row's sort values; nothing of a token is read
-- before its MAC is checked (core.cursor_seal, core.cursor_open). The first key signs, all are
-- tried, so keys rotate. Token layout: docs/repository.md.
local core = require "qx.core"
local qx_error = require "qx.error"

local type = type
local tostring = tostring
local ipairs = ipairs
local seal = core.cursor_seal
local open = core.cursor_open
local null = core.null

local _M = { _VERSION = "0.1.0" }

_M.MAX_LENGTH = core.CURSOR_MAX_LENGTH -- longer tokens are refused before any work
_M.MIN_KEY_LENGTH = 16                 -- bytes
_M.MAX_KEYS = core.CURSOR_MAX_KEYS

local function bad(why)
    return nil, qx_error.new("invalid", "invalid cursor: " .. why)
end

-- keys(value) -> list of keys | nil, why. value: a string or a list of strings.
function _M.keys(value)
    if type(value) == "string" then value = { value } end
    if type(value) ~= "table" or #value == 0 then
        return nil, "expected a string or a list of strings"
    end
    if #value > _M.MAX_KEYS then return nil, "at most " .. _M.MAX_KEYS .. " keys" end
    for i, k in ipairs(value) do
        if type(k) ~= "string" then
            return nil, "key " .. i .. " is a " .. type(k) .. ", expected a string"
        end
        if #k < _M.MIN_KEY_LENGTH then
            return nil, "keys must be at least " .. _M.MIN_KEY_LENGTH .. " bytes long"
        end
    end
    return value
end

-- encode(keys, context, values, n) -> token. values: array of strings or qx.null, n = count.
function _M.encode(keys, context, values, n)
    return seal(keys[1], context, values, n)
end

-- decode(keys, context, token, n) -> values (array of strings or qx.null) | nil, err
function _M.decode(keys, context, token, n)
    if type(token) ~= "string" then return bad("expected a string, got " .. type(token)) end
    local values, why = open(keys, context, token, n)
    if not values then return bad(why) end
    return values
end

-- The text a key value travels as (numbers keep every digit of a double).
function _M.text(v)
    local t = type(v)
    if t == "string" or v == null or v == nil then return v end
    if t == "boolean" then return v and "true" or "false" end
    if t == "number" then
        if v % 1 == 0 and v > -2^53 and v < 2^53 then return string.format("%d", v) end
        return string.format("%.17g", v)
    end
    return tostring(v)
end

return _M

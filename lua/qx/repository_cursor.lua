-- Keyset pagination cursors: opaque, signed tokens.
--
--   token = base64url(payload) "." base64url(HMAC-SHA256(key, context || payload))
--   payload = {"v":1,"k":[<the sort-key values of the last row, as text or null>]}
--
-- The signed context names the listing the cursor belongs to (table, sort, filters, tenant,
-- whether deleted rows are included), so a cursor cannot be edited, forged without the key, or
-- carried over to another listing. The payload is signed, not encrypted: it holds values of the
-- last row the client was already shown.
--
-- Keys: the first signs; all are tried when checking, so a key can be rotated by putting the
-- new one first and dropping the old one once its cursors have expired from use.
local core = require "qx.core"
local qx_error = require "qx.error"
local json = require("cjson.safe").new()

local type = type
local tostring = tostring
local ipairs = ipairs
local find = string.find
local sub = string.sub
local concat = table.concat
local hmac = core.hmac_sha256
local equal = core.equal_consttime
local b64e = core.b64url_encode
local b64d = core.b64url_decode
local null = core.null

json.decode_max_depth(3)

local _M = { _VERSION = "0.1.0" }

_M.MAX_LENGTH = 4096   -- longer tokens are refused before any work
_M.MIN_KEY_LENGTH = 16 -- bytes
local DOMAIN = "qx.cursor.v1\n"

local function bad(why)
    return nil, qx_error.new("invalid", "invalid cursor: " .. why)
end

-- keys(value) -> list of keys | nil, why. value: a string or a list of strings.
function _M.keys(value)
    if type(value) == "string" then value = { value } end
    if type(value) ~= "table" or #value == 0 then
        return nil, "expected a string or a list of strings"
    end
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

local function mac(key, context, body)
    return hmac(key, DOMAIN .. context .. "\n" .. body)
end

-- encode(keys, context, values) -> token. values: array of strings or qx.null, n = count.
function _M.encode(keys, context, values, n)
    local k = {}
    for i = 1, n do
        local v = values[i]
        k[i] = (v == nil or v == null) and "null" or json.encode(v)
    end
    local body = b64e('{"v":1,"k":[' .. concat(k, ",") .. "]}")
    return body .. "." .. b64e(mac(keys[1], context, body))
end

-- decode(keys, context, token, n) -> values (array of strings or qx.null) | nil, err
function _M.decode(keys, context, token, n)
    if type(token) ~= "string" then return bad("expected a string, got " .. type(token)) end
    if #token > _M.MAX_LENGTH then return bad("too long") end
    local dot = find(token, ".", 1, true)
    if not dot then return bad("malformed") end
    local body, sig = sub(token, 1, dot - 1), sub(token, dot + 1)
    local given = b64d(sig)
    if not given or #given ~= 32 then return bad("malformed signature") end
    local ok = false
    for _, key in ipairs(keys) do
        if equal(mac(key, context, body), given) then ok = true break end
    end
    if not ok then
        return bad("signature does not match (edited, forged, or from another listing)")
    end
    -- signed by us: the rest can only fail if the listing's shape changed meanwhile
    local raw = b64d(body)
    local payload = raw and json.decode(raw)
    if type(payload) ~= "table" or payload.v ~= 1 or type(payload.k) ~= "table"
       or #payload.k ~= n then
        return bad("does not fit this listing")
    end
    for i = 1, n do
        local v = payload.k[i]
        if v ~= null and type(v) ~= "string" then return bad("does not fit this listing") end
    end
    return payload.k
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

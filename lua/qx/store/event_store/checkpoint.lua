-- Internal to qx.store.event_store: the checkpoint codec and decimal positions.
-- A checkpoint is opaque to users: base64url (no padding) of "v1.<tx_id>.<global_position>".
-- Decoding is strict (canonical base64url, the exact layout, no leading zeros, values within
-- xid8 / bigint range); anything else is nil, { code = "invalid" }.
local core = require "qx.core"
local qx_error = require "qx.error"

local type = type
local error = error
local fmt = string.format
local match = string.match
local sub = string.sub
local null = core.null
local new_error = qx_error.new

local _M = {}

local CHECKPOINT_VERSION = "v1"
local XID8_MAX = "18446744073709551615"
local BIGINT_MAX = "9223372036854775807"

-- compares two non-negative decimal strings without leading zeros
local function dec_cmp(a, b)
    if #a ~= #b then
        return #a < #b and -1 or 1
    end
    if a == b then
        return 0
    end
    return a < b and -1 or 1
end

_M.dec_cmp = dec_cmp

-- a bigint column value as a decimal string (LuaJIT hands values beyond 2^53 over as strings)
local function dec(v)
    if type(v) == "string" then
        return v
    end
    return fmt("%d", v)
end

_M.dec = dec

local function encode_checkpoint(tx, pos)
    return core.b64url_encode(CHECKPOINT_VERSION .. "." .. tx .. "." .. pos)
end

local function valid_dec(s, max)
    return s ~= nil and #s <= #max and (s == "0" or sub(s, 1, 1) ~= "0")
           and dec_cmp(s, max) <= 0
end

-- checkpoint (string or nil) -> tx, pos (decimal strings) | nil, err
local function decode_checkpoint(cp)
    if cp == nil or cp == null then
        return "0", "0"
    end
    if type(cp) ~= "string" then
        return nil, new_error("invalid", "checkpoint must be a string, got " .. type(cp))
    end
    local raw = #cp <= 128 and core.b64url_decode(cp)
    local v, tx, pos
    if raw then
        v, tx, pos = match(raw, "^(v%d+)%.(%d+)%.(%d+)$")
    end
    if v ~= CHECKPOINT_VERSION or not valid_dec(tx, XID8_MAX) or not valid_dec(pos, BIGINT_MAX) then
        return nil, new_error("invalid", "not a checkpoint of this event store")
    end
    return tx, pos
end

_M.encode_checkpoint = encode_checkpoint
_M.decode_checkpoint = decode_checkpoint

-- the later of two (tx, pos) pairs
local function later(tx1, pos1, tx2, pos2)
    local c = dec_cmp(tx1, tx2)
    if c > 0 or (c == 0 and dec_cmp(pos1, pos2) >= 0) then
        return tx1, pos1
    end
    return tx2, pos2
end

_M.later = later

-- the opaque checkpoint just after a record
function _M.checkpoint_after(rec)
    if type(rec) ~= "table" or type(rec._tx_id) ~= "string" or rec._global_position == nil then
        error("checkpoint_after: expected a record returned by a read", 2)
    end
    return encode_checkpoint(rec._tx_id, dec(rec._global_position))
end

return _M

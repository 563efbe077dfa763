--- Internal to qx.openresty: what may cross between Lua VMs (plain data), and errors made
-- plain for the crossing and back into the qx shape.
local core = require "qx.core"
local qx_error = require "qx.error"

local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local find = string.find
local fmt = string.format
local traceback = debug.traceback
local NULL = core.null

local _M = {}

-- lua-nginx-module copies at most 100 levels of nested tables between VMs.
local MAX_DEPTH = 90

local function key_path(k)
    if type(k) == "string" then
        return find(k, "^[%a_][%w_]*$") and ("." .. k) or fmt("[%q]", k)
    end
    return "[" .. tostring(k) .. "]"
end

-- true, or nil, the path below v to what is wrong, and what is wrong (the path is only made
-- on the way out of a failure: a command that crosses builds no strings)
local function check(v, on_path, depth)
    local t = type(v)
    if t == "string" or t == "number" or t == "boolean" or t == "nil" or v == NULL then
        return true
    end
    if t ~= "table" then
        return nil, "", "is a " .. t
    end
    if depth >= MAX_DEPTH then
        return nil, "", fmt("nests deeper than %d tables", MAX_DEPTH)
    end
    if on_path[v] then
        return nil, "", "refers back to a table that contains it"
    end
    on_path[v] = true
    for k, x in pairs(v) do
        local kt = type(k)
        if kt ~= "string" and kt ~= "number" and kt ~= "boolean" then
            on_path[v] = nil
            return nil, "", "has a " .. kt .. " key"
        end
        local xt = type(x)
        if xt ~= "string" and xt ~= "number" and xt ~= "boolean" then
            local ok, below, why = check(x, on_path, depth + 1)
            if not ok then
                on_path[v] = nil
                return nil, key_path(k) .. below, why
            end
        end
    end
    on_path[v] = nil
    return true
end

-- Checks that v can cross between Lua VMs: nil, booleans, numbers, strings, qx.null, and
-- tables of those with string, number or boolean keys, no cycles, at most MAX_DEPTH deep.
-- Metatables are not carried across (nginx copies raw fields). Returns true, or nil and why
-- (naming the value by path).
local function check_plain(v, path, on_path, depth)
    local ok, below, why = check(v, on_path, depth)
    if ok then return true end
    return nil, path .. below .. " " .. why
end

--- Whether v is plain data (what may cross to or from a worker thread).
---@param v any
---@param name string|nil how the value is named in the reason
---@return true|nil ok
---@return string? why
function _M.is_plain(v, name)
    return check_plain(v, name or "value", {}, 0)
end

-- An error as plain data: the fields of the qx shape whose values are plain, without the raw
-- raised value. The traceback (a string) travels so the request side can log it.
local function plain_error(e)
    if type(e) ~= "table" then
        e = qx_error.new("error", tostring(e))
    end
    local out = {}
    for k, v in pairs(e) do
        if type(k) == "string" and k ~= "value" and check_plain(v, k, {}, 1) then
            out[k] = v
        end
    end
    if type(out.code) ~= "string" then out.code = "error" end
    if type(out.message) ~= "string" then out.message = tostring(e.message or e.code) end
    return out
end

-- xpcall handler: a qx error passes; anything else keeps its traceback. (LuaJIT's
-- debug.traceback(nil, level) returns nil, so the message argument is a string here.)
local function on_raise(e)
    if qx_error.is(e) then return e end
    return qx_error.from_raised(e, (traceback("", 2):gsub("^\n", "")))
end

local function as_error(e)
    if qx_error.is(e) then return e end
    if type(e) == "table" then
        if type(e.code) ~= "string" then e.code = "error" end
        if type(e.message) ~= "string" then e.message = tostring(e.message) end
        return setmetatable(e, qx_error.mt)
    end
    return qx_error.new("error", tostring(e))
end

_M.check_plain = check_plain
_M.plain_error = plain_error
_M.on_raise = on_raise
_M.as_error = as_error

return _M

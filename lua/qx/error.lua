-- The one error shape of qx: a table { code, message, sqlstate?, retryable?, details? } whose
-- __tostring prints "code: message". Runtime failures return nil, err; misuse raises.
local core = require "qx.core"

local setmetatable = setmetatable
local getmetatable = getmetatable
local type = type
local tostring = tostring
local traceback = debug.traceback

local _M = { _VERSION = "0.1.0" }

local mt = core.error_mt
_M.mt = mt

-- new(code, message[, fields]) -> err
function _M.new(code, message, fields)
    local err = { code = code, message = message }
    if fields then
        for k, v in pairs(fields) do
            if err[k] == nil then err[k] = v end
        end
    end
    return setmetatable(err, mt)
end

function _M.is(x)
    return type(x) == "table" and getmetatable(x) == mt
end

-- fail(code, message[, fields]) -> nil, err
function _M.fail(code, message, fields)
    return nil, _M.new(code, message, fields)
end

-- Turns anything raised inside user code into the error shape; a qx error passes unchanged. A
-- plain table with a string code (error({ code = "insufficient_funds", message = ... })) is a
-- domain error: it becomes the error itself, every field kept, with the error metatable.
function _M.from_raised(e, tb)
    if _M.is(e) then return e end
    if type(e) == "table" and getmetatable(e) == nil and type(e.code) == "string" then
        if e.message == nil then e.message = e.code end
        return setmetatable(e, mt)
    end
    local err = _M.new("error", type(e) == "string" and e or tostring(e))
    if type(e) ~= "string" and e ~= nil then err.value = e end
    err.traceback = tb
    return err
end

-- An xpcall handler that keeps the traceback of a raised Lua error.
function _M.handler(e)
    if _M.is(e) then return e end
    -- LuaJIT's debug.traceback(nil, level) returns nil: give it a message, then drop it
    return _M.from_raised(e, (traceback("", 2):gsub("^\n", "")))
end

return _M

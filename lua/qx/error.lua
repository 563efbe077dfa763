--- The one error shape of qx: a table { code, message, sqlstate?, retryable?, details? } whose
-- __tostring prints "code: message". Runtime failures return nil, err; misuse raises.
local core = require "qx.core"

local setmetatable = setmetatable
local getmetatable = getmetatable
local type = type
local tostring = tostring
local traceback = debug.traceback

local _M = { _VERSION = "0.1.0" }

--- The one error shape of qx, returned as the second result of a failure. Codes: conflict,
-- invalid, not_found, timeout, connection, db, nats, config, error (a raised Lua error), or a
-- domain error's own; README lists when each happens.
---@class qx.Error
---@field code string conflict, invalid, not_found, timeout, connection, db, nats, error, ...
---@field message string what happened; tostring(err) is "code: message"
---@field sqlstate string? the server's SQLSTATE, for database errors
---@field retryable boolean? true for a serialization failure or deadlock: run it again
---@field details any? more about the failure (e.g. the fields of a conflict)
---@field traceback string? where a raised Lua error came from (code "error")
local mt = core.error_mt
_M.mt = mt

--- A new error of the qx shape (for domain errors: any code of your own).
---@param code string e.g. "insufficient_funds"
---@param message string
---@param fields table|nil extra fields copied into the error (code and message win)
---@return qx.Error err
function _M.new(code, message, fields)
    local err = { code = code, message = message }
    if fields then
        for k, v in pairs(fields) do
            if err[k] == nil then err[k] = v end
        end
    end
    return setmetatable(err, mt)
end

--- Whether x is an error made by qx.error (or returned by qx).
---@param x any
---@return boolean
function _M.is(x)
    return type(x) == "table" and getmetatable(x) == mt
end

--- nil and a new error, for `return qx.error.fail(...)` in a function that returns nil, err.
---@param code string
---@param message string
---@param fields table|nil extra fields
---@return nil
---@return qx.Error err
function _M.fail(code, message, fields)
    return nil, _M.new(code, message, fields)
end

--- Turns anything raised inside user code into the error shape; a qx error passes unchanged. A
-- plain table with a string code (error({ code = "insufficient_funds", message = ... })) is a
-- domain error: it becomes the error itself, every field kept, with the error metatable.
-- Anything else becomes code "error", the raised value in err.value.
---@param e any what was raised
---@param tb string|nil a traceback to keep
---@return qx.Error err
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

--- An xpcall handler that keeps the traceback of a raised Lua error.
---@param e any what was raised
---@return qx.Error err
function _M.handler(e)
    if _M.is(e) then return e end
    -- LuaJIT's debug.traceback(nil, level) returns nil: give it a message, then drop it
    return _M.from_raised(e, (traceback("", 2):gsub("^\n", "")))
end

return _M

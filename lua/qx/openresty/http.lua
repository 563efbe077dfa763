--- Internal to qx.openresty: the HTTP helpers of a request: error code -> status, the JSON
-- body of an error, respond() and read_json().
local qx_error = require "qx.error"
local plain = require "qx.openresty.plain"

local type = type
local tostring = tostring
local floor = math.floor
local find = string.find
local check_plain, as_error = plain.check_plain, plain.as_error

local _M = {}

-- Error code -> HTTP status; anything else is 500. An error may carry http_status (400..599)
-- to override it, as read_json does for a malformed body.
_M.HTTP_STATUS = {
    conflict = 409,
    invalid = 422,
    not_found = 404,
    timeout = 504,
}

--- The HTTP status of an error: conflict 409, invalid 422, not_found 404, timeout 504, else 500
-- (err.http_status wins).
---@param e any
---@return integer
function _M.http_status(e)
    if type(e) ~= "table" then return 500 end
    local s = e.http_status
    if type(s) == "number" and s >= 400 and s <= 599 and s == floor(s) then return s end
    return _M.HTTP_STATUS[e.code] or 500
end

-- Fields of an error that its JSON body shows besides code and message.
local SHOWN = { "sqlstate", "details", "field", "setting", "id", "expected_version",
                "actual_version" }

--- The JSON body of an error: { error = { code, message, sqlstate?, details?, ... } }. A raised
-- Lua error (code "error") says only "internal error": its message may hold paths and code.
---@param e any
---@return table
function _M.error_body(e)
    e = as_error(e)
    local body = { code = e.code, message = e.message }
    if e.code == "error" then
        body.message = "internal error"
    else
        for i = 1, #SHOWN do
            local k = SHOWN[i]
            local v = e[k]
            if v ~= nil and check_plain(v, k, {}, 0) then body[k] = v end
        end
    end
    if e.retryable == true then body.retryable = true end
    return { error = body }
end

local cjson_safe
local function json()
    if not cjson_safe then
        cjson_safe = require "cjson.safe"
    end
    return cjson_safe
end

local function send(status, body)
    local ngx = ngx
    ngx.status = status
    if body == nil then
        return ngx.exit(status)
    end
    local text, e = json().encode(body)
    if not text then
        ngx.log(ngx.ERR, "qx: response is not JSON: ", tostring(e))
        ngx.status = 500
        text = '{"error":{"code":"error","message":"internal error"}}'
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.print(text, "\n")
    return ngx.exit(ngx.status)
end

--- Sends res as JSON with status (default 200; 204 when res is nil), or the error with
-- http_status(err) and error_body(err). 5xx errors are logged with message and traceback.
---@param res any
---@param e any|nil
---@param status integer|nil
function _M.respond(res, e, status)
    local ngx = ngx
    if e ~= nil then
        e = as_error(e)
        local st = _M.http_status(e)
        if st >= 500 then
            ngx.log(ngx.ERR, "qx: ", tostring(e), e.debug and ("\n" .. tostring(e.debug)) or "",
                e.traceback and ("\n" .. e.traceback) or "")
        end
        return send(st, _M.error_body(e))
    end
    if res == nil then return send(status or 204, nil) end
    return send(status or 200, res)
end

--- The request body as text, as nginx holds it in memory. A missing or oversized body is
-- "invalid" with http_status 400 (413 when nginx spooled the body to a file: raise
-- client_body_buffer_size up to client_max_body_size to accept it).
---@return string|nil body
---@return qx.Error? err invalid
function _M.read_body()
    local ngx = ngx
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body == nil then
        if ngx.req.get_body_file() then
            return nil, qx_error.new("invalid", "request body too large", { http_status = 413 })
        end
        return nil, qx_error.new("invalid", "request body is empty: expected a JSON object",
            { http_status = 400 })
    end
    return body
end

--- The request body as a JSON object. A missing, oversized or malformed body, or JSON that is
-- not an object, is "invalid" with http_status 400 (413 when nginx spooled the body to a
-- file: raise client_body_buffer_size up to client_max_body_size to accept it).
---@return table|nil body
---@return qx.Error? err invalid
function _M.read_json()
    local body, be = _M.read_body()
    if not body then return nil, be end
    local v, e = json().decode(body)
    -- an array decodes to a table too: only a text that opens with "{" is an object
    if type(v) ~= "table" or not find(body, "^[ \t\r\n]*{") then
        return nil, qx_error.new("invalid", "request body is not a JSON object"
            .. (e and (": " .. tostring(e)) or ""), { http_status = 400 })
    end
    return v
end

--- As respond(), for a result that is JSON text already (run_json's): sends it as it is.
---@param text string|nil the JSON text
---@param e any|nil
---@param status integer|nil
function _M.respond_json(text, e, status)
    if e ~= nil or text == nil then return _M.respond(nil, e, status) end
    if type(text) ~= "string" then
        error("qx.openresty.respond_json: expected JSON text, got a " .. type(text), 2)
    end
    local ngx = ngx
    local st = status or 200
    ngx.status = st
    ngx.header["Content-Type"] = "application/json"
    ngx.print(text, "\n")
    return ngx.exit(st)
end

return _M

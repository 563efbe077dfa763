--- qx.tracing: W3C Trace Context carried through qx, and two optional hooks.
--
--   qx.tracing.on_span(function(span) exporter:add(span) end)   -- spans qx reports
--   qx.tracing.on_warning(function(message, info) log:warn(message) end)
--
-- A unit of work's context may carry traceparent (and tracestate); qx stores them with each
-- outbox row and stored event, sends them as headers, and gives them to the consumer's handler
-- and the unit of work it runs. qx never starts a trace: without a traceparent nothing is
-- stored, sent or reported. A value that is not valid W3C syntax is dropped (never stored) and
-- the warning hook says so. See docs/tracing.md.
local core = require "qx.core"

local type = type
local tostring = tostring
local error = error
local pcall = pcall
local find = string.find
local sub = string.sub
local gsub = string.gsub
local fmt = string.format
local gmatch = string.gmatch
local match = string.match
local now = core.time
local new_uuid = core.uuid
local stderr = io.stderr

local _M = { _VERSION = "0.1.0" }

local MAX_MEMBERS = 32 -- tracestate list members

local span_hook, warning_hook

-- ---- syntax ---------------------------------------------------------------------------------

local H = "[0-9a-f]"
local function hex(n) return string.rep(H, n) end
-- version 00: exactly this; a later version: this much at the start, then the end or a "-"
local TRACEPARENT = "^(" .. hex(2) .. ")%-(" .. hex(32) .. ")%-(" .. hex(16) .. ")%-" .. hex(2)
local ZERO_TRACE, ZERO_PARENT = string.rep("0", 32), string.rep("0", 16)

--- Whether v is a valid W3C traceparent: version 00 is exactly 00-<32 hex>-<16 hex>-<2 hex>
-- (lowercase, trace id and parent id not all zeros); a later version (not ff) starts so and
-- ends there or goes on after a "-".
---@param v any
---@return boolean ok
---@return string? reason why not
function _M.valid_traceparent(v)
    if type(v) ~= "string" then return false, "not a string" end
    local s, e, version, trace_id, parent_id = find(v, TRACEPARENT)
    if not s then
        return false, "not version-traceid-parentid-flags in lowercase hex"
    end
    if version == "ff" then return false, "version ff is invalid" end
    if version == "00" then
        if e ~= #v then return false, "version 00 is exactly 55 characters" end
    elseif e ~= #v and sub(v, e + 1, e + 1) ~= "-" then
        return false, "the flags are not followed by the end or a '-'"
    end
    if trace_id == ZERO_TRACE then return false, "the trace id is all zeros" end
    if parent_id == ZERO_PARENT then return false, "the parent id is all zeros" end
    return true
end

local valid_traceparent = _M.valid_traceparent

-- key: simple-key or tenant@system; value: 1 to 256 printable ASCII but ',' and '=' (a value's
-- trailing spaces are the list's, trimmed before). Each check is one pattern, no table made.
local SIMPLE_KEY = "^[a-z][a-z0-9_%-%*/]*$"
local TENANT_KEY = "^([a-z0-9][a-z0-9_%-%*/]*)@([a-z][a-z0-9_%-%*/]*)$"
local function valid_key(k)
    if find(k, SIMPLE_KEY) then return #k <= 256 end
    local tenant, system = match(k, TENANT_KEY)
    return tenant ~= nil and #tenant <= 241 and #system <= 14
end

local function valid_value(v)
    return v ~= "" and #v <= 256 and not find(v, "[^\32-\43\45-\60\62-\126]")
end

--- Whether v is a valid W3C tracestate: comma-separated key=value list members (empty ones and
-- spaces and tabs around them allowed), at most 32, each key once.
---@param v any
---@return boolean ok
---@return string? reason why not
function _M.valid_tracestate(v)
    if type(v) ~= "string" then return false, "not a string" end
    local n, first, seen = 0, nil, nil
    for member in gmatch(v, "[^,]+") do
        local key, value = match(member, "^[ \t]*([^=]*)=(.*)$")
        if value ~= nil and find(value, "[ \t]$") then value = match(value, "^(.-)[ \t]+$") end
        if key == nil then
            if find(member, "[^ \t]") then
                return false, "list member " .. (n + 1) .. " is not key=value"
            end
        else
            n = n + 1
            if n > MAX_MEMBERS then
                return false, "more than " .. MAX_MEMBERS .. " list members"
            end
            if not valid_key(key) then
                return false, "list member " .. n .. " has an invalid key"
            end
            if not valid_value(value) then
                return false, "list member " .. n .. " has an invalid value"
            end
            -- each key once: the first one is kept aside, a set is made only for a third
            if n == 1 then
                first = key
            elseif key == first or (seen and seen[key]) then
                return false, "key " .. key .. " appears twice"
            else
                seen = seen or {}
                seen[key] = true
            end
        end
    end
    return true
end

local valid_tracestate = _M.valid_tracestate

-- ---- hooks ----------------------------------------------------------------------------------

local function check_hook(name, fn)
    if fn ~= nil and type(fn) ~= "function" then
        error("qx.tracing." .. name .. ": expected a function or nil", 3)
    end
end

--- Sets the function qx gives each span it reports (nil: none, the default). Spans are
-- reported only for work that carries a traceparent. A span is a table { name, start_time,
-- end_time (Unix seconds), trace_id, parent_id (the traceparent's), span_id (new, 16 hex),
-- traceparent, tracestate?, attributes }; see docs/tracing.md for the names qx reports.
---@param fn fun(span: table)|nil
---@return function|nil previous the hook it replaces
function _M.on_span(fn)
    check_hook("on_span", fn)
    local previous = span_hook
    span_hook = fn
    return previous
end

--- Sets the function told of each traceparent or tracestate dropped as invalid, and of a span
-- hook that failed (nil: a line on stderr, the default).
---@param fn fun(message: string, info: table)|nil info { field, value, source, reason }
---@return function|nil previous the hook it replaces
function _M.on_warning(fn)
    check_hook("on_warning", fn)
    local previous = warning_hook
    warning_hook = fn
    return previous
end

local function warn(message, info)
    if warning_hook then
        if pcall(warning_hook, message, info) then return end
    end
    stderr:write("qx: ", message, "\n")
end

-- ---- what qx calls --------------------------------------------------------------------------

local function dropped(field, value, source, reason)
    local shown = tostring(value)
    if #shown > 80 then shown = sub(shown, 1, 80) .. "..." end
    warn(fmt("%s: dropped an invalid %s (%s): %q", source, field, reason, shown),
         { field = field, value = value, source = source, reason = reason })
end

-- The valid traceparent and tracestate of a pair given to source (a unit of work's context, a
-- message's headers): an invalid traceparent drops both (the tracestate means nothing without
-- it), an invalid tracestate drops itself; each drop is a warning. An empty tracestate is none.
function _M._context(traceparent, tracestate, source)
    if traceparent == nil then return nil, nil end
    local ok, reason = valid_traceparent(traceparent)
    if not ok then
        dropped("traceparent", traceparent, source, reason)
        return nil, nil
    end
    if tracestate == nil or tracestate == "" then return traceparent, nil end
    ok, reason = valid_tracestate(tracestate)
    if not ok then
        dropped("tracestate", tracestate, source, reason)
        return traceparent, nil
    end
    return traceparent, tracestate
end

-- Whether spans are wanted at all: the time is read only then.
function _M._spans_wanted()
    return span_hook ~= nil
end

_M._time = now

-- Reports a span that started at start (core.time()) and ends now, as a child of traceparent.
function _M._span(name, start, traceparent, tracestate, attributes)
    local hook = span_hook
    if hook == nil or traceparent == nil then return end
    local id = gsub(new_uuid(), "%-", "")
    local span = {
        name = name,
        start_time = start,
        end_time = now(),
        trace_id = sub(traceparent, 4, 35),
        parent_id = sub(traceparent, 37, 52),
        span_id = sub(id, 17, 32), -- the random half of a UUID v7
        traceparent = traceparent,
        tracestate = tracestate,
        attributes = attributes or {},
    }
    local ok, e = pcall(hook, span)
    if not ok then
        warn("the span hook failed on " .. name .. ": " .. tostring(e),
             { source = "on_span", reason = tostring(e) })
    end
end

return _M

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
local sub = string.sub
local gsub = string.gsub
local fmt = string.format
local now = core.time
local new_uuid = core.uuid
local stderr = io.stderr

local _M = { _VERSION = "0.1.0" }

local span_hook, warning_hook

-- ---- syntax ---------------------------------------------------------------------------------

-- The checks are the core's (src/core/trace.c): one pass in C, where Lua's pattern matcher
-- cost a tenth of a unit of work.
local traceparent_check, tracestate_check = core.traceparent_check, core.tracestate_check

--- Whether v is a valid W3C traceparent: version 00 is exactly 00-<32 hex>-<16 hex>-<2 hex>
-- (lowercase, trace id and parent id not all zeros); a later version (not ff) starts so and
-- ends there or goes on after a "-".
---@param v any
---@return boolean ok
---@return string? reason why not
function _M.valid_traceparent(v)
    if type(v) ~= "string" then return false, "not a string" end
    return traceparent_check(v)
end

local valid_traceparent = _M.valid_traceparent

--- Whether v is a valid W3C tracestate: comma-separated key=value list members (empty ones and
-- spaces and tabs around them allowed), at most 32, each key once.
---@param v any
---@return boolean ok
---@return string? reason why not
function _M.valid_tracestate(v)
    if type(v) ~= "string" then return false, "not a string" end
    return tracestate_check(v)
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

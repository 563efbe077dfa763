--- In-process event dispatcher: handlers run synchronously, in registration order, keyed by
-- event name ("*": every event).
--
--   local d = dispatcher.new()
--   d:on(Deposited, function(ev, uow) ... end)
--   d:publish(ev, uow)
--
-- A failing handler (raise, or nil/false, err) makes publish() raise; the unit of work rolls
-- back. See docs/model.md.
local event = require "qx.model.event"

local type = type
local error = error
local pcall = pcall
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local fmt = string.format
local debug_getinfo = debug.getinfo
local valid_name = event.valid_name
local is_event = event.is_event
local is_event_class = event.is_class
local class_of = event.class_of


local _M = { _VERSION = "0.1.0" }

--- An in-process dispatcher (qx.dispatcher): handlers by event name, called in order.
---@class qx.Dispatcher
local mt = { __index = _M }

local ANY = "*"


local function check_self(self, method)
    if getmetatable(self) ~= mt then
        error(method .. ": call as d:" .. method .. "(...)", 3)
    end
end


-- the key handlers are stored under: an event name or "*"
local function key_of(method, target, accept_instance)
    if target == ANY then
        return ANY
    end
    if is_event_class(target) then
        return target.event_name
    end
    if accept_instance then
        local class = class_of(target)
        if class ~= nil then
            return target.event_name
        end
    end
    if type(target) == "string" then
        local ok, why = valid_name(target)
        if not ok then
            error(fmt("%s: event name %q %s", method, target, why), 3)
        end
        return target
    end
    error(method .. ": expected an event name, an event class or '*', got " .. type(target), 3)
end


local function is_callable(f)
    if type(f) == "function" then
        return true
    end
    local m = getmetatable(f)
    return type(m) == "table" and type(m.__call) == "function"
end


--- A new in-process dispatcher (qx.dispatcher).
---@return qx.Dispatcher
function _M.new()
    return setmetatable({ _handlers = {}, _seq = 0 }, mt)
end


--- Registers handler(ev, ctx) for target; returns the dispatcher, for chaining.
---@param self qx.Dispatcher
---@param target any an event name, an event class, or "*" for every event
---@param handler fun(ev: table, ctx: table)
---@return qx.Dispatcher
function _M.on(self, target, handler)
    check_self(self, "on")
    local key = key_of("on", target, false)
    if not is_callable(handler) then
        error("on: handler must be a function, got " .. type(handler), 2)
    end
    local seq = self._seq + 1
    self._seq = seq
    local list = self._handlers[key]
    if list == nil then
        list = {}
        self._handlers[key] = list
    end
    list[#list + 1] = { fn = handler, seq = seq }
    return self
end


--- Unregisters handler for target, or every handler for target when handler is nil.
---@param self qx.Dispatcher
---@param target any
---@param handler function|nil
---@return integer removed
function _M.off(self, target, handler)
    check_self(self, "off")
    local key = key_of("off", target, false)
    if handler ~= nil and not is_callable(handler) then
        error("off: handler must be a function, got " .. type(handler), 2)
    end
    local list = self._handlers[key]
    if list == nil then
        return 0
    end
    local kept, removed = {}, 0
    for i = 1, #list do
        local entry = list[i]
        if handler == nil or entry.fn == handler then
            removed = removed + 1
        else
            kept[#kept + 1] = entry
        end
    end
    if #kept == 0 then
        self._handlers[key] = nil
    else
        self._handlers[key] = kept
    end
    return removed
end


-- merged list of entries for `key`, registration order; a new table
local function entries_for(self, key)
    local specific = self._handlers[key] or {}
    local any = key ~= ANY and self._handlers[ANY] or {}
    local out = {}
    local i, j = 1, 1
    local ns, na = #specific, #any
    while i <= ns or j <= na do
        local s, a = specific[i], any[j]
        if a == nil or (s ~= nil and s.seq < a.seq) then
            out[#out + 1] = s
            i = i + 1
        else
            out[#out + 1] = a
            j = j + 1
        end
    end
    return out
end


--- The handlers an event of that name reaches, in call order (a new table); target is an
-- event name, an event class, an event, or "*" (only the catch-all handlers).
---@param self qx.Dispatcher
---@param target any
---@return function[]
function _M.handlers_for(self, target)
    check_self(self, "handlers_for")
    local key = key_of("handlers_for", target, true)
    local entries = entries_for(self, key)
    local out = {}
    for i = 1, #entries do
        out[i] = entries[i].fn
    end
    return out
end


local function describe(fn)
    if type(fn) == "function" then
        local info = debug_getinfo(fn, "S")
        if info and info.short_src and info.linedefined and info.linedefined > 0 then
            return info.short_src .. ":" .. info.linedefined
        end
    end
    return tostring(fn)
end


local function fail(err, ev, index, fn)
    if type(err) == "string" then
        error(fmt("handler #%d (%s) for event %s failed: %s", index, describe(fn),
                  tostring(ev.event_name), err), 0)
    end
    error(err, 0)
end


--- Calls every handler for ev with (ev, ctx).
---@param self qx.Dispatcher
---@param ev table
---@param ctx table|nil
---@return integer ran
function _M.publish(self, ev, ctx)
    check_self(self, "publish")
    if not is_event(ev) then
        error("publish: expected an event made by an event class, got " .. type(ev), 2)
    end
    -- a snapshot: handlers added or removed while publishing take effect next time
    local entries = entries_for(self, ev.event_name)
    for i = 1, #entries do
        local fn = entries[i].fn
        local ok, r1, r2 = pcall(fn, ev, ctx)
        if not ok then
            fail(r1, ev, i, fn)
        end
        if not r1 and r2 ~= nil then
            fail(r2, ev, i, fn)
        end
    end
    return #entries
end


return _M

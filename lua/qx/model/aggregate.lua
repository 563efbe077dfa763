--- Aggregate classes: an instance is a plain table of its own fields whose metatable is its
-- class; recorded events are kept outside it (a weak-keyed side table), so mapping its fields
-- to a row never sees bookkeeping.
--
--   local User = aggregate.define("User")
--   function User:rename(name) self.name = name; self:record(Renamed{ name = name }) end
--
-- Variants (event-sourced aggregates) set Class.__record_hook. See docs/model.md.
local core = require "qx.core"
local event = require "qx.model.event"

local type = type
local pairs = pairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local rawget = rawget
local floor = math.floor
local tointeger = math.tointeger
local fmt = string.format
local find = string.find
local is_event = event.is_event


local _M = { _VERSION = "0.1.0" }


local MAX_NAME_LEN = 255
local MAX_VERSION = 2147483647    -- versions are PostgreSQL ints

-- class -> true
local classes = setmetatable({}, { __mode = "k" })
-- instance -> array of recorded, not yet pulled events
local pending = setmetatable({}, { __mode = "k" })


local function is_class(x)
    return type(x) == "table" and classes[x] == true
end

_M.is_class = is_class


-- (getmetatable of a non-table is nil or a metatable that is no aggregate class)
local function class_of(x)
    local mt = getmetatable(x)
    if mt ~= nil and classes[mt] then
        return mt
    end
    return nil
end

_M.class_of = class_of


--- Whether x is an instance of an aggregate class.
---@param x any
---@return boolean
function _M.is_aggregate(x)
    return class_of(x) ~= nil
end


--- The aggregate type name of an instance or a class; nil for anything else.
---@param x any
---@return string|nil
function _M.type_of(x)
    local class = is_class(x) and x or class_of(x)
    if class == nil then
        return nil
    end
    return rawget(class, "aggregate_type")
end


-- methods every instance has -------------------------------------------------

local base = {}


--- agg:record(ev): keeps an event to be drained at commit (event-sourced: applied too).
---@param self table the aggregate
---@param ev table
---@return table ev
function base.record(self, ev)
    local class = getmetatable(self) -- class_of(self), inline
    if class == nil or not classes[class] then
        error("record: call as aggregate:record(ev)", 2)
    end
    if not is_event(ev) then
        error("record: expected an event made by an event class, got " .. type(ev), 2)
    end

    -- (an event's own fields: its metatable's __index holds only its methods)
    if ev.aggregate_type == nil then
        ev.aggregate_type = class.aggregate_type
    end
    if ev.aggregate_id == nil then
        local id = rawget(self, "id")
        if id ~= nil and id ~= core.null then
            ev.aggregate_id = id
        end
    end

    local hook = class.__record_hook
    if hook ~= nil then
        hook(self, ev)
    end

    local list = pending[self]
    if list == nil then
        pending[self] = { ev } -- made with its first event: no growing from empty
    else
        list[#list + 1] = ev
    end
    return ev
end


--- agg:pull_events(): the recorded events, oldest first; the instance forgets them.
---@param self table the aggregate
---@return table events
function base.pull_events(self)
    local class = getmetatable(self) -- class_of(self), inline
    if class == nil or not classes[class] then
        error("pull_events: call as aggregate:pull_events()", 2)
    end
    local list = pending[self]
    pending[self] = nil
    return list or {}
end


--- agg:pending_events(): a copy of the recorded events, oldest first; the instance keeps them.
---@param self table the aggregate
---@return table events
function base.pending_events(self)
    if class_of(self) == nil then
        error("pending_events: call as aggregate:pending_events()", 2)
    end
    local list = pending[self]
    local out = {}
    if list ~= nil then
        for i = 1, #list do
            out[i] = list[i]
        end
    end
    return out
end


-- The recorded events of an instance as the instance keeps them, not a copy: for the event
-- store, which only reads them before it pulls them.
local NONE = setmetatable({}, { __newindex = function() error("read-only table", 2) end })

--- The recorded events as the instance keeps them, not a copy (for the event store, which only
-- reads them before it pulls them).
---@param self table the aggregate
---@return table events read-only
function _M.pending_list(self)
    return pending[self] or NONE
end


-- classes ----------------------------------------------------------------------

local function instance_tostring(self)
    local class = class_of(self)
    return fmt("%s(%s) v%s", class and tostring(class.aggregate_type) or "?",
               tostring(rawget(self, "id")), tostring(rawget(self, "version")))
end


local function valid_aggregate_type(name)
    if type(name) ~= "string" then
        return false, "must be a string, got " .. type(name)
    end
    if name == "" then
        return false, "must not be empty"
    end
    if #name > MAX_NAME_LEN then
        return false, "must be at most " .. MAX_NAME_LEN .. " bytes"
    end
    -- dot-separated identifiers: "User", "billing.Account"
    if find(name, "[^A-Za-z0-9_%.]") or find(name, "^[%d%.]") or find(name, "%.$")
       or find(name, "%.%.") or find(name, "%.%d") then
        return false, "must be identifiers joined by '.' (letters, digits, '_')"
    end
    return true
end


-- raises at level 3: the caller of Class.new / Class(...)
local function construct(class, fields)
    if fields == nil then
        fields = {}
    elseif is_class(fields) then
        error(class.aggregate_type .. ": call as Class.new{...} or Class{...}, not Class:new{...}",
              3)
    elseif type(fields) ~= "table" then
        error(class.aggregate_type .. ": fields must be a table, got " .. type(fields), 3)
    end

    local self = {}
    for k, v in pairs(fields) do
        if type(k) == "string" and type(class[k]) == "function" then
            error(class.aggregate_type .. ": field '" .. k .. "' would hide the method "
                  .. class.aggregate_type .. ":" .. k .. "()", 3)
        end
        self[k] = v
    end

    local id = self.id
    if id == nil or id == core.null then
        self.id = core.uuid()
    elseif type(id) ~= "string" and type(id) ~= "number" then
        error(class.aggregate_type .. ": id must be a string or a number, got " .. type(id), 3)
    end

    local version = self.version
    if version == nil then
        self.version = 0
    else
        if type(version) ~= "number" or version ~= floor(version) or version < 0
           or version > MAX_VERSION then
            error(class.aggregate_type .. ": version must be a non-negative integer, got "
                  .. tostring(version), 3)
        end
        if tointeger then
            self.version = tointeger(version)
        end
    end

    return setmetatable(self, class)
end


local class_mt = {
    __index = base,
    __call = function(class, fields)    -- Class{...} is Class.new{...}
        local self = construct(class, fields)
        return self
    end,
    __tostring = function(class)
        return "aggregate " .. tostring(rawget(class, "aggregate_type"))
    end,
}


--- An aggregate class (qx.aggregate): Class.new{ fields } or Class{ fields } make instances.
---@param name string the aggregate type
---@return table class
function _M.define(name)
    local ok, why = valid_aggregate_type(name)
    if not ok then
        error("aggregate name " .. (type(name) == "string" and fmt("%q ", name) or "")
              .. why, 2)
    end

    local class = {
        aggregate_type = name,
        __tostring = instance_tostring,
    }
    class.__index = class

    -- Class.new{...}: dot call, no self
    class.new = function(fields)
        local self = construct(class, fields)
        return self
    end

    classes[class] = true
    return setmetatable(class, class_mt)
end


return _M

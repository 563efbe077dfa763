--- Event-sourced aggregates: the state of an instance is the fold of its events.
--
--   local Account = qx.event_sourced("Account")             -- or ("Account", { strict = true })
--   Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
--   function Account:deposit(n) self:record(Deposited{ amount = n }) end
--   local acc = Account.new(id); acc:deposit(10)    -- applied at once, and buffered
--
-- Handlers are keyed by event name; integration events may be recorded but have no handler
-- (replay could not rebuild their state). Versions, strict mode, snapshots: docs/model.md.
local aggregate = require "qx.model.aggregate"
local event = require "qx.model.event"
local qx_error = require "qx.error"
local options = require "qx.options"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local rawget = rawget
local floor = math.floor
local fmt = string.format
local gsub = string.gsub
local pcall = pcall

local _M = { _VERSION = "0.1.0" }

local MAX_VERSION = 2147483647

-- class -> { handlers = { [event_name] = { fn =, class = } }, strict =, snapshot_version = }
local specs = setmetatable({}, { __mode = "k" })

-- methods shared by every event-sourced class, looked up after the class's own fields and
-- before the aggregate base methods (record, pull_events, pending_events)
local methods = {}


local function spec_of_instance(self)
    local class = aggregate.class_of(self)
    return class and specs[class], class
end


--- The class an instance or a class belongs to, when it is event-sourced.
---@param x any
---@return table|nil class
function _M.class_of(x)
    if specs[x] then
        return x
    end
    -- aggregate.class_of(x), inline: every key of specs is an aggregate class
    local mt = getmetatable(x)
    if mt ~= nil and specs[mt] then
        return mt
    end
    return nil
end


--- Whether x is an event-sourced class.
---@param x any
---@return boolean
function _M.is_class(x)
    return type(x) == "table" and specs[x] ~= nil
end


--- What the event store needs to know about a class.
---@param class table
---@return table
function _M.spec(class)
    return specs[class]
end


--- The event classes the handlers of an event-sourced class were given (each once); without a
-- class, those of every event-sourced class alive: what the event store checks when it is made.
---@param class table|nil
---@return table classes
function _M.event_classes(class)
    local out, seen = {}, {}
    for c, spec in pairs(specs) do
        if class == nil or c == class then
            for _, h in pairs(spec.handlers) do
                if h.class and not seen[h.class] then
                    seen[h.class] = true
                    out[#out + 1] = h.class
                end
            end
        end
    end
    return out
end


local function event_key(method, target)
    if event.is_class(target) then
        return target.event_name, target
    end
    if type(target) == "string" then
        local ok, why = event.valid_name(target)
        if not ok then
            error(fmt("%s: event name %q %s", method, target, why), 3)
        end
        return target, nil
    end
    error(method .. ": expected an event class or an event name, got " .. type(target), 3)
end


--- Class:on(EventClass | "event.name", fn(self, ev)): the handler that applies an event.
---@param class table
---@param target any an event class or name
---@param fn fun(self: table, ev: table)
---@return table class
function methods.on(class, target, fn)
    local spec = specs[class]
    if spec == nil then
        error("on: call as Class:on(EventClass, handler)", 2)
    end
    local name, ev_class = event_key("on", target)
    if ev_class and ev_class.integration then
        error("on: " .. name .. " is an integration event; it is not stored in the aggregate's "
              .. "stream, so state it changed could not be rebuilt - record a domain event for "
              .. "the change", 2)
    end
    if type(fn) ~= "function" then
        error("on: handler must be a function, got " .. type(fn), 2)
    end
    -- an event class answers to its old names too (aliases): their stored events are its own
    local names = { name }
    for _, alias in ipairs(ev_class and ev_class.aliases or {}) do names[#names + 1] = alias end
    for _, n in ipairs(names) do
        if spec.handlers[n] then
            error("on: " .. class.aggregate_type .. " already has a handler for " .. n, 2)
        end
    end
    local h = { fn = fn, class = ev_class }
    for _, n in ipairs(names) do spec.handlers[n] = h end
    return class
end


--- Class:handles(EventClass | "event.name").
---@param class table
---@param target any
---@return boolean
function methods.handles(class, target)
    local spec = specs[class]
    if spec == nil then
        error("handles: call as Class:handles(EventClass)", 2)
    end
    local name = event_key("handles", target)
    return spec.handlers[name] ~= nil
end


local function is_integration(ev)
    local class = event.class_of(ev)
    return class ~= nil and class.integration
end


-- Applies one event. On replay, `stored` is true: version moves and unknown events follow the
-- replay rules. Returns true, or nil and a message.
local function apply(self, spec, ev, stored)
    local name = rawget(ev, "event_name")
    if type(name) ~= "string" then
        return nil, "event without an event_name"
    end
    local h = spec.handlers[name]
    if h then
        h.fn(self, ev)
    elseif spec.strict and (stored or not is_integration(ev)) then
        return nil, fmt("%s has no handler for %s (strict)", tostring(getmetatable(self)
                        .aggregate_type), name)
    end
    if stored then
        local v = rawget(self, "version") + 1
        if v > MAX_VERSION then
            return nil, "version would pass " .. MAX_VERSION
        end
        self.version = v
    end
    return true
end


--- Internal replay used by the event store: applies each event without buffering, checking
-- that stored sequences follow the version.
---@param self table the instance
---@param events table
---@param sequences table
---@return true|nil ok
---@return qx.Error? err invalid
function _M.replay_stored(self, events, sequences)
    local spec = spec_of_instance(self)
    for i = 1, #events do
        local ev = events[i]
        local seq = sequences and sequences[i]
        if seq ~= nil and seq ~= rawget(self, "version") + 1 then
            return nil, qx_error.new("invalid", fmt("%s: stored sequence %s does not follow "
                .. "version %s", tostring(self), tostring(seq), tostring(rawget(self, "version"))))
        end
        local ok, why = apply(self, spec, ev, true)
        if not ok then
            return nil, qx_error.new("invalid", tostring(self) .. ": " .. why)
        end
    end
    return true
end


--- instance:replay(events): applies without buffering; version + 1 per event. Raises on an
-- event that is not an event table, or (strict) one without a handler.
---@param self table the instance
---@param events table
---@return table instance
function methods.replay(self, events)
    local spec = spec_of_instance(self)
    if spec == nil then
        error("replay: call as instance:replay(events)", 2)
    end
    if type(events) ~= "table" then
        error("replay: expected a list of events, got " .. type(events), 2)
    end
    for i = 1, #events do
        local ev = events[i]
        if type(ev) ~= "table" then
            error("replay: event " .. i .. " is a " .. type(ev) .. ", not an event", 2)
        end
        local ok, why = apply(self, spec, ev, true)
        if not ok then
            error("replay: event " .. i .. ": " .. why, 2)
        end
    end
    return self
end


--- instance:snapshot(): the state (default: every field but id and version).
---@param self table the instance
---@return table state
function methods.snapshot(self)
    local state = {}
    for k, v in pairs(self) do
        if k ~= "id" and k ~= "version" then
            state[k] = v
        end
    end
    return state
end


--- instance:restore(state): puts a snapshot's state back (default: copies the fields).
---@param self table the instance
---@param state table
function methods.restore(self, state)
    for k, v in pairs(state) do
        if k ~= "id" and k ~= "version" then
            self[k] = v
        end
    end
end


local function strip_position(msg)
    return (gsub(tostring(msg), "^[^:\n]*:%d+: ", ""))
end


-- Class.new(id | fields): an id alone is the usual way to start a stream. The id is a string
-- (the event store takes a uuid): a number would be stored as its text and load back as
-- another value. Returns a function that builds an instance: ok, instance | false, message.
local function make_builder(construct_new, class)
    return function(x)
        local tx = type(x)
        if tx == "string" then
            -- an id alone, the usual start of a stream: nothing to check but its type, so the
            -- instance is made here rather than through the general constructor
            return true, setmetatable({ id = x, version = 0 }, class)
        end
        if tx == "number" then
            return false, class.aggregate_type .. ": id must be a string, got number"
        end
        local ok, inst = pcall(construct_new, x)
        if not ok then
            return false, strip_position(inst)
        end
        if type(rawget(inst, "id")) ~= "string" then
            return false, class.aggregate_type .. ": id must be a string, got "
                          .. type(rawget(inst, "id"))
        end
        return true, inst
    end
end


-- Class.from_events(id, events) -> instance at version #events
local function make_from_events(class)
    return function(id, events)
        if type(events) ~= "table" then
            error("from_events: expected a list of events, got " .. type(events), 2)
        end
        local self = class.new(id)
        local ok, e = pcall(methods.replay, self, events)
        if not ok then
            error(strip_position(e), 2)
        end
        return self
    end
end


local DEFINE_OPTS = { "strict", "snapshot_version" }


--- An event-sourced aggregate class (qx.event_sourced).
---@param name string
---@param opts table|nil { strict = false, snapshot_version = n }
---@return table class
function _M.define(name, opts)
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error("event_sourced: options must be a table, got " .. type(opts), 2)
    end
    options.check(opts, DEFINE_OPTS, "event_sourced")
    if opts.strict ~= nil and type(opts.strict) ~= "boolean" then
        error("event_sourced: strict must be a boolean", 2)
    end
    local sv = opts.snapshot_version
    if sv ~= nil and (type(sv) ~= "number" or sv ~= floor(sv) or sv < 1 or sv > MAX_VERSION) then
        error("event_sourced: snapshot_version must be a positive integer", 2)
    end

    local ok, class = pcall(aggregate.define, name)
    if not ok then
        error(strip_position(class), 2)
    end
    local base_mt = getmetatable(class)
    local base = base_mt.__index

    local spec = {
        handlers = {},
        strict = opts.strict == true,
        snapshot_version = sv or 1,
    }
    specs[class] = spec
    -- record() applies at once; the hook runs before the event is buffered, so a handler that
    -- raises leaves nothing buffered
    class.__record_hook = function(self, ev)
        local ok2, why = apply(self, spec, ev, false)
        if not ok2 then
            error("record: " .. why, 0)
        end
    end

    local build = make_builder(class.new, class)
    class.new = function(x)
        local tx = type(x)
        if tx == "string" then -- an id alone: what build does, without the call
            return setmetatable({ id = x, version = 0 }, class)
        end
        local ok2, inst = build(x)
        if not ok2 then
            error(inst, 2)
        end
        return inst
    end
    class.from_events = make_from_events(class)

    -- the event-sourced methods, then the aggregate's: a chain of tables, so that a method
    -- call looks it up without calling a function
    local index = {}
    for k, m in pairs(methods) do index[k] = m end
    setmetatable(index, { __index = base })
    local mt = {
        __index = index,
        __call = function(_, x)
            local ok2, inst = build(x)
            if not ok2 then
                error(inst, 2)
            end
            return inst
        end,
        __tostring = function(cls)
            return "event-sourced aggregate " .. tostring(rawget(cls, "aggregate_type"))
        end,
    }
    return setmetatable(class, mt)
end


return _M

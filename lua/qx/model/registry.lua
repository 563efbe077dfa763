--- qx.registry: which event class a name and version on the wire stand for.
--
--   local reg = qx.registry{ Deposited, Withdrawn }
--   local ev, err = reg:decode(json_text)                 -- a message body -> an event
--
-- Keys are name + version: the same class again is a no-op, another class under a taken key
-- raises (what a message turns into must not depend on registration order); an unknown name
-- or version at run time is nil, { code = "not_found" }. See docs/model.md.
local core = require "qx.core"
local err = require "qx.error"
local event = require "qx.model.event"
local options = require "qx.options"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local tonumber = tonumber
local select = select
local setmetatable = setmetatable
local getmetatable = getmetatable
local floor = math.floor
local fmt = string.format
local sort = table.sort
local is_class = event.is_class
local decode = core.json_decode
local null = core.null

local _M = { _VERSION = "0.1.0" }

--- Event name + version -> class, for consumers (qx.registry).
---@class qx.Registry
local Registry = {}
Registry.__index = Registry
_M.Registry = Registry

local function check_self(self, method)
    if getmetatable(self) ~= Registry then
        error("registry:" .. method .. ": call as reg:" .. method .. "(...)", 3)
    end
end

-- name -> { [version] = class }, plus the highest version per name
local function add(self, class)
    if not is_class(class) then
        error("registry:register: expected an event class (qx.event / qx.integration_event), got "
              .. type(class), 3)
    end
    local name, version = class.event_name, class.event_version
    local versions = self._by_name[name]
    if versions == nil then
        versions = {}
        self._by_name[name] = versions
        self._count_names = self._count_names + 1
    end
    local have = versions[version]
    if have == class then return class end
    if have ~= nil then
        error(fmt("registry:register: %s v%d is already registered to another class",
                  name, version), 3)
    end
    versions[version] = class
    local latest = self._latest[name]
    if latest == nil or version > latest then self._latest[name] = version end
    self._count = self._count + 1
    return class
end

--- A new registry holding the classes of the list (qx.registry).
---@param classes table|nil event classes
---@return qx.Registry
function _M.new(classes)
    if classes ~= nil and type(classes) ~= "table" then
        error("qx.registry: expected a list of event classes, got " .. type(classes), 2)
    end
    local self = setmetatable({ _by_name = {}, _latest = {}, _count = 0, _count_names = 0 },
                              Registry)
    if classes ~= nil then
        if is_class(classes) then
            add(self, classes)
        else
            for _, class in ipairs(classes) do add(self, class) end
        end
    end
    return self
end

--- Registers classes; returns the first (so `local E = reg:register(qx.event(...))` reads).
---@param ... table event classes
---@return table class
function Registry:register(...)
    check_self(self, "register")
    local n = select("#", ...)
    if n == 0 then error("registry:register: expected an event class", 2) end
    local first = ...
    for i = 1, n do add(self, (select(i, ...))) end
    return first
end

local function check_version(version)
    if version == nil then return nil end
    if type(version) == "string" then version = tonumber(version) end
    if type(version) ~= "number" or version ~= floor(version) or version < 1 then
        return false
    end
    return version
end

--- Without a version: the highest version registered under the name.
---@param name string
---@param version integer|nil
---@return table|nil class
---@return qx.Error? err not_found
function Registry:get(name, version)
    check_self(self, "get")
    if type(name) ~= "string" then
        return nil, err.new("invalid", "event name must be a string, got " .. type(name))
    end
    local v = check_version(version)
    if v == false then
        return nil, err.new("invalid", fmt("event %s: version must be a positive integer, got %s",
                                           name, tostring(version)))
    end
    local versions = self._by_name[name]
    if versions == nil then
        return nil, err.new("not_found", fmt("unknown event %q", name), { event_name = name })
    end
    if v == nil then v = self._latest[name] end
    local class = versions[v]
    if class == nil then
        return nil, err.new("not_found",
                            fmt("unknown version %d of event %q (registered up to v%d)",
                                v, name, self._latest[name]),
                            { event_name = name, event_version = v })
    end
    return class
end

--- The highest version registered under the name.
---@param name string
---@return table|nil class the highest version
---@return qx.Error? err not_found
function Registry:latest(name)
    check_self(self, "latest")
    return self:get(name)
end

--- Whether the name (at that version) is registered.
---@param name string
---@param version integer|nil
---@return boolean
function Registry:has(name, version)
    check_self(self, "has")
    return (self:get(name, version)) ~= nil
end

--- The registered event names.
---@return string[] names sorted
function Registry:names()
    check_self(self, "names")
    local out = {}
    for name in pairs(self._by_name) do out[#out + 1] = name end
    sort(out)
    return out
end

--- The versions registered under a name.
---@param name string
---@return integer[] versions sorted (empty when none)
function Registry:versions(name)
    check_self(self, "versions")
    local out = {}
    for v in pairs(self._by_name[name] or {}) do out[#out + 1] = v end
    sort(out)
    return out
end

--- How many classes and names are registered.
---@return integer classes
---@return integer names
function Registry:count()
    check_self(self, "count")
    return self._count, self._count_names
end

--- The class is looked up by the envelope's event_name and event_version. With latest = true an
-- envelope whose version is not registered is rebuilt with the highest registered version of
-- its name (the event keeps the version it was published with).
---@param env table a decoded envelope
---@param opts table|nil { latest = false }
---@return table|nil event
---@return qx.Error? err not_found, invalid
function Registry:from_envelope(env, opts)
    check_self(self, "from_envelope")
    if opts ~= nil and type(opts) ~= "table" then
        error("registry:from_envelope: options must be a table", 2)
    end
    options.check(opts, { "latest" }, "registry:from_envelope")
    if type(env) ~= "table" then
        return nil, err.new("invalid", "envelope must be a JSON object, got " .. type(env))
    end
    local name, version = env.event_name, env.event_version
    if type(name) ~= "string" or name == "" then
        return nil, err.new("invalid", "envelope has no event_name")
    end
    if version == nil or version == null then
        return nil, err.new("invalid", fmt("envelope of %s has no event_version", name))
    end
    local class, e = self:get(name, version)
    if not class then
        if e.code == "not_found" and e.event_version ~= nil and opts and opts.latest then
            class, e = self:get(name)
        end
        if not class then return nil, e end
    end
    return event.from_envelope(class, env)
end

--- An event from a JSON envelope (e.g. a message body).
---@param text string
---@param opts table|nil as from_envelope
---@return table|nil event
---@return qx.Error? err invalid, not_found
function Registry:decode(text, opts)
    check_self(self, "decode")
    if type(text) ~= "string" then
        return nil, err.new("invalid", "expected the envelope as JSON text, got " .. type(text))
    end
    local env, jerr = decode(text)
    if env == nil then
        return nil, err.new("invalid", "envelope is not JSON: " .. tostring(jerr.message))
    end
    return self:from_envelope(env, opts)
end

--- A short description, for logs.
---@return string
function Registry:__tostring()
    return fmt("qx.registry (%d classes, %d names)", self._count, self._count_names)
end

setmetatable(_M, { __call = function(_, classes) return _M.new(classes) end })

return _M

-- What `qx events` and `qx snapshots` learn from the application: --require MODULE names a Lua
-- module (found on LUA_PATH) that returns its event classes, event-sourced classes and
-- registries, as a table of them or of lists of them (a registry alone will do too).
local event = require "qx.model.event"
local es_class = require "qx.model.event_sourced"
local registry_mod = require "qx.model.registry"

local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local tostring = tostring
local getmetatable = getmetatable

local _M = {}

local function is_registry(x)
    return getmetatable(x) == registry_mod.Registry
end

-- -> { events = { class, ... }, aggregates = { class, ... } } | nil, message
function _M.load(module)
    if type(module) ~= "string" or module == "" then
        return nil, "give the application's module of classes with --require MODULE"
    end
    local ok, got = pcall(require, module)
    if not ok then
        return nil, "--require " .. module .. ": " .. tostring(got)
    end
    local out = { events = {}, aggregates = {} }
    local seen = {}
    local function take(x, depth)
        if type(x) ~= "table" or seen[x] then return end
        seen[x] = true
        if event.is_class(x) then
            out.events[#out.events + 1] = x
        elseif es_class.is_class(x) then
            out.aggregates[#out.aggregates + 1] = x
            for _, c in ipairs(es_class.event_classes(x)) do take(c, depth) end
        elseif is_registry(x) then
            for _, c in ipairs(x:classes()) do take(c, depth) end
        elseif depth < 2 then
            for _, v in pairs(x) do take(v, depth + 1) end
        end
    end
    take(got, 0)
    if #out.events == 0 and #out.aggregates == 0 then
        return nil, "--require " .. module .. ": the module returned no event classes, "
                    .. "event-sourced classes or registries"
    end
    return out
end

-- A registry of every event class found -> registry | nil, message (two classes under one name
-- and version, or a gap in an upcaster chain)
function _M.registry(app)
    local ok, reg = pcall(registry_mod.new, app.events)
    if not ok then return nil, tostring(reg):gsub("^[^:\n]*:%d+: ", "") end
    local chained, why = reg:check_chains()
    if not chained then return nil, why end
    return reg
end

return _M

-- Internal to qx.projection: what a projection's options define, checked (a bad option raises
-- at the application's call): its name and checkpoint key, handlers by event name (aliases of a
-- class included), the aggregate types it reads, its batch size, progress reporting, its
-- version and the cap on rebuilds. The runner (runner.lua) keeps what this returns.
local options = require "qx.options"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"
local registry_mod = require "qx.model.registry"
local slots = require "qx.store.projection.rebuild_slots"
local versions = require "qx.store.projection.versions"

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local floor = math.floor
local fmt = string.format
local sort = table.sort
local stderr = io.stderr
local raise = options.raise

local _M = {}

local MAX_NAME = 255
local MAX_BATCH = 100000

local function default_progress(info)
    stderr:write(fmt("qx projection %s%s: %d%s events applied in %.1f s (%.0f/s), at position "
        .. "%s%s\n", info.name, info.version and (" version " .. info.version) or "", info.applied,
        info.total and ("/" .. info.total) or "", info.elapsed_seconds, info.rate,
        tostring(info.global_position),
        info.eta_seconds and fmt(", about %.0f s to go", info.eta_seconds) or ""))
end

local OPTS = { name = true, db = true, handlers = true, aggregate_type = true, batch_size = true,
               reset = true, on_progress = true, progress_interval_seconds = true,
               version = true, tables = true, setup = true, max_rebuilds = true,
               on_forget = true }

-- opts -> { name, key, version, tables, setup, max_rebuilds, handlers, classes, types,
-- categories, batch_size, on_progress, progress_interval }; raises on a bad option
function _M.parse(opts)
    if type(opts) ~= "table" then
        raise("qx.projection: expected a table of options")
    end
    options.check(opts, OPTS, "qx.projection")
    local name = opts.name
    if type(name) ~= "string" or name == "" or #name > MAX_NAME then
        raise("qx.projection: name must be a non-empty string of at most " .. MAX_NAME
              .. " bytes")
    end
    if type(opts.db) ~= "table" or not opts.db.pool then
        raise("qx.projection: db must come from qx.connect")
    end
    if type(opts.handlers) ~= "table" then
        raise("qx.projection: handlers must be a table { [event name or class] = fn(ev, uow) }")
    end
    local handlers, names, classes = {}, {}, {}
    for k, fn in pairs(opts.handlers) do
        local ename
        if event.is_class(k) then
            ename = k.event_name
            registry_mod.check_chain(k, "qx.projection")
        elseif type(k) == "string" and event.valid_name(k) then
            ename = k
        else
            raise("qx.projection: handler keys must be event names or event classes, got "
                  .. (type(k) == "string" and fmt("%q", k) or type(k)))
        end
        if type(fn) ~= "function" then
            raise("qx.projection: the handler for " .. ename .. " must be a function")
        end
        if handlers[ename] then
            raise("qx.projection: two handlers for " .. ename)
        end
        handlers[ename] = fn
        names[#names + 1] = ename
        -- a class also reads the events stored under its old names, as itself
        if event.is_class(k) then
            classes[ename] = k
            for _, alias in ipairs(k.aliases) do
                if handlers[alias] then
                    raise("qx.projection: two handlers for " .. alias .. " (an alias of "
                          .. ename .. ")")
                end
                handlers[alias], classes[alias] = fn, k
                names[#names + 1] = alias
            end
        end
    end
    if #names == 0 then
        raise("qx.projection: handlers is empty")
    end
    sort(names)
    local cats
    local at = opts.aggregate_type
    if at ~= nil then
        local list = (type(at) == "table" and not aggregate.is_class(at)) and at or { at }
        cats = {}
        for i, v in ipairs(list) do
            if aggregate.is_class(v) then
                v = v.aggregate_type
            end
            if type(v) ~= "string" then
                raise("qx.projection: aggregate_type must be names or aggregate classes")
            end
            cats[i] = v
        end
        if #cats == 0 then
            raise("qx.projection: aggregate_type is empty")
        end
    end
    local batch = opts.batch_size or 500
    if type(batch) ~= "number" or batch ~= floor(batch) or batch < 1 or batch > MAX_BATCH then
        raise("qx.projection: batch_size must be an integer between 1 and " .. MAX_BATCH)
    end
    if opts.reset ~= nil and type(opts.reset) ~= "function" then
        raise("qx.projection: reset must be a function(uow)")
    end
    if opts.on_forget ~= nil and type(opts.on_forget) ~= "function" then
        raise("qx.projection: on_forget must be a function(subject_id, uow, p)")
    end
    local progress = opts.on_progress
    if progress == nil then
        progress = default_progress
    elseif progress ~= false and type(progress) ~= "function" then
        raise("qx.projection: on_progress must be a function or false")
    end
    local every = opts.progress_interval_seconds or 5
    if type(every) ~= "number" or every <= 0 then
        raise("qx.projection: progress_interval_seconds must be a positive number")
    end
    local versioned, verr = versions._parse(opts)
    if not versioned then
        raise("qx.projection: " .. verr)
    end
    local cap, cerr = slots.cap(opts)
    if not cap then
        raise(cerr)
    end
    return {
        name = name, key = versioned.key or name, version = versioned.version,
        tables = versioned.tables, setup = versioned.setup, max_rebuilds = cap,
        handlers = handlers, classes = classes, types = names, categories = cats,
        batch_size = batch, on_progress = progress or nil, progress_interval = every,
    }
end

return _M

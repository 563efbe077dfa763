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

-- ---- evolution: a stored name and version read as the class that holds the name now ---------
-- The one place stored data meets upcasters and aliases: the event store, projections and the
-- consumer all come through here. See docs/evolution.md.

local check_chain = event.check_chain
local RESERVED = event.RESERVED
local byte = string.byte

-- whether k is a payload field's key: a string, not metadata, routing or a method, no "_"
local function is_payload_key(k)
    return type(k) == "string" and not RESERVED[k] and byte(k, 1) ~= 95 -- "_"
end

-- The fields a stored record holds besides its payload (the envelope's metadata, the routing
-- fields, the store's positions). An upcast record has them taken out while the steps run on
-- what is left, its payload, and put back after: no copy of the payload, no second table.
local HELD = { "event_id", "event_name", "event_version", "occurred_at", "correlation_id",
               "causation_id", "tenant_id", "actor_id", "aggregate_type", "aggregate_id",
               "_sequence", "_global_position", "_tx_id" }
local NHELD = #HELD

-- the meta an upcaster gets: the stored envelope's fields (the first ten held ones)
local function meta_of(t)
    return { event_id = t.event_id, event_name = t.event_name, event_version = t.event_version,
             occurred_at = t.occurred_at, correlation_id = t.correlation_id,
             causation_id = t.causation_id, tenant_id = t.tenant_id, actor_id = t.actor_id,
             aggregate_type = t.aggregate_type, aggregate_id = t.aggregate_id }
end


-- What the class makes of a stored version: nil, it reads it as it is (its own version, or a
-- class without upcasters); true, upcasters take it there; false and why not.
local function path_of(class, version)
    local cv = class.event_version
    if version == cv then return nil end
    if type(version) ~= "number" then
        return false, fmt("stored version %s is not a number", tostring(version))
    end
    if version > cv then
        return false, fmt("stored v%s is newer than the class (v%d): written by a newer deploy",
                          tostring(version), cv)
    end
    local first = class.__first_step
    if first == nil then return nil end
    if version < first then
        return false, fmt("no upcaster v%d -> v%d (the chain starts at v%d)", version,
                          version + 1, first)
    end
    return true
end

local function unreadable(class, meta, why)
    return err.new("invalid", fmt("event %s %s (stored as %s v%s): %s", class.event_name,
                                  tostring(meta.event_id), tostring(meta.event_name),
                                  tostring(meta.event_version), why),
                   { event_id = meta.event_id, event_name = meta.event_name,
                     event_version = meta.event_version })
end

-- A field of out that is not a payload field's, or nil: all of them (an envelope's payload), or
-- only the held ones (a record's, whose other fields the steps saw as they were stored).
local function foreign_field(out, held_only)
    if held_only then
        for i = 1, NHELD do
            if out[HELD[i]] ~= nil then return HELD[i] end
        end
        return nil
    end
    for k in pairs(out) do
        if not is_payload_key(k) then return k end
    end
    return nil
end

-- Why a step's result (pcall's ok, res) is refused: raised, nothing, not a table, or a field
-- that is not a payload field's (held_only: a record's held fields; else any).
local function failure(v, ok, res, held_only)
    local why
    if not ok then
        why = "raised: " .. tostring(type(res) == "table" and res.message or res)
    elseif res == nil then
        why = "returned nothing"
    elseif type(res) ~= "table" then
        why = "returned a " .. type(res) .. ", not a payload table"
    else
        why = "returned the field " .. tostring(foreign_field(res, held_only))
              .. ", which is not a payload field"
    end
    return fmt("upcaster v%d -> v%d %s", v, v + 1, why)
end

-- Runs the steps from version up to the class's on payload (meta: nil when no step takes it).
-- -> the payload | nil, the step, why
local function upcast(class, version, payload, meta)
    local steps = class.__upcasters
    for v = version, class.event_version - 1 do
        local ok, out = pcall(steps[v], payload, meta)
        if not ok or type(out) ~= "table" or foreign_field(out, false) ~= nil then
            return nil, v, failure(v, ok, out, false)
        end
        payload = out
    end
    return payload
end

--- Internal: a stored record (metadata and payload side by side, as the event store keeps
-- them) read as `class`: renamed from an alias, upcast to the class's version. The record is
-- changed in place (a step that hands back a new table gets the record's other fields put into
-- it), and is to be dropped when this fails. -> record | nil, err invalid (no path, a newer
-- version, a bad step: err.step, err.event_id)
---@param class table the event class that reads the record's name
---@param rec table
---@return table|nil rec
---@return qx.Error? err invalid
function _M.evolve_record(class, rec)
    local version, cv = rec.event_version, class.event_version
    if version == nil or version == null or version == cv then
        rec.event_name = class.event_name
        return rec
    end
    local first = class.__first_step
    if first == nil or type(version) ~= "number" or version < first or version > cv then
        local how, why = path_of(class, version)
        if how == false then return nil, unreadable(class, rec, why) end
        rec.event_name = class.event_name -- a class without steps reads it as it is
        return rec
    end
    -- the held fields in locals (no table: this runs for every upcast event)
    local id, name, at, corr, cause = rec.event_id, rec.event_name, rec.occurred_at,
                                      rec.correlation_id, rec.causation_id
    local tenant, actor, atype, aid = rec.tenant_id, rec.actor_id, rec.aggregate_type,
                                      rec.aggregate_id
    local seq, pos, tx = rec._sequence, rec._global_position, rec._tx_id
    for i = 1, NHELD do rec[HELD[i]] = nil end
    local meta
    if class.__any_meta then
        meta = { event_id = id, event_name = name, event_version = version, occurred_at = at,
                 correlation_id = corr, causation_id = cause, tenant_id = tenant,
                 actor_id = actor, aggregate_type = atype, aggregate_id = aid }
    end
    local steps, out = class.__upcasters, rec
    for v = version, cv - 1 do
        local ok, res = pcall(steps[v], out, meta)
        -- the usual case in one test; anything else is sorted out by upcast() for its message
        if not (ok and type(res) == "table" and res.event_id == nil and res.event_name == nil
                and res.event_version == nil and res.occurred_at == nil
                and res.correlation_id == nil and res.causation_id == nil
                and res.tenant_id == nil and res.actor_id == nil and res.aggregate_type == nil
                and res.aggregate_id == nil and res._sequence == nil
                and res._global_position == nil and res._tx_id == nil) then
            local why = failure(v, ok, res, true)
            local e = unreadable(class, { event_id = id, event_name = name,
                                          event_version = version }, why)
            e.step = v
            return nil, e
        end
        out = res
    end
    if out ~= rec then -- a table the step made, which it may keep (a constant): copied
        local own = {}
        for k, v in pairs(out) do own[k] = v end
        out = own
    end
    out.event_id, out.event_name, out.event_version = id, class.event_name, cv
    out.occurred_at, out.correlation_id, out.causation_id = at, corr, cause
    out.tenant_id, out.actor_id, out.aggregate_type, out.aggregate_id = tenant, actor, atype, aid
    out._sequence, out._global_position, out._tx_id = seq, pos, tx
    return out
end

-- A decoded envelope read as `class` -> a new envelope of the class's name and version.
local function evolve_envelope(class, env, version)
    local how, why = path_of(class, version)
    if how == false then return nil, unreadable(class, env, why) end
    local out = {}
    for k, v in pairs(env) do out[k] = v end
    out.event_name = class.event_name
    if how == nil or type(env.payload) ~= "table" then return out end
    local payload = {}
    for k, v in pairs(env.payload) do payload[k] = v end
    local p, step
    p, step, why = upcast(class, version, payload, class.__any_meta and meta_of(env) or nil)
    if not p then
        local e = unreadable(class, env, why)
        e.step = step
        return nil, e
    end
    out.payload = p
    out.event_version = class.event_version
    return out
end

--- Internal: whether `class` reads events stored at `version` (store:check): true, or false
-- and why not.
---@param class table
---@param version integer|nil the stored version (nil: the class's own)
---@return boolean ok
---@return string? why
function _M.readable(class, version)
    if version == nil or version == null then return true end
    local how, why = path_of(class, version)
    if how == false then return false, why end
    return true
end

--- Raises (at the caller's caller) when a class's upcasters leave a gap.
---@param class table
---@param who string what is being made, for the message
function _M.check_chain(class, who)
    local ok, why = check_chain(class)
    if not ok then error(who .. ": " .. why, 3) end
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
    for _, alias in ipairs(class.aliases) do
        local other = self._aliases[alias]
        if (other ~= nil and other ~= class) or self._by_name[alias] then
            error(fmt("registry:register: %s is an alias of %s and already stands for another "
                      .. "class", alias, name), 3)
        end
    end
    local owner = self._aliases[name]
    if owner ~= nil and owner ~= class then
        error(fmt("registry:register: %s is an alias of %s", name, owner.event_name), 3)
    end
    for _, alias in ipairs(class.aliases) do self._aliases[alias] = class end
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
    local self = setmetatable({ _by_name = {}, _latest = {}, _aliases = {}, _count = 0,
                                _count_names = 0 },
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
    local class = versions and versions[v]
    if class then return class end
    -- the class that holds the name now: the highest version under it, or the one it is an
    -- alias of; it reads an older version through its upcasters, an alias as a rename
    local current = versions and versions[self._latest[name]] or self._aliases[name]
    if current == nil then
        return nil, err.new("not_found", fmt("unknown event %q", name), { event_name = name })
    end
    if v == nil then return current end
    local how, why = path_of(current, v)
    if how or (how == nil and current.event_name ~= name) then return current end
    if how == false and v < current.event_version then
        return nil, err.new("invalid", fmt("event %s: stored as %s v%d: %s", current.event_name,
                                           name, v, why), { event_name = name, event_version = v })
    end
    if versions == nil then
        return nil, err.new("not_found", fmt("unknown version %d of event %q (read as %s v%d)",
                                             v, name, current.event_name, current.event_version),
                            { event_name = name, event_version = v })
    end
    return nil, err.new("not_found", fmt("unknown version %d of event %q (registered up to v%d)",
                                         v, name, self._latest[name]),
                        { event_name = name, event_version = v })
end

--- Internal: the class a stored (name, version) is read as, or nil when the registry knows
-- neither the name nor an alias of it (the record is then left as it is).
---@param name string
---@param version any
---@return table|nil class
function Registry:reader(name, version)
    local versions = self._by_name[name]
    local class = versions and versions[version]
    if class then return class end
    return versions and versions[self._latest[name]] or self._aliases[name]
end

--- Internal: every registered class, for chain checks and store:check().
---@return table classes
function Registry:classes()
    local out = {}
    for _, versions in pairs(self._by_name) do
        for _, class in pairs(versions) do out[#out + 1] = class end
    end
    return out
end

--- Whether every registered class's upcasters form one chain (qx.event_store and qx.consumer
-- raise when not): true, or false and what is missing.
---@return boolean ok
---@return string? missing
function Registry:check_chains()
    for _, class in ipairs(self:classes()) do
        local ok, why = check_chain(class)
        if not ok then return false, why end
    end
    return true
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

-- The class that reads a decoded envelope -> class | nil, err not_found, invalid
local function envelope_class(self, env, opts)
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
    return class
end

--- Internal: the class from_envelope(env, opts) reads env as, without reading it (a consumer
-- opens sealed personal fields before the upcasters run).
---@param env table a decoded envelope
---@param opts table|nil as from_envelope
---@return table|nil class
---@return qx.Error? err not_found, invalid
function Registry:_class_of(env, opts)
    return envelope_class(self, env, opts)
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
    local class, e = envelope_class(self, env, opts)
    if not class then return nil, e end
    local name, version = env.event_name, env.event_version
    -- read as the class that holds the name now: renamed from an alias, upcast when older
    local newer = type(version) == "number" and version > class.event_version
    if class.event_name ~= name
       or (class.__first_step and version ~= class.event_version and not newer) then
        local evolved, ee = evolve_envelope(class, env, version)
        if not evolved then return nil, ee end
        env = evolved
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

--- Event classes and event instances.
--
--   local Deposited = event.define("account.money_deposited", { version = 1 })
--   local ev = Deposited{ amount = 10 }       -- a plain table: metadata and payload side by side
--
-- aggregate_type and aggregate_id ride on an instance as routing data, outside payload() and
-- envelope(); keys starting with "_" are never payload. See docs/model.md.
local core = require "qx.core"
local qx_error = require "qx.error"

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
local sub = string.sub
local find = string.find
local concat = table.concat
local sort = table.sort
local new_uuid = core.uuid
local now = core.now


local _M = { _VERSION = "0.1.0" }


local MAX_NAME_LEN = 255          -- qx_outbox_events.event_name is varchar(255)
local MAX_VERSION = 2147483647    -- event_version is a PostgreSQL int

-- metadata carried in the envelope, in envelope order
local METADATA = {
    "event_id", "event_name", "event_version", "occurred_at",
    "correlation_id", "causation_id", "tenant_id", "actor_id",
}
-- metadata that are optional ids (absent = JSON null in the envelope)
local OPTIONAL_IDS = { "correlation_id", "causation_id", "tenant_id", "actor_id" }
-- instance fields that are neither payload nor envelope
local ROUTING = { "aggregate_type", "aggregate_id" }
-- instance methods; a payload field of that name would hide them
local METHODS = { "payload", "envelope" }
local METHOD_SET = { payload = true, envelope = true }

local RESERVED = {}
for _, list in pairs({ METADATA, ROUTING, METHODS }) do
    for i = 1, #list do
        RESERVED[list[i]] = true
    end
end

_M.METADATA = METADATA
_M.ROUTING = ROUTING
_M.RESERVED = RESERVED -- metadata, routing and method names: never payload fields


local function as_integer(v)
    if type(v) ~= "number" or v ~= v or v ~= floor(v) then
        return nil
    end
    if tointeger then
        return tointeger(v)
    end
    return v
end


-- true, or false and the reason: the name is not a valid event name
local function valid_event_name(name)
    if type(name) ~= "string" then
        return false, "must be a string, got " .. type(name)
    end
    if name == "" then
        return false, "must not be empty"
    end
    if #name > MAX_NAME_LEN then
        return false, "must be at most " .. MAX_NAME_LEN .. " bytes"
    end
    if find(name, "[^A-Za-z0-9_%.%-]") then    -- ASCII whatever the C locale
        return false, "may contain only letters, digits, '_', '-' and '.'"
    end
    if sub(name, 1, 1) == "." or sub(name, -1) == "." or find(name, "..", 1, true) then
        return false, "must not start or end with '.' nor contain an empty segment"
    end
    return true
end

_M.valid_name = valid_event_name -- the grammar of event names (dots, dashes)


-- The metatable of every event class (assigned below). A class and its instances' metatable
-- point at each other through plain fields (Class.__instance_mt, mt.__class), so no
-- registry keeps classes alive.
local class_mt


local function is_class(x)
    return type(x) == "table" and getmetatable(x) == class_mt
end


-- instance metatable -> its class, filled by define; weak both ways, so that it keeps no class
-- alive (a class and its instance metatable refer to each other)
local class_by_instance_mt = setmetatable({}, { __mode = "kv" })

-- (getmetatable of a non-table is nil or a metatable no event class has: no type() needed)
local function class_of(x)
    local mt = getmetatable(x)
    if mt == nil then
        return nil
    end
    return class_by_instance_mt[mt]
end

_M.class_of = class_of


--- Whether x is an event (an instance of an event class).
---@param x any
---@return boolean
function _M.is_event(x)
    local mt = getmetatable(x) -- class_of(x) ~= nil, without the call
    return mt ~= nil and class_by_instance_mt[mt] ~= nil
end


_M.is_class = is_class



-- instance methods -----------------------------------------------------------

local instance_methods = {}


--- ev:payload(): a new table with the payload fields only (shallow copy).
---@param self table the event
---@return table
function instance_methods.payload(self)
    if class_of(self) == nil then
        error("payload: call as ev:payload()", 2)
    end
    local out = {}
    for k, v in pairs(self) do
        if type(k) == "string" and not RESERVED[k] and sub(k, 1, 1) ~= "_" then
            out[k] = v
        end
    end
    return out
end


--- ev:envelope(): the wire envelope; every metadata key present, absent optional ids as
-- qx.null.
---@param self table the event
---@return table
function instance_methods.envelope(self)
    if class_of(self) == nil then
        error("envelope: call as ev:envelope()", 2)
    end
    local null = core.null
    local env = {
        event_id = self.event_id,
        event_name = self.event_name,
        event_version = self.event_version,
        occurred_at = self.occurred_at,
        payload = instance_methods.payload(self),
    }
    for i = 1, #OPTIONAL_IDS do
        local k = OPTIONAL_IDS[i]
        local v = rawget(self, k)
        if v == nil then
            v = null
        end
        env[k] = v
    end
    return env
end


-- the shape of an envelope written by the core: the metadata, then the payload (the string keys
-- that are neither reserved nor '_'-prefixed)
local omit = {}
for k in pairs(RESERVED) do omit[#omit + 1] = k end
sort(omit)
local ENVELOPE = core.json_shape{ fields = METADATA, item = "payload", omit = omit,
                                  omit_prefix = "_" }
local json_object = core.json_object

--- ev:envelope() as JSON text, written by the core from the event itself, without the
-- envelope's and the payload's tables: what the outbox stores.
---@param ev table the event
---@return string|nil text
---@return qx.Error? err invalid: a payload value JSON cannot hold (a cycle, a key not a string)
function _M.envelope_json(ev)
    return json_object(ENVELOPE, ev)
end


local function instance_tostring(self)
    return fmt("event %s v%s %s", tostring(rawget(self, "event_name")),
               tostring(rawget(self, "event_version")), tostring(rawget(self, "event_id")))
end


-- construction ---------------------------------------------------------------

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do
        keys[#keys + 1] = k
    end
    sort(keys)
    return keys
end


-- What a field key is, decided once per key string (events of one kind repeat their keys):
-- "payload", "skip" (metadata and routing, set from their own checks below) or the message
-- that refuses it. Bounded: a flood of distinct keys only restarts it.
local key_kinds, key_kinds_n = {}, 0

local function key_kind(k)
    local kind
    if type(k) ~= "string" then
        return "field keys must be strings, got " .. type(k) .. " key " .. tostring(k)
    elseif sub(k, 1, 1) == "_" then
        kind = "payload field '" .. k .. "' starts with '_' (reserved)"
    elseif METHOD_SET[k] then
        kind = "payload field '" .. k .. "' would hide the method ev:" .. k .. "()"
    elseif RESERVED[k] then
        kind = "skip"
    else
        kind = "payload"
    end
    if key_kinds_n >= 1000 then key_kinds, key_kinds_n = {}, 0 end
    key_kinds[k] = kind
    key_kinds_n = key_kinds_n + 1
    return kind
end


-- Build an instance of `class` from `fields`. Returns the instance, or nil and a message
-- describing what is wrong with `fields`; `define`'s constructor raises that message,
-- `from_envelope` returns it as an "invalid" error.
local function build(class, fields)
    -- Made with room for the fields most events end up with - the four every event has, the
    -- routing fields record() adds, the correlation id the unit of work stamps - so that it
    -- is not rebuilt as it grows (at 5 and 9 keys); the placeholders are set or cleared below.
    local ev = { event_name = false, event_version = false, event_id = false, occurred_at = false,
                 correlation_id = false, aggregate_type = false, aggregate_id = false,
                 causation_id = false, tenant_id = false }
    ev.correlation_id, ev.aggregate_type, ev.aggregate_id = nil, nil, nil
    ev.causation_id, ev.tenant_id = nil, nil

    local metadata = false -- a metadata or routing field among the fields
    for k, v in pairs(fields) do
        local kind = key_kinds[k] or key_kind(k)
        if kind == "payload" then
            local tv = type(v)
            if tv == "function" or tv == "thread" then
                return nil, "field '" .. k .. "' holds a " .. tv .. ", which cannot be serialised"
            end
            ev[k] = v
        elseif kind == "skip" then
            metadata = true
        else
            return nil, kind
        end
    end

    -- payload fields only (a new event, the usual case): nothing below has anything to check
    if not metadata and getmetatable(fields) == nil then
        ev.event_name = class.event_name
        ev.event_version = class.event_version
        ev.event_id = new_uuid()
        ev.occurred_at = now()
        return setmetatable(ev, class.__instance_mt)
    end

    local null = core.null

    -- event_name: fixed by the class
    local name = fields.event_name
    if name ~= nil and name ~= class.event_name then
        return nil, "event_name '" .. tostring(name) .. "' does not match the class ('"
                    .. class.event_name .. "')"
    end
    ev.event_name = class.event_name

    -- event_version: the class's, unless an older/newer stored version is being rebuilt
    local version = fields.event_version
    if version == nil then
        ev.event_version = class.event_version
    else
        local n = as_integer(version)
        if n == nil or n < 1 or n > MAX_VERSION then
            return nil, "event_version must be a positive integer, got " .. tostring(version)
        end
        ev.event_version = n
    end

    -- event_id / occurred_at: generated when absent
    local id = fields.event_id
    if id == nil or id == null then
        ev.event_id = core.uuid()
    elseif type(id) ~= "string" or id == "" then
        return nil, "event_id must be a non-empty string, got " .. type(id)
    else
        ev.event_id = id
    end

    local at = fields.occurred_at
    if at == nil or at == null then
        ev.occurred_at = core.now()
    elseif type(at) ~= "string" or at == "" then
        return nil, "occurred_at must be a non-empty string (ISO-8601), got " .. type(at)
    else
        ev.occurred_at = at
    end

    -- optional ids: strings or absent (null means absent)
    for i = 1, #OPTIONAL_IDS do
        local k = OPTIONAL_IDS[i]
        local v = fields[k]
        if v ~= nil and v ~= null then
            if type(v) ~= "string" then
                return nil, k .. " must be a string, got " .. type(v)
            end
            ev[k] = v
        end
    end

    -- routing fields: aggregate_type a string, aggregate_id a string or a number
    local at_type = fields.aggregate_type
    if at_type ~= nil and at_type ~= null then
        if type(at_type) ~= "string" then
            return nil, "aggregate_type must be a string, got " .. type(at_type)
        end
        ev.aggregate_type = at_type
    end
    local agg_id = fields.aggregate_id
    if agg_id ~= nil and agg_id ~= null then
        local t = type(agg_id)
        if t ~= "string" and t ~= "number" then
            return nil, "aggregate_id must be a string or a number, got " .. t
        end
        ev.aggregate_id = agg_id
    end

    return setmetatable(ev, class.__instance_mt)
end


-- class ----------------------------------------------------------------------

local class_methods = {}


--- Class:is(x): x is an instance of exactly this class.
---@param class table
---@param x any
---@return boolean
function class_methods.is(class, x)
    if not is_class(class) then
        error("is: call as Class:is(ev)", 2)
    end
    return class_of(x) == class
end


-- raises at level 3: the caller of Class.new / Class(...)
local function construct(class, fields)
    if type(fields) ~= "table" then
        if fields ~= nil then
            error(class.event_name .. ": fields must be a table, got " .. type(fields), 3)
        end
        fields = {}
    elseif getmetatable(fields) == class_mt then -- an event class: called with a colon
        error(class.event_name .. ": call as Class{...} or Class.new{...}, not Class:new{...}", 3)
    end
    local ev, why = build(class, fields)
    if ev == nil then
        error(class.event_name .. ": " .. why, 3)
    end
    return ev
end


class_mt = {
    __index = class_methods,
    __call = function(class, fields)
        local ev = construct(class, fields)
        return ev
    end,
    __tostring = function(class)
        return fmt("%s class %s v%d", class.integration and "integration event" or "event",
                   class.event_name, class.event_version)
    end,
}


-- opts.aliases -> a list of distinct valid names other than the class's own; raises at level 3
local function check_aliases(name, aliases)
    if aliases == nil then
        return {}
    end
    if type(aliases) ~= "table" then
        error("event option 'aliases' must be a list of event names, got " .. type(aliases), 3)
    end
    local out, seen = {}, { [name] = true }
    for i = 1, #aliases do
        local a = aliases[i]
        local ok, why = valid_event_name(a)
        if not ok then
            error(fmt("event %s: alias %d %s", name, i, why), 3)
        end
        if seen[a] then
            error(fmt("event %s: alias %q is its own name or listed twice", name, a), 3)
        end
        seen[a] = true
        out[i] = a
    end
    for k in pairs(aliases) do
        if type(k) ~= "number" or k < 1 or k > #out or k ~= floor(k) then
            error("event " .. name .. ": aliases must be a list of names", 3)
        end
    end
    return out
end


--- Class:upcast(from, fn): the step that turns a stored payload of version `from` into one of
-- version from + 1. fn(payload, meta) returns the new payload; meta holds the stored envelope's
-- fields (event_id, event_name, event_version as stored, occurred_at, aggregate ids, ...).
-- Raises on a step defined twice or one that does not end at or below the class's version.
---@param class table
---@param from integer the stored version the step reads
---@param fn fun(payload: table, meta: table): table
---@return table class
function class_methods.upcast(class, from, fn)
    if not is_class(class) then
        error("upcast: call as Class:upcast(from_version, fn)", 2)
    end
    local v = as_integer(from)
    if v == nil or v < 1 then
        error(fmt("%s: upcast: the step's version must be a positive integer, got %s",
                  class.event_name, tostring(from)), 2)
    end
    if v >= class.event_version then
        error(fmt("%s: upcast: a step from v%d would go beyond the class's version (v%d)",
                  class.event_name, v, class.event_version), 2)
    end
    if type(fn) ~= "function" then
        error(fmt("%s: upcast: the step from v%d must be a function, got %s", class.event_name,
                  v, type(fn)), 2)
    end
    local steps = class.__upcasters
    if steps[v] ~= nil then
        error(fmt("%s: upcast: the step v%d -> v%d is defined twice", class.event_name, v,
                  v + 1), 2)
    end
    steps[v] = fn
    -- the meta table is made only for a step that takes it (a second parameter, or ...)
    local info = debug.getinfo(fn, "u")
    if info.nparams == nil or info.nparams >= 2 or info.isvararg == true then
        class.__any_meta = true
    end
    class.__chain_ok = nil
    if class.__first_step == nil or v < class.__first_step then
        class.__first_step = v
    end
    return class
end


--- Whether the class's upcasters form one chain that ends at its version: true, or false and
-- what is missing. A class without upcasters reads its stored versions as they are.
---@param class table
---@return boolean ok
---@return string? missing
function _M.check_chain(class)
    local first = class.__first_step
    if first == nil then
        return true
    end
    local steps = class.__upcasters
    for v = first, class.event_version - 1 do
        if steps[v] == nil then
            return false, fmt("event %s v%d: no upcaster v%d -> v%d, so v%d..v%d cannot reach v%d",
                              class.event_name, class.event_version, v, v + 1, first, v,
                              class.event_version)
        end
    end
    return true
end


local DEFINE_OPTS = { version = true, integration = true, aliases = true, personal = true,
                      subject = true }


-- personal = { field names }, subject = the field naming the data subject (docs/erasure.md):
-- checked here, at class definition, so that a wrong list raises where it is written
local function personal_option(opts)
    local personal, subject = opts.personal, opts.subject
    if personal == nil then
        if subject ~= nil then
            error("event option 'subject' is given without 'personal'", 3)
        end
        return nil
    end
    if type(personal) ~= "table" or getmetatable(personal) ~= nil then
        error("event option 'personal' must be a list of field names, got " .. type(personal), 3)
    end
    local list, seen, n = {}, {}, 0
    for _ in pairs(personal) do n = n + 1 end
    if n == 0 then
        error("event option 'personal' is empty", 3)
    end
    for i = 1, n do
        local f = personal[i]
        if type(f) ~= "string" then
            error("event option 'personal' must be a list of field names (item " .. i .. " is a "
                  .. type(f) .. ")", 3)
        end
        if key_kind(f) ~= "payload" then
            error("event option 'personal': '" .. f .. "' cannot be a payload field", 3)
        end
        if seen[f] then
            error("event option 'personal' names '" .. f .. "' twice", 3)
        end
        seen[f] = true
        list[i] = f
    end
    if subject == nil then
        error("event option 'subject' (the field holding the data subject's id) is required "
              .. "with 'personal'", 3)
    end
    if type(subject) ~= "string" or key_kind(subject) ~= "payload" then
        error("event option 'subject' must name a payload field, got " .. tostring(subject), 3)
    end
    if seen[subject] then
        error("event option 'subject' names the personal field '" .. subject
              .. "': the subject's id must stay readable to find its key", 3)
    end
    return list, subject
end


--- An event class (qx.event, qx.integration_event). Raises on a bad name or option.
---@param name string e.g. "account.money_deposited"
---@param opts table|nil { version = 1, integration = false, personal = { fields }, subject = f }
---@return table class
function _M.define(name, opts)
    local ok, why = valid_event_name(name)
    if not ok then
        error("event name " .. (type(name) == "string" and fmt("%q ", name) or "")
              .. why, 2)
    end
    if opts == nil then
        opts = {}
    elseif type(opts) ~= "table" then
        error("event options must be a table, got " .. type(opts), 2)
    end
    for k in pairs(opts) do
        if not DEFINE_OPTS[k] then
            error("unknown event option '" .. tostring(k) .. "' (known: "
                  .. concat(sorted_keys(DEFINE_OPTS), ", ") .. ")", 2)
        end
    end

    local version = opts.version
    if version == nil then
        version = 1
    else
        local n = as_integer(version)
        if n == nil or n < 1 or n > MAX_VERSION then
            error("event version must be a positive integer, got " .. tostring(version), 2)
        end
        version = n
    end

    local integration = opts.integration
    if integration == nil then
        integration = false
    elseif type(integration) ~= "boolean" then
        error("event option 'integration' must be a boolean, got " .. type(integration), 2)
    end

    local personal, subject = personal_option(opts)

    local class = {
        event_name = name,
        event_version = version,
        integration = integration,
        aliases = check_aliases(name, opts.aliases),
        __upcasters = {},     -- [from] = fn: stored payload of version from -> from + 1
        __any_meta = false,   -- whether a step takes the meta argument
        personal = personal,   -- nil, or the fields stored sealed under the subject's key
        subject = subject,
    }

    local mt = {
        __index = instance_methods,
        __tostring = instance_tostring,
        __class = class,
    }
    class.__instance_mt = mt
    class_by_instance_mt[mt] = class

    -- Class.new{...}: dot call, no self
    class.new = function(fields)
        local ev = construct(class, fields)
        return ev
    end

    -- Class.from_envelope(env): same as event.from_envelope(Class, env)
    class.from_envelope = function(env)
        return _M.from_envelope(class, env)
    end

    return setmetatable(class, class_mt)
end


--- Rebuilds an instance from a decoded envelope (as ev:envelope() and the JSON decoder make).
-- Extra top-level keys are ignored, except aggregate_type/aggregate_id, kept when present.
---@param class table
---@param env table
---@return table|nil event
---@return qx.Error? err invalid for bad data
function _M.from_envelope(class, env)
    if not is_class(class) then
        error("from_envelope: expected an event class, got " .. type(class), 2)
    end
    local function invalid(msg)
        return nil, qx_error.new("invalid", class.event_name .. " envelope: " .. msg)
    end

    if type(env) ~= "table" then
        return invalid("expected a table, got " .. type(env))
    end
    if env.event_name ~= class.event_name then
        return invalid("event_name is " .. fmt("%q", tostring(env.event_name)))
    end
    if type(env.event_id) ~= "string" then
        return invalid("event_id missing or not a string")
    end
    if type(env.occurred_at) ~= "string" then
        return invalid("occurred_at missing or not a string")
    end
    if env.event_version == nil or env.event_version == core.null then
        return invalid("event_version missing")
    end
    local payload = env.payload
    if type(payload) ~= "table" then
        return invalid("payload missing or not an object")
    end

    local fields = {}
    for k, v in pairs(payload) do
        if type(k) == "string" and RESERVED[k] then
            return invalid("payload field '" .. k .. "' collides with a reserved name")
        end
        fields[k] = v
    end
    for i = 1, #METADATA do
        local k = METADATA[i]
        fields[k] = env[k]
    end
    fields.aggregate_type = env.aggregate_type
    fields.aggregate_id = env.aggregate_id

    local ev, why = build(class, fields)
    if ev == nil then
        return invalid(why)
    end
    return ev
end


return _M

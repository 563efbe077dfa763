-- Internal to qx.consumer: messages whose payload holds sealed personal fields
-- (docs/erasure.md). A consumer whose database has qx's key table opens them in the handler's
-- unit of work, with the keys held until it commits, and reads the event as its class only
-- then: upcasters and aliases see the values, as on the event store's reads (the ciphertext is
-- bound to the event's id and the stored field's name, which an upcaster may change). A message
-- that does not open (tampered, sealed under a key this database never had) is dead-lettered at
-- once: no redelivery makes it better.
local core = require "qx.core"
local err = require "qx.error"
local base = require "qx.messaging.consumer.base"
local personal = require "qx.store.personal"

local type = type
local find = string.find
local json_decode = core.json_decode
local Consumer = base.Consumer

local MARK = '"' .. personal.PREFIX

-- Whether the consumer's database has qx's key table (asked once, when a message first holds
-- a sealed value): a consumer whose database has none hands sealed personal fields to its
-- handler as they came. A failed question counts as yes: the unit of work then fails on the
-- database too, and the message comes back, rather than reach the handler sealed.
function Consumer:_keys_reachable()
    local r = self._keys_table
    if r == nil then
        local rows = self.db:query("SELECT to_regclass('qx_subject_keys') IS NOT NULL AS here")
        if rows == nil then return true end
        r = rows[1].here == true
        self._keys_table = r
    end
    return r
end

-- A message body -> ev, env | nil, err (as registry:decode). When the payload holds sealed
-- values this consumer opens, env is the decoded envelope still to be opened and read (by
-- _read_sealed in the unit of work) and ev is env itself, whose metadata (event_id,
-- event_name, ...) the screening, the inbox and dead letters use; its class is checked here,
-- so an unknown event is dead-lettered before any transaction.
function Consumer:_decode(data)
    if self.db and type(data) == "string" and find(data, MARK, 1, true)
       and self:_keys_reachable() then
        local env = json_decode(data)
        if type(env) == "table" and type(env.payload) == "table"
           and personal.has_sealed(env.payload) then
            local class, e = self.registry:_class_of(env, self.decode_opts)
            if not class then return nil, e end
            return env, env
        end
    end
    return self.registry:decode(data, self.decode_opts)
end

local function unopenable(e)
    if not err.is(e) then e = err.from_raised(e) end
    -- tampered, or sealed under no key of this database: the message is dead-lettered
    if e.code == "invalid" or e.code == "not_found" then e.unopenable = true end
    return e
end

-- In the handler's unit of work: the event of a message, its sealed fields opened (a forgotten
-- subject's read qx.forgotten). env (from _decode) is opened and then read as its class; an
-- event already read (ev) is opened in place. Raises the error (err.unopenable when the message
-- cannot be read at all).
function Consumer:_read_sealed(uow, ev, env)
    if env then
        local opened, pe = personal.open_all(uow, { env.payload }, { env.event_id })
        if not opened then error(unopenable(pe), 0) end
        local read, re = self.registry:from_envelope(env, self.decode_opts)
        if not read then error(unopenable(re), 0) end
        return read
    end
    if personal.has_sealed(ev) and self:_keys_reachable() then
        local opened, pe = personal.open_all(uow, { ev })
        if not opened then error(unopenable(pe), 0) end
    end
    return ev
end

return Consumer

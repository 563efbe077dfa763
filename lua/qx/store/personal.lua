--- Personal fields sealed per data subject, and forgetting a subject (crypto-shredding).
--
--   local Registered = qx.event("user.registered", { personal = { "email" }, subject = "user_id" })
--   qx.forget(db, user_id)    -- the subject's key is deleted: its sealed fields read qx.forgotten
--
-- A personal field is stored as the text "qx:sealed:1:<subject id>:<base64url(nonce, AES-256-GCM
-- ciphertext of the value's JSON, tag)>", with the event's id and the field's name as the
-- additional authenticated data. The record paths (event store append, outbox insert) call
-- seal_*, the read paths (records, load, projections, the consumer) call open_*. The contract,
-- the key cache and the costs are argued in docs/erasure.md.
local core = require "qx.core"
local qx_error = require "qx.error"
local event = require "qx.model.event"

local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable
local rawget = rawget
local select = select
local byte = string.byte
local fmt = string.format
local sort = table.sort
local concat = table.concat
local is_uuid = core.is_uuid
local null = core.null
local json_encode = core.json_encode
local seal_b64 = core.aead_seal_b64
local aead_key, sealed_find, open_sealed = core.aead_key, core.sealed_find, core.open_sealed
local prefixed_key = core.prefixed_key
local new_error = qx_error.new
local class_of = event.class_of

local _M = {}

local PREFIX = "qx:sealed:1:"
local AAD_HEAD = "qx.personal.1\n"
_M.PREFIX = PREFIX

--- What a personal field reads once its subject is forgotten (qx.forgotten). Compare with ==.
_M.forgotten = setmetatable({}, {
    __tostring = function() return "qx.forgotten" end,
    __newindex = function() error("qx.forgotten is read-only", 2) end,
    __metatable = "qx.forgotten",
})
local forgotten = _M.forgotten

local function aad(event_id, field)
    return AAD_HEAD .. event_id .. "\n" .. field
end

-- ---- the write side ---------------------------------------------------------------------

-- Keys a process has read or made, per database handle: subject -> key. An entry is only a
-- shortcut for writing: the transaction that uses it also runs qx_subject_keys_alive, which
-- refuses the write when the subject was forgotten since. Reads never use it.
local write_caches = setmetatable({}, { __mode = "k" })
local CACHE_MAX = 10000

local function cache_of(db)
    local c = write_caches[db]
    if c == nil then
        c = { n = 0, keys = {} }
        write_caches[db] = c
    end
    return c
end

-- Checks an event about to be recorded: its subject (when a personal field has a value) and
-- that no other field looks sealed. -> subject id | false (nothing to seal) | nil, err
local function subject_of(ev)
    local class = class_of(ev)
    local personal = class.personal
    local pset
    if personal then
        pset = class._personal_set
        if pset == nil then
            pset = {}
            for i = 1, #personal do pset[personal[i]] = true end
            class._personal_set = pset
        end
    end
    local k = prefixed_key(ev, PREFIX, pset)
    if k ~= nil then
        return nil, new_error("invalid", fmt("%s: field '%s' is not personal but holds a "
            .. "sealed value", class.event_name, tostring(k)))
    end
    if not personal then return false end
    local any = false
    for i = 1, #personal do
        local f = personal[i]
        local v = rawget(ev, f)
        if v ~= nil and v ~= null then
            if v == forgotten then
                return nil, new_error("invalid", fmt("%s: field '%s' holds qx.forgotten, "
                    .. "which cannot be recorded", class.event_name, f))
            end
            any = true
        end
    end
    if not any then return false end
    local subject = ev[class.subject]
    if not is_uuid(subject) then
        return nil, new_error("invalid", fmt("%s: personal fields need the data subject's id, a "
            .. "uuid, in field '%s', got %s", class.event_name, class.subject,
            type(subject) == "string" and fmt("%q", subject) or type(subject)))
    end
    return subject:lower()
end
_M.subject_of = subject_of

local UPSERT = [[
INSERT INTO qx_subject_keys (subject_id, key)
SELECT e.key::uuid, decode(e.value, 'hex') FROM jsonb_each_text($1::jsonb) e
ORDER BY 1
ON CONFLICT (subject_id) DO UPDATE SET subject_id = EXCLUDED.subject_id
RETURNING subject_id::text AS subject_id, key]]

-- the tombstone check in the commit's round trip (migration 11): a check, no row written
local ALIVE = "SELECT qx_subject_keys_alive($1::uuid[], $2)"

local function hex(s)
    return (s:gsub(".", function(c) return fmt("%02x", byte(c)) end))
end

local function forgotten_error(subject)
    return new_error("invalid", "data subject " .. subject
        .. " is forgotten: no personal data of it is recorded")
end

--- The keys of the subjects for writing in the unit of work: from the cache, or made (the
-- first writer's key wins: two first writers end with one key) in one round trip. Queues
-- qx_subject_keys_alive of the subjects, which refuses a forgotten one at the commit and locks
-- the keys until then when hold is true (a snapshot is written).
---@param uow table the unit of work
---@param subjects table set of subject ids
---@param hold boolean|nil lock the keys until the commit
---@return table|nil keys { subject = key }
---@return qx.Error? err invalid (a forgotten subject), or the database's
function _M.keys_for_write(uow, subjects, hold)
    local cache = cache_of(uow.db)
    local keys, missing, nmissing = {}, nil, 0
    local ids, nids = {}, 0
    for s in pairs(subjects) do
        nids = nids + 1
        ids[nids] = s
        local k = cache.keys[s]
        if k then
            keys[s] = k
        else
            missing = missing or {}
            missing[s] = hex(core.random_bytes(32))
            nmissing = nmissing + 1
        end
    end
    if missing then
        local rows, e = uow:query(UPSERT, missing)
        if not rows then return nil, e end
        if cache.n + nmissing > CACHE_MAX then
            cache.keys, cache.n = {}, 0
        end
        for i = 1, #rows do
            local r = rows[i]
            if r.key == null then return nil, forgotten_error(r.subject_id) end
            keys[r.subject_id] = r.key
            cache.keys[r.subject_id] = r.key
            cache.n = cache.n + 1
        end
    end
    local ok, e = uow:queue(ALIVE, "{" .. concat(ids, ",") .. "}", hold == true)
    if not ok then return nil, e end
    return keys
end

local function seal_value(key, subject, event_id, field, v)
    local text, e = json_encode(v)
    if not text then
        return nil, new_error("invalid", fmt("personal field '%s' cannot be stored as JSON: %s",
                                             field, tostring(e.message)))
    end
    return PREFIX .. subject .. ":" .. seal_b64(key, aad(event_id, field), text)
end

-- Replaces the personal fields of target (a copy of ev's fields, or its envelope's payload)
-- by their sealed text. -> true | nil, err
local function seal_into(target, ev, key, subject)
    local class = class_of(ev)
    local personal = class.personal
    local id = ev.event_id
    for i = 1, #personal do
        local f = personal[i]
        local v = target[f]
        if v ~= nil and v ~= null then
            local text, e = seal_value(key, subject, id, f, v)
            if not text then return nil, e end
            target[f] = text
        end
    end
    return true
end

--- A plain copy of ev's fields with its personal fields sealed (the event store's row).
---@param ev table the event
---@param key string the subject's key
---@param subject string the subject's id
---@return table|nil copy
---@return qx.Error? err invalid
function _M.sealed_copy(ev, key, subject)
    local copy = {}
    for k, v in pairs(ev) do copy[k] = v end
    local ok, e = seal_into(copy, ev, key, subject)
    if not ok then return nil, e end
    return copy
end

--- ev:envelope() with the payload's personal fields sealed (the outbox row).
---@param ev table the event
---@param key string the subject's key
---@param subject string the subject's id
---@return table|nil envelope
---@return qx.Error? err invalid
function _M.sealed_envelope(ev, key, subject)
    local env = ev:envelope()
    local ok, e = seal_into(env.payload, ev, key, subject)
    if not ok then return nil, e end
    return env
end

-- Queued ahead of a load (same round trip): the keys of the subjects noted for the stream (those
-- of the events its snapshots folded, noted as they were written) are locked until the commit;
-- the events after the snapshot lock their own subjects' keys as they are opened. So a snapshot
-- this transaction writes from the state it loads (in clear) is dropped by a forget that comes
-- meanwhile, which waits for it.
local HOLD_STREAM = [[
SELECT count(*) FROM (
  SELECT 1 FROM qx_subject_keys k JOIN qx_subject_streams m ON m.subject_id = k.subject_id
   WHERE m.aggregate_type = $1 AND m.aggregate_id = $2 AND k.key IS NOT NULL
   ORDER BY k.subject_id FOR SHARE OF k) AS held]]

--- Whether an aggregate with these handlers (event name -> { class = event class? }) may hold
-- personal data: one of its events has personal fields, or is handled by name only (its class
-- unknown). An aggregate none of whose events is personal needs no lock on load.
---@param handlers table the event-sourced class's handlers
---@return boolean
function _M.may_hold(handlers)
    for _, h in pairs(handlers) do
        if h.class == nil or h.class.personal then return true end
    end
    return false
end

--- Queues the lock of the keys of the subjects of a stream (before a load in a unit of work).
---@param uow table the unit of work
---@param agg_type string
---@param id string
---@return true|nil ok
---@return qx.Error? err
function _M.hold_stream(uow, agg_type, id)
    return uow:queue(HOLD_STREAM, agg_type, id)
end

-- ---- snapshots ----------------------------------------------------------------------------

-- An aggregate's state may hold qx.forgotten (it replayed a forgotten subject's events); JSON
-- has no such value, so a snapshot stores it as this text and a load gives it back.
local FORGOTTEN_TEXT = "qx:forgotten"
_M.FORGOTTEN_TEXT = FORGOTTEN_TEXT

-- t with every value equal to from replaced by to, at any depth; t itself when there is none
-- (copies only the tables on the way to one)
local function replaced(t, from, to, depth)
    if depth > 1000 then return t end
    local out
    for k, v in pairs(t) do
        local nv = v
        if v == from then
            nv = to
        elseif type(v) == "table" and v ~= forgotten then
            nv = replaced(v, from, to, depth + 1)
        end
        if nv ~= v then
            if out == nil then
                out = {}
                for k2, v2 in pairs(t) do out[k2] = v2 end
            end
            out[k] = nv
        end
    end
    return out or t
end

--- A snapshot's state as stored: qx.forgotten as the text "qx:forgotten".
---@param state table
---@return table
function _M.snapshot_out(state)
    return replaced(state, forgotten, FORGOTTEN_TEXT, 0)
end

--- A stored snapshot's state as restored: the text "qx:forgotten" as qx.forgotten.
---@param state table
---@return table
function _M.snapshot_in(state)
    return replaced(state, FORGOTTEN_TEXT, forgotten, 0)
end

-- ---- the read side ----------------------------------------------------------------------

-- (= ANY of an array, not IN of a set: the planner looks each key up by its index instead of
-- hashing the whole table)
local KEYS = [[
SELECT subject_id::text AS subject_id, key FROM qx_subject_keys
 WHERE subject_id = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)::uuid))]]
-- inside a unit of work the keys are held until its commit: a forget waits for it (and then
-- erases what it wrote), or went first and is seen
local KEYS_HELD = KEYS .. " ORDER BY subject_id FOR SHARE"

-- the keys and, in the same statement (one snapshot), the generation they are valid for
local KEYS_GEN = [[
SELECT g.n AS gen, k.subject_id::text AS subject_id, k.key
  FROM qx_subject_keys_generation g
  LEFT JOIN qx_subject_keys k
    ON k.subject_id = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)::uuid))]]
local GEN = "SELECT n AS gen FROM qx_subject_keys_generation"

-- Keys kept for reads outside a unit of work, per db handle: { gen, keys = { subject = key
-- object (core.aead_key) | false }, n }. Valid while the generation that every such read asks
-- for, in the same round trip as its rows and after them, has not moved: a forget bumps it in
-- its transaction, so no key is served by a read that began after the forget committed.
local read_caches = setmetatable({}, { __mode = "k" })

--- Drops the keys this process keeps, for writing and for reading (all databases); for tests
-- and key rotation.
function _M.clear_cache()
    write_caches = setmetatable({}, { __mode = "k" })
    read_caches = setmetatable({}, { __mode = "k" })
end

--- A read of event store rows (their payload and row_id columns) outside a unit of work, with
-- the keys' generation in the same round trip. With keys kept from earlier reads, the rows'
-- sealed values are opened as they are decoded (core: open_sealed of conn:batch); when the
-- generation read with them is not the one those keys were valid for, the rows are read again
-- without them.
---@param q table a db or a unit of work (then only q:query, and no generation)
---@param sql string the read
---@param ... any its parameters
---@return table|nil rows
---@return qx.Error|nil err
---@return integer|nil gen the generation read after the rows (db only)
---@return boolean|table|nil sealed what was opened: true (all), { found, subjects } (those
---   left), false or nil (the rows' sealed values are to be found)
function _M.read(q, sql, ...)
    if q._tx or not q.pool then return q:query(sql, ...) end
    local conn, e = q.pool:acquire()
    if not conn then return nil, e end
    local st = { sql, ... }
    st.n = select("#", ...)
    local cache = read_caches[q]
    if cache then
        st.open_sealed = { keys = cache.keys, forgotten = forgotten, prefix = PREFIX,
                           aad_head = AAD_HEAD, column = "payload", id_column = "row_id" }
    end
    local stmts = { st, { GEN, n = 0 } }
    local results, be = conn:batch(stmts)
    if results and cache then
        local g = results[2].rows[1]
        if (g and g.gen) ~= cache.gen then
            -- a forget committed since those keys were read: none of them is used
            read_caches[q] = nil
            st.open_sealed = nil
            results, be = conn:batch(stmts)
        end
    end
    conn:release()
    if not results then return nil, be end
    local g = results[2].rows[1]
    g = g and g.gen
    if read_caches[q] == nil and g ~= nil then
        -- no keys yet, but the next read has the generation to open (or pass over) values with
        read_caches[q] = { gen = g, keys = {}, n = 0 }
    end
    return results[1].rows, nil, g, results[1].sealed
end

-- The keys of the subjects (a list) -> { subject = key | false (forgotten) } | nil, err. With
-- gen (a read outside a unit of work) through the db's kept keys.
local function keys_for_read(q, list, gen)
    if gen == nil then
        sort(list)
        local rows, e = q:query(q._tx and KEYS_HELD or KEYS, list)
        if not rows then return nil, e end
        local keys = {}
        for i = 1, #rows do
            local r = rows[i]
            keys[r.subject_id] = r.key ~= null and aead_key(r.key) or false
        end
        return keys
    end
    local cache = read_caches[q]
    if cache == nil or cache.gen ~= gen then
        cache = { gen = gen, keys = {}, n = 0 }
        read_caches[q] = cache
    end
    local keys = cache.keys
    local missing
    for i = 1, #list do
        if keys[list[i]] == nil then
            missing = missing or {}
            missing[#missing + 1] = list[i]
        end
    end
    if missing then
        sort(missing)
        local rows, e = q:query(KEYS_GEN, missing)
        if not rows then return nil, e end
        local now = rows[1] and rows[1].gen
        if now ~= cache.gen or cache.n + #missing > CACHE_MAX then
            cache = { gen = now, keys = {}, n = 0 }
            read_caches[q] = cache
            keys = cache.keys
            -- what this read already had from the cache is asked again, under the new gen
            if now ~= gen then
                sort(list)
                return keys_for_read(q, list, now)
            end
        end
        -- (a subject without any row stays unknown: its values are invalid, and asked again)
        for i = 1, #rows do
            local r = rows[i]
            if r.subject_id ~= null then
                keys[r.subject_id] = r.key ~= null and aead_key(r.key) or false
            end
        end
        cache.n = cache.n + #missing
    end
    return keys
end

-- Opens the values that found (table index, field, ...) points at in tables, with the keys of
-- subjects (a list).
local function open_found(q, tables, ids, gen, found, subjects)
    local keys, e = keys_for_read(q, subjects, gen)
    if not keys then return nil, e end
    local ok, why = open_sealed(tables, found, ids, keys, forgotten, AAD_HEAD, PREFIX)
    if not ok then return nil, new_error("invalid", why) end
    return true
end

--- Opens the sealed fields of tables in place: tables[i] holds event ids[i]'s fields side by
-- side (a record, an event, an envelope's payload). One query for the keys of every subject
-- met, none when nothing is sealed; the values are found and opened in C (core.sealed_find,
-- core.open_sealed), under key objects that keep their key schedule. A forgotten subject's
-- fields become qx.forgotten.
---@param q table a db or a unit of work (then the keys are held until its commit)
---@param tables table list of field tables
---@param ids table|nil list of event ids (nil: tables[i].event_id)
---@param gen integer|nil the generation _M.read returned (a read outside a unit of work)
---@return true|nil ok
---@return qx.Error? err invalid (tampered, or no key), or the query's
function _M.open_all(q, tables, ids, gen)
    local list, found, k = sealed_find(tables, PREFIX)
    if list == nil then return true end
    if list == false then
        local i = found
        return nil, new_error("invalid", fmt("field '%s' of event %s: malformed sealed value",
            tostring(k), tostring(ids and ids[i] or tables[i].event_id)))
    end
    return open_found(q, tables, ids, gen, found, list)
end

--- Opens what _M.read left sealed in the records made of its rows (all of them, when it did not
-- say what it left).
---@param q table the db
---@param records table
---@param gen integer the generation _M.read returned
---@param sealed boolean|table|nil what _M.read returned about them
---@param record_of table|nil row index -> record index, when they differ
---@return true|nil ok
---@return qx.Error? err
function _M.open_read(q, records, gen, sealed, record_of)
    if sealed == true then return true end
    if type(sealed) ~= "table" then return _M.open_all(q, records, nil, gen) end
    local found = sealed.found
    if record_of then
        local out, n = {}, 0
        for j = 1, #found, 2 do
            local i = record_of[found[j]]
            if i then
                out[n + 1], out[n + 2] = i, found[j + 1]
                n = n + 2
            end
        end
        found = out
    end
    return open_found(q, records, nil, gen, found, sealed.subjects)
end

--- Whether a table holds a sealed value (one level).
---@param t table
---@return boolean
function _M.has_sealed(t)
    return prefixed_key(t, PREFIX) ~= nil
end

return _M

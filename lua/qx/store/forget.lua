--- qx.forget(db, subject_id): a data subject's key is deleted and a tombstone left, in one
-- transaction that also drops the snapshots of the streams holding its personal data and runs
-- the projections' on_forget hooks. See docs/erasure.md.
local core = require "qx.core"
local qx_error = require "qx.error"
local options = require "qx.options"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local xpcall = xpcall
local is_uuid = core.is_uuid
local new_error = qx_error.new

local _M = {}

-- The tombstone is written whether or not the subject ever had a key: personal data of it
-- recorded later is refused all the same.
local FORGET = [[
INSERT INTO qx_subject_keys (subject_id, key, forgotten_at) VALUES ($1::uuid, NULL, now())
ON CONFLICT (subject_id) DO UPDATE
   SET key = NULL, forgotten_at = COALESCE(qx_subject_keys.forgotten_at, now())]]

local BUMP = "UPDATE qx_subject_keys_generation SET n = n + 1"

local DROP_SNAPSHOTS = [[
DELETE FROM qx_aggregate_snapshots s USING qx_subject_streams m
 WHERE m.subject_id = $1::uuid AND s.aggregate_type = m.aggregate_type
   AND s.aggregate_id = m.aggregate_id]]

-- db handle -> { projection = prepare | true }: the projections with an on_forget hook made on
-- that db, each with what makes it ready before its hook runs (a version's tables)
local hooked = setmetatable({}, { __mode = "k" })

--- Registers a projection's on_forget hook with its db (qx.projection does it).
---@param db table the projection's db
---@param projection table a projection with on_forget
---@param prepare (fun(projection: table): (true|nil, qx.Error?))|nil makes it ready (outside
--- the forget's transaction) before its hook first runs
function _M.register(db, projection, prepare)
    local set = hooked[db]
    if set == nil then
        set = setmetatable({}, { __mode = "k" })
        hooked[db] = set
    end
    set[projection] = prepare or true
end

local function run_hook(projection, subject, uow)
    local ok, r1, r2 = xpcall(projection.on_forget, qx_error.handler, subject, uow, projection)
    local failure
    if not ok then
        failure = r1
    elseif (r1 == nil or r1 == false) and r2 ~= nil then
        failure = qx_error.is(r2) and r2 or new_error("error", tostring(r2))
    end
    if failure then
        failure.projection = projection.name
        failure.message = "projection " .. tostring(projection.name) .. ", on_forget: "
            .. tostring(failure.message)
        error(failure, 0)
    end
end

local FORGET_OPTS = { "projections" }

--- Forgets a data subject: its key is deleted (every personal field sealed under it reads
-- qx.forgotten from then on), a tombstone refuses its personal data later, the snapshots of
-- the streams that held its personal data are dropped, and the on_forget hooks of the
-- projections made on this db (and of opts.projections) run, all in one transaction.
-- Forgetting a subject twice is harmless.
---@param db table from qx.connect
---@param subject_id string the subject's uuid
---@param opts table|nil { projections = { projection, ... } } hooks to run besides the db's
---@return true|nil ok
---@return qx.Error? err invalid (not a uuid), a hook's failure, or the database's
function _M.forget(db, subject_id, opts)
    if type(db) ~= "table" or not db.pool then
        options.raise("qx.forget: db must come from qx.connect")
    end
    if opts ~= nil and type(opts) ~= "table" then
        options.raise("qx.forget: options must be a table")
    end
    options.check(opts, FORGET_OPTS, "qx.forget")
    if not is_uuid(subject_id) then
        return nil, new_error("invalid", "qx.forget: the subject id must be a uuid, got "
            .. (type(subject_id) == "string" and ("%q"):format(subject_id) or type(subject_id)))
    end
    local list, seen, prepares = {}, {}, {}
    for p, prepare in pairs(hooked[db] or {}) do
        seen[p] = true
        list[#list + 1] = p
        if prepare ~= true then prepares[p] = prepare end
    end
    for _, p in ipairs(opts and opts.projections or {}) do
        if type(p) ~= "table" or type(p.on_forget) ~= "function" then
            options.raise("qx.forget: projections must be projections with an on_forget hook")
        end
        if not seen[p] then
            seen[p] = true
            list[#list + 1] = p
            local prepare = hooked[p.db] and hooked[p.db][p]
            if prepare and prepare ~= true then prepares[p] = prepare end
        end
    end
    -- by name, a projection's versions by their checkpoint row
    table.sort(list, function(a, b)
        return tostring(a.key or a.name) < tostring(b.key or b.name)
    end)
    for i = 1, #list do
        local prepare = prepares[list[i]]
        if prepare then
            local ok, e = prepare(list[i])
            if not ok then
                if not qx_error.is(e) then e = new_error("error", tostring(e)) end
                e.projection = list[i].name
                e.message = "projection " .. tostring(list[i].name) .. ", before on_forget: "
                    .. tostring(e.message)
                return nil, e
            end
        end
    end
    local subject = subject_id:lower()
    return db:unit_of_work(function(uow)
        -- waits for transactions that hold the key (writing or projecting with it)
        local n, e = uow:exec(FORGET, subject)
        if not n then error(e, 0) end
        n, e = uow:exec(DROP_SNAPSHOTS, subject)
        if not n then error(e, 0) end
        -- readers' kept keys are dropped once this commits (docs/erasure.md)
        local ok, qe = uow:queue(BUMP)
        if not ok then error(qe, 0) end
        for i = 1, #list do run_hook(list[i], subject, uow) end
        return true
    end)
end

return _M

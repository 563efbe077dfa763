--- qx.outbox(db): the transactional outbox table as a repository (python-outbox-core's
-- IOutboxRepository and more). Rows are written by units of work; a relay reads and marks them.
--
-- A row is pending while published_at and dead_at are both NULL. A failed attempt
-- (record_failure) counts attempts, keeps last_error and schedules the next attempt with
-- exponential backoff; mark_failed dead-letters a row at once; retry_dead brings dead letters
-- back.
local core = require "qx.core"
local err = require "qx.error"
local options = require "qx.options"

local setmetatable = setmetatable
local type = type
local ipairs = ipairs
local error = error
local tostring = tostring
local is_uuid = core.is_uuid
local floor = math.floor

local _M = { _VERSION = "0.1.0" }

--- The outbox table (qx.outbox).
---@class qx.Outbox
local Outbox = {}
Outbox.__index = Outbox

local MAX_LIMIT = 10000
local ROW_COLUMNS = [[id::text AS id, event_name, event_version, payload,
    occurred_at::text AS occurred_at, correlation_id::text AS correlation_id,
    causation_id::text AS causation_id, tenant_id::text AS tenant_id,
    published_at::text AS published_at, attempts, last_error, seq, partition_key,
    next_attempt_at::text AS next_attempt_at, dead_at::text AS dead_at]]

--- The outbox of a database (qx.outbox).
---@param db qx.Db
---@return qx.Outbox
function _M.new(db)
    if type(db) ~= "table" or not db.pool then
        error("qx.outbox: expected a db from qx.connect", 2)
    end
    return setmetatable({ db = db }, Outbox)
end

local function check_limit(v, name, dflt, max)
    if v == nil then return dflt end
    if type(v) ~= "number" or v % 1 ~= 0 or v < 0 or (max and v > max) then
        error(name .. " must be an integer between 0 and " .. (max or "any"), 3)
    end
    return v
end

-- Ids as a Postgres uuid[] literal parameter, after checking each one.
local function id_list(ids)
    if type(ids) == "string" then ids = { ids } end
    if type(ids) ~= "table" then
        return nil, err.new("invalid", "expected an id or a list of ids")
    end
    for i, id in ipairs(ids) do
        if not is_uuid(id) then
            return nil, err.new("invalid", "id " .. i .. " is not a uuid: " .. tostring(id))
        end
    end
    return "{" .. table.concat(ids, ",") .. "}", #ids
end

--- Pending rows, oldest first. By default rows waiting for their next attempt are left out.
---@param opts table|nil { limit = 100, offset = 0, include_scheduled = false }
---@return table|nil rows
---@return qx.Error? err
function Outbox:get_unpublished(opts)
    opts = options.check(opts, { "limit", "offset", "include_scheduled" }, "get_unpublished")
    local limit = check_limit(opts.limit, "limit", 100, MAX_LIMIT)
    local offset = check_limit(opts.offset, "offset", 0)
    local sql = "SELECT " .. ROW_COLUMNS .. [[ FROM qx_outbox_events
WHERE published_at IS NULL AND dead_at IS NULL]] ..
        (opts.include_scheduled and ""
         or " AND (next_attempt_at IS NULL OR next_attempt_at <= now())") ..
        " ORDER BY seq LIMIT $1 OFFSET $2"
    return self.db:query(sql, limit, offset)
end

--- How many rows are pending (scheduled ones included).
---@return integer|nil pending rows
---@return qx.Error? err
function Outbox:count_unpublished()
    local rows, e = self.db:query(
        "SELECT count(*) AS n FROM qx_outbox_events WHERE published_at IS NULL AND dead_at IS NULL")
    if not rows then return nil, e end
    return rows[1].n
end

--- Marks rows published.
---@param ids string|table an id or a list of ids
---@return integer|nil number of rows marked
---@return qx.Error? err
function Outbox:mark_published(ids)
    local list, e = id_list(ids)
    if not list then return nil, e end
    return self.db:exec([[
UPDATE qx_outbox_events SET published_at = now(), next_attempt_at = NULL
WHERE id = ANY($1::uuid[]) AND published_at IS NULL]], list)
end

--- A retryable failure: attempts + 1, last_error kept, next attempt after an exponential backoff;
-- with max_attempts, the row is dead-lettered once it has failed that many times.
---@param id string
---@param message string
---@param opts table|nil { base_delay_ms = 500, max_delay_ms = 60000, max_attempts = nil }
---@return integer|nil rows updated (0: no such pending row)
---@return qx.Error? err
function Outbox:record_failure(id, message, opts)
    opts = options.check(opts, { "base_delay_ms", "max_delay_ms", "max_attempts" },
                         "record_failure")
    if not is_uuid(id) then return nil, err.new("invalid", "id is not a uuid: " .. tostring(id)) end
    local base = check_limit(opts.base_delay_ms, "base_delay_ms", 500)
    local max = check_limit(opts.max_delay_ms, "max_delay_ms", 60000)
    local max_attempts = opts.max_attempts and check_limit(opts.max_attempts, "max_attempts", nil)
    return self.db:exec([[
UPDATE qx_outbox_events SET
    attempts = attempts + 1,
    last_error = left($2, 2048),
    next_attempt_at = now() + make_interval(secs => least($4::float8,
        $3::float8 * power(2, least(attempts, 30))) / 1000.0),
    dead_at = CASE WHEN $5::int IS NOT NULL AND attempts + 1 >= $5::int THEN now() END
WHERE id = $1 AND published_at IS NULL AND dead_at IS NULL]],
        id, tostring(message or ""), base, max, max_attempts)
end

--- Dead-letters the row now (it is no longer pending).
---@param id string
---@param message string
---@return integer|nil rows marked
---@return qx.Error? err
function Outbox:mark_failed(id, message)
    if not is_uuid(id) then return nil, err.new("invalid", "id is not a uuid: " .. tostring(id)) end
    return self.db:exec([[
UPDATE qx_outbox_events SET attempts = attempts + 1, last_error = left($2, 2048), dead_at = now()
WHERE id = $1 AND published_at IS NULL AND dead_at IS NULL]], id, tostring(message or ""))
end

--- Dead letters, oldest first.
---@param opts table|nil { limit = 100, offset = 0 }
---@return table|nil rows
---@return qx.Error? err
function Outbox:get_dead(opts)
    opts = options.check(opts, { "limit", "offset" }, "get_dead")
    local limit = check_limit(opts.limit, "limit", 100, MAX_LIMIT)
    local offset = check_limit(opts.offset, "offset", 0)
    return self.db:query("SELECT " .. ROW_COLUMNS ..
        " FROM qx_outbox_events WHERE dead_at IS NOT NULL ORDER BY seq LIMIT $1 OFFSET $2",
        limit, offset)
end

--- Makes dead letters pending again.
---@param ids string|table|nil an id, a list, or nil for every dead letter
---@return integer|nil rows made pending
---@return qx.Error? err
function Outbox:retry_dead(ids)
    if ids == nil then
        return self.db:exec([[
UPDATE qx_outbox_events SET dead_at = NULL, next_attempt_at = NULL, attempts = 0
WHERE dead_at IS NOT NULL]])
    end
    local list, e = id_list(ids)
    if not list then return nil, e end
    return self.db:exec([[
UPDATE qx_outbox_events SET dead_at = NULL, next_attempt_at = NULL, attempts = 0
WHERE dead_at IS NOT NULL AND id = ANY($1::uuid[])]], list)
end

--- Deletes published rows; pending and dead rows stay.
---@param opts table { published_before = "2026-01-01T00:00:00Z" } or { older_than_seconds = n }
---@return integer|nil rows deleted
---@return qx.Error? err
function Outbox:purge(opts)
    if type(opts) ~= "table" then error("purge: expected { published_before = ... }", 2) end
    options.check(opts, { "published_before", "older_than_seconds" }, "purge")
    if opts.published_before ~= nil then
        if type(opts.published_before) ~= "string" then
            error("purge: published_before must be a timestamp string", 2)
        end
        return self.db:exec([[
DELETE FROM qx_outbox_events WHERE published_at IS NOT NULL AND published_at < $1::timestamptz]],
            opts.published_before)
    elseif opts.older_than_seconds ~= nil then
        local s = opts.older_than_seconds
        if type(s) ~= "number" or s < 0 then error("purge: older_than_seconds must be >= 0", 2) end
        return self.db:exec([[
DELETE FROM qx_outbox_events
WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1::float8)]], s)
    end
    error("purge: give published_before or older_than_seconds", 2)
end

--- Rows by state: { pending, scheduled, dead, published, oldest_pending_age_seconds,
-- max_attempts }.
---@return table|nil status
---@return qx.Error? err
function Outbox:status()
    local rows, e = self.db:query([[
SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS pending,
       count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL
                        AND next_attempt_at > now()) AS scheduled,
       count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
       count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
       coalesce(extract(epoch FROM now() - min(occurred_at)
                FILTER (WHERE published_at IS NULL AND dead_at IS NULL)), 0)::float8
           AS oldest_pending_age_seconds,
       coalesce(max(attempts) FILTER (WHERE published_at IS NULL AND dead_at IS NULL), 0)
           AS max_attempts
FROM qx_outbox_events]])
    if not rows then return nil, e end
    local r = rows[1]
    r.oldest_pending_age_seconds = floor(r.oldest_pending_age_seconds * 1000 + 0.5) / 1000
    return r
end

_M.Outbox = Outbox
return _M

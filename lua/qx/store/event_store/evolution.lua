--- Internal to qx.store.event_store: what a deploy that changed its event or aggregate classes
-- runs against the stored data. store:check() lists the stored (name, version) pairs the store's
-- registry cannot read; store:rebuild_snapshots(Class) rewrites an aggregate type's snapshots
-- from its events, batch by batch. See docs/evolution.md.
local core = require "qx.core"
local qx_error = require "qx.error"
local options = require "qx.options"
local registry = require "qx.model.registry"
local es_class = require "qx.model.event_sourced"
local reads = require "qx.store.event_store.reads"
local personal = require "qx.store.personal"

local type = type
local ipairs = ipairs
local error = error
local tostring = tostring
local getmetatable = getmetatable
local floor = math.floor
local fmt = string.format
local clock = core.clock
local null = core.null
local Store = reads.Store

local _M = {}

-- every stored (name, version) pair once, with how many events carry it
local STORED_PAIRS = [[
SELECT event_name, payload->'event_version' AS event_version, count(*) AS n
FROM qx_aggregate_events GROUP BY 1, 2 ORDER BY 1, 2]]

local function check_store(self, method)
    if getmetatable(self) ~= Store then
        error("store:" .. method .. ": call as store:" .. method .. "(...)", 3)
    end
    if not self.db then
        error("store:" .. method .. ": this store has no db (qx.event_store{ db = db })", 3)
    end
end


--- Every stored (event name, version) that the store's registry cannot read: a version below
-- the start of its class's upcaster chain, or above the class's version (written by a newer
-- deploy). Names the registry does not know (neither a class's name nor an alias) are listed
-- apart. The report: { ok, unreadable = { { event_name, event_version, count, reason } },
-- unknown = { { event_name, count } }, pairs = n }.
---@return table|nil report
---@return qx.Error? err
function Store:check()
    check_store(self, "check")
    local reg = self.registry
    if reg == nil then
        error("store:check: this store has no registry (qx.event_store{ registry = ... })", 2)
    end
    local rows, e = self.db:query(STORED_PAIRS)
    if not rows then
        return nil, e
    end
    local report = { ok = true, unreadable = {}, unknown = {}, pairs = #rows }
    local unknown = {}
    for _, r in ipairs(rows) do
        local name, version = r.event_name, r.event_version
        if version == null then version = nil end
        local class = reg:reader(name, version)
        if class == nil then
            local u = unknown[name]
            if u == nil then
                u = { event_name = name, count = 0 }
                unknown[name] = u
                report.unknown[#report.unknown + 1] = u
            end
            u.count = u.count + r.n
        else
            local ok, why = registry.readable(class, version)
            if not ok then
                report.ok = false
                report.unreadable[#report.unreadable + 1] = {
                    event_name = name, event_version = version, count = r.n,
                    reason = fmt("%s v%s (read as %s v%d): %s", name, tostring(version),
                                 class.event_name, class.event_version, why),
                }
            end
        end
    end
    return report
end


-- the snapshots to rewrite: of another state version (or all), in id order after $2
local STALE = [[
SELECT aggregate_id, tenant_id FROM qx_aggregate_snapshots
WHERE aggregate_type = $1 AND aggregate_id > $2
  AND ($3::boolean OR state_version IS DISTINCT FROM $4::int)
ORDER BY aggregate_id LIMIT $5]]

local COUNT_STALE = [[
SELECT count(*) AS n FROM qx_aggregate_snapshots
WHERE aggregate_type = $1 AND ($2::boolean OR state_version IS DISTINCT FROM $3::int)]]

-- the rebuilt snapshot replaces the stored one, also at the same version (the state changed)
local WRITE = [[
INSERT INTO qx_aggregate_snapshots
    (id, aggregate_type, aggregate_id, state, version, taken_at, tenant_id, state_version)
VALUES ($1::uuid, $2, $3, $4::jsonb, $5, now(), $6, $7)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
SET state = EXCLUDED.state, version = EXCLUDED.version, taken_at = EXCLUDED.taken_at,
    state_version = EXCLUDED.state_version
WHERE qx_aggregate_snapshots.version <= EXCLUDED.version]]

local REBUILD_OPTS = { "batch", "all", "on_progress" }
local MAX_BATCH = 10000


-- One batch in one unit of work: each aggregate loaded from its events alone and its snapshot
-- written at its version with the class's snapshot_version. -> n, last id | nil, err
local function rebuild_batch(self, class, after, all, batch)
    local spec = es_class.spec(class)
    local n, last = 0, after
    local ok, e = self.db:unit_of_work(function(uow)
        local rows, qe = uow:query(STALE, class.aggregate_type, after, all,
                                   spec.snapshot_version, batch)
        if not rows then error(qe, 0) end
        local es = uow:store(self)
        for _, r in ipairs(rows) do
            local agg, le = es:load(class, r.aggregate_id, { snapshot = false })
            if not agg then
                le = le or qx_error.new("not_found", "no events")
                le.message = fmt("%s %s: %s", class.aggregate_type, r.aggregate_id,
                                 tostring(le.message))
                le.aggregate_id = r.aggregate_id
                error(le, 0)
            end
            local state = agg:snapshot()
            if type(state) ~= "table" then
                error(qx_error.new("invalid", tostring(agg) .. ": snapshot() must return a table"),
                      0)
            end
            -- (qx.forgotten stored as its text; the load held the subjects' keys, so a forget
            -- waits for this commit and then drops what it wrote: docs/erasure.md)
            local wok, we = uow:queue(WRITE, core.uuid(), class.aggregate_type, r.aggregate_id,
                                      personal.snapshot_out(state), agg.version,
                                      r.tenant_id ~= null and r.tenant_id or nil,
                                      spec.snapshot_version)
            if not wok then error(we, 0) end
            n, last = n + 1, r.aggregate_id
        end
        return true
    end)
    if not ok then return nil, e end
    return n, last
end


--- Rewrites the snapshots of an event-sourced class's aggregate type that were taken with
-- another snapshot_version (all = true: every one), each from the aggregate's events, in
-- batches of `batch` (100) aggregates, one unit of work each. on_progress(info) after each
-- batch: { aggregate_type, done, total, elapsed_seconds }. A failing aggregate (events the
-- classes cannot read) stops it with nil, err naming it; the batches before it are kept.
---@param class table an event-sourced class
---@param opts table|nil { batch = 100, all = false, on_progress = fn(info) }
---@return table|nil result { rebuilt = n, total = n }
---@return qx.Error? err
function Store:rebuild_snapshots(class, opts)
    check_store(self, "rebuild_snapshots")
    if not es_class.is_class(class) then
        error("store:rebuild_snapshots: expected an event-sourced class, got " .. type(class), 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("store:rebuild_snapshots: options must be a table", 2)
    end
    opts = options.check(opts, REBUILD_OPTS, "store:rebuild_snapshots")
    local batch = opts.batch or 100
    if type(batch) ~= "number" or batch ~= floor(batch) or batch < 1 or batch > MAX_BATCH then
        error("store:rebuild_snapshots: batch must be an integer from 1 to " .. MAX_BATCH, 2)
    end
    if opts.all ~= nil and type(opts.all) ~= "boolean" then
        error("store:rebuild_snapshots: all must be a boolean", 2)
    end
    local progress = opts.on_progress
    if progress ~= nil and type(progress) ~= "function" then
        error("store:rebuild_snapshots: on_progress must be a function", 2)
    end
    local all = opts.all == true
    local spec = es_class.spec(class)
    local rows, e = self.db:query(COUNT_STALE, class.aggregate_type, all, spec.snapshot_version)
    if not rows then return nil, e end
    local total, done = rows[1].n, 0
    local started = clock()
    local after = ""
    while true do
        local n, last = rebuild_batch(self, class, after, all, batch)
        if not n then return nil, last end
        done, after = done + n, last
        if n > 0 and progress then
            progress({ aggregate_type = class.aggregate_type, done = done,
                       total = total > done and total or done,
                       elapsed_seconds = clock() - started })
        end
        if n < batch then break end
    end
    return { rebuilt = done, total = total > done and total or done }
end


return _M

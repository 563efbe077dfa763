--- Internal to qx.consumer: commit = "batch". The fetched batch is handled in one unit of work:
-- the inbox rows of the whole batch in one statement, each message's handler in a savepoint of
-- its own, one commit, then the replies. A message whose handler fails is rolled back to its
-- savepoint and takes the normal nak/dead-letter path while the rest commit; the later messages
-- of its partition key (header qx.partition_key, set by the relay) are held: not applied, and
-- negatively acknowledged with the same delay, so they come back with it and per-key order is
-- kept. The argument and the contract: docs/consumer.md, "Committing a batch at once".
local core = require "qx.core"
local err = require "qx.error"
local internal = require "qx.store.internal"
local base = require "qx.messaging.consumer.base"

local pairs = pairs
local error = error
local tonumber = tonumber
local tostring = tostring
local min = math.min
local fmt = string.format
local is_uuid = core.is_uuid
local Consumer = base.Consumer
local stamp_recorded = internal.stamp_recorded

local KEY_HEADER = "qx.partition_key"

-- The batch's inbox rows in one statement; the event ids it returns are the new ones, the rest
-- were recorded by an earlier delivery.
local INBOX_INSERT_BATCH = [[
INSERT INTO qx_inbox (consumer, event_id, event_name)
SELECT $1, r.id, r.name FROM jsonb_to_recordset($2::jsonb) AS r(id uuid, name text)
ON CONFLICT (consumer, event_id) DO NOTHING
RETURNING event_id::text AS id]]

-- The inbox rows of messages that were not applied (failed or held) go again before the
-- commit, so that their redelivery runs the handler.
local INBOX_FORGET = [[
DELETE FROM qx_inbox WHERE consumer = $1
AND event_id IN (SELECT r.id FROM jsonb_to_recordset($2::jsonb) AS r(id uuid))]]

-- Screens the fetched messages as the per-message mode does (a body that is no event, an id the
-- inbox cannot key on, a delivery past max_deliver: dead-lettered at once) and returns the rest
-- as items { m, ev, env, key, delivered, info }.
function Consumer:_batch_items(msgs, counts)
    local items = {}
    for i = 1, #msgs do
        local m = msgs[i]
        -- (env: an envelope whose sealed fields the savepoint opens before reading it)
        local ev, env = self:_decode(m.data)
        local e = not ev and env or nil
        local delivered = tonumber(m.delivered) or 1
        if not ev then
            self:_dead(m, e.code == "not_found" and "unknown_event" or "invalid_message", e, counts)
        elseif self.inbox and not is_uuid(ev.event_id) then
            self:_dead(m, "invalid_message", err.new("invalid", "event_id " .. tostring(ev.event_id)
                .. " is not a uuid (the inbox keys on it)"), counts, ev)
        elseif delivered > self.max_deliver then
            self:_dead(m, "max_deliver", err.new("error", fmt(
                "delivery %d: no reply within %d deliveries", delivered, self.max_deliver)),
                counts, ev)
        else
            local h = m.headers
            local key = h and h[KEY_HEADER]
            if key == "" then key = nil end
            items[#items + 1] = { m = m, ev = ev, env = env, key = key, delivered = delivered,
                                  info = base.msg_info(self, m) }
        end
    end
    return items
end

-- The delay a failed message is negatively acknowledged with, or nil when it is dead-lettered
-- (its deliveries are spent, or it cannot be read: sealed.lua).
local function retry_delay(self, item)
    if item.delivered >= self.max_deliver then return nil end
    if item.err and item.err.unopenable then return nil end
    local b = self.backoff
    return b[min(item.delivered, #b)]
end

local function ids_json(list)
    local rows = {}
    for i = 1, #list do rows[i] = { id = list[i].ev.event_id, name = list[i].ev.event_name } end
    return rows
end

-- One unit of work for items (each appears once by event id). Fills item.outcome: "handled",
-- "duplicate", "failed" (item.err) or "held" (item.delay); blocked maps a key to the delay of
-- the message that failed on it, and is filled as messages fail. Returns true, or nil and the
-- error when the unit of work as a whole failed (nothing of it is applied then).
function Consumer:_commit_items(handler, items, blocked)
    local name, inbox = self.name, self.inbox
    local uow_opts = { dispatcher = self.dispatcher }
    if self.uow_opts then
        for k, v in pairs(self.uow_opts) do
            if k ~= "context" then uow_opts[k] = v end
        end
    end
    local r, e = self.db:unit_of_work(function(uow)
        local new
        if inbox then
            local rows, ie = uow:query(INBOX_INSERT_BATCH, name, ids_json(items))
            if not rows then error(ie, 0) end
            new = {}
            for i = 1, #rows do new[rows[i].id] = true end
        end
        local stamped, unapplied = {}, nil
        local batch_context, batch_correlation = uow.context, uow.correlation_id
        for i = 1, #items do
            local it = items[i]
            local ev = it.ev
            if inbox and not new[ev.event_id] then
                it.outcome = "duplicate"
            elseif it.key and blocked[it.key] then
                it.outcome, it.delay = "held", blocked[it.key]
            else
                -- the message's own context, as its unit of work would have in the other mode
                local ctx = base.context_of(ev, it.info)
                uow.context = ctx
                uow.correlation_id = ctx.correlation_id or core.uuid()
                local ran = false
                local ok, he = uow:savepoint(function(u)
                    ran = true
                    -- sealed personal fields opened in the savepoint (the keys held until the
                    -- batch commits); one that does not open fails this message alone
                    local read = self:_read_sealed(u, ev, it.env)
                    local hok, herr = base.call_handler(handler, read, u, it.info)
                    if not hok then error(herr, 0) end
                    stamp_recorded(u, stamped)
                    return true
                end)
                if ok then
                    it.outcome = "handled"
                elseif not ran then
                    -- no savepoint: the transaction cannot go on, the whole batch fails
                    error(he, 0)
                else
                    if not err.is(he) then he = err.from_raised(he) end
                    it.outcome, it.err = "failed", he
                    local delay = retry_delay(self, it)
                    -- a message given up on (dead-lettered) no longer holds its key
                    if delay and it.key then blocked[it.key] = delay end
                end
            end
            if inbox and (it.outcome == "failed" or it.outcome == "held") then
                unapplied = unapplied or {}
                unapplied[#unapplied + 1] = it
            end
        end
        -- events a dispatcher records at commit carry no message's context
        uow.context, uow.correlation_id = batch_context, batch_correlation
        if unapplied then
            local ok, fe = uow:queue(INBOX_FORGET, name, ids_json(unapplied))
            if not ok then error(fe, 0) end
        end
        return true
    end, uow_opts)
    if r == nil then return nil, e end
    self.totals.batch_commits = self.totals.batch_commits + 1
    return true
end

-- The replies, after the outcome is known.
function Consumer:_answer_item(it, counts)
    local o = it.outcome
    if o == "handled" then
        counts.handled = counts.handled + 1
        self:_reply("ack", it.m)
    elseif o == "duplicate" then
        counts.duplicates = counts.duplicates + 1
        self:_reply("ack", it.m)
    elseif o == "held" then
        counts.held = counts.held + 1
        self:_reply("nak", it.m, it.delay)
    elseif it.err and it.err.unopenable then
        -- it cannot be read (sealed.lua): dead-lettered at once, as in the per-message path
        self:_dead(it.m, "invalid_message", it.err, counts, it.ev)
    else
        counts.failed = counts.failed + 1
        self.last_error = it.err
        local delay = retry_delay(self, it)
        if delay then
            self:_reply("nak", it.m, delay)
        else
            self:_dead(it.m, "max_deliver", it.err, counts, it.ev)
        end
    end
end

-- Every item of a unit of work that failed as a whole, failed with e (held ones stay held).
local function all_failed(items, e)
    for i = 1, #items do
        local it = items[i]
        if it.outcome ~= "held" and it.outcome ~= "duplicate" then
            it.outcome, it.err = "failed", e
        end
    end
end

--- Handles a fetched batch in one unit of work and answers every message (run_once with
-- commit = "batch").
function Consumer:_process_batch(handler, msgs, counts)
    local items = self:_batch_items(msgs, counts)
    if items[1] == nil then return end
    -- a message twice in one batch (a producer published it twice): the first is handled, the
    -- later copies follow its fate
    local first_of, unique, twins = {}, {}, nil
    local inbox = self.inbox
    for i = 1, #items do
        local it = items[i]
        local id = it.ev.event_id
        local first = inbox and first_of[id]
        if first then
            it.twin_of = first
            twins = twins or {}
            twins[#twins + 1] = it
        else
            if inbox then first_of[id] = it end
            unique[#unique + 1] = it
        end
    end
    local blocked = {}
    local ok, e = self:_commit_items(handler, unique, blocked)
    if not ok then
        if e.code == "unknown_outcome" or #unique == 1 then
            -- an unknown outcome: the redelivery finds the inbox rows if it did commit
            all_failed(unique, e)
        else
            -- the commit itself failed: once more one message a unit of work, so that only
            -- the guilty one fails; keys stay held behind a failure as before
            self.last_error = e
            blocked = {}
            for i = 1, #unique do
                local it = unique[i]
                it.outcome, it.err, it.delay = nil, nil, nil
                local one, oe = self:_commit_items(handler, { it }, blocked)
                if not one then
                    if it.outcome ~= "held" then
                        it.outcome, it.err = "failed", oe
                        local delay = retry_delay(self, it)
                        if delay and it.key then blocked[it.key] = delay end
                    end
                end
            end
        end
    end
    if twins then
        for i = 1, #twins do
            local it, first = twins[i], twins[i].twin_of
            local fo = first.outcome
            if fo == "handled" or fo == "duplicate" then
                it.outcome = "duplicate"
            else
                -- the first copy comes back; this one comes back with it
                it.outcome, it.delay = "held", first.delay or retry_delay(self, first)
                    or self.backoff[1]
            end
        end
    end
    for i = 1, #items do self:_answer_item(items[i], counts) end
end

return Consumer

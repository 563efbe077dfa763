-- Shared by uow, repository and event_store; not public. What the repository and the event
-- store do inside a unit of work beyond its public methods: its transaction (a core tx) and
-- the events it drains at commit.
local pending_list = require("qx.model.aggregate").pending_list

local tostring = tostring
local error = error

local _M = {}

-- Raises (misuse) unless the unit of work is open; level as for error().
function _M.check_open(uow, level)
    if uow._state ~= "active" then
        error("unit of work is " .. uow._state, (level or 1) + 1)
    end
end

-- Queues a statement on the unit of work's transaction, known to be open.
function _M.queue(uow, sql, ...)
    return uow._tx:queue(sql, ...)
end

-- As queue, for a statement whose first row is core.TX_ID_COLUMNS: the commit learns the
-- transaction's id and timeline from it instead of sending a statement of its own.
function _M.queue_id(uow, sql, ...)
    return uow._tx:queue_id(sql, ...)
end

-- How many statements wait for the next send (BEGIN and the timeout not counted).
function _M.queued(uow)
    return uow._tx:queued()
end

-- Round trips the unit of work's transaction made so far.
function _M.round_trips(uow)
    return uow._tx:round_trips()
end

-- Wakes the channel's listeners once the transaction has committed (the core sends the
-- wake-up after the COMMIT, in the same round trip). A channel is notified once however often
-- it is asked for.
function _M.notify_after(uow, channel)
    _M.check_open(uow, 2)
    local list = uow._notify
    if not list then
        uow._notify = { channel }
        return
    end
    for i = 1, #list do
        if list[i] == channel then return end
    end
    list[#list + 1] = channel
end

-- Fills an event's correlation, causation, tenant and actor from the unit of work's context
-- where the event has none.
function _M.stamp(uow, ev)
    local ctx = uow.context
    if ev.correlation_id == nil then ev.correlation_id = uow.correlation_id end
    -- the context first: a field an event lacks is looked up in its methods too
    if ctx.causation_id ~= nil and ev.causation_id == nil then
        ev.causation_id = ctx.causation_id
    end
    if ctx.tenant_id ~= nil and ev.tenant_id == nil then ev.tenant_id = ctx.tenant_id end
    local actor = ctx.actor_id or ctx.user_id
    if actor ~= nil and ev.actor_id == nil then ev.actor_id = tostring(actor) end
end

-- Stamps, from the unit of work's context as it is now, the events recorded so far (loose, and
-- pending in tracked aggregates) that are not in done, and adds them to done (a table the caller
-- keeps). For a unit of work whose context changes between parts of its work: a consumer that
-- commits a batch of messages at once gives each message's events that message's context.
local function stamp_new(uow, list, done)
    for i = 1, #list do
        local ev = list[i]
        if not done[ev] then
            done[ev] = true
            _M.stamp(uow, ev)
        end
    end
end

function _M.stamp_recorded(uow, done)
    if uow._loose then stamp_new(uow, uow._loose, done) end
    local tracked = uow._tracked
    if tracked then
        for i = 1, #tracked do stamp_new(uow, pending_list(tracked[i]), done) end
    end
end

-- The events an aggregate just gave up (pull_events, a list no one else holds), recorded as
-- uow:record would, without its checks (the caller made sure). The list itself becomes the
-- queue of loose events when there is none yet.
function _M.record_list(uow, evs)
    local loose = uow._loose
    if not loose then
        if evs[1] ~= nil then uow._loose = evs end
        return
    end
    local n = #loose
    for i = 1, #evs do loose[n + i] = evs[i] end
end

return _M

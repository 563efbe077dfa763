-- bank.notifier: another service's side. A durable JetStream consumer receives the
-- integration events and writes a notification in a unit of work with qx's inbox: a
-- redelivered or duplicated message is acknowledged without a second notification.
local qx = require "qx"
local account = require "bank.account"

local M = {}

function M.new(db, conn)
    return assert(qx.consumer{
        nats = conn, db = db,
        durable = "bank_notifier",                           -- a new durable reads the whole stream
        filter_subject = conn:subject("bank.public.>"),     -- "<stream prefix>.bank.public.>"
        registry = qx.registry{ account.AccountOpened },    -- the events this service reads
        max_deliver = 5, backoff = { 1000, 5000 },
    })
end

local function notify(ev, uow)
    assert(uow:exec("INSERT INTO bank_notifications (event_id, account_id, text) VALUES ($1, $2, $3)",
                    ev.event_id, ev.account_id, "welcome: your account " .. ev.account_id .. " is open"))
end

-- handle_waiting(consumer) -> totals { fetched, handled, failed, termed, duplicates }: runs
-- until no message came for a second.
function M.handle_waiting(consumer)
    return consumer:run(notify, { idle_timeout_ms = 1000 })
end

-- run(consumer) -> totals | nil, err: the service's loop (run_notifier.lua), until SIGTERM or
-- SIGINT, after the batch in flight.
function M.run(consumer)
    return consumer:run(notify, { handle_signals = true })
end

return M

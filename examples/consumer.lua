-- The receiving side: a service that sends a welcome mail for every registered user.
--
-- It consumes "identity.user.registered" from the JetStream stream the relay publishes to,
-- through a durable pull consumer. The handler runs in a unit of work together with the inbox
-- row of the event, so a redelivered or duplicated message never sends a second mail; a message
-- it cannot read is dead-lettered instead of stopping it.
--
-- Run on its own (it publishes a sample event first, as no relay runs then):
--   QX_DB__URL=postgresql://... QX_NATS__SERVERS=nats://... lua5.4 examples/consumer.lua
local qx = require "qx"
local cjson = require "cjson"

local required_as = ... -- the module name when required, nil when run as a script
local _M = {}

_M.SCHEMA = [[
CREATE TABLE IF NOT EXISTS welcome_mails (
    user_id  uuid PRIMARY KEY,
    email    text NOT NULL,
    sent_at  timestamptz NOT NULL DEFAULT now()
)]]

-- The consuming service declares the events it reads; name and version are the contract.
local UserRegistered = qx.integration_event("identity.user.registered", { version = 1 })
_M.UserRegistered = UserRegistered

_M.DURABLE = "demo_welcome_mailer"

-- The handler: (event, unit of work, message). It fails by raising or returning nil, err; the
-- message then comes back after the backoff delay.
local function send_welcome_mail(ev, uow, msg)
    assert(uow:exec("INSERT INTO welcome_mails (user_id, email) VALUES ($1, $2)",
                    ev.user_id, ev.email))
    _M.sent[#_M.sent + 1] = ("welcome mail to <%s> (event %s, stream seq %s, delivery %s)")
        :format(ev.email, ev.event_id, tostring(msg.stream_seq), tostring(msg.delivered))
    _M.last_event = ev
end

function _M.setup(db)
    local conn = assert(db:acquire())
    local ok, e = conn:script(_M.SCHEMA)
    conn:release()
    return ok, e
end

-- run(db, nats_url, say[, { publish_sample = true }]): receives what is on the stream for this
-- consumer, shows the inbox catching a duplicate and a poison message going to the dead letters.
function _M.run(db, nats_url, say, opts)
    say = say or print
    opts = opts or {}
    assert(_M.setup(db))
    local conn = assert(qx.nats.connect{ servers = nats_url })
    assert(conn:ensure_stream()) -- development only: deployments declare their streams

    if opts.publish_sample then
        local pub = assert(qx.publisher{ nats = conn })
        local ev = UserRegistered{ user_id = qx.uuid(), email = "grace@example.com",
                                   name = "Grace Hopper" }
        assert(pub:publish(ev))
        say("published a sample " .. ev.event_name .. " " .. ev.event_id)
    end

    local consumer = assert(qx.consumer{
        nats = conn,
        durable = _M.DURABLE,
        filter_subject = conn:subject("identity.>"),
        registry = qx.registry{ UserRegistered },
        db = db,
        batch = 50,
        max_deliver = 5,
        backoff = { 1000, 5000, 30000 },
        fetch_timeout_ms = 500,
    })

    _M.sent = {}
    local totals = assert(consumer:run(send_welcome_mail, { idle_timeout_ms = 1500 }))
    for _, line in ipairs(_M.sent) do say(line) end
    say(("received %d message(s): %d handled, %d duplicate(s), %d dead-lettered")
        :format(totals.fetched, totals.handled, totals.duplicates, totals.termed))

    -- The same event once more, as a producer without Nats-Msg-Id would send it: the inbox
    -- already has it, so it is acknowledged and no second mail goes out.
    if _M.last_event then
        assert(conn:publish(conn:subject(_M.last_event.event_name),
                            cjson.encode(_M.last_event:envelope())))
    end
    -- And a message that is not an event at all.
    assert(conn:publish(conn:subject("identity.garbage"), "this is not an envelope"))

    _M.sent = {}
    local r = assert(consumer:run_once(send_welcome_mail, { timeout_ms = 2000 }))
    say(("then: %d handled, %d duplicate(s) acknowledged without a second mail, %d dead-lettered")
        :format(r.handled, r.duplicates, r.termed))
    local dead = assert(consumer:dead_letters{ limit = 10000 })
    local d = dead[#dead]
    if d then
        say(("dead letter: subject %s, reason %s: %s"):format(d.subject, d.reason, d.error))
    end
    local mails = assert(db:query("SELECT count(*) AS n FROM welcome_mails"))[1].n
    say("welcome mails sent in all: " .. tostring(mails))
    consumer:close()
    conn:close()
    return totals
end

if not required_as then
    local db = assert(qx.connect())
    assert(qx.migrate(db))
    _M.run(db, os.getenv("QX_NATS__SERVERS") or os.getenv("QX_TEST_NATS_URL"), print,
           { publish_sample = true })
    db:close()
end

return _M

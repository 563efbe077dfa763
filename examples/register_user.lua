-- A command handler written as a unit of work: register a user.
--
-- The aggregate row, what the in-process handlers write, and the integration event
-- "identity.user.registered" in qx_outbox_events commit together in one transaction - or
-- nothing does. Run on its own:  QX_DB__URL=postgresql://... lua5.4 examples/register_user.lua
local qx = require "qx"

local required_as = ... -- the module name when required, nil when run as a script
local _M = {}

_M.SCHEMA = [[
CREATE TABLE IF NOT EXISTS users (
    id         uuid PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text NOT NULL,
    is_active  boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz,
    created_by text,
    updated_by text,
    version    integer NOT NULL DEFAULT 1,
    tenant_id  uuid,
    deleted_at timestamptz,
    deleted_by text
);
CREATE TABLE IF NOT EXISTS user_audit (
    user_id  uuid NOT NULL,
    what     text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
)]]

-- Events: a domain event stays in the process; an integration event also goes to the outbox.
local UserRegistered = qx.integration_event("identity.user.registered", { version = 1 })
local WelcomePlanned = qx.event("identity.user.welcome_planned")
_M.UserRegistered = UserRegistered

-- The aggregate: plain Lua, no I/O.
local User = qx.aggregate("User")
_M.User = User

function User.register(email, name)
    if type(email) ~= "string" or not email:find("^[^@%s]+@[^@%s]+$") then
        return nil, qx.error.new("invalid", "email is not valid: " .. tostring(email))
    end
    local user = User.new{ email = email:lower(), name = name, is_active = true }
    user:record(UserRegistered{ user_id = user.id, email = user.email, name = name })
    user:record(WelcomePlanned{ user_id = user.id })
    return user
end

-- In-process handlers run inside the transaction and may write through the same unit of work.
local dispatcher = qx.dispatcher()
dispatcher:on(WelcomePlanned, function(ev, uow)
    assert(uow:queue("INSERT INTO user_audit (user_id, what) VALUES ($1, $2)",
                     ev.user_id, "welcome mail planned"))
end)
_M.dispatcher = dispatcher

-- The command handler: returns the new user's id, or nil, err (and then nothing was written).
function _M.register_user(db, cmd, context)
    return db:unit_of_work(function(uow)
        local user = assert(User.register(cmd.email, cmd.name))
        assert(uow:queue([[INSERT INTO users (id, email, name, is_active, created_by, tenant_id)
                           VALUES ($1, $2, $3, $4, $5, $6)]],
                         user.id, user.email, user.name, user.is_active,
                         context and context.user_id, context and context.tenant_id))
        uow:track(user)
        return user.id
    end, { context = context, dispatcher = dispatcher })
end

function _M.setup(db)
    local conn = assert(db:acquire())
    local ok, e = conn:script(_M.SCHEMA)
    conn:release()
    return ok, e
end

-- What the demo shows.
function _M.run(db, say)
    say = say or print
    assert(_M.setup(db))
    local tenant = qx.uuid()
    local ctx = { tenant_id = tenant, user_id = "admin@example.com", correlation_id = qx.uuid() }
    local email = "ada." .. qx.uuid():sub(-12) .. "@example.com"

    local id, e = _M.register_user(db, { email = email, name = "Ada Lovelace" }, ctx)
    assert(id, tostring(e))
    say("registered user " .. id .. " <" .. email .. ">")

    local rows = assert(db:query([[
SELECT event_name, event_version, correlation_id::text AS correlation_id,
       tenant_id::text AS tenant_id, partition_key, payload
FROM qx_outbox_events WHERE payload->'payload'->>'user_id' = $1]], id))
    for _, r in ipairs(rows) do
        say(("outbox row: %s v%d partition=%s tenant=%s"):format(
            r.event_name, r.event_version, r.partition_key, r.tenant_id))
        say("  envelope: " .. require("cjson").encode(r.payload))
    end
    local audit = assert(db:query("SELECT what FROM user_audit WHERE user_id = $1", id))
    say("in-process handler wrote: " .. (audit[1] and audit[1].what or "nothing"))

    -- The same email again: the unique constraint fails the unit of work; nothing is written,
    -- not even the outbox event.
    local again, err = _M.register_user(db, { email = email, name = "Ada again" }, ctx)
    if again == nil and err.code == "conflict" then
        say(("registering %s again -> conflict: that email is already registered"):format(email))
    else
        say(("registering %s again -> %s (%s)"):format(email, tostring(again), tostring(err)))
    end
    local n = assert(db:query([[
SELECT count(*) AS n FROM qx_outbox_events WHERE payload->'payload'->>'email' = $1]], email))
    say("outbox events for that email: " .. n[1].n .. " (the failed command left none)")

    -- Bad input is refused before any SQL runs.
    local bad, berr = _M.register_user(db, { email = "not an email", name = "X" }, ctx)
    say("invalid email -> " .. tostring(bad) .. " (" .. tostring(berr) .. ")")
    return id
end

if not required_as then
    local db = assert(qx.connect())
    assert(qx.migrate(db))
    _M.run(db, print)
    db:close()
end

return _M

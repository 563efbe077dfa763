-- The demo: every example, end to end, on the throwaway PostgreSQL and NATS that `make demo`
-- starts (QX_DB__URL and QX_TEST_NATS_URL come from there).
package.path = "examples/?.lua;" .. package.path
local qx = require "qx"

-- "== title (where it comes from) ====": each section names the example file it runs
local function section(title, from)
    title = title .. " (" .. from .. ")"
    print("")
    print("== " .. title .. " " .. string.rep("=", math.max(3, 72 - #title)))
end

local db = assert(qx.connect())
section("migrate qx's tables", "qx.migrate")
local m = assert(qx.migrate(db))
print(("schema at version %d (%d step(s) applied now)"):format(m.current, #m.applied))

section("register a user: a unit of work with the outbox", "examples/register_user.lua")
require("register_user").run(db, print)

section("read users through a repository", "examples/users_read.lua")
require("users_read").run(db, print)

section("an event-sourced bank account and its projection", "examples/bank_account.lua")
require("bank_account").run(db, print)

local nats_url = os.getenv("QX_NATS__SERVERS") or os.getenv("QX_TEST_NATS_URL")
section("the relay publishes committed events to NATS", "examples/relay.lua")
require("relay").run(db, nats_url, print)

section("a consumer receives them, effectively once", "examples/consumer.lua")
require("consumer").run(db, nats_url, print)

db:close()
print("")
print("demo finished")

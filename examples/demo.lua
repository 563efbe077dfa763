-- The demo: every example, end to end, on the throwaway PostgreSQL and NATS that `make demo`
-- starts (QX_DB__URL and QX_TEST_NATS_URL come from there).
package.path = "examples/?.lua;" .. package.path
local qx = require "qx"

local function section(title)
    print("")
    print("== " .. title .. " " .. string.rep("=", 72 - #title))
end

local db = assert(qx.connect())
section("migrate")
local m = assert(qx.migrate(db))
print(("schema at version %d (%d step(s) applied now)"):format(m.current, #m.applied))

section("a command handler as a unit of work (transactional outbox)")
require("register_user").run(db, print)

section("the read side through a repository (filters, signed cursors, versions)")
require("users_read").run(db, print)

section("an event-sourced bank account with a balance projection")
require("bank_account").run(db, print)

local nats_url = os.getenv("QX_NATS__SERVERS") or os.getenv("QX_TEST_NATS_URL")
section("the relay: committed outbox events to NATS JetStream")
require("relay").run(db, nats_url, print)

section("a consumer receives them (inbox: effectively once)")
require("consumer").run(db, nats_url, print)

db:close()
print("")
print("demo finished")

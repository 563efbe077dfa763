-- The bank service end to end: schema, a customer, an account with deposits and a refused
-- withdrawal, the balance projection, the relay and the notifier.
--   eval "$(make -s env)"; lua5.4 examples/bank/main.lua
package.path = "examples/?.lua;examples/?/init.lua;" .. package.path
local qx = require "qx"

local db = assert(qx.connect())                        -- QX_DB__URL
assert(require("bank.schema").apply(db))

local customers = require "bank.customers"
local customer = assert(customers.add(db, "Ada Lovelace", "ada@example.com"))

local cmds = require("bank.commands").new(db)
local id = assert(cmds.open(customer))
assert(cmds.deposit(id, 100))
assert(cmds.withdraw(id, 30) == 70)
local none, err = cmds.withdraw(id, 500)
assert(none == nil and err.code == "insufficient_funds" and err.balance == 70)
print("refused: " .. tostring(err))                    -- insufficient_funds: balance 70 is below 500

local balances = require "bank.balances"
assert(balances.new(db):catch_up())
assert(balances.balance(db, id) == 70)

local conn = assert(qx.nats.connect())                 -- QX_NATS__SERVERS
assert(conn:ensure_stream())                           -- development only: deployments declare it
print("published", require("bank.relay").drain(db, conn))

local notifier = require "bank.notifier"
local consumer = notifier.new(db, conn)
local totals = assert(notifier.handle_waiting(consumer))
print(("notifier: %d handled, %d duplicates"):format(totals.handled, totals.duplicates))
local sent = assert(db:query("SELECT text FROM bank_notifications WHERE account_id = $1", id))
assert(#sent == 1, "one notification for the new account")
print(sent[1].text)

consumer:close()
conn:close()
db:close()

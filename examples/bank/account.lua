-- bank.account: the event-sourced Account. Plain Lua, no I/O: its state is the fold of its
-- events; commands check the rules and record events, or return a domain error.
local qx = require "qx"

local M = {}

-- domain events (the account's history, in the event store)
M.Opened = qx.event("bank.account.opened")
M.Deposited = qx.event("bank.account.deposited")
M.Withdrawn = qx.event("bank.account.withdrawn")
-- the integration event other services receive through the outbox and NATS
M.AccountOpened = qx.integration_event("bank.public.account_opened", { version = 1 })

local Account = qx.event_sourced("BankAccount")
M.Account = Account

Account:on(M.Opened, function(self, ev)
    self.customer_id, self.balance = ev.customer_id, 0
end)
Account:on(M.Deposited, function(self, ev) self.balance = self.balance + ev.amount end)
Account:on(M.Withdrawn, function(self, ev) self.balance = self.balance - ev.amount end)

function Account.open(customer_id)
    local acc = Account.new(qx.uuid())
    acc:record(M.Opened{ customer_id = customer_id })
    acc:record(M.AccountOpened{ account_id = acc.id, customer_id = customer_id })
    return acc
end

local function whole(n) return type(n) == "number" and n > 0 and n % 1 == 0 end

function Account:deposit(amount)
    if not whole(amount) then
        return qx.error.fail("invalid", "a deposit is a positive whole amount")
    end
    self:record(M.Deposited{ amount = amount })
    return true
end

function Account:withdraw(amount)
    if not whole(amount) then
        return qx.error.fail("invalid", "a withdrawal is a positive whole amount")
    end
    if amount > self.balance then
        return qx.error.fail("insufficient_funds", "balance " .. self.balance .. " is below " .. amount,
                             { balance = self.balance })
    end
    self:record(M.Withdrawn{ amount = amount })
    return true
end

return M

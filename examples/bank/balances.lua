-- bank.balances: a projection of the account events into bank_account_balances. Each batch
-- runs its handlers and moves the checkpoint in one transaction: every event applied once.
local qx = require "qx"
local account = require "bank.account"

local M = {}

function M.new(db)
    return qx.projection{
        name = "bank.account_balances",
        db = db,
        handlers = {
            [account.Opened] = function(ev, uow)
                assert(uow:queue([[INSERT INTO bank_account_balances (account_id, customer_id)
                                   VALUES ($1, $2) ON CONFLICT (account_id) DO NOTHING]],
                                 ev.aggregate_id, ev.customer_id))
            end,
            [account.Deposited] = function(ev, uow)
                assert(uow:queue("UPDATE bank_account_balances SET balance = balance + $2 WHERE account_id = $1",
                                 ev.aggregate_id, ev.amount))
            end,
            [account.Withdrawn] = function(ev, uow)
                assert(uow:queue("UPDATE bank_account_balances SET balance = balance - $2 WHERE account_id = $1",
                                 ev.aggregate_id, ev.amount))
            end,
        },
        reset = function(uow) assert(uow:exec("TRUNCATE bank_account_balances")) end,
    }
end

-- balance(db, account_id) -> the projected balance, or nil when the account is not there yet
function M.balance(db, account_id)
    local rows = assert(db:query("SELECT balance FROM bank_account_balances WHERE account_id = $1",
                                 account_id))
    return rows[1] and rows[1].balance
end

return M

-- bank.commands: each command is one unit of work that loads the account from the event
-- store, runs the domain method and appends the new events; integration events go to the
-- outbox in the same transaction. Results: a value, or nil, err (err.code says why).
local qx = require "qx"
local account = require "bank.account"

local Account = account.Account
local M = {}

function M.new(db)
    local store = qx.event_store{ db = db, snapshot_every = 50 }
    local cmds = {}

    function cmds.open(customer_id)
        return db:unit_of_work(function(uow)
            local acc = Account.open(customer_id)
            assert(uow:store(store):append(acc))
            return acc.id
        end)
    end

    -- change(id, method, amount): a conflict means another command appended first; the
    -- command runs again on the fresh state, a few times.
    local function change(id, method, amount)
        local res, err
        for _ = 1, 3 do
            res, err = db:unit_of_work(function(uow)
                local es = uow:store(store)
                local acc = es:load(Account, id)
                if not acc then error(qx.error.new("not_found", "no account " .. id)) end
                local ok, why = acc[method](acc, amount)
                if not ok then error(why) end   -- a domain error: roll back, return it
                assert(es:append(acc))
                return acc.balance
            end)
            if res or err.code ~= "conflict" then break end
        end
        return res, err
    end

    function cmds.deposit(id, amount) return change(id, "deposit", amount) end
    function cmds.withdraw(id, amount) return change(id, "withdraw", amount) end

    cmds.store = store
    return cmds
end

return M

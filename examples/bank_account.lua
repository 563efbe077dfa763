-- An event-sourced bank account with a balance projection.
--
-- The account's state is the fold of its events (opened, deposited, withdrawn); commands load
-- it from the event store, decide, record, and append in one unit of work. A projection keeps
-- a `bank_balances` read model up to date, exactly once, from the store's gap-safe global
-- order. Run on its own:  QX_DB__URL=postgresql://... lua5.4 examples/bank_account.lua
local qx = require "qx"

local required_as = ... -- the module name when required, nil when run as a script
local _M = {}

_M.SCHEMA = [[
CREATE TABLE IF NOT EXISTS bank_balances (
    account_id text PRIMARY KEY,
    owner      text NOT NULL,
    balance    bigint NOT NULL DEFAULT 0,
    movements  integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
)]]

-- Events: domain events are the account's history; the integration event tells other
-- services, through the outbox, that an account exists.
local Opened = qx.event("bank.account_opened")
local Deposited = qx.event("bank.money_deposited")
local Withdrawn = qx.event("bank.money_withdrawn")
local AccountOpened = qx.integration_event("bank.account.opened", { version = 1 })
_M.Opened, _M.Deposited, _M.Withdrawn = Opened, Deposited, Withdrawn

-- The aggregate: plain Lua, no I/O. Handlers change state; commands check rules and record.
local Account = qx.event_sourced("BankAccount")
_M.Account = Account

Account:on(Opened, function(self, ev)
    self.owner = ev.owner
    self.balance = 0
end)
Account:on(Deposited, function(self, ev) self.balance = self.balance + ev.amount end)
Account:on(Withdrawn, function(self, ev) self.balance = self.balance - ev.amount end)

function Account.open(owner)
    local acc = Account.new(qx.uuid())
    acc:record(Opened{ owner = owner })
    acc:record(AccountOpened{ account_id = acc.id, owner = owner })
    return acc
end

local function positive(n)
    return type(n) == "number" and n > 0 and n % 1 == 0
end

function Account:deposit(amount)
    if not positive(amount) then
        return nil, qx.error.new("invalid", "a deposit must be a positive whole amount")
    end
    self:record(Deposited{ amount = amount })
    return true
end

function Account:withdraw(amount)
    if not positive(amount) then
        return nil, qx.error.new("invalid", "a withdrawal must be a positive whole amount")
    end
    if amount > self.balance then
        return nil, qx.error.new("invalid", ("insufficient funds: balance %d, asked %d")
            :format(self.balance, amount))
    end
    self:record(Withdrawn{ amount = amount })
    return true
end

-- Command handlers: one unit of work each; a conflict (another command appended first) is
-- run again on fresh state, a few times.
function _M.new_store(db)
    return qx.event_store{ db = db, snapshot_every = 5 }
end

local function with_account(db, store, id, fn)
    for _ = 1, 5 do
        local res, err = db:unit_of_work(function(uow)
            local es = uow:store(store)
            local acc = es:load(Account, id)
            if not acc then error(qx.error.new("not_found", "no account " .. id), 0) end
            assert(fn(acc))
            assert(es:append(acc))
            return acc
        end)
        if res or err.code ~= "conflict" then return res, err end
    end
    return nil, qx.error.new("conflict", "account " .. id .. " kept changing; try later")
end

function _M.open(db, store, owner)
    return db:unit_of_work(function(uow)
        local acc = Account.open(owner)
        assert(uow:store(store):append(acc))
        return acc.id
    end)
end

function _M.deposit(db, store, id, amount)
    return with_account(db, store, id, function(acc) return acc:deposit(amount) end)
end

function _M.withdraw(db, store, id, amount)
    return with_account(db, store, id, function(acc) return acc:withdraw(amount) end)
end

-- The read model: one row per account, written in the projection's transaction.
function _M.balances(db)
    return qx.projection{
        name = "bank_balances",
        db = db,
        handlers = {
            [Opened] = function(ev, uow)
                assert(uow:queue([[
INSERT INTO bank_balances (account_id, owner) VALUES ($1, $2) ON CONFLICT (account_id) DO NOTHING]],
                    ev.aggregate_id, ev.owner))
            end,
            [Deposited] = function(ev, uow)
                assert(uow:queue([[
UPDATE bank_balances SET balance = balance + $2, movements = movements + 1, updated_at = now()
WHERE account_id = $1]], ev.aggregate_id, ev.amount))
            end,
            [Withdrawn] = function(ev, uow)
                assert(uow:queue([[
UPDATE bank_balances SET balance = balance - $2, movements = movements + 1, updated_at = now()
WHERE account_id = $1]], ev.aggregate_id, ev.amount))
            end,
        },
        reset = function(uow) assert(uow:exec("TRUNCATE bank_balances")) end,
    }
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
    local store = _M.new_store(db)
    local balances = _M.balances(db)
    assert(balances:catch_up()) -- whatever earlier runs left

    local id = assert(_M.open(db, store, "Ada"))
    say("opened account " .. id .. " for Ada")
    for _, n in ipairs({ 100, 250, 40 }) do assert(_M.deposit(db, store, id, n)) end
    local acc = assert(_M.withdraw(db, store, id, 90))
    say(("after 3 deposits and a withdrawal: balance %d at version %d"):format(acc.balance,
        acc.version))

    local _, err = _M.withdraw(db, store, id, 10000)
    say("withdrawing 10000 -> " .. tostring(err) .. " (nothing stored)")

    -- two commands on the same version: the second append is a conflict, run again
    local next_version
    local conflict = select(2, db:unit_of_work(function(uow)
        local es = uow:store(store)
        local mine = assert(es:load(Account, id))
        next_version = mine.version + 1
        assert(_M.deposit(db, store, id, 1)) -- another command commits first
        mine:deposit(5)
        assert(es:append(mine))
    end))
    if conflict and conflict.code == "conflict" then
        say(("a stale append -> conflict: another command appended version %d first; run it again")
            :format(next_version))
    else
        say("a stale append -> " .. tostring(conflict))
    end

    acc = assert(_M.deposit(db, store, id, 10))
    local snap = assert(db:query([[
SELECT version FROM qx_aggregate_snapshots WHERE aggregate_type = 'BankAccount' AND aggregate_id = $1]],
        id))[1]
    say(("balance %d at version %d; snapshot at version %s (every 5)"):format(acc.balance,
        acc.version, snap and tostring(snap.version) or "none"))

    local stream = assert(store:read_stream(Account, id))
    for _, ev in ipairs(stream) do
        say(("  #%d %-22s %s"):format(ev._sequence, ev.event_name,
            ev.amount and ("%d"):format(ev.amount) or ev.owner or ""))
    end
    local out = assert(db:query([[
SELECT count(*) AS n FROM qx_outbox_events WHERE event_name = 'bank.account.opened'
  AND payload->'payload'->>'account_id' = $1]], id))[1].n
    say("integration events in the outbox for it: " .. out)

    local applied = assert(balances:catch_up())
    local row = assert(db:query("SELECT owner, balance, movements FROM bank_balances WHERE account_id = $1",
        id))[1]
    say(("projection applied %d events: %s has %d after %d movements"):format(applied, row.owner,
        row.balance, row.movements))
    local st = assert(balances:status())
    say(("projection %s: %d events applied in all, %d behind"):format(st.name, st.events_applied,
        st.behind))

    local stall = assert(store:stall())
    say(("readers held back: %s (horizon %s, %d events waiting)"):format(tostring(stall.stalled),
        stall.horizon, stall.withheld))
    return id
end

if not required_as then
    local db = assert(qx.connect())
    assert(qx.migrate(db))
    _M.run(db, print)
    db:close()
end

return _M

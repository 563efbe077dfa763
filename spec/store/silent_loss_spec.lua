-- No silent data loss and no silent nothing: an event-sourced aggregate's id must be a uuid (as
-- a repository's key is), and an entity field with no column is refused unless the table's
-- description says to ignore such fields.
local qx = require "qx"
local support = require "support"
local H = require "repository_support"

describe("no silent data loss", function()
    local db, store, Account, Deposited

    setup(function()
        db = H.db()
        store = qx.event_store{ db = db }
        Deposited = qx.event(support.unique("spec.silent.deposited"))
        Account = qx.event_sourced(support.unique("SilentAccount"))
        Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
    end)
    teardown(function() if db then db:close() end end)

    it("es:load of an id that is not a uuid is invalid, not an empty stream", function()
        local r, e = db:unit_of_work(function(uow)
            local acc, le = uow:store(store):load(Account, "nope")
            assert.is_nil(acc)
            return le
        end)
        assert.is_table(r)
        assert.equal("invalid", r.code)
        assert.matches("id must be a uuid, got \"nope\"", r.message, 1, true)
        assert.is_nil(e)
    end)

    it("es:append of an aggregate whose id is not a uuid is invalid, and stores nothing", function()
        local r, e = db:unit_of_work(function(uow)
            local acc = Account.new("nope")
            acc:record(Deposited{ amount = 1 })
            local ok, ae = uow:store(store):append(acc)
            assert.is_nil(ok)
            error(ae)
        end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("id must be a uuid", e.message, 1, true)
        local rows = db:query("SELECT count(*) AS n FROM qx_aggregate_events WHERE aggregate_id = 'nope'")
        assert.equal(0, rows[1].n)
    end)

    it("Class.new refuses an id that is not a string (Account.new(42))", function()
        assert.has_error(function() Account.new(42) end,
                         Account.aggregate_type .. ": id must be a string, got number")
    end)

    it("repo:add refuses an entity field that has no column, naming it", function()
        local tbl = H.users_table(db)
        local users = H.users(tbl)
        local _, e = H.with(db, users, qx.uuid(), function(repo)
            return repo:add(H.User{ email = support.unique("fc") .. "@x.io", favourite_colour = "teal" })
        end)
        assert.equal("invalid", e.code)
        assert.matches("favourite_colour", e.message, 1, true)
        local rows = db:query("SELECT count(*) AS n FROM " .. tbl)
        assert.equal(0, rows[1].n)
    end)

    it("repo:add and repo:save ignore such fields when the description says extra_fields = \"ignore\"", function()
        local tbl = H.users_table(db)
        local users = H.users(tbl, { extra_fields = "ignore" })
        local T = qx.uuid()
        local u = assert(H.with(db, users, T, function(repo)
            return repo:add(H.User{ email = support.unique("fc") .. "@x.io", favourite_colour = "teal" })
        end))
        assert(H.with(db, users, T, function(repo)
            local got = assert(repo:get(u.id))
            got.mood = "fine"
            got.name = "Ada"
            return repo:save(got)
        end))
        local rows = db:query("SELECT name FROM " .. tbl)
        assert.equal("Ada", rows[1].name)
        assert.has_error(function() H.users(tbl, { extra_fields = "drop" }) end)
    end)

    it("refuses a filter eq or neq with nil or qx.null and points at is_null / is_not_null", function()
        local tbl = H.users_table(db)
        local users = H.users(tbl)
        local T = qx.uuid()
        assert(H.with(db, users, T, function(repo)
            return repo:add(H.User{ email = support.unique("n") .. "@x.io" })
        end))
        for _, f in ipairs({ { "name", "eq", nil }, { "name", "eq" }, { "name", "eq", qx.null },
                             { "name", "neq", nil }, { "name", "neq", qx.null } }) do
            -- raised as misuse, like an unknown operator: the unit of work returns it
            local n, e = H.with(db, users, T, function(repo)
                return repo:count{ filters = { f } }
            end)
            assert.is_nil(n)
            assert.equal("invalid", e.code)
            assert.matches(f[2] == "eq" and "is_null" or "is_not_null", e.message, 1, true)
        end
        -- the spelled-out forms still work
        local n = H.with(db, users, T, function(repo)
            return repo:count{ filters = { { "name", "is_null" } } }
        end)
        assert.equal(1, n)
    end)

    it("repo:save refuses an entity field that has no column", function()
        local tbl = H.users_table(db)
        local users = H.users(tbl)
        local T = qx.uuid()
        local u = assert(H.with(db, users, T, function(repo)
            return repo:add(H.User{ email = support.unique("fc") .. "@x.io" })
        end))
        local _, e = H.with(db, users, T, function(repo)
            local got = assert(repo:get(u.id))
            got.nickname = "A"
            return repo:save(got)
        end)
        assert.equal("invalid", e.code)
        assert.matches("nickname", e.message, 1, true)
    end)
end)

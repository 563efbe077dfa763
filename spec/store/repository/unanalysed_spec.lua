-- Keyset pages of a repository table that the planner has no statistics for (autovacuum has not
-- analysed it yet, or is off for it), holding 5,000 rows. Every statement runs under a
-- statement_timeout of a few seconds: that bound only catches a plan gone quadratic; it is not a
-- speed measurement, which stays in bench/.
local support = require "support"
local H = require "repository_support"

describe("repository keyset pages on a never-analysed table", function()
    local db, tbl, users
    local T = "00000000-0000-4000-8000-0000000000aa"

    setup(function()
        db = H.db{ pool_size = 2, statement_timeout_ms = 3000 }
        tbl = H.users_table(db)
        support.never_analyse(db, tbl)
        users = H.users(tbl)
        H.seed(db, users, T, 5000, function(i)
            return { email = ("user%05d@example.com"):format(i), name = "n" .. (i % 7),
                     score = (i * 7919) % 5000, is_active = i % 3 ~= 0 }
        end)
        support.assert_never_analysed(db, tbl)
    end)

    teardown(function()
        if db then
            support.assert_never_analysed(db, tbl)
            assert(db:exec("DROP TABLE " .. tbl))
            db:close()
        end
    end)

    -- every item of a listing, following next_cursor in pages of 100
    local function walk(opts)
        return H.with(db, users, T, function(repo)
            local items, after = {}, nil
            for _ = 1, 60 do
                local o = { limit = 100, after = after }
                for k, v in pairs(opts) do o[k] = v end
                local page = assert(repo:page(o))
                for _, it in ipairs(page.items) do items[#items + 1] = it end
                after = page.next_cursor
                if not after then break end
            end
            return items
        end)
    end

    it("pages through 5,000 rows of a never-analysed table within the statement timeout #slow", function()
        local items = walk{ sort = { "email" } }
        assert.equal(5000, #items)
        for i, u in ipairs(items) do assert.equal(("user%05d@example.com"):format(i), u.email) end
        items = walk{ sort = { "-score" } }
        assert.equal(5000, #items)
        for i, u in ipairs(items) do assert.equal(5000 - i, u.score) end
    end)

    it("pages through the filtered rows of a never-analysed table within the statement timeout #slow", function()
        local items = walk{ sort = { "name", "-score" }, filters = {{ "is_active", "eq", true }} }
        assert.equal(3334, #items)
        for i = 2, #items do
            local a, b = items[i - 1], items[i]
            assert.is_true(b.is_active)
            assert.is_true(a.name < b.name or (a.name == b.name and a.score > b.score))
        end
    end)
end)

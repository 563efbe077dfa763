-- Untrusted input never reaches SQL text: an injection corpus through filter values, `in`
-- lists, field names, sort directions, ids and cursors; the tables are checked afterwards.
local qx = require "qx"
local internal = require "qx.store.internal"
local support = require "support"
local H = require "repository_support"

describe("repository and SQL injection", function()
    local db, tbl, canary, users, T, fingerprint

    setup(function()
        db = H.db()
        tbl = H.users_table(db)
        canary = support.unique("repo_canary")
        assert(db:exec("CREATE TABLE " .. canary .. " (x int)"))
        assert(db:exec("INSERT INTO " .. canary .. " VALUES (1)"))
        users = H.users(tbl)
        T = qx.uuid()
        H.seed(db, users, T, 5)
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function state()
        return support.psql("SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY id), ''))"
                            .. " FROM " .. tbl .. " t") .. "|" .. support.psql("SELECT count(*) FROM " .. canary)
    end

    local function corpus()
        return {
            "'; DROP TABLE " .. canary .. "; --",
            "' OR '1'='1",
            "' OR 1=1 --",
            "\" OR \"\"=\"",
            "1) OR (1=1",
            "%' OR email LIKE '%",
            "\\'; DELETE FROM " .. tbl .. "; --",
            "$1",
            "$$; DROP TABLE " .. canary .. "; $$",
            "email; DROP TABLE " .. canary,
            "email\"; DROP TABLE " .. canary .. "; --",
            "Robert'); DROP TABLE " .. canary .. ";--",
            "%", "_", "\\", "*/ SELECT 1 /*",
            "'||(SELECT pg_sleep(5))||'",
            "\u{2019}; DROP TABLE " .. canary .. "; --",
        }
    end

    setup(function() fingerprint = state() end)

    it("matches filter values and in-list elements as data, never as SQL", function()
        H.with(db, users, T, function(repo)
            for _, bad in ipairs(corpus()) do
          for _, op in ipairs({ "eq", "contains", "starts_with", "ends_with", "gt", "lte" }) do
              local p = assert(repo:list{ filters = {{ "name", op, bad }}, page_size = 100 })
              assert.is_table(p.items)
              if op == "eq" or op == "contains" or op == "starts_with" or op == "ends_with" then
                assert.equal(0, p.total, op .. " " .. bad)
              end
          end
          assert.equal(0, assert(repo:count{ filters = {{ "email", "in", { bad, bad .. "x" } }} }))
          assert.equal(5, assert(repo:count{ filters = {{ "email", "not_in", { bad } }} }))
          assert.equal(0, assert(repo:count{ filters = {{ "score", "in", { 999 } }},
                                             where = qx.spec.where("name", "neq", bad) }))
            end
            return true
        end)
        assert.equal(fingerprint, state())
    end)

    it("stores and finds a hostile value exactly", function()
        local hostile = "'); DROP TABLE " .. canary .. "; -- \\ % _ \""
        local id = assert(H.with(db, users, T, function(repo)
            local u = H.User.new{ email = "hostile@example.com", name = hostile }
            assert(repo:add(u))
            return u.id
        end))
        H.with(db, users, T, function(repo)
            local p = assert(repo:list{ filters = {{ "name", "eq", hostile }} })
            assert.equal(1, p.total)
            assert.equal(hostile, p.items[1].name)
            assert.equal(1, assert(repo:count{ filters = {{ "name", "contains", "-- \\ % _" }} }))
            local u = assert(repo:get(id))
            assert(repo:hard_delete(u))
            return true
        end)
        assert.equal(fingerprint, state())
    end)

    it("raises for hostile field names and sort directions before any SQL is built", function()
        H.with(db, users, T, function(repo, uow)
            local sends = internal.round_trips(uow)
            for _, bad in ipairs(corpus()) do
          assert.is_not_nil(H.raised(function() repo:list{ filters = {{ bad, "eq", "x" }} } end), bad)
          assert.is_not_nil(H.raised(function() repo:list{ sort = { bad } } end), bad)
          assert.is_not_nil(H.raised(function() repo:list{ sort = {{ "email", bad }} } end), bad)
          assert.is_not_nil(H.raised(function() repo:list{ filters = {{ "email", bad, "x" }} } end), bad)
          assert.is_not_nil(H.raised(function() repo:page{ sort = { "-" .. bad } } end), bad)
            end
            assert.equal(sends, internal.round_trips(uow)) -- nothing reached the server
            return true
        end)
        assert.equal(fingerprint, state())
    end)

    it("refuses hostile ids and cursors with invalid", function()
        H.with(db, users, T, function(repo)
            for _, bad in ipairs(corpus()) do
          local r, e = repo:get(bad)
          assert.is_nil(r)
          assert.equal("invalid", e.code)
          r, e = repo:page{ after = bad }
          assert.is_nil(r)
          assert.equal("invalid", e.code)
          r, e = repo:page{ after = bad .. "." .. bad }
          assert.is_nil(r)
          assert.equal("invalid", e.code)
            end
            return true
        end)
        -- a filter on a uuid column checks the value's shape before sending it
        local by_id = H.users(tbl, { filterable = { "id", "tenant_id" } })
        H.with(db, by_id, T, function(repo)
            for _, bad in ipairs(corpus()) do
          local e = H.raised(function() repo:list{ filters = {{ "id", "eq", bad }} } end)
          assert.matches("holds uuids", tostring(e))
          e = H.raised(function() repo:list{ filters = {{ "tenant_id", "in", { T, bad } }} } end)
          assert.matches("holds uuids", tostring(e))
            end
            return true
        end)
        assert.equal(fingerprint, state())
    end)
end)

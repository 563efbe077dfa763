-- Listing with the repository: the 13 filter operators, allow-lists, sorting, offset pages,
-- specifications (SQL and in memory), and streaming in constant memory.
local qx = require "qx"
local internal = require "qx.store.internal"
local H = require "repository_support"
local support = require "support"

local S = qx.spec

local function emails(items) return support.field(items, "email") end

describe("repository queries", function()
    local db, users, T

    setup(function()
        db = H.db()
        users = H.users(H.users_table(db))
        T = qx.uuid()
        -- 10 users: names with LIKE metacharacters, NULL scores, mixed case
        local rows = {
            { email = "a1@example.com", name = "Ada Lovelace", score = 10, is_active = true },
            { email = "a2@example.com", name = "ada byron", score = 20, is_active = false },
            { email = "b1@example.org", name = "100% sure", score = 30, is_active = true },
            { email = "b2@example.org", name = "under_score", score = nil, is_active = true },
            { email = "c1@example.net", name = "back\\slash", score = 50, is_active = false },
            { email = "c2@example.net", name = "Grace Hopper", score = 60, is_active = true },
            { email = "d1@EXAMPLE.COM", name = nil, score = 70, is_active = true },
            { email = "d2@test.io", name = "Ada", score = 80, is_active = true },
            { email = "e1@test.io", name = "underXscore", score = nil, is_active = false },
            { email = "e2@test.io", name = "1000 sure", score = 100, is_active = true },
        }
        H.seed(db, users, T, #rows, function(i) return rows[i] end)
        -- another tenant's rows never show up
        H.seed(db, users, qx.uuid(), 3, function(i) return { email = "other" .. i .. "@example.com",
                                                             name = "Ada", score = i } end)
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function list(opts)
        return assert(H.with(db, users, T, function(repo)
            local o = { page_size = 100, sort = { "email" } }
            for k, v in pairs(opts or {}) do o[k] = v end
            return repo:list(o)
        end))
    end

    local function matching(filters)
        return emails(list{ filters = filters }.items)
    end

    describe("filter operators", function()
        it("eq, neq (which keeps NULLs), in, not_in", function()
            assert.same({ "d2@test.io" }, matching{ { "name", "eq", "Ada" } })
            assert.equal(9, #matching{ { "name", "neq", "Ada" } }) -- includes the NULL name
            assert.same({ "a1@example.com", "c2@example.net" },
                        matching{ { "name", "in", { "Ada Lovelace", "Grace Hopper", "nobody" } } })
            assert.same({ "b2@example.org", "e1@test.io", "e2@test.io" },
                        matching{ { "score", "not_in", { 10, 20, 30, 50, 60, 70, 80 } } })
            assert.same({}, matching{ { "name", "in", {} } })
            assert.equal(10, #matching{ { "name", "not_in", {} } })
        end)

        it("gt, gte, lt, lte", function()
            assert.same({ "d2@test.io", "e2@test.io" }, matching{ { "score", "gt", 70 } })
            assert.same({ "d1@EXAMPLE.COM", "d2@test.io", "e2@test.io" }, matching{ { "score", "gte", 70 } })
            assert.same({ "a1@example.com" }, matching{ { "score", "lt", 20 } })
            assert.same({ "a1@example.com", "a2@example.com" }, matching{ { "score", "lte", 20 } })
            assert.same({ "e1@test.io", "e2@test.io" }, matching{ { "email", "gte", "e" } })
        end)

        it("contains, starts_with, ends_with ignore case", function()
            assert.same({ "a1@example.com", "a2@example.com", "d2@test.io" },
                        matching{ { "name", "starts_with", "ADA" } })
            assert.same({ "a1@example.com", "a2@example.com", "d1@EXAMPLE.COM" },
                        matching{ { "email", "ends_with", "@example.com" } })
            assert.same({ "c2@example.net" }, matching{ { "name", "contains", "HOPP" } })
        end)

        it("treat % _ and \\ in the value as plain characters", function()
            assert.same({ "b1@example.org" }, matching{ { "name", "contains", "0%" } })
            assert.same({ "b2@example.org" }, matching{ { "name", "contains", "r_s" } })
            assert.same({ "c1@example.net" }, matching{ { "name", "contains", "k\\s" } })
            assert.same({}, matching{ { "name", "starts_with", "%" } })
            assert.same({}, matching{ { "name", "ends_with", "_" } })
        end)

        it("is_null and is_not_null (eq / neq with qx.null are refused: see silent_loss_spec)", function()
            assert.same({ "b2@example.org", "e1@test.io" }, matching{ { "score", "is_null" } })
            assert.equal(8, #matching{ { "score", "is_not_null" } })
            assert.same({ "d1@EXAMPLE.COM" }, matching{ { "name", "is_null" } })
            assert.equal(9, #matching{ { "name", "is_not_null" } })
            assert.same({ "b2@example.org", "e1@test.io" },
                        matching{ { field = "score", op = "is_null" } })
        end)

        it("combine a list of filters with AND", function()
            assert.same({ "a1@example.com" }, matching{ { "name", "starts_with", "ada" },
                                                        { "is_active", "eq", true },
                                                        { "email", "ends_with", ".com" } })
        end)
    end)

    describe("bad input", function()
        local function run(opts)
            return H.with(db, users, T, function(repo) return repo:list(opts) end)
        end

        it("raises for a field outside the allow-list, naming it", function()
            local _, e = run{ filters = {{ "created_by", "eq", "x" }} }
            assert.equal("invalid", e.code)
            assert.matches("created_by", e.message)
            assert.matches("not filterable", e.message)
            assert.matches("not sortable", (select(2, run{ sort = { "tenant_id" } })).message)
            -- raised, not returned: the call itself throws
            assert.has_error(function()
              assert(db:unit_of_work(function(uow)
              local repo = uow:repo(users)
              local ok = pcall(repo.list, repo, { filters = {{ "version", "gt", 0 }} })
              assert(not ok)
              error("raised as it should")
              end, H.ctx(T)))
            end)
        end)

        it("raises for an unknown operator or a value of the wrong kind", function()
            assert.matches("unknown filter operator", (select(2, run{ filters = {{ "name", "like", "%" }} })).message)
            assert.matches("needs a list", (select(2, run{ filters = {{ "name", "in", "a,b" }} })).message)
            assert.matches("needs a string", (select(2, run{ filters = {{ "name", "contains", 5 }} })).message)
            assert.matches("scalar", (select(2, run{ filters = {{ "name", "eq", { 1 } }} })).message)
            assert.matches("must be a string", (select(2, run{ filters = {{ "name", "in", { qx.null } }} })).message)
            assert.matches("takes no value", (select(2, run{ filters = {{ "name", "is_null", "x" }} })).message)
            assert.matches("finite", (select(2, run{ filters = {{ "score", "gt", 0 / 0 }} })).message)
            assert.matches("asc or desc", (select(2, run{ sort = {{ "email", "sideways" }} })).message)
            assert.matches("unknown option 'pagesize'", tostring(H.raised(function() run{ pagesize = 3 } end)))
        end)

        it("returns invalid for page_size 0, negative or above the maximum, and for a bad page", function()
            for _, bad in ipairs({ 0, -1, 101, 2.5, "10" }) do
              local r, e = run{ page_size = bad }
              assert.is_nil(r)
              assert.equal("invalid", e.code)
              assert.matches("page_size", e.message)
            end
            local r, e = run{ page = 0 }
            assert.is_nil(r)
            assert.equal("invalid", e.code)
            assert.equal(100, assert(run{ page_size = 100 }).page_size)
        end)
    end)

    describe("sorting and offset pages", function()
        it("sorts by several keys in mixed directions with the id last", function()
            assert.has_error(function() list{ sort = { "is_active" } } end) -- not sortable
            local p = list{ sort = { "-score", "email" } }
            assert.same({ "b2@example.org", "e1@test.io", "e2@test.io" },
                        { p.items[1].email, p.items[2].email, p.items[3].email }) -- NULLs first, desc
            local asc = list{ sort = { "score" } }
            assert.equal("a1@example.com", asc.items[1].email)
            assert.equal("e1@test.io", asc.items[10].email) -- NULLs last, asc; id breaks the tie
            assert.equal("b2@example.org", asc.items[9].email)
        end)

        it("pages with totals, from one statement", function()
            local seen = {}
            local total_pages
            for page = 1, 4 do
              local p = list{ page = page, page_size = 3, sort = { "-email" } }
              assert.equal(10, p.total)
              assert.equal(4, p.pages)
              assert.equal(page < 4, p.has_next)
              for _, u in ipairs(p.items) do seen[#seen + 1] = u.email end
              total_pages = p.pages
            end
            assert.equal(4, total_pages)
            assert.equal(10, #seen)
            assert.equal("e2@test.io", seen[1])
            local beyond = list{ page = 9, page_size = 3 }
            assert.same({}, beyond.items)
            assert.equal(10, beyond.total)
            local quick = list{ page = 1, page_size = 4, with_total = false }
            assert.is_nil(quick.total)
            assert.is_true(quick.has_next)
            assert.equal(4, #quick.items)
        end)
    end)

    describe("specifications", function()
        local spec = S.where("name", "starts_with", "ada")
                        :and_(S.not_(S.where("is_active", "eq", false)))
                        :or_(S.where("score", "is_null"))

        it("compose with and_, or_, not_ and select the same rows in SQL and in memory", function()
            local p = assert(H.with(db, users, T, function(repo)
              return repo:search(spec, { sort = { "email" }, page_size = 50 })
            end))
            assert.same({ "a1@example.com", "b2@example.org", "d2@test.io", "e1@test.io" }, emails(p.items))
            -- every row, checked in memory, agrees with the database
            local all = list{}
            for _, u in ipairs(all.items) do
              local in_sql = false
              for _, m in ipairs(p.items) do if m.id == u.id then in_sql = true end end
              assert.equal(in_sql, spec:is_satisfied_by(u), u.email)
            end
        end)

        it("take filter triples anywhere and combine with list filters", function()
            local either = S.or_({ "email", "eq", "a1@example.com" }, { "email", "eq", "c2@example.net" })
            local p = list{ where = either, filters = {{ "score", "gt", 10 }} }
            assert.same({ "c2@example.net" }, emails(p.items))
            assert.same({}, emails(list{ where = S.or_() }.items))
            assert.equal(10, #list{ where = S.and_() }.items)
        end)

        it("raise for an unlisted field inside a specification", function()
            local _, e = H.with(db, users, T, function(repo)
              return repo:search(S.not_(S.where("created_by", "eq", "x")))
            end)
            assert.equal("invalid", e.code)
            assert.matches("created_by", e.message)
            assert.has_error(function() S.where("name", "regex", ".*") end)
        end)
    end)

    describe("each", function()
        it("streams every row in order, a batch at a time, and can stop early", function()
            local got = {}
            local n = assert(H.with(db, users, T, function(repo, uow)
              local before = internal.round_trips(uow)
              local count = assert(repo:each({ sort = { "email" }, batch_size = 3 }, function(u)
              got[#got + 1] = u.email
              end))
              -- 10 rows in batches of 3: 4 fetches
              assert.equal(before + 4, internal.round_trips(uow))
              return count
            end))
            assert.equal(10, n)
            assert.same(emails(list{}.items), got)
            local first = {}
            assert.equal(2, assert(H.with(db, users, T, function(repo)
              return repo:each({ batch_size = 5 }, function(u)
              first[#first + 1] = u
              if #first == 2 then return false end
              end)
            end)))
        end)

        it("holds only one batch in memory however many rows there are #slow", function()
            local big = H.users_table(db)
            local desc = H.users(big)
            local t = qx.uuid()
            assert(db:exec("INSERT INTO " .. big .. " (id, email, name, tenant_id) SELECT qx_uuid_v7(), "
              .. "'bulk' || g || '@example.com', repeat('x', 200), $1 FROM generate_series(1, 20000) g", t))
            collectgarbage("collect")
            local base = collectgarbage("count")
            local peak, n = 0, 0
            assert(H.with(db, desc, t, function(repo)
              return repo:each({ batch_size = 200 }, function()
              n = n + 1
              if n % 1000 == 0 then
                collectgarbage("collect")
                local kb = collectgarbage("count") - base
                if kb > peak then peak = kb end
              end
              end)
            end))
            assert.equal(20000, n)
            -- all rows at once would be well over 5 MB; one batch of 200 is ~100 KB
            assert.is_true(peak < 1024, "grew by " .. peak .. " KB")
        end)
    end)
end)

-- The repository's reads and writes against a real PostgreSQL: descriptions, the catalog,
-- mapping, stamps, versions, soft and hard deletes, tenancy, events to the outbox, readers.
local qx = require "qx"
local internal = require "qx.store.internal"
local support = require "support"
local H = require "repository_support"

describe("qx.store.repository", function()
    local db, tbl, users, T

    setup(function()
        db = H.db()
        tbl = H.users_table(db)
        users = H.users(tbl)
        T = qx.uuid()
    end)

    teardown(function()
        if db then db:close() end
    end)

    describe("descriptions", function()
        it("raises on an unknown option, a missing table or a bad allow-list", function()
            assert.has_error(function() qx.repository{ table = "x", filterabel = { "a" } } end,
                             "qx.repository: unknown option 'filterabel' (known: allow_cross_tenant, "
                             .. "cursor_key, default_page_size, default_sort, entity, extra_fields, "
                             .. "filterable, from_row, max_page_size, primary_key, readonly, schema, "
                             .. "soft_delete, sortable, table, tenanted, to_row)")
            assert.has_error(function() qx.repository{} end)
            assert.has_error(function() qx.repository{ table = "x", filterable = { 1 } } end)
            assert.has_error(function() qx.repository{ table = "x", max_page_size = 0 } end)
            assert.has_error(function() qx.repository{ table = "x", default_page_size = 500 } end)
            assert.has_error(function() qx.repository{ table = "x", cursor_key = "short" } end)
            assert.has_error(function() qx.repository{ table = "x", default_sort = { { "a", "up" } } } end)
        end)

        it("reports a table that does not exist as a db error, with nothing written", function()
            local ghost = qx.repository{ table = support.unique("no_such_table") }
            local r, e = db:unit_of_work(function(uow)
            local x, err = uow:repo(ghost):get(qx.uuid())
            assert(x == nil)
            error(err, 0)
            end)
            assert.is_nil(r)
            assert.equal("db", e.code)
            assert.equal("42P01", e.sqlstate)
            assert.matches("does not exist", e.message)
        end)

        it("refuses a description that names columns the table lacks", function()
            local bad = qx.repository{ table = tbl, filterable = { "nickname" } }
            local _, e = H.with(db, bad, T, function(repo) return repo:get(qx.uuid()) end)
            assert.equal("invalid", e.code)
            assert.matches("nickname", e.message)
            local untenanted = H.users_table(db):gsub("x", "x")
            assert(db:exec("ALTER TABLE " .. untenanted .. " DROP COLUMN tenant_id"))
            local _, e2 = H.with(db, qx.repository{ table = untenanted, tenanted = true }, T,
                                 function(repo) return repo:get(qx.uuid()) end)
            assert.equal("invalid", e2.code)
            assert.matches("tenant_id", e2.message)
        end)

        it("reads the catalog once, and again after reset()", function()
            local t = H.users_table(db)
            local d = H.users(t)
            local ids = H.seed(db, d, T, 1)
            assert(db:exec("ALTER TABLE " .. t .. " ADD COLUMN nickname text DEFAULT 'nick'"))
            assert.is_nil(assert(H.with(db, d, T, function(repo) return repo:get(ids[1]) end)).nickname)
            d:reset()
            assert.equal("nick", assert(H.with(db, d, T, function(repo) return repo:get(ids[1]) end)).nickname)
        end)

        it("gives the audit columns and a UUID v7 id column as DDL", function()
            local ddl = qx.schema.audit_columns()
            for _, col in ipairs(qx.schema.AUDIT_COLUMNS) do assert.matches(col, ddl) end
            assert.not_matches("tenant_id", qx.schema.audit_columns{ tenanted = false })
            assert.not_matches("deleted_at", qx.schema.audit_columns{ soft_delete = false })
            assert.matches("deleted_by uuid", qx.schema.audit_columns{ actor_type = "uuid" })
            assert.has_error(function() qx.schema.audit_columns{ actor_type = "int; DROP" } end)
            local rows = assert(db:query("SELECT qx_uuid_v7()::text AS a, qx_uuid_v7()::text AS b"))
            assert.is_true(qx.is_uuid(rows[1].a))
            assert.equal("7", rows[1].a:sub(15, 15))
            assert.matches("^[89ab]", rows[1].a:sub(20, 20))
            -- time-ordered: the first 48 bits are the current Unix time in ms
            local ms = tonumber(rows[1].a:gsub("-", ""):sub(1, 12), 16)
            assert.is_true(math.abs(ms / 1000 - os.time()) < 120)
        end)
    end)

    describe("add and get", function()
        it("stamps created_at, created_by, tenant_id and version 1 and reads the entity back", function()
            local u = H.User.new{ email = "ada@example.com", name = "Ada" }
            local id = assert(H.with(db, users, T, function(repo)
            assert.equal(u, repo:add(u))
            assert.equal(1, u.version)
            assert.equal(T, u.tenant_id)
            return u.id
            end, "alice"))
            local got = assert(H.with(db, users, T, function(repo) return repo:get(id) end))
            assert.equal(H.User, getmetatable(got))
            assert.equal("ada@example.com", got.email)
            assert.equal("Ada", got.name)
            assert.equal(1, got.version)
            assert.equal("alice", got.created_by)
            assert.equal(T, got.tenant_id)
            assert.is_string(got.created_at)
            assert.is_nil(got.updated_at)   -- NULL reads as nil
            assert.is_nil(got.score)
            assert.is_true(got.is_active)   -- the column default applied
        end)

        it("writes each add's own fields, whichever fields and actor the adds before had",
           function()
            -- the INSERT's text is kept per set of columns: sets that differ must not mix
            local made = {
                { fields = { email = "f1@example.com", name = "One", score = 7 }, user = "ann" },
                { fields = { email = "f2@example.com" } },
                { fields = { email = "f3@example.com", score = 3, is_active = false },
                  user = "bob" },
                { fields = { email = "f4@example.com", name = "Four", score = 7 } },
                { fields = { email = "f5@example.com", name = "Five", score = 8 }, user = "cy" },
            }
            local ids = {}
            for i, m in ipairs(made) do
                -- an add without a user has no actor: no created_by column in its INSERT
                ids[i] = assert(db:unit_of_work(function(uow)
                    return assert(uow:repo(users):add(H.User.new(m.fields))).id
                end, { context = { tenant_id = T, user_id = m.user } }))
            end
            -- and in one unit of work, queued together
            local together = assert(H.with(db, users, T, function(repo)
                local a = assert(repo:add(H.User.new{ email = "f6@example.com", score = 1 }))
                local b = assert(repo:add(H.User.new{ email = "f7@example.com", name = "Seven" }))
                return { a.id, b.id }
            end, "dee"))
            for i, m in ipairs(made) do
                local got = assert(H.with(db, users, T, function(repo) return repo:get(ids[i]) end))
                assert.equal(m.fields.email, got.email)
                assert.equal(m.fields.name, got.name)
                assert.equal(m.fields.score, got.score)
                assert.equal(m.fields.is_active ~= false, got.is_active)
                assert.equal(m.user, got.created_by)
                assert.equal(T, got.tenant_id)
                assert.equal(1, got.version)
            end
            local a = assert(H.with(db, users, T, function(repo) return repo:get(together[1]) end))
            local b = assert(H.with(db, users, T, function(repo) return repo:get(together[2]) end))
            assert.same({ "f6@example.com", nil, 1, "dee" }, { a.email, a.name, a.score, a.created_by })
            assert.same({ "f7@example.com", "Seven", nil, "dee" },
                        { b.email, b.name, b.score, b.created_by })
        end)

        it("writes each add's own fields past the number of column sets it keeps texts for",
           function()
            -- nine optional columns: 300 adds, each with its own subset of them
            local t = support.unique("spec_sets")
            local cols = {}
            for b = 1, 9 do cols[b] = "c" .. b .. " integer" end
            assert(db:exec("CREATE TABLE " .. t .. " (" .. qx.schema.id_column() .. ", "
                           .. table.concat(cols, ", ") .. ")"))
            local sets = qx.repository{ table = t }
            local function fields_of(i)
                local f = {}
                for b = 1, 9 do
                    if math.floor(i / 2 ^ (b - 1)) % 2 == 1 then f["c" .. b] = i * 10 + b end
                end
                return f
            end
            local ids = {}
            assert(db:unit_of_work(function(uow)
                local repo = uow:repo(sets)
                for i = 1, 300 do ids[i] = assert(repo:add(fields_of(i))).id end
            end))
            local rows = assert(db:rows("SELECT * FROM " .. t))
            assert.equal(300, #rows)
            local by_id = {}
            for _, r in ipairs(rows) do by_id[r.id] = r end
            for i = 1, 300 do
                local r = by_id[ids[i]]
                local want = fields_of(i)
                for b = 1, 9 do assert.equal(want["c" .. b], r["c" .. b]) end
            end
        end)

        it("returns not_found for a missing id and invalid for an id that is no uuid", function()
            H.with(db, users, T, function(repo)
            local x, e = repo:get(qx.uuid())
            assert.is_nil(x)
            assert.equal("not_found", e.code)
            x, e = repo:get("1 OR 1=1")
            assert.is_nil(x)
            assert.equal("invalid", e.code)
            assert.is_false(repo:exists(qx.uuid()))
            -- the unit of work is still usable after both
            assert.equal(0, repo:count{ filters = {{ "email", "eq", "nobody@example.com" }} })
            return true
            end)
        end)

        it("fails the unit of work with conflict on a duplicate key and writes nothing", function()
            local r, e = H.with(db, users, T, function(repo)
            assert(repo:add(H.User.new{ email = "dup@example.com", name = "One" }))
            assert(repo:add(H.User.new{ email = "dup@example.com", name = "Two" }))
            return true
            end)
            assert.is_nil(r)
            assert.equal("conflict", e.code)
            assert.equal("23505", e.sqlstate)
            assert.equal("0", support.psql("SELECT count(*) FROM " .. tbl
                                           .. " WHERE email = 'dup@example.com'"))
        end)

        it("sends queued adds with the next read, in one round trip", function()
            H.with(db, users, T, function(repo, uow)
            local before = internal.round_trips(uow)
            for i = 1, 5 do assert(repo:add(H.User.new{ email = "rt" .. i .. "@example.com" })) end
            assert.equal(before, internal.round_trips(uow))
            assert.equal(5, repo:count{ filters = {{ "email", "starts_with", "rt" }} })
            assert.equal(before + 1, internal.round_trips(uow))
            return true
            end)
        end)

        it("reads an id back from the database when the key is not a uuid", function()
            local serial = support.unique("repo_serial")
            assert(db:exec("CREATE TABLE " .. serial .. " (id bigserial PRIMARY KEY, title text, "
                           .. "version integer NOT NULL DEFAULT 1)"))
            local notes = qx.repository{ table = serial }
            local id = assert(db:unit_of_work(function(uow)
            local n = { title = "first" }
            assert(uow:repo(notes):add(n))
            return n.id
            end))
            assert.equal(1, id)
            assert.equal("first", support.psql("SELECT title FROM " .. serial .. " WHERE id = 1"))
        end)
    end)

    describe("mapping", function()
        it("uses from_row and to_row when given, and never writes managed columns", function()
            local Card = {}
            Card.__index = Card
            local mapped = qx.repository{
            table = tbl, tenanted = true, soft_delete = true,
            from_row = function(row)
              return setmetatable({ id = row.id, mail = row.email, label = row.name,
                                    version = row.version }, Card)
            end,
            to_row = function(c)
              return { id = c.id, email = c.mail, name = c.label, version = 99, created_by = "x" }
            end,
            }
            local c = setmetatable({ mail = "card@example.com", label = "Card" }, Card)
            assert(H.with(db, mapped, T, function(repo) return repo:add(c) end, "mapper"))
            assert.is_true(qx.is_uuid(c.id))
            local got = assert(H.with(db, mapped, T, function(repo) return repo:get(c.id) end))
            assert.equal(Card, getmetatable(got))
            assert.equal("card@example.com", got.mail)
            assert.equal(1, got.version)
            assert.equal("mapper|1", support.psql("SELECT created_by || '|' || version FROM " .. tbl
                                                  .. " WHERE id = '" .. c.id .. "'"))
        end)

        it("raises when to_row returns a key that is not a column", function()
            local bad = qx.repository{ table = tbl, tenanted = true,
                                       to_row = function(e) return { email = e.email, bogus = 1 } end }
            local e = H.raised(function()
            H.with(db, bad, T, function(repo) return repo:add({ email = "b@example.com" }) end)
            end)
            assert.matches("bogus", tostring(e))
        end)
    end)

    describe("save", function()
        local function add_one(email)
            return assert(H.with(db, users, T, function(repo)
            local u = H.User.new{ email = email, name = "Before" }
            assert(repo:add(u))
            return u.id
            end))
        end

        it("bumps the version, stamps updated_at/by and writes the fields", function()
            local id = add_one("save1@example.com")
            local v = assert(H.with(db, users, T, function(repo)
            local u = assert(repo:get(id))
            u:rename("After")
            u.score = 7
            assert.equal(u, repo:save(u))
            return u.version
            end, "bob"))
            assert.equal(2, v)
            assert.equal("After|7|2|bob|true", support.psql("SELECT name || '|' || score || '|' || version"
            .. " || '|' || updated_by || '|' || (updated_at IS NOT NULL) FROM " .. tbl
            .. " WHERE id = '" .. id .. "'"))
        end)

        it("returns conflict for a stale version without failing the unit of work", function()
            local id = add_one("stale@example.com")
            local out = assert(H.with(db, users, T, function(repo)
            local a = assert(repo:get(id))
            local b = assert(repo:get(id))
            a.name = "A"
            assert(repo:save(a))
            b.name = "B"
            local r, e = repo:save(b)
            assert.is_nil(r)
            assert.equal(1, b.version) -- untouched
            -- the transaction goes on
            assert.equal("A", assert(repo:get(id)).name)
            return e
            end))
            assert.equal("conflict", out.code)
            assert.equal(1, out.expected_version)
            assert.equal(2, out.actual_version)
            assert.equal("A|2", support.psql("SELECT name || '|' || version FROM " .. tbl
                                             .. " WHERE id = '" .. id .. "'"))
        end)

        it("returns not_found for a deleted row or one that does not exist", function()
            local id = add_one("gone@example.com")
            H.with(db, users, T, function(repo)
            local u = assert(repo:get(id))
            assert(repo:soft_delete(id))
            local r, e = repo:save(u)
            assert.is_nil(r)
            assert.equal("not_found", e.code)
            local ghost = H.User.new{ email = "ghost@example.com", version = 1 }
            e = select(2, repo:save(ghost))
            assert.equal("not_found", e.code)
            return true
            end)
        end)

        it("queued with defer, fails the unit of work at commit on a stale version", function()
            local id = add_one("defer@example.com")
            local r, e = H.with(db, users, T, function(repo, uow)
            local u = assert(repo:get(id))
            u.version = 5 -- stale
            u.name = "never"
            local before = internal.round_trips(uow)
            assert(repo:save(u, { defer = true }))
            assert.equal(before, internal.round_trips(uow)) -- no round trip of its own
            return true
            end)
            assert.is_nil(r)
            assert.equal("conflict", e.code)
            assert.equal("QX409", e.sqlstate)
            assert.equal("Before|1", support.psql("SELECT name || '|' || version FROM " .. tbl
                                                  .. " WHERE id = '" .. id .. "'"))
            -- and succeeds with the right version
            assert(H.with(db, users, T, function(repo)
            local u = assert(repo:get(id))
            u.name = "deferred"
            return repo:save(u, { defer = true })
            end))
            assert.equal("deferred|2", support.psql("SELECT name || '|' || version FROM " .. tbl
                                                    .. " WHERE id = '" .. id .. "'"))
        end)

        it("writes the same through the statement it keeps as through the one it builds first", function()
            -- each variant (deferred or not, with a tenant or across tenants) builds its statement on
            -- first use and then only gathers the parameters: both must write the same columns
            local t = H.users_table(db)
            local d = H.users(t, { allow_cross_tenant = true })
            local ids = H.seed(db, d, T, 4)
            local function row(id)
            return support.psql("SELECT coalesce(name, '-') || '|' || coalesce(score::text, '-') || '|' "
              .. "|| version || '|' || coalesce(updated_by, '-') FROM " .. t .. " WHERE id = '" .. id .. "'")
            end
            for round = 1, 2 do
            for i, variant in ipairs({ { defer = false, tenant = T }, { defer = true, tenant = T },
                                       { defer = false }, { defer = true } }) do
              local ctx = { context = { tenant_id = variant.tenant, user_id = "saver" .. round } }
              assert(db:unit_of_work(function(uow)
                local repo = uow:repo(d)
                local u = assert(repo:get(ids[i]))
                u.name = round == 1 and ("n" .. i) or nil -- NULL the second time
                u.score = round * 10 + i
                return repo:save(u, { defer = variant.defer })
              end, ctx))
              assert.equal((round == 1 and ("n" .. i) or "-") .. "|" .. (round * 10 + i) .. "|"
                           .. (round + 1) .. "|saver" .. round, row(ids[i]))
            end
            end
        end)

        it("saves through to_row the same on the first call and with the kept statement", function()
            -- to_row names the columns (and may give the id); the default mapping reads the entity's
            -- fields directly, so this is the other way a save gathers its values
            local t = H.users_table(db)
            local Card = {}
            Card.__index = Card
            local d = qx.repository{
            table = t, tenanted = true, soft_delete = true,
            from_row = function(r)
              return setmetatable({ key = r.id, mail = r.email, label = r.name, on = r.is_active,
                                    version = r.version }, Card)
            end,
            to_row = function(c) return { id = c.key, email = c.mail, name = c.label, is_active = c.on } end,
            }
            local ids = H.seed(db, H.users(t), T, 2)
            local function row(id)
            return support.psql("SELECT coalesce(name, '-') || '|' || coalesce(score::text, '-') || '|' "
              .. "|| version || '|' || updated_by FROM " .. t .. " WHERE id = '" .. id .. "'")
            end
            for round = 1, 2 do
            for i, defer in ipairs({ false, true }) do
              assert(H.with(db, d, T, function(repo)
                local c = assert(repo:get(ids[i]))
                assert.is_nil(rawget(c, "id"))
                c.label = round == 1 and ("card" .. i) or nil -- NULL the second time
                return repo:save(c, { defer = defer })
              end, "carder" .. round))
              -- score is not in to_row's row: written as NULL
              assert.equal((round == 1 and ("card" .. i) or "-") .. "|-|" .. (round + 1) .. "|carder"
                           .. round, row(ids[i]))
            end
            end
        end)

        it("sends the aggregate's events to the outbox with the save, and none on conflict", function()
            local id = add_one("events@example.com")
            assert(H.with(db, users, T, function(repo)
            local u = assert(repo:get(id))
            u:rename("Evented")
            return repo:save(u)
            end))
            assert.equal("1", support.psql("SELECT count(*) FROM qx_outbox_events WHERE event_name = "
            .. "'spec.user.renamed' AND payload->'payload'->>'user_id' = '" .. id .. "'"))
            -- a stale save's events are not tracked: nothing reaches the outbox
            assert(H.with(db, users, T, function(repo)
            local u = assert(repo:get(id))
            u.version = 1
            u:rename("Lost")
            local r = repo:save(u)
            assert.is_nil(r)
            return true
            end))
            assert.equal("0", support.psql("SELECT count(*) FROM qx_outbox_events WHERE "
            .. "payload->'payload'->>'name' = 'Lost' AND payload->'payload'->>'user_id' = '" .. id .. "'"))
        end)
    end)

    describe("deletes", function()
        it("soft_delete hides the row, stamps deleted_at/by, and restore brings it back", function()
            local ids = H.seed(db, users, T, 2, function(i) return { email = "soft" .. i .. "@example.com" } end)
            assert(H.with(db, users, T, function(repo) return repo:soft_delete(ids[1]) end, "carol"))
            assert.equal("carol|2|true", support.psql("SELECT deleted_by || '|' || version || '|' || "
            .. "(deleted_at IS NOT NULL) FROM " .. tbl .. " WHERE id = '" .. ids[1] .. "'"))
            H.with(db, users, T, function(repo)
            assert.equal("not_found", select(2, repo:get(ids[1])).code)
            assert.equal(ids[1], assert(repo:get(ids[1], { include_deleted = true })).id)
            assert.is_false(repo:exists(ids[1]))
            assert.equal(1, repo:count{ filters = {{ "email", "starts_with", "soft" }} })
            assert.equal(2, repo:count{ filters = {{ "email", "starts_with", "soft" }},
                                        include_deleted = true })
            return true
            end)
            assert(H.with(db, users, T, function(repo) return repo:restore(ids[1]) end))
            assert(H.with(db, users, T, function(repo) return repo:get(ids[1]) end))
        end)

        it("fails the unit of work with not_found when deleting what is not there", function()
            local r, e = H.with(db, users, T, function(repo) return repo:soft_delete(qx.uuid()) end)
            assert.is_nil(r)
            assert.equal("not_found", e.code)
            e = select(2, H.with(db, users, T, function(repo) return repo:hard_delete(qx.uuid()) end))
            assert.equal("not_found", e.code)
            assert(H.with(db, users, T, function(repo)
            return repo:hard_delete(qx.uuid(), { missing_ok = true })
            end))
        end)

        it("checks the version when given an entity, and hard_delete removes the row", function()
            local ids = H.seed(db, users, T, 1, function() return { email = "hard@example.com" } end)
            local r, e = H.with(db, users, T, function(repo)
            local u = assert(repo:get(ids[1]))
            u.version = 9
            return repo:hard_delete(u)
            end)
            assert.is_nil(r)
            assert.equal("conflict", e.code)
            assert(H.with(db, users, T, function(repo) return repo:hard_delete(assert(repo:get(ids[1]))) end))
            assert.equal("0", support.psql("SELECT count(*) FROM " .. tbl .. " WHERE id = '" .. ids[1] .. "'"))
        end)
    end)

    describe("tenancy", function()
        it("never reads, saves or deletes another tenant's row", function()
            local other = qx.uuid()
            local ids = H.seed(db, users, other, 1, function()
                return { email = "theirs@example.com", name = "Theirs" }
            end)
            local id = ids[1]
            H.with(db, users, T, function(repo)
            local x, e = repo:get(id)
            assert.is_nil(x)
            assert.equal("not_found", e.code)
            assert.is_false(repo:exists(id))
            assert.equal(0, repo:count{ filters = {{ "email", "eq", "theirs@example.com" }} })
            local forged = H.User.new{ id = id, email = "theirs@example.com", name = "Mine", version = 1 }
            local r
            r, e = repo:save(forged)
            assert.is_nil(r)
            assert.equal("not_found", e.code)
            return true
            end)
            local r, e = H.with(db, users, T, function(repo) return repo:soft_delete(id) end)
            assert.is_nil(r)
            assert.equal("not_found", e.code)
            e = select(2, H.with(db, users, T, function(repo) return repo:hard_delete(id) end))
            assert.equal("not_found", e.code)
            -- an add cannot write into another tenant either
            r, e = H.with(db, users, T, function(repo)
            return repo:add(H.User.new{ email = "sneak@example.com", tenant_id = other })
            end)
            assert.is_nil(r)
            assert.equal("invalid", e.code)
            assert.equal("Theirs|1||" .. other, support.psql("SELECT name || '|' || version || '|' || "
            .. "coalesce(deleted_by, '') || '|' || tenant_id FROM " .. tbl .. " WHERE id = '" .. id .. "'"))
            assert.equal("0", support.psql("SELECT count(*) FROM " .. tbl .. " WHERE email = 'sneak@example.com'"))
        end)

        it("refuses a tenanted repository when the context has no tenant", function()
            local r, e = db:unit_of_work(function(uow)
            local x, err = uow:repo(users):list{}
            assert(x == nil)
            error(err, 0)
            end)
            assert.is_nil(r)
            assert.equal("invalid", e.code)
            assert.matches("tenant_id", e.message)
            local _, e2 = db:unit_of_work(function(uow)
            local x, err = uow:repo(users):add(H.User.new{ email = "nobody@example.com" })
            assert(x == nil)
            error(err, 0)
            end)
            assert.equal("invalid", e2.code)
        end)

        it("reads across tenants only when the description allows it", function()
            local a, b = qx.uuid(), qx.uuid()
            H.seed(db, users, a, 1, function() return { email = "x-a@example.com" } end)
            H.seed(db, users, b, 1, function() return { email = "x-b@example.com" } end)
            local cross = H.users(tbl, { allow_cross_tenant = true })
            local n = assert(db:unit_of_work(function(uow)
            return uow:repo(cross):count{ filters = {{ "email", "starts_with", "x-" }} }
            end))
            assert.equal(2, n)
            -- with a tenant in the context it is still limited to that tenant
            assert.equal(1, assert(H.with(db, cross, a, function(repo)
            return repo:count{ filters = {{ "email", "starts_with", "x-" }} }
            end)))
        end)
    end)

    describe("readers", function()
        it("read outside a transaction and refuse writes", function()
            local t = qx.uuid()
            local ids = H.seed(db, users, t, 3)
            local reader = users:reader(db, { tenant_id = t })
            assert.equal(ids[2], assert(reader:get(ids[2])).id)
            assert.equal(3, assert(reader:list{}).total)
            local seen = 0
            assert.equal(3, assert(reader:each({}, function() seen = seen + 1 end)))
            assert.equal(3, seen)
            assert.has_error(function() reader:save(H.User.new{ email = "w@example.com" }) end)
            assert.has_error(function() reader:add(H.User.new{ email = "w@example.com" }) end)
            assert.equal("invalid", select(2, users:reader(db):list{}).code)
            assert.has_error(function() users:reader(db, { tenant_id = "nope" }) end)
        end)
    end)
end)

-- What qx writes as JSON it reads back as the same value and type: the outbox, the event store
-- (load, snapshots, read_all) and repository JSON columns, against a real PostgreSQL. Lua 5.4
-- keeps integers and floats apart; on LuaJIT every number is a double.
local qx = require "qx"
local support = require "support"
local values = require "json_values"

describe("json values", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 2 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    local Sent = qx.integration_event(support.unique("jv.sent"))

    local function outbox_payload(id)
        local r = assert(db:query("SELECT payload FROM qx_outbox_events WHERE id = $1", id))[1]
        assert.equal("table", type(r.payload), "the envelope read back as a " .. type(r.payload))
        return r.payload.payload.doc
    end

    local function event_store(snapshot_every)
        local m = { type = support.unique("Jv") }
        m.Set = qx.event(support.unique("jv.set"))
        m.Thing = qx.event_sourced(m.type)
        m.Thing:on(m.Set, function(self, ev) self.v = ev.v end)
        m.store = qx.event_store{ db = db, snapshot_every = snapshot_every or 0 }
        return m
    end

    -- appends one Set{ v = v } to a new stream; returns its id | nil, err
    local function append(m, v)
        local id = qx.uuid()
        local ok, e = db:unit_of_work(function(uow)
            local t = m.Thing.new(id)
            t:record(m.Set{ v = v })
            return uow:store(m.store):append(t)
        end)
        if not ok then return nil, e end
        return id
    end

    local function load(m, id, opts)
        return assert(db:unit_of_work(function(uow)
            return assert(uow:store(m.store):load(m.Thing, id, opts))
        end))
    end

    local function repo_table()
        local name = support.unique("jv_docs")
        assert(db:exec("CREATE TABLE " .. name .. " (" .. qx.schema.id_column()
            .. ", doc jsonb, " .. qx.schema.audit_columns() .. ")"))
        return qx.repository{ table = name, entity = qx.aggregate(support.unique("JvDoc")) }
    end

    local function repo_write(repo, doc)
        local id
        local ok, e = db:unit_of_work(function(uow)
            local ent = repo.entity.new{ doc = doc }
            id = ent.id
            return uow:repo(repo):add(ent)
        end)
        if not ok then return nil, e end
        return id
    end

    local function repo_read(repo, id)
        return assert(db:unit_of_work(function(uow)
            return assert(uow:repo(repo):get(id))
        end)).doc
    end

    describe("numbers keep their type", function()
        it("reads back an outbox payload's integers as integers and floats as floats", function()
            local id = assert(db:unit_of_work(function(uow)
                return uow:record(Sent{ doc = values.numbers() }).event_id
            end))
            values.assert_same(values.numbers(), outbox_payload(id))
        end)

        it("loads an aggregate's integers as integers and floats as floats, from events and snapshots",
           function()
            local m = event_store(1)
            local id = assert(append(m, values.numbers()))
            values.assert_same(values.numbers(), load(m, id, { snapshot = false }).v)
            values.assert_same(values.numbers(), load(m, id).v) -- from the snapshot
        end)

        it("adds an integer to a loaded integer and gets an integer (a balance of 100 and a deposit of 50)",
           function()
            local m = event_store()
            local id = assert(append(m, 100))
            local v = load(m, id).v + 50
            assert.equal(150, v)
            values.assert_same(150, v)
            assert.equal("150", tostring(v))
        end)

        it("hands read_all records with integers as integers and floats as floats", function()
            local m = event_store()
            assert(append(m, values.numbers()))
            local recs = assert(m.store:read_all{ aggregate_type = m.type })
            values.assert_same(values.numbers(), recs[1].v)
        end)

        it("reads back repository JSON columns with integers as integers and floats as floats", function()
            local repo = repo_table()
            local id = assert(repo_write(repo, values.numbers()))
            values.assert_same(values.numbers(), repo_read(repo, id))
        end)

        it("reads integers beyond 64 bits that another writer stored as floats, never as an error",
           function()
            local rows = assert(db:query([[SELECT '{"a": 18446744073709551616,
                "b": -100000000000000000000, "c": 9223372036854775807}'::jsonb AS j]]))
            local j = rows[1].j
            assert.is_table(j)
            assert.equal(2 ^ 64, j.a)
            assert.equal(-1e20, j.b)
            if math.type then
                assert.equal("float", math.type(j.a))
                assert.equal("float", math.type(j.b))
                assert.equal(math.maxinteger, j.c)
                assert.equal("integer", math.type(j.c))
            end
        end)
    end)

    describe("nesting", function()
        -- every depth from well below to well above the limit: refused with invalid naming the
        -- limit, or read back equal; some of each
        local function each_depth(write, read)
            local refused, accepted = 0, 0
            for d = 990, 1003 do
                local doc = values.nest(d)
                local key, e = write(doc)
                if key == nil then
                    assert.equal("invalid", e and e.code, tostring(e and e.message))
                    assert.matches("1000", e.message)
                    refused = refused + 1
                else
                    local back = read(key)
                    assert.equal("table", type(back), ("depth %d read back as a %s"):format(d, type(back)))
                    assert.equal(d, values.depth(back), "depth " .. d)
                    accepted = accepted + 1
                end
            end
            assert.is_true(refused > 0 and accepted > 0, refused .. " refused, " .. accepted .. " accepted")
        end

        it("refuses an outbox payload nested too deep with invalid, or reads it back as a table", function()
            each_depth(function(doc)
                local ok, e = db:unit_of_work(function(uow)
                    local ev, re = uow:record(Sent{ doc = doc })
                    if not ev then return nil, re end
                    return ev.event_id
                end)
                if not ok then return nil, e end
                return ok
            end, outbox_payload)
        end)

        it("refuses an event nested too deep with invalid, or loads and reads it back as a table", function()
            -- a stream type of its own for each depth, so that read_all finds its one event
            each_depth(function(doc)
                local m = event_store()
                local id, e = append(m, doc)
                if id == nil then return nil, e end
                return { m = m, id = id }
            end, function(key)
                local v = load(key.m, key.id).v
                local recs = assert(key.m.store:read_all{ aggregate_type = key.m.type })
                assert.equal(1, #recs)
                assert.equal("table", type(recs[1].v))
                assert.equal(values.depth(v), values.depth(recs[1].v))
                return v
            end)
        end)

        it("says which column holds a document deeper than qx reads, written by another writer, instead of its text",
           function()
            local ok, e = pcall(db.query, db, "SELECT (repeat('[', 1001) || repeat(']', 1001))::jsonb AS deep")
            assert.is_false(ok)
            assert.matches("column deep: .*nested deeper than 1000 levels", tostring(e))
            -- the connection is fine afterwards
            assert.equal(1, assert(db:query("SELECT 1 AS one"))[1].one)
        end)

        it("refuses a repository JSON column nested too deep with invalid, or reads it back as a table",
           function()
            local repo = repo_table()
            each_depth(function(doc) return repo_write(repo, doc) end,
                       function(id) return repo_read(repo, id) end)
        end)
    end)
end)

-- qx.migrate against a real PostgreSQL, each case in a fresh database: idempotent, the seed's
-- outbox columns and types, the partial index on pending rows, all-or-nothing steps, and several
-- processes migrating one fresh database at once.
local qx = require "qx"
local core = require "qx.core"
local migrate = require "qx.store.migrate"
local steps = require "qx.store.migrations"
local support = require "support"

local sh, url_for = support.sh, support.url_for

describe("qx.store.migrate", function()
    local dbs
    local function fresh_db() return dbs.create() end

    setup(function()
        dbs = support.fresh_databases("qx_mig")
    end)

    teardown(function()
        if dbs then dbs.drop_all() end
    end)

    local latest = steps[#steps].version

    it("applies every step once, and nothing the second time", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1 })
        local r = assert(qx.migrate(db))
        assert.equal(#steps, #r.applied)
        assert.equal(latest, r.current)
        r = assert(qx.migrate(db))
        assert.same({}, r.applied)
        assert.equal(latest, r.current)
        local rows = assert(db:query("SELECT version, count(*) AS n FROM qx_schema_migrations"
            .. " GROUP BY version ORDER BY version"))
        assert.equal(#steps, #rows)
        for i, row in ipairs(rows) do
            assert.equal(steps[i].version, row.version)
            assert.equal(1, row.n)
        end
        local status = assert(migrate.status(db))
        assert.equal(#steps, #status)
        assert.equal(steps[1].name, status[1].name)
        db:close()
    end)

    it("creates qx_outbox_events with every seed column and type", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1 })
        assert(qx.migrate(db))
        local cols = {}
        for _, c in ipairs(assert(db:query([[
SELECT column_name, data_type, character_maximum_length AS len, column_default AS dflt
FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'qx_outbox_events']]))) do
            cols[c.column_name] = c
        end
        local seed = {
            id = "uuid", event_name = "character varying", event_version = "integer", payload = "jsonb",
            occurred_at = "timestamp with time zone", correlation_id = "uuid", causation_id = "uuid",
            tenant_id = "uuid", published_at = "timestamp with time zone", attempts = "integer",
            last_error = "character varying",
        }
        for name, typ in pairs(seed) do
            assert.is_not_nil(cols[name], "missing column " .. name)
            assert.equal(typ, cols[name].data_type, name)
        end
        assert.equal(255, cols.event_name.len)
        assert.equal(2048, cols.last_error.len)
        assert.equal("0", cols.attempts.dflt)
        -- qx's own columns are nullable or defaulted, so a row written by the seed still fits
        for name, c in pairs(cols) do
            if not seed[name] then
            local nullable = assert(db:query([[SELECT is_nullable FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = 'qx_outbox_events'
              AND column_name = $1]], name))[1].is_nullable
            assert.is_true(nullable == "YES" or c.dflt ~= core.null, name .. " is NOT NULL without a default")
            end
        end
        local pk = assert(db:query([[
SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = 'qx_outbox_events'::regclass AND i.indisprimary]]))
        assert.equal(1, #pk)
        assert.equal("id", pk[1].attname)
        -- a row as the seed writes it (only its own columns) is accepted
        assert(db:exec([[INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at,
      correlation_id, causation_id, tenant_id, published_at, attempts, last_error)
      VALUES ($1, 'seed.event', 1, '{}', now(), NULL, NULL, NULL, NULL, 0, NULL)]], qx.uuid()))
        db:close()
    end)

    it("upgrades an outbox table made by the seed in place, keeping its rows pending", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1 })
        assert(db:exec([[CREATE TABLE qx_outbox_events (
      id uuid PRIMARY KEY, event_name varchar(255), event_version int, payload jsonb,
      occurred_at timestamptz, correlation_id uuid, causation_id uuid, tenant_id uuid,
      published_at timestamptz, attempts int DEFAULT 0, last_error varchar(2048))]]))
        local id = qx.uuid()
        assert(db:exec([[INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at)
      VALUES ($1, 'seed.event', 1, '{"event_id": "x"}', now())]], id))
        assert(qx.migrate(db))
        local rows = assert(qx.outbox(db):get_unpublished{})
        assert.equal(1, #rows)
        assert.equal(id, rows[1].id)
        assert.equal(1, rows[1].seq)
        db:close()
    end)

    it("creates the partial index on pending rows", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1 })
        assert(qx.migrate(db))
        local rows = assert(db:query([[
SELECT pg_get_expr(i.indpred, i.indrelid) AS pred, pg_get_indexdef(i.indexrelid) AS def
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = 'qx_outbox_events'::regclass AND c.relname = 'qx_outbox_events_pending']]))
        assert.equal(1, #rows)
        assert.truthy(rows[1].pred:find("published_at IS NULL", 1, true))
        assert.truthy(rows[1].pred:find("dead_at IS NULL", 1, true))
        assert.truthy(rows[1].def:find("(seq)", 1, true))
        db:close()
    end)

    it("applies nothing of a run whose step fails", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1 })
        local r, e = qx.migrate(db, { steps = {
            { version = 1, name = "good", sql = "CREATE TABLE mig_spec_good (x int)" },
            { version = 2, name = "bad", sql = "CREATE TABLE mig_spec_bad (x nosuchtype)" },
        } })
        assert.is_nil(r)
        assert.equal("db", e.code)
        assert.truthy(e.message:find("migration 2 (bad)", 1, true))
        assert.equal(0, assert(db:query("SELECT count(*) AS n FROM pg_tables"
            .. " WHERE tablename IN ('mig_spec_good', 'qx_schema_migrations')"))[1].n)
        local conn = assert(db.pool:acquire())
        assert.equal("idle", conn:status())
        conn:release()
        db:close()
    end)

    it("is not cut short by the connection's statement_timeout", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1, statement_timeout_ms = 50 })
        assert.is_nil(db:query("SELECT pg_sleep(0.2)")) -- the timeout is on
        local r = assert(qx.migrate(db, { steps = {
            { version = 1, name = "slow", sql = "SELECT pg_sleep(0.2); CREATE TABLE mig_spec_slow (x int)" },
        } }))
        assert.same({ 1 }, r.applied)
        db:close()
    end)

    it("raises on steps whose versions do not increase (misuse)", function()
        local db = assert(qx.connect{ url = url_for(fresh_db()), pool_size = 1 })
        assert.has_error(function()
            qx.migrate(db, { steps = { { version = 2, name = "a", sql = "" }, { version = 1, name = "b", sql = "" } } })
        end)
        assert.has_error(function()
            qx.migrate(db, { steps = { { version = "1", name = "a", sql = "" } } })
        end)
        db:close()
    end)

    it("lets several processes migrate one fresh database at once #slow", function()
        local name = fresh_db()
        local interp = jit and "luajit" or "lua5.4"
        local start_at = core.clock() + 1.0 -- CLOCK_MONOTONIC: the same clock in every process
        local child = [[
local core = require "qx.core"
local qx = require "qx"
local db = assert(qx.connect{ url = arg[1], pool_size = 1 })
local start_at = tonumber(arg[2])
while core.clock() < start_at do end
local r, e = qx.migrate(db)
if not r then io.write("ERR ", tostring(e), "\n") os.exit(1) end
io.write("OK ", #r.applied, "\n")
]]
        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write(child)
        f:close()
        local env = "LUA_PATH=" .. sh(package.path) .. " LUA_CPATH=" .. sh(package.cpath) .. " "
        local procs = {}
        for i = 1, 4 do
            procs[i] = assert(io.popen(env .. interp .. " " .. sh(script) .. " " .. sh(url_for(name)) .. " "
              .. string.format("%.3f", start_at) .. " 2>&1"))
        end
        local applied_total, oks = 0, 0
        for i = 1, #procs do
            local out = procs[i]:read("*a")
            procs[i]:close()
            local n = out:match("^OK (%d+)")
            assert.is_not_nil(n, "process " .. i .. ": " .. out)
            oks = oks + 1
            applied_total = applied_total + tonumber(n)
        end
        os.remove(script)
        assert.equal(4, oks)
        assert.equal(#steps, applied_total) -- one process applied everything, the others nothing
        local db = assert(qx.connect{ url = url_for(name), pool_size = 1 })
        local rows = assert(db:query("SELECT count(*) AS n, count(DISTINCT version) AS d FROM qx_schema_migrations"))
        assert.equal(#steps, rows[1].n)
        assert.equal(#steps, rows[1].d)
        db:close()
    end)
end)

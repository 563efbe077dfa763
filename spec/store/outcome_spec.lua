-- A commit whose reply is lost: the unit of work asks PostgreSQL what became of its transaction
-- and never reports an outcome that did not happen. Reproduced on a server of the spec's own
-- (synchronous_standby_names is cluster-wide): a synchronous standby that does not exist keeps
-- every COMMIT waiting in SyncRep after it committed locally, and a process of its own
-- terminates the backend there, so the reply never comes.
local qx = require "qx"
local core = require "qx.core"
local publisher = require "qx.messaging.publisher"

local PG_BIN = os.getenv("QX_TEST_PG_BIN") or "/usr/lib/postgresql/15/bin"

-- the spec's own sessions do not wait for the standby that is not there
local PSQL = "PGOPTIONS='-c synchronous_commit=local' "
    .. "'" .. PG_BIN .. "/psql' -X -q -A -t"

local function sh(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

describe("a lost commit reply #slow", function()
    local dir, url, db, SFX

    local function psql(sql)
        local p = assert(io.popen(PSQL .. " -v ON_ERROR_STOP=1 -d "
            .. sh(url) .. " -c " .. sh(sql) .. " 2>&1"))
        local out = p:read("*a")
        p:close()
        return (out:gsub("%s+$", ""))
    end

    -- In the background: wait until a backend waits in wait_event (at most 10 s), run before
    -- (SQL, may be ""), then terminate that backend.
    local function terminate_when(wait_event, before)
        local sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = '"
            .. wait_event .. "'"
        local p = PSQL .. " -d " .. sh(url)
        local script = "for i in $(seq 200); do "
            .. "n=$(" .. p .. " -c " .. sh("SELECT count(*) FROM pg_stat_activity WHERE wait_event = '"
            .. wait_event .. "'") .. "); "
            .. "if [ \"$n\" != 0 ]; then "
            .. (before ~= "" and (p .. " -c " .. sh(before) .. "; ") or "")
            .. p .. " -c " .. sh(sql) .. "; exit 0; fi; sleep 0.05; done"
        os.execute("( " .. script .. " ) >/dev/null 2>&1 &")
    end

    local function no_standby()
        psql("ALTER SYSTEM SET synchronous_standby_names = 'qx_nowhere'")
        psql("SELECT pg_reload_conf()")
    end

    local function standby_back()
        psql("ALTER SYSTEM RESET synchronous_standby_names")
        psql("SELECT pg_reload_conf()")
    end

    local function count(sql)
        return tonumber(psql(sql))
    end

    setup(function()
        dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. sh(dir) .. " && bash scripts/servers.sh start "
            .. sh(dir) .. " >/dev/null 2>&1"))
        url = assert(read(dir .. "/env"):match("QX_DB__URL=(%S+)"))
        SFX = core.uuid():gsub("-", ""):sub(-12)
        db = assert(qx.connect{ url = url, pool_size = 2 })
        assert(qx.migrate(db))
        psql("CREATE TABLE lost_rows (v text PRIMARY KEY)")
        psql("CREATE ROLE qx_lost LOGIN SUPERUSER")
    end)

    teardown(function()
        if db then db:close() end
        os.execute("bash scripts/servers.sh stop " .. sh(dir) .. " >/dev/null 2>&1")
        os.execute("rm -rf " .. sh(dir))
    end)

    local Placed = qx.integration_event("outcome_spec.placed")

    -- one unit of work that writes a row and an outbox event; what its hooks saw
    local function place(on, v)
        local seen = {}
        local r, e = on:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO lost_rows (v) VALUES ($1)", v))
            uow:record(Placed{ v = v })
            return "placed"
        end, {
            pre_rollback = function() seen[#seen + 1] = "pre_rollback" end,
            post_commit = function() seen[#seen + 1] = "post_commit" end,
            post_rollback = function() seen[#seen + 1] = "post_rollback" end,
        })
        return r, e, seen
    end

    it("reports a unit of work whose COMMIT reply was lost after it committed as a success", function()
        local v = "committed-" .. SFX
        no_standby()
        terminate_when("SyncRep", "")
        local r, e, seen = place(db, v)
        standby_back()
        assert.is_nil(e)
        assert.equal("placed", r)
        assert.same({ "post_commit" }, seen)
        assert.equal(1, count("SELECT count(*) FROM lost_rows WHERE v = '" .. v .. "'"))
        assert.equal(1, count("SELECT count(*) FROM qx_outbox_events WHERE payload->'payload'->>'v' = '"
            .. v .. "'"))
    end)

    it("resolves a lost reply of the implicit transaction (no BEGIN, no COMMIT) the same way", function()
        local v = "implicit-" .. SFX
        no_standby()
        terminate_when("SyncRep", "")
        local seen = {}
        local r, e = db:unit_of_work(function(uow)
            assert(uow:queue("INSERT INTO lost_rows (v) VALUES ($1)", v))
        end, { post_commit = function() seen[#seen + 1] = "post_commit" end,
               post_rollback = function() seen[#seen + 1] = "post_rollback" end })
        standby_back()
        assert.is_nil(e)
        assert.is_true(r)
        assert.same({ "post_commit" }, seen)
        assert.equal(1, count("SELECT count(*) FROM lost_rows WHERE v = '" .. v .. "'"))
    end)

    it("reports unknown_outcome with the xid when no connection can ask, and no hook claims an outcome", function()
        local v = "unknown-" .. SFX
        local lost = assert(qx.connect{ url = url:gsub("postgres@", "qx_lost@"), pool_size = 1 })
        no_standby()
        -- the new connection that would ask is refused: the role cannot log in any more
        terminate_when("SyncRep", "ALTER ROLE qx_lost NOLOGIN")
        local r, e, seen = place(lost, v)
        standby_back()
        psql("ALTER ROLE qx_lost LOGIN")
        assert.is_nil(r)
        assert.equal("unknown_outcome", e.code)
        assert.is_string(e.xid)
        assert.same({}, seen)
        -- asked again later, the server knows
        assert.equal("committed", db:xact_status(e.xid))
        assert.equal(1, count("SELECT count(*) FROM lost_rows WHERE v = '" .. v .. "'"))
        lost:close()
    end)

    it("takes the rollback path when the transaction whose reply was lost aborted", function()
        local v = "aborted-" .. SFX
        psql("CREATE TABLE IF NOT EXISTS lost_deferred (v text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        -- another transaction holds the same value: the deferred check at COMMIT waits for it
        os.execute("( " .. PSQL .. " -d " .. sh(url) .. " -c "
            .. sh("BEGIN; INSERT INTO lost_deferred VALUES ('" .. v .. "'); SELECT pg_sleep(3); ROLLBACK")
            .. " ) >/dev/null 2>&1 &")
        for _ = 1, 100 do
            if count("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") > 0 then
                break
            end
            os.execute("sleep 0.05")
        end
        terminate_when("transactionid", "")
        local seen = {}
        local r, e = db:unit_of_work(function(uow)
            assert(uow:exec("INSERT INTO lost_deferred (v) VALUES ($1)", v))
            uow:record(Placed{ v = v })
        end, { pre_rollback = function() seen[#seen + 1] = "pre_rollback" end,
               post_commit = function() seen[#seen + 1] = "post_commit" end,
               post_rollback = function() seen[#seen + 1] = "post_rollback" end })
        assert.is_nil(r)
        assert.equal("connection", e.code)
        assert.is_string(e.xid)
        assert.equal("aborted", db:xact_status(e.xid))
        assert.same({ "pre_rollback", "post_rollback" }, seen)
    end)

    it("reports unknown_outcome when the server that answers is on another timeline", function()
        -- the seam: the transaction's methods (the registry's qx.tx metatable); a commit whose
        -- reply was lost tells the timeline it learned, and here it claims another one
        local methods = debug.getregistry()["qx.tx"].__index
        local real = methods.commit
        methods.commit = function(tx, ...)
            local ok, e = real(tx, ...)
            if not ok and type(e) == "table" and e.timeline then e.timeline = "7FFFFFFF" end
            return ok, e
        end
        local v = "timeline-" .. SFX
        no_standby()
        terminate_when("SyncRep", "")
        local ok, r, e, seen = pcall(place, db, v)
        methods.commit = real
        standby_back()
        assert.is_true(ok, r)
        assert.is_nil(r)
        assert.equal("unknown_outcome", e.code)
        assert.is_string(e.xid)
        assert.same({}, seen)
        assert.equal("committed", db:xact_status(e.xid))
        assert.equal("unknown", db:xact_status(e.xid, "7FFFFFFF"))
    end)

    it("resolves a lost reply of the event store's append the same way", function()
        local Deposited = qx.event("outcome_spec.deposited")
        local Account = qx.event_sourced("OutcomeAccount" .. SFX)
        Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        local store = qx.event_store{ db = db }
        local id = core.uuid()
        no_standby()
        terminate_when("SyncRep", "")
        local r, e = db:unit_of_work(function(uow)
            local es = uow:store(store)
            local acc = Account.new(id)
            acc:record(Deposited{ amount = 5 })
            assert(es:append(acc))
            return acc
        end)
        standby_back()
        assert.is_nil(e)
        assert.equal(5, r.balance)
        assert.equal(1, count("SELECT count(*) FROM qx_aggregate_events WHERE aggregate_id = '"
            .. id .. "'"))
    end)

    it("acknowledges a consumed message whose handler's commit reply was lost, once it committed", function()
        local nats_url = assert(read(dir .. "/env"):match("QX_TEST_NATS_URL=(%S+)"))
        local conn = assert(qx.nats.connect{ servers = nats_url })
        local name, prefix = "OUTCOME" .. SFX:upper(), "outcome" .. SFX
        assert(conn:ensure_stream{ name = name, subjects = { prefix .. ".>" } })
        local Ordered = qx.integration_event("outcome_spec.ordered")
        local v = "consumed-" .. SFX
        assert(publisher.new{ nats = conn, subject_prefix = prefix }:publish(Ordered{ v = v }))
        local c = assert(qx.consumer{ nats = conn, stream = name, durable = "d" .. SFX,
                                      registry = qx.registry{ Ordered }, db = db,
                                      ack_sync = true })
        no_standby()
        terminate_when("SyncRep", "")
        local runs = 0
        local counts = assert(c:run_once(function(ev, uow)
            runs = runs + 1
            assert(uow:exec("INSERT INTO lost_rows (v) VALUES ($1)", ev.v))
        end, { timeout_ms = 5000 }))
        standby_back()
        assert.same({ fetched = 1, handled = 1, failed = 0, termed = 0, duplicates = 0 }, counts)
        assert.equal(1, runs)
        assert.equal(0, assert(c:info()).num_ack_pending)
        assert.equal(1, count("SELECT count(*) FROM lost_rows WHERE v = '" .. v .. "'"))
        c:close()
        conn:delete_stream(name)
        conn:close()
    end)
end)

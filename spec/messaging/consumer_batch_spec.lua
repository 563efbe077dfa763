-- qx.consumer with commit = "batch" against a real nats-server (JetStream) and PostgreSQL: the
-- fetched batch in one unit of work, a failing message isolated, its key held, duplicates
-- caught by the inbox, a crash between commit and ack, bad options.
local support = require "support"
local cjson = require "cjson"
local qx = require "qx"
local core = require "qx.core"
local nats = require "qx.messaging.nats"
local publisher = require "qx.messaging.publisher"

local clock = core.clock

local Placed = qx.integration_event("spec.batch.order_placed", { version = 1 })
local Shipped = qx.integration_event("spec.batch.order_shipped", { version = 1 })

local TENANT_A = "0190d2a8-1111-7000-8000-00000000000a"
local TENANT_B = "0190d2a8-1111-7000-8000-00000000000b"

describe("qx.consumer, commit = \"batch\"", function()
    local db, conn, tbl

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
        conn = assert(nats.connect{ servers = support.nats_url() })
        tbl = support.unique("batch_effects")
        -- xid: the transaction that wrote the row, to count commits without triggers
        assert(db:exec("CREATE TABLE " .. tbl .. [[ (pos bigserial PRIMARY KEY,
            event_id uuid NOT NULL, k text, n int,
            xid xid8 NOT NULL DEFAULT pg_current_xact_id())]]))
    end)

    teardown(function()
        if db then
            db:exec("DROP TABLE IF EXISTS " .. tbl)
            db:close()
        end
        if conn then conn:close() end
    end)

    before_each(function() assert(db:exec("TRUNCATE " .. tbl)) end)

    local streams = {}
    local function new_stream()
        local s = { name = support.unique("BATCH"):upper(), prefix = support.unique("bspec"),
                    durable = support.unique("d") }
        assert(conn:ensure_stream{ name = s.name, subjects = { s.prefix .. ".>" } })
        s.pub = assert(publisher.new{ nats = conn, subject_prefix = s.prefix })
        -- publishes ev with the relay's headers, the partition key among them when given
        function s.publish(ev, key)
            local env = ev:envelope()
            local h = publisher.headers(env)
            h["qx.partition_key"] = key
            return assert(conn:publish(s.prefix .. "." .. env.event_name, cjson.encode(env), h))
        end
        streams[#streams + 1] = s
        return s
    end

    after_each(function()
        for _, s in ipairs(streams) do conn:delete_stream(s.name) end
        streams = {}
    end)

    local function consumer(s, opts)
        local o = { nats = conn, stream = s.name, durable = s.durable, db = db, commit = "batch",
                    registry = qx.registry{ Placed, Shipped }, backoff = { 50 } }
        for k, v in pairs(opts or {}) do o[k] = v end
        return assert(qx.consumer(o))
    end

    local function insert(ev, uow)
        assert(uow:exec("INSERT INTO " .. tbl .. " (event_id, k, n) VALUES ($1, $2, $3)",
                        ev.event_id, ev.k, ev.n))
    end

    local function rows()
        return assert(db:query("SELECT event_id::text AS event_id, k, n, xid::text AS xid FROM "
                               .. tbl .. " ORDER BY pos"))
    end

    local function distinct_xids()
        return assert(db:query("SELECT count(DISTINCT xid) AS n FROM " .. tbl))[1].n
    end

    -- Fetches until `want` messages came (a fetch may end with fewer than are stored)
    local function run_until(c, handler, want, opts)
        local total = { fetched = 0, handled = 0, failed = 0, termed = 0, duplicates = 0, held = 0 }
        local deadline = clock() + 10
        while total.fetched < want and clock() < deadline do
            local r = assert(c:run_once(handler, opts or { timeout_ms = 2000 }))
            for k, v in pairs(r) do total[k] = total[k] + v end
        end
        return total
    end

    -- Busy wait (no sleep in plain Lua); only for short, bounded pauses.
    local function pause(seconds)
        local t = clock() + seconds
        while clock() < t do end
    end

    -- Waits until the server holds n messages for the durable, so that one fetch can bring
    -- them all (what a batch contains matters to the spec).
    local function stored(c, n)
        local deadline = clock() + 5
        while assert(c:info()).num_pending < n and clock() < deadline do pause(0.01) end
        assert.equal(n, assert(c:info()).num_pending)
    end

    -- Acks are sent without waiting for the server: its view catches up a moment later.
    local function ack_pending(c)
        local deadline = clock() + 5
        local info
        repeat
            info = assert(c:info())
            if info.num_ack_pending == 0 then return 0 end
            pause(0.02)
        until clock() > deadline
        return info.num_ack_pending
    end

    local function inbox_count(c)
        return assert(db:query("SELECT count(*) AS n FROM qx_inbox WHERE consumer = $1",
                               c.name))[1].n
    end

    it("commits a fetched batch in one transaction, each message's writes in it, then acks them all",
       function()
        local s = new_stream()
        local c = consumer(s, { batch = 20 })
        for i = 1, 20 do s.publish(Placed{ n = i }) end
        stored(c, 20)
        local r = run_until(c, insert, 20)
        assert.same({ fetched = 20, handled = 20, failed = 0, termed = 0, duplicates = 0,
                      held = 0 }, r)
        local got = rows()
        assert.equal(20, #got)
        for i = 1, 20 do assert.equal(i, got[i].n) end
        -- one commit per fetch (a fetch may bring fewer than 20), never one per message
        assert.equal(1, c:stats().batch_commits)
        assert.equal(1, distinct_xids())
        assert.equal(20, inbox_count(c))
        assert.equal(0, ack_pending(c))
        assert.equal(0, assert(c:info()).num_pending)
        c:close()
    end)

    it("commits one transaction per message in the default mode (the contrast)", function()
        local s = new_stream()
        local c = consumer(s, { batch = 5, commit = "message" })
        for i = 1, 5 do s.publish(Placed{ n = i }) end
        stored(c, 5)
        run_until(c, insert, 5)
        assert.equal(5, distinct_xids())
        c:close()
    end)

    it("isolates a failing message in its savepoint: the rest commit, it is redelivered after its backoff",
       function()
        local s = new_stream()
        local c = consumer(s, { batch = 6 })
        local bad
        for i = 1, 6 do
            local ev = Placed{ n = i }
            if i == 3 then bad = ev.event_id end
            s.publish(ev)
        end
        stored(c, 6)
        local fail = true
        local function handler(ev, uow)
            insert(ev, uow)
            if ev.n == 3 and fail then error("order 3 is not ready") end
        end
        local r = run_until(c, handler, 6)
        assert.equal(5, r.handled)
        assert.equal(1, r.failed)
        assert.equal(0, r.held) -- no keys: nothing waits for it
        local got = rows()
        assert.equal(5, #got)
        for _, row in ipairs(got) do assert.not_equal(3, row.n) end
        assert.equal(1, distinct_xids()) -- one commit: the others did not wait for it
        -- its inbox row went with it: the redelivery runs the handler
        assert.equal(0, #assert(db:query("SELECT 1 FROM qx_inbox WHERE consumer = $1 AND "
                                         .. "event_id = $2", c.name, bad)))
        assert.matches("order 3 is not ready", c:stats().last_error, 1, true)
        fail = false
        r = run_until(c, handler, 1)
        assert.equal(1, r.handled)
        assert.equal(6, #rows())
        assert.equal(0, ack_pending(c))
        c:close()
    end)

    it("holds the later messages of a failed message's key and redelivers them with it, in order",
       function()
        local s = new_stream()
        -- a1 b1 a2 c1 a3 b2: a1 fails once; a2 and a3 must not overtake it
        local plan = { { "a", 1 }, { "b", 1 }, { "a", 2 }, { "c", 1 }, { "a", 3 }, { "b", 2 } }
        local c = consumer(s, { batch = 10 })
        for _, p in ipairs(plan) do s.publish(Placed{ k = p[1], n = p[2] }, "order:" .. p[1]) end
        stored(c, 6)
        local fail_a1 = true
        local seen = {}
        local function handler(ev, uow)
            seen[#seen + 1] = ev.k .. ev.n
            if ev.k == "a" and ev.n == 1 and fail_a1 then error("a1 fails once") end
            insert(ev, uow)
        end
        local r = run_until(c, handler, 6)
        assert.equal(3, r.handled)
        assert.equal(1, r.failed)
        assert.equal(2, r.held)
        -- the held ones never ran
        assert.same({ "a1", "b1", "c1", "b2" }, seen)
        local got = rows()
        local keys = {}
        for i, row in ipairs(got) do keys[i] = row.k .. row.n end
        assert.same({ "b1", "c1", "b2" }, keys)
        assert.equal(3, inbox_count(c)) -- a1, a2, a3 left no inbox row
        assert.equal(2, c:stats().held)
        assert.matches("qx_consumer_messages_held_total{[^}]*} 2", c:metrics())

        -- they come back together after a1's backoff, in stream order, and apply in order
        fail_a1 = false
        seen = {}
        r = run_until(c, handler, 3)
        assert.equal(3, r.handled)
        assert.same({ "a1", "a2", "a3" }, seen)
        got = rows()
        keys = {}
        for i, row in ipairs(got) do keys[i] = row.k .. row.n end
        assert.same({ "b1", "c1", "b2", "a1", "a2", "a3" }, keys)
        c:close()
    end)

    it("lets a key go on once its failed message is dead-lettered at max_deliver", function()
        local s = new_stream()
        local c = consumer(s, { batch = 10, max_deliver = 1 })
        s.publish(Placed{ k = "a", n = 1 }, "order:a")
        s.publish(Placed{ k = "a", n = 2 }, "order:a")
        stored(c, 2)
        local r = run_until(c, function(ev, uow)
            if ev.n == 1 then error("poison") end
            insert(ev, uow)
        end, 2)
        assert.equal(1, r.handled)
        assert.equal(1, r.failed)
        assert.equal(1, r.termed)
        assert.equal(0, r.held)
        assert.equal(1, #assert(c:dead_letters()))
        assert.equal(2, rows()[1].n)
        c:close()
    end)

    it("catches duplicates in one statement: a message twice in one batch, and one handled before",
       function()
        local s = new_stream()
        local first = Placed{ n = 1 }
        local c = consumer(s, { batch = 10 })
        s.publish(first)
        run_until(c, insert, 1)
        local twice = Placed{ n = 2 }
        s.publish(first)       -- handled in an earlier batch
        s.publish(twice)
        s.publish(twice)       -- twice in this batch (no Nats-Msg-Id, so the stream keeps both)
        s.publish(Placed{ n = 3 })
        stored(c, 4)
        local calls = 0
        local r = run_until(c, function(ev, uow)
            calls = calls + 1
            insert(ev, uow)
        end, 4)
        assert.equal(2, r.handled)
        assert.equal(2, r.duplicates)
        assert.equal(2, calls)
        assert.equal(3, #rows())
        assert.equal(3, inbox_count(c))
        assert.equal(0, ack_pending(c))
        c:close()
    end)

    it("runs every copy of a message without the inbox, still in one commit", function()
        local s = new_stream()
        local c = consumer(s, { batch = 10, inbox = false })
        local ev = Placed{ n = 1 }
        s.publish(ev)
        s.publish(ev)
        s.publish(Placed{ n = 2 })
        stored(c, 3)
        local r = run_until(c, function(e, uow)
            assert(uow:exec("INSERT INTO " .. tbl .. " (event_id, n) VALUES ($1, $2)",
                            core.uuid(), e.n))
        end, 3)
        assert.equal(3, r.handled)
        assert.equal(0, r.duplicates)
        assert.equal(3, #rows())
        assert.equal(1, distinct_xids())
        assert.equal(0, inbox_count(c))
        assert.matches("qx_consumer_batch_commits_total{[^}]*} 1", c:metrics())
        c:close()
    end)

    it("gives each message's recorded events that message's context, and its tenant to the repository",
       function()
        local s = new_stream()
        local a = Placed{ n = 1, tenant_id = TENANT_A }
        local b = Placed{ n = 2, tenant_id = TENANT_B }
        local c = consumer(s, { batch = 10 })
        s.publish(a)
        s.publish(b)
        local tenants = {}
        run_until(c, function(ev, uow)
            tenants[#tenants + 1] = uow.context.tenant_id
            uow:record(Shipped{ n = ev.n })
        end, 2)
        assert.same({ TENANT_A, TENANT_B }, tenants)
        local out = assert(db:query([[SELECT payload->'payload'->>'n' AS n, tenant_id::text AS t,
            causation_id::text AS cause FROM qx_outbox_events WHERE event_name = $1
            AND causation_id IN ($2, $3) ORDER BY n]], "spec.batch.order_shipped",
            a.event_id, b.event_id))
        assert.equal(2, #out)
        assert.same({ "1", TENANT_A, a.event_id }, { out[1].n, out[1].t, out[1].cause })
        assert.same({ "2", TENANT_B, b.event_id }, { out[2].n, out[2].t, out[2].cause })
        c:close()
    end)

    it("does not run the handler again for a batch redelivered after a crash between commit and ack #slow",
       function()
        local s = new_stream()
        for i = 1, 5 do s.publish(Placed{ n = i }) end
        local c = consumer(s, { batch = 10, ack_wait = 1 })
        -- a separate process handles the batch, commits, and dies before it can acknowledge
        local script = os.tmpname()
        local f = assert(io.open(script, "w"))
        f:write(string.format([[
package.path = %q
package.cpath = %q
local qx = require "qx"
local nats = require "qx.messaging.nats"
local core = require "qx.core"
local db = assert(qx.connect{ url = %q })
local conn = assert(nats.connect{ servers = %q })
local Placed = qx.integration_event("spec.batch.order_placed", { version = 1 })
local c = assert(qx.consumer{ nats = conn, stream = %q, durable = %q, db = db, ack_wait = 1,
  registry = qx.registry{ Placed }, commit = "batch", batch = 10,
  unit_of_work = { post_commit = function() os.exit(7) end } })
local deadline = core.clock() + 10
while core.clock() < deadline do
  c:run_once(function(ev, uow)
    assert(uow:exec("INSERT INTO %s (event_id, n) VALUES ($1, $2)", ev.event_id, ev.n))
  end, { timeout_ms = 2000 })
end
os.exit(1)
]], package.path, package.cpath, support.db_url(), support.nats_url(), s.name, s.durable, tbl))
        f:close()
        local interpreter = (arg and arg[-1]) or (jit and "luajit" or "lua5.4")
        local p = assert(io.popen("env -u LD_PRELOAD ASAN_OPTIONS=detect_leaks=0 " .. interpreter
                                  .. " " .. script .. " >/dev/null 2>&1; echo $?"))
        local status = p:read("*a")
        p:close()
        os.remove(script)
        assert.equal("7", status:match("%d+"))
        local committed = #rows()
        assert.is_true(committed >= 1)

        local calls = 0
        local r = run_until(c, function(ev, uow)
            calls = calls + 1
            insert(ev, uow)
        end, 5)
        -- what the dead process committed comes back as duplicates; the rest (a fetch may have
        -- brought fewer than five) is handled now
        assert.equal(committed, r.duplicates)
        assert.equal(5 - committed, r.handled)
        assert.equal(5 - committed, calls)
        assert.equal(5, #rows())
        c:close()
    end)

    it("fails the whole batch when its commit fails, then commits the innocent ones one by one", function()
        local s = new_stream()
        -- a deferred unique constraint fails only at COMMIT: the savepoints cannot see it
        local dtbl = support.unique("batch_deferred")
        assert(db:exec("CREATE TABLE " .. dtbl .. " (n int, CONSTRAINT " .. dtbl
                       .. "_one_n UNIQUE (n) DEFERRABLE INITIALLY DEFERRED)"))
        assert(db:exec("INSERT INTO " .. dtbl .. " VALUES (3)"))
        local c = consumer(s, { batch = 10 })
        for i = 1, 4 do s.publish(Placed{ n = i }) end
        stored(c, 4)
        local r = run_until(c, function(ev, uow)
            assert(uow:exec("INSERT INTO " .. dtbl .. " VALUES ($1)", ev.n))
            insert(ev, uow)
        end, 4)
        assert.equal(3, r.handled)
        assert.equal(1, r.failed)
        local ns = {}
        for i, row in ipairs(rows()) do ns[i] = row.n end
        assert.same({ 1, 2, 4 }, ns)
        assert.equal(3, inbox_count(c))
        assert.matches(dtbl .. "_one_n", c:stats().last_error, 1, true)
        db:exec("DROP TABLE " .. dtbl)
        c:close()
    end)

    it("fails the whole batch when a handler breaks the transaction, then isolates that handler",
       function()
        local s = new_stream()
        local c = consumer(s, { batch = 10 })
        for i = 1, 3 do s.publish(Placed{ n = i }) end
        stored(c, 3)
        local r = run_until(c, function(ev, uow)
            insert(ev, uow)
            -- the connection dies under the batch: no savepoint can be rolled back to
            if ev.n == 2 then uow:exec("SELECT pg_terminate_backend(pg_backend_pid())") end
        end, 3)
        assert.equal(2, r.handled)
        assert.equal(1, r.failed)
        local ns = {}
        for i, row in ipairs(rows()) do ns[i] = row.n end
        assert.same({ 1, 3 }, ns)
        assert.equal(2, inbox_count(c))
        c:close()
    end)

    describe("bad options", function()
        local s
        before_each(function() s = new_stream() end)

        it("refuses a commit mode it does not know, and batch without a db", function()
            assert.has_error(function() consumer(s, { commit = "sometimes" }) end,
                             'qx.consumer: commit must be "message" or "batch"')
            assert.has_error(function() consumer(s, { commit = true }) end,
                             'qx.consumer: commit must be "message" or "batch"')
            assert.has_error(function() consumer(s, { db = false, commit = "batch" }) end)
            local ok, e = pcall(qx.consumer, { nats = conn, stream = s.name, durable = s.durable,
                                               registry = qx.registry{ Placed }, commit = "batch" })
            assert.is_false(ok)
            assert.matches('commit = "batch" needs a db', e, 1, true)
        end)
    end)
end)

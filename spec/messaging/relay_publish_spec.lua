-- The outbox relay against real PostgreSQL and nats-server: what it publishes, order per key,
-- retries and dead letters, exactly-once through Nats-Msg-Id, shards and leadership, bad input.
local qx = require "qx"
local core = require "qx.core"
local H = require "relay_helper"

local null = core.null

describe("outbox relay", function()
    describe("publishing", function()
        local ctx
        before_each(function() ctx = H.setup() end)
        after_each(function() H.teardown(ctx) end)

        it("publishes committed events: envelope as body, subject prefix.name, qx headers, Nats-Msg-Id", function()
            local tenant, corr = qx.uuid(), qx.uuid()
            local Placed = qx.integration_event("order.placed", { version = 3 })
            local ev
            assert(ctx.db:unit_of_work(function(uow)
                ev = uow:record(Placed{ total = 12.5, lines = { "a", "b" } })
            end, { context = { tenant_id = tenant, correlation_id = corr, user_id = "u-1" } }))
            local plain = H.commit(ctx, { { key = "k1" } })[1]
            local relay = assert(H.relay(ctx))
            local r = assert(relay:run_once())
            assert.same({ leader = true, database = true, lock_lost = false, claimed = 2,
                          published = 2, duplicates = 0, failed = 0, retried = 0, dead_lettered = 0,
                          held = 0, failures = {} }, r)
            local msgs = H.check_stream(ctx, { ev, plain })
            local m = msgs[1]
            assert.equal(ctx.prefix .. ".order.placed", m.subject)
            assert.equal("order.placed", m.headers["qx.event_name"])
            assert.equal("3", m.headers["qx.event_version"])
            assert.equal(ev.event_id, m.headers["qx.event_id"])
            assert.equal(ev.event_id, m.headers["Nats-Msg-Id"])
            assert.equal(corr, m.headers["qx.correlation_id"])
            assert.equal(tenant, m.headers["qx.tenant_id"])
            local env = m.env
            assert.equal(ev.event_id, env.event_id)
            assert.equal("order.placed", env.event_name)
            assert.equal(3, env.event_version)
            assert.equal(ev.occurred_at, env.occurred_at)
            assert.equal(corr, env.correlation_id)
            assert.equal(tenant, env.tenant_id)
            assert.equal("u-1", env.actor_id)
            assert.same({ total = 12.5, lines = { "a", "b" } }, env.payload)
            -- without a tenant, no tenant header (the envelope says null)
            assert.is_nil(msgs[2].headers["qx.tenant_id"])
            -- the partition key the relay orders by, for consumers that keep it (no aggregate,
            -- no key)
            assert.is_nil(m.headers["qx.partition_key"])
            assert.equal("spec:k1", msgs[2].headers["qx.partition_key"]) -- the helper prefixes keys
            assert.equal(null, msgs[2].env.tenant_id)
            -- the rows are marked
            local rows = H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events WHERE published_at IS NOT NULL")
            assert.equal(2, rows[1].n)
            assert.same({ leader = true, database = true, lock_lost = false, claimed = 0,
                          published = 0, duplicates = 0, failed = 0, retried = 0, dead_lettered = 0,
                          held = 0, failures = {} }, assert(relay:run_once()))
            relay:close()
        end)

        it("keeps commit order per partition key across many keys and batches #slow", function()
            local evs = H.commit_many(ctx, 1200, 37, 40)
            local relay = assert(H.relay(ctx, { batch_size = 250, max_in_flight = 64 }))
            local total = 0
            for _ = 1, 10 do
                local r = assert(relay:run_once())
                total = total + r.published
                if r.claimed == 0 then break end
            end
            assert.equal(1200, total)
            H.check_stream(ctx, evs)
            relay:close()
        end)

        it("run() claims the next batch while the last one is marked:"
           .. " a key's later rows follow at once, in order #slow",
           function()
            local evs = H.commit_many(ctx, 1000, 5, 100)
            H.slow_marks(ctx, 0.05)
            local relay = assert(H.relay(ctx, { batch_size = 100 }))
            local batches = {}
            assert(relay:run{ on_batch = function(r, e)
                assert(not e, tostring(e))
                batches[#batches + 1] = r
                if r.claimed == 0 then return false end
            end })
            -- the rows being marked are locked, yet their keys' next rows are claimed at once
            local published = 0
            for i, r in ipairs(batches) do
                published = published + r.published
                if published < 1000 then assert.equal(100, r.claimed, "batch " .. i) end
            end
            assert.equal(1000, published)
            assert.equal(0, H.pending(ctx))
            H.check_stream(ctx, evs)
            relay:close()
        end)

        it("with delete_published, deletes each row once JetStream has acked it", function()
            local evs = H.commit_many(ctx, 600, 7, 50)
            local relay = assert(H.relay(ctx, { batch_size = 100, delete_published = true }))
            assert(relay:run{ on_batch = function(r, e)
                assert(not e, tostring(e))
                if r.claimed == 0 then return false end
            end })
            assert.equal(0, H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events")[1].n)
            H.check_stream(ctx, evs)
            relay:close()
        end)

        it("sends a batch of many keys over a second connection that gathers writes, closed with the relay", function()
            local support = require "support"
            local cjson = require "cjson"
            local name = "relay-" .. qx.uuid()
            local function connections()
                local n = 0
                for _, c in ipairs(cjson.decode(support.nats_monitor("/connz?limit=4096")).connections or {}) do
                    if c.name == name then n = n + 1 end
                end
                return n
            end
            local conn = assert(qx.nats.connect{ servers = support.nats_url(), stream = ctx.stream,
                                                 subject_prefix = ctx.prefix, name = name })
            local evs = H.commit_many(ctx, 300, 100, 100)
            local few = H.commit(ctx, { { key = "x" }, { key = "y" } })
            local relay = assert(H.relay(ctx, { nats = conn, batch_size = 300 }))
            assert.equal(1, connections())
            local r = assert(relay:run_once()) -- 100 keys ready at once: the gathering connection
            assert.equal(300, r.published)
            assert(H.wait_until(function() return connections() == 2 end, 5))
            r = assert(relay:run_once()) -- two keys: the relay's own connection, at once
            assert.equal(2, r.published)
            for _, ev in ipairs(few) do evs[#evs + 1] = ev end
            H.check_stream(ctx, evs)
            relay:close()
            conn:close()
            assert(H.wait_until(function() return connections() == 0 end, 5))
        end)

        it("publishes a lone key's events in order with one unacked message at a time", function()
            local evs = H.commit_many(ctx, 300, 1, 100)
            local relay = assert(H.relay(ctx, { batch_size = 1000 }))
            assert.equal(300, assert(relay:run_once()).published)
            H.check_stream(ctx, evs)
            relay:close()
        end)

        it("wakes up on the unit of work's NOTIFY: an event is on the stream long before the idle interval", function()
            local pid = H.spawn_relay(ctx, "--idle-interval 30 --poll-interval 30")
            assert(H.wait_until(function() return H.log_of(ctx, pid):find("leader", 1, true) end, 10),
                   H.log_of(ctx, pid))
            H.sleep(0.3) -- let it settle into its wait
            local t0 = core.clock()
            local evs = H.commit(ctx, { { key = "a" } })
            assert(H.wait_until(function() return assert(ctx.conn:stream_info()).messages == 1 end, 5))
            local took = core.clock() - t0
            assert.is_true(took < 1, "took " .. took .. " s")
            H.check_stream(ctx, evs)
            local out = H.kill(ctx, pid, "TERM")
            assert.truthy(out:find("stopped: 1 published", 1, true), out)
        end)

        it("after a crash between publish and mark, publishes again and the stream keeps each event once", function()
            local evs = H.commit_many(ctx, 50, 5, 25)
            local relay = assert(H.relay(ctx))
            assert.equal(50, assert(relay:run_once()).published)
            -- the mark is lost, as if the relay had died before COMMIT
            H.sql(ctx, "UPDATE qx_outbox_events SET published_at = NULL")
            local r = assert(relay:run_once())
            assert.equal(50, r.published)
            assert.equal(50, r.duplicates)
            H.check_stream(ctx, evs)
            assert.equal(0, H.pending(ctx))
            relay:close()
        end)

        it("a row another transaction holds keeps its key's later rows back; other keys go on", function()
            local evs = H.commit(ctx, { { key = "k" }, { key = "k" }, { key = "l" }, { key = "k" } })
            local other = assert(ctx.db:acquire())
            assert(other:query("BEGIN"))
            assert(other:query("SELECT id FROM qx_outbox_events WHERE id = $1 FOR UPDATE", evs[1].event_id))
            local relay = assert(H.relay(ctx))
            local r = assert(relay:run_once())
            assert.equal(1, r.published) -- only l's
            H.check_stream(ctx, { evs[3] })
            assert(other:query("ROLLBACK"))
            other:release()
            r = assert(relay:run_once())
            assert.equal(3, r.published)
            H.check_stream(ctx, evs)
            relay:close()
        end)

        it("reports counters in stats() and Prometheus text in metrics()", function()
            H.commit_many(ctx, 10, 2, 10)
            local relay = assert(H.relay(ctx, { shard_id = 0, shard_count = 1 }))
            assert(relay:run_once())
            local st = relay:stats()
            assert.equal(1, st.batches)
            assert.equal(10, st.published)
            assert.is_true(st.leader)
            assert.equal("connected", st.nats.state)
            local text = assert(relay:metrics())
            assert.truthy(text:find('\nqx_relay_published_total{shard="0",shard_count="1"} 10\n', 1, true), text)
            assert.truthy(text:find("\nqx_outbox_pending 0\n", 1, true), text)
            assert.truthy(text:find("# TYPE qx_relay_published_total counter", 1, true))
            relay:close()
        end)

        it("run() stops when on_batch returns false, and re-raises an error from on_batch", function()
            H.commit_many(ctx, 5, 1, 5)
            local relay = assert(H.relay(ctx))
            local batches = {}
            assert.is_true(relay:run{ on_batch = function(r)
                batches[#batches + 1] = r
                return false
            end })
            assert.equal(1, #batches)
            assert.equal(5, batches[1].published)
            assert.has_error(function()
                relay:run{ on_batch = function() error("boom") end }
            end, "boom")
            local n = 0
            relay:run{ on_batch = function() n = n + 1 if n == 3 then relay:stop() end end }
            assert.equal(3, n)
            relay:close()
            relay:close()
            assert.has_error(function() relay:run_once() end)
        end)
    end)

    describe("failures", function()
        local ctx
        -- the stream takes "ok.>" only: events named bad.* find no stream until it is widened
        -- (a failure of the transport's: no responders); an event padded beyond 2 KB is too
        -- large for the stream (the event's own failure)
        before_each(function() ctx = H.setup{ subjects = { "ok.>" }, max_msg_size = 2048 } end)
        after_each(function() H.teardown(ctx) end)

        it("holds back later events of a key behind a failed one until it succeeds", function()
            local e = H.commit(ctx, {
                { key = "k", name = "ok.a" }, { key = "k", name = "bad.b" }, { key = "k", name = "ok.c" },
                { key = "l", name = "ok.d" },
            })
            local relay = assert(H.relay(ctx, { base_delay_ms = 60000 }))
            local r = assert(relay:run_once())
            assert.equal(2, r.published)
            assert.equal(1, r.failed)
            assert.equal(1, r.held)
            assert.equal(1, r.retried)
            local row = H.sql(ctx, "SELECT attempts, last_error, next_attempt_at > now() AS later "
                .. "FROM qx_outbox_events WHERE id = $1", e[2].event_id)[1]
            assert.equal(0, row.attempts) -- no stream answered: not the event's fault
            assert.truthy(row.last_error:find("no responders", 1, true) or row.last_error:find("nats", 1, true),
                          row.last_error)
            assert.is_true(row.later)
            -- while it waits for its next attempt, nothing of key k moves
            r = assert(relay:run_once())
            assert.equal(0, r.claimed)
            for _, ev in ipairs(H.commit(ctx, { { key = "k", name = "ok.e" }, { key = "l", name = "ok.f" } })) do
                e[#e + 1] = ev
            end
            r = assert(relay:run_once())
            assert.equal(1, r.published) -- only l's
            -- the stream takes bad.* now and the retry is due
            assert(ctx.conn:ensure_stream{ subjects = { ctx.prefix .. ".ok.>", ctx.prefix .. ".bad.>" } })
            H.sql(ctx, "UPDATE qx_outbox_events SET next_attempt_at = now() WHERE id = $1", e[2].event_id)
            r = assert(relay:run_once())
            assert.equal(3, r.published)
            local msgs = H.check_stream(ctx, e)
            local order = {}
            for _, m in ipairs(msgs) do
                if m.env.payload.key == "k" then order[#order + 1] = m.env.event_name end
            end
            assert.same({ "ok.a", "bad.b", "ok.c", "ok.e" }, order)
            relay:close()
        end)

        it("run(): a failed row holds its key in the batch claimed while its own batch is marked", function()
            local e = H.commit(ctx, {
                { key = "k", name = "ok.a" }, { key = "k", name = "bad.b" }, { key = "l", name = "ok.1" },
                { key = "k", name = "ok.c" }, { key = "l", name = "ok.2" }, { key = "k", name = "ok.d" },
                { key = "l", name = "ok.3" }, { key = "l", name = "ok.4" },
            })
            H.slow_marks(ctx, 0.3, "bad.b")
            local relay = assert(H.relay(ctx, { batch_size = 3, base_delay_ms = 60000 }))
            local failed = 0
            assert(relay:run{ on_batch = function(r, err)
                assert(not err, tostring(err))
                failed = failed + r.failed
                if r.claimed == 0 then return false end
            end })
            assert.equal(1, failed)
            H.check_stream(ctx, { e[1], e[3], e[5], e[7], e[8] })
            assert.equal(3, H.pending(ctx)) -- bad.b waits for its retry, ok.c and ok.d behind it
            relay:close()
        end)

        it("a key held back by a failed event does not fill the batches: other keys keep flowing", function()
            local specs = { { key = "k", name = "bad.head" } }
            for _ = 1, 12 do specs[#specs + 1] = { key = "k", name = "ok.later" } end
            for _ = 1, 3 do specs[#specs + 1] = { key = "l", name = "ok.other" } end
            local evs = H.commit(ctx, specs)
            local relay = assert(H.relay(ctx, { batch_size = 5, base_delay_ms = 60000 }))
            local r = assert(relay:run_once())
            assert.equal(1, r.failed)
            assert.equal(4, r.held)
            r = assert(relay:run_once())
            assert.equal(3, r.published)
            H.check_stream(ctx, { evs[14], evs[15], evs[16] })
            relay:close()
        end)

        it("dead-letters an event after max_attempts and lets its key go on", function()
            local e = H.commit(ctx, { { key = "k", name = "ok.x", pad = 4096 }, { key = "k", name = "ok.y" } })
            local relay = assert(H.relay(ctx, { max_attempts = 2, base_delay_ms = 0, max_delay_ms = 0 }))
            local r = assert(relay:run_once())
            assert.equal(1, r.failed)
            assert.equal(0, r.retried)
            assert.equal(1, r.held)
            assert.same({ e[1].event_id, true, false },
                        { r.failures[1].event_id, r.failures[1].counted, r.failures[1].dead })
            assert.matches("maximum", r.failures[1].error)
            r = assert(relay:run_once())
            assert.equal(1, r.dead_lettered)
            r = assert(relay:run_once())
            assert.equal(1, r.published)
            local dead = assert(qx.outbox(ctx.db):get_dead())
            assert.equal(1, #dead)
            assert.equal(e[1].event_id, dead[1].id)
            assert.equal(2, dead[1].attempts)
            H.check_stream(ctx, { e[2] })
            relay:close()
        end)

        it("never counts a failure of the transport toward max_attempts, however long it lasts", function()
            local e = H.commit(ctx, { { key = "k", name = "bad.x" }, { key = "k", name = "ok.y" } })
            local relay = assert(H.relay(ctx, { max_attempts = 2, base_delay_ms = 0, max_delay_ms = 0 }))
            for _ = 1, 5 do
                local r = assert(relay:run_once())
                assert.same({ 1, 1, 0, 1 }, { r.failed, r.retried, r.dead_lettered, r.held })
                assert.same({ e[1].event_id, false, false },
                            { r.failures[1].event_id, r.failures[1].counted, r.failures[1].dead })
            end
            local row = H.sql(ctx, "SELECT attempts, dead_at IS NULL AS alive FROM qx_outbox_events"
                .. " WHERE id = $1", e[1].event_id)[1]
            assert.same({ 0, true }, { row.attempts, row.alive })
            assert.equal(0, #assert(qx.outbox(ctx.db):get_dead()))
            -- the outage ends: both go out, in order
            assert(ctx.conn:ensure_stream{ subjects = { ctx.prefix .. ".ok.>", ctx.prefix .. ".bad.>" } })
            local r = assert(relay:run_once())
            assert.equal(2, r.published)
            H.check_stream(ctx, e)
            assert.equal(5, relay:stats().retried)
            relay:close()
        end)

        it("with delete_published, a failed row stays with its attempts and holds its key", function()
            local e = H.commit(ctx, {
                { key = "k", name = "ok.a" }, { key = "k", name = "ok.b", pad = 4096 }, { key = "k", name = "ok.c" },
                { key = "l", name = "ok.d" },
            })
            local relay = assert(H.relay(ctx, { base_delay_ms = 60000, delete_published = true }))
            local r = assert(relay:run_once())
            assert.equal(2, r.published)
            assert.equal(1, r.failed)
            local rows = H.sql(ctx, "SELECT id::text AS id, attempts, published_at IS NULL AS pending"
                .. " FROM qx_outbox_events ORDER BY seq")
            assert.equal(2, #rows)
            assert.same({ e[2].event_id, 1, true }, { rows[1].id, rows[1].attempts, rows[1].pending })
            assert.same({ e[3].event_id, 0, true }, { rows[2].id, rows[2].attempts, rows[2].pending })
            H.check_stream(ctx, { e[1], e[4] })
            relay:close()
        end)

        it("dead-letters rows that cannot be sent at once, and publishes the rest", function()
            local good = H.commit(ctx, { { key = "k", name = "ok.1" } })[1]
            local function insert(name, payload, key)
                local id = qx.uuid()
                H.sql(ctx, "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, partition_key)"
                  .. " VALUES ($1, $2, 1, $3::jsonb, $4)", id, name, payload, key or null)
                return id
            end
            local not_object = insert("ok.list", "[1, 2, 3]", "k")
            local a_string = insert("ok.text", '"just text"')
            local empty_name = insert("", '{"event_id": "x"}')
            local bad_subject = insert("ok.has space", '{"a": 1}')
            local wildcard = insert("ok.*", '{"a": 1}')
            local after = H.commit(ctx, { { key = "k", name = "ok.2" } })[1]
            local relay = assert(H.relay(ctx))
            local r = assert(relay:run_once())
            assert.equal(5, r.dead_lettered)
            assert.equal(2, r.published)
            assert.equal(0, r.failed)
            local rows = H.sql(ctx, "SELECT id::text AS id, last_error, dead_at IS NOT NULL AS dead, attempts"
                .. " FROM qx_outbox_events WHERE published_at IS NULL ORDER BY seq")
            assert.equal(5, #rows)
            local by_id = {}
            for _, row in ipairs(rows) do
                assert.is_true(row.dead)
                assert.equal(1, row.attempts)
                by_id[row.id] = row.last_error
            end
            assert.truthy(by_id[not_object]:find("not an envelope", 1, true))
            assert.truthy(by_id[a_string]:find("not an envelope", 1, true))
            assert.truthy(by_id[empty_name]:find("empty event name", 1, true))
            assert.truthy(by_id[bad_subject]:find("valid subject", 1, true))
            assert.truthy(by_id[wildcard]:find("valid subject", 1, true))
            H.check_stream(ctx, { good, after })
            relay:close()
        end)
    end)

    describe("settings", function()
        local ctx
        setup(function() ctx = H.setup() end)
        teardown(function() H.teardown(ctx) end)

        it("validates shard settings as the seed does", function()
            local cases = {
                { { shard_count = 0 }, "shard_count" },
                { { shard_count = -1 }, "shard_count" },
                { { shard_id = -1 }, "shard_id" },
                { { shard_id = 2, shard_count = 2 }, "shard_id" },
                { { shard_id = 1 }, "shard_id" },
                { { shard_id = 0.5, shard_count = 2 }, "shard_id" },
                { { batch_size = 0 }, "batch_size" },
                { { max_in_flight = 0 }, "max_in_flight" },
            }
            for _, c in ipairs(cases) do
                local relay, e = H.relay(ctx, c[1])
                assert.is_nil(relay)
                assert.equal("invalid", e.code)
                assert.equal(c[2], e.setting)
            end
            assert(H.relay(ctx, { shard_id = 1, shard_count = 2 })):close()
        end)

        it("reads QX_RELAY__* from the environment", function()
            local s = assert(require("qx.messaging.relay").settings({}, function(name)
                return ({ QX_RELAY__SHARD_ID = "2", QX_RELAY__SHARD_COUNT = "3", QX_RELAY__BATCH_SIZE = "10",
                          QX_RELAY__POLL_INTERVAL_SECONDS = "0.25", QX_RELAY__MAX_ATTEMPTS = "0",
                          QX_RELAY__DELETE_PUBLISHED = " Yes " })[name]
            end))
            assert.is_true(s.delete_published)
            assert.is_false(assert(require("qx.messaging.relay").settings({}, function() end)).delete_published)
            assert.equal(2, s.shard_id)
            assert.equal(3, s.shard_count)
            assert.equal(10, s.batch_size)
            assert.equal(250, s.poll_interval_ms)
            assert.equal(0, s.max_attempts)
            local bad, e = require("qx.messaging.relay").settings({}, function(name)
                return name == "QX_RELAY__SHARD_COUNT" and "two" or nil
            end)
            assert.is_nil(bad)
            assert.equal("QX_RELAY__SHARD_COUNT", e.setting)
            bad, e = require("qx.messaging.relay").settings({}, function(name)
                return name == "QX_RELAY__DELETE_PUBLISHED" and "sometimes" or nil
            end)
            assert.is_nil(bad)
            assert.equal("QX_RELAY__DELETE_PUBLISHED", e.setting)
            bad, e = require("qx.messaging.relay").settings{ delete_published = "true" }
            assert.is_nil(bad)
            assert.equal("delete_published", e.setting)
        end)

        it("raises on an unknown option", function()
            assert.has_error(function() qx.relay{ db = ctx.db, nats = ctx.conn, shards = 2 } end)
        end)

        it("returns a clear connection error within the connect timeout when NATS is unreachable", function()
            local t0 = core.clock()
            local relay, e = qx.relay{ db = ctx.db, nats = { servers = "nats://127.0.0.1:1",
                                                             connect_timeout_ms = 300 } }
            assert.is_nil(relay)
            assert.equal("connection", e.code)
            assert.truthy(e.message:find("cannot connect to NATS", 1, true))
            assert.is_true(core.clock() - t0 < 2)
        end)
    end)

    describe("shards and leadership", function()
        local ctx
        before_each(function() ctx = H.setup() end)
        after_each(function() H.teardown(ctx) end)

        it("two sharded relays split the rows by partition key, each key whole, no duplicates", function()
            local evs = H.commit_many(ctx, 400, 23, 50)
            local r0 = assert(H.relay(ctx, { shard_id = 0, shard_count = 2 }))
            local r1 = assert(H.relay(ctx, { shard_id = 1, shard_count = 2 }))
            local a = assert(r0:run_once())
            -- shard 0 published exactly the rows whose key hashes to 0
            local rows = H.sql(ctx, [[
SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
       count(*) FILTER (WHERE published_at IS NOT NULL
                        AND mod(abs(hashtext(partition_key)::bigint), 2) <> 0) AS wrong,
       count(*) FILTER (WHERE mod(abs(hashtext(partition_key)::bigint), 2) = 0) AS shard0
FROM qx_outbox_events]])[1]
            assert.equal(0, rows.wrong)
            assert.equal(rows.shard0, rows.published)
            assert.equal(rows.shard0, a.published)
            local b = assert(r1:run_once())
            assert.is_true(a.published > 0 and b.published > 0)
            assert.equal(400, a.published + b.published)
            H.check_stream(ctx, evs)
            r0:close()
            r1:close()
        end)

        it("rows without a partition key are sharded by id", function()
            local evs = H.commit(ctx, { {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {} })
            local r0 = assert(H.relay(ctx, { shard_id = 0, shard_count = 2 }))
            local r1 = assert(H.relay(ctx, { shard_id = 1, shard_count = 2 }))
            local a, b = assert(r0:run_once()), assert(r1:run_once())
            assert.equal(12, a.published + b.published)
            H.check_stream(ctx, evs)
            r0:close()
            r1:close()
        end)

        it("two relays on one shard: one leads, the other stands by and takes over when the leader goes", function()
            H.commit_many(ctx, 20, 3, 20)
            local a = assert(H.relay(ctx))
            local b = assert(H.relay(ctx))
            local ra = assert(a:run_once())
            assert.is_true(ra.leader)
            assert.equal(20, ra.published)
            local more = H.commit_many(ctx, 10, 3, 10)
            local rb = assert(b:run_once())
            assert.is_false(rb.leader)
            assert.equal(0, rb.claimed)
            assert.is_false(b:stats().leader)
            a:close() -- its session ends, and the lock with it (the server lets go a moment later)
            assert(H.wait_until(function()
                rb = assert(b:run_once())
                return rb.leader
            end, 5))
            assert.equal(10, rb.published)
            assert.equal(1, b:stats().leader_changes)
            assert.equal(30, assert(ctx.conn:stream_info()).messages)
            assert.is_true(#more == 10)
            b:close()
        end)
    end)
end)

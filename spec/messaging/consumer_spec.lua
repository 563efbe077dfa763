-- qx.consumer against a real nats-server (JetStream) and PostgreSQL. Every test works on a
-- stream and durable of its own, so the specs do not depend on each other.
local support = require "support"
local cjson = require "cjson"
local qx = require "qx"
local core = require "qx.core"
local nats = require "qx.messaging.nats"
local publisher = require "qx.messaging.publisher"
local nats_servers = require "nats_servers"

local clock = core.clock

local Placed = qx.integration_event("spec.consumer.order_placed", { version = 1 })
local PlacedV2 = qx.integration_event("spec.consumer.order_placed", { version = 2 })
local Unknown = qx.integration_event("spec.consumer.never_registered", { version = 1 })

local TENANT = "0190d2a8-1111-7000-8000-000000000001"
local CORRELATION = "0190d2a8-2222-7000-8000-000000000002"

-- Busy wait (no sleep in plain Lua); only used for short, bounded pauses.
local function pause(seconds)
    local t = clock() + seconds
    while clock() < t do end
end

-- Acks are sent without waiting for the server: its view catches up a moment later.
local function ack_pending_settles(c)
    local deadline = clock() + 5
    local info
    repeat
        info = assert(c:info())
        if info.num_ack_pending == 0 then return info end
        pause(0.02)
    until clock() > deadline
    return info
end

describe("qx.messaging.consumer", function()
    local db, conn

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
        conn = assert(nats.connect{ servers = support.nats_url() })
    end)

    teardown(function()
        if conn then conn:close() end
        if db then db:close() end
    end)

    -- A stream of its own: { name, prefix, durable, pub, publish(ev), raw(subject_tail, body) }
    local streams = {}
    local function new_stream()
        local s = { name = support.unique("CONSUMER"):upper(), prefix = support.unique("cspec"),
                    durable = support.unique("d") }
        assert(conn:ensure_stream{ name = s.name, subjects = { s.prefix .. ".>" } })
        s.pub = assert(publisher.new{ nats = conn, subject_prefix = s.prefix })
        function s.publish(ev) return assert(s.pub:publish(ev)) end
        function s.raw(tail, body, headers)
            return assert(conn:publish(s.prefix .. "." .. tail, body, headers))
        end
        streams[#streams + 1] = s
        return s
    end

    after_each(function()
        for _, s in ipairs(streams) do conn:delete_stream(s.name) end
        streams = {}
    end)

    local function consumer(s, opts)
        local o = { nats = conn, stream = s.name, durable = s.durable,
                    registry = qx.registry{ Placed } }
        for k, v in pairs(opts or {}) do o[k] = v end
        return assert(qx.consumer(o))
    end

    local function dead_rows(s)
        return assert(db:query([[
SELECT reason, event_id, event_name, event_version, headers, data, error, deliveries, subject,
       stream_seq, consumer FROM qx_dead_letters WHERE stream = $1 ORDER BY stream_seq]], s.name))
    end

    describe("delivery", function()
        it("hands each published event to the handler as an event of its registered class, with envelope and headers",
           function()
            local s = new_stream()
            local c = consumer(s)
            local sent = Placed{ order = "A-1", total = 12.5, tenant_id = TENANT,
                                 correlation_id = CORRELATION, actor_id = "user-7" }
            local ack = s.publish(sent)
            local got = {}
            local counts = assert(c:run_once(function(ev, uow, msg)
          got[#got + 1] = { ev = ev, uow = uow, msg = msg }
            end, { timeout_ms = 5000 }))
            assert.same({ fetched = 1, handled = 1, failed = 0, termed = 0, duplicates = 0 }, counts)
            assert.equal(1, #got)
            local ev, msg = got[1].ev, got[1].msg
            assert.is_true(Placed:is(ev))
            assert.is_nil(got[1].uow) -- no db: no unit of work
            for _, k in ipairs({ "event_id", "event_name", "event_version", "occurred_at",
                                 "correlation_id", "tenant_id", "actor_id" }) do
          assert.equal(sent[k], ev[k], k)
            end
            assert.is_nil(ev.causation_id)
            assert.equal("A-1", ev.order)
            assert.equal(12.5, ev.total)
            assert.equal(s.prefix .. ".spec.consumer.order_placed", msg.subject)
            assert.equal(s.name, msg.stream)
            assert.equal(ack.sequence, msg.stream_seq)
            assert.equal(1, msg.delivered)
            assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$", msg.published_at)
            assert.equal(sent.event_id, msg.headers["qx.event_id"])
            assert.equal("spec.consumer.order_placed", msg.headers["qx.event_name"])
            assert.equal("1", msg.headers["qx.event_version"])
            assert.equal(TENANT, msg.headers["qx.tenant_id"])
            assert.equal(CORRELATION, msg.headers["qx.correlation_id"])
            assert.equal(sent.event_id, msg.headers["Nats-Msg-Id"])
            local info = ack_pending_settles(c)
            assert.equal(0, info.num_ack_pending)
            assert.equal(0, info.num_pending)
            c:close()
        end)

        it("returns an empty round only when nothing arrived within the whole timeout, round after round #slow",
           function()
            local s = new_stream()
            local c = consumer(s)
            for _ = 1, 4 do
          local t0 = clock()
          local counts = assert(c:run_once(function() error("not called") end, { timeout_ms = 200 }))
          assert.equal(0, counts.fetched)
          assert.is_true(clock() - t0 >= 0.19, "round ended after " .. (clock() - t0))
            end
            c:close()
        end)

        it("keeps stream order within a batch and fetches at most batch messages per round", function()
            local s = new_stream()
            local c = consumer(s, { batch = 3 })
            for i = 1, 5 do s.publish(Placed{ n = i }) end
            local seen = {}
            local function h(ev) seen[#seen + 1] = ev.n end
            local first = assert(c:run_once(h, { timeout_ms = 5000 }))
            assert.equal(3, first.fetched)
            local second = assert(c:run_once(h, { timeout_ms = 5000 }))
            assert.equal(2, second.fetched)
            assert.same({ 1, 2, 3, 4, 5 }, seen)
            c:close()
        end)

        it("waits for the server to confirm each ack with ack_sync", function()
            local s = new_stream()
            local c = consumer(s, { ack_sync = true })
            for i = 1, 3 do s.publish(Placed{ n = i }) end
            assert.equal(3, assert(c:run_once(function() end, { timeout_ms = 5000 })).handled)
            local info = assert(c:info()) -- no waiting: the acks are confirmed already
            assert.equal(0, info.num_ack_pending)
            assert.equal(3, info.ack_floor_stream_seq)
            c:close()
        end)

        it("shares the messages of one durable between several consumers, each message handled once", function()
            local s = new_stream()
            local a = consumer(s, { batch = 5 })
            local b = consumer(s, { batch = 5 })
            for i = 1, 20 do s.publish(Placed{ n = i }) end
            local seen, by = {}, { a = 0, b = 0 }
            local function on(who) return function(ev) seen[#seen + 1] = ev.n; by[who] = by[who] + 1 end end
            local deadline = clock() + 10
            while #seen < 20 and clock() < deadline do
          assert(a:run_once(on("a"), { timeout_ms = 200 }))
          assert(b:run_once(on("b"), { timeout_ms = 200 }))
            end
            table.sort(seen)
            local want = {}
            for i = 1, 20 do want[i] = i end
            assert.same(want, seen)
            assert.is_true(by.a > 0 and by.b > 0)
            a:close()
            b:close()
        end)

        it("hands events to a dispatcher given as the handler", function()
            local s = new_stream()
            local c = consumer(s)
            local d = qx.dispatcher()
            local got
            d:on(Placed, function(ev) got = ev.order end)
            s.publish(Placed{ order = "via-dispatcher" })
            assert(c:run_once(d, { timeout_ms = 5000 }))
            assert.equal("via-dispatcher", got)
            c:close()
        end)

        it("rebuilds an unregistered version with the latest registered one when latest_version is set", function()
            local s = new_stream()
            local c = consumer(s, { registry = qx.registry{ PlacedV2 }, latest_version = true })
            s.publish(Placed{ order = "old" })
            local got
            local counts = assert(c:run_once(function(ev) got = ev end, { timeout_ms = 5000 }))
            assert.equal(1, counts.handled)
            assert.is_true(PlacedV2:is(got))
            assert.equal(1, got.event_version)
            assert.equal("old", got.order)
            c:close()
        end)

        it("lets a long handler restart the ack wait with msg:in_progress() #slow", function()
            local s = new_stream()
            local c = consumer(s, { ack_wait = 1 })
            s.publish(Placed{})
            local r
            assert(c:run_once(function(_, _, msg)
          pause(0.6)
          r = msg:in_progress()
          pause(0.6) -- past the first ack wait: without in_progress it would be redelivered
            end, { timeout_ms = 5000 }))
            assert.is_true(r)
            local info = assert(c:info())
            assert.equal(0, info.num_redelivered)
            c:close()
        end)

        it("run() handles until stop() and finishes the batch in flight", function()
            local s = new_stream()
            local c = consumer(s, { batch = 10, fetch_timeout_ms = 200 })
            for i = 1, 5 do s.publish(Placed{ n = i }) end
            local seen = {}
            local totals = assert(c:run(function(ev)
          seen[#seen + 1] = ev.n
          if ev.n == 2 then c:stop() end
            end))
            assert.same({ 1, 2, 3, 4, 5 }, seen)
            assert.equal(5, totals.handled)
            c:close()
        end)

        it("run() returns after max_messages, or when nothing came for idle_timeout_ms", function()
            local s = new_stream()
            local c = consumer(s, { batch = 10, fetch_timeout_ms = 100 })
            for i = 1, 4 do s.publish(Placed{ n = i }) end
            local seen = {}
            assert(c:run(function(ev) seen[#seen + 1] = ev.n end, { max_messages = 3 }))
            assert.same({ 1, 2, 3 }, seen)
            local totals = assert(c:run(function(ev) seen[#seen + 1] = ev.n end, { idle_timeout_ms = 300 }))
            assert.same({ 1, 2, 3, 4 }, seen)
            assert.equal(4, totals.handled)
            assert.equal(4, totals.fetched)
            c:close()
        end)
    end)

    describe("failures", function()
        it("naks a failed message with the backoff delay of its delivery and redelivers it after that delay #slow",
           function()
            local s = new_stream()
            local c = consumer(s, { backoff = { 300, 900 }, max_deliver = 5 })
            s.publish(Placed{ order = "retry" })
            local calls, at = 0, {}
            local function h(_, _, msg)
          calls = calls + 1
          at[msg.delivered] = clock()
          if msg.delivered < 3 then error("not yet") end
            end
            local r1 = assert(c:run_once(h, { timeout_ms = 5000 }))
            assert.same({ fetched = 1, handled = 0, failed = 1, termed = 0, duplicates = 0 }, r1)
            -- within the first delay nothing comes back
            local early = assert(c:run_once(h, { timeout_ms = 100 }))
            assert.equal(0, early.fetched)
            assert(c:run_once(h, { timeout_ms = 5000 }))
            local r3 = assert(c:run_once(h, { timeout_ms = 5000 }))
            assert.equal(1, r3.handled)
            assert.equal(3, calls)
            assert.is_true(at[2] - at[1] >= 0.25, "second delivery came after " .. (at[2] - at[1]))
            assert.is_true(at[3] - at[2] >= 0.8, "third delivery came after " .. (at[3] - at[2]))
            assert.matches("not yet", c:stats().last_error, 1, true)
            assert.equal(0, #dead_rows(s))
            c:close()
        end)

        it("treats a handler returning nil, err or false as a failure", function()
            local s = new_stream()
            local c = consumer(s, { backoff = { 10 } })
            s.publish(Placed{})
            local r = assert(c:run_once(function() return nil, "refused" end, { timeout_ms = 5000 }))
            assert.equal(1, r.failed)
            r = assert(c:run_once(function() return false end, { timeout_ms = 5000 }))
            assert.equal(1, r.failed)
            r = assert(c:run_once(function() return true end, { timeout_ms = 5000 }))
            assert.equal(1, r.handled)
            c:close()
        end)

        it("terminates and dead-letters a message whose max_deliver-th delivery fails", function()
            local s = new_stream()
            local c = consumer(s, { db = db, backoff = { 20 }, max_deliver = 3 })
            local sent = Placed{ order = "doomed" }
            local ack = s.publish(sent)
            local calls = 0
            local function h() calls = calls + 1; error("handler broke") end
            local termed = 0
            for _ = 1, 3 do
          local r = assert(c:run_once(h, { timeout_ms = 5000 }))
          termed = termed + r.termed
            end
            assert.equal(3, calls)
            assert.equal(1, termed)
            -- never delivered again
            local after = assert(c:run_once(h, { timeout_ms = 300 }))
            assert.equal(0, after.fetched)
            local rows = dead_rows(s)
            assert.equal(1, #rows)
            local row = rows[1]
            assert.equal("max_deliver", row.reason)
            assert.equal(3, row.deliveries)
            assert.equal(sent.event_id, row.event_id)
            assert.equal("spec.consumer.order_placed", row.event_name)
            assert.equal(1, row.event_version)
            assert.equal(ack.sequence, row.stream_seq)
            assert.equal(s.durable, row.consumer)
            assert.matches("handler broke", row.error, 1, true)
            assert.equal(sent.event_id, row.headers["qx.event_id"])
            assert.equal("doomed", cjson.decode(row.data).payload.order)
            assert.equal(1, c:stats().dead_lettered)
            c:close()
        end)

        it("dead-letters a message whose last delivery was never answered instead of running the handler again #slow",
           function()
            local s = new_stream()
            local c = consumer(s, { db = db, max_deliver = 1, ack_wait = 1 })
            s.publish(Placed{})
            -- take the message and leave it unanswered, as a process that died would
            local raw = assert(c.handle:fetch(1, 5000))
            assert.equal(1, #raw)
            local called = false
            local r = assert(c:run_once(function() called = true end, { timeout_ms = 5000 }))
            assert.is_false(called)
            assert.equal(1, r.termed)
            local rows = dead_rows(s)
            assert.equal("max_deliver", rows[1].reason)
            assert.equal(2, rows[1].deliveries)
            c:close()
        end)

        it("dead-letters poison messages at once, keeps their bytes, and carries on with the next", function()
            local s = new_stream()
            local c = consumer(s, { db = db })
            local binary = "\0\1\2\255 not json"
            s.raw("garbage", binary, { ["qx.event_id"] = "x-1" })
            s.raw("array", "[1,2,3]")
            s.raw("partial", cjson.encode({ event_name = "spec.consumer.order_placed", event_version = 1 }))
            s.publish(Unknown{})
            local good = Placed{ order = "fine" }
            s.publish(good)
            local handled = {}
            local r = assert(c:run_once(function(ev) handled[#handled + 1] = ev.event_id end,
                                        { timeout_ms = 5000 }))
            assert.same({ fetched = 5, handled = 1, failed = 0, termed = 4, duplicates = 0 }, r)
            assert.same({ good.event_id }, handled)
            local rows = dead_rows(s)
            assert.equal(4, #rows)
            assert.equal("invalid_message", rows[1].reason)
            assert.equal(binary, rows[1].data)
            assert.equal("x-1", rows[1].event_id)
            assert.matches("not JSON", rows[1].error, 1, true)
            assert.equal("invalid_message", rows[2].reason)
            assert.equal("invalid_message", rows[3].reason)
            assert.equal("unknown_event", rows[4].reason)
            assert.equal("spec.consumer.never_registered", rows[4].event_name)
            assert.equal(1, rows[4].deliveries)
            -- terminated: nothing comes back
            local after = assert(c:run_once(function() end, { timeout_ms = 300 }))
            assert.equal(0, after.fetched)
            c:close()
        end)

        it("terminates poison messages without a db, telling on_dead_letter", function()
            local s = new_stream()
            local told = {}
            local c = consumer(s, { on_dead_letter = function(d) told[#told + 1] = d end })
            s.raw("garbage", "nope")
            local r = assert(c:run_once(function() end, { timeout_ms = 5000 }))
            assert.equal(1, r.termed)
            assert.equal(1, #told)
            assert.equal("invalid_message", told[1].reason)
            assert.equal("nope", told[1].data)
            assert.equal(s.name, told[1].stream)
            c:close()
        end)

        it("naks instead of terminating when the dead letter cannot be recorded, so nothing is lost", function()
            local s = new_stream()
            local fail = true
            local told = 0
            local c = consumer(s, { backoff = { 50 }, on_dead_letter = function()
          told = told + 1
          if fail then error("dead-letter store is down") end
            end })
            s.raw("garbage", "nope")
            local r = assert(c:run_once(function() end, { timeout_ms = 5000 }))
            assert.equal(0, r.termed)
            assert.equal(1, r.failed)
            fail = false
            r = assert(c:run_once(function() end, { timeout_ms = 5000 }))
            assert.equal(1, r.termed)
            assert.equal(2, told)
            c:close()
        end)

        it("dead-letters an event whose id is not a uuid when the inbox needs one", function()
            local s = new_stream()
            local c = consumer(s, { db = db })
            local env = Placed{}:envelope()
            env.event_id = "not-a-uuid"
            s.raw("spec.consumer.order_placed", cjson.encode(env))
            local called = false
            local r = assert(c:run_once(function() called = true end, { timeout_ms = 5000 }))
            assert.equal(1, r.termed)
            assert.is_false(called)
            assert.equal("invalid_message", dead_rows(s)[1].reason)
            c:close()
        end)
    end)

    describe("with a database", function()
        local tbl
        before_each(function()
            tbl = support.unique("consumer_effects")
            assert(db:exec("CREATE TABLE " .. tbl .. " (event_id uuid PRIMARY KEY, n int)"))
        end)
        after_each(function()
            db:exec("DROP TABLE IF EXISTS " .. tbl)
        end)

        it("runs the handler in a unit of work whose writes commit with the inbox row", function()
            local s = new_stream()
            local c = consumer(s, { db = db })
            local sent = Placed{ n = 7, correlation_id = CORRELATION, tenant_id = TENANT }
            s.publish(sent)
            local ctx
            local r = assert(c:run_once(function(ev, uow)
          assert(uow:exec("INSERT INTO " .. tbl .. " VALUES ($1, $2)", ev.event_id, ev.n))
          ctx = { correlation = uow.correlation_id, tenant = uow.context.tenant_id,
                  causation = uow.context.causation_id }
            end, { timeout_ms = 5000 }))
            assert.equal(1, r.handled)
            assert.same({ correlation = CORRELATION, tenant = TENANT, causation = sent.event_id }, ctx)
            assert.equal(1, #assert(db:query("SELECT 1 FROM " .. tbl .. " WHERE event_id = $1", sent.event_id)))
            local inbox = assert(db:query(
          "SELECT event_name FROM qx_inbox WHERE consumer = $1 AND event_id = $2", s.durable, sent.event_id))
            assert.same({ { event_name = "spec.consumer.order_placed" } }, inbox)
            c:close()
        end)

        it("rolls back the handler's writes and the inbox row when the handler fails", function()
            local s = new_stream()
            local c = consumer(s, { db = db, backoff = { 10 } })
            local sent = Placed{ n = 1 }
            s.publish(sent)
            local r = assert(c:run_once(function(ev, uow)
          assert(uow:exec("INSERT INTO " .. tbl .. " VALUES ($1, $2)", ev.event_id, ev.n))
          error("after the write")
            end, { timeout_ms = 5000 }))
            assert.equal(1, r.failed)
            assert.equal(0, #assert(db:query("SELECT 1 FROM " .. tbl)))
            assert.equal(0, #assert(db:query("SELECT 1 FROM qx_inbox WHERE consumer = $1", s.durable)))
            -- the redelivery is handled normally
            r = assert(c:run_once(function(ev, uow)
          assert(uow:exec("INSERT INTO " .. tbl .. " VALUES ($1, $2)", ev.event_id, ev.n))
            end, { timeout_ms = 5000 }))
            assert.equal(1, r.handled)
            assert.equal(1, #assert(db:query("SELECT 1 FROM " .. tbl)))
            c:close()
        end)

        it("acknowledges the same event arriving twice without running the handler again (inbox)", function()
            local s = new_stream()
            local c = consumer(s, { db = db })
            local sent = Placed{ n = 1 }
            local body = cjson.encode(sent:envelope())
            -- two stream messages carrying one event (e.g. a producer that sets no Nats-Msg-Id)
            s.raw("spec.consumer.order_placed", body)
            s.raw("spec.consumer.order_placed", body)
            local calls = 0
            local r = assert(c:run_once(function(ev, uow)
          calls = calls + 1
          assert(uow:exec("INSERT INTO " .. tbl .. " VALUES ($1, $2)", ev.event_id, ev.n))
            end, { timeout_ms = 5000 }))
            assert.same({ fetched = 2, handled = 1, failed = 0, termed = 0, duplicates = 1 }, r)
            assert.equal(1, calls)
            assert.equal(0, ack_pending_settles(c).num_ack_pending)
            c:close()
        end)

        it("keeps inboxes of different consumers apart", function()
            local s = new_stream()
            local a = consumer(s, { db = db, durable = support.unique("a") })
            local b = consumer(s, { db = db, durable = support.unique("b") })
            s.publish(Placed{ n = 1 })
            local ra = assert(a:run_once(function() end, { timeout_ms = 5000 }))
            local rb = assert(b:run_once(function() end, { timeout_ms = 5000 }))
            assert.equal(1, ra.handled)
            assert.equal(1, rb.handled)
            a:close()
            b:close()
        end)

        it("does not run the handler again for a message redelivered after a crash between commit and ack #slow",
           function()
            local s = new_stream()
            local c = consumer(s, { db = db, ack_wait = 1 })
            local sent = Placed{ n = 42 }
            s.publish(sent)
            -- a separate process handles the message, commits, and dies before it can acknowledge
            local script = os.tmpname()
            local f = assert(io.open(script, "w"))
            f:write(string.format([[
package.path = %q
package.cpath = %q
local qx = require "qx"
local nats = require "qx.messaging.nats"
local db = assert(qx.connect{ url = %q })
local conn = assert(nats.connect{ servers = %q })
local Placed = qx.integration_event("spec.consumer.order_placed", { version = 1 })
local c = assert(qx.consumer{ nats = conn, stream = %q, durable = %q, db = db, ack_wait = 1,
  registry = qx.registry{ Placed },
  unit_of_work = { post_commit = function() os.exit(7) end } })
c:run_once(function(ev, uow)
  assert(uow:exec("INSERT INTO %s VALUES ($1, $2)", ev.event_id, ev.n))
end, { timeout_ms = 5000 })
os.exit(1)
]], package.path, package.cpath, support.db_url(), support.nats_url(), s.name, s.durable, tbl))
            f:close()
            local interpreter = (arg and arg[-1]) or (jit and "luajit" or "lua5.4")
            local p = assert(io.popen("env -u LD_PRELOAD ASAN_OPTIONS=detect_leaks=0 " .. interpreter .. " " .. script
                                      .. " >/dev/null 2>&1; echo $?"))
            local status = p:read("*a")
            p:close()
            os.remove(script)
            assert.equal("7", status:match("%d+"))
            assert.equal(1, #assert(db:query("SELECT 1 FROM " .. tbl)))

            local calls = 0
            local r = assert(c:run_once(function() calls = calls + 1 end, { timeout_ms = 5000 }))
            assert.equal(1, r.fetched)
            assert.equal(1, r.duplicates)
            assert.equal(0, calls)
            assert.equal(1, #assert(db:query("SELECT 1 FROM " .. tbl)))
            c:close()
        end)

        it("replays dead letters through a handler once, marking them replayed in the same transaction", function()
            local s = new_stream()
            local c = consumer(s, { db = db, max_deliver = 1 })
            local sent = Placed{ n = 5 }
            s.publish(sent)
            assert(c:run_once(function() error("bug") end, { timeout_ms = 5000 }))
            local dead = assert(c:dead_letters())
            assert.equal(1, #dead)
            assert.equal(sent.event_id, dead[1].event_id)

            local r = assert(c:replay_dead(function(ev, uow, msg)
          assert.is_true(msg.replay)
          assert(uow:exec("INSERT INTO " .. tbl .. " VALUES ($1, $2)", ev.event_id, ev.n))
            end))
            assert.same({ handled = 1, failed = 0, duplicates = 0 }, r)
            assert.equal(1, #assert(db:query("SELECT 1 FROM " .. tbl .. " WHERE n = 5")))
            assert.equal(0, #assert(c:dead_letters()))
            assert.equal(1, #assert(c:dead_letters{ include_replayed = true }))
            r = assert(c:replay_dead(function() error("not again") end))
            assert.same({ handled = 0, failed = 0, duplicates = 0 }, r)
            c:close()
        end)

        it("replays only the dead letters asked for, and leaves a failing replay dead", function()
            local s = new_stream()
            local c = consumer(s, { db = db, max_deliver = 1 })
            s.publish(Placed{ n = 1 })
            s.publish(Placed{ n = 2 })
            assert(c:run_once(function() error("bug") end, { timeout_ms = 5000 }))
            local dead = assert(c:dead_letters())
            assert.equal(2, #dead)
            local r = assert(c:replay_dead(function() error("still broken") end, { dead[2].id }))
            assert.same({ handled = 0, failed = 1, duplicates = 0 }, r)
            assert.equal(2, #assert(c:dead_letters()))
            local _, e = c:replay_dead(function() end, { "nope" })
            assert.equal("invalid", e.code)
            c:close()
        end)

        it("purges inbox rows older than asked, of its own consumer only", function()
            local s = new_stream()
            local c = consumer(s, { db = db })
            s.publish(Placed{})
            assert(c:run_once(function() end, { timeout_ms = 5000 }))
            assert.equal(0, c:purge_inbox{ older_than_seconds = 3600 })
            assert.equal(1, c:purge_inbox{ older_than_seconds = 0 })
            assert.has_error(function() c:purge_inbox() end)
            c:close()
        end)
    end)

    describe("end to end", function()
        -- a schema of its own, so the relay sees only this test's outbox rows
        local schema, sdb, sconn, stream, prefix

        before_each(function()
            sdb, schema = support.schema_db("consumer_e2e")
            stream = schema:upper()
            prefix = "spec." .. schema
            sconn = assert(nats.connect{ servers = support.nats_url(), stream = stream,
                                         subject_prefix = prefix })
            assert(sconn:ensure_stream())
        end)

        after_each(function()
            sconn:delete_stream()
            sconn:close()
            support.drop_schema(schema, sdb)
            sdb:close()
        end)

        it("delivers a committed event through the outbox and the relay, envelope and headers intact", function()
            local Shipped = qx.integration_event("spec.consumer.order_shipped", { version = 3 })
            local committed
            assert(sdb:unit_of_work(function(uow)
          committed = uow:record(Shipped{ order = "A-9", items = { "x", "y" } })
            end, { context = { tenant_id = TENANT, correlation_id = CORRELATION, user_id = "clerk-1" } }))

            local relay = assert(qx.relay{ db = sdb, nats = sconn })
            local r = assert(relay:run_once())
            assert.equal(1, r.published)
            relay:close()

            -- the consumer's handler records a follow-up event: it carries the chain on
            local FollowUp = qx.integration_event("spec.consumer.invoice_sent", { version = 1 })
            local c = assert(qx.consumer{ nats = sconn, durable = "e2e", db = sdb,
                                          registry = qx.registry{ Shipped } })
            local got, msg
            local counts = assert(c:run_once(function(ev, uow, m)
          got, msg = ev, m
          uow:record(FollowUp{ order = ev.order })
            end, { timeout_ms = 5000 }))
            assert.same({ fetched = 1, handled = 1, failed = 0, termed = 0, duplicates = 0 }, counts)

            assert.is_true(Shipped:is(got))
            for _, k in ipairs({ "event_id", "event_name", "event_version", "occurred_at",
                                 "correlation_id", "tenant_id", "actor_id" }) do
          assert.equal(committed[k], got[k], k)
            end
            assert.equal(CORRELATION, got.correlation_id)
            assert.equal(TENANT, got.tenant_id)
            assert.equal("clerk-1", got.actor_id)
            assert.equal(3, got.event_version)
            assert.equal("A-9", got.order)
            assert.same({ "x", "y" }, got.items)

            assert.equal(prefix .. ".spec.consumer.order_shipped", msg.subject)
            assert.equal(stream, msg.stream)
            assert.equal("spec.consumer.order_shipped", msg.headers["qx.event_name"])
            assert.equal("3", msg.headers["qx.event_version"])
            assert.equal(committed.event_id, msg.headers["qx.event_id"])
            assert.equal(CORRELATION, msg.headers["qx.correlation_id"])
            assert.equal(TENANT, msg.headers["qx.tenant_id"])
            assert.equal(committed.event_id, msg.headers["Nats-Msg-Id"])

            local follow = assert(sdb:query([[
SELECT correlation_id::text AS correlation_id, causation_id::text AS causation_id,
       tenant_id::text AS tenant_id
FROM qx_outbox_events WHERE event_name = 'spec.consumer.invoice_sent']]))
            assert.same({ { correlation_id = CORRELATION, causation_id = committed.event_id,
                            tenant_id = TENANT } }, follow)
            assert.equal(1, #assert(sdb:query("SELECT 1 FROM qx_inbox WHERE consumer = 'e2e'")))
            c:close()
        end)
    end)

    describe("server outage", function()
        -- a nats-server of this test's own (spec/nats_servers.lua), so stopping it disturbs no
        -- other spec
        local set, node

        before_each(function()
            set = nats_servers.start{ nodes = 1 }
            node = set.nodes[1]
        end)

        after_each(function() set:stop_all() end)

        it("keeps consuming across a nats-server restart without losing or repeating a message #slow", function()
            local own = assert(nats.connect{ servers = node:url(), reconnect_wait_ms = 100 })
            local name = support.unique("OUTAGE"):upper()
            local prefix = support.unique("outage")
            assert(own:ensure_stream{ name = name, subjects = { prefix .. ".>" } })
            local pub = assert(publisher.new{ nats = own, subject_prefix = prefix })
            local c = assert(qx.consumer{ nats = own, stream = name, durable = "d", db = db,
                                          registry = qx.registry{ Placed } })
            local seen = {}
            local function h(ev) seen[#seen + 1] = ev.n end
            assert(pub:publish(Placed{ n = 1 }))
            assert.equal(1, assert(c:run_once(h, { timeout_ms = 5000 })).handled)

            node:kill()
            -- while the server is away, a round returns (nothing, or an error) instead of raising
            -- or spinning
            local t0 = clock()
            local r = c:run_once(h, { timeout_ms = 300 })
            assert.is_true(r == nil or r.fetched == 0)
            assert.is_true(clock() - t0 >= 0.2)

            node:restart() -- same port, same store: the stream and the durable come back
            local deadline = clock() + 15
            local published = false
            while #seen < 2 and clock() < deadline do
          if not published and own:state() == "connected" then
                published = pub:publish(Placed{ n = 2 }) ~= nil
          end
          c:run_once(h, { timeout_ms = 300 })
            end
            assert.same({ 1, 2 }, seen)
            c:close()
            own:close()
        end)
    end)

    describe("setup and bad input", function()
        it("raises on misuse: missing or wrong options", function()
            local reg = qx.registry{ Placed }
            assert.has_error(function() qx.consumer() end)
            assert.has_error(function() qx.consumer{ nats = conn, stream = "S", registry = reg } end)
            assert.has_error(function() qx.consumer{ nats = conn, stream = "S", durable = "d" } end)
            assert.has_error(function()
                qx.consumer{ nats = conn, stream = "S", durable = "d", registry = reg, bogus = 1 }
            end)
            assert.has_error(function()
                qx.consumer{ nats = conn, stream = "S", durable = "d", registry = reg, backoff = {} }
            end)
            assert.has_error(function()
                qx.consumer{ nats = conn, stream = "S", durable = "d", registry = reg, backoff = { -1 } }
            end)
            assert.has_error(function()
                qx.consumer{ nats = conn, stream = "S", durable = "d", registry = reg, max_deliver = 0 }
            end)
            assert.has_error(function()
                qx.consumer{ nats = conn, stream = "S", durable = "d", registry = reg,
                             ack_wait = 1, ack_wait_ms = 1000 }
            end)
            assert.has_error(function()
                qx.consumer{ nats = conn, stream = "S", durable = "d", registry = reg, inbox = true }
            end)
            assert.has_error(function() qx.consumer{ nats = 42, stream = "S", durable = "d", registry = reg } end)
        end)

        it("run refuses a handle_signals that is not a boolean, before fetching anything", function()
            local s = new_stream()
            s.publish(Placed{ order = "A-1" })
            local c = consumer(s)
            local called = false
            assert.error_matches(function()
                c:run(function() called = true end, { handle_signals = 1 })
            end, "handle_signals must be a boolean", 1, true)
            assert.is_false(called)
            assert.equal(1, assert(c:info()).num_pending)
            c:close()
        end)

        it("returns not_found for a stream that does not exist", function()
            local c, e = qx.consumer{ nats = conn, stream = support.unique("MISSING"):upper(),
                                      durable = "d", registry = qx.registry{ Placed } }
            assert.is_nil(c)
            assert.equal("not_found", e.code)
        end)

        it("returns invalid for a durable name JetStream cannot take", function()
            local s = new_stream()
            local c, e = qx.consumer{ nats = conn, stream = s.name, durable = "a.b",
                                      registry = qx.registry{ Placed } }
            assert.is_nil(c)
            assert.equal("invalid", e.code)
        end)

        it("returns a connection error within the connect timeout when the server is unreachable", function()
            local t0 = clock()
            local c, e = qx.consumer{ nats = { servers = "nats://127.0.0.1:1", connect_timeout_ms = 500,
                                               reconnect_attempts = 0 },
                                      stream = "S", durable = "d", registry = qx.registry{ Placed } }
            assert.is_nil(c)
            assert.equal("connection", e.code)
            assert.is_true(clock() - t0 < 5)
        end)

        it("binds to a durable the deployment declared, and says not_found when there is none", function()
            local s = new_stream()
            local c, e = qx.consumer{ nats = conn, stream = s.name, durable = s.durable, bind = true,
                                      registry = qx.registry{ Placed } }
            assert.is_nil(c)
            assert.equal("not_found", e.code)
            consumer(s):close() -- declares it
            c = consumer(s, { bind = true })
            s.publish(Placed{})
            assert.equal(1, assert(c:run_once(function() end, { timeout_ms = 5000 })).handled)
            c:close()
        end)

        it("updates an existing durable to the options given and keeps its position", function()
            local s = new_stream()
            local c = consumer(s, { ack_wait = 30 })
            s.publish(Placed{ n = 1 })
            assert(c:run_once(function() end, { timeout_ms = 5000 }))
            c:close()
            s.publish(Placed{ n = 2 })
            c = consumer(s, { ack_wait = 10, max_ack_pending = 50 })
            local info = assert(c:info())
            assert.equal(10000, info.ack_wait_ms)
            assert.equal(50, info.max_ack_pending)
            assert.equal(-1, info.max_deliver)
            local seen = {}
            assert(c:run_once(function(ev) seen[#seen + 1] = ev.n end, { timeout_ms = 5000 }))
            assert.same({ 2 }, seen)
            c:close()
        end)

        it("starts a new durable where deliver says: all (the default), new, from a sequence, from a time", function()
            local s = new_stream()
            s.publish(Placed{ n = 1 })
            local second = s.publish(Placed{ n = 2 })
            pause(0.05)
            local t3 = qx.now()
            pause(0.05)
            s.publish(Placed{ n = 3 })
            -- what a new durable delivers: fetches until `want` messages came (or 5 s passed),
            -- then one more short fetch, so a message it must not deliver would show too
            local function drain(c, want)
                local seen = {}
                local function take(ev) seen[#seen + 1] = ev.n end
                local deadline = clock() + 10
                while #seen < want and clock() < deadline do
                    assert(c:run_once(take, { timeout_ms = 1000, batch = 3 }))
                end
                assert(c:run_once(take, { timeout_ms = 300, batch = 3 }))
                c:close()
                return seen
            end
            local function first_seen(opts, want)
                local o = { durable = support.unique("d") }
                for k, v in pairs(opts) do o[k] = v end
                return drain(consumer(s, o), want)
            end
            assert.same({ 1, 2, 3 }, first_seen({}, 3), "default")
            assert.same({ 1, 2, 3 }, first_seen({ deliver = "all" }, 3), "all")
            assert.same({}, first_seen({ deliver = "new" }, 0), "new")
            assert.same({ 2, 3 }, first_seen({ deliver = { from_sequence = second.sequence } }, 2), "from_sequence")
            assert.same({ 3 }, first_seen({ deliver = { from_time = t3 } }, 1), "from_time")
            assert.same({ 3 }, first_seen({ deliver = { from_time = (t3:gsub("Z$", "+00:00")) } }, 1),
                        "from_time with an offset")

            -- an existing durable keeps its position whatever deliver now says
            local durable = support.unique("d")
            local c = consumer(s, { durable = durable, deliver = "new" })
            s.publish(Placed{ n = 4 })
            c:close()
            c = consumer(s, { durable = durable, deliver = "all", ack_wait = 10 })
            assert.same({ 4 }, drain(c, 1), "an existing durable")

            for _, bad in ipairs({ "last", { from_sequence = 0 }, { from_time = 5 },
                                   { from_time = "x", from_sequence = 1 } }) do
                assert.has_error(function() consumer(s, { deliver = bad }) end)
            end
            local r, e = qx.consumer{ nats = conn, stream = s.name, durable = support.unique("d"),
                                      registry = qx.registry{ Placed }, deliver = { from_time = "yesterday" } }
            assert.is_nil(r)
            assert.equal("invalid", e.code)
            assert.matches("ISO-8601", e.message, 1, true)
        end)

        it("starts a new durable at a from_time just past a whole second exactly, not a tenth later",
           function()
            -- nats.c writes a start time's fraction without its leading zeros (.05 s as ".5"):
            -- such a time goes to the server as its whole second, and the consumer skips what
            -- was stored between that second and the time asked for
            local s = new_stream()
            local function wait_fraction(lo) -- until the wall clock's fraction is in [lo, lo+0.02)
                local deadline = clock() + 5
                repeat
                    local f = core.time() % 1
                    if f >= lo and f < lo + 0.02 then return end
                until clock() > deadline
                error("the clock never showed a fraction of " .. lo)
            end
            wait_fraction(0.90)
            s.publish(Placed{ n = 1 })       -- the second before
            wait_fraction(0.01)
            s.publish(Placed{ n = 2 })       -- after the whole second, before the start
            wait_fraction(0.05)
            local t = qx.now()
            pause(0.01)
            s.publish(Placed{ n = 3 })
            local c = consumer(s, { durable = support.unique("d"), deliver = { from_time = t } })
            local seen = {}
            local deadline = clock() + 10
            while #seen < 1 and clock() < deadline do
                assert(c:run_once(function(ev) seen[#seen + 1] = ev.n end, { timeout_ms = 1000 }))
            end
            assert(c:run_once(function(ev) seen[#seen + 1] = ev.n end, { timeout_ms = 300 }))
            c:close()
            assert.same({ 3 }, seen, "from_time " .. t)
        end)

        it("filters by subject", function()
            local s = new_stream()
            local Other = qx.integration_event("spec.consumer.other", { version = 1 })
            local c = consumer(s, { filter_subject = s.prefix .. ".spec.consumer.order_placed",
                                    registry = qx.registry{ Placed, Other } })
            s.publish(Other{})
            s.publish(Placed{ n = 9 })
            local seen = {}
            local r = assert(c:run_once(function(ev) seen[#seen + 1] = ev.event_name end, { timeout_ms = 5000 }))
            assert.equal(1, r.fetched)
            assert.same({ "spec.consumer.order_placed" }, seen)
            c:close()
        end)

        it("raises when used after close, and closing twice is harmless", function()
            local s = new_stream()
            local c = consumer(s)
            c:close()
            c:close()
            assert.has_error(function() c:run_once(function() end) end, "consumer is closed")
            assert.has_error(function() c:info() end)
            assert.matches("closed", tostring(c))
        end)

        it("raises on a handler that is not callable", function()
            local s = new_stream()
            local c = consumer(s)
            assert.has_error(function() c:run_once(42) end)
            assert.has_error(function() c:run(nil) end)
            c:close()
        end)

        it("reports its counters as Prometheus text", function()
            local s = new_stream()
            local c = consumer(s)
            s.publish(Placed{})
            assert(c:run_once(function() end, { timeout_ms = 5000 }))
            local text = c:metrics()
            assert.matches('qx_consumer_messages_handled_total{stream="' .. s.name .. '",consumer="'
                           .. s.durable .. '"} 1\n', text, 1, true)
            assert.matches("# TYPE qx_consumer_pending_messages gauge", text, 1, true)
            c:close()
        end)
    end)
end)

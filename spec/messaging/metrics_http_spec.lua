-- /metrics and /health over real HTTP: the server thread of the C core (core.metrics_server),
-- and the relay and the consumer serving it while they run, against real PostgreSQL and
-- nats-server.
local support = require "support"
local H = require "relay_helper"
local http = require "http_helper"
local qx = require "qx"
local core = require "qx.core"
local nats = require "qx.messaging.nats"
local publisher = require "qx.messaging.publisher"
local nats_servers = require "nats_servers"

local clock = core.clock

local function pause(seconds)
    local t = clock() + seconds
    while clock() < t do end
end

local function url(port, path) return "http://127.0.0.1:" .. port .. path end

describe("core.metrics_server", function()
    it("answers /metrics with the last text handed over and /health from the heartbeat", function()
        local s = assert(core.metrics_server{ listen = "127.0.0.1:0", stale_ms = 60000 })
        local port = s:port()
        assert.is_true(port > 0)
        local code, body = http.get(url(port, "/health"))
        assert.equal(503, code)
        assert.matches("not run yet", body)
        s:beat(true)
        code, body = http.get(url(port, "/health"))
        assert.equal(200, code)
        assert.equal("ok\n", body)
        assert(s:publish("# TYPE a counter\na 1\n"))
        assert(s:publish("# TYPE a counter\na 2\n"))
        code, body = http.get(url(port, "/metrics"))
        assert.equal(200, code)
        assert.equal("# TYPE a counter\na 2\n", body)
        code = http.get(url(port, "/other"))
        assert.equal(404, code)
        s:close()
        s:close() -- twice is harmless
        assert.equal(0, (http.get(url(port, "/health"), 2)))
    end)

    it("answers /health 503 with the reason while a connection is down", function()
        local s = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        s:beat(false, "NATS is reconnecting")
        local code, body = http.get(url(s:port(), "/health"))
        assert.equal(503, code)
        assert.equal("down: NATS is reconnecting\n", body)
        s:beat(true)
        assert.equal(200, (http.get(url(s:port(), "/health"))))
        s:close()
    end)

    it("answers /health 503 once the loop has not beaten for longer than stale_ms", function()
        local s = assert(core.metrics_server{ listen = "127.0.0.1:0", stale_ms = 200 })
        s:beat(true)
        assert.equal(200, (http.get(url(s:port(), "/health"))))
        pause(0.3)
        local code, body = http.get(url(s:port(), "/health"))
        assert.equal(503, code)
        assert.matches("stalled: the loop last ran", body)
        s:close()
    end)

    it("answers a scrape while the thread that owns it is busy", function()
        local s = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        assert(s:publish("x 1\n"))
        -- curl runs while this thread waits in a pipe read, never calling into the server
        local code, body = http.get(url(s:port(), "/metrics"))
        assert.equal(200, code)
        assert.equal("x 1\n", body)
        s:close()
    end)

    it("refuses an address already in use, with the address and the reason", function()
        local a = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local b, e = core.metrics_server{ listen = "127.0.0.1:" .. a:port() }
        assert.is_nil(b)
        assert.equal("invalid", e.code)
        assert.matches("cannot listen on 127.0.0.1:" .. a:port() .. ": Address already in use",
                       e.message, 1, true)
        a:close()
    end)

    it("refuses bad syntax, a name, a port out of range and an address not of this machine", function()
        for listen, says in pairs{
            ["127.0.0.1"] = "expected HOST:PORT",
            [":9464"] = "expected HOST:PORT",
            ["127.0.0.1:"] = "expected HOST:PORT",
            ["127.0.0.1:65536"] = "expected HOST:PORT",
            ["127.0.0.1:94x"] = "expected HOST:PORT",
            ["::1:9464"] = "expected HOST:PORT",
            ["[::1:9464"] = "expected HOST:PORT",
            ["example.com:9464"] = "is not an IP address",
            ["300.1.1.1:9464"] = "is not an IP address",
            ["192.0.2.1:9464"] = "not an address of this machine",
        } do
            local s, e = core.metrics_server{ listen = listen }
            assert.is_nil(s, listen)
            assert.equal("invalid", e.code)
            assert.matches(says, e.message, 1, true)
        end
    end)

    it("takes localhost and an IPv6 address in brackets", function()
        local a = assert(core.metrics_server{ listen = "localhost:0" })
        a:beat(true)
        assert.equal(200, (http.get(url(a:port(), "/health"))))
        a:close()
        local b = core.metrics_server{ listen = "[::1]:0" }
        if b then b:close() end -- a machine without IPv6 loopback refuses it, which is right too
    end)

    it("raises on misuse: no listen, unknown options, a stale_ms below 1", function()
        assert.has_error(function() core.metrics_server{} end)
        assert.has_error(function() core.metrics_server{ listen = "127.0.0.1:0", stale = 1 } end)
        assert.has_error(function() core.metrics_server{ listen = "127.0.0.1:0", stale_ms = 0 } end)
    end)
end)

describe("relay:run with metrics_listen", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function() H.teardown(ctx) end)

    it("serves the relay's and the outbox's figures and a 200 /health while it runs", function()
        H.commit_many(ctx, 5, 2, 5)
        local relay = assert(H.relay(ctx))
        local port = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local p = port:port()
        port:close()
        local seen = {}
        assert(relay:run{ metrics_listen = "127.0.0.1:" .. p, on_batch = function(r)
            if r.published > 0 or #seen > 0 then
                -- the server answers from its thread while the loop waits here
                seen[#seen + 1] = { http.get(url(p, "/health")) }
                seen[#seen + 1] = { http.get(url(p, "/metrics")) }
            end
            if #seen >= 4 then return false end
        end })
        relay:close()
        assert.equal(200, seen[1][1])
        assert.equal("ok\n", seen[1][2])
        assert.equal(200, seen[2][1])
        assert.matches("qx_relay_published_total{shard=\"0\",shard_count=\"1\"}", seen[2][2], 1, true)
        assert.matches("qx_outbox_pending", seen[2][2], 1, true)
        -- the port is free again once run returns
        local again = assert(core.metrics_server{ listen = "127.0.0.1:" .. p })
        again:close()
    end)

    it("answers /health 503 when the loop stalls longer than health_stale_ms", function()
        local relay = assert(H.relay(ctx))
        local p
        local code, body
        local probe = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        p = probe:port()
        probe:close()
        assert(relay:run{ metrics_listen = "127.0.0.1:" .. p, health_stale_ms = 300,
                          on_batch = function()
            pause(0.5) -- a batch that takes too long
            code, body = http.get(url(p, "/health"))
            return false
        end })
        relay:close()
        assert.equal(503, code)
        assert.matches("stalled", body)
    end)

    it("refuses to start on an address in use: nil, err, and nothing published", function()
        H.commit_many(ctx, 3, 1, 3)
        local holder = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local relay = assert(H.relay(ctx))
        local batches = 0
        local ok, e = relay:run{ metrics_listen = "127.0.0.1:" .. holder:port(),
                                 on_batch = function() batches = batches + 1 return false end }
        relay:close()
        holder:close()
        assert.is_nil(ok)
        assert.equal("invalid", e.code)
        assert.matches("Address already in use", e.message, 1, true)
        assert.equal(0, batches)
        assert.equal(3, H.pending(ctx))
    end)

    it("raises on a metrics_listen that is not a string", function()
        local relay = assert(H.relay(ctx))
        assert.has_error(function() relay:run{ metrics_listen = 9464 } end,
                         "relay:run: metrics_listen must be a string HOST:PORT")
        assert.has_error(function()
            relay:run{ metrics_listen = "127.0.0.1:0", health_stale_ms = 0 }
        end, "relay:run: health_stale_ms must be an integer >= 1")
        relay:close()
    end)
end)

describe("relay:run with metrics_listen and a nats-server that goes away #slow", function()
    -- a nats-server of this test's own (spec/nats_servers.lua), killed mid-run
    local ctx, set, node

    before_each(function()
        ctx = H.setup()
        set = nats_servers.start{ nodes = 1 }
        node = set.nodes[1]
    end)

    after_each(function()
        set:stop_all()
        H.teardown(ctx)
    end)

    it("answers /health 503 naming NATS while the connection is down, 200 before", function()
        local own = assert(nats.connect{ servers = node:url(), stream = ctx.stream,
                                         subject_prefix = ctx.prefix, reconnect_wait_ms = 100,
                                         publish_timeout_ms = 500 })
        assert(own:ensure_stream())
        local relay = assert(H.relay(ctx, { nats = own }))
        local probe = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local p = probe:port()
        probe:close()
        local before, during
        local started = clock()
        assert(relay:run{ metrics_listen = "127.0.0.1:" .. p, on_batch = function()
            if not before then
                before = { http.get(url(p, "/health")) }
                node:kill()
                return
            end
            local code, body = http.get(url(p, "/health"))
            if code == 503 then during = { code, body } return false end
            if clock() - started > 20 then return false end
        end })
        relay:close()
        own:close()
        assert.equal(200, before[1])
        assert(during, "/health never said 503")
        assert.matches("^down: ", during[2])
        assert.is_truthy(during[2]:find("NATS", 1, true) or during[2]:find("failed", 1, true))
    end)
end)

describe("consumer:run with metrics_listen", function()
    local conn, db
    local Placed = qx.integration_event("spec.metrics.placed", { version = 1 })

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
        conn = assert(nats.connect{ servers = support.nats_url() })
    end)
    teardown(function()
        conn:close()
        db:close()
    end)

    it("serves pending and redelivery counts and /health while it runs", function()
        local name, prefix = support.unique("MHTTP"):upper(), support.unique("mhttp")
        assert(conn:ensure_stream{ name = name, subjects = { prefix .. ".>" } })
        local pub = assert(publisher.new{ nats = conn, subject_prefix = prefix })
        for i = 1, 2 do assert(pub:publish(Placed{ n = i })) end
        local c = assert(qx.consumer{ nats = conn, stream = name, durable = support.unique("d"),
                                      registry = qx.registry{ Placed }, db = db, batch = 1,
                                      backoff = { 1 }, fetch_timeout_ms = 200 })
        local probe = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local p = probe:port()
        probe:close()
        -- a scraper outside the process, while run() holds this thread
        local out = os.tmpname()
        os.execute(("(sleep 2.5; curl -s -o %s.health -w '%%{http_code}' %s > %s.code; "
            .. "curl -s -o %s.metrics %s) >/dev/null 2>&1 &")
            :format(out, url(p, "/health"), out, out, url(p, "/metrics")))
        local calls = 0
        local totals = assert(c:run(function()
            calls = calls + 1
            if calls == 1 then return nil, "the first delivery fails" end -- redelivered
        end, { metrics_listen = "127.0.0.1:" .. p, idle_timeout_ms = 4000 }))
        c:close()
        conn:delete_stream(name)
        local code, health = support.slurp(out .. ".code"), support.slurp(out .. ".health")
        local text = support.slurp(out .. ".metrics")
        for _, ext in ipairs{ "", ".code", ".health", ".metrics" } do os.remove(out .. ext) end
        assert.equal(3, calls)
        assert.equal("200", code)
        assert.equal("ok\n", health)
        assert.equal(1, totals.redelivered)
        assert.equal(1, http.sample(text, "qx_consumer_messages_redelivered_total"))
        assert.equal(2, http.sample(text, "qx_consumer_messages_handled_total"))
        assert.equal(0, http.sample(text, "qx_consumer_pending_messages"))
        assert.is_not_nil(http.sample(text, "qx_consumer_redelivered_messages"))
        -- served only while it runs
        assert.equal(0, (http.get(url(p, "/health"), 2)))
    end)

    it("refuses to start on a bad address: nil, err, nothing fetched", function()
        local name, prefix = support.unique("MHTTP"):upper(), support.unique("mhttp")
        assert(conn:ensure_stream{ name = name, subjects = { prefix .. ".>" } })
        local pub = assert(publisher.new{ nats = conn, subject_prefix = prefix })
        assert(pub:publish(Placed{ n = 1 }))
        local c = assert(qx.consumer{ nats = conn, stream = name, durable = support.unique("d"),
                                      registry = qx.registry{ Placed } })
        local called = false
        local r, e = c:run(function() called = true end, { metrics_listen = "127.0.0.1:99999" })
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("expected HOST:PORT", e.message, 1, true)
        assert.is_false(called)
        assert.equal(0, c:stats().fetched)
        c:close()
        conn:delete_stream(name)
    end)
end)

describe("qx relay --metrics-listen #slow", function()
    local ctx
    before_each(function() ctx = H.setup() end)
    after_each(function() H.teardown(ctx) end)

    local FAST = "--poll-interval 0.05 --idle-interval 0.2 --lock-retry 0.1"

    it("serves /metrics and /health while it runs, and stops serving on SIGTERM", function()
        H.commit_many(ctx, 10, 2, 5)
        local probe = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local p = probe:port()
        probe:close()
        local r = H.spawn_relay(ctx, FAST .. " --metrics-listen 127.0.0.1:" .. p)
        local text
        assert(H.wait_until(function()
            local code, body = http.get(url(p, "/metrics"), 1)
            if code == 200 and (http.sample(body, "qx_relay_published_total") or 0) >= 10 then
                text = body
                return true
            end
        end, 15), "no figures: " .. H.log_of(ctx, r))
        assert.is_not_nil(http.sample(text, "qx_outbox_pending"))
        assert.equal(1, http.sample(text, "qx_relay_leader"))
        local code, body = http.get(url(p, "/health"))
        assert.equal(200, code, body)
        H.kill(ctx, r, "TERM")
        assert.equal(0, (http.get(url(p, "/health"), 2)))
    end)

    it("refuses to start on a bad address or one in use: exit 2, the reason, nothing published", function()
        H.commit_many(ctx, 3, 1, 3)
        local holder = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        for listen, says in pairs{
            ["127.0.0.1:" .. holder:port()] = "Address already in use",
            ["127.0.0.1:99999"] = "expected HOST:PORT",
            ["nowhere.invalid:9464"] = "is not an IP address",
            ["192.0.2.1:9464"] = "not an address of this machine",
        } do
            local out, code = H.cli(ctx, "relay --metrics-listen " .. listen)
            assert.equal(2, code, listen .. ": " .. out)
            assert.matches(says, out, 1, true)
        end
        local out, code = H.cli(ctx, "relay --once --metrics-listen 127.0.0.1:0")
        assert.equal(2, code, out)
        holder:close()
        assert.equal(3, H.pending(ctx))
    end)
end)

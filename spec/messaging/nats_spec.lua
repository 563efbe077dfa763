-- NATS connections, settings, streams and the direct publisher against a real nats-server
-- with JetStream.
local core = require "qx.core"
local nats = require "qx.messaging.nats"
local publisher = require "qx.messaging.publisher"
local event = require "qx.model.event"
local cjson = require "cjson"

local NATS_URL = assert(os.getenv("QX_TEST_NATS_URL"),
                        "QX_TEST_NATS_URL is not set: source the servers' env file")

local function env(t)
    return function(name) return t[name] end
end

local function suffix()
    return core.uuid():gsub("-", ""):sub(-12):upper()
end

describe("qx.nats settings", function()
    it("has defaults like qx-events' NatsSettings", function()
        local s = assert(nats.settings({}, env{}))
        assert.equal("nats://127.0.0.1:4222", s.servers)
        assert.equal("qx", s.client_name)
        assert.equal(2000, s.connect_timeout_ms)
        assert.equal(-1, s.reconnect_attempts)
        assert.equal(2000, s.reconnect_wait_ms)
        assert.equal("QX_EVENTS", s.stream)
        assert.equal("qx.events", s.subject_prefix)
        assert.equal(5000, s.publish_timeout_ms)
        assert.is_false(s.tls)
        assert.is_true(s.send_asap)
    end)

    it("reads QX_NATS__* variables", function()
        local s = assert(nats.settings({}, env{
            QX_NATS__SERVERS = "nats://a:1, nats://b:2",
            QX_NATS__CLIENT_NAME = "billing",
            QX_NATS__CONNECT_TIMEOUT_SECONDS = "1.5",
            QX_NATS__RECONNECT_ATTEMPTS = "10",
            QX_NATS__RECONNECT_WAIT_SECONDS = "0.25",
            QX_NATS__USER = "u", QX_NATS__PASSWORD = "p",
            QX_NATS__TLS = "yes", QX_NATS__TLS_CA = "/ca.pem",
            QX_NATS__STREAM = "BILLING", QX_NATS__SUBJECT_PREFIX = "billing.events",
            QX_NATS__PUBLISH_TIMEOUT_SECONDS = "3", QX_NATS__SEND_ASAP = "off",
        }))
        assert.equal("nats://a:1, nats://b:2", s.servers)
        assert.equal("billing", s.client_name)
        assert.equal(1500, s.connect_timeout_ms)
        assert.equal(10, s.reconnect_attempts)
        assert.equal(250, s.reconnect_wait_ms)
        assert.equal("u", s.user)
        assert.equal("p", s.password)
        assert.is_true(s.tls)
        assert.equal("/ca.pem", s.tls_ca)
        assert.equal("BILLING", s.stream)
        assert.equal("billing.events", s.subject_prefix)
        assert.equal(3000, s.publish_timeout_ms)
        assert.is_false(s.send_asap)
    end)

    it("lets explicit options override the environment", function()
        local s = assert(nats.settings({ servers = { "nats://x:1", "nats://y:2" }, name = "n",
                                         connect_timeout_ms = 700, stream = "S" },
                                       env{ QX_NATS__SERVERS = "nats://z:3", QX_NATS__STREAM = "T",
                                            QX_NATS__CLIENT_NAME = "other" }))
        assert.equal("nats://x:1,nats://y:2", s.servers)
        assert.equal("n", s.client_name)
        assert.equal(700, s.connect_timeout_ms)
        assert.equal("S", s.stream)
    end)

    it("returns an invalid error naming the setting for a bad value", function()
        local cases = {
            { {}, { QX_NATS__CONNECT_TIMEOUT_SECONDS = "soon" }, "QX_NATS__CONNECT_TIMEOUT_SECONDS" },
            { {}, { QX_NATS__RECONNECT_ATTEMPTS = "-2" }, "QX_NATS__RECONNECT_ATTEMPTS" },
            { {}, { QX_NATS__TLS = "maybe" }, "QX_NATS__TLS" },
            { { send_asap = "yes" }, {}, "send_asap" },
            { {}, { QX_NATS__SERVERS = "http://x:1" }, "QX_NATS__SERVERS" },
            { { stream = "a.b" }, {}, "stream" },
            { { subject_prefix = "qx.*" }, {}, "subject_prefix" },
            { { password = "secret" }, {}, "password" },
            { { tls_cert = "/c.pem" }, {}, "tls_cert" },
            { { servers = {} }, {}, "servers" },
        }
        for _, c in ipairs(cases) do
            local s, e = nats.settings(c[1], env(c[2]))
            assert.is_nil(s)
            assert.equal("invalid", e.code)
            assert.equal(c[3], e.setting)
            assert.is_nil(e.message:find("secret", 1, true))
        end
    end)

    it("raises on an unknown option or two spellings of one setting", function()
        assert.has_error(function() nats.settings({ server = "x" }, env{}) end)
        assert.has_error(function()
            nats.settings({ connect_timeout_ms = 1, connect_timeout_seconds = 1 }, env{})
        end)
        assert.has_error(function() nats.settings({ name = "a", client_name = "b" }, env{}) end)
    end)
end)

describe("qx.nats connection", function()
    local conn
    local stream = "SPEC_NATS_" .. suffix()
    local prefix = "spec.nats." .. suffix():lower()

    setup(function()
        conn = assert(nats.connect{ servers = NATS_URL, stream = stream, subject_prefix = prefix })
        assert(conn:ensure_stream{ duplicate_window_ms = 60000 })
    end)

    teardown(function()
        conn:delete_stream()
        conn:close()
    end)

    it("connects and reports its state", function()
        assert.equal("connected", conn:state())
        local st = conn:stats()
        assert.equal("connected", st.state)
        assert.equal(0, st.reconnects)
        assert.truthy(st.url:find("127.0.0.1", 1, true))
    end)

    it("ensure_stream is idempotent and updates the subjects of an existing stream", function()
        assert(conn:ensure_stream{ duplicate_window_ms = 60000 })
        assert(conn:ensure_stream{ subjects = { prefix .. ".>", prefix .. "_more.>" },
                                   duplicate_window_ms = 60000 })
        local ack = assert(conn:publish(prefix .. "_more.x", "m"))
        assert.equal(stream, ack.stream)
    end)

    it("publishes with headers and reports the stream sequence", function()
        local before = assert(conn:stream_info()).last_seq
        local ack = assert(conn:publish(prefix .. ".a", "hello", { ["qx.event_name"] = "a", ["qx.n"] = 7 },
                                        core.uuid()))
        assert.equal(stream, ack.stream)
        assert.equal(before + 1, ack.sequence)
        assert.is_false(ack.duplicate)
        local si = assert(conn:stream_info())
        assert.equal(ack.sequence, si.last_seq)
    end)

    it("de-duplicates by message id within the window", function()
        local id = core.uuid()
        local a1 = assert(conn:publish(prefix .. ".dup", "1", nil, id))
        local a2 = assert(conn:publish(prefix .. ".dup", "1", nil, id))
        assert.is_false(a1.duplicate)
        assert.is_true(a2.duplicate)
        assert.equal(a1.sequence, a2.sequence)
    end)

    it("returns a nats error for a subject no stream takes", function()
        local ack, e = conn:publish("spec.nowhere." .. suffix():lower(), "x")
        assert.is_nil(ack)
        assert.equal("nats", e.code)
        assert.truthy(e.message:find("no JetStream stream", 1, true))
    end)

    it("returns an invalid error for a wildcard or empty-token subject", function()
        for _, subj in ipairs({ prefix .. ".*", prefix .. ".>", prefix .. "..x", prefix .. ".", "" }) do
            local ack, e = conn:publish(subj, "x")
            assert.is_nil(ack)
            assert.equal("invalid", e.code)
        end
    end)

    it("returns not_found for the info of a missing stream", function()
        local si, e = conn:stream_info("NO_SUCH_" .. suffix())
        assert.is_nil(si)
        assert.equal("not_found", e.code)
    end)

    it("returns a clear connection error within the connect timeout when no server answers", function()
        local t0 = core.clock()
        -- a port nothing listens on, and an address that drops packets
        local c, e = nats.connect{ servers = "nats://127.0.0.1:1", connect_timeout_ms = 300 }
        assert.is_nil(c)
        assert.equal("connection", e.code)
        assert.truthy(e.message:find("cannot connect to NATS", 1, true))
        c, e = nats.connect{ servers = "nats://10.255.255.1:4222", connect_timeout_ms = 300 }
        assert.is_nil(c)
        assert.equal("connection", e.code)
        assert.is_true(core.clock() - t0 < 3)
    end)

    it("closing twice is harmless and a closed connection raises on use", function()
        local c = assert(nats.connect{ servers = NATS_URL })
        c:close()
        c:close()
        assert.equal("closed", c:state())
        assert.has_error(function() c:publish("a.b", "x") end)
    end)

    describe("publisher", function()
        local Registered = event.define("identity.user.registered", { version = 2, integration = true })

        it("publishes an event's envelope with the qx headers and Nats-Msg-Id", function()
            local pub = assert(publisher.new{ nats = conn })
            local ev = Registered{ email = "a@example.com" }
            ev.correlation_id = core.uuid()
            local ack = assert(pub:publish(ev))
            assert.equal(stream, ack.stream)
            assert.is_false(ack.duplicate)
            -- the same event again: JetStream drops it by its id
            local again = assert(pub:publish(ev))
            assert.is_true(again.duplicate)
            assert.equal(ack.sequence, again.sequence)
            local h = publisher.headers(ev:envelope())
            assert.equal("identity.user.registered", h["qx.event_name"])
            assert.equal("2", h["qx.event_version"])
            assert.equal(ev.event_id, h["qx.event_id"])
            assert.equal(ev.correlation_id, h["qx.correlation_id"])
            assert.is_nil(h["qx.tenant_id"])
        end)

        it("rejects an envelope without a usable name or id, publishing nothing", function()
            local pub = assert(publisher.new{ nats = conn })
            local before = assert(conn:stream_info()).messages
            local cases = {
          { event_id = core.uuid(), event_name = "", event_version = 1 },
          { event_id = "nope", event_name = "a", event_version = 1 },
          { event_id = core.uuid(), event_name = "a.*", event_version = 1 },
          { event_id = core.uuid(), event_name = "a b", event_version = 1 },
            }
            for _, envelope in ipairs(cases) do
          local ack, e = pub:publish(envelope)
          assert.is_nil(ack)
          assert.equal("invalid", e.code)
            end
            assert.equal(before, assert(conn:stream_info()).messages)
            assert.has_error(function() pub:publish("x") end)
        end)

        it("publishes a plain envelope table as JSON", function()
            local pub = assert(publisher.new{ nats = conn.handle, subject_prefix = prefix })
            local envelope = { event_id = core.uuid(), event_name = "order.placed", event_version = 1,
                               occurred_at = core.now(), payload = { total = 12.5 }, tenant_id = core.null }
            local ack = assert(pub:publish(envelope))
            assert.equal(stream, ack.stream)
            assert.same(envelope.payload, cjson.decode(cjson.encode(envelope)).payload)
        end)
    end)
end)

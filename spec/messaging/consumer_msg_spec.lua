-- The binding's JetStream consumer (core.consumer) and the messages its fetch hands out, against
-- a real nats-server: each message is an object of its own, answered once, and stays valid
-- after later fetches.
local support = require "support"
local core = require "qx.core"
local nats = require "qx.messaging.nats"

local clock = core.clock

-- Acks are sent without waiting for the server: its view catches up a moment later.
local function ack_pending_is(c, n)
    local deadline = clock() + 5
    local info
    repeat
        info = assert(c:info())
        if info.num_ack_pending == n then return true end
    until clock() > deadline
    return false, info.num_ack_pending
end

describe("core.consumer messages", function()
    local conn, stream, prefix

    setup(function()
        conn = assert(nats.connect{ servers = support.nats_url() })
    end)

    teardown(function()
        if conn then conn:close() end
    end)

    before_each(function()
        stream = support.unique("CMSG"):upper()
        prefix = support.unique("cmsg")
        assert(conn:ensure_stream{ name = stream, subjects = { prefix .. ".>" } })
    end)

    after_each(function()
        conn:delete_stream(stream)
    end)

    local function consumer(opts)
        local o = { stream = stream, durable = support.unique("d") }
        for k, v in pairs(opts or {}) do o[k] = v end
        return assert(core.consumer(conn.handle, o))
    end

    local function publish(n)
        for i = 1, n do
            assert(conn:publish(prefix .. ".m" .. i, "body " .. i, { ["qx.event_id"] = "id-" .. i }))
        end
    end

    it("hands out each message as an object with its fields", function()
        local c = consumer()
        publish(1)
        local msgs = assert(c:fetch(1, 5000))
        assert.equal(1, #msgs)
        local m = msgs[1]
        assert.equal(prefix .. ".m1", m.subject)
        assert.equal("body 1", m.data)
        assert.equal("id-1", m.headers["qx.event_id"])
        assert.equal(stream, m.stream)
        assert.equal(1, m.stream_seq)
        assert.equal(1, m.delivered)
        assert.equal(0, m.pending)
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$", m.published_at)
        assert.is_false(m.replied)
        assert.is_nil(m.no_such_field)
        assert.matches("^qx.consumer_msg %(" .. stream .. " #1, ", tostring(m))
        assert.is_true(m:ack())
        assert.is_true(m.replied)
        c:close()
    end)

    it("lets a message of an earlier fetch be answered after a later fetch", function()
        local c = consumer()
        publish(2)
        local first = assert(c:fetch(1, 5000))
        local second = assert(c:fetch(1, 5000))
        assert.equal(1, #first)
        assert.equal(1, #second)
        assert.equal(1, first[1].stream_seq)
        assert.equal(2, second[1].stream_seq)
        assert.is_true(first[1]:ack())
        assert.is_true(second[1]:term())
        assert.is_true(ack_pending_is(c, 0))
        -- nothing comes back: both were answered
        assert.same({}, assert(c:fetch(1, 200)))
        c:close()
    end)

    it("returns an invalid error when a message is answered twice", function()
        local c = consumer()
        publish(1)
        local m = assert(c:fetch(1, 5000))[1]
        assert.is_true(m:in_progress()) -- not a final reply
        assert.is_true(m:nak(10))
        local ok, e = m:ack()
        assert.is_nil(ok)
        assert.equal("invalid", e.code)
        assert.matches("already answered", e.message)
        c:close()
    end)

    it("refuses to answer a message once its consumer is closed, and frees it later", function()
        local c = consumer()
        publish(1)
        local m = assert(c:fetch(1, 5000))[1]
        c:close()
        local ok, e = m:ack()
        assert.is_nil(ok)
        assert.equal("closed", e.code)
        assert.equal("body 1", m.data) -- still readable
        m = nil -- luacheck: ignore 311 (dropped so that the collector frees it)
        collectgarbage()
        collectgarbage()
        c:close() -- twice is harmless
        assert.matches("closed", tostring(c))
    end)

    it("redelivers a message dropped unanswered", function()
        local c = consumer{ ack_wait_ms = 300 }
        publish(1)
        assert.equal(1, #assert(c:fetch(1, 5000)))
        collectgarbage()
        collectgarbage()
        local again = assert(c:fetch(1, 5000))
        assert.equal(1, #again)
        assert.equal(2, again[1].delivered)
        assert.is_true(again[1]:ack())
        c:close()
    end)

    it("raises, at the caller, on an unknown option and lists the known ones", function()
        local ok, e = pcall(core.consumer, conn.handle, { stream = stream, durable = "x", nope = 1 })
        assert.is_false(ok)
        assert.matches("core.consumer: unknown option 'nope' %(known: stream, durable,", e)
        ok, e = pcall(core.consumer, conn.handle, { stream = stream, durable = "x", ack_wait_ms = 0 })
        assert.is_false(ok)
        assert.matches("option 'ack_wait_ms' must be an integer from 1 to", e)
        ok, e = pcall(core.consumer, conn.handle, { stream = stream, durable = "x", create = 1 })
        assert.is_false(ok)
        assert.matches("option 'create' must be a boolean", e)
    end)
end)

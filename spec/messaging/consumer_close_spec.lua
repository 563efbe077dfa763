-- Closing a consumer while the server is still sending to it (the reply that ends a fetch that
-- timed out arrives just as the consumer closes) leaves the connection it shares working.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"
local nats = require "qx.messaging.nats"

local Placed = qx.integration_event("spec.consumer_close.placed", { version = 1 })

describe("qx.messaging.consumer close", function()
    it("leaves its shared connection working when a message for it arrives as it closes", function()
        local conn = assert(nats.connect{ servers = support.nats_url() })
        local stream = support.unique("CLOSING"):upper()
        assert(conn:ensure_stream{ name = stream, subjects = { support.unique("closing") .. ".>" } })
        -- each round's fetch times out after 30 ms, just as the server's own reply to the pull
        -- request (408, request timeout) comes back, and the consumer closes at that moment.
        -- A race: before the fix it left the connection deaf in about half of the 20-second
        -- tries under ThreadSanitizer (whose slower allocator widens the window), rarely
        -- elsewhere; the rounds are bounded in count and time.
        local rounds, deadline = 0, core.clock() + 10
        while rounds < 600 and core.clock() < deadline do
            rounds = rounds + 1
            local c, e = qx.consumer{ nats = conn, stream = stream, durable = "d",
                                      registry = qx.registry{ Placed } }
            assert(c, e and ("round %d: %s"):format(rounds, e.message))
            c:run_once(function() end, { timeout_ms = 30 })
            c:close()
        end
        assert.equal("connected", conn:state())
        assert(conn:stream_info(stream))
        assert(conn:delete_stream(stream))
        conn:close()
    end)
end)

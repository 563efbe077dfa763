-- The outbox relay: what a command committed to qx_outbox_events goes to NATS JetStream.
--
-- In production the relay is its own process (`qx relay`, one per shard, a standby or two);
-- here it runs in this process until the outbox is empty, and shows what it published.
-- Run on its own (it commits a sample event first):
--   QX_DB__URL=postgresql://... QX_NATS__SERVERS=nats://... lua5.4 examples/relay.lua
local qx = require "qx"

local required_as = ... -- the module name when required, nil when run as a script
local _M = {}

local function show_status(db, say, when)
    local st = assert(qx.outbox(db):status())
    say(("outbox %s: %d pending (oldest %.3f s), %d dead, %d published")
        :format(when, st.pending, st.oldest_pending_age_seconds, st.dead, st.published))
end

-- run(db, nats_url, say): publishes every pending outbox row, then returns the relay's stats.
function _M.run(db, nats_url, say)
    say = say or print
    local conn = assert(qx.nats.connect{ servers = nats_url })
    assert(conn:ensure_stream()) -- development only: deployments declare their streams
    local before = assert(conn:stream_info())
    show_status(db, say, "before")

    local relay = assert(qx.relay{ db = db, nats = conn })
    -- run() blocks until stopped; on_batch sees every batch and stops it once nothing is left
    relay:run{ on_batch = function(r, err)
        if err then
            say("batch failed: " .. tostring(err))
            return false
        end
        if r.claimed > 0 then
            say(("batch: %d claimed, %d published (%d already on the stream), %d failed")
                :format(r.claimed, r.published, r.duplicates, r.failed))
        end
        if r.claimed < relay.settings.batch_size then return false end
    end }

    local after = assert(conn:stream_info())
    for seq = before.last_seq + 1, after.last_seq do
        local m = conn:stream_get(seq)
        if m then
            say(("stream %s seq %d: %s  (Nats-Msg-Id %s)")
                :format(conn.settings.stream, seq, m.subject, m.headers["Nats-Msg-Id"]))
        end
    end
    show_status(db, say, "after")
    local stats = relay:stats()
    relay:close()
    conn:close()
    return stats
end

if not required_as then
    local db = assert(qx.connect())
    assert(qx.migrate(db))
    local Sample = qx.integration_event("demo.sample_happened", { version = 1 })
    assert(db:unit_of_work(function(uow) uow:record(Sample{ note = "hello from the outbox" }) end))
    _M.run(db, os.getenv("QX_NATS__SERVERS") or os.getenv("QX_TEST_NATS_URL"), print)
    db:close()
end

return _M

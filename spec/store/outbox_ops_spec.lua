-- Operating the outbox: `qx outbox status|dead|retry-dead|purge [--metrics]`, `qx relay --once`,
-- and the Prometheus figures of relay:metrics(), against a real outbox and stream.
local qx = require "qx"
local H = require "relay_helper"

local function metric(text, name)
    return tonumber(text:match("\n" .. name:gsub("[%-%.%+%[%]%(%)%$%^%%%?%*]", "%%%0") .. " ([%d%.e%-]+)\n")
        or text:match("^" .. name .. " ([%d%.e%-]+)\n"))
end

describe("outbox operations", function()
    local ctx
    -- the stream takes messages up to 2 KB, so events padded beyond fail as their own fault
    -- and can be dead-lettered
    before_each(function() ctx = H.setup{ subjects = { "ok.>" }, max_msg_size = 2048 } end)
    after_each(function() H.teardown(ctx) end)

    local function dead_letter_two()
        local evs = H.commit(ctx, { { key = "a", name = "ok.x", pad = 4096 },
                                    { key = "b", name = "ok.y", pad = 4096 },
                                    { key = "c", name = "ok.z" } })
        local relay = assert(H.relay(ctx, { max_attempts = 1 }))
        local r = assert(relay:run_once())
        assert.equal(2, r.dead_lettered)
        assert.equal(1, r.published)
        relay:close()
        return evs
    end

    it("status shows pending, retries, the oldest pending age, attempts and dead letters", function()
        dead_letter_two()
        H.commit(ctx, { { key = "d", name = "ok.w" } })
        H.sql(ctx, "UPDATE qx_outbox_events SET occurred_at = now() - interval '90 seconds',"
            .. " attempts = 3 WHERE event_name = 'ok.w'")
        local out, code = H.cli(ctx, "outbox status")
        assert.equal(0, code, out)
        assert.truthy(out:find("pending:%s+1\n"), out)
        assert.truthy(out:find("dead letters:%s+2\n"), out)
        assert.truthy(out:find("published %(not purged%):%s+1\n"), out)
        assert.truthy(out:find("most attempts %(pending%):%s+3\n"), out)
        local age = tonumber(out:match("oldest pending age:%s+([%d%.]+) s"))
        assert.is_true(age >= 90 and age < 200, out)
    end)

    it("status --metrics prints the same figures as Prometheus text", function()
        dead_letter_two()
        local out, code = H.cli(ctx, "outbox status --metrics")
        assert.equal(0, code, out)
        assert.truthy(out:find("# TYPE qx_outbox_pending gauge\n", 1, true), out)
        assert.equal(0, metric(out, "qx_outbox_pending"))
        assert.equal(2, metric(out, "qx_outbox_dead"))
        assert.equal(1, metric(out, "qx_outbox_published"))
        -- every sample line is "name value" after its HELP and TYPE lines
        for line in out:gmatch("[^\n]+") do
            assert.truthy(line:find("^# HELP ") or line:find("^# TYPE ") or line:find("^[%w_]+ [%d%.e%-]+$"), line)
        end
    end)

    it("dead lists the dead letters with their last error", function()
        local evs = dead_letter_two()
        local out, code = H.cli(ctx, "outbox dead")
        assert.equal(0, code, out)
        assert.truthy(out:find(evs[1].event_id, 1, true), out)
        assert.truthy(out:find(evs[2].event_id, 1, true), out)
        assert.truthy(out:find("exceeds maximum", 1, true), out)
    end)

    it("retry-dead makes chosen dead letters pending again, and the relay publishes them", function()
        local evs = dead_letter_two()
        assert(ctx.conn:ensure_stream{ subjects = { ctx.prefix .. ".ok.>" } }) -- no size limit now
        local out, code = H.cli(ctx, "outbox retry-dead " .. evs[1].event_id)
        assert.equal(0, code, out)
        assert.truthy(out:find("1 dead letter", 1, true), out)
        local relay = assert(H.relay(ctx))
        assert.equal(1, assert(relay:run_once()).published)
        out, code = H.cli(ctx, "outbox retry-dead --all")
        assert.equal(0, code, out)
        assert.equal(1, assert(relay:run_once()).published)
        relay:close()
        H.check_stream(ctx, evs)
        local rows = H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events WHERE dead_at IS NOT NULL")
        assert.equal(0, rows[1].n)
    end)

    it("retry-dead refuses bad input and changes nothing", function()
        dead_letter_two()
        local out, code = H.cli(ctx, "outbox retry-dead not-a-uuid")
        assert.equal(2, code, out)
        assert.truthy(out:find("not a uuid", 1, true), out)
        out, code = H.cli(ctx, "outbox retry-dead")
        assert.equal(2, code, out)
        out, code = H.cli(ctx, "outbox retry-dead " .. qx.uuid() .. " --all")
        assert.equal(2, code, out)
        assert.equal(2, H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events WHERE dead_at IS NOT NULL")[1].n)
    end)

    it("purge deletes old published rows only", function()
        dead_letter_two()
        H.commit(ctx, { { key = "p", name = "ok.pending" }, { key = "q", name = "ok.later" } })
        H.sql(ctx, "UPDATE qx_outbox_events SET published_at = now() - interval '2 hours'"
            .. " WHERE published_at IS NOT NULL")
        local out, code = H.cli(ctx, "outbox purge --older-than 3600")
        assert.equal(0, code, out)
        assert.truthy(out:find("^1 published row"), out)
        local rows = H.sql(ctx, [[SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
      count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
      count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS pending FROM qx_outbox_events]])[1]
        assert.same({ published = 0, dead = 2, pending = 2 }, rows)
        out, code = H.cli(ctx, "outbox purge")
        assert.equal(2, code, out)
        out, code = H.cli(ctx, "outbox purge --older-than soon")
        assert.equal(2, code, out)
        out, code = H.cli(ctx, "outbox purge --before 2000-01-01T00:00:00Z")
        assert.equal(0, code, out)
        assert.truthy(out:find("^0 published row"), out)
        out, code = H.cli(ctx, "outbox frobnicate")
        assert.equal(2, code, out)
    end)

    it("qx relay --once publishes one batch and says what it did", function()
        local evs = H.commit(ctx, { { key = "a", name = "ok.one" }, { key = "a", name = "ok.two" } })
        local out, code = H.cli(ctx, "relay --once")
        assert.equal(0, code, out)
        assert.truthy(out:find("claimed 2, published 2", 1, true), out)
        H.check_stream(ctx, evs)
        out, code = H.cli(ctx, "relay --once")
        assert.equal(0, code, out)
        assert.truthy(out:find("claimed 0", 1, true), out)
    end)

    it("qx relay logs each failed publish on a line of its own, saying whether it counted", function()
        local evs = H.commit(ctx, { { key = "a", name = "bad.x" }, { key = "b", name = "ok.y", pad = 4096 } })
        local out, code = H.cli(ctx, "relay --once")
        assert.equal(1, code, out)
        assert.truthy(out:find("publish of event " .. evs[1].event_id
                               .. " failed (not the event's fault, not counted; retried later)", 1, true), out)
        assert.truthy(out:find("publish of event " .. evs[2].event_id
                               .. " failed (counted toward max_attempts; retried later)", 1, true), out)
    end)

    it("qx relay --delete-published deletes what JetStream acked", function()
        local before = H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events")[1].n
        local evs = H.commit(ctx, { { key = "d", name = "ok.one" }, { key = "d", name = "ok.two" } })
        local out, code = H.cli(ctx, "relay --once --delete-published")
        assert.equal(0, code, out)
        assert.truthy(out:find("published 2", 1, true), out)
        assert.equal(before, H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events")[1].n)
        for _, ev in ipairs(evs) do
            assert.equal(0, #H.sql(ctx, "SELECT 1 FROM qx_outbox_events WHERE id = $1", ev.event_id))
        end
        out, code = H.cli(ctx, "relay --once", "QX_RELAY__DELETE_PUBLISHED=maybe")
        assert.equal(2, code, out)
        assert.truthy(out:find("QX_RELAY__DELETE_PUBLISHED", 1, true), out)
    end)

    it("qx relay rejects bad flags and settings, and says so when NATS is unreachable", function()
        local out, code = H.cli(ctx, "relay --once --shard-id 3 --shard-count 2")
        assert.equal(2, code, out)
        assert.truthy(out:find("shard_id", 1, true), out)
        out, code = H.cli(ctx, "relay --once --batch-size many")
        assert.equal(2, code, out)
        out, code = H.cli(ctx, "relay --once --shard-count 0")
        assert.equal(2, code, out)
        out, code = H.cli(ctx, "relay --once", "QX_RELAY__SHARD_COUNT=zero")
        assert.equal(2, code, out)
        assert.truthy(out:find("QX_RELAY__SHARD_COUNT", 1, true), out)
        local t0 = require("qx.core").clock()
        out, code = H.cli(ctx, "relay --once --servers nats://127.0.0.1:1",
                          "QX_NATS__CONNECT_TIMEOUT_SECONDS=0.5")
        assert.equal(1, code, out)
        assert.truthy(out:find("cannot connect to NATS", 1, true), out)
        assert.is_true(require("qx.core").clock() - t0 < 5)
    end)

    it("qx relay --metrics-file keeps a Prometheus text file up to date", function()
        local path = os.tmpname()
        os.remove(path)
        local pid = H.spawn_relay(ctx, "--metrics-file " .. path .. " --metrics-interval 0.2"
            .. " --idle-interval 0.1 --poll-interval 0.05")
        H.commit(ctx, { { key = "a", name = "ok.one" }, { key = "b", name = "ok.two" } })
        local text
        assert(H.wait_until(function()
            local f = io.open(path)
            text = f and f:read("*a")
            if f then f:close() end
            return text and metric(text, 'qx_relay_published_total{shard="0",shard_count="1"}') == 2
        end, 10), tostring(text) .. H.log_of(ctx, pid))
        assert.equal(0, metric(text, "qx_outbox_pending"))
        H.kill(ctx, pid, "TERM")
        os.remove(path)
    end)

    it("relay:metrics() adds the relay's counters to the outbox figures", function()
        dead_letter_two()
        H.commit(ctx, { { key = "m", name = "ok.m" } })
        local relay = assert(H.relay(ctx, { shard_id = 1, shard_count = 2 }))
        local published = 0
        for _ = 1, 3 do published = published + assert(relay:run_once()).published end
        local text = assert(relay:metrics())
        local lb = '{shard="1",shard_count="2"}'
        assert.equal(published, metric(text, "qx_relay_published_total" .. lb))
        assert.equal(3, metric(text, "qx_relay_batches_total" .. lb))
        assert.equal(1, metric(text, "qx_relay_leader" .. lb))
        assert.equal(1, metric(text, "qx_relay_nats_connected" .. lb))
        assert.equal(2, metric(text, "qx_outbox_dead"))
        relay:close()
    end)
end)

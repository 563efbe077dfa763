-- A projection's metrics (lag in events and seconds, batch apply times) and its /metrics and
-- /health over real HTTP while run() runs, against a real PostgreSQL.
local support = require "support"
local http = require "http_helper"
local qx = require "qx"
local core = require "qx.core"

local clock = core.clock

local function pause(seconds)
    local t = clock() + seconds
    while clock() < t do end
end

describe("projection metrics", function()
    local db

    setup(function() db = support.migrated_db{ pool_size = 6 } end)
    teardown(function() if db then db:close() end end)

    local function model()
        local m = { type = support.unique("PjM") }
        m.Happened = qx.event(support.unique("pjm.happened"))
        m.Agg = qx.event_sourced(m.type)
        m.Agg:on(m.Happened, function() end)
        m.store = qx.event_store{ db = db }
        return m
    end

    local function append(m, n)
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local a = m.Agg.new(core.uuid())
            for i = 1, n do a:record(m.Happened{ i = i }) end
            assert(es:append(a))
        end))
    end

    local function free_port()
        local s = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local p = s:port()
        s:close()
        return p
    end

    it("reports lag in events and seconds, and each batch's apply time as a histogram", function()
        local m = model()
        local p = qx.projection{ name = support.unique("pjm"), db = db, batch_size = 2,
                                 handlers = { [m.Happened] = function() end }, on_progress = false }
        append(m, 5)
        pause(0.05)
        local text = assert(p:metrics())
        assert.equal(5, http.sample(text, "qx_projection_lag_events"))
        assert.is_true(http.sample(text, "qx_projection_lag_seconds") >= 0.05)
        assert.equal(0, http.sample(text, "qx_projection_batch_apply_seconds_count"))
        assert.equal(5, assert(p:catch_up()))
        text = assert(p:metrics())
        assert.equal(0, http.sample(text, "qx_projection_lag_events"))
        assert.equal(0, http.sample(text, "qx_projection_lag_seconds"))
        assert.equal(5, http.sample(text, "qx_projection_events_applied_total"))
        assert.equal(3, http.sample(text, "qx_projection_batches_total"))
        assert.equal(3, http.sample(text, "qx_projection_batch_apply_seconds_count"))
        assert.is_true(http.sample(text, "qx_projection_batch_apply_seconds_sum") > 0)
        -- buckets are cumulative and end with +Inf = the count
        local last = -1
        for v in text:gmatch('qx_projection_batch_apply_seconds_bucket{[^}]*} (%d+)') do
            assert.is_true(tonumber(v) >= last)
            last = tonumber(v)
        end
        assert.matches('le="+Inf"} 3', text, 1, true)
        assert.matches('projection="' .. p.name .. '"', text, 1, true)
    end)

    it("serves /metrics and a 200 /health while run() runs, and nothing after", function()
        local m = model()
        local port = free_port()
        local got = {}
        local p
        p = qx.projection{ name = support.unique("pjm"), db = db, batch_size = 1, on_progress = false,
            handlers = { [m.Happened] = function(ev)
                if ev.i == 2 then
                    got.health = { http.get("http://127.0.0.1:" .. port .. "/health") }
                    got.metrics = { http.get("http://127.0.0.1:" .. port .. "/metrics") }
                    p:stop()
                end
            end } }
        append(m, 2)
        assert(p:run{ metrics_listen = "127.0.0.1:" .. port, poll_ms = 50, max_seconds = 10 })
        assert.equal(200, got.health[1])
        assert.equal(200, got.metrics[1])
        assert.is_not_nil(http.sample(got.metrics[2], "qx_projection_lag_events"))
        assert.matches("# TYPE qx_projection_batch_apply_seconds histogram", got.metrics[2], 1, true)
        assert.equal(0, (http.get("http://127.0.0.1:" .. port .. "/health", 2)))
    end)

    it("answers /health 503 while a batch takes longer than health_stale_ms", function()
        local m = model()
        local port = free_port()
        local got
        local p
        p = qx.projection{ name = support.unique("pjm"), db = db, batch_size = 1, on_progress = false,
            handlers = { [m.Happened] = function(ev)
                if ev.i == 2 then
                    pause(0.5)
                    got = { http.get("http://127.0.0.1:" .. port .. "/health") }
                    p:stop()
                end
            end } }
        append(m, 2)
        assert(p:run{ metrics_listen = "127.0.0.1:" .. port, health_stale_ms = 300, poll_ms = 50,
                      max_seconds = 10 })
        assert.equal(503, got[1])
        assert.matches("^stalled: ", got[2])
    end)

    it("refuses to start on an address it cannot bind: nil, err, nothing applied", function()
        local m = model()
        local holder = assert(core.metrics_server{ listen = "127.0.0.1:0" })
        local applied = 0
        local p = qx.projection{ name = support.unique("pjm"), db = db, on_progress = false,
                                 handlers = { [m.Happened] = function() applied = applied + 1 end } }
        append(m, 2)
        local n, e = p:run{ metrics_listen = "127.0.0.1:" .. holder:port(), max_seconds = 1 }
        holder:close()
        assert.is_nil(n)
        assert.equal("invalid", e.code)
        assert.matches("Address already in use", e.message, 1, true)
        n, e = p:run{ metrics_listen = "192.0.2.1:9464", max_seconds = 1 }
        assert.is_nil(n)
        assert.matches("not an address of this machine", e.message, 1, true)
        assert.equal(0, applied)
        assert.equal(2, assert(p:status()).behind)
        assert.has_error(function() p:run{ metrics_listen = true } end,
                         "projection:run: metrics_listen must be a string HOST:PORT")
    end)
end)

-- W3C Trace Context end to end, against real PostgreSQL and nats-server: a traceparent (and
-- tracestate) given to a unit of work is stored with its outbox rows and stored events, sent as
-- headers by the relay, given to the consumer's handler and to the unit of work it runs (whose
-- events carry it on), and read back on a projection's records. Without one, nothing is
-- invented; an invalid one is dropped with a warning, never stored.
local support = require "support"
local H = require "relay_helper"
local qx = require "qx"
local core = require "qx.core"

local TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
local PARENT = "00f067aa0ba902b7"
local TP = "00-" .. TRACE .. "-" .. PARENT .. "-01"
local TS = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"

describe("trace context", function()
    local ctx, spans, warnings

    local Placed = qx.integration_event("spec.trace.order_placed", { version = 1 })
    local Shipped = qx.integration_event("spec.trace.order_shipped", { version = 1 })
    local Noted = qx.event("spec.trace.noted", { version = 1 })
    local Order = qx.event_sourced("spec_trace_order")
    Order:on(Noted, function(self, ev) self.note = ev.note end)

    before_each(function()
        ctx = H.setup()
        spans, warnings = {}, {}
        qx.tracing.on_span(function(span) spans[#spans + 1] = span end)
        qx.tracing.on_warning(function(message, info)
            warnings[#warnings + 1] = { message = message, info = info }
        end)
    end)

    after_each(function()
        qx.tracing.on_span(nil)
        qx.tracing.on_warning(nil)
        if ctx then H.teardown(ctx) end
        ctx = nil
    end)

    local function outbox_rows()
        return H.sql(ctx, "SELECT event_name, traceparent, tracestate FROM qx_outbox_events"
                          .. " ORDER BY seq")
    end

    local function stored_rows()
        return H.sql(ctx, "SELECT event_name, traceparent, tracestate FROM qx_aggregate_events"
                          .. " ORDER BY global_position")
    end

    local function spans_named(name)
        local out = {}
        for _, s in ipairs(spans) do
            if s.name == name then out[#out + 1] = s end
        end
        return out
    end

    -- Commits one Placed event with the given context; returns the event.
    local function place(context, n)
        local ev
        assert(ctx.db:unit_of_work(function(uow)
            for i = 1, n or 1 do ev = uow:record(Placed{ n = i }) end
        end, { context = context }))
        return ev
    end

    local function relay_all()
        local relay = assert(H.relay(ctx))
        local r
        repeat
            r = assert(relay:run_once())
        until r.claimed == 0
        relay:close()
    end

    -- Runs the consumer until `want` messages were handled (or 10 s passed).
    local function consume(handler, want)
        local c = assert(qx.consumer{ nats = ctx.conn, stream = ctx.stream,
                                      durable = support.unique("trace"), db = ctx.db,
                                      filter_subject = ctx.prefix .. ".spec.trace.order_placed",
                                      registry = qx.registry{ Placed } })
        local handled, deadline = 0, core.clock() + 10
        while handled < want and core.clock() < deadline do
            local counts = assert(c:run_once(handler, { timeout_ms = 500 }))
            handled = handled + counts.handled
            assert.equal(0, counts.failed, tostring(c:stats().last_error))
        end
        c:close()
        assert.equal(want, handled)
    end

    -- The handler: records an integration event and appends an event-sourced aggregate, so
    -- that both the outbox and the event store show what its unit of work carried.
    local function handler_that_records(seen)
        local store = qx.event_store{ db = ctx.db }
        return function(ev, uow, msg)
            seen[#seen + 1] = { msg_traceparent = msg.traceparent, msg_tracestate = msg.tracestate,
                                uow_traceparent = uow.traceparent, uow_tracestate = uow.tracestate,
                                header = msg.headers.traceparent }
            uow:record(Shipped{ order = ev.event_id })
            local order = Order.new(qx.uuid())
            order:record(Noted{ note = "shipped" })
            assert(uow:store(store):append(order))
        end
    end

    local function project()
        local recs = {}
        local p = assert(qx.projection{ name = support.unique("trace"), db = ctx.db,
                                        on_progress = false,
                                        handlers = { [Noted] = function(rec)
                                            recs[#recs + 1] = rec
                                        end } })
        assert(p:catch_up())
        return recs
    end

    it("follows a traceparent from a unit of work through the outbox, the relay and a consumer "
       .. "into the events its handler records and a projection's records", function()
        local ev = place({ traceparent = TP, tracestate = TS })
        local rows = outbox_rows()
        assert.same({ { event_name = Placed.event_name, traceparent = TP, tracestate = TS } }, rows)

        relay_all()
        local msgs = H.read_stream(ctx)
        assert.equal(1, #msgs)
        assert.equal(TP, msgs[1].headers.traceparent)
        assert.equal(TS, msgs[1].headers.tracestate)
        assert.equal(ev.event_id, msgs[1].env.event_id)
        assert.is_nil(msgs[1].env.traceparent) -- headers only: the envelope is unchanged

        local seen = {}
        consume(handler_that_records(seen), 1)
        assert.same({ { msg_traceparent = TP, msg_tracestate = TS, uow_traceparent = TP,
                        uow_tracestate = TS, header = TP } }, seen)

        rows = outbox_rows()
        assert.equal(2, #rows)
        assert.same({ event_name = Shipped.event_name, traceparent = TP, tracestate = TS }, rows[2])
        assert.same({ { event_name = Noted.event_name, traceparent = TP, tracestate = TS } },
                    stored_rows())

        -- and on again: the relay sends the handler's event with the same context
        relay_all()
        msgs = H.read_stream(ctx)
        assert.equal(2, #msgs)
        assert.equal(TP, msgs[2].headers.traceparent)

        local recs = project()
        assert.equal(1, #recs)
        assert.equal(TP, recs[1]._traceparent)
        assert.equal(TS, recs[1]._tracestate)
    end)

    it("gives a replayed dead letter's handler the trace context of its stored headers",
       function()
        place({ traceparent = TP, tracestate = TS })
        relay_all()
        local c = assert(qx.consumer{ nats = ctx.conn, stream = ctx.stream,
                                      durable = support.unique("trace"), db = ctx.db,
                                      max_deliver = 1, registry = qx.registry{ Placed },
                                      filter_subject = ctx.prefix .. "." .. Placed.event_name })
        local termed, deadline = 0, core.clock() + 10
        while termed < 1 and core.clock() < deadline do
            termed = termed + assert(c:run_once(function() error("down") end,
                                                { timeout_ms = 500 })).termed
        end
        assert.equal(1, termed)
        local seen = {}
        local counts = assert(c:replay_dead(handler_that_records(seen)))
        c:close()
        assert.equal(1, counts.handled)
        assert.same({ { msg_traceparent = TP, msg_tracestate = TS, uow_traceparent = TP,
                        uow_tracestate = TS, header = TP } }, seen)
        assert.same({ event_name = Shipped.event_name, traceparent = TP, tracestate = TS },
                    outbox_rows()[2])
    end)

    it("stores the trace context with every outbox row however many a unit of work writes",
       function()
        for _, n in ipairs({ 2, 32, 33, 40 }) do
            place({ traceparent = TP }, n)
        end
        local rows = outbox_rows()
        assert.equal(2 + 32 + 33 + 40, #rows)
        for i, r in ipairs(rows) do
            assert.equal(TP, r.traceparent, "row " .. i)
            assert.equal(qx.null, r.tracestate, "row " .. i)
        end
    end)

    it("reads the trace context back on the event store's records", function()
        local store = qx.event_store{ db = ctx.db }
        local id = qx.uuid()
        assert(ctx.db:unit_of_work(function(uow)
            local order = Order.new(id)
            order:record(Noted{ note = "a" })
            order:record(Noted{ note = "b" })
            assert(uow:store(store):append(order))
        end, { context = { traceparent = TP } }))
        local recs = assert(store:read_stream(Order.aggregate_type, id))
        assert.equal(2, #recs)
        for _, rec in ipairs(recs) do
            assert.equal(TP, rec._traceparent)
            assert.is_nil(rec._tracestate)
            assert.is_nil(rec.traceparent) -- not in the stored event itself
        end
        local all = assert(store:read_all())
        assert.equal(TP, all[1]._traceparent)
    end)

    it("invents nothing without a traceparent: no column, header, handler value or span",
       function()
        place(nil)
        place({ tracestate = TS }) -- a tracestate means nothing without a traceparent
        for _, r in ipairs(outbox_rows()) do
            assert.equal(qx.null, r.traceparent)
            assert.equal(qx.null, r.tracestate)
        end
        relay_all()
        for _, m in ipairs(H.read_stream(ctx)) do
            assert.is_nil(m.headers.traceparent)
            assert.is_nil(m.headers.tracestate)
        end
        local seen = {}
        consume(handler_that_records(seen), 2)
        for _, s in ipairs(seen) do
            assert.same({}, s)
        end
        for _, r in ipairs(outbox_rows()) do assert.equal(qx.null, r.traceparent) end
        for _, r in ipairs(stored_rows()) do assert.equal(qx.null, r.traceparent) end
        for _, rec in ipairs(project()) do assert.is_nil(rec._traceparent) end
        assert.same({}, spans)
        assert.same({}, warnings)
    end)

    it("reports spans of the unit of work, the consumer's handling and a projection's apply, "
       .. "each a child of the traceparent", function()
        local t0 = core.time()
        place({ traceparent = TP, tracestate = TS })
        relay_all()
        consume(handler_that_records({}), 1)
        project()
        local t1 = core.time()

        local uows = spans_named("qx.unit_of_work")
        assert.equal(2, #uows) -- the command's and the handler's
        assert.equal("committed", uows[1].attributes["qx.outcome"])
        assert.equal(1, uows[1].attributes["qx.outbox.events"])
        local handles = spans_named("qx.consumer.handle")
        assert.equal(1, #handles)
        local a = handles[1].attributes
        assert.equal("handled", a["qx.outcome"])
        assert.equal("nats", a["messaging.system"])
        assert.equal(ctx.prefix .. "." .. Placed.event_name, a["messaging.destination.name"])
        assert.equal(Placed.event_name, a["qx.event_name"])
        assert.equal(1, a["qx.delivered"])
        local applies = spans_named("qx.projection.apply")
        assert.equal(1, #applies)
        assert.equal("applied", applies[1].attributes["qx.outcome"])
        assert.equal(Noted.event_name, applies[1].attributes["qx.event_name"])
        -- the projection's own batch runs in a unit of work with no trace context: no span
        assert.equal(4, #spans)

        local ids = {}
        for _, s in ipairs(spans) do
            assert.equal(TRACE, s.trace_id)
            assert.equal(PARENT, s.parent_id)
            assert.equal(TP, s.traceparent)
            assert.equal(TS, s.tracestate)
            assert.truthy(s.span_id:match("^" .. ("[0-9a-f]"):rep(16) .. "$"), s.span_id)
            assert.is_nil(ids[s.span_id])
            ids[s.span_id] = true
            assert.is_true(t0 <= s.start_time and s.start_time <= s.end_time
                           and s.end_time <= t1)
        end
    end)

    it("reports a unit of work that rolled back with its error code", function()
        local ok, e = ctx.db:unit_of_work(function(uow)
            uow:record(Placed{ n = 1 })
            error(qx.error.new("conflict", "no"))
        end, { context = { traceparent = TP } })
        assert.is_nil(ok)
        assert.equal("conflict", e.code)
        assert.equal(1, #spans)
        assert.equal("rolled back", spans[1].attributes["qx.outcome"])
        assert.equal("conflict", spans[1].attributes["qx.error.code"])
        assert.equal(0, spans[1].attributes["qx.outbox.events"])
    end)

    it("keeps a unit of work that succeeded when the span hook fails, and warns", function()
        qx.tracing.on_span(function() error("exporter down") end)
        assert(ctx.db:unit_of_work(function(uow) uow:record(Placed{ n = 1 }) end,
                                   { context = { traceparent = TP } }))
        assert.equal(1, #outbox_rows())
        assert.equal(1, #warnings)
        assert.matches("span hook failed on qx.unit_of_work", warnings[1].message, 1, true)
        assert.matches("exporter down", warnings[1].message, 1, true)
    end)

    describe("drops an invalid value with a warning, never storing it", function()
        local invalid = {
            uppercase = "00-" .. TRACE:upper() .. "-" .. PARENT .. "-01",
            ["all-zero trace id"] = "00-" .. ("0"):rep(32) .. "-" .. PARENT .. "-01",
            ["all-zero parent id"] = "00-" .. TRACE .. "-" .. ("0"):rep(16) .. "-01",
            ["version ff"] = "ff-" .. TRACE .. "-" .. PARENT .. "-01",
            ["not a string"] = 42,
            garbage = "hello'); DROP TABLE qx_outbox_events; --",
        }
        for what, v in pairs(invalid) do
            it("a traceparent: " .. what, function()
                place({ traceparent = v, tracestate = TS })
                assert.same({ { event_name = Placed.event_name, traceparent = qx.null,
                                tracestate = qx.null } }, outbox_rows())
                assert.equal(1, #warnings)
                assert.equal("traceparent", warnings[1].info.field)
                assert.equal(v, warnings[1].info.value)
                assert.equal("unit_of_work", warnings[1].info.source)
                assert.matches("dropped an invalid traceparent", warnings[1].message, 1, true)
                assert.same({}, spans)
            end)
        end

        it("a tracestate of 33 members, keeping the traceparent", function()
            local list = {}
            for i = 1, 33 do list[i] = "k" .. i .. "=v" end
            place({ traceparent = TP, tracestate = table.concat(list, ",") })
            assert.same({ { event_name = Placed.event_name, traceparent = TP,
                            tracestate = qx.null } }, outbox_rows())
            assert.equal(1, #warnings)
            assert.equal("tracestate", warnings[1].info.field)
        end)

        it("a tracestate with a key twice or an uppercase key", function()
            place({ traceparent = TP, tracestate = "rojo=1,rojo=2" })
            place({ traceparent = TP, tracestate = "Rojo=1" })
            for _, r in ipairs(outbox_rows()) do
                assert.equal(TP, r.traceparent)
                assert.equal(qx.null, r.tracestate)
            end
            assert.equal(2, #warnings)
        end)

        it("an event store append in such a unit of work", function()
            local store = qx.event_store{ db = ctx.db }
            assert(ctx.db:unit_of_work(function(uow)
                local order = Order.new(qx.uuid())
                order:record(Noted{ note = "a" })
                assert(uow:store(store):append(order))
            end, { context = { traceparent = "00-xyz" } }))
            assert.same({ { event_name = Noted.event_name, traceparent = qx.null,
                            tracestate = qx.null } }, stored_rows())
            assert.equal(1, #warnings)
        end)

        it("a message's traceparent header: the handler runs without it, the message is handled",
           function()
            local ev = Placed{ n = 1 }
            ev.event_id, ev.occurred_at = qx.uuid(), qx.now()
            local body = assert(core.json_encode(ev:envelope()))
            assert(ctx.conn:publish(ctx.prefix .. "." .. Placed.event_name, body,
                                    { traceparent = "00-" .. TRACE .. "-" .. PARENT .. "-01-x",
                                      tracestate = TS }))
            local seen = {}
            consume(handler_that_records(seen), 1)
            assert.same({ { header = "00-" .. TRACE .. "-" .. PARENT .. "-01-x" } }, seen)
            assert.equal(1, #warnings)
            assert.equal("traceparent", warnings[1].info.field)
            assert.matches("^consumer ", warnings[1].info.source)
            for _, r in ipairs(outbox_rows()) do assert.equal(qx.null, r.traceparent) end
            for _, r in ipairs(stored_rows()) do assert.equal(qx.null, r.traceparent) end
            assert.same({}, spans)
        end)

        it("a message's tracestate header alone, keeping its traceparent", function()
            local ev = Placed{ n = 1 }
            ev.event_id, ev.occurred_at = qx.uuid(), qx.now()
            assert(ctx.conn:publish(ctx.prefix .. "." .. Placed.event_name,
                                    assert(core.json_encode(ev:envelope())),
                                    { traceparent = TP, tracestate = "=bad" }))
            local seen = {}
            consume(handler_that_records(seen), 1)
            assert.same({ { msg_traceparent = TP, uow_traceparent = TP, header = TP } }, seen)
            assert.equal(1, #warnings)
            assert.equal("tracestate", warnings[1].info.field)
            for _, r in ipairs(outbox_rows()) do
                assert.equal(TP, r.traceparent)
                assert.equal(qx.null, r.tracestate)
            end
        end)

        it("writes a line on stderr when no warning hook is set", function()
            qx.tracing.on_warning(nil)
            local script = "require('qx.tracing')._context('00-bad', nil, 'unit_of_work')"
            local p = assert(io.popen("env LUA_PATH=" .. support.sh(package.path) .. " LUA_CPATH="
                .. support.sh(package.cpath) .. " ASAN_OPTIONS=detect_leaks=0 " .. H.LUA .. " -e "
                .. support.sh(script) .. " 2>&1"))
            local out = p:read("*a")
            p:close()
            assert.matches("qx: unit_of_work: dropped an invalid traceparent", out, 1, true)
        end)
    end)
end)

-- qx.tracing: the W3C Trace Context syntax qx accepts (traceparent, tracestate) and its hooks.
-- The end-to-end path (unit of work, outbox, relay, consumer, event store, projection) is in
-- spec/messaging/trace_context_spec.lua.
local tracing = require "qx.tracing"

local TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
local PARENT = "00f067aa0ba902b7"
local TP = "00-" .. TRACE .. "-" .. PARENT .. "-01"

local function members(n, sep)
    local list = {}
    for i = 1, n do list[i] = "k" .. i .. "=v" .. i end
    return table.concat(list, sep or ",")
end

describe("qx.tracing", function()
    describe("traceparent", function()
        it("accepts version 00 in lowercase hex, sampled or not", function()
            assert.is_true(tracing.valid_traceparent(TP))
            assert.is_true(tracing.valid_traceparent("00-" .. TRACE .. "-" .. PARENT .. "-00"))
            assert.is_true(tracing.valid_traceparent("00-" .. TRACE .. "-" .. PARENT .. "-ff"))
        end)

        it("accepts a later version of 55 characters, or more after a '-'", function()
            assert.is_true(tracing.valid_traceparent("cc-" .. TRACE .. "-" .. PARENT .. "-01"))
            assert.is_true(tracing.valid_traceparent("01-" .. TRACE .. "-" .. PARENT
                                                     .. "-01-what-the-future-will-be-like"))
        end)

        local bad = {
            ["uppercase hex"] = "00-" .. TRACE:upper() .. "-" .. PARENT .. "-01",
            ["an uppercase parent id"] = "00-" .. TRACE .. "-" .. PARENT:upper() .. "-01",
            ["an all-zero trace id"] = "00-" .. ("0"):rep(32) .. "-" .. PARENT .. "-01",
            ["an all-zero parent id"] = "00-" .. TRACE .. "-" .. ("0"):rep(16) .. "-01",
            ["version ff"] = "ff-" .. TRACE .. "-" .. PARENT .. "-01",
            ["version 00 with more after it"] = TP .. "-extra",
            ["a later version with more not after a '-'"] = "01-" .. TRACE .. "-" .. PARENT
                .. "-01extra",
            ["a short trace id"] = "00-" .. TRACE:sub(2) .. "-" .. PARENT .. "-01",
            ["a long parent id"] = "00-" .. TRACE .. "-" .. PARENT .. "0-01",
            ["non-hex flags"] = "00-" .. TRACE .. "-" .. PARENT .. "-0g",
            ["underscores for dashes"] = "00_" .. TRACE .. "_" .. PARENT .. "_01",
            ["a space around it"] = " " .. TP,
            ["a trailing newline"] = TP .. "\n",
            ["a one-digit version"] = "0-" .. TRACE .. "-" .. PARENT .. "-01",
            ["the empty string"] = "",
            ["a NUL byte after it"] = TP .. "\0",
            ["a NUL byte inside it"] = "00-" .. TRACE:sub(1, 31) .. "\0-" .. PARENT .. "-01",
            ["a later version with a NUL byte after the flags"] = "01-" .. TRACE .. "-" .. PARENT
                .. "-01\0",
        }
        for what, v in pairs(bad) do
            it("refuses " .. what, function()
                local ok, reason = tracing.valid_traceparent(v)
                assert.is_false(ok)
                assert.is_string(reason)
            end)
        end

        it("refuses what is not a string", function()
            assert.is_false((tracing.valid_traceparent(42)))
            assert.is_false((tracing.valid_traceparent({ TP })))
            assert.is_false((tracing.valid_traceparent(nil)))
        end)
    end)

    describe("tracestate", function()
        it("accepts key=value members, empty members and spaces or tabs around them", function()
            assert.is_true(tracing.valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"))
            assert.is_true(tracing.valid_tracestate(" rojo=1 ,\tcongo=2\t"))
            assert.is_true(tracing.valid_tracestate("rojo=1,,congo=2,"))
            assert.is_true(tracing.valid_tracestate(""))
        end)

        it("accepts multi-tenant keys and values with spaces inside", function()
            assert.is_true(tracing.valid_tracestate("fw529a3039@dt=abc,1abc@x-y*z/w=a b"))
        end)

        it("accepts 32 list members and keys and values at their longest", function()
            assert.is_true(tracing.valid_tracestate(members(32)))
            assert.is_true(tracing.valid_tracestate(members(32, ",,")))
            assert.is_true(tracing.valid_tracestate("a" .. ("b"):rep(255) .. "=" .. ("v"):rep(256)))
            assert.is_true(tracing.valid_tracestate(("t"):rep(241) .. "@" .. ("s"):rep(14) .. "=v"))
        end)

        local bad = {
            ["33 list members"] = members(33),
            ["a member without '='"] = "rojo",
            ["an uppercase key"] = "Rojo=1",
            ["a key starting with a digit"] = "1rojo=1",
            ["a key of 257 characters"] = "a" .. ("b"):rep(256) .. "=v",
            ["a value of 257 characters"] = "a=" .. ("v"):rep(257),
            ["an empty value"] = "rojo=",
            ["a value with '='"] = "rojo=a=b",
            ["a value with a control character"] = "rojo=a\1b",
            ["a value with a non-ASCII byte"] = "rojo=caf\195\169",
            ["a key given twice"] = "rojo=1,congo=2,rojo=3",
            ["a system id of 15 characters"] = "t@" .. ("s"):rep(15) .. "=v",
            ["an empty tenant id"] = "@sys=v",
            ["two '@' in a key"] = "a@b@c=v",
            ["a value ending in a NUL byte"] = "rojo=1\0",
            ["a key with a NUL byte"] = "ro\0jo=1",
        }
        for what, v in pairs(bad) do
            it("refuses " .. what, function()
                local ok, reason = tracing.valid_tracestate(v)
                assert.is_false(ok)
                assert.is_string(reason)
            end)
        end
    end)

    describe("hooks", function()
        after_each(function()
            tracing.on_span(nil)
            tracing.on_warning(nil)
        end)

        it("on_span and on_warning return the hook they replace", function()
            local f, g = function() end, function() end
            assert.is_nil(tracing.on_span(f))
            assert.equal(f, tracing.on_span(g))
            assert.equal(g, tracing.on_span(nil))
            assert.is_nil(tracing.on_warning(f))
            assert.equal(f, tracing.on_warning(nil))
        end)

        it("refuse what is not a function", function()
            assert.has_error(function() tracing.on_span("print") end,
                             "qx.tracing.on_span: expected a function or nil")
            assert.has_error(function() tracing.on_warning(true) end,
                             "qx.tracing.on_warning: expected a function or nil")
        end)

        it("is reachable as qx.tracing", function()
            assert.equal(tracing, require("qx").tracing)
        end)
    end)
end)

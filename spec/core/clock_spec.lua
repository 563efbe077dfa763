-- core.now(): the wall clock as ISO-8601 UTC with microseconds, the stamp of every event.
local core = require "qx.core"

describe("core.now", function()
    local ISO = "^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)%.(%d%d%d%d%d%d)Z$"

    it("is ISO-8601 UTC with six fractional digits", function()
        for _ = 1, 1000 do
            local s = core.now()
            assert.equal(27, #s)
            local y, mo, d, h, mi, sec, us = s:match(ISO)
            assert.truthy(y, s)
            assert.is_true(tonumber(mo) >= 1 and tonumber(mo) <= 12, s)
            assert.is_true(tonumber(d) >= 1 and tonumber(d) <= 31, s)
            assert.is_true(tonumber(h) <= 23 and tonumber(mi) <= 59 and tonumber(sec) <= 60, s)
            assert.is_true(tonumber(us) <= 999999, s)
        end
    end)

    it("tells the same second as the C library's UTC calendar", function()
        -- read the calendar before and after: the stamp lies between them (a second may pass);
        -- reads go on until the calendar's second has changed, so every run crosses a second
        local first = os.time()
        repeat
            local before = os.date("!%Y-%m-%dT%H:%M:%S")
            local s = core.now()
            local after = os.date("!%Y-%m-%dT%H:%M:%S")
            local whole = s:sub(1, 19)
            if not (whole >= before and whole <= after) then
                assert.is_true(whole >= before and whole <= after, before .. " <= " .. whole .. " <= " .. after)
            end
        until os.time() > first
    end)

    it("never goes backwards between two reads in a row (barring a clock step)", function()
        local prev = core.now()
        for _ = 1, 10000 do
            local s = core.now()
            assert.is_true(s >= prev, prev .. " then " .. s)
            prev = s
        end
    end)
end)

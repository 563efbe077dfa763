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
        -- The calendar (os.time, the C library's time()) reads the kernel's coarse clock, which
        -- moves once a tick: for up to a tick into a second it still tells the one before, while
        -- core.now reads the precise clock. A tick is 10 ms at most (HZ >= 100). So the stamp
        -- lies between the calendar read before it and the one read after it plus a tick. Reads
        -- go on until the calendar's second has changed, so every run crosses a second.
        local TICK_US = 10000
        local function calendar(t) return os.date("!%Y-%m-%dT%H:%M:%S", t) end
        local first = os.time()
        repeat
            local before = os.time()
            local s = core.now()
            local after = os.time()
            local whole, us = s:sub(1, 19), tonumber(s:sub(21, 26))
            local ok = whole >= calendar(before)
                and (whole <= calendar(after) or (whole == calendar(after + 1) and us < TICK_US))
            if not ok then
                assert.is_true(ok, calendar(before) .. " <= " .. s .. " <= " .. calendar(after) .. " + 1 tick")
            end
        until after > first
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

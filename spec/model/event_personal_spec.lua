-- qx.event's personal and subject options: kept on the class, checked when the class is made
-- (the sealing itself is in spec/store/erasure_spec.lua).
local support = require "support"
local qx = require "qx"

describe("qx.event personal option", function()
    it("keeps the list and the subject on the class", function()
        local E = qx.event(support.unique("p.ok"), { personal = { "email", "phone" }, subject = "uid" })
        assert.same({ "email", "phone" }, E.personal)
        assert.equal("uid", E.subject)
        local I = qx.integration_event(support.unique("p.int"), { personal = { "email" }, subject = "uid" })
        assert.same({ "email" }, I.personal)
    end)

    it("raises at class definition on a bad list or subject", function()
        local name = support.unique("p.bad")
        for _, case in ipairs({
            { { personal = "email", subject = "uid" }, "list of field names" },
            { { personal = { "email", 3 }, subject = "uid" }, "item 2 is a number" },
            { { personal = {}, subject = "uid" }, "empty" },
            { { personal = { "email", "email" }, subject = "uid" }, "twice" },
            { { personal = { "event_id" }, subject = "uid" }, "cannot be a payload field" },
            { { personal = { "email" } }, "'subject'.*required" },
            { { personal = { "email" }, subject = "email" }, "names the personal field" },
            { { personal = { "email" }, subject = 7 }, "must name a payload field" },
            { { subject = "uid" }, "without 'personal'" },
        }) do
            assert.error_matches(function() qx.event(name, case[1]) end, case[2])
        end
    end)
end)

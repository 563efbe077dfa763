-- core.prefixed_key(t, prefix[, skip]): the key of a string value that begins with prefix (what
-- the erasure code asks of every event and record: does any field hold a sealed value?).
local core = require "qx.core"

describe("core.prefixed_key", function()
    local P = "qx:sealed:1:"

    it("returns the key whose string value begins with the prefix, nil when none does", function()
        assert.equal("b", core.prefixed_key({ a = "plain", b = P .. "x", c = 3 }, P))
        assert.equal("only", core.prefixed_key({ only = P }, P))
        assert.equal(2, core.prefixed_key({ "x", P .. "y" }, P))
        assert.is_nil(core.prefixed_key({ a = "plain", b = "qx:sealed", c = "x" .. P }, P))
        assert.is_nil(core.prefixed_key({}, P))
    end)

    it("looks at strings only: numbers, booleans and tables are never taken as text", function()
        assert.is_nil(core.prefixed_key({ n = 123, f = 1.5, b = true, t = { P } }, "12"))
        assert.equal("s", core.prefixed_key({ n = 123, s = "123" }, "12"))
    end)

    it("compares bytes, embedded zeros included", function()
        assert.equal("z", core.prefixed_key({ z = "a\0b" }, "a\0"))
        assert.is_nil(core.prefixed_key({ z = "a\0b" }, "a\0c"))
    end)

    it("leaves out the keys the skip table maps to true", function()
        local t = { email = P .. "1", plan = "pro" }
        assert.is_nil(core.prefixed_key(t, P, { email = true }))
        assert.equal("email", core.prefixed_key(t, P, { email = false }))
        t.note = P .. "2"
        assert.equal("note", core.prefixed_key(t, P, { email = true }))
    end)

    it("goes on after a given key, so a loop visits each matching field once", function()
        local t = { a = P .. "1", b = "plain", c = P .. "2", d = 4, e = P .. "3" }
        for i = 1, 20 do t["x" .. i] = "x" end
        local seen, n = {}, 0
        local k = core.prefixed_key(t, P)
        while k ~= nil do
            assert.is_nil(seen[k], "visited twice: " .. k)
            seen[k] = true
            n = n + 1
            t[k] = "opened " .. k -- assigning an existing field keeps the traversal valid
            k = core.prefixed_key(t, P, nil, k)
        end
        assert.equal(3, n)
        assert.same({ a = true, c = true, e = true }, seen)
        assert.has_error(function() core.prefixed_key({ a = 1 }, P, nil, "no such key") end)
    end)

    it("reads the table raw: no __index or __pairs", function()
        local t = setmetatable({}, { __index = function() return P end,
                                     __pairs = function() error("not called") end })
        assert.is_nil(core.prefixed_key(t, P))
    end)

    it("raises on a missing table or prefix", function()
        assert.has_error(function() core.prefixed_key(nil, P) end)
        assert.has_error(function() core.prefixed_key({}, nil) end)
        assert.has_error(function() core.prefixed_key({}, P, "skip") end)
    end)
end)

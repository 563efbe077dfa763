-- Spec helpers for values that must come back from JSON as they went in: numbers of both Lua
-- 5.4 subtypes, nested documents of a given depth, and a comparison that tells 100 from 100.0.
local assert = require "luassert"

local M = {}

--- A table of numbers of every kind (integers, integral floats, fractions, extremes).
function M.numbers()
    local t = { i = 100, neg = -7, zero = 0, f = 150.0, fz = 0.0, half = 2.5, tiny = 1e-7,
                e15 = 1e15, e300 = 1e300, third = 1 / 3, list = { 1, 2.0, { x = 3, y = -4.5 } } }
    if math.type then
        t.max, t.min = math.maxinteger, math.mininteger
        t.big = 123456789012345678
    else
        t.big = 2 ^ 53
    end
    return t
end

-- v as text that says each number's subtype and exact value
local function sig(v)
    if type(v) == "number" then
        return (math.type and math.type(v) or "number") .. ":" .. string.format("%.17g", v)
    elseif type(v) == "table" then
        local out = {}
        for k, x in pairs(v) do out[tostring(k)] = sig(x) end
        return out
    end
    return v
end
M.sig = sig

--- Asserts that got equals want, each number of the same subtype.
function M.assert_same(want, got)
    assert.same(sig(want), sig(got))
end

--- A document of d levels: { v = { v = ... { v = 1 } } }.
function M.nest(d)
    local t = { v = 1 }
    for _ = 2, d do t = { v = t } end
    return t
end

--- The levels of a document made by nest (0 when it is not a table).
function M.depth(t)
    local d = 0
    while type(t) == "table" do
        d = d + 1
        t = t.v
    end
    return d
end

return M

-- JSON written by qx keeps numbers exact: the encoder behind every table parameter, envelope,
-- event and snapshot.
local core = require "qx.core"
local cjson = require "cjson"
local support = require "support"
local qx = require "qx"

-- Lua 5.4 has 64-bit integers; on LuaJIT every number is a double, exact up to 2^53.
local BIG, BIG_TEXT = 9007199254740992, "9007199254740992"
if math.type then BIG, BIG_TEXT = 123456789012345678, "123456789012345678" end

describe("json encoding", function()
    it("writes integers beyond 14 digits exactly", function()
        assert.equal("[" .. BIG_TEXT .. ",-" .. BIG_TEXT .. ",100000000000001]",
                     core.json_encode({ BIG, -BIG, 100000000000001 }))
    end)

    it("writes floats with the fewest digits that read back the same", function()
        assert.equal("[0.1,0.30000000000000004,1.5,1e-07]",
                     core.json_encode({ 0.1, 0.1 + 0.2, 1.5, 1e-7 }))
        for _, v in ipairs({ 1 / 3, 2 ^ 0.5, 5e-324, 1.7976931348623157e308, -123.456 }) do
            assert.equal(v, cjson.decode(core.json_encode(v)))
        end
    end)

    it("gives arrays, objects, null and escapes the shapes lua-cjson gives", function()
        assert.equal('[1,"a",true,null]', core.json_encode({ 1, "a", true, core.null }))
        assert.equal("{}", core.json_encode({}))
        assert.equal('{"k":"x\\n\\"\\\\\\u0001"}', core.json_encode({ k = 'x\n"\\\1' }))
        assert.same({ ["1"] = 1, ["3"] = 3 }, cjson.decode(core.json_encode({ [1] = 1, [3] = 3 })))
    end)

    it("keeps every byte of long strings with escapes anywhere, first and last included", function()
        local parts = {}
        for i = 0, 255 do
            parts[#parts + 1] = string.char(i) .. string.rep("x", i % 7) .. "é"
        end
        -- every byte value at every position of a 17-byte string: the encoder scans eight bytes at
        -- a time and must notice the one that needs escaping wherever it sits
        for b = 0, 255 do
            for at = 1, 17 do
                local s = string.rep("a", at - 1) .. string.char(b) .. string.rep("z", 17 - at)
                local text = assert(core.json_encode(s))
                assert.equal(s, cjson.decode(text), ("byte %d at %d"):format(b, at))
                if b < 0x20 then -- a control character never appears as it is
                    assert.is_nil(text:find(string.char(b), 1, true), ("byte %d at %d"):format(b, at))
                end
            end
        end
        for _, s in ipairs({ table.concat(parts), '"' .. string.rep("a", 300) .. "\\",
                             string.rep("plain text ", 200), "", "\0" }) do
            local text = assert(core.json_encode({ s = s, [s] = 1 }))
            local back = cjson.decode(text)
            assert.equal(s, back.s)
            assert.equal(1, back[s])
        end
    end)

    it("refuses what JSON cannot hold with an invalid error", function()
        local cyclic = {}
        cyclic.self = cyclic
        for _, v in ipairs({ { f = print }, cyclic, { 0 / 0 }, { math.huge }, { [true] = 1 },
                             { co = coroutine.create(print) } }) do
            local text, err = core.json_encode(v)
            assert.is_nil(text)
            assert.equal("invalid", err.code)
        end
    end)

    it("stores a large integer in a jsonb parameter without rounding it", function()
        local db = assert(qx.connect{ url = support.db_url(), pool_size = 1 })
        local rows = assert(db:query("SELECT ($1::jsonb ->> 'n') AS n", { n = BIG }))
        assert.equal(BIG_TEXT, rows[1].n)
        db:close()
    end)

    -- the event store's rows (qx.store.event_store), as an example of a shape
    local EVENT_ROW = core.json_shape{ fields = { "type", "agg", "seq" }, item = "event",
                                       omit = { "aggregate_type", "aggregate_id" }, omit_prefix = "_" }
    local function json_event_rows(...) return core.json_rows(EVENT_ROW, ...) end

    it("writes rows of a shape: items less the keys left out, a counter counting up (the event store's append rows)",
       function()
        local e1 = { event_id = "a", amount = BIG, aggregate_type = "T", aggregate_id = "x", _scratch = 1,
                     [1] = "not a field", tags = { "p", "q" } }
        local e2 = { event_id = "b", note = 'say "hi"' }
        local text = json_event_rows("T", "x", 4, { e1, e2 })
        assert.matches('"amount":' .. BIG_TEXT, text)
        local rows = cjson.decode(text)
        rows[1].event.amount = nil -- decoded as a float; its text is checked above
        assert.same({ { type = "T", agg = "x", seq = 4, event = { event_id = "a", tags = { "p", "q" } } },
                      { type = "T", agg = "x", seq = 5, event = { event_id = "b", note = 'say "hi"' } } },
                    rows)
        -- several aggregates, as arguments or as one list; an aggregate without events adds no row
        local two = json_event_rows("T", "x", 1, { e2 }, "U", "y", 7, {}, "V", "z", 2, { e2 })
        assert.equal(two, json_event_rows({ "T", "x", 1, { e2 }, "U", "y", 7, {}, "V", "z", 2, { e2 } }))
        local types = {}
        for i, r in ipairs(cjson.decode(two)) do types[i] = r.type .. math.floor(r.seq) end
        assert.same({ "T1", "V2" }, types)
        assert.equal("[]", json_event_rows("T", "x", 1, {}))
    end)

    it("refuses an event row that JSON cannot hold with an invalid error", function()
        local text, e = json_event_rows("T", "x", 1, { { f = function() end } })
        assert.is_nil(text)
        assert.equal("invalid", e.code)
        assert.matches("function", e.message)
        assert.has_error(function() json_event_rows("T", "x", 1) end)
        assert.has_error(function() core.json_rows({ fields = { "n" }, item = "e" }, 1, {}) end)
        assert.has_error(function() core.json_shape{ item = "e" } end)
        assert.has_error(function() core.json_shape{ fields = { "n" } } end)
        assert.has_error(function() core.json_shape{ fields = { "n" }, item = "e", omit = { 1 } } end)
    end)

    it("writes rows of any shape: one field, no omissions", function()
        local shape = core.json_shape{ fields = { "n" }, item = "it" }
        local text = core.json_rows(shape, 10, { { a = 1, _b = 2 } })
        assert.same({ { n = 10, it = { a = 1, _b = 2 } } }, cjson.decode(text))
        assert.equal("[]", core.json_rows(shape))
    end)

    it("writes one object from a table itself: its named fields (absent: null), then the rest as the item", function()
        local shape = core.json_shape{ fields = { "id", "name", "gone" }, item = "rest",
                                       omit = { "id", "name", "gone", "skip" }, omit_prefix = "_" }
        local t = { id = "x1", name = "n", gone = core.null, a = 1, nested = { 1, { b = "c" } },
                    skip = true, _hidden = 2, [1] = "positional" }
        assert.same({ id = "x1", name = "n", gone = cjson.null,
                      rest = { a = 1, nested = { 1, { b = "c" } } } }, cjson.decode(core.json_object(shape, t)))
        assert.same({ id = cjson.null, name = cjson.null, gone = cjson.null, rest = {} },
                    cjson.decode(core.json_object(shape, {})))
        local text, e = core.json_object(shape, { a = { [false] = 1 } })
        assert.is_nil(text)
        assert.equal("invalid", e.code)
        assert.has_error(function() core.json_object({}, {}) end)
        assert.has_error(function() core.json_object(shape, "not a table") end)
    end)
end)

describe("json numbers and depth", function()
    local values = require "json_values"

    it("writes integral floats so that they read back as floats", function()
        if math.type then
            assert.equal("[150.0,-0.0,0.0,1000000000000000.0,-2.5,1e+300,100]",
                         core.json_encode({ 150.0, -0.0, 0.0, 1e15, -2.5, 1e300, 100 }))
        else -- LuaJIT: every number is a double; integral ones are written as integers
            assert.equal("[150,0,1000000000000000,-2.5,1e+300]",
                         core.json_encode({ 150.0, 0.0, 1e15, -2.5, 1e300 }))
        end
    end)

    it("reads back what it writes: integers as integers, floats as floats", function()
        local text = assert(core.json_encode(values.numbers()))
        values.assert_same(values.numbers(), assert(core.json_decode(text)))
        if math.type then
            local negz = core.json_decode("-0.0")
            assert.equal("float", math.type(negz))
            assert.equal(-math.huge, 1 / negz)
        end
    end)

    it("reads integers beyond 64 bits as floats, never as an error", function()
        local t = assert(core.json_decode('[18446744073709551616,-9223372036854775809,'
            .. '9223372036854775807,-9223372036854775808,1e2,123456789012345678901234567890]'))
        assert.equal(2 ^ 64, t[1])
        assert.equal(-2 ^ 63, t[2])
        assert.equal(1.2345678901234568e29, t[6])
        assert.equal(100, t[5])
        if math.type then
            assert.same({ "float", "float", "integer", "integer", "float", "float" },
                        { math.type(t[1]), math.type(t[2]), math.type(t[3]), math.type(t[4]),
                          math.type(t[5]), math.type(t[6]) })
            assert.equal(math.maxinteger, t[3])
            assert.equal(math.mininteger, t[4])
        end
    end)

    it("reads strings, escapes, null and the shapes lua-cjson gives", function()
        local t = assert(core.json_decode(
            ' { "a" : [ 1 , "x\\n\\"\\\\\\/\\u00e9\\ud83d\\ude00\\u0000" , true , false , null ] , "" : {} ,'
            .. ' "e" : [ ] } '))
        assert.same({ a = { 1, 'x\n"\\/é😀\0', true, false, core.null }, [""] = {}, e = {} }, t)
        assert.equal(core.null, t.a[5])
        assert.equal("é", core.json_decode('"é"'))
        for _, s in ipairs({ 0, "x", true }) do
            assert.equal(s, core.json_decode(cjson.encode(s)))
        end
    end)

    it("refuses text that is not JSON with an invalid error", function()
        for _, bad in ipairs({ "", "[1,]", "{\"a\"}", "[1] x", "01", "1.", ".5", "-", "+1", "\"\\x\"",
                               "\"\\ud800\"", "[\"a\nb\"]", "tru", "nan", "{1:2}", "[", "\"abc", "\"",
                               "\"\\", "\"\\u12" }) do
            local v, e = core.json_decode(bad)
            assert.is_nil(v, bad)
            assert.equal("invalid", e.code, bad)
        end
    end)

    it("reads every prefix of a document as a value or refuses it with invalid (under ASan: no byte past the end)",
       function()
        local doc = assert(core.json_encode({ a = { 1, -2.5, 1e300, 'x\n"\\é', true, false, core.null, {} },
                                              k = { z = { y = 12345678901234 } } }))
            .. ' ["\\ud83d\\ude00\\u00e9\\/", -0.0, 0.5e-3, 18446744073709551616, 1E+2, 0e0]'
        for i = 0, #doc do
            local v, e = core.json_decode(doc:sub(1, i))
            assert.is_true(v ~= nil or e.code == "invalid", doc:sub(1, i))
        end
    end)

    it("writes and reads up to 1000 levels and refuses more with invalid naming the limit", function()
        local ok = assert(core.json_encode(values.nest(1000)))
        assert.equal(1000, values.depth(assert(core.json_decode(ok))))
        local text, e = core.json_encode(values.nest(1001))
        assert.is_nil(text)
        assert.equal("invalid", e.code)
        assert.matches("1000 levels", e.message)
        local v, de = core.json_decode(string.rep("[", 1001) .. string.rep("]", 1001))
        assert.is_nil(v)
        assert.equal("invalid", de.code)
        assert.matches("1000 levels", de.message)
    end)
end)

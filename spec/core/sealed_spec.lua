-- The core of opening sealed personal fields (the format is lua/qx/store/personal.lua's): key
-- objects, finding the sealed values of records, opening them, and opening them as the rows of
-- a batch are decoded; and the strict base64url decoder under them.
local core = require "qx.core"

local URL = assert(os.getenv("QX_DB__URL"), "QX_DB__URL is not set: source the servers' env file")
local P = "qx:sealed:1:"
local HEAD = "qx.personal.1\n"
local FORGOTTEN = setmetatable({}, { __tostring = function() return "forgotten" end })

local KEY = ("k"):rep(32)
local S1 = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
local S2 = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c"

-- a value sealed the way qx records it: prefix, subject, base64url of the sealed JSON text
local function seal(key, subject, event_id, field, json)
    return P .. subject .. ":" .. core.aead_seal_b64(key, HEAD .. event_id .. "\n" .. field, json)
end

describe("core.aead_key", function()
    it("opens what aead_seal sealed under the same key and AAD, many times over", function()
        local k = core.aead_key(KEY)
        for i = 1, 50 do
            local sealed = core.aead_seal(KEY, "aad" .. i, "value " .. i)
            assert.equal("value " .. i, k:open("aad" .. i, sealed))
        end
        assert.equal("", k:open("a", core.aead_seal(KEY, "a", "")))
    end)

    it("refuses another key, another AAD or a changed byte, and still opens after a refusal", function()
        local k = core.aead_key(KEY)
        local sealed = core.aead_seal(KEY, "aad", "secret")
        local other = core.aead_key(("o"):rep(32))
        local _, e = other:open("aad", sealed)
        assert.equal("invalid", e.code)
        _, e = k:open("aaD", sealed)
        assert.equal("invalid", e.code)
        for i = 1, #sealed do
            local b = sealed:byte(i)
            local changed = sealed:sub(1, i - 1) .. string.char((b + 1) % 256) .. sealed:sub(i + 1)
            local r, ce = k:open("aad", changed)
            assert.is_nil(r, "byte " .. i)
            assert.equal("invalid", ce.code)
        end
        _, e = k:open("aad", sealed:sub(1, 27))
        assert.equal("invalid", e.code)
        assert.equal("secret", k:open("aad", sealed))
    end)

    it("refuses to open once closed (a to-be-closed variable), and says so", function()
        local k = core.aead_key(KEY)
        getmetatable(k).__close(k)
        assert.error_matches(function() k:open("aad", core.aead_seal(KEY, "aad", "x")) end, "closed")
        assert.matches("closed", tostring(k))
        local t = { { f = seal(KEY, S1, "e", "f", '"x"'), event_id = "e" } }
        local _, found = core.sealed_find(t, P)
        assert.has_error(function()
            core.open_sealed(t, found, nil, { [S1] = k }, FORGOTTEN, HEAD, P)
        end)
    end)

    it("raises on a key that is not 32 bytes", function()
        assert.has_error(function() core.aead_key(("k"):rep(31)) end)
        assert.has_error(function() core.aead_key(nil) end)
    end)
end)

describe("core.sealed_find", function()
    it("gives the subjects and where the sealed values are; nil when none is", function()
        local t = {
            { event_id = "e1", email = seal(KEY, S1, "e1", "email", '"a"'), plan = "pro" },
            { event_id = "e2", plan = "free" },
            { event_id = "e3", name = seal(KEY, S2, "e3", "name", '"b"'),
              email = seal(KEY, S1, "e3", "email", '"c"') },
        }
        local subjects, found = core.sealed_find(t, P)
        table.sort(subjects)
        assert.same({ S1, S2 }, subjects)
        assert.equal(6, #found)
        local at = {}
        for j = 1, #found, 2 do at[#at + 1] = found[j] .. "." .. found[j + 1] end
        table.sort(at)
        assert.same({ "1.email", "3.email", "3.name" }, at)
        assert.is_nil(core.sealed_find({ { a = "plain", n = 1 }, {} }, P))
        assert.is_nil(core.sealed_find({}, P))
    end)

    it("says which value is malformed: no subject id, or no ':' after it", function()
        for _, bad in ipairs({ P, P .. "garbage", P .. S1, P .. S1 .. "x", P .. S1:upper():sub(2) .. "0:x",
                               P .. S1:sub(1, 35) .. "g:x" }) do
            local ok, i, k = core.sealed_find({ { a = "x" }, { event_id = "e", f = bad } }, P)
            assert.is_false(ok, bad)
            assert.equal(2, i)
            assert.equal("f", k)
        end
        assert.is_not_nil((core.sealed_find({ { f = P .. S1:upper() .. ":x" } }, P)))
    end)

    it("raises on a list with something other than tables", function()
        assert.has_error(function() core.sealed_find({ "x" }, P) end)
        assert.has_error(function() core.sealed_find(nil, P) end)
    end)
end)

describe("core.open_sealed", function()
    local function records()
        return {
            { event_id = "e1", email = seal(KEY, S1, "e1", "email", '"a@b.c"'), n = 1 },
            { event_id = "e2", age = seal(KEY, S1, "e2", "age", "42"),
              name = seal(KEY, S2, "e2", "name", '{"first":"Ada"}') },
        }
    end

    local function open(t, keys, ids)
        local _, found = core.sealed_find(t, P)
        return core.open_sealed(t, found, ids, keys, FORGOTTEN, HEAD, P)
    end

    it("opens each value in place, with its type, and forgotten subjects' values as forgotten", function()
        local t = records()
        assert.is_true(open(t, { [S1] = core.aead_key(KEY), [S2] = false }))
        assert.equal("a@b.c", t[1].email)
        assert.equal(42, t[2].age)
        if math.type then assert.equal("integer", math.type(t[2].age)) end
        assert.equal(FORGOTTEN, t[2].name)
        assert.equal(1, t[1].n)
    end)

    it("binds each value to its event id (ids given, or the table's event_id) and field", function()
        local t = records()
        assert.is_true(open(t, { [S1] = core.aead_key(KEY), [S2] = core.aead_key(KEY) },
                            { "e1", "e2" }))
        assert.same({ first = "Ada" }, t[2].name)
        t = records()
        local ok, why = open(t, { [S1] = core.aead_key(KEY), [S2] = core.aead_key(KEY) },
                             { "e1", "other" })
        assert.is_nil(ok)
        assert.matches("of event other does not open", why)
        t = records()
        t[1].email, t[2].age = t[2].age, t[1].email
        ok, why = open(t, { [S1] = core.aead_key(KEY), [S2] = core.aead_key(KEY) })
        assert.is_nil(ok)
        assert.matches("does not open", why)
    end)

    it("stops at a value without a key, under another key, or not JSON, naming it", function()
        local ok, why = open(records(), { [S1] = core.aead_key(KEY) })
        assert.is_nil(ok)
        assert.equal("field 'name' of event e2: no key for data subject " .. S2, why)
        ok, why = open(records(), { [S1] = core.aead_key(("x"):rep(32)), [S2] = core.aead_key(KEY) })
        assert.is_nil(ok)
        assert.matches("^field '%w+' of event e%d does not open: ", why)
        local t = { { event_id = "e9", f = seal(KEY, S1, "e9", "f", "{not json") } }
        ok, why = open(t, { [S1] = core.aead_key(KEY) })
        assert.is_nil(ok)
        assert.matches("^field 'f' of event e9: not JSON", why)
    end)

    it("raises when keys maps a subject to something other than a key object or false", function()
        assert.has_error(function() open(records(), { [S1] = KEY, [S2] = false }) end)
        assert.has_error(function() open(records(), { [S1] = true, [S2] = false }) end)
    end)
end)

describe("conn:batch with open_sealed", function()
    local pool, conn

    setup(function()
        pool = assert(core.pool{ conninfo = URL, size = 1 })
        conn = assert(pool:acquire())
    end)

    teardown(function()
        conn:release()
        pool:close()
    end)

    local function spec(keys)
        return { keys = keys, forgotten = FORGOTTEN, prefix = P, aad_head = HEAD, column = "payload",
                 id_column = "row_id" }
    end

    -- rows of (row_id, payload) from a list of { id, payload table }
    local function read(items, open)
        local st = { [[
SELECT r->>0 AS row_id, r->1 AS payload FROM jsonb_array_elements($1::jsonb) r]], items }
        st.open_sealed = open
        local results = assert(conn:batch({ st }))
        return results[1].rows, results[1].sealed
    end

    it("opens the sealed members as the rows are read: values, types, forgotten", function()
        local items = {
            { "e1", { email = seal(KEY, S1, "e1", "email", '"a@b.c"'), plan = "pro",
                      age = seal(KEY, S1, "e1", "age", "36") } },
            { core.null, { event_id = "e2", name = seal(KEY, S2, "e2", "name", '["x",1]') } },
        }
        local rows, sealed = read(items, spec({ [S1] = core.aead_key(KEY), [S2] = false }))
        assert.is_true(sealed)
        assert.equal("a@b.c", rows[1].payload.email)
        assert.equal(36, rows[1].payload.age)
        if math.type then assert.equal("integer", math.type(rows[1].payload.age)) end
        assert.equal("pro", rows[1].payload.plan)
        assert.equal(FORGOTTEN, rows[2].payload.name)
        rows, sealed = read(items, spec({ [S1] = core.aead_key(KEY), [S2] = core.aead_key(KEY) }))
        assert.is_true(sealed)
        assert.same({ "x", 1 }, rows[2].payload.name) -- its id from its member event_id
    end)

    it("leaves what it cannot open as its text, noting where: no key, no id, does not open", function()
        local items = {
            { "e1", { email = seal(KEY, S1, "e1", "email", '"a"') } },
            { "e2", { name = seal(KEY, S2, "e2", "name", '"b"') } },
            { core.null, { name = seal(KEY, S1, "e3", "name", '"c"') } },
            { "e4", { email = seal(KEY, S1, "other", "email", '"d"') } },
        }
        local rows, sealed = read(items, spec({ [S1] = core.aead_key(KEY) }))
        assert.equal("a", rows[1].payload.email)
        assert.equal(items[2][2].name, rows[2].payload.name)
        assert.equal(items[3][2].name, rows[3].payload.name)
        assert.equal(items[4][2].email, rows[4].payload.email)
        assert.same({ 2, "name", 3, "name", 4, "email" }, sealed.found)
        table.sort(sealed.subjects)
        assert.same({ S1, S2 }, sealed.subjects)
    end)

    it("leaves the sealed members of an object beyond the 32 it holds at once, noted", function()
        local payload = {}
        for i = 1, 40 do payload["f" .. i] = seal(KEY, S1, "e1", "f" .. i, tostring(i)) end
        local rows, sealed = read({ { "e1", payload } }, spec({ [S1] = core.aead_key(KEY) }))
        local opened, left = 0, {}
        for i = 1, 40 do
            local v = rows[1].payload["f" .. i]
            if v == i then opened = opened + 1 else assert.equal(payload["f" .. i], v) end
        end
        for j = 1, #sealed.found, 2 do
            assert.equal(1, sealed.found[j])
            left[#left + 1] = sealed.found[j + 1]
        end
        assert.equal(32, opened)
        assert.equal(8, #left)
        assert.same({ S1 }, sealed.subjects)
    end)

    it("asks for a scan when a sealed-looking value is malformed or escaped", function()
        for _, v in ipairs({ P .. "garbage", P .. S1 .. ":ab\"cd", P .. S1 .. ":ab\\cd" }) do
            local rows, sealed = read({ { "e1", { f = v, g = "plain" } } },
                                      spec({ [S1] = core.aead_key(KEY) }))
            assert.is_false(sealed, v)
            assert.equal(v, rows[1].payload.f)
        end
    end)

    it("opens nothing without the named columns, and reads as a plain batch", function()
        local st = { "SELECT 'e1' AS id, $1::jsonb AS payload",
                     { email = seal(KEY, S1, "e1", "email", '"a"') } }
        st.open_sealed = spec({ [S1] = core.aead_key(KEY) })
        local results = assert(conn:batch({ st }))
        assert.is_nil(results[1].sealed)
        assert.equal(P, results[1].rows[1].payload.email:sub(1, #P))
    end)

    it("only opens members of the top-level object", function()
        local inner = seal(KEY, S1, "e1", "deep", '"x"')
        local rows, sealed = read({ { "e1", { deep = { inner = inner }, list = { inner } } } },
                                  spec({ [S1] = core.aead_key(KEY) }))
        assert.is_true(sealed)
        assert.equal(inner, rows[1].payload.deep.inner)
        assert.equal(inner, rows[1].payload.list[1])
    end)

    it("raises on a malformed spec", function()
        for _, bad in ipairs({
            { keys = {}, forgotten = FORGOTTEN, prefix = P, aad_head = HEAD, column = "payload" },
            { keys = "x", forgotten = FORGOTTEN, prefix = P, aad_head = HEAD, column = "payload",
              id_column = "row_id" },
            { keys = {}, forgotten = FORGOTTEN, prefix = "", aad_head = HEAD, column = "payload",
              id_column = "row_id" },
            { keys = {}, prefix = P, aad_head = HEAD, column = "payload", id_column = "row_id" },
            "spec",
        }) do
            assert.has_error(function() read({ { "e1", { a = 1 } } }, bad) end)
        end
    end)
end)

describe("core.b64url_decode", function()
    local ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

    it("round-trips every length and byte", function()
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local all = table.concat(bytes)
        for n = 0, 70 do
            local s = all:sub(1 + n, n + n)
            assert.equal(s, core.b64url_decode(core.b64url_encode(s)))
        end
    end)

    it("refuses a byte outside the alphabet at any place of a group or the tail", function()
        local good = core.b64url_encode("0123456789a") -- 15 characters: 3 groups and a tail of 3
        for i = 1, #good do
            for _, c in ipairs({ "=", "+", "/", " ", "\0", "\255", "." }) do
                local bad = good:sub(1, i - 1) .. c .. good:sub(i + 1)
                local r, e = core.b64url_decode(bad)
                assert.is_nil(r, ("%q"):format(bad))
                assert.equal("invalid", e.code)
            end
        end
    end)

    it("refuses a tail whose unused bits are set, and an impossible length", function()
        for i = 1, #ALPHA do
            local c = ALPHA:sub(i, i)
            local v = i - 1
            assert.equal(v % 16 == 0, core.b64url_decode("A" .. c) ~= nil, "A" .. c)
            assert.equal(v % 4 == 0, core.b64url_decode("AA" .. c) ~= nil, "AA" .. c)
        end
        for _, bad in ipairs({ "A", "AAAAA", "AAAAAAAAA" }) do
            assert.is_nil(core.b64url_decode(bad))
        end
    end)
end)

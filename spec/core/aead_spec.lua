-- core.aead_seal / core.aead_open (AES-256-GCM) and core.random_bytes: the sealing that
-- personal fields are stored under (docs/erasure.md).
local core = require "qx.core"

local function unhex(s)
    return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
end

describe("core.aead_open", function()
    it("opens the AES-256-GCM test vector of the GCM specification (test case 16)", function()
        local key = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
        local sealed = unhex("cafebabefacedbaddecaf888"
            .. "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
            .. "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
            .. "76fc6ece0f4e1768cddf8853bb2d551b")
        local aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
        local plain = assert(core.aead_open(key, aad, sealed))
        assert.equal(unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
            .. "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"), plain)
    end)

    it("refuses a sealed value under another key, another aad, or with any byte changed", function()
        local key, other = core.random_bytes(32), core.random_bytes(32)
        local sealed = core.aead_seal(key, "ev1\0email", '"ada@example.org"')
        assert.equal('"ada@example.org"', core.aead_open(key, "ev1\0email", sealed))
        local _, e = core.aead_open(other, "ev1\0email", sealed)
        assert.equal("invalid", e.code)
        _, e = core.aead_open(key, "ev1\0name", sealed)
        assert.equal("invalid", e.code)
        for i = 1, #sealed do
            local b = sealed:byte(i)
            local altered = sealed:sub(1, i - 1) .. string.char((b + 1) % 256) .. sealed:sub(i + 1)
            local v, err = core.aead_open(key, "ev1\0email", altered)
            assert.is_nil(v, "byte " .. i)
            assert.equal("invalid", err.code)
        end
        _, e = core.aead_open(key, "ev1\0email", sealed:sub(1, 27))
        assert.equal("invalid", e.code)
        assert.matches("too short", e.message)
    end)
end)

describe("core.aead_seal", function()
    it("adds 28 bytes and a fresh nonce each time, also for an empty value", function()
        local key = core.random_bytes(32)
        local a, b = core.aead_seal(key, "", "x"), core.aead_seal(key, "", "x")
        assert.equal(29, #a)
        assert.not_equal(a, b)
        assert.equal(28, #core.aead_seal(key, "", ""))
        assert.equal("", core.aead_open(key, "", core.aead_seal(key, "", "")))
        local big = ("v"):rep(100000)
        assert.equal(big, core.aead_open(key, "aad", core.aead_seal(key, "aad", big)))
    end)

    it("raises on a key that is not 32 bytes", function()
        assert.error_matches(function() core.aead_seal("short", "", "x") end, "32 bytes")
        assert.error_matches(function() core.aead_open(("k"):rep(33), "", ("x"):rep(40)) end,
                             "32 bytes")
    end)
end)

describe("core.aead_seal_b64", function()
    it("is aead_seal through base64url, and a key object opens what it seals", function()
        local key = core.random_bytes(32)
        local text = core.aead_seal_b64(key, "aad", '{"a":1}')
        assert.is_nil(text:find("[^%w_-]"))
        local sealed = assert(core.b64url_decode(text))
        assert.equal('{"a":1}', core.aead_open(key, "aad", sealed))
        local k = core.aead_key(key)
        assert.equal('{"a":1}', k:open("aad", sealed))
        local _, e = k:open("other", sealed)
        assert.equal("invalid", e.code)
        _, e = core.b64url_decode(text .. "=")
        assert.equal("invalid", e.code)
        _, e = k:open("aad", "")
        assert.equal("invalid", e.code)
        assert.not_equal(text, core.aead_seal_b64(key, "aad", '{"a":1}')) -- a fresh nonce
    end)
end)

describe("core.random_bytes", function()
    it("gives n bytes, different each call, and raises outside 1..1024", function()
        assert.equal(32, #core.random_bytes(32))
        assert.not_equal(core.random_bytes(16), core.random_bytes(16))
        assert.error_matches(function() core.random_bytes(0) end, "1 to 1024")
        assert.error_matches(function() core.random_bytes(1025) end, "1 to 1024")
    end)
end)

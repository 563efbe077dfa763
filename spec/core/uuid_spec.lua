-- qx.uuid(): UUID v7 (RFC 9562) from the OS random source, time-ordered within a process.
local qx = require "qx"
local support = require "support"

describe("qx.uuid", function()
    local function ms_of(id)
        local hex = id:gsub("-", "")
        return tonumber(hex:sub(1, 12), 16)
    end

    it("has the 8-4-4-4-12 lower-case form with version 7 and the RFC variant", function()
        for _ = 1, 1000 do
            local id = qx.uuid()
            assert.equal(36, #id)
            assert.truthy(id:match("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-7%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"), id)
            assert.is_nil(id:find("[A-F]"))
        end
    end)

    it("carries the current Unix time in milliseconds", function()
        -- in a process of its own: this one's generator has made ids before, and when the
        -- clock steps back it keeps the last millisecond (order first), as a VM's clock may
        local out = support.collect(support.spawn([[
local before = os.time()
local id = require("qx").uuid()
print(id, before, os.time())
]]))
        local id, before, after = out:match("^(%S+)%s+(%d+)%s+(%d+)")
        assert.truthy(id, out)
        local ms = ms_of(id)
        before, after = tonumber(before), tonumber(after)
        assert.is_true(ms >= (before - 1) * 1000 and ms <= (after + 1) * 1000, "ms " .. ms)
    end)

    it("sorts in creation order, also many within one millisecond", function()
        local prev = qx.uuid()
        local same_ms = 0
        for _ = 1, 100000 do
            local id = qx.uuid()
            if id <= prev then error(prev .. " then " .. id) end
            if id:sub(1, 13) == prev:sub(1, 13) then same_ms = same_ms + 1 end -- same 48-bit time
            prev = id
        end
        assert.is_true(same_ms > 1000, "ids in a shared millisecond: " .. same_ms)
    end)

    it("never repeats #slow", function()
        local seen = {}
        for i = 1, 200000 do
            local id = qx.uuid()
            if seen[id] then error("repeated after " .. i) end -- plain checks: luassert is slow in loops
            seen[id] = true
        end
    end)

    it("has random bits that differ between ids of one millisecond", function()
        local tails = {}
        for i = 1, 1000 do tails[i] = qx.uuid():sub(20) end -- variant + 62 random bits
        local distinct = {}
        for _, t in ipairs(tails) do distinct[t] = true end
        local n = 0
        for _ in pairs(distinct) do n = n + 1 end
        assert.equal(1000, n)
    end)

    it("gives a forked child random bits of its own, not the ones its parent drew ahead", function()
        -- spec/uuid_fork.c: one id in the parent, a fork, then 20 ids in each process at once
        local exe = os.tmpname()
        local cc = os.getenv("CC") or "cc"
        assert(os.execute(cc .. " -std=gnu11 -Isrc/core spec/uuid_fork.c src/core/uuid.c "
                          .. "src/core/error.c -lpthread -o " .. exe))
        local p = assert(io.popen(exe))
        local out = p:read("a")
        local ok = p:close()
        os.remove(exe)
        assert.is_true(ok)
        local tails, n = {}, 0
        for id in out:gmatch("[^\n]+") do
            assert.is_true(qx.is_uuid(id), id)
            assert.is_nil(tails[id:sub(20)], id) -- variant + 62 random bits, in either process
            tails[id:sub(20)] = true
            n = n + 1
        end
        assert.equal(40, n)
    end)

    it("is_uuid takes the 8-4-4-4-12 hex form in either case and refuses any other text", function()
        local good = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        assert.is_true(qx.is_uuid(good))
        assert.is_true(qx.is_uuid(good:upper()))
        assert.is_true(qx.is_uuid("ABCDEF01-2345-6789-abcd-ef0123456789"))
        for i = 1, 36 do
            local dash = i == 9 or i == 14 or i == 19 or i == 24
            local subs = dash and { "0", "a", "_", " " }
                              or { "-", "g", "G", "/", ":", "@", "`", "\0", "\255" }
            for _, c in ipairs(subs) do
                local bad = good:sub(1, i - 1) .. c .. good:sub(i + 1)
                assert.is_false(qx.is_uuid(bad), ("%q"):format(bad))
            end
        end
        for _, bad in ipairs{ "", good:sub(2), good .. "0", good:gsub("-", ""), "{" .. good .. "}",
                              " " .. good:sub(2) } do
            assert.is_false(qx.is_uuid(bad), ("%q"):format(bad))
        end
        assert.is_false(qx.is_uuid(nil))
        assert.is_false(qx.is_uuid(12))
    end)

    it("sorts the same way in PostgreSQL", function()
        local url = os.getenv("QX_DB__URL")
        if not url then pending("needs QX_DB__URL") return end
        local db = assert(qx.connect{ url = url, pool_size = 1 })
        local ids = {}
        for i = 1, 2000 do ids[i] = qx.uuid() end
        local rows = assert(db:query([[
SELECT bool_and(a < b) AS ordered, count(*) AS pairs FROM (
  SELECT u::uuid AS a, lead(u::uuid) OVER (ORDER BY ord) AS b
  FROM jsonb_array_elements_text($1::jsonb) WITH ORDINALITY AS t(u, ord)) AS x
WHERE b IS NOT NULL]], ids))
        assert.is_true(rows[1].ordered)
        assert.equal(1999, rows[1].pairs)
        db:close()
    end)
end)

describe("qx.is_uuid", function()
    it("accepts the textual form in either case", function()
        assert.is_true(qx.is_uuid(qx.uuid()))
        assert.is_true(qx.is_uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"))
    end)

    it("refuses anything else", function()
        for _, bad in ipairs({ "", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
                               "a0eebc999c0b4ef8bb6d6bb9bd380a11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
                               "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99_9c0b_4ef8_bb6d_6bb9bd380a11",
                               "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1\0" }) do
            assert.is_false(qx.is_uuid(bad), bad)
        end
        assert.is_false(qx.is_uuid(nil))
        assert.is_false(qx.is_uuid(12345))
        assert.is_false(qx.is_uuid({}))
    end)
end)

-- Keyset pages and their signed cursors: correct order with mixed directions, NULLs and ties;
-- tampered, truncated, forged and foreign cursors refused; no key, no cursors. Also the signing
-- primitives of the binding (HMAC-SHA256 test vectors, strict base64url).
local qx = require "qx"
local core = require "qx.core"
local H = require "repository_support"

local function hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

describe("signing primitives", function()
    it("compute HMAC-SHA256 as RFC 4231 says", function()
        assert.equal("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
                     hex(core.hmac_sha256(string.rep("\11", 20), "Hi There")))
        assert.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                     hex(core.hmac_sha256("Jefe", "what do ya want for nothing?")))
        -- a key longer than the block size is hashed first
        assert.equal("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
                     hex(core.hmac_sha256(string.rep("\170", 131),
                                          "Test Using Larger Than Block-Size Key - Hash Key First")))
    end)

    it("give each key and message its own MAC when keys alternate and messages repeat", function()
        -- the keyed state is kept between calls: a new key replaces it, the same key reuses it
        local jefe = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        local empty = "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad"
        for _ = 1, 3 do
            assert.equal(jefe, hex(core.hmac_sha256("Jefe", "what do ya want for nothing?")))
            assert.equal(jefe, hex(core.hmac_sha256("Jefe", "what do ya want for nothing?")))
            assert.equal(empty, hex(core.hmac_sha256("", "")))
            assert.are_not.equal(jefe, hex(core.hmac_sha256("Jeff", "what do ya want for nothing?")))
        end
    end)

    describe("cursor tokens", function()
        local KEY, OTHER = "cursor-key-0123456789", "other-key-0123456789"
        local CTX = "users\n\nemail:a\ntenant_id = $1"
        -- a token of any frame, signed as the core signs one
        local function signed(frame, key, ctx)
            local body = core.b64url_encode(frame)
            return body .. "." .. core.b64url_encode(core.hmac_sha256(key or KEY,
                "qx.cursor.v2\n" .. (ctx or CTX) .. "\n" .. body))
        end

        it("round-trip strings and nulls, and open with any of the keys listed", function()
            local values = { "a", "", "user@example.com", "\0\1\255", string.rep("x", 300) }
            local token = core.cursor_seal(KEY, CTX, values, #values)
            assert.same(values, core.cursor_open({ KEY }, CTX, token, #values))
            assert.same(values, core.cursor_open({ OTHER, KEY }, CTX, token, #values))
            local nulls = core.cursor_seal(KEY, CTX, { core.null, nil, "b" }, 3)
            assert.same({ core.null, core.null, "b" }, core.cursor_open({ KEY }, CTX, nulls, 3))
            assert.same({}, core.cursor_open({ KEY }, CTX, core.cursor_seal(KEY, CTX, {}, 0), 0))
            -- the token is the frame signed with the domain and the context
            assert.equal(signed("\1\0\0\0\1a"), core.cursor_seal(KEY, CTX, { "a" }, 1))
        end)

        it("refuse another context, another key, an edited frame or signature, and junk", function()
            local token = core.cursor_seal(KEY, CTX, { "a", "b" }, 2)
            local function why(t, keys, ctx, n)
                local v, reason = core.cursor_open(keys or { KEY }, ctx or CTX, t, n or 2)
                assert.is_nil(v)
                return reason
            end
            assert.matches("signature does not match", why(token, nil, CTX .. "x"))
            assert.matches("signature does not match", why(token, { OTHER }))
            local body, sig = token:match("^(.-)%.(.*)$")
            -- another frame under this token's signature
            assert.matches("signature does not match",
                           why(core.b64url_encode("\1\0\0\0\1a\1\0\0\0\1c") .. "." .. sig))
            assert.matches("signature does not match",
                           why(body .. "." .. (sig:sub(1, 1) == "A" and "B" or "A") .. sig:sub(2)))
            assert.equal("malformed signature", why(body .. "." .. sig:sub(2)))
            assert.equal("malformed signature", why(body .. "." .. sig .. "A"))
            assert.equal("malformed signature", why(body .. ".*" .. sig:sub(2)))
            assert.equal("malformed", why(body))
            assert.equal("malformed", why(""))
            assert.equal("too long", why(string.rep("A", 5000) .. "." .. sig))
        end)

        it("refuse a signed frame that does not hold the values asked for", function()
            local function fits(frame, n)
                local v, reason = core.cursor_open({ KEY }, CTX, signed(frame), n)
                if v then return v end
                assert.equal("does not fit this listing", reason)
                return nil
            end
            assert.same({ "a" }, fits("\1\0\0\0\1a", 1))
            assert.is_nil(fits("\1\0\0\0\1a", 2))            -- fewer values
            assert.is_nil(fits("\1\0\0\0\1a\0", 1))          -- more
            assert.is_nil(fits("\2\0\0\0\1a", 1))            -- unknown tag
            assert.is_nil(fits("\1\0\0\0\2a", 1))            -- length past the end
            assert.is_nil(fits("\1\255\255\255\255a", 1))    -- a huge length
            assert.is_nil(fits("\1\0\0", 1))                 -- a cut length
            assert.is_nil(fits("", 1))
            assert.same({}, fits("", 0))
        end)

        it("raise on arguments that are not a cursor's", function()
            assert.has_error(function() core.cursor_seal(KEY, CTX, { 1 }, 1) end)
            assert.has_error(function() core.cursor_seal(KEY, CTX, { {} }, 1) end)
            assert.has_error(function() core.cursor_seal(KEY, CTX, {}, 65) end)
            assert.has_error(function() core.cursor_seal(KEY, CTX, {}, -1) end)
            local token = core.cursor_seal(KEY, CTX, { "a" }, 1)
            assert.has_error(function() core.cursor_open({}, CTX, token, 1) end)
            assert.has_error(function() core.cursor_open({ 1 }, CTX, token, 1) end)
            local many = {}
            for i = 1, 17 do many[i] = KEY end
            assert.has_error(function() core.cursor_open(many, CTX, token, 1) end)
            assert.has_error(function() core.cursor_open({ KEY }, CTX, token, 65) end)
        end)
    end)

    it("round-trip base64url without padding and refuse anything but the canonical form", function()
        for _, s in ipairs({ "", "f", "fo", "foo", "foob", "fooba", "foobar", "\0\255\254\1" }) do
            local enc = core.b64url_encode(s)
            assert.is_nil(enc:find("[=+/]"))
            assert.equal(s, core.b64url_decode(enc))
        end
        assert.equal("Zm9vYmE", core.b64url_encode("fooba"))
        assert.equal("-_8", core.b64url_encode("\251\255"))
        for _, bad in ipairs({ "Zm9vYmE=", "Zm9v YmE", "Zm9vY", "Zm9vYh", "Zm+v", "Zm/v", "é" }) do
            local r, e = core.b64url_decode(bad)
            assert.is_nil(r, bad)
            assert.equal("invalid", e.code)
        end
    end)

    it("compare in constant time, and strings of other lengths are unequal", function()
        assert.is_true(core.equal_consttime("abc", "abc"))
        assert.is_false(core.equal_consttime("abc", "abd"))
        assert.is_false(core.equal_consttime("abc", "abcd"))
        assert.is_true(core.equal_consttime("", ""))
    end)
end)

describe("keyset pages", function()
    local db, tbl, users, T

    setup(function()
        db = H.db()
        tbl = H.users_table(db)
        users = H.users(tbl, { max_page_size = 50 })
        T = qx.uuid()
        -- 37 rows: scores with many ties and NULLs, names with ties and NULLs
        H.seed(db, users, T, 37, function(i)
            return { email = ("k%02d@example.com"):format(i),
                     name = (i % 5 == 0) and nil or ("n" .. (i % 4)),
                     score = (i % 7 == 0) and nil or (i % 3) }
        end)
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function walk(repo, opts, limit)
        local got, cursor, pages = {}, nil, 0
        repeat
            local o = { limit = limit, after = cursor }
            for k, v in pairs(opts) do o[k] = v end
            local p = assert(repo:page(o))
            pages = pages + 1
            assert.is_true(#p.items <= limit)
            for _, u in ipairs(p.items) do got[#got + 1] = u.id end
            assert.equal(p.next_cursor ~= nil, p.has_next)
            cursor = p.next_cursor
            assert(pages <= 100, "paging does not end")
        until not cursor
        return got, pages
    end

    local function expected(order_sql, where)
        local rows = assert(db:query("SELECT id::text AS id FROM " .. tbl .. " WHERE tenant_id = $1 "
            .. (where or "") .. " ORDER BY " .. order_sql, T))
        local out = {}
        for i, r in ipairs(rows) do out[i] = r.id end
        return out
    end

    it("never repeat or skip rows, with mixed directions, NULLs and ties", function()
        local cases = {
            { { "score" }, "score ASC NULLS LAST, id" },
            { { "-score" }, "score DESC NULLS FIRST, id" },
            { { "score", "-name" }, "score ASC NULLS LAST, name DESC NULLS FIRST, id" },
            { { "-name", "score" }, "name DESC NULLS FIRST, score ASC NULLS LAST, id" },
            { { "name", "-score", "-email" }, "name ASC NULLS LAST, score DESC NULLS FIRST, email DESC, id" },
            { { "-email" }, "email DESC, id" },
            { {}, "id" },
        }
        H.with(db, users, T, function(repo)
            for _, case in ipairs(cases) do
              for _, limit in ipairs({ 1, 4, 7, 50 }) do
                local got = walk(repo, { sort = case[1] }, limit)
                assert.same(expected(case[2]), got, case[2] .. " limit " .. limit)
              end
            end
            return true
        end)
    end)

    it("page with filters, and the last page says so", function()
        H.with(db, users, T, function(repo)
            local got, pages = walk(repo, { sort = { "-score" }, filters = {{ "name", "eq", "n1" }} }, 3)
            assert.same(expected("score DESC NULLS FIRST, id", "AND name = 'n1'"), got)
            assert.equal(math.ceil(#got / 3), pages)
            local one = assert(repo:page{ limit = 50 })
            assert.equal(37, #one.items)
            assert.is_false(one.has_next)
            assert.is_nil(one.next_cursor)
            return true
        end)
    end)

    describe("bad cursors", function()
        local cursor
        local function page(opts)
            return H.with(db, users, T, function(repo) return repo:page(opts) end)
        end

        before_each(function()
            cursor = assert(page{ limit = 5, sort = { "-score" } }).next_cursor
            assert.is_string(cursor)
        end)

        local function refused(opts, why)
            local r, e = page(opts)
            assert.is_nil(r, why)
            assert.equal("invalid", e.code, why)
            assert.matches("cursor", e.message, nil, true)
        end

        it("refuse an edited, truncated or garbage cursor", function()
            local body, sig = cursor:match("^(.-)%.(.*)$")
            local payload = core.b64url_decode(body)
            local last = payload:sub(-1)
            local edited = core.b64url_encode(payload:sub(1, -2) .. (last == "0" and "1" or "0")) .. "." .. sig
            assert.are_not.equal(cursor, edited)
            refused({ limit = 5, sort = { "-score" }, after = edited }, "edited payload")
            local flipped = cursor:sub(1, 3) .. (cursor:sub(4, 4) == "A" and "B" or "A") .. cursor:sub(5)
            refused({ limit = 5, sort = { "-score" }, after = flipped }, "one character changed")
            refused({ limit = 5, sort = { "-score" }, after = cursor:sub(1, -2) }, "truncated")
            refused({ limit = 5, sort = { "-score" }, after = cursor:sub(1, #cursor - 10) }, "truncated more")
            refused({ limit = 5, sort = { "-score" }, after = body }, "signature missing")
            refused({ limit = 5, sort = { "-score" }, after = "" }, "empty")
            refused({ limit = 5, sort = { "-score" }, after = "..." }, "dots")
            refused({ limit = 5, sort = { "-score" }, after = string.rep("A", 10000) }, "huge")
            refused({ limit = 5, sort = { "-score" }, after = 42 }, "not a string")
        end)

        it("refuse a cursor forged with another key", function()
            -- a well-formed frame of two values ("0" and a uuid), signed with a key not configured
            local id = qx.uuid()
            local body = core.b64url_encode("\1\0\0\0\1" .. "0" .. "\1\0\0\0\36" .. id)
            local forged = body .. "." .. core.b64url_encode(core.hmac_sha256("not-the-key-0123456", body))
            refused({ limit = 5, sort = { "-score" }, after = forged }, "forged")
        end)

        it("refuse a cursor from another listing: sort, filters, tenant or table", function()
            refused({ limit = 5, sort = { "score" }, after = cursor }, "other direction")
            refused({ limit = 5, sort = { "-score", "email" }, after = cursor }, "other keys")
            refused({ limit = 5, sort = { "-score" }, filters = {{ "name", "eq", "n1" }}, after = cursor },
                    "other filters")
            refused({ limit = 5, sort = { "-score" }, include_deleted = true, after = cursor },
                    "deleted rows included")
            local r, e = H.with(db, users, qx.uuid(), function(repo)
              return repo:page{ limit = 5, sort = { "-score" }, after = cursor }
            end)
            assert.is_nil(r)
            assert.equal("invalid", e.code, "other tenant")
            local twin = H.users(H.users_table(db))
            r, e = H.with(db, twin, T, function(repo)
              return repo:page{ limit = 5, sort = { "-score" }, after = cursor }
            end)
            assert.is_nil(r)
            assert.equal("invalid", e.code, "other table")
            -- while the right listing still accepts it, with another page size too
            assert(page{ limit = 9, sort = { "-score" }, after = cursor })
        end)

        it("accept cursors signed by an older key listed after the new one", function()
            local old_key, new_key = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
            local before = H.users(tbl, { cursor_key = old_key })
            local after = H.users(tbl, { cursor_key = { new_key, old_key } })
            local only_new = H.users(tbl, { cursor_key = new_key })
            local c = assert(H.with(db, before, T, function(repo) return repo:page{ limit = 3 } end)).next_cursor
            assert(H.with(db, after, T, function(repo) return repo:page{ limit = 3, after = c } end))
            local r, e = H.with(db, only_new, T, function(repo) return repo:page{ limit = 3, after = c } end)
            assert.is_nil(r)
            assert.equal("invalid", e.code)
        end)

        it("refuse limit 0, negative or above the maximum", function()
            for _, bad in ipairs({ 0, -3, 51, 1.5 }) do
              local r, e = page{ limit = bad }
              assert.is_nil(r)
              assert.equal("invalid", e.code)
              assert.matches("limit", e.message)
            end
        end)
    end)

    it("refuses keyset paging clearly when no cursor key is configured", function()
        local keyless = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 1 })
        keyless.settings.cursor_key = nil -- as if QX_CURSOR_KEY were unset
        local r0, e0 = keyless:unit_of_work(function(uow)
            return uow:repo(users):page{ limit = 5 }
        end, H.ctx(T))
        assert.is_nil(r0)
        assert.matches("QX_CURSOR_KEY", tostring(e0))
        keyless:close()
        local weak = assert(qx.connect{ url = os.getenv("QX_DB__URL"), pool_size = 1, cursor_key = "short" })
        local r, e = weak:unit_of_work(function(uow) return uow:repo(users):page{ limit = 5 } end, H.ctx(T))
        assert.is_nil(r)
        assert.matches("16 bytes", tostring(e))
        weak:close()
    end)
end)

describe("keyset pages of one shape", function()
    -- A page's statement is made once per shape (sort, scope and filter fields and operators)
    -- and reused; the values are parameters, and the filters are checked on every call.
    local db, tbl, users, T, U

    setup(function()
        db = H.db()
        tbl = H.users_table(db)
        users = H.users(tbl, { max_page_size = 50 })
        T, U = qx.uuid(), qx.uuid()
        H.seed(db, users, T, 12, function(i)
            return { email = ("s%02d@example.com"):format(i), name = "n" .. (i % 3), score = i,
                     is_active = i % 2 == 0 }
        end)
        H.seed(db, users, U, 3, function(i)
            return { email = ("u%02d@example.com"):format(i), name = "n0", score = i }
        end)
    end)

    teardown(function()
        if db then db:close() end
    end)

    -- fn(repo) in a unit of work for tenant t; returns fn's result (or nil and the error) and the
    -- SQL texts of the reads
    local function sent(t, fn)
        local texts = {}
        local tx_methods = debug.getregistry()["qx.tx"].__index
        local saved = {}
        for _, m in ipairs({ "query", "rows", "exec" }) do
            local real = tx_methods[m]
            saved[m] = real
            tx_methods[m] = function(tx, sql, ...)
                texts[#texts + 1] = sql
                return real(tx, sql, ...)
            end
        end
        local real_upto = tx_methods.rows_upto
        saved.rows_upto = real_upto
        tx_methods.rows_upto = function(tx, max, sql, ...)
            texts[#texts + 1] = sql
            return real_upto(tx, max, sql, ...)
        end
        local r, e = H.with(db, users, t, function(repo)
            local out, err = fn(repo)
            if out == nil then error(err, 0) end
            return out
        end)
        for m, real in pairs(saved) do tx_methods[m] = real end
        if r == nil then return nil, e, texts end
        return r, texts
    end

    local function emails(page)
        local out = {}
        for i, u in ipairs(page.items) do out[i] = u.email end
        return out
    end

    it("send the same text for the same shape, whatever the values and the cursor", function()
        local got, texts = sent(T, function(repo)
            local a = assert(repo:page{ limit = 2, sort = { "email" }, filters = {{ "is_active", "eq", true }} })
            local b = assert(repo:page{ limit = 2, sort = { "email" }, filters = {{ "is_active", "eq", false }} })
            local a2 = assert(repo:page{ limit = 2, sort = { "email" }, filters = {{ "is_active", "eq", true }},
                                         after = a.next_cursor })
            local a3 = assert(repo:page{ limit = 2, sort = { "email" }, filters = {{ "is_active", "eq", true }},
                                         after = a2.next_cursor })
            return { a, b, a2, a3 }
        end)
        assert.same({ "s02@example.com", "s04@example.com" }, emails(got[1]))
        assert.same({ "s01@example.com", "s03@example.com" }, emails(got[2]))
        assert.same({ "s06@example.com", "s08@example.com" }, emails(got[3]))
        assert.same({ "s10@example.com", "s12@example.com" }, emails(got[4]))
        assert.equal(4, #texts)
        assert.equal(texts[1], texts[2])   -- first pages: only the value differs
        assert.equal(texts[3], texts[4])   -- pages after a cursor
        assert.are_not.equal(texts[1], texts[3])
        assert.is_nil(texts[1]:find("true", 1, true)) -- values are never in the text
        assert.is_nil(texts[3]:find("example.com", 1, true))
    end)

    it("never share a statement between different shapes", function()
        local shapes = {
            { sort = { "email" }, filters = {{ "is_active", "eq", true }} },
            { sort = { "-email" }, filters = {{ "is_active", "eq", true }} },
            { sort = { "score" }, filters = {{ "is_active", "eq", true }} },
            { sort = { "email" }, filters = {{ "is_active", "neq", true }} },
            { sort = { "email" }, filters = {{ "name", "eq", "n1" }} },
            { sort = { "email" }, filters = {{ "name", "starts_with", "n1" }} },
            { sort = { "email" }, filters = {{ "name", "eq", "n1" }, { "is_active", "eq", true }} },
            { sort = { "email" }, filters = {{ "name", "is_null" }} },
            { sort = { "email" } },
            { sort = { "email" }, filters = {{ "is_active", "eq", true }}, include_deleted = true },
            { sort = { "email", "-score" }, filters = {{ "is_active", "eq", true }} },
            { sort = { "email", "score" }, filters = {{ "is_active", "eq", true }} },
        }
        local want = {
            { "s02", "s04", "s06" }, { "s12", "s10", "s08" }, { "s02", "s04", "s06" },
            { "s01", "s03", "s05" }, { "s01", "s04", "s07" }, { "s01", "s04", "s07" },
            { "s04", "s10" }, {}, { "s01", "s02", "s03" }, { "s02", "s04", "s06" },
            { "s02", "s04", "s06" }, { "s02", "s04", "s06" },
        }
        local got, texts = sent(T, function(repo)
            local out = {}
            for i, o in ipairs(shapes) do
              o.limit = 3
              local p = assert(repo:page(o))
              out[i] = {}
              for j, u in ipairs(p.items) do out[i][j] = u.email:sub(1, 3) end
            end
            return out
        end)
        assert.same(want, got)
        local seen = {}
        for i, text in ipairs(texts) do
            assert.is_nil(seen[text], "shapes " .. tostring(seen[text]) .. " and " .. i .. " share a text")
            seen[text] = i
        end
        assert.equal(#shapes, #texts)
    end)

    it("keep tenants apart when they page with the same shape", function()
        local mine = sent(T, function(repo) return assert(repo:page{ limit = 50, sort = { "email" } }) end)
        local theirs = sent(U, function(repo) return assert(repo:page{ limit = 50, sort = { "email" } }) end)
        assert.equal(12, #mine.items)
        assert.same({ "u01@example.com", "u02@example.com", "u03@example.com" }, emails(theirs))
        -- a cursor of one tenant's listing does not fit the other's
        local first = sent(T, function(repo) return assert(repo:page{ limit = 2, sort = { "email" } }) end)
        local r, e = sent(U, function(repo)
            return repo:page{ limit = 2, sort = { "email" }, after = first.next_cursor }
        end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
    end)

    it("still raise for unlisted fields, operators and directions after a shape was used", function()
        local function raised(opts)
            local r, e = sent(T, function(repo)
              assert(repo:page{ limit = 2, sort = { "email" }, filters = {{ "name", "eq", "n1" }} })
              return repo:page(opts)
            end)
            assert.is_nil(r)
            assert.equal("invalid", e.code)
            return e.message
        end
        assert.matches("not filterable", raised{ limit = 2, sort = { "email" },
                                                  filters = {{ "tenant_id", "eq", T }} })
        assert.matches("not filterable", raised{ limit = 2, sort = { "email" },
                                                  filters = {{ "version", "eq", 1 }} })
        assert.matches("not sortable", raised{ limit = 2, sort = { "version" },
                                                filters = {{ "name", "eq", "n1" }} })
        assert.matches("not sortable", raised{ limit = 2, sort = { "email", "tenant_id" },
                                                filters = {{ "name", "eq", "n1" }} })
        assert.matches("operator", raised{ limit = 2, sort = { "email" },
                                            filters = {{ "name", "like", "n1" }} })
        assert.matches("asc or desc", raised{ limit = 2, sort = {{ "email", "sideways" }},
                                               filters = {{ "name", "eq", "n1" }} })
        -- a list of sort fields whose joined text equals another list's is still its own sort
        assert.matches("not sortable", raised{ limit = 2, sort = { "email,score" } })
        assert.matches("not sortable", raised{ limit = 2, sort = { "1:email" } })
        -- nor does one string that spells a kept longer sort's key find that sort
        local r, e = sent(T, function(repo)
            assert(repo:page{ limit = 2, sort = { "email", "score" } })
            return repo:page{ limit = 2, sort = { "5:email5:score" } }
        end)
        assert.is_nil(r)
        assert.equal("invalid", e.code)
        assert.matches("not sortable", e.message)
    end)
end)

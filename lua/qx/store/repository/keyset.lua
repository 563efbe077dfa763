--- Internal to qx.store.repository: repo:page{...}, keyset pages and their signed cursors.
-- A page reads one row more than it shows; the statement text is made once per listing shape.
local core = require "qx.core"
local S = require "qx.store.repository.spec"
local cursor = require "qx.store.repository.cursor"
local base = require "qx.store.repository.base"
local query = require "qx.store.repository.query"

local type = type
local ipairs = ipairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local pcall = pcall
local unpack = table.unpack or unpack
local concat = table.concat
local sub = string.sub
local null = core.null
local fail, is_int, check_opts, ready = base.fail, base.is_int, base.check_opts, base.ready
local map_rows = base.map_rows
local new_query, listing_where = query.new_query, query.listing_where
local order_by, sort_of = query.order_by, query.sort_of
local Repo = base.Repo

-- the keys of a database's cursor_key setting, checked once per setting value
local setting_keys = setmetatable({}, { __mode = "k" })

local function cursor_keys(self)
    local keys = self.d.cursor_keys
    if keys then return keys end
    local configured = self.db.settings and self.db.settings.cursor_key
    local known = setting_keys[self.db]
    if known and known[1] == configured then return known[2] end
    if configured == nil then
        error("repository " .. self.d.what .. ": keyset paging needs a cursor key to sign "
              .. "cursors: set QX_CURSOR_KEY (or cursor_key in qx.connect or the description)", 3)
    end
    local why
    keys, why = cursor.keys(configured)
    if not keys then error("repository " .. self.d.what .. ": cursor_key setting: " .. why, 3) end
    setting_keys[self.db] = { configured, keys }
    return keys
end

-- the text of after_sql, given the placeholders of the non-NULL values
local function after_text(c, keys, vals, ph)
    local n = #keys
    local same_dir, all_notnull = true, true
    for i = 1, n do
        local v = vals[i]
        if keys[i].desc ~= keys[1].desc then same_dir = false end
        if v == null or not c.columns[keys[i].field].notnull then all_notnull = false end
    end
    if same_dir and all_notnull then -- a row comparison, which an index can serve
        local cols = {}
        for i = 1, n do cols[i] = c.columns[keys[i].field].qname end
        return "(" .. concat(cols, ", ") .. ") " .. (keys[1].desc and "<" or ">")
               .. " (" .. concat(ph, ", ") .. ")"
    end
    local terms, eqs = {}, {}
    for i = 1, n do
        local col = c.columns[keys[i].field]
        local cn, v, after = col.qname, vals[i], nil
        if keys[i].desc then
            if v == null then after = cn .. " IS NOT NULL" else after = cn .. " < " .. ph[i] end
        elseif v ~= null then
            after = col.notnull and (cn .. " > " .. ph[i])
                    or ("(" .. cn .. " > " .. ph[i] .. " OR " .. cn .. " IS NULL)")
        end
        if after then
            local t = {}
            for j = 1, #eqs do t[j] = eqs[j] end
            t[#t + 1] = after
            terms[#terms + 1] = "(" .. concat(t, " AND ") .. ")"
        end
        eqs[#eqs + 1] = v == null and (cn .. " IS NULL") or (cn .. " = " .. ph[i])
    end
    if #terms == 0 then return "FALSE" end
    return "(" .. concat(terms, " OR ") .. ")"
end

-- The rows after a cursor position in the order of `keys` (mixed directions, NULLs sorting
-- last ascending and first descending, the primary key breaking ties).
-- The plan keeps the text per pattern of NULL values (the second result): the parameters are
-- numbered the same way whenever the listing before it is the same.
local function after_sql(c, q, keys, vals, plan)
    local n = #keys
    local ph = {}
    local nulls, bit = 0, 1
    for i = 1, n do
        local v = vals[i]
        if v ~= null then ph[i] = q:param(v) else nulls = nulls + bit end
        bit = bit * 2
    end
    local text = plan.after[nulls]
    if text == nil then
        text = after_text(c, keys, vals, ph)
        plan.after[nulls] = text
    end
    return text, nulls
end

local TYPE_TAG = { string = "s", number = "n", boolean = "b", table = "t", userdata = "u" }

-- what a cursor is bound to: the table, the order, the filters with their values. The part
-- before the values depends only on the listing's shape (see listing_plan).
local function context_prefix(c, keys, w)
    local parts = { c.what, "" }
    for i, k in ipairs(keys) do parts[i + 2] = k.field .. (k.desc and ":d" or ":a") end
    parts[#parts + 1] = w
    return concat(parts, "\n")
end

local function tagged(v)
    local t = type(v)
    if t == "string" then return "s" .. #v .. ":" .. v end
    local s = v == null and "" or (t == "number" and S.scalar_text(v))
              or (t == "table" and "") or tostring(v)
    if t == "table" then
        local ok, json = pcall(require("cjson").encode, v)
        s = ok and json or tostring(v)
    end
    return (TYPE_TAG[t] or sub(t, 1, 1)) .. #s .. ":" .. s
end

local function listing_context(prefix, q)
    local n, params = q.n, q.params
    if n == 0 then return prefix end
    if n == 1 then return prefix .. "\n" .. tagged(params[1]) end
    if n == 2 then return prefix .. "\n" .. tagged(params[1]) .. "\n" .. tagged(params[2]) end
    local parts = { prefix }
    for i = 1, n do parts[i + 1] = tagged(params[i]) end
    return concat(parts, "\n")
end

-- What a keyset page of one shape needs besides its values, made once per shape: the shape is
-- the sort (a kept keys table, see sort_of) and the WHERE text of the scope and the filters,
-- which names every field and operator and numbers the parameters. Different shapes have
-- different texts, so they never share a plan; the filters are still checked (allow-list,
-- operators, values) on every call, as the text is compiled from them each time.
local PLAN_LIMIT = 256

local function new_plan(c, keys, w)
    return { context = context_prefix(c, keys, w), after = {}, sql = {},
             head = "SELECT " .. c.select .. " FROM " .. c.qtable .. " WHERE " .. w,
             order = " ORDER BY " .. order_by(c, keys) .. " LIMIT " }
end

local function listing_plan(c, keys, w)
    local by_sort = c.page_plans[keys]
    if by_sort == nil then
        by_sort = {}
        c.page_plans[keys] = by_sort
    end
    local plan = by_sort[w]
    if plan then return plan end
    if c.nplans >= PLAN_LIMIT then -- many shapes: start again rather than grow without end
        c.page_plans = setmetatable({}, { __mode = "k" })
        c.nplans = 0
        by_sort = {}
        c.page_plans[keys] = by_sort
    end
    plan = new_plan(c, keys, w)
    by_sort[w] = plan
    c.nplans = c.nplans + 1
    return plan
end

local PAGE_OPTS = { filters = true, where = true, sort = true, limit = true, after = true,
                    include_deleted = true }

--- A keyset page. next_cursor is nil on the last page; a cursor only fits the listing it came
-- from. opts: limit, after = cursor, sort, filters, where, include_deleted.
---@param opts table|nil
---@return table|nil page { items, next_cursor, has_next }
---@return qx.Error? err invalid for a bad cursor
function Repo:page(opts)
    opts = check_opts(opts, PAGE_OPTS, "page")
    local d = self.d
    local keyring = cursor_keys(self)
    local c, e = ready(self)
    if not c then return nil, e end
    local limit = opts.limit or d.default_page_size
    if not is_int(limit, 1, d.max_page_size) then
        return fail("invalid", "limit must be an integer from 1 to " .. d.max_page_size
                    .. ", got " .. tostring(limit))
    end
    local q = new_query(self, c)
    local w = listing_where(self, c, q, opts)
    local keys, kept = sort_of(self, c, opts)
    -- a sort given otherwise than as strings gets a plan of its own, used once
    local plan = kept and listing_plan(c, keys, w) or new_plan(c, keys, w)
    local context = listing_context(plan.context, q)
    local variant, after = -1, nil
    if opts.after ~= nil then
        local vals
        vals, e = cursor.decode(keyring, context, opts.after, #keys)
        if not vals then return nil, e end
        after, variant = after_sql(c, q, keys, vals, plan)
    end
    -- the text is the same for every page of the plan with the same NULL pattern (variant)
    local limit_ph = q:param(limit + 1)
    local sql = plan.sql[variant]
    if sql == nil then
        sql = plan.head .. (after and (" AND " .. after) or "") .. plan.order .. limit_ph
        plan.sql[variant] = sql
    end
    -- one row more than the page tells whether another follows; it is not made into a table
    local rows, count = self.t:rows_upto(limit, sql, unpack(q.params, 1, q.n))
    if not rows then return nil, count end
    local out = { has_next = count > limit }
    if out.has_next then
        local last, vals = rows[limit], {}
        for i, k in ipairs(keys) do vals[i] = cursor.text(last[k.field]) end
        out.next_cursor = cursor.encode(keyring, context, vals, #keys)
    end
    out.items = map_rows(d, rows)
    return out
end

--- Specifications: filters that compose with and_/or_/not_, turn into SQL for a repository, and
-- can be checked against an entity in memory.
--
--   local S = qx.spec
--   local active = S.where("email", "ends_with", "@example.com")
--                    :and_(S.where("is_active", "eq", true))
--   repo:search(active, { sort = { "email" } }); active:is_satisfied_by(user)  --> true / false
--
-- A filter triple { field, op, value } stands for a specification, a list of them for "all of
-- these". Bad filters raise an "invalid" qx error. Operators: docs/repository.md.
local core = require "qx.core"
local qx_error = require "qx.error"

local type = type
local pairs = pairs
local ipairs = ipairs
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local select = select
local fmt = string.format
local lower = string.lower
local find = string.find
local gsub = string.gsub
local sub = string.sub
local concat = table.concat
local floor = math.floor
local huge = math.huge
local null = core.null

local _M = { _VERSION = "0.1.0" }

_M.MAX_IN = 10000

local OPS = {
    eq = true, neq = true, ["in"] = true, not_in = true, gt = true, gte = true, lt = true,
    lte = true, contains = true, starts_with = true, ends_with = true, is_null = true,
    is_not_null = true,
}
_M.OPS = OPS

local CMP = { gt = ">", gte = ">=", lt = "<", lte = "<=" }
local LIKE = { contains = true, starts_with = true, ends_with = true }

local function invalid(msg, fields)
    error(qx_error.new("invalid", msg, fields), 0)
end
_M.invalid = invalid

--- A specification: a filter that runs as SQL (search) or in Lua (is_satisfied_by).
---@class qx.Spec
local Spec = {}
Spec.__index = Spec
_M.Spec = Spec

local function is_spec(x)
    return getmetatable(x) == Spec
end
_M.is_spec = is_spec

local function is_list(t)
    local n = #t
    for k in pairs(t) do
        if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then return false end
    end
    return true
end

local function is_null(v)
    return v == nil or v == null
end

-- a leaf: field, op, value (checked for shape here; the field against an allow-list later)
local function leaf(field, op, value)
    if type(field) ~= "string" or field == "" then
        invalid("filter field must be a non-empty string, got " .. type(field))
    end
    if type(op) ~= "string" or not OPS[op] then
        invalid("unknown filter operator " .. fmt("%q", tostring(op)) .. " for field '" .. field
                .. "' (known: eq neq in not_in gt gte lt lte contains starts_with ends_with"
                .. " is_null is_not_null)", { field = field })
    end
    if (op == "eq" or op == "neq") and is_null(value) then
        -- { f, "eq", x } with x nil is the table { f, "eq" }: a forgotten value and a null one
        -- look alike, so neither silently becomes IS NULL
        local want = op == "eq" and "is_null" or "is_not_null"
        invalid("operator " .. op .. " needs a value (field '" .. field .. "' got "
                .. (value == nil and "nil" or "qx.null") .. "); for rows where it is null use { '"
                .. field .. "', '" .. want .. "' }", { field = field })
    elseif op == "is_null" or op == "is_not_null" then
        if value ~= nil and value ~= true then
            invalid("operator " .. op .. " takes no value (field '" .. field .. "')",
                    { field = field })
        end
        value = nil
    elseif op == "in" or op == "not_in" then
        if type(value) ~= "table" or getmetatable(value) ~= nil or not is_list(value) then
            invalid("operator " .. op .. " needs a list of values (field '" .. field .. "')",
                    { field = field })
        end
        if #value > _M.MAX_IN then
            invalid("operator " .. op .. " takes at most " .. _M.MAX_IN .. " values (field '"
                    .. field .. "')", { field = field })
        end
        for i = 1, #value do
            local t = type(value[i])
            if t ~= "string" and t ~= "number" and t ~= "boolean" then
                invalid("operator " .. op .. ": value " .. i .. " of field '" .. field
                        .. "' must be a string, number or boolean, got "
                        .. (value[i] == null and "null" or t), { field = field })
            end
            if t == "number" and (value[i] ~= value[i] or value[i] == huge
                                  or value[i] == -huge) then
                invalid("operator " .. op .. ": value " .. i .. " of field '" .. field
                        .. "' is not a finite number", { field = field })
            end
        end
    elseif LIKE[op] then
        if type(value) ~= "string" then
            invalid("operator " .. op .. " needs a string (field '" .. field .. "'), got "
                    .. (value == null and "null" or type(value)), { field = field })
        end
    else -- eq neq gt gte lt lte
        local t = type(value)
        if t ~= "string" and t ~= "number" and t ~= "boolean"
           and not ((op == "eq" or op == "neq") and t == "table") then
            invalid("operator " .. op .. " needs a string, number or boolean (field '" .. field
                    .. "'), got " .. t, { field = field })
        end
        if t == "number" and (value ~= value or value == huge or value == -huge) then
            invalid("operator " .. op .. ": the value of field '" .. field
                    .. "' is not a finite number", { field = field })
        end
    end
    return setmetatable({ kind = "leaf", field = field, op = op, value = value }, Spec)
end

--- A specification on one field: field op value.
---@param field string a filterable column
---@param op string eq neq in not_in gt gte lt lte contains starts_with ends_with is_null ...
---@param value any
---@return qx.Spec
function _M.where(field, op, value)
    return leaf(field, op, value)
end

-- of(x) -> spec: x is a spec, a filter triple, or a list of triples and specs (all of them)
local function of(x)
    if is_spec(x) then return x end
    if type(x) ~= "table" then
        invalid("expected a specification or a filter { field, op, value }, got " .. type(x))
    end
    if x.field ~= nil or x.op ~= nil then
        return leaf(x.field, x.op, x.value)
    end
    if type(x[1]) == "string" then
        return leaf(x[1], x[2], x[3])
    end
    if not is_list(x) then
        invalid("expected a specification, a filter { field, op, value } or a list of them")
    end
    local parts = {}
    for i = 1, #x do parts[i] = of(x[i]) end
    if #parts == 1 then return parts[1] end
    return setmetatable({ kind = "and", parts = parts }, Spec)
end
_M.of = of

local function combine(kind, ...)
    local parts = {}
    for i = 1, select("#", ...) do
        local s = of((select(i, ...)))
        if s.kind == kind then -- flatten and_(and_(a, b), c)
            for _, p in ipairs(s.parts) do parts[#parts + 1] = p end
        else
            parts[#parts + 1] = s
        end
    end
    return setmetatable({ kind = kind, parts = parts }, Spec)
end

--- All of the specs; and_() is always true.
---@param ... qx.Spec
---@return qx.Spec
function _M.and_(...) return combine("and", ...) end
--- Any of the specs; or_() is never true.
---@param ... qx.Spec
---@return qx.Spec
function _M.or_(...) return combine("or", ...) end
--- The negation of a specification.
---@param s qx.Spec
---@return qx.Spec
function _M.not_(s) return setmetatable({ kind = "not", part = of(s) }, Spec) end

--- This spec and the others.
---@param ... qx.Spec
---@return qx.Spec
function Spec:and_(...) return combine("and", self, ...) end
--- This spec or the others.
---@param ... qx.Spec
---@return qx.Spec
function Spec:or_(...) return combine("or", self, ...) end
--- The negation of this specification.
---@return qx.Spec
function Spec:not_() return _M.not_(self) end

-- ---- in memory ----------------------------------------------------------------------------

local function same_kind(a, b)
    return type(a) == type(b) and (type(a) == "string" or type(a) == "number")
end

local function eval_leaf(s, v)
    local op, want = s.op, s.value
    if v == null then v = nil end
    if op == "is_null" then return v == nil end
    if op == "is_not_null" then return v ~= nil end
    if op == "eq" then return v ~= nil and v == want end
    if op == "neq" then return v == nil or v ~= want end
    if op == "in" or op == "not_in" then
        local hit = false
        if v ~= nil then
            for i = 1, #want do
                if want[i] == v then hit = true break end
            end
        end
        if op == "in" then return hit end
        return not hit
    end
    if v == nil then return false end
    if CMP[op] then
        if not same_kind(v, want) then return false end
        if op == "gt" then return v > want end
        if op == "gte" then return v >= want end
        if op == "lt" then return v < want end
        return v <= want
    end
    if type(v) ~= "string" then v = tostring(v) end
    local hay, needle = lower(v), lower(want)
    if op == "contains" then return find(hay, needle, 1, true) ~= nil end
    if op == "starts_with" then return sub(hay, 1, #needle) == needle end
    return #needle <= #hay and sub(hay, #hay - #needle + 1) == needle
end

local function eval(s, entity)
    local k = s.kind
    if k == "leaf" then return eval_leaf(s, entity[s.field]) end
    if k == "not" then return not eval(s.part, entity) end
    if k == "and" then
        for _, p in ipairs(s.parts) do
            if not eval(p, entity) then return false end
        end
        return true
    end
    for _, p in ipairs(s.parts) do
        if eval(p, entity) then return true end
    end
    return false
end

--- Strings compare as Lua strings (byte order, not the database's collation) and a value of
-- another type than the filter's never matches.
---@param entity table
---@return boolean
function Spec:is_satisfied_by(entity)
    if type(entity) ~= "table" then
        error("is_satisfied_by: expected an entity table, got " .. type(entity), 2)
    end
    return eval(self, entity)
end

-- ---- SQL ----------------------------------------------------------------------------------

-- The text form of a value inside a PostgreSQL array literal.
local function scalar_text(v)
    local t = type(v)
    if t == "string" then return v end
    if t == "boolean" then return v and "true" or "false" end
    if v == floor(v) and v > -2^53 and v < 2^53 then return fmt("%d", v) end
    return fmt("%.17g", v)
end
_M.scalar_text = scalar_text

-- A list as one array literal parameter: '{"a","b\"c"}'. The server infers the element type
-- from the column (col = ANY($n)).
local function array_literal(list)
    local out = {}
    for i = 1, #list do
        out[i] = '"' .. gsub(scalar_text(list[i]), '[\\"]', "\\%0") .. '"'
    end
    return "{" .. concat(out, ",") .. "}"
end

local function like_pattern(op, v)
    v = gsub(v, "[\\%%_]", "\\%0")
    if op == "contains" then return "%" .. v .. "%" end
    if op == "starts_with" then return v .. "%" end
    return "%" .. v
end

-- compile(spec, q) -> SQL text. q is the repository's query under construction:
--   q.columns[field] = { qname =, text = bool, json = bool, uuid = bool } for every column
--   q.allowed[field] = true for the filterable ones; q.what names the table in messages
--   q:param(value) -> "$n"
local function compile(s, q)
    local k = s.kind
    if k == "and" or k == "or" then
        if #s.parts == 0 then return k == "and" and "TRUE" or "FALSE" end
        local out = {}
        for i, p in ipairs(s.parts) do out[i] = compile(p, q) end
        if #out == 1 then return out[1] end
        return "(" .. concat(out, k == "and" and " AND " or " OR ") .. ")"
    end
    if k == "not" then
        return "NOT " .. compile(s.part, q)
    end
    local field, op, v = s.field, s.op, s.value
    local col = q.columns[field]
    if not q.allowed[field] or not col then
        invalid("field '" .. field .. "' is not filterable on " .. q.what .. q.allowed_hint,
                { field = field })
    end
    local c = col.qname
    if op == "is_null" then return c .. " IS NULL" end
    if op == "is_not_null" then return c .. " IS NOT NULL" end
    if col.uuid then
        local vals = (op == "in" or op == "not_in") and v or { v }
        for i = 1, #vals do
            if not (LIKE[op] or core.is_uuid(vals[i])) then
                invalid("field '" .. field .. "' holds uuids; got " .. fmt("%q", tostring(vals[i])),
                        { field = field })
            end
        end
    end
    if type(v) == "table" and (op == "eq" or op == "neq") and not col.json then
        invalid("operator " .. op .. " on field '" .. field .. "' needs a scalar value",
                { field = field })
    end
    if op == "eq" then return c .. " = " .. q:param(v) end
    if op == "neq" then return c .. " IS DISTINCT FROM " .. q:param(v) end
    if op == "in" then
        if #v == 0 then return "FALSE" end
        return c .. " = ANY(" .. q:param(array_literal(v)) .. ")"
    end
    if op == "not_in" then
        if #v == 0 then return "TRUE" end
        return "(" .. c .. " IS NULL OR " .. c .. " <> ALL(" .. q:param(array_literal(v)) .. "))"
    end
    if CMP[op] then
        if type(v) == "number" or type(v) == "boolean" then v = scalar_text(v) end
        return c .. " " .. CMP[op] .. " " .. q:param(v)
    end
    -- contains / starts_with / ends_with
    local target = col.text and c or (c .. "::text")
    return target .. " ILIKE " .. q:param(like_pattern(op, v)) .. " ESCAPE '\\'"
end
_M.compile = compile

return _M

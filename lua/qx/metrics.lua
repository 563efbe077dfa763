-- Prometheus text exposition: the one writer the relay, the outbox figures and the consumer use.
--
--   local m = metrics.new(metrics.labels("stream", "ORDERS", "consumer", "billing"))
--   m:add("qx_consumer_messages_handled_total", "counter", "Messages handled.", 12)
--   m:add_histogram("qx_projection_batch_apply_seconds", "Apply time.", metrics.histogram(b))
--   return m:text()
local type = type
local select = select
local tostring = tostring
local setmetatable = setmetatable
local floor = math.floor
local fmt = string.format
local gsub = string.gsub
local concat = table.concat

local _M = { _VERSION = "0.1.0" }

local Writer = {}
Writer.__index = Writer

-- a sample value: booleans as 1/0, integers without a decimal point
local function value_text(v)
    if type(v) == "boolean" then return v and "1" or "0" end
    if type(v) == "number" and v == floor(v) and v < 2^53 and v > -2^53 then
        return fmt("%d", v)
    end
    return tostring(v)
end

local ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }

-- labels(name1, value1, name2, value2, ...) -> '{name1="value1",...}'
function _M.labels(...)
    local parts, n = {}, select("#", ...)
    for i = 1, n, 2 do
        local v = gsub(value_text((select(i + 1, ...))), '[\\"\n]', ESCAPES)
        parts[#parts + 1] = (select(i, ...)) .. '="' .. v .. '"'
    end
    return "{" .. concat(parts, ",") .. "}"
end

-- new([labels]) -> a writer whose samples all carry the labels text
function _M.new(labels)
    return setmetatable({ lines = {}, labels = labels or "" }, Writer)
end

-- writer:add(name, kind, help, value): the HELP, TYPE and sample lines of one metric
function Writer:add(name, kind, help, value)
    local l = self.lines
    l[#l + 1] = "# HELP " .. name .. " " .. help
    l[#l + 1] = "# TYPE " .. name .. " " .. kind
    l[#l + 1] = name .. self.labels .. " " .. value_text(value)
end

-- histogram(bounds) -> a histogram of the upper bounds given (ascending; +Inf is added):
-- h:observe(v) counts one value
local Histogram = {}
Histogram.__index = Histogram

function _M.histogram(bounds)
    local counts = {}
    for i = 1, #bounds + 1 do counts[i] = 0 end
    return setmetatable({ bounds = bounds, counts = counts, sum = 0, count = 0 }, Histogram)
end

function Histogram:observe(v)
    local b, i = self.bounds, 1
    while b[i] ~= nil and v > b[i] do i = i + 1 end
    self.counts[i] = self.counts[i] + 1
    self.sum = self.sum + v
    self.count = self.count + 1
end

-- writer:add_histogram(name, help, h): the cumulative _bucket lines, _sum and _count
function Writer:add_histogram(name, help, h)
    local l, labels = self.lines, self.labels
    local inner = labels == "" and "" or labels:sub(2, -2) .. ","
    l[#l + 1] = "# HELP " .. name .. " " .. help
    l[#l + 1] = "# TYPE " .. name .. " histogram"
    local total = 0
    for i = 1, #h.bounds + 1 do
        total = total + h.counts[i]
        local le = h.bounds[i] and value_text(h.bounds[i]) or "+Inf"
        l[#l + 1] = name .. "_bucket{" .. inner .. 'le="' .. le .. '"} ' .. value_text(total)
    end
    l[#l + 1] = name .. "_sum" .. labels .. " " .. value_text(h.sum)
    l[#l + 1] = name .. "_count" .. labels .. " " .. value_text(h.count)
end

function Writer:text()
    return concat(self.lines, "\n") .. "\n"
end

return _M

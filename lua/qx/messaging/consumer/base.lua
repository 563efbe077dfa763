-- Internal to qx.consumer: the Consumer class that the files of this folder add methods to,
-- and what they share (the duplicate marker, the inbox and dead-letter statements, checks).

local type = type
local error = error
local getmetatable = getmetatable
local floor = math.floor

local _M = {}

local Consumer = {}
Consumer.__index = Consumer
_M.Consumer = Consumer

-- what the first statements of a message's unit of work return for a message seen before
_M.DUPLICATE = {}

local INBOX_INSERT = [[
INSERT INTO qx_inbox (consumer, event_id, event_name) VALUES ($1, $2::uuid, $3)
ON CONFLICT (consumer, event_id) DO NOTHING]]

local DEAD_LETTER_INSERT = [[
INSERT INTO qx_dead_letters (id, consumer, stream, subject, stream_seq, published_at, event_id,
                             event_name, event_version, headers, data, reason, error, deliveries)
VALUES ($1, $2, $3, $4, $5, $6::timestamptz, $7, $8, $9, $10::jsonb, decode($11, 'hex'), $12,
        left($13, 8192), $14)
ON CONFLICT (consumer, stream, stream_seq, published_at) DO NOTHING]]

local DEAD_COLUMNS = [[id::text AS id, consumer, stream, subject, stream_seq,
    published_at::text AS published_at, event_id, event_name, event_version, headers,
    data, reason, error, deliveries, dead_at::text AS dead_at, replayed_at::text AS replayed_at]]
_M.INBOX_INSERT = INBOX_INSERT
_M.DEAD_LETTER_INSERT = DEAD_LETTER_INSERT
_M.DEAD_COLUMNS = DEAD_COLUMNS

local function is_int(v, lo, hi)
    return type(v) == "number" and v == floor(v) and v >= lo and (hi == nil or v <= hi)
end
_M.is_int = is_int

local function is_callable(f)
    if type(f) == "function" then return true end
    local mt = getmetatable(f)
    return type(mt) == "table" and type(mt.__call) == "function"
end
_M.is_callable = is_callable

function _M.check_handler(handler)
    if is_callable(handler) then return end
    if type(handler) == "table" and type(handler.publish) == "function" then return end
    error("consumer: handler must be a function(event, uow, msg) or a dispatcher", 3)
end

function Consumer:_check_open(level)
    if self.handle == nil then error("consumer is closed", level + 1) end
end

return _M

-- JSON decoding: qx's decoder (core.json_decode, behind every json/jsonb column, the consumer's
-- envelopes and the event store's reads) against lua-cjson, the decoder qx used before, on the
-- same texts in the same process, in turns round after round; the median of each.
--
--   envelope   one outbox envelope as the consumer receives it (~400 bytes)
--   rows       a page of 1,000 stored events (~200 kB), as a json column might hold
--   numbers    an array of 10,000 numbers, integers and fractions mixed
--
--   lua5.4 bench/json_bench.lua      (or luajit; no servers; QX_BENCH_ROUNDS, default 7)
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
local B = require "bench_support"
local core = require "qx.core"
local cjson = require("cjson").new()

local clock = core.clock
local ROUNDS = tonumber(os.getenv("QX_BENCH_ROUNDS") or "7")

local envelope = assert(core.json_encode({
    event_id = core.uuid(), event_name = "bench.money_deposited", event_version = 1,
    occurred_at = core.now(), tenant_id = core.uuid(), correlation_id = core.uuid(),
    actor_id = "user-7", payload = { amount = 125, currency = "EUR", rate = 1.0825,
    note = 'monthly "top" up\n', tags = { "a", "b", "c" } } }))
local rows, numbers = {}, {}
for i = 1, 1000 do
    rows[i] = { event_id = core.uuid(), event_name = "bench.money_deposited", amount = i * 3,
                rate = i / 7, note = "event number " .. i, occurred_at = core.now() }
end
for i = 1, 10000 do numbers[i] = i % 2 == 0 and i * 7919 or i / 13 end
rows = assert(core.json_encode(rows))
numbers = assert(core.json_encode(numbers))

local function once(f, text, n)
    local t = clock()
    for _ = 1, n do f(text) end
    return (clock() - t) / n
end

-- the two decoders in turns, so that a busy moment of the machine falls on both
local function time(text, n)
    local theirs, ours = {}, {}
    for r = 1, ROUNDS do
        theirs[r] = once(cjson.decode, text, n)
        ours[r] = once(core.json_decode, text, n)
    end
    return B.median(theirs), B.median(ours)
end

print(("json decode, %s, median of %d rounds"):format(B.interpreter(), ROUNDS))
for _, case in ipairs({ { "envelope", envelope, 100000 }, { "rows", rows, 200 },
                        { "numbers", numbers, 200 } }) do
    local name, text, n = case[1], case[2], case[3]
    local theirs, ours = time(text, n)
    print(("%-9s %6d bytes   lua-cjson %9.2f us   qx %9.2f us   qx/cjson %.2f"):format(
        name, #text, theirs * 1e6, ours * 1e6, ours / theirs))
end

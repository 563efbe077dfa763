-- What the benchmarks share: quoting for the shell, the running interpreter, a command's output,
-- the median of a run's rounds, and a pre-filled outbox for the relay's. A benchmark finds it next to itself:
--   package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path
--   local B = require "bench_support"
local M = {}

-- s quoted for a POSIX shell
function M.sh(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- the interpreter running this script (lua5.4, luajit, ...), as it was invoked
function M.interpreter()
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i]
end

-- what cmd prints, stdout and stderr together
function M.run(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    return out
end

-- the median of a list of numbers (the mean of the two middle ones for an even count); 0 when
-- empty
function M.median(t)
    local s = {}
    for i, v in ipairs(t) do s[i] = v end
    table.sort(s)
    local n = #s
    if n == 0 then return 0 end
    if n % 2 == 1 then return s[(n + 1) / 2] end
    return (s[n / 2] + s[n / 2 + 1]) / 2
end

-- Fills db's outbox with n envelopes like a unit of work writes (about 400 bytes each) over
-- `keys` partition keys, and analyses it (a relay bench's starting point).
function M.fill_outbox(db, n, keys)
    assert(db:exec([[
INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id,
                              partition_key)
SELECT u.id, 'bench.thing_happened', 1,
       jsonb_build_object('event_id', u.id, 'event_name', 'bench.thing_happened',
           'event_version', 1, 'occurred_at', now(), 'correlation_id', u.c, 'causation_id', null,
           'tenant_id', null, 'actor_id', 'bench',
           'payload', jsonb_build_object('n', g, 'key', 'k' || (g % $2), 'note', repeat('x', 80))),
       now(), u.c, 'bench:k' || (g % $2)
FROM generate_series(1, $1) AS g,
     LATERAL (SELECT gen_random_uuid() AS id, gen_random_uuid() AS c WHERE g > 0) AS u]], n, keys))
    assert(db:exec("ANALYZE qx_outbox_events"))
end

return M

-- What the benchmarks share: quoting for the shell, the running interpreter, a command's output,
-- and the median of a run's rounds. A benchmark finds it next to itself:
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

return M

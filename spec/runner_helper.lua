-- Child processes for the specs of graceful stop: a Lua script started in the background with
-- the spec's module paths, its pid, its log, and the exit code it ended with.
local support = require "support"

local R = {}
local sh = support.sh
R.LUA = jit and "luajit" or "lua5.4"

-- Starts `LUA script` with the NAME=value words of env; returns a child { pid, log, status }.
function R.spawn(script, env)
    local log, status = os.tmpname(), os.tmpname()
    local words = { "LUA_PATH=" .. sh(package.path), "LUA_CPATH=" .. sh(package.cpath),
                    "ASAN_OPTIONS=detect_leaks=0" }
    for k, v in pairs(env or {}) do words[#words + 1] = k .. "=" .. sh(tostring(v)) end
    -- the shell waits for the script and writes its exit code; the pid is the script's
    local inner = "env " .. table.concat(words, " ") .. " " .. R.LUA .. " " .. sh(script)
        .. " >" .. sh(log) .. " 2>&1 & echo $!; wait $!; echo $? >" .. sh(status)
    local p = assert(io.popen("sh -c " .. sh(inner) .. " & "))
    local pid = tonumber(p:read("*l"))
    assert(pid, "could not start " .. script)
    return { pid = pid, log = log, status = status, pipe = p }
end

function R.log(child)
    local f = io.open(child.log)
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

-- The exit code once the child ended, else nil.
function R.exit_code(child)
    local f = io.open(child.status)
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return tonumber(s:match("%d+"))
end

function R.signal(child, sig)
    os.execute("kill -" .. sig .. " " .. child.pid .. " 2>/dev/null")
end

-- Waits (at most seconds) for the child to end; returns its exit code and log, and cleans up.
function R.finish(child, seconds, wait_until)
    wait_until(function() return R.exit_code(child) ~= nil end, seconds or 20)
    local code = R.exit_code(child)
    if code == nil then
        R.signal(child, "KILL")
        wait_until(function() return R.exit_code(child) ~= nil end, 5)
    end
    local log = R.log(child)
    child.pipe:close()
    os.remove(child.log)
    os.remove(child.status)
    return code, log
end

return R

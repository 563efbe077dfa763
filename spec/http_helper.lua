-- A plain HTTP GET for the specs of /metrics and /health: curl as a child process, so the
-- request is a real one over TCP from outside the runner's Lua state.
local M = {}

-- get(url[, timeout_s]) -> status (0: no answer), body
function M.get(url, timeout)
    local p = assert(io.popen(("curl -s -m %g -o - -w '\\n%%{http_code}' '%s'")
        :format(timeout or 5, url)))
    local out = p:read("*a")
    p:close()
    local body, code = out:match("^(.*)\n(%d+)$")
    return tonumber(code) or 0, body or out
end

-- the value of the first sample of a metric (labels ignored), or nil
function M.sample(text, name)
    for line in text:gmatch("[^\n]+") do
        local n, v = line:match("^([%w_]+)[^ ]* (%S+)$")
        if n == name then return tonumber(v) end
    end
    return nil
end

return M

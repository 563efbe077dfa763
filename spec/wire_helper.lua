-- Drives a core.wire codec over a LuaSocket TCP connection, as an event loop drives it over its
-- own socket: send the output, receive what is there, feed it, until the codec says done.
local socket = require "socket"

local M = {}

local LIMIT = 10 -- seconds a conversation may take

-- Sends the output and feeds what comes back until the codec is done: true | nil, err (the
-- codec's error, or the socket's, after which the codec was told it is lost). chunk: feed at
-- most that many bytes at a time (1: byte by byte).
function M.run(w, sock, chunk)
    local deadline = socket.gettime() + LIMIT
    while true do
        local out = w:output()
        if out then
            local ok, err = sock:send(out)
            if not ok then
                w:lost(err)
                return nil, err
            end
        end
        sock:settimeout(math.max(0.001, deadline - socket.gettime()))
        local first, err = sock:receive(1)
        if not first then
            w:lost(err)
            return nil, err
        end
        sock:settimeout(0)
        local rest, _, partial = sock:receive(65536)
        local data = first .. (rest or partial or "")
        local step = chunk or #data
        local done = false
        for i = 1, #data, step do
            local d, ferr = w:feed(data:sub(i, i + step - 1))
            if d == nil then return nil, ferr end
            done = done or d
        end
        if done then
            -- answers the feed queued on the way (none at the end, but be exact)
            out = w:output()
            if out then assert(sock:send(out)) end
            return true
        end
    end
end

-- A socket connected to the codec's server and its start-up done: sock | nil, err (sock too, to
-- close, when the start-up failed).
function M.connect(w, chunk)
    local sock = assert(socket.tcp())
    sock:settimeout(LIMIT)
    local ok, err = sock:connect(w:host(), w:port())
    if not ok then
        sock:close()
        return nil, err
    end
    w:start()
    ok, err = M.run(w, sock, chunk)
    if not ok then return nil, err, sock end
    return sock
end

-- One batch, its bytes moved: what conn:batch gives (results | nil, err, index), and with keep
-- the kept results as a fourth value.
function M.batch(w, sock, stmts, keep, chunk)
    local ok, err, index = w:batch(stmts, keep)
    if not ok then return nil, err, index end
    local _, rerr = M.run(w, sock, chunk)
    if w:busy() then return w:batch_end() end
    return nil, rerr
end

return M

-- Sockets for qx's wire-codec pool outside nginx (qx.store.wire.pool's `sockets`): LuaSocket's
-- blocking TCP sockets with the two methods the pool uses, send and receiveany. faults may
-- make a socket fail on purpose: faults.fail_receive(sock, nth) -> true fails its nth receive
-- after the socket was made, as a lost server would.
local socket = require "socket"

local M = {}

local TIMEOUT = 10

local Sock = {}
Sock.__index = Sock

function Sock:send(data)
    local n, e = self.s:send(data)
    if not n then return nil, e end
    return n
end

-- Whatever has come, at least one byte: waits for the first, then takes what is there.
function Sock:receiveany(max)
    self.receives = self.receives + 1
    if self.fail_at and self.receives >= self.fail_at then
        self.s:close()
        return nil, "closed (a fault of the spec)"
    end
    local s = self.s
    if self.drop_tail then
        -- the whole reply: up to a ReadyForQuery ("Z", length 5, a status byte) at its end
        local got = ""
        s:settimeout(TIMEOUT)
        while not got:find("Z\0\0\0\5[ITE]$") do
            local more, e, partial = s:receive(1)
            if not more and not partial then return nil, e end
            got = got .. (more or partial)
        end
        self.fail_at = self.receives + 1
        local keep = #got - self.drop_tail
        self.drop_tail = nil
        return got:sub(1, keep)
    end
    s:settimeout(TIMEOUT)
    local first, e = s:receive(1)
    if not first then return nil, e end
    s:settimeout(0)
    local rest, _, partial = s:receive(max - 1)
    s:settimeout(TIMEOUT)
    return first .. (rest or partial or "")
end

function Sock:close()
    self.s:close()
end

--- A sockets table for qx.store.wire.pool. opts.made: a list that receives every socket made.
function M.sockets(opts)
    opts = opts or {}
    return {
        connect = function(host, port)
            if host:sub(1, 1) == "/" then return nil, "no Unix sockets here" end
            local s = socket.tcp()
            s:settimeout(TIMEOUT)
            local ok, e = s:connect(host, port)
            if not ok then return nil, e end
            s:setoption("tcp-nodelay", true)
            local sock = setmetatable({ s = s, receives = 0 }, Sock)
            if opts.made then opts.made[#opts.made + 1] = sock end
            return sock, false
        end,
    }
end

return M

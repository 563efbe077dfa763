--- Internal to qx: a pool of wire-codec connections (qx.store.wire.conn) over sockets that a
-- `sockets` table makes, so the same pool serves nginx cosockets (qx.openresty.connect) and
-- any other socket library:
--   sockets.connect(host, port, name) -> sock, reused | nil, err
--       host: a name or address, or (beginning with "/") a Unix socket's directory; name: the
--       connection's own name, for socket libraries that keep idle sockets by name (nginx);
--       reused: the socket is this connection's own, kept since its last release
--   sockets.keep(sock) -> true | nil, err   (optional) keep the idle socket; the conn forgets it
--   sockets.wait(seconds) -> true | nil, err, sockets.post()   (optional) a free slot of size;
--       without them, an acquire beyond the size fails at once
--   sockets.defer(fn, ...) -> true | nil, err   (optional) runs fn(...) soon, in a
--       context of its own that may use sockets (nginx: a zero-delay timer); with it, the
--       wake-up of listeners after a commit is sent by the pool, coalesced (Pool:_wake),
--       instead of in each commit's pipeline
--   sockets.sleep(seconds)   (optional) waits without blocking others (nginx: ngx.sleep); with
--       it, back-to-back wake-ups of a channel are WAKE_GAP_SECONDS apart
--   sockets.log(message)   (optional) where a failed wake-up is reported (else stderr)
--   sockets.forget(name)   (optional) the connection of that name is gone
local core = require "qx.core"
local err = require "qx.error"
local wire_conn = require "qx.store.wire.conn"

local setmetatable = setmetatable
local getmetatable = getmetatable
local newproxy = newproxy
local tostring = tostring
local stderr = io.stderr
local fmt = string.format

local _M = {}

-- Under load, the pause between one wake-up of a channel and the next for the commits that
-- came meanwhile: each is a transaction on the server, and without a pause they go back to
-- back (one per round trip). A listener learns of a commit at most this much later.
_M.WAKE_GAP_SECONDS = 0.002

local Pool = {}
Pool.__index = Pool

--- opts: { url, size, acquire_timeout_ms, init_sql, sockets }. The url is checked here (a bad
-- one is nil, err); nothing connects before the first acquire.
function _M.new(opts)
    local w, e = core.wire(opts.url)
    if not w then return nil, e end
    local host, port = w:host(), w:port()
    w:close()
    return setmetatable({
        url = opts.url,
        host = host,
        port = port,
        size = opts.size,
        acquire_timeout_ms = opts.acquire_timeout_ms,
        init_sql = opts.init_sql,
        sockets = opts.sockets,
        idle = {},   -- released connections, the most recent last
        busy = 0,    -- leased now
        made = 0,    -- connections made, for their names
        wakes = {},  -- channel -> { busy, again }: its wake-up in flight, and one more wanted
        closed = false,
    }, Pool)
end

local function give_back_slot(self)
    self.busy = self.busy - 1
    local post = self.sockets.post
    if post then post() end
end

-- A lease's guard: should its holder drop it unreleased (nginx killed the request's coroutine:
-- lua_check_client_abort, ngx.exit from another light thread), its finaliser gives the slot
-- back and closes the codec; nginx closes the request's socket itself. Without it the slot
-- would be lost for the life of the worker. g = { held, pool, w, name }.
local function on_gc(g)
    if g.held then
        g.held = false
        local pool = g.pool
        local forget = pool.sockets.forget
        if forget then forget(g.name) end
        g.w:close()
        give_back_slot(pool)
    end
end

-- guard(g) -> what the lease holds to keep g's finaliser from running. One metatable for all
-- (no closure per lease): LuaJIT finalises only userdata, so there a proxy of a shared
-- metatable stands for g, found in a weak-keyed table (an object being finalised keeps its
-- entries until its finaliser has run); Lua 5.4 finalises g itself.
local guard
if newproxy then
    local states = setmetatable({}, { __mode = "k" })
    local proto = newproxy(true)
    getmetatable(proto).__gc = function(proxy)
        local g = states[proxy]
        if g then on_gc(g) end
    end
    guard = function(g)
        local proxy = newproxy(proto)
        states[proxy] = g
        return proxy
    end
else
    local GUARD = { __gc = on_gc }
    guard = function(g)
        return setmetatable(g, GUARD)
    end
end

-- A connection that goes: its socket and codec closed, its name forgotten by the sockets.
local function drop(self, conn)
    if conn._guard then conn._guard.held = false end
    local forget = self.sockets.forget
    if forget then forget(conn.name) end
    conn:close()
end

local function timeout_error(self)
    return err.new("timeout", fmt("no free connection within %d ms (pool size %d)",
        self.acquire_timeout_ms, self.size))
end

--- pool:acquire() -> conn | nil, err ("timeout" when the pool stays busy, "connection" when
-- the server cannot be reached or refuses the start-up)
function Pool:acquire()
    if self.closed then return nil, err.new("closed", "pool is closed") end
    local sockets = self.sockets
    if sockets.wait then
        local ok = sockets.wait(self.acquire_timeout_ms / 1000)
        if not ok then return nil, timeout_error(self) end
    elseif self.busy >= self.size then
        return nil, timeout_error(self)
    end
    self.busy = self.busy + 1
    local idle = self.idle
    local kept = idle[#idle]
    local conn
    if kept then
        idle[#idle] = nil
        -- a lease of its own, as a core.pool connection is: a stale holder's release is a no-op
        conn = wire_conn.new(self, kept.w, kept.name, kept.sock)
    else
        local w, e = core.wire(self.url)
        if not w then
            give_back_slot(self)
            return nil, e
        end
        self.made = self.made + 1
        conn = wire_conn.new(self, w, "qx-wire:" .. tostring(self) .. ":" .. self.made, false)
    end
    local g = { held = true, pool = self, w = conn.w, name = conn.name }
    conn._guard, conn._guard_holder = g, guard(g)
    if conn.sock then return conn end
    local w = conn.w
    local sock, reused = sockets.connect(self.host, self.port, conn.name)
    if not sock then
        drop(self, conn)
        give_back_slot(self)
        return nil, err.new("connection", "could not connect to the server: " .. tostring(reused))
    end
    if reused and w:ready() then
        conn.sock = sock
        return conn
    end
    local ok, e = conn:start(sock, self.init_sql)
    if not ok then
        drop(self, conn)
        give_back_slot(self)
        return nil, e
    end
    return conn
end

-- conn:release(): kept when sound and idle (no transaction open), else closed
function Pool:_release(conn)
    conn._guard.held = false
    local w = conn.w
    if not self.closed and w:ready() and w:tx_status() == "idle" then
        local sock = conn.sock
        local keep = self.sockets.keep
        local ok = true
        if keep then
            ok = keep(sock)
            sock = false
        end
        if ok then
            self.idle[#self.idle + 1] = { w = w, name = conn.name, sock = sock }
        else
            drop(self, conn)
        end
    else
        drop(self, conn)
    end
    give_back_slot(self)
end

-- the pipelined wake-up of qx_tx_commit (tx.c), for one channel: pg_notify in a transaction of
-- its own that does not wait for its commit record to reach the disk
local WAKE_SQL = core.WAKE_SQL

local function wake_failed(self, channel, e)
    local msg = "qx: waking listeners of " .. channel .. " after commit failed (they find the "
        .. "rows when they poll): " .. tostring(e)
    local log = self.sockets.log
    if log then log(msg) else stderr:write(msg, "\n") end
end

-- Sends the channel's wake-up, and again while commits came during the one in flight (after a
-- pause, when the sockets can sleep: the commits of the pause share the next one).
local function send_wake(self, channel, st)
    local sleep = self.sockets.sleep
    repeat
        st.again = false
        if self.closed then break end
        local conn, e = self:acquire()
        if conn then
            local rows
            rows, e = conn:query(WAKE_SQL, channel)
            conn:release()
            if rows then e = nil end
        end
        if e then
            wake_failed(self, channel, e)
            break
        end
        if st.again and sleep then sleep(_M.WAKE_GAP_SECONDS) end
    until not st.again
    st.busy = false
end

--- Whether commits leave their wake-up to the pool (sockets.defer given).
function Pool:_coalesces()
    return self.sockets.defer ~= nil
end

-- The listeners of channels are woken once the commit that calls this has committed: by a
-- wake-up sent from now on. One wake-up per channel is in flight at a time; commits that
-- come meanwhile ask for one more after it (WAKE_GAP_SECONDS after it, with sockets.sleep), so
-- under load many commits share one pg_notify (a transaction of its own on the server)
-- instead of sending one each.
function Pool:_wake(channels)
    local wakes = self.wakes
    for i = 1, #channels do
        local channel = channels[i]
        local st = wakes[channel]
        if not st then
            st = { busy = false, again = false }
            wakes[channel] = st
        end
        if st.busy then
            st.again = true
        else
            st.busy = true
            local ok, e = self.sockets.defer(send_wake, self, channel, st)
            if not ok then
                st.busy = false
                wake_failed(self, channel, e)
            end
        end
    end
end

--- pool:stats() -> { size, busy, idle }
function Pool:stats()
    return { size = self.size, busy = self.busy, idle = #self.idle }
end

--- Closes the idle connections; leased ones close when released.
function Pool:close()
    self.closed = true
    local idle = self.idle
    for i = #idle, 1, -1 do
        local kept = idle[i]
        idle[i] = nil
        local forget = self.sockets.forget
        if forget then forget(kept.name) end
        if kept.sock then kept.sock:close() end
        kept.w:close()
    end
end

return _M

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
--       wake-ups of listeners after commits are coalesced (Pool:_carry, Pool:_wake) instead
--       of going in each commit's pipeline
--   sockets.sleep(seconds)   (optional) waits without blocking others (nginx: ngx.sleep); with
--       it, a deferred wake-up of a channel waits until WAKE_GAP_SECONDS after the last one
--   sockets.log(message)   (optional) where a failed wake-up is reported (else stderr)
--   sockets.forget(name)   (optional) the connection of that name is gone
local core = require "qx.core"
local err = require "qx.error"
local wire_conn = require "qx.store.wire.conn"

local setmetatable = setmetatable
local getmetatable = getmetatable
local clock = core.clock
local huge = math.huge
local newproxy = newproxy
local tostring = tostring
local stderr = io.stderr
local fmt = string.format

local _M = {}

-- Under load, the least time between two wake-ups of a channel: each is a transaction on the
-- server, and without a pause they would go one per commit. A listener learns of a commit at
-- most this much later (and a round trip). Read at each use.
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

-- A channel's wake-ups: { last, owed, timer }. last: when the last one was sent (clock);
-- owed: a commit has committed that no wake-up sent after it covers yet; timer: a deferred
-- wake-up (send_wake) is pending, and will cover what is owed. Every commit that asks is
-- followed by a wake-up the server runs after it: its own pipeline's (Pool:_carry), a later
-- commit's, or the deferred one's; at most one per WAKE_GAP_SECONDS is sent.
local function channel_state(self, channel)
    local st = self.wakes[channel]
    if not st then
        st = { last = -huge, owed = false, timer = false }
        self.wakes[channel] = st
    end
    return st
end

-- The deferred wake-up of a channel: once WAKE_GAP_SECONDS have passed since the last one
-- (when the sockets can sleep), sent on a connection of its own, as long as something is owed
-- (commits that come while it is on its way are owed again: it goes once more after them).
local function send_wake(self, channel, st)
    local sleep = self.sockets.sleep
    while st.owed and not self.closed do
        local wait = st.last + _M.WAKE_GAP_SECONDS - clock()
        if wait > 0 and sleep then sleep(wait) end
        -- a commit that carried a wake-up meanwhile has covered it
        if not st.owed or self.closed then break end
        st.owed = false
        st.last = clock()
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
    end
    st.timer = false
end

-- Makes sure a deferred wake-up will cover what a channel owes.
local function defer_wake(self, channel, st)
    if st.timer then return end
    st.timer = true
    local ok, e = self.sockets.defer(send_wake, self, channel, st)
    if not ok then
        st.timer = false
        wake_failed(self, channel, e)
    end
end

--- Whether commits leave their wake-up to the pool (sockets.defer given).
function Pool:_coalesces()
    return self.sockets.defer ~= nil
end

-- The channels whose wake-up the commit about to be sent should carry in its own pipeline
-- (after its COMMIT, in a transaction of its own), or nil: those whose last wake-up went
-- WAKE_GAP_SECONDS ago or more. What they owed is covered by it from now on. The caller
-- reports the outcome with Pool:_carried, and the others with Pool:_wake once committed.
function Pool:_carry(channels)
    local now, gap = clock(), _M.WAKE_GAP_SECONDS
    local carry, rest
    for i = 1, #channels do
        local channel = channels[i]
        local st = channel_state(self, channel)
        if now - st.last >= gap then
            st.last = now
            st.owed = false
            carry = carry or {}
            carry[#carry + 1] = channel
        else
            rest = rest or {}
            rest[#rest + 1] = channel
        end
    end
    return carry, rest
end

-- After a commit that carried the wake-ups of channels: when the wake-up did not run (the
-- commit failed, or it did and the wake-up failed), what the channels owed before is owed
-- again, to a deferred wake-up.
function Pool:_carried(channels, woken)
    if not woken then self:_wake(channels) end
end

-- The listeners of channels are woken once the commit that calls this has committed: by a
-- wake-up sent from now on, a later commit's carried one or a deferred one.
function Pool:_wake(channels)
    for i = 1, #channels do
        local st = channel_state(self, channels[i])
        st.owed = true
        defer_wake(self, channels[i], st)
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

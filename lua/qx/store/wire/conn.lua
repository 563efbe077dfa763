--- Internal to qx: one PostgreSQL connection spoken through the core's wire codec (core.wire)
-- over a socket someone else owns: an nginx cosocket, or any object with send(data),
-- receiveany(max) and close(). The codec turns statements into bytes and bytes into results;
-- this file only moves the bytes. Its methods are those of a core.pool connection that the
-- rest of qx uses (query, rows, rows_upto, batch, xact_status, tx, release), so a db over a pool
-- of these (qx.openresty.connect) runs units of work, repositories and readers unchanged.
-- See docs/openresty.md.
local core = require "qx.core"
local err = require "qx.error"

local setmetatable = setmetatable
local select = select
local unpack = table.unpack or unpack
local type = type
local pairs = pairs
local tostring = tostring
local error = error

local PENDING = core.PENDING
local null = core.null

local _M = {}

local RECEIVE_MAX = 65536

-- The socket failed: the conversation is over (a batch in progress ends with the reason).
local function lost(w, e)
    e = tostring(e)
    w:lost(e)
    return false, e
end

--- Moves the codec's bytes until what it awaits has come: its output out, the socket's input
-- in. Returns true; false and the reason when the socket failed (w:lost: a batch reports it);
-- nil and the codec's error when the feed refused what came (start-up, protocol).
local function exchange(sock, w)
    local out = w:output()
    if out then
        local ok, e = sock:send(out)
        if not ok then return lost(w, e) end
    end
    while true do
        local data, e = sock:receiveany(RECEIVE_MAX)
        if not data then return lost(w, e) end
        local done, fe = w:feed(data)
        if done == nil then return nil, fe end
        out = w:output()
        if out then
            local ok, se = sock:send(out)
            if not ok then return lost(w, se) end
        end
        if done then return true end
    end
end
_M.exchange = exchange

local Conn = {}
Conn.__index = Conn

-- what a lease is once released: release again is a no-op, anything else misuse
local function nothing() end
local Released = {
    __index = function(_, name)
        if name == "release" then return nothing end
        error("connection was released", 2)
    end,
}

--- A lease of a connection of pool: w the codec, sock its socket (false: none yet, or kept
-- by the socket library under name).
function _M.new(pool, w, name, sock)
    return setmetatable({ pool = pool, w = w, name = name, sock = sock }, Conn)
end

--- Start-up on a new socket: the startup message, authentication, the session's settings.
function Conn:start(sock, init_sql)
    local w = self.w
    self.sock = sock
    w:start()
    local ok, e = exchange(sock, w)
    if ok == nil then return nil, e end
    if not ok or not w:ready() then
        return nil, err.new("connection", "the connection was lost during start-up: "
            .. tostring(e or "closed by the server"))
    end
    if init_sql then
        local rows, ie = self:query(init_sql)
        if not rows then return nil, ie end
    end
    return true
end

-- One batch through the codec: stmts as conn:batch takes them.
local function run(self, stmts)
    local w = self.w
    local ok, e = w:batch(stmts)
    if not ok then return nil, e end
    exchange(self.sock, w)
    return w:batch_end()
end

local function statement(sql, ...)
    local stmt = { sql, ... }
    stmt.n = select("#", ...)
    return stmt
end

--- conn:query(sql, ...) -> rows, affected | nil, err (NULL columns as qx.null)
function Conn:query(sql, ...)
    if type(sql) ~= "string" then error("conn:query: sql must be a string", 2) end
    local results, e = run(self, { statement(sql, ...) })
    if not results then return nil, e end
    local r = results[1]
    return r.rows, r.affected
end

local function sparse(rows)
    for i = 1, #rows do
        local row = rows[i]
        for k, v in pairs(row) do
            if v == null then row[k] = nil end
        end
    end
    return rows
end

--- conn:rows(sql, ...) -> rows without their NULL columns, affected | nil, err
function Conn:rows(sql, ...)
    local rows, affected = self:query(sql, ...)
    if not rows then return nil, affected end
    return sparse(rows), affected
end

--- conn:rows_upto(max, sql, ...) -> at most max rows (as conn:rows), the count of them all
function Conn:rows_upto(max, sql, ...)
    if type(max) ~= "number" or max < 0 or max % 1 ~= 0 then
        error("conn:rows_upto: a row limit must be a non-negative integer", 2)
    end
    local rows, affected = self:query(sql, ...)
    if not rows then return nil, affected end
    local n = #rows
    for i = n, max + 1, -1 do rows[i] = nil end
    return sparse(rows), n
end

--- conn:batch(stmts) -> results | nil, err, failed (as a core.pool connection's)
function Conn:batch(stmts)
    if type(stmts) ~= "table" then error("conn:batch: expected a list of statements", 2) end
    if #stmts == 0 then return {} end
    return run(self, stmts)
end

-- what qx_xact_status asks in the core (tx.c)
local XACT_SQL = core.XACT_STATUS_SQL

--- conn:xact_status(xid[, timeline]) -> "committed" | "aborted" | "in progress" | "unknown"
function Conn:xact_status(xid, timeline)
    local rows, e = self:query(XACT_SQL, xid)
    if not rows then return nil, e end
    local row = rows[1] or {}
    if timeline and timeline ~= "" and row.timeline ~= timeline then return "unknown" end
    local s = row.status
    if s == "committed" or s == "aborted" or s == "in progress" then return s end
    return "unknown"
end

function Conn:status()
    return self.w:tx_status()
end

function Conn.script()
    error("conn:script: not over the wire codec (run migrations with qx.connect)", 2)
end

function Conn.listen()
    error("conn:listen: not over the wire codec (LISTEN with qx.connect, in a thread or a "
        .. "process of its own)", 2)
end
Conn.notifications = Conn.listen

--- The transaction of a unit of work (core.tx over the codec), its round trips driven here.
local Tx = {}
Tx.__index = Tx

function Conn:tx(timeout_ms)
    return setmetatable({ tx = core.tx(self.w, timeout_ms), conn = self }, Tx)
end

-- A call's results, or, when it is waiting for its reply, the bytes moved and its results then.
local function finish(self, first, ...)
    if first ~= PENDING then return first, ... end
    exchange(self.conn.sock, self.conn.w)
    return self.tx:resume()
end

for _, name in pairs { "query", "rows", "rows_upto", "exec", "flush", "rollback_to",
                       "rollback" } do
    Tx[name] = function(self, ...)
        local tx = self.tx
        return finish(self, tx[name](tx, ...))
    end
end

--- tx:commit(channel, ...): the channels' wake-ups go in the commit's pipeline, as over libpq;
-- when the pool coalesces them (nginx), only those of channels whose last wake-up went
-- WAKE_GAP_SECONDS ago or more do (Pool:_carry), and the pool wakes the others' listeners
-- after the commit (a commit that carries none goes with nothing sent before, as one implicit
-- transaction).
function Tx:commit(...)
    local tx = self.tx
    local n = select("#", ...)
    local pool = self.conn.pool
    if n == 0 or not pool:_coalesces() then return finish(self, tx:commit(...)) end
    local carry, rest = pool:_carry({ ... })
    local ok, e
    if carry then
        ok, e = finish(self, tx:commit(unpack(carry)))
        pool:_carried(carry, ok and e == nil)
    else
        ok, e = finish(self, tx:commit())
    end
    if ok and rest then pool:_wake(rest) end
    return ok, e
end

for _, name in pairs { "queue", "queue_id", "savepoint", "release", "queued", "status",
                       "round_trips", "sent", "close" } do
    Tx[name] = function(self, ...)
        local tx = self.tx
        return tx[name](tx, ...)
    end
end

--- Back to the pool: kept when the conversation is sound and no transaction is open. The
-- lease is over: its methods raise, a second release does nothing.
function Conn:release()
    self.pool:_release(self)
    self.pool, self.w, self.sock = nil, nil, nil
    setmetatable(self, Released)
end

--- Closes the socket and the codec.
function Conn:close()
    local sock = self.sock
    self.sock = false
    if sock then sock:close() end
    self.w:close()
end

return _M

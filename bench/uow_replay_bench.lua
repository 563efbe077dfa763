-- The unit of work's own cost in the client, without I/O: the work an nginx worker does per
-- write in qx.openresty.connect's mode, measured apart from the network and the server. Each
-- contender runs over the wire codec (the worker mode's) on a socket that first talks to the
-- real server, records the replies of one steady-state unit, then answers every send with them:
-- no syscalls, no waiting, the same bytes parsed each time. In the same run:
--   raw        a leased connection, its transaction, the two INSERTs of the shop's order (the
--              order row, the outbox row with its envelope) queued and committed: the floor
--              the transport sets;
--   uow        the same two statements queued in a unit of work;
--   place_order the OpenResty example's handler: the model, the repository's add, the event
--              drained, its envelope and outbox row (examples/openresty/shop).
-- Each contender runs in STARTS fresh processes (LuaJIT's traces differ from one process start
-- to the next) and reports the median us a unit, the range, the allocation a unit and the ratio
-- to raw in the same run.
--
--   QX_DB__URL=postgresql://... luajit bench/uow_replay_bench.lua [UNITS [STARTS]]
--   (also under lua5.4; the environment UOW_REPLAY_INTERPRETERS="luajit,lua5.4" picks which run)
--
-- Needs `make` (build/luajit, build/lua5.4) and LuaSocket. It migrates the database of the URL
-- and creates the shop's table when missing; the units before the replay are real writes
-- (about 20 orders and outbox rows a process).
local function root()
    local src = debug.getinfo(1, "S").source:gsub("^@", "")
    return src:match("^(.*)/bench/[^/]*$") or "."
end
local ROOT = root()
package.path = ROOT .. "/bench/?.lua;" .. package.path
local B = require "bench_support"

local WARM, RECORD_AFTER = 2000, 20

-- ---- one process: one contender -------------------------------------------------------------

local function child(kind, units)
    local so = jit and "luajit" or "lua5.4"
    package.path = ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;" .. ROOT .. "/spec/?.lua;"
        .. ROOT .. "/examples/openresty/?.lua;" .. package.path
    package.cpath = ROOT .. "/build/" .. so .. "/?.so;" .. package.cpath
    local live = require "wire_sockets"
    local wire = require "qx.store.wire"
    local qx = require "qx"
    local core = require "qx.core"
    local model = require "shop.model"
    local handlers = require "shop.handlers"

    local mode, replies, at = "live", {}, 0
    local Sock = {}
    Sock.__index = Sock
    function Sock:send(d)
        if mode == "replay" then return #d end
        return self.real:send(d)
    end
    function Sock:receiveany(max)
        if mode == "replay" then
            at = at % #replies + 1
            return replies[at]
        end
        local d, e = self.real:receiveany(max)
        if mode == "record" and d then replies[#replies + 1] = d end
        return d, e
    end
    function Sock:close() self.real:close() end
    local base = live.sockets()
    local sockets = {
        connect = function(host, port, name)
            local s, reused = base.connect(host, port, name)
            if not s then return nil, reused end
            return setmetatable({ real = s }, Sock), reused
        end,
        -- as in nginx: commits leave their wake-up to the pool (here it never goes)
        defer = function() return true end,
    }

    do
        local db = assert(qx.connect{ pool_size = 1 })
        assert(qx.migrate(db))
        assert(db:exec(model.SCHEMA))
        db:close()
    end
    local db = assert(wire.db(assert(wire.settings{ pool_size = 1 }), sockets))

    local ORDER = "INSERT INTO shop_orders (id, customer, sku, quantity, status, version, "
        .. "created_at) VALUES ($1, $2, $3, $4, $5, $6, now())"
    local OUTBOX = "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, "
        .. "occurred_at, correlation_id, causation_id, tenant_id, partition_key) VALUES "
        .. "($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING " .. core.TX_ID_COLUMNS
    local cmd = { customer = "c-1", sku = "SKU-1", quantity = 2 }
    local null = qx.null

    local function queue_two(tx)
        local id, eid = qx.uuid(), qx.uuid()
        local at_ = qx.now()
        tx:queue(ORDER, id, cmd.customer, cmd.sku, cmd.quantity, "placed", 1)
        -- as the unit of work queues its outbox row: the transaction's id comes back with it
        tx:queue_id(OUTBOX, eid, "shop.order.placed", 1, {
            event_id = eid, event_name = "shop.order.placed", event_version = 1,
            occurred_at = at_, correlation_id = qx.uuid(), causation_id = null,
            tenant_id = null, actor_id = null,
            payload = { order_id = id, customer = cmd.customer, sku = cmd.sku,
                        quantity = cmd.quantity },
        }, at_, qx.uuid(), null, null, "Order:" .. id)
    end

    local unit
    if kind == "raw" then
        unit = function()
            local conn = assert(db.pool:acquire())
            local tx = conn:tx(nil)
            queue_two(tx)
            assert(tx:commit())
            tx:close()
            conn:release()
        end
    elseif kind == "uow" then
        local function fn(uow) queue_two(uow._tx) end
        unit = function() assert(db:unit_of_work(fn, { context = {} })) end
    else
        unit = function()
            local r, e = handlers.place_order(db, cmd, {})
            if not r then error(tostring(e)) end
        end
    end

    for _ = 1, RECORD_AFTER do unit() end
    mode = "record"
    unit()
    mode = "replay"
    for _ = 1, WARM do unit() end
    local clock = os.clock
    local t0 = clock()
    for _ = 1, units do unit() end
    local us = (clock() - t0) / units * 1e6
    collectgarbage("collect")
    collectgarbage("stop")
    local k0 = collectgarbage("count")
    for _ = 1, 1000 do unit() end
    local bytes = collectgarbage("count") - k0 -- KiB for 1,000 units: bytes a unit
    io.write(string.format("%.3f %.0f\n", us, bytes * 1.024))
end

if arg[1] == "child" then
    child(arg[2], tonumber(arg[3]))
    return
end

-- ---- the run --------------------------------------------------------------------------------

local UNITS = tonumber(arg[1]) or 50000
local STARTS = tonumber(arg[2]) or 5
local KINDS = { "raw", "uow", "place_order" }
local interpreters = {}
for i in (os.getenv("UOW_REPLAY_INTERPRETERS") or "luajit,lua5.4"):gmatch("[^,]+") do
    interpreters[#interpreters + 1] = i
end
local me = B.sh(ROOT .. "/bench/uow_replay_bench.lua")

print(string.format("# the unit of work without I/O: %d units a process, %d process starts "
    .. "a contender, rounds alternating", UNITS, STARTS))
for _, interp in ipairs(interpreters) do
    local times, bytes = {}, {}
    for _, k in ipairs(KINDS) do times[k], bytes[k] = {}, {} end
    for _ = 1, STARTS do
        for _, k in ipairs(KINDS) do
            local out = B.run(interp .. " " .. me .. " child " .. k .. " " .. UNITS)
            local us, b = out:match("^([%d.]+) ([%d.]+)\n$")
            if not us then error(interp .. " " .. k .. ": " .. out, 0) end
            local t = times[k]
            t[#t + 1] = tonumber(us)
            bytes[k][#bytes[k] + 1] = tonumber(b)
        end
    end
    print("")
    print("## " .. interp)
    print("")
    print("| contender | us a unit (median) | range | bytes a unit | / raw |")
    print("| --- | ---: | ---: | ---: | ---: |")
    local raw = B.median(times.raw)
    for _, k in ipairs(KINDS) do
        local t = times[k]
        table.sort(t)
        print(string.format("| %s | %.1f | %.1f-%.1f | %.0f | %.2f |", k, B.median(t), t[1],
                            t[#t], B.median(bytes[k]), B.median(t) / raw))
    end
end

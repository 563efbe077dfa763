-- The shop's command and query handlers. They run in nginx worker threads (qx.openresty), never
-- in the event loop: nginx requires this module once in each thread VM, and the first call in a
-- VM opens that VM's connection pool, which every later call in the VM reuses.
--
-- Nothing here may block at require time (nginx requires the module on the event loop), and
-- nothing here may touch ngx.* request APIs: a thread VM has no request.
local qx = require "qx"
local openresty = require "qx.openresty"
local model = require "shop.model"

local Order = model.Order

local _M = {}

-- place_order{ customer, sku, quantity, id? } -> { id, version }
-- The order row and the shop.order.placed outbox event commit together, or nothing does.
function _M.place_order(db, cmd, context)
    return db:unit_of_work(function(uow)
        local order = assert(Order.place(cmd))
        assert(uow:exec([[INSERT INTO shop_orders (id, customer, sku, quantity, status, version)
                          VALUES ($1, $2, $3, $4, $5, $6)]],
                        order.id, order.customer, order.sku, order.quantity, order.status,
                        order.version))
        uow:track(order)
        return { id = order.id, version = order.version }
    end, { context = context })
end

-- cancel_order{ id, version, reason? } -> { id, version }
-- `version` is the version the client last read: a stale one is a conflict (409).
function _M.cancel_order(db, cmd, context)
    if not qx.is_uuid(cmd.id) then
        return nil, qx.error.new("invalid", "id must be a uuid")
    end
    if type(cmd.version) ~= "number" then
        return nil, qx.error.new("invalid", "version must be the order's current version")
    end
    return db:unit_of_work(function(uow)
        local rows = assert(uow:query(model.SELECT_ORDER .. " FOR UPDATE", cmd.id))
        if #rows == 0 then
            error(qx.error.new("not_found", "no order " .. cmd.id), 0)
        end
        local order = Order.new(rows[1])
        if order.version ~= cmd.version then
            error(qx.error.new("conflict", "order " .. cmd.id .. " is at version " .. order.version
                .. ", not " .. tostring(cmd.version)), 0)
        end
        assert(order:cancel(cmd.reason))
        assert(uow:exec([[UPDATE shop_orders SET status = $2, version = $3, cancelled_at = now()
                          WHERE id = $1]], order.id, order.status, order.version))
        uow:track(order)
        return { id = order.id, version = order.version }
    end, { context = context })
end

-- get_order{ id } -> the order as the read side shows it
function _M.get_order(db, query)
    if not qx.is_uuid(query.id) then
        return nil, qx.error.new("not_found", "no order " .. tostring(query.id))
    end
    local rows, e = db:query(model.SELECT_ORDER, query.id)
    if not rows then return nil, e end
    if #rows == 0 then return nil, qx.error.new("not_found", "no order " .. query.id) end
    return rows[1]
end

return openresty.handlers(_M, { db = { pool_size = 2 } })

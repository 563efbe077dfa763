-- The shop's command and query handlers: fn(db, command, context) -> result | nil, err. They
-- run wherever a db is: in nginx worker threads (shop.commands wraps them for
-- qx.openresty.run), or in the worker itself on cosockets (shop.api with $qx_mode "worker").
-- Nothing here may block at require time, and nothing here may use ngx.* request APIs: a
-- thread VM has no request.
local qx = require "qx"
local model = require "shop.model"

local Order, orders = model.Order, model.orders

local _M = {}

-- place_order{ customer, sku, quantity, id? } -> { id, version }
-- The order row and the shop.order.placed outbox event commit together, or nothing does; a
-- duplicate id is a conflict.
function _M.place_order(db, cmd, context)
    return db:unit_of_work(function(uow)
        local order = assert(Order.place(cmd))
        assert(uow:repo(orders):add(order))
        return { id = order.id, version = order.version }
    end, { context = context })
end

-- cancel_order{ id, version, reason? } -> { id, version }
-- `version` is the version the client read: the repository saves only over that version, so
-- a stale one is a conflict (409) and nothing is written.
function _M.cancel_order(db, cmd, context)
    if not qx.is_uuid(cmd.id) then
        return nil, qx.error.new("invalid", "id must be a uuid")
    end
    if type(cmd.version) ~= "number" then
        return nil, qx.error.new("invalid", "version must be the order's current version")
    end
    return db:unit_of_work(function(uow)
        local repo = uow:repo(orders)
        local order = assert(repo:get(cmd.id))
        assert(order:cancel(cmd.reason))
        order.version = cmd.version
        assert(repo:save(order))
        return { id = order.id, version = order.version }
    end, { context = context })
end

-- Reads need no transaction: a reader runs each statement on a pooled connection.

-- get_order{ id } -> the order
function _M.get_order(db, query)
    if not qx.is_uuid(query.id) then
        return nil, qx.error.new("not_found", "no order " .. tostring(query.id))
    end
    local order, e = orders:reader(db):get(query.id)
    if not order then return nil, e end
    return model.view(order)
end

-- list_orders{ customer?, status?, page? } -> { items, page, page_size, total, pages, has_next }
function _M.list_orders(db, query)
    local filters = {}
    if query.customer then filters[#filters + 1] = { "customer", "eq", query.customer } end
    if query.status then filters[#filters + 1] = { "status", "eq", query.status } end
    local page, e = orders:reader(db):list{ filters = filters, page = query.page or 1,
                                            page_size = 20 }
    if not page then return nil, e end
    for i, order in ipairs(page.items) do page.items[i] = model.view(order) end
    return page
end

return _M

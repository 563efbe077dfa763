-- The shop's domain: an Order aggregate, its integration events and the repository that stores
-- it. Plain Lua, no I/O; the handlers in shop.commands use it inside units of work.
local qx = require "qx"

local type = type
local floor = math.floor
local find = string.find

local _M = {}

_M.OrderPlaced = qx.integration_event("shop.order.placed", { version = 1 })
_M.OrderCancelled = qx.integration_event("shop.order.cancelled", { version = 1 })

local Order = qx.aggregate("Order")
_M.Order = Order

_M.SCHEMA = [[
CREATE TABLE IF NOT EXISTS shop_orders (
    id         uuid PRIMARY KEY,
    customer   text NOT NULL,
    sku        text NOT NULL,
    quantity   integer NOT NULL CHECK (quantity > 0),
    status     text NOT NULL,
    reason     text,
    version    integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
)]]

-- The repository manages id, version, created_at and updated_at; lists may filter on
-- customer and status only, and sort on created_at.
_M.orders = qx.repository{
    table = "shop_orders",
    entity = Order,
    filterable = { "customer", "status" },
    sortable = { "created_at" },
    default_sort = { { "created_at", "desc" } },
}

local function invalid(message)
    return nil, qx.error.new("invalid", message)
end

-- Order.place{ customer, sku, quantity, id? } -> order | nil, err ("invalid")
function Order.place(cmd)
    if type(cmd) ~= "table" then return invalid("expected an object") end
    local customer, sku, quantity = cmd.customer, cmd.sku, cmd.quantity
    if type(customer) ~= "string" or #customer == 0 or #customer > 200 then
        return invalid("customer must be a string of 1 to 200 bytes")
    end
    if type(sku) ~= "string" or not find(sku, "^[A-Z0-9][A-Z0-9-]*$") or #sku > 32 then
        return invalid("sku must be 1 to 32 characters A-Z, 0-9 and -")
    end
    if type(quantity) ~= "number" or quantity ~= floor(quantity) or quantity < 1
       or quantity > 1000 then
        return invalid("quantity must be an integer from 1 to 1000")
    end
    if cmd.id ~= nil and not qx.is_uuid(cmd.id) then
        return invalid("id must be a uuid when given")
    end
    local order = Order.new{ id = cmd.id, customer = customer, sku = sku, quantity = quantity,
                             status = "placed" }
    order:record(_M.OrderPlaced{ order_id = order.id, customer = customer, sku = sku,
                                 quantity = quantity })
    return order
end

-- order:cancel(reason) -> true | nil, err ("conflict" when it is cancelled already)
function Order:cancel(reason)
    if self.status == "cancelled" then
        return nil, qx.error.new("conflict", "order " .. self.id .. " is cancelled already")
    end
    if reason ~= nil and type(reason) ~= "string" then
        return invalid("reason must be a string")
    end
    self.status = "cancelled"
    self.reason = reason
    self:record(_M.OrderCancelled{ order_id = self.id, reason = reason })
    return true
end

-- What the read side shows of an order: plain data, ready for JSON.
function _M.view(order)
    return {
        id = order.id, customer = order.customer, sku = order.sku, quantity = order.quantity,
        status = order.status, reason = order.reason, version = order.version,
        created_at = order.created_at, updated_at = order.updated_at,
    }
end

return _M

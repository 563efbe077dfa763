-- The shop's HTTP API, run by nginx's Lua module in the request (content_by_lua). Its commands
-- and queries (shop.handlers) run one of two ways, chosen per location by the nginx variable
-- $qx_mode:
--   "worker"   in the worker itself, on the worker's own PostgreSQL connections (nginx
--              cosockets through qx.openresty.connect): no thread, no hand-off; while
--              PostgreSQL works, the request's coroutine waits and the event loop serves others.
--   otherwise  in a thread of the "qx" thread pool through qx.openresty.run, on libpq.
-- Either way the event loop never waits for PostgreSQL. docs/openresty.md says which to use when.
local openresty = require "qx.openresty"
local handlers = require "shop.handlers"

local ngx = ngx
local xpcall = xpcall
local traceback = debug.traceback

local POOL = "qx"               -- thread_pool qx ... in nginx.conf
local HANDLERS = "shop.commands"

-- the worker's db, made on its first use (one per nginx worker: cosockets live in a worker)
local worker_db

local function in_worker()
    return ngx.var.qx_mode == "worker"
end

-- A handler in the worker itself. A raised error is logged with its traceback and answered as
-- a 500 without its detail, as qx.openresty.run does for a thread.
local function call(name, cmd, context)
    if not worker_db then
        local db, e = openresty.connect()
        if not db then return nil, e end
        worker_db = db
    end
    local ok, res, err = xpcall(handlers[name], traceback, worker_db, cmd, context)
    if not ok then
        ngx.log(ngx.ERR, "handler '", name, "' raised: ", res)
        return nil, { code = "error", message = "internal error" }
    end
    return res, err
end

local function run(name, cmd, context)
    if in_worker() then return call(name, cmd, context) end
    return openresty.run(POOL, HANDLERS, name, cmd, context)
end

local _M = {}

-- The unit of work's context from the request headers; a malformed id is a 422.
local function context()
    -- three variables, not ngx.req.get_headers(): that builds a table of every header
    local var = ngx.var
    return {
        correlation_id = var.http_x_correlation_id,
        tenant_id = var.http_x_tenant_id,
        user_id = var.http_x_user_id,
    }
end

local function method_not_allowed(allowed)
    ngx.header["Allow"] = allowed
    return openresty.respond(nil, { code = "invalid", message = "method not allowed",
                                    http_status = 405 })
end

-- POST /orders {"customer": "...", "sku": "...", "quantity": n}  -> 201 {"id", "version"}
-- GET /orders?customer=&status=&page=               -> 200 a page of orders, newest first
function _M.orders()
    local method = ngx.req.get_method()
    if method == "GET" or method == "HEAD" then
        local args = ngx.req.get_uri_args(10)
        local query = { page = tonumber(args.page) or 1 }
        if type(args.customer) == "string" then query.customer = args.customer end
        if type(args.status) == "string" then query.status = args.status end
        local res, err = run("list_orders", query)
        return openresty.respond(res, err)
    end
    if method ~= "POST" then return method_not_allowed("GET, HEAD, POST") end
    if in_worker() then
        local cmd, err = openresty.read_json()
        if not cmd then return openresty.respond(nil, err) end
        local res
        res, err = call("place_order", cmd, context())
        return openresty.respond(res, err, 201)
    end
    -- the body goes to the thread as it came and the result comes back as JSON text: the
    -- worker decodes and encodes nothing (qx.openresty.run_json)
    local body, err = openresty.read_body()
    if not body then return openresty.respond(nil, err) end
    local res
    res, err = openresty.run_json(POOL, HANDLERS, "place_order", body, context())
    return openresty.respond_json(res, err, 201)
end

-- GET /orders/{id}                                  -> 200 the order | 404
-- POST /orders/{id}/cancel {"version": n}           -> 200 {"id", "version"} | 404 | 409
function _M.order(id, action)
    local method = ngx.req.get_method()
    if action == nil then
        if method ~= "GET" and method ~= "HEAD" then return method_not_allowed("GET, HEAD") end
        if in_worker() then return openresty.respond(call("get_order", { id = id })) end
        local res, err = openresty.run_json(POOL, HANDLERS, "get_order", { id = id })
        return openresty.respond_json(res, err)
    end
    if action ~= "cancel" then
        return openresty.respond(nil, { code = "not_found", message = "no such action" })
    end
    if method ~= "POST" then return method_not_allowed("POST") end
    local cmd, err = openresty.read_json()
    if not cmd then return openresty.respond(nil, err) end
    cmd.id = id
    local res
    res, err = run("cancel_order", cmd, context())
    return openresty.respond(res, err)
end

-- Any other path: 404 not_found in JSON. An order id that is not a uuid (/orders/nope) names
-- no order, as an unknown uuid does, so it is a 404 too, not a 422: the path is an address
-- the client got wrong, not a field of a command.
function _M.not_found()
    local what = ngx.var.uri:find("^/orders/") and "no such order" or "no such resource"
    return openresty.respond(nil, { code = "not_found", message = what })
end

return _M

-- qx.openresty: command handlers in nginx worker threads, and HTTP helpers for the request.
--
-- In the thread VM (a module on lua_package_path):
--   return require("qx.openresty").handlers({
--       place_order = function(db, cmd, context)
--           return db:unit_of_work(function(uow) ... end, { context = context })
--       end,
--   }, { db = { pool_size = 2 } })
-- In the request (content_by_lua, access_by_lua, rewrite_by_lua):
--   local res, err = openresty.run("qx", "app.commands", "place_order", cmd, context)
--   openresty.respond(res, err, 201)
--
-- For the fewest copies, the request's body goes to the thread as it is and the result comes
-- back as JSON text:
--   local body, err = openresty.read_body()
--   local text
--   if body then text, err = openresty.run_json("qx", "app.commands", "place_order", body) end
--   openresty.respond_json(text, err, 201)
--
-- Or, without threads, in the worker itself through cosockets (qx.openresty.connect): the
-- handlers take that db and run in the request:
--   local db = openresty.connect()            -- once per worker, at module level
--   local res, err = commands.place_order(db, cmd, context)
--
-- threads.lua is the bridge, http.lua the helpers, plain.lua what may cross, cosocket.lua the
-- worker's own connections; see docs/openresty.md for which to use when.
local plain = require "qx.openresty.plain"
local threads = require "qx.openresty.threads"
local http = require "qx.openresty.http"
local cosocket = require "qx.openresty.cosocket"

return {
    _VERSION = "0.1.0",
    MARK = threads.MARK,
    is_plain = plain.is_plain,
    connect = cosocket.connect,
    handlers = threads.handlers,
    thread_pool = threads.thread_pool,
    run = threads.run,
    run_json = threads.run_json,
    stats = threads.stats,
    HTTP_STATUS = http.HTTP_STATUS,
    http_status = http.http_status,
    error_body = http.error_body,
    respond = http.respond,
    read_json = http.read_json,
    read_body = http.read_body,
    respond_json = http.respond_json,
}

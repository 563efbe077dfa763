--- Internal to qx.openresty: the thread bridge. handlers() wraps command handlers in the thread
-- VM; run() calls one from a request through ngx.run_worker_thread, at most `concurrency` calls
-- of one pool at a time per worker. See docs/openresty.md.
local core = require "qx.core"
local qx_error = require "qx.error"
local options = require "qx.options"
local plain = require "qx.openresty.plain"

local type = type
local pairs = pairs
local tostring = tostring
local select = select
local error = error
local pcall = pcall
local xpcall = xpcall
local setmetatable = setmetatable
local getmetatable = getmetatable
local floor = math.floor
local find = string.find
local fmt = string.format
local newproxy = newproxy
local check_plain, plain_error = plain.check_plain, plain.plain_error
local json_encode, json_decode = core.json_encode, core.json_decode
local on_raise, as_error = plain.on_raise, plain.as_error

local _M = {}

-- The first value a wrapped handler returns, so run() can tell wrapped from plain functions.
local MARK = "qx.openresty/1"
_M.MARK = MARK

-- run_json's mode, the third value a wrapped handler is passed
local JSON = "json"

-- The request's JSON text as a table, as read_json() does it in the request: only an object.
local function decode_object(text)
    if type(text) ~= "string" then
        return nil, qx_error.new("invalid", "request body is empty: expected a JSON object",
            { http_status = 400 })
    end
    local v, e = json_decode(text)
    if type(v) ~= "table" or not find(text, "^[ \t\r\n]*{") then
        return nil, qx_error.new("invalid", "request body is not a JSON object"
            .. (e and (": " .. tostring(e.message or e)) or ""), { http_status = 400 })
    end
    return v
end

local DEFAULT_CONCURRENCY = 8
local DEFAULT_QUEUE_TIMEOUT = 30 -- seconds

local function pack(...)
    return { n = select("#", ...), ... }
end

--- The module table for ngx.run_worker_thread: one function per handler. Each connects on its
-- first call in a VM (a failed connect is retried by the next call), runs the handler, and
-- returns MARK, true, result or MARK, false, error; a raised error becomes an error return;
-- the result must be plain data. opts.db: qx.connect options (default pool_size 2 per VM; with
-- shared_pool, one pool for every VM of the process, of qx.connect's default size), or false
-- for no database; opts.connect: fn() -> db | nil, err instead of db.
---@param fns table { name = function(db, command, context) -> result | nil, err }
---@param opts table|nil { db, connect }
---@return table module
function _M.handlers(fns, opts)
    if type(fns) ~= "table" then
        error("qx.openresty.handlers: expected a table of functions", 2)
    end
    for name, fn in pairs(fns) do
        if type(name) ~= "string" or type(fn) ~= "function" then
            error("qx.openresty.handlers: " .. tostring(name) .. " must be a function", 2)
        end
    end
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.openresty.handlers: options must be a table", 2)
    end
    opts = options.check(opts, { "connect", "db" }, "qx.openresty.handlers")
    if opts.connect ~= nil and type(opts.connect) ~= "function" then
        error("qx.openresty.handlers: connect must be a function", 2)
    end
    if opts.db ~= nil and opts.db ~= false and type(opts.db) ~= "table" then
        error("qx.openresty.handlers: db must be a table of qx.connect options or false", 2)
    end
    if opts.connect and opts.db ~= nil then
        error("qx.openresty.handlers: pass db or connect, not both", 2)
    end

    local connect = opts.connect
    if opts.db == false then
        connect = function() return false end
    elseif not connect then
        local db_opts = {}
        for k, v in pairs(opts.db or {}) do db_opts[k] = v end
        -- a pool per VM serves one call at a time; a shared pool keeps qx.connect's default
        -- (QX_DB__POOL_SIZE, else 10)
        if db_opts.shared_pool == nil and db_opts.pool_size == nil then db_opts.pool_size = 2 end
        connect = function() return require("qx").connect(db_opts) end
    end

    local db -- this VM's pool, made by the first call (false: the handlers use none)
    local function get_db()
        if db ~= nil then return db end
        local ok, d, e = pcall(connect)
        if not ok then return nil, qx_error.from_raised(d) end
        if d == false and opts.db == false then
            db = false
            return db
        end
        if not d then
            return nil, e or qx_error.new("connection", "connect returned nothing")
        end
        db = d
        return db
    end

    local module = {}
    for name, fn in pairs(fns) do
        module[name] = function(command, context, mode)
            local d, e = get_db()
            if d == nil then return MARK, false, plain_error(e) end
            if mode == JSON and type(command) ~= "table" then
                -- run_json: the command arrives as the request's JSON text
                command, e = decode_object(command)
                if command == nil then return MARK, false, plain_error(e) end
            end
            local r = pack(xpcall(fn, on_raise, d or nil, command, context))
            if not r[1] then return MARK, false, plain_error(r[2]) end
            local res, rerr = r[2], r[3]
            if res == nil and rerr ~= nil then return MARK, false, plain_error(rerr) end
            if mode == JSON then
                if res == nil then return MARK, true, nil end
                local text, why = json_encode(res)
                if not text then
                    return MARK, false, plain_error(qx_error.new("error", "handler '" .. name
                        .. "' returned data that JSON cannot hold: " .. tostring(why and why.message
                        or why) .. " (return plain tables, strings, numbers, booleans)"))
                end
                return MARK, true, text
            end
            local ok, why = check_plain(res, "result", {}, 0)
            if not ok then
                return MARK, false, plain_error(qx_error.new("error", "handler '" .. name
                    .. "' returned data that cannot leave its thread: " .. why
                    .. " (return plain tables, strings, numbers, booleans)"))
            end
            return MARK, true, res
        end
    end
    -- For tests and diagnostics: this VM's pool (nil before the first call or without one).
    module.__qx_db = function() return db or nil end
    return module
end

-- The request side: at most `concurrency` calls of a pool at once per worker.

local limits = {}  -- pool name -> { concurrency =, queue_timeout = }
local gates = {}   -- pool name -> ngx.semaphore, per worker, made on first use

--- How many calls of this pool one worker runs at once and how long (seconds) a call waits for
-- its turn. Call it in init_by_lua (or before the first run of that pool in each worker).
---@param name string the nginx thread pool
---@param opts table|nil { concurrency = 8, queue_timeout = 30 }
function _M.thread_pool(name, opts)
    if type(name) ~= "string" or name == "" then
        error("qx.openresty.thread_pool: name must be a non-empty string", 2)
    end
    if type(opts) ~= "table" then
        error("qx.openresty.thread_pool: expected { concurrency =, queue_timeout = }", 2)
    end
    options.check(opts, { "concurrency", "queue_timeout" }, "qx.openresty.thread_pool")
    local c, q = opts.concurrency, opts.queue_timeout
    if c ~= nil and (type(c) ~= "number" or c < 1 or c ~= floor(c)) then
        error("qx.openresty.thread_pool: concurrency must be a positive integer", 2)
    end
    if q ~= nil and (type(q) ~= "number" or q < 0) then
        error("qx.openresty.thread_pool: queue_timeout must be a number of seconds >= 0", 2)
    end
    if gates[name] then
        error("qx.openresty.thread_pool: pool '" .. name .. "' is already in use in this worker", 2)
    end
    limits[name] = {
        concurrency = c or DEFAULT_CONCURRENCY,
        queue_timeout = q or DEFAULT_QUEUE_TIMEOUT,
    }
end

local function limit_of(pool)
    local l = limits[pool]
    if not l then
        l = { concurrency = DEFAULT_CONCURRENCY, queue_timeout = DEFAULT_QUEUE_TIMEOUT }
        limits[pool] = l
    end
    return l
end

-- A finaliser that gives a slot back if the request's coroutine is dropped while its call
-- runs (lua_check_client_abort, ngx.exit from another light thread): the code after the call
-- never runs then, and the slot would be lost for the life of the worker.
local function slot_guard(gate)
    local slot = { held = true }
    local function on_gc()
        if slot.held then
            slot.held = false
            gate:post(1)
        end
    end
    if newproxy then
        local p = newproxy(true)
        getmetatable(p).__gc = on_gc
        slot.proxy = p
    else
        slot.proxy = setmetatable({}, { __gc = on_gc })
    end
    return slot
end

local function acquire(pool)
    local gate = gates[pool]
    local l = limit_of(pool)
    if not gate then
        local semaphore = require "ngx.semaphore"
        local e
        gate, e = semaphore.new(l.concurrency)
        if not gate then
            return nil, qx_error.new("error", "cannot make a semaphore: " .. tostring(e))
        end
        gates[pool] = gate
    end
    local ok, e = gate:wait(l.queue_timeout)
    if not ok then
        if e == "timeout" then
            return nil, qx_error.new("timeout", fmt("no thread of pool '%s' became free within "
                .. "%s s (%d calls run at once per worker)", pool, tostring(l.queue_timeout),
                l.concurrency), { retryable = true })
        end
        return nil, qx_error.new("error", "waiting for pool '" .. pool .. "': " .. tostring(e))
    end
    return slot_guard(gate), gate
end

local function release(slot, gate)
    if slot.held then
        slot.held = false
        gate:post(1)
    end
end

-- `debug` is logged by respond() but never sent to the client (it may name files).
local function config_error(message, debug)
    return qx_error.new("config", message, { debug = debug })
end

-- Turns ngx.run_worker_thread's `false, message` into the qx shape.
local function translate(msg, pool, module, func)
    msg = tostring(msg)
    local l = limits[pool]
    if find(msg, "^thread pool .* not found") or msg == "thread_pool not found" then
        return config_error(fmt("thread pool '%s' not found: declare `thread_pool %s threads=N;` "
            .. "in the main (top-level) context of nginx.conf", pool, pool))
    elseif msg == "no available Lua vm" then
        return config_error(fmt("no free Lua VM for worker threads: raise "
            .. "lua_worker_thread_vm_pool_size above the calls run at once "
            .. "(qx.openresty.thread_pool('%s', { concurrency = %d }))", pool,
            l and l.concurrency or DEFAULT_CONCURRENCY))
    elseif msg == "ngx_thread_task_post failed" then
        return config_error(fmt("thread pool '%s' refused the call (its queue is full): raise "
            .. "max_queue= of `thread_pool %s` or lower the concurrency of "
            .. "qx.openresty.thread_pool('%s')", pool, pool, pool))
    elseif msg == "invalid lua module" then
        return config_error(fmt("handler module '%s' does not return a table", module))
    elseif msg == "invalid function" then
        return config_error(fmt("handler module '%s' has no function '%s'", module, func))
    elseif find(msg, "module '" .. module .. "' not found", 1, true) then
        return config_error(fmt("handler module '%s' not found on lua_package_path", module),
            msg)
    elseif find(msg, "^error loading module") then
        return config_error(fmt("handler module '%s' does not load (see the error log)", module),
            msg)
    elseif find(msg, "in the return value$") then
        return qx_error.new("error", fmt("handler %s.%s returned data that cannot leave its "
            .. "thread: %s", module, func, msg))
    end
    return qx_error.new("error", fmt("handler %s.%s failed: %s", module, func, msg))
end

local function check_names(what, pool, module, func)
    if type(pool) ~= "string" or pool == "" then
        error(what .. ": pool must be a thread pool name", 3)
    end
    if type(module) ~= "string" or module == "" then
        error(what .. ": module must be a module name", 3)
    end
    if type(func) ~= "string" or func == "" then
        error(what .. ": func must be a function name", 3)
    end
end

local function check_nginx(what)
    local ngx = ngx
    if type(ngx) ~= "table" or type(ngx.run_worker_thread) ~= "function" then
        error(what .. ": needs nginx with lua-nginx-module 0.10.23 or later "
            .. "(ngx.run_worker_thread)", 3)
    end
end

-- One call through the pool's gate: pcall's results of ngx.run_worker_thread, or nil, err.
local function call(what, pool, module, func, command, context, mode)
    local slot, gate = acquire(pool)
    if not slot then return nil, gate end
    local r = pack(pcall(ngx.run_worker_thread, pool, module, func, command, context, mode))
    release(slot, gate)
    if not r[1] then
        -- raised: e.g. called from a phase that cannot yield
        error(what .. ": " .. tostring(r[2]), 3)
    end
    return r
end

--- Runs module.func(command, context) on a thread of the nginx thread pool `pool`. Call it
-- where the request may yield (rewrite, access, content phases; ngx.timer callbacks).
---@param pool string
---@param module string the module name the thread requires
---@param func string the handler's name
---@param command any plain data
---@param context table|nil plain data
---@return any|nil result
---@return qx.Error? err timeout when the queue wait runs out
function _M.run(pool, module, func, command, context)
    check_names("qx.openresty.run", pool, module, func)
    local ok, why = check_plain(command, "command", {}, 0)
    if ok then ok, why = check_plain(context, "context", {}, 0) end
    if not ok then
        error("qx.openresty.run: " .. why .. "; only plain data crosses into a thread", 2)
    end
    check_nginx("qx.openresty.run")
    local r, e = call("qx.openresty.run", pool, module, func, command, context)
    if not r then return nil, e end
    if not r[2] then
        return nil, translate(r[3], pool, module, func)
    end
    if r[3] == MARK then
        if r[4] then return r[5] end
        return nil, as_error(r[5])
    end
    -- a function not made by handlers(): the usual result | nil, err
    if r[3] == nil and r[4] ~= nil then return nil, as_error(r[4]) end
    return r[3]
end

--- As run(), with the command as JSON text (the request body as read: read_body()) and the
-- result as JSON text (for respond_json()): the thread decodes and encodes, so the worker
-- copies two strings and touches no table of the command or the result. A body that is not a
-- JSON object is "invalid" with http_status 400 and the handler does not run. The command may
-- also be plain data (a table), passed as run() passes it. Only handlers made by handlers()
-- can be called this way (another function would be passed the text and refused after).
---@param pool string
---@param module string the module name the thread requires
---@param func string the handler's name
---@param body string|table the command: a JSON object's text, or plain data
---@param context table|nil plain data
---@return string|nil json the result as JSON text (nil when the handler returned nothing)
---@return qx.Error? err as run(); invalid (400) for a body that is not a JSON object
function _M.run_json(pool, module, func, body, context)
    check_names("qx.openresty.run_json", pool, module, func)
    local ok, why = true, nil
    if type(body) ~= "string" then
        if type(body) ~= "table" then
            error("qx.openresty.run_json: body must be the JSON text of the command or a table", 2)
        end
        ok, why = check_plain(body, "command", {}, 0)
    end
    if ok then ok, why = check_plain(context, "context", {}, 0) end
    if not ok then
        error("qx.openresty.run_json: " .. why .. "; only plain data crosses into a thread", 2)
    end
    check_nginx("qx.openresty.run_json")
    local r, e = call("qx.openresty.run_json", pool, module, func, body, context, JSON)
    if not r then return nil, e end
    if not r[2] then
        return nil, translate(r[3], pool, module, func)
    end
    if r[3] ~= MARK then
        return nil, config_error(fmt("handler module '%s' was not made by "
            .. "qx.openresty.handlers: run_json needs its wrapper to decode and encode JSON",
            module))
    end
    if r[4] then return r[5] end
    return nil, as_error(r[5])
end

--- For the request side's own diagnostics: the calls in flight and waiting per pool.
---@return table
function _M.stats()
    local out = {}
    for name, gate in pairs(gates) do
        local l = limits[name]
        local free = gate:count()
        out[name] = {
            concurrency = l.concurrency,
            running = free >= 0 and l.concurrency - free or l.concurrency,
            waiting = free < 0 and -free or 0,
        }
    end
    return out
end

return _M

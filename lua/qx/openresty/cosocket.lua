--- qx.openresty.connect: a db whose connections are nginx cosockets, spoken to by the core's
-- wire codec in the worker itself: no thread, no hand-off, and the event loop never waits (a
-- cosocket yields the request's coroutine until PostgreSQL answers). Call it once per worker
-- (at module level or in init_worker_by_lua) and use the db in any phase that allows
-- cosockets (content, access, rewrite, timers). See docs/openresty.md.
local settings = require "qx.settings"
local options = require "qx.options"
local wire = require "qx.store.wire"

local ngx = ngx
local pairs = pairs
local type = type
local error = error

local _M = {}

-- how long a released connection's socket stays open for the next request
local KEEPALIVE_MS = 60000
-- a read or write that waits longer than this without a statement timeout to bound it
local IO_TIMEOUT_MS = 24 * 3600 * 1000
-- after the statement timeout, the time the server has to report it
local IO_MARGIN_MS = 10000

local KNOWN = { dispatcher = true }
for k in pairs(settings.DB_OPTIONS) do KNOWN[k] = true end

local function sockets(cfg)
    local semaphore = require "ngx.semaphore"
    local sema = semaphore.new(cfg.pool_size)
    local connect_ms = cfg.connect_timeout_ms
    if not connect_ms or connect_ms <= 0 then connect_ms = IO_TIMEOUT_MS end
    local io_ms = IO_TIMEOUT_MS
    if cfg.statement_timeout_ms and cfg.statement_timeout_ms > 0 then
        io_ms = cfg.statement_timeout_ms + IO_MARGIN_MS
    end
    local tcp = ngx.socket.tcp
    local pools = {} -- name -> the connect options naming its keepalive pool, made once
    return {
        connect = function(host, port, name)
            local sock = tcp()
            sock:settimeouts(connect_ms, io_ms, io_ms)
            local popts = pools[name]
            if not popts then
                popts = { pool = name }
                pools[name] = popts
            end
            local ok, e
            if host:sub(1, 1) == "/" then
                ok, e = sock:connect("unix:" .. host .. "/.s.PGSQL." .. port, popts)
            else
                ok, e = sock:connect(host, port, popts)
            end
            if not ok then return nil, e end
            return sock, sock:getreusedtimes() > 0
        end,
        forget = function(name)
            pools[name] = nil
        end,
        keep = function(sock)
            return sock:setkeepalive(KEEPALIVE_MS, 1)
        end,
        wait = function(seconds)
            return sema:wait(seconds)
        end,
        post = function()
            sema:post(1)
        end,
        defer = function(fn, ...)
            return ngx.timer.at(0, function(premature, ...)
                -- nginx is exiting: the listeners find the rows when they poll
                if not premature then fn(...) end
            end, ...)
        end,
        sleep = function(seconds)
            return ngx.sleep(seconds)
        end,
        log = function(message)
            ngx.log(ngx.ERR, message)
        end,
    }
end

--- qx.openresty.connect([opts]) -> db | nil, err: qx.connect's options (url, pool_size,
-- pool_timeout_seconds, statement_timeout_ms, connect_timeout_seconds, dispatcher, ...; the
-- same QX_DB__* variables). pool_size is per nginx worker. The url is checked here; the first
-- connection opens with the first use.
---@param opts qx.ConnectOptions|nil
---@return qx.Db|nil db
---@return qx.Error? err
function _M.connect(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("qx.openresty.connect: options must be a table", 2)
    end
    opts = options.check(opts, KNOWN, "qx.openresty.connect")
    if not (ngx and ngx.socket and ngx.socket.tcp) then
        error("qx.openresty.connect: needs nginx's Lua module (ngx.socket.tcp)", 2)
    end
    local db_opts = {}
    for k in pairs(settings.DB_OPTIONS) do db_opts[k] = opts[k] end
    local cfg, e = settings.db(db_opts)
    if not cfg then return nil, e end
    return wire.db(cfg, sockets(cfg), opts.dispatcher)
end

return _M

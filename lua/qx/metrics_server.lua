--- Internal: the /metrics and /health server a runner (the relay, a projection, a consumer)
-- starts when its run is given metrics_listen. The server is a thread of the C core
-- (src/core/httpd.c); the runner's loop calls tick() once a turn, which hands over a heartbeat
-- and, at most every refresh_seconds, a new Prometheus text. A scrape never waits for the loop
-- and the loop never waits for a scrape. See docs/cli.md, "Metrics and health".
local core = require "qx.core"
local options = require "qx.options"

local type = type
local floor = math.floor
local clock = core.clock
local setmetatable = setmetatable

local _M = { _VERSION = "0.1.0", REFRESH_SECONDS = 1, STALE_MS = 5000 }

local Server = {}
Server.__index = Server

--- The run options this module reads (a runner adds them to its own list).
_M.OPTIONS = { "metrics_listen", "health_stale_ms" }

--- Starts the server when opts.metrics_listen is set. Misuse (not a string, a stale limit that
-- is not a positive integer) raises at the caller; an address that cannot be bound returns
-- nil, err (code invalid), before the runner does anything.
---@param opts table the run's options: metrics_listen = "HOST:PORT", health_stale_ms = n
---@param what string the runner, for messages ("relay:run")
---@param stale_ms integer the default for health_stale_ms
---@param text fun(): string|nil the runner's Prometheus text
---@return table|nil server nil when metrics_listen is not set, or on an error
---@return qx.Error? err invalid
function _M.start(opts, what, stale_ms, text)
    local listen = opts.metrics_listen
    if listen == nil then return nil end
    if type(listen) ~= "string" then
        options.raise(what .. ": metrics_listen must be a string HOST:PORT")
    end
    local stale = opts.health_stale_ms
    if stale ~= nil and (type(stale) ~= "number" or stale ~= floor(stale) or stale < 1
                         or stale > 2147483647) then
        options.raise(what .. ": health_stale_ms must be an integer >= 1")
    end
    local handle, e = core.metrics_server{ listen = listen, stale_ms = stale or stale_ms }
    if not handle then return nil, e end
    local s = setmetatable({ handle = handle, text = text, published_at = -1 }, Server)
    local t = text()
    if t then handle:publish(t) end
    s.published_at = clock()
    return s
end

--- The loop turned: up says its connections are up (else why, a reason for /health).
---@param up boolean
---@param why string|nil
function Server:tick(up, why)
    local h = self.handle
    h:beat(up, type(why) == "string" and why or nil)
    local now = clock()
    if now - self.published_at >= _M.REFRESH_SECONDS then
        self.published_at = now
        local t = self.text()
        if t then h:publish(t) end
    end
end

--- The port it listens on.
---@return integer
function Server:port() return self.handle:port() end

--- Stops serving; the port is free again. Twice is harmless.
function Server:close() self.handle:close() end

return _M

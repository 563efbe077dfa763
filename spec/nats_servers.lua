-- Private nats-servers for specs that stop, freeze or kill one: a single server or a JetStream
-- cluster of several on 127.0.0.1, each in a folder of its own under one temporary folder, so
-- nothing they do disturbs the suite's shared server. Stop what you start: `set:stop_all()`.
local core = require "qx.core"

local clock = core.clock

local M = {}

local function sh(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end

local function pause(seconds)
    sh(("sleep %.3f"):format(seconds))
end
M.pause = pause

local function slurp(path)
    local f = io.open(path)
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

-- ports handed out by this process, and the ones some socket has (/proc/net/tcp*)
local given = {}
local function port_used(port)
    if given[port] then return true end
    local hex = (":%04X "):format(port)
    for _, path in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
        if slurp(path):find(hex, 1, true) then return true end
    end
    return false
end

-- a free port below the ephemeral range (32768+)
local seeded = false
local function free_port()
    if not seeded then
        math.randomseed(math.floor(clock() * 1000) % 2147483647)
        seeded = true
    end
    for _ = 1, 500 do
        local p = math.random(20000, 32000)
        if not port_used(p) then
            given[p] = true
            return p
        end
    end
    error("no free port found")
end

local Node = {}
Node.__index = Node

function Node:url() return "nats://127.0.0.1:" .. self.port end

function Node:running()
    return self.pid ~= nil and sh("kill -0 " .. self.pid .. " 2>/dev/null && echo alive") ~= ""
end

-- starts the node (again: same port, same store) and waits until it listens
function Node:start()
    assert(not self.pid, "node already started")
    os.remove(self.dir .. "/log")
    self.pid = tonumber(sh(("nats-server -c %s -l %s/log >/dev/null 2>&1 & echo $!")
                           :format(self.conf, self.dir)):match("%d+"))
    local deadline = clock() + 15
    repeat
        local log = slurp(self.dir .. "/log")
        if log:match("Server is ready") then return self end
        if not self:running() then break end
        pause(0.05)
    until clock() > deadline
    error("nats-server " .. self.name .. " did not start:\n" .. slurp(self.dir .. "/log"))
end

-- sends a signal and forgets the process when it is gone
function Node:stop(signal)
    if not self.pid then return end
    if self.frozen then self:thaw() end
    sh(("kill -%s %d 2>/dev/null"):format(signal or "TERM", self.pid))
    local deadline = clock() + 10
    while self:running() and clock() < deadline do pause(0.05) end
    if self:running() then sh("kill -KILL " .. self.pid .. " 2>/dev/null") end
    self.pid = nil
end

function Node:kill() self:stop("KILL") end

-- SIGSTOP: the process keeps its sockets open and answers nothing, like a frozen host
function Node:freeze()
    sh("kill -STOP " .. self.pid)
    self.frozen = true
end

function Node:thaw()
    sh("kill -CONT " .. self.pid)
    self.frozen = false
end

local Set = {}
Set.__index = Set

function Set:urls()
    local u = {}
    for i, n in ipairs(self.nodes) do u[i] = n:url() end
    return table.concat(u, ",")
end

function Set:stop_all()
    for _, n in ipairs(self.nodes) do n:stop() end
    if self.root then sh("rm -rf " .. self.root) end
    self.root = nil
end

-- the node whose monitoring port says it leads `stream` (nil while none does)
function Set:stream_leader(stream)
    for _, n in ipairs(self.nodes) do
        if n.pid and not n.frozen then
            local body = sh(("curl -s -m 2 'http://127.0.0.1:%d/jsz?streams=1' 2>/dev/null"):format(n.mport))
            if body:find('"name":"' .. stream .. '"', 1, true) then
                local cluster = body:match('"name":"' .. stream .. '".-"cluster":(%b{})')
                local leader = cluster and cluster:match('"leader":"([^"]*)"')
                if leader and leader ~= "" then
                    for _, m in ipairs(self.nodes) do
                        if m.name == leader then return m end
                    end
                end
            end
        end
    end
end

-- start{ nodes = 1 | 3, jetstream = true, cluster = nodes > 1 } -> a set of started nodes;
-- with cluster, the nodes form one (routes to each other), else each stands alone
function M.start(opts)
    opts = opts or {}
    local count = opts.nodes or 1
    local root = os.tmpname()
    os.remove(root)
    sh("mkdir -p " .. root)
    local set = setmetatable({ root = root, nodes = {} }, Set)
    local routes = {}
    for i = 1, count do
        local n = setmetatable({ name = "n" .. i, dir = root .. "/n" .. i, port = free_port(),
                                 mport = free_port(), cport = free_port() }, Node)
        set.nodes[i] = n
        routes[i] = "nats-route://127.0.0.1:" .. n.cport
    end
    for _, n in ipairs(set.nodes) do
        sh("mkdir -p " .. n.dir)
        n.conf = n.dir .. "/server.conf"
        local lines = {
            "server_name: " .. n.name,
            "listen: 127.0.0.1:" .. n.port,
            "http: 127.0.0.1:" .. n.mport,
        }
        if opts.jetstream ~= false then
            lines[#lines + 1] = 'jetstream { store_dir: "' .. n.dir .. '/js" }'
        end
        if opts.cluster == nil and count > 1 or opts.cluster then
            lines[#lines + 1] = "cluster { name: qxspec, listen: 127.0.0.1:" .. n.cport
                                .. ", routes: [ " .. table.concat(routes, ", ") .. " ] }"
        end
        local f = assert(io.open(n.conf, "w"))
        f:write(table.concat(lines, "\n"), "\n")
        f:close()
    end
    local ok, err = pcall(function()
        for _, n in ipairs(set.nodes) do n:start() end
    end)
    if not ok then
        set:stop_all()
        error(err, 0)
    end
    return set
end

return M

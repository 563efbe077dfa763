-- Private nats-servers for specs that kill, freeze or restart one: a JetStream cluster of
-- several nodes on 127.0.0.1 (or servers standing alone), started with scripts/nats-cluster.sh
-- in a temporary folder of their own, so nothing they do disturbs the suite's shared server.
-- Stop what you start: `set:stop_all()`.
local core = require "qx.core"

local clock = core.clock

local M = {}

local SCRIPT = "scripts/nats-cluster.sh"

local function sh(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end

-- runs the script; raises with its output when it fails
local function script(...)
    local args = table.concat({ ... }, " ")
    local out = sh(("bash %s %s 2>&1; echo \"rc=$?\""):format(SCRIPT, args))
    local rc = tonumber(out:match("rc=(%d+)%s*$"))
    if rc ~= 0 then error("nats-cluster.sh " .. args .. " failed:\n" .. out, 2) end
    return out
end

function M.pause(seconds)
    sh(("sleep %.3f"):format(seconds))
end

local Node = {}
Node.__index = Node

function Node:url() return "nats://127.0.0.1:" .. self.port end
function Node:kill() script("kill", self.set.root, self.name) end
function Node:restart() script("restart", self.set.root, self.name) end

-- SIGSTOP: the process keeps its sockets open and answers nothing, like a frozen host
function Node:freeze()
    script("freeze", self.set.root, self.name)
    self.frozen = true
end

function Node:thaw()
    script("thaw", self.set.root, self.name)
    self.frozen = false
end

local Set = {}
Set.__index = Set

function Set:urls()
    local u = {}
    for i, n in ipairs(self.nodes) do u[i] = n:url() end
    return table.concat(u, ",")
end

function Set:node(name)
    for _, n in ipairs(self.nodes) do
        if n.name == name then return n end
    end
end

function Set:stop_all()
    if not self.root then return end
    script("stop", self.root)
    sh("rm -rf " .. self.root)
    self.root = nil
end

-- the node that leads `stream` as a node not frozen reports it (nil while none does)
function Set:stream_leader(stream)
    for _, n in ipairs(self.nodes) do
        if not n.frozen then
            local body = sh(("curl -s -m 2 'http://127.0.0.1:%d/jsz?streams=1' 2>/dev/null")
                            :format(n.mport)):gsub("%s+", "")
            local at = body:find('"name":"' .. stream .. '"', 1, true)
            local leader = at and body:match('"cluster":%b{}', at)
            leader = leader and leader:match('"leader":"([^"]+)"')
            if leader then return self:node(leader) end
        end
    end
end

-- waits up to `seconds` for fn() to return a true value, which it returns
function M.wait_until(fn, seconds)
    local deadline = clock() + seconds
    repeat
        local v = fn()
        if v then return v end
        M.pause(0.05)
    until clock() > deadline
end

-- start{ nodes = 3, cluster = true } -> a set of started nodes; with cluster = false the nodes
-- stand alone
function M.start(opts)
    opts = opts or {}
    local count = opts.nodes or 3
    local root = os.tmpname()
    os.remove(root)
    local env = opts.cluster == false and "QX_CLUSTER_STANDALONE=1 " or ""
    local out = sh(("%sbash %s start %s %d 2>&1; echo \"rc=$?\""):format(env, SCRIPT, root, count))
    if tonumber(out:match("rc=(%d+)%s*$")) ~= 0 then
        sh(("bash %s stop %s >/dev/null 2>&1; rm -rf %s"):format(SCRIPT, root, root))
        error("nats-cluster.sh start failed:\n" .. out)
    end
    local f = assert(io.open(root .. "/env"))
    local text = f:read("*a")
    f:close()
    local set = setmetatable({ root = root, nodes = {} }, Set)
    for i = 1, count do
        set.nodes[i] = setmetatable({
            set = set, name = "n" .. i,
            port = tonumber(text:match("QX_CLUSTER_N" .. i .. "_PORT=(%d+)")),
            mport = tonumber(text:match("QX_CLUSTER_N" .. i .. "_MONITOR_PORT=(%d+)")),
        }, Node)
    end
    return set
end

return M

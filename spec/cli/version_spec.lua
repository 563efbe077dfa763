-- One version, written once (lua/qx/version.lua), told the same by qx._VERSION, `qx --version`,
-- `qx version` and the release's rockspec; and the rockspecs' dependency line.
local qx = require "qx"
local support = require "support"
local sh, slurp = support.sh, support.slurp

local INTERP = jit and "luajit" or "lua5.4"
local VERSION = require "qx.version"

-- bin/qx with the interpreter running the specs and its module paths; returns code, output
local function qx_cli(arg)
    local p = assert(io.popen("env LUA_PATH=" .. sh(package.path) .. " LUA_CPATH=" .. sh(package.cpath)
        .. " " .. INTERP .. " bin/qx " .. arg .. " 2>&1; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    return tonumber(out:match("exit=(%d+)%s*$")), (out:gsub("exit=%d+%s*$", ""))
end

describe("qx's version", function()
    it("is a semantic version, and qx._VERSION is it", function()
        assert.truthy(VERSION:match("^%d+%.%d+%.%d+$"), VERSION)
        assert.equal(VERSION, qx._VERSION)
    end)

    it("is what `qx --version` and `qx version` print", function()
        for _, arg in ipairs({ "--version", "version" }) do
            local code, out = qx_cli(arg)
            assert.equal(0, code, out)
            assert.equal("qx " .. VERSION .. " on ", out:match("^qx %S+ on "), out)
        end
    end)

    it("has its release rockspec, whose source is the tag v<version>", function()
        local spec = slurp("rockspec/qx-" .. VERSION .. "-1.rockspec")
        assert.equal(VERSION .. "-1", spec:match('\nversion = "([^"]+)"'))
        assert.equal("v" .. VERSION, spec:match('\nsource = {.-\n  tag = "([^"]+)"'))
        assert.equal("scm-1", slurp("rockspec/qx-scm-1.rockspec"):match('\nversion = "([^"]+)"'))
    end)

    it("is the newest release of CHANGELOG.md, below its Unreleased section", function()
        local log = slurp("CHANGELOG.md")
        local first, second = log:match("\n## %[([^%]]+)%].-\n## %[([^%]]+)%]")
        assert.equal("Unreleased", first)
        assert.equal(VERSION, second)
    end)
end)

describe("the rockspecs' dependencies", function()
    for _, name in ipairs({ "scm", VERSION }) do
        it(("are Lua and the lua-cjson rock in qx-%s-1.rockspec"):format(name), function()
            local spec = slurp("rockspec/qx-" .. name .. "-1.rockspec")
            local deps = assert(spec:match("\ndependencies = (%b{})"), "no dependencies")
            local list = {}
            for dep in deps:gmatch('"([^"]+)"') do list[#list + 1] = dep end
            assert.same({ "lua >= 5.1", "lua-cjson >= 2.1" }, list)
        end)
    end
end)

-- The README's install commands, run as written (into a temporary tree, offline): the installed
-- `qx` runs the interpreter its rock was built for, and the checkout is left as it was. The rock
-- depends on the lua-cjson rock, which is not installed as a rock here (Debian's lua-cjson is a
-- system package): --deps-mode=one still installs, because scripts/rock.sh declares the cjson the
-- interpreter loads as provided, and no network is needed.
local support = require "support"
local sh, slurp = support.sh, support.slurp
local VERSION = require "qx.version"

-- the commands of the README's "## Install" block: { lua = "5.4" | "luajit", command }
local function readme_install_commands()
    local readme = slurp("README.md")
    local block = assert(readme:match("\n## Install\n.-```sh\n(.-)```"), "no install block")
    local out, luajit_next = {}, false
    for line in block:gmatch("[^\n]+") do
        if line:match("^%s*#") then
            luajit_next = line:find("LuaJIT", 1, true) ~= nil
        elseif line:find("%S") then
            out[#out + 1] = { lua = luajit_next and "luajit" or "5.4", command = line }
        end
    end
    return out
end

-- runs a shell command; returns exit code, output (stdout and stderr)
local function run(cmd)
    local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    return tonumber(out:match("exit=(%d+)%s*$")), (out:gsub("exit=%d+%s*$", ""))
end

-- a user's PATH: without the sanitized interpreters the asan and tsan runs put first (luarocks
-- looks for Lua's headers beside the interpreter it finds)
local function user_path()
    local keep = {}
    for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
        if not dir:find("/build/[%w]+/bin$") then keep[#keep + 1] = dir end
    end
    return "PATH=" .. sh(table.concat(keep, ":")) .. " "
end

-- everything git sees in the checkout, ignored files too (a stray qx/core.so is ignored)
local function tree_state()
    local _, out = run("git status --porcelain --ignored --untracked-files=all"
        .. " | grep -v -e ' \\.run/' -e ' build/' -e ' bench/out/' -e 'luacov\\.'")
    return out
end

describe("the README's install commands #slow", function()
    local commands = readme_install_commands()

    it("names a Lua 5.4 and a LuaJIT install", function()
        local seen = {}
        for _, c in ipairs(commands) do seen[c.lua] = true end
        assert.is_true(seen["5.4"] and seen.luajit, "commands: " .. #commands)
    end)

    it("install the release rockspec, which depends on the lua-cjson rock", function()
        for _, c in ipairs(commands) do
            assert.truthy(c.command:find("rockspec/qx-" .. VERSION .. "-1.rockspec", 1, true), c.command)
        end
        assert.truthy(slurp("rockspec/qx-" .. VERSION .. "-1.rockspec")
            :find('\n  "lua-cjson >= 2.1",\n', 1, true))
    end)

    for _, c in ipairs(commands) do
        it(("install a qx that runs on %s and leave the checkout clean: %s"):format(
            c.lua == "luajit" and "LuaJIT" or "Lua 5.4", c.command), function()
            local tree = os.tmpname()
            os.remove(tree)
            local before = tree_state()
            local code, out = run(user_path() .. c.command .. " --tree " .. sh(tree) .. " --deps-mode=one")
            local after = tree_state()
            finally(function() os.execute("rm -rf " .. sh(tree)) end)
            assert.equal(0, code, out)
            assert.equal(before, after, "the install left files in the checkout")
            -- the installed command with no module paths of ours: it finds its own tree
            local vcode, version = run(user_path() .. "env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4"
                .. " -u LUA_CPATH_5_4 " .. sh(tree .. "/bin/qx") .. " --version")
            assert.equal(0, vcode, version)
            assert.truthy(version:find("qx " .. VERSION .. " on ", 1, true), version)
            if c.lua == "luajit" then
                assert.truthy(version:find("LuaJIT", 1, true), version)
            else
                assert.truthy(version:find("Lua 5.4", 1, true), version)
                assert.falsy(version:find("LuaJIT", 1, true), version)
            end
        end)
    end
end)

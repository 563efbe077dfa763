-- The documentation's code runs. Every ```lua block of README.md, docs/*.md and
-- examples/*/README.md is loaded and run against the test servers (QX_DB__URL, and
-- QX_NATS__SERVERS for the blocks that use NATS), each in an environment of its own whose `qx`
-- is the module, so a snippet that stops working fails here.
--
-- Conventions of the Markdown (written in docs/guide.md's last section too):
--   <!-- fragment -->        on the line before a fence (or ```lua fragment): a piece of a
--                            program; it must compile (load()), it is not run.
--   <!-- file: PATH -->      on the line before a fence: the block is the file PATH of this
--                            repository, byte for byte; it is run as that file (`...` is nil,
--                            as for a script; examples/ is on package.path, so a block may
--                            require what an earlier file block defines).
-- ```sh, ```nginx and other blocks are not Lua and are not run. Within a page, blocks run in
-- order, one after another; each page starts with the modules of examples/ forgotten.
-- Every "## " section of docs/guide.md and every "### " capability of README.md ends with a
-- block that runs.
local support = require "support"

local ROOT_FILES = { "README.md" }

local function ls(pattern)
    local p = assert(io.popen("ls " .. pattern .. " 2>/dev/null"))
    local out = {}
    for line in p:lines() do out[#out + 1] = line end
    p:close()
    return out
end

local function pages()
    local list = {}
    for _, f in ipairs(ROOT_FILES) do list[#list + 1] = f end
    for _, f in ipairs(ls("docs/*.md")) do list[#list + 1] = f end
    for _, f in ipairs(ls("examples/*/README.md")) do list[#list + 1] = f end
    return list
end

-- blocks(text) -> { { line, code, fragment, file, section, subsection }, ... } in order, and the
-- list of section headings met ({ level, title, line }).
local function blocks(text)
    local out, heads = {}, {}
    local lines = {}
    for line in (text .. "\n"):gmatch("(.-)\r?\n") do lines[#lines + 1] = line end
    local i, section, subsection = 1, nil, nil
    while i <= #lines do
        local l = lines[i]
        local fence, info = l:match("^(```+)%s*(.*)$")
        if fence then
            local lang, flag = info:match("^(%S*)%s*(%S*)")
            local body, j = {}, i + 1
            while j <= #lines and not lines[j]:match("^" .. fence .. "%s*$") do
                body[#body + 1] = lines[j]
                j = j + 1
            end
            if lang == "lua" then
                local before = lines[i - 1] or ""
                out[#out + 1] = {
                    line = i,
                    code = table.concat(body, "\n") .. "\n",
                    fragment = flag == "fragment" or before:match("^<!%-%- fragment %-%->") ~= nil,
                    file = before:match("^<!%-%- file: (%S+) %-%->"),
                    section = section,
                    subsection = subsection,
                }
            end
            i = j + 1
        else
            local hashes, title = l:match("^(##+) (.*)$")
            if hashes then
                if #hashes == 2 then section, subsection = title, nil
                elseif #hashes == 3 then subsection = title end
                heads[#heads + 1] = { level = #hashes, title = title, line = i }
            end
            i = i + 1
        end
    end
    return out, heads
end

local function forget_examples()
    for name in pairs(package.loaded) do
        if name:match("^bank") then package.loaded[name] = nil end
    end
end

describe("the documentation's code #slow", function()
    local saved_path

    setup(function()
        support.db_url() -- the servers must be there
        saved_path = package.path
        package.path = "examples/?.lua;examples/?/init.lua;" .. package.path
    end)

    teardown(function()
        package.path = saved_path
        forget_examples()
    end)

    it("finds the pages and their blocks", function()
        local n = 0
        for _, page in ipairs(pages()) do
            n = n + #blocks(support.slurp(page))
        end
        assert.is_true(n > 10, "only " .. n .. " Lua blocks found")
        assert.is_true(#support.slurp("docs/guide.md") > 0, "docs/guide.md is missing")
    end)

    for _, page in ipairs(pages()) do
        describe(page, function()
            local text = support.slurp(page)
            local list, heads = blocks(text)

            setup(forget_examples)

            for _, b in ipairs(list) do
                local name = ("%s:%d %s"):format(page, b.line,
                    b.fragment and "compiles" or (b.file and ("is " .. b.file .. " and runs") or "runs"))
                it(name, function()
                    if b.file then
                        local content = support.slurp(b.file)
                        assert.are.equal(content, b.code, b.file .. " and the block at "
                            .. page .. ":" .. b.line .. " differ")
                    end
                    -- what a block prints is kept out of busted's output
                    local env = setmetatable({ qx = require "qx", print = function() end },
                                             { __index = _G })
                    local chunk, err = load(b.code, "@" .. (b.file or (page .. ":" .. b.line)), "t", env)
                    assert(chunk, err)
                    if b.fragment then return end
                    local ok, e = xpcall(chunk, debug.traceback)
                    assert(ok, tostring(e))
                end)
            end

            -- Each section that shows code ends with code that runs.
            local checked = page == "README.md" and 3 or (page == "docs/guide.md" and 2 or nil)
            if checked then
                it("ends every section of level " .. checked .. " that has code with a block that runs",
                    function()
                    for _, h in ipairs(heads) do
                        if h.level == checked then
                            local last
                            for _, b in ipairs(list) do
                                local in_it = (checked == 2 and b.section == h.title)
                                    or (checked == 3 and b.subsection == h.title)
                                if in_it then last = b end
                            end
                            if last then
                                assert(not last.fragment, ("%s: section '%s' ends with a fragment (line %d)")
                                    :format(page, h.title, last.line))
                            end
                        end
                    end
                end)
            end
        end)
    end
end)

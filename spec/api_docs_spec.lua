-- The API reference (make docs, LDoc) and editors (LuaLS) read the doc comments above each
-- public function. No language server runs here, so this spec reads the Lua files itself:
-- every public function has a `---` doc comment whose `@param` names are its parameters, in
-- order, none missing and none extra.

-- file -> the tables whose functions are public there (functions named _x are internal)
local PUBLIC = {
    ["lua/qx/init.lua"] = { "_M" },
    ["lua/qx/error.lua"] = { "_M" },
    ["lua/qx/store/db.lua"] = { "_M", "Db" },
    ["lua/qx/store/uow.lua"] = { "Uow" },
    ["lua/qx/tracing.lua"] = { "_M" },
    ["lua/qx/store/migrate.lua"] = { "_M" },
    ["lua/qx/store/app_migrations.lua"] = { "_M" },
    ["lua/qx/store/outbox.lua"] = { "_M", "Outbox" },
    ["lua/qx/store/projection/runner.lua"] = { "_M", "Projection" },
    ["lua/qx/store/projection/versions.lua"] = { "_M", "Projection" },
    ["lua/qx/store/forget.lua"] = { "_M" },
    ["lua/qx/store/personal.lua"] = { "_M" },
    ["lua/qx/store/repository/init.lua"] = { "base.Description", "base.Repo" },
    ["lua/qx/store/repository/description.lua"] = { "_M" },
    ["lua/qx/store/repository/reader.lua"] = { "Reader", "Description" },
    ["lua/qx/store/repository/catalog.lua"] = { "Description" },
    ["lua/qx/store/repository/reads.lua"] = { "Repo" },
    ["lua/qx/store/repository/writes.lua"] = { "Repo" },
    ["lua/qx/store/repository/stream.lua"] = { "Repo" },
    ["lua/qx/store/repository/keyset.lua"] = { "Repo" },
    ["lua/qx/store/repository/spec.lua"] = { "_M", "Spec" },
    ["lua/qx/store/repository/schema.lua"] = { "_M" },
    ["lua/qx/store/event_store/init.lua"] = { "_M" },
    ["lua/qx/store/event_store/reads.lua"] = { "Store" },
    ["lua/qx/store/event_store/bound.lua"] = { "Bound" },
    ["lua/qx/store/event_store/evolution.lua"] = { "Store" },
    ["lua/qx/messaging/nats/init.lua"] = { "_M", "Conn" },
    ["lua/qx/messaging/publisher.lua"] = { "_M", "Publisher" },
    ["lua/qx/messaging/relay/init.lua"] = { "_M", "Relay" },
    ["lua/qx/messaging/consumer/init.lua"] = { "_M", "Consumer" },
    ["lua/qx/messaging/consumer/run.lua"] = { "Consumer", "MsgInfo" },
    ["lua/qx/messaging/consumer/dead_letters.lua"] = { "Consumer", "_M" },
    ["lua/qx/model/registry.lua"] = { "_M", "Registry" },
    ["lua/qx/model/dispatcher.lua"] = { "_M" },
    ["lua/qx/model/event.lua"] = { "_M", "instance_methods", "class_methods" },
    ["lua/qx/model/aggregate.lua"] = { "_M", "base" },
    ["lua/qx/model/event_sourced.lua"] = { "_M", "methods" },
    ["lua/qx/openresty/threads.lua"] = { "_M" },
    ["lua/qx/openresty/http.lua"] = { "_M" },
    ["lua/qx/openresty/plain.lua"] = { "_M" },
    ["lua/qx/openresty/cosocket.lua"] = { "_M" },
}

-- The other files of lua/qx: internal to a folder, or not part of the Lua API the README
-- documents (the command line, settings readers, the metrics writer, the schema steps). A new
-- file goes on one list or the other.
local NOT_CHECKED = {
    "lua/qx/cli/init.lua", "lua/qx/cli/outbox.lua", "lua/qx/cli/relay.lua",
    "lua/qx/cli/streams.lua",
    "lua/qx/cli/projection.lua",
    "lua/qx/cli/events.lua", "lua/qx/cli/snapshots.lua", "lua/qx/cli/app_classes.lua",
    "lua/qx/cli/consumer.lua", "lua/qx/metrics_server.lua", "lua/qx/store/projection/metrics.lua",
    "lua/qx/messaging/consumer/base.lua", "lua/qx/messaging/consumer/options.lua",
    "lua/qx/messaging/consumer/batch.lua",
    "lua/qx/messaging/consumer/sealed.lua",
    "lua/qx/messaging/nats/settings.lua", "lua/qx/messaging/relay/settings.lua",
    "lua/qx/metrics.lua", "lua/qx/openresty/init.lua", "lua/qx/options.lua", "lua/qx/settings.lua",
    "lua/qx/store/event_store/checkpoint.lua", "lua/qx/store/event_store/sql.lua",
    "lua/qx/store/internal.lua", "lua/qx/store/migrations.lua",
    "lua/qx/store/projection/init.lua", "lua/qx/store/projection/rebuild_slots.lua",
    "lua/qx/store/projection/definition.lua",
    "lua/qx/store/repository/base.lua", "lua/qx/store/repository/cursor.lua",
    "lua/qx/store/repository/query.lua", "lua/qx/version.lua",
    "lua/qx/store/wire/init.lua", "lua/qx/store/wire/conn.lua", "lua/qx/store/wire/pool.lua",
}

local function read_lines(path)
    local f = assert(io.open(path, "r"))
    local lines = {}
    for line in f:lines() do lines[#lines + 1] = line end
    f:close()
    return lines
end

local function split_params(s)
    local out = {}
    for p in s:gmatch("[^,%s]+") do out[#out + 1] = p end
    return out
end

-- The doc comment above line i: the run of comment lines right above it, and whether one of
-- them starts a doc comment (`---`).
local function comment_above(lines, i)
    local block, doc = {}, false
    local j = i - 1
    while j >= 1 and lines[j]:match("^%s*%-%-") do
        table.insert(block, 1, lines[j])
        if lines[j]:match("^%s*%-%-%-") and not lines[j]:match("^%s*%-%-%-%-") then doc = true end
        j = j - 1
    end
    return block, doc
end

-- @param names in order: LuaLS `@param name[?] type`, LDoc `@param name` and `@tparam type name`
local function documented_params(block)
    local names = {}
    for _, line in ipairs(block) do
        local text = line:gsub("^%s*%-+%s*", "")
        local name = text:match("^@param%s+([%w_%.]+)%??")
        if not name then name = text:match("^@tparam%s+%S+%s+([%w_%.]+)%??") end
        if name then names[#names + 1] = name end
    end
    return names
end

-- every public function of a file (a function whose first parameter is self documents it:
-- LDoc lists it as one; a method defined with `:` has an implicit self, left out):
-- { name =, line =, params =, block =, doc = }
local function public_functions(path, prefixes)
    local lines = read_lines(path)
    local found = {}
    for i, line in ipairs(lines) do
        local tbl, sep, name, params = line:match("^function ([%w_%.]+)([%.:])([%w_]+)%s*%(([^)]*)%)")
        if tbl then
            local public = false
            for _, p in ipairs(prefixes) do
                if p == tbl then public = true end
            end
            if public and name:sub(1, 1) ~= "_" then
                local ps = split_params(params)
                local block, doc = comment_above(lines, i)
                found[#found + 1] = {
                    name = tbl .. sep .. name, line = i, params = ps, block = block, doc = doc,
                }
            end
        end
    end
    return found
end

describe("API doc comments", function()
    it("cover every public function, with its parameters by name and in order", function()
        local problems, total = {}, 0
        for path, prefixes in pairs(PUBLIC) do
            for _, fn in ipairs(public_functions(path, prefixes)) do
                total = total + 1
                local where = ("%s:%d %s"):format(path, fn.line, fn.name)
                if not fn.doc then
                    problems[#problems + 1] = where .. ": no --- doc comment"
                else
                    local want = table.concat(fn.params, ", ")
                    local got = table.concat(documented_params(fn.block), ", ")
                    if want ~= got then
                        problems[#problems + 1] =
                            ("%s: @param %s, parameters %s"):format(where, got, want)
                    end
                end
            end
        end
        table.sort(problems)
        assert.is_true(total > 150, "public functions found: " .. total)
        assert.are.same({}, problems)
    end)

    it("finds what it checks: a documented parameter the function lacks is reported", function()
        local lines = {
            "--- Adds.",
            "---@param a number",
            "---@param b number",
            "---@param c number",
        }
        assert.are.same({ "a", "b", "c" }, documented_params(lines))
        assert.are.same({ "x", "..." }, split_params("x, ..."))
        local _, doc = comment_above({ "-- plain", "function f() end" }, 2)
        assert.is_false(doc)
        _, doc = comment_above({ "--- doc", "-- more", "function f() end" }, 3)
        assert.is_true(doc)
    end)

    it("knows every Lua file: checked, or listed as not part of the API", function()
        local known = {}
        for path in pairs(PUBLIC) do known[path] = true end
        for _, path in ipairs(NOT_CHECKED) do known[path] = true end
        local p = assert(io.popen("find lua/qx -name '*.lua' | sort"))
        local unknown = {}
        for path in p:lines() do
            if not known[path] then unknown[#unknown + 1] = path end
        end
        p:close()
        assert.are.same({}, unknown)
    end)

    it("every file it checks exists and has a doc comment module header", function()
        for path in pairs(PUBLIC) do
            local lines = read_lines(path)
            assert.is_truthy(lines[1]:match("^%-%-%-%s"), path .. ": first line is not `--- `")
        end
    end)
end)

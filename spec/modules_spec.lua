-- The module names the README and the examples require, and the functions they document, exist;
-- and every Lua module the rockspec installs loads on its own.

local function has_functions(mod, names, what)
    for _, name in ipairs(names) do
        assert(type(mod[name]) == "function", what .. "." .. name .. " is not a function")
    end
end

describe("documented modules", function()
    it("qx has every documented constructor and helper", function()
        local qx = require "qx"
        has_functions(qx, { "uuid", "is_uuid", "now", "connect", "migrate", "event",
                            "integration_event", "aggregate", "dispatcher", "outbox",
                            "event_sourced", "event_store", "projection", "repository",
                            "registry", "consumer", "publisher", "relay" }, "qx")
        assert.equal(require("qx.core").null, qx.null)
        assert.equal(require("cjson").null, qx.null)
        has_functions(qx.spec, { "where", "and_", "or_", "not_" }, "qx.spec")
        has_functions(qx.schema, { "id_column", "audit_columns" }, "qx.schema")
        has_functions(qx.nats, { "connect" }, "qx.nats")
        has_functions(qx.error, { "new", "is" }, "qx.error")
    end)

    it("qx.openresty keeps every documented function", function()
        local openresty = require "qx.openresty"
        has_functions(openresty, { "handlers", "run", "thread_pool", "stats", "respond",
                                   "read_json", "http_status", "error_body", "is_plain" },
                      "qx.openresty")
        assert.equal("table", type(openresty.HTTP_STATUS))
        assert.equal(409, openresty.http_status({ code = "conflict" }))
        assert.equal(422, openresty.HTTP_STATUS.invalid)
    end)

    it("qx.core has the binding's documented functions", function()
        local core = require "qx.core"
        has_functions(core, { "uuid", "now", "clock", "json_encode", "json_shape", "json_rows", "json_object", "pool",
                               "tx", "wire" },
                      "qx.core")
        assert.equal("userdata", type(core.null))
        assert.equal("table", type(core.error_mt))
    end)

    it("the examples' own modules are found beside them", function()
        -- examples/ requires register_user, bank_account, users_read, consumer, relay: files there
        for _, name in ipairs({ "register_user", "bank_account", "users_read", "consumer",
                                "relay" }) do
            local f = io.open("examples/" .. name .. ".lua")
            assert(f, "examples/" .. name .. ".lua is missing")
            f:close()
        end
    end)
end)

describe("installed modules", function()
    it("every Lua module of the rockspec loads", function()
        local f = assert(io.open("rockspec/qx-scm-1.rockspec"))
        local text = f:read("*a")
        f:close()
        local names = {}
        for name, path in text:gmatch('%["(qx[%w_.]*)"%] = "(lua/[^"]+%.lua)"') do
            names[#names + 1] = { name, path }
        end
        assert.is_true(#names > 40, "rockspec lists " .. #names .. " Lua modules")
        for _, m in ipairs(names) do
            local ok, e = pcall(require, m[1])
            assert(ok, m[1] .. " (" .. m[2] .. "): " .. tostring(e))
        end
    end)
end)

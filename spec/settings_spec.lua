local settings = require "qx.settings"

local URL = "postgresql://app:secret@127.0.0.1:5432/app"


describe("qx.settings.db", function()
    local function env(t)
        return function(name) return t[name] end
    end

    local function db(opts, vars)
        return settings.db(opts, env(vars or {}))
    end

    local function fails(opts, vars, setting, pattern)
        local s, err = db(opts, vars)
        assert.is_nil(s)
        assert.equal("invalid", err.code)
        assert.equal(setting, err.setting)
        if pattern then
            assert.matches(pattern, err.message)
        end
        return err
    end

    describe("defaults", function()
        it("fill everything but the url", function()
            local s = assert(db({ url = URL }))
            assert.same({
                url = URL,
                pool_size = 10,
                acquire_timeout_ms = 30000,
                recycle_ms = 1800000,
                statement_timeout_ms = 10000,
                connect_timeout_ms = 10000,
            }, s)
        end)

        it("are published", function()
            assert.same({ pool_size = 10, pool_timeout_seconds = 30, pool_recycle_seconds = 1800,
                          statement_timeout_ms = 10000, connect_timeout_seconds = 10 },
                        settings.DB_DEFAULTS)
            assert.equal("QX_DB__URL", settings.ENV.url)
        end)
    end)

    describe("environment", function()
        it("is read under qx-db's names", function()
            local s = assert(db(nil, {
                QX_DB__URL = URL,
                QX_DB__POOL_SIZE = "25",
                QX_DB__POOL_TIMEOUT_SECONDS = "2.5",
                QX_DB__POOL_RECYCLE_SECONDS = "900",
                QX_DB__STATEMENT_TIMEOUT_MS = "2500",
                QX_DB__CONNECT_TIMEOUT_SECONDS = "3",
                QX_CURSOR_KEY = "k3y",
            }))
            assert.same({
                url = URL,
                pool_size = 25,
                acquire_timeout_ms = 2500,
                recycle_ms = 900000,
                statement_timeout_ms = 2500,
                connect_timeout_ms = 3000,
                cursor_key = "k3y",
            }, s)
        end)

        it("is read from os.getenv when no getenv is given", function()
            local s, err = settings.db({ url = URL })
            assert.is_nil(err)
            assert.equal(URL, s.url)
        end)

        it("treats empty variables as unset and tolerates surrounding blanks", function()
            local s = assert(db(nil, { QX_DB__URL = URL, QX_DB__POOL_SIZE = "", QX_CURSOR_KEY = "",
                                       QX_DB__STATEMENT_TIMEOUT_MS = " 500 " }))
            assert.equal(10, s.pool_size)
            assert.is_nil(s.cursor_key)
            assert.equal(500, s.statement_timeout_ms)
        end)

        it("takes 0 and -1 recycle seconds as never", function()
            assert.equal(0, assert(db(nil, { QX_DB__URL = URL, QX_DB__POOL_RECYCLE_SECONDS = "0" })).recycle_ms)
            assert.equal(0, assert(db(nil, { QX_DB__URL = URL, QX_DB__POOL_RECYCLE_SECONDS = "-1" })).recycle_ms)
            assert.equal(0, assert(db({ url = URL, pool_recycle_seconds = -1 })).recycle_ms)
        end)

        it("yields integers", function()
            local s = assert(db(nil, { QX_DB__URL = URL, QX_DB__POOL_TIMEOUT_SECONDS = "0.0015" }))
            assert.equal(2, s.acquire_timeout_ms)
            if math.type then
                assert.equal("integer", math.type(s.acquire_timeout_ms))
                assert.equal("integer", math.type(s.pool_size))
                assert.equal("integer", math.type(s.recycle_ms))
            end
        end)
    end)

    describe("explicit options", function()
        it("win over the environment", function()
            local s = assert(db({
                url = "postgresql://other/db",
                pool_size = 3,
                pool_timeout_seconds = 1,
                pool_recycle_seconds = 60,
                statement_timeout_ms = 750,
                connect_timeout_ms = 1500,
                cursor_key = "opt",
            }, {
                QX_DB__URL = URL,
                QX_DB__POOL_SIZE = "25",
                QX_DB__POOL_TIMEOUT_SECONDS = "9",
                QX_DB__POOL_RECYCLE_SECONDS = "9",
                QX_DB__STATEMENT_TIMEOUT_MS = "9",
                QX_DB__CONNECT_TIMEOUT_SECONDS = "9",
                QX_CURSOR_KEY = "env",
            }))
            assert.same({
                url = "postgresql://other/db",
                pool_size = 3,
                acquire_timeout_ms = 1000,
                recycle_ms = 60000,
                statement_timeout_ms = 750,
                connect_timeout_ms = 1500,
                cursor_key = "opt",
            }, s)
        end)

        it("accept acquire_timeout_ms instead of pool_timeout_seconds", function()
            local s = assert(db({ url = URL, acquire_timeout_ms = 250 },
                                { QX_DB__POOL_TIMEOUT_SECONDS = "9" }))
            assert.equal(250, s.acquire_timeout_ms)
        end)

        it("accept connect_timeout_seconds as well as connect_timeout_ms", function()
            local s = assert(db({ url = URL, connect_timeout_seconds = 2.5 },
                                { QX_DB__CONNECT_TIMEOUT_SECONDS = "9" }))
            assert.equal(2500, s.connect_timeout_ms)
            fails({ url = URL, connect_timeout_seconds = "2" }, nil, "connect_timeout_seconds")
        end)

        it("fill in only what they name", function()
            local s = assert(db({ pool_size = 4 }, { QX_DB__URL = URL, QX_DB__POOL_SIZE = "20" }))
            assert.equal(URL, s.url)
            assert.equal(4, s.pool_size)
        end)

        it("normalise integral floats to integers", function()
            local s = assert(db({ url = URL, pool_size = 4.0 }))
            assert.equal(4, s.pool_size)
            if math.type then assert.equal("integer", math.type(s.pool_size)) end
        end)
    end)

    describe("url", function()
        it("is required", function()
            local err = fails(nil, {}, "QX_DB__URL")
            assert.equal("no database url: pass url or set QX_DB__URL", err.message)
        end)

        it("drops a SQLAlchemy driver suffix so qx-db's URLs work", function()
            local s = assert(db(nil, { QX_DB__URL = "postgresql+asyncpg://u:p@h:5432/d" }))
            assert.equal("postgresql://u:p@h:5432/d", s.url)
            s = assert(db({ url = "postgres+psycopg://h/d" }))
            assert.equal("postgres://h/d", s.url)
        end)

        it("accepts a key=value conninfo string", function()
            assert.equal("host=/tmp dbname=app", assert(db({ url = "host=/tmp dbname=app" })).url)
        end)

        it("rejects other schemes, junk and non-strings without echoing the value", function()
            local err = fails({ url = "mysql://u:hunter2@h/d" }, nil, "url", "unsupported URL scheme")
            assert.is_nil(err.message:find("hunter2", 1, true))
            fails({ url = "hunter2" }, nil, "url", "expected a postgresql:// URL")
            fails(nil, { QX_DB__URL = "  " }, "QX_DB__URL")
            fails({ url = 5 }, nil, "url", "expected a string, got number")
            fails({ url = "" }, nil, "url")
        end)
    end)

    describe("bad values", function()
        it("name the environment variable and the value", function()
            local err = fails(nil, { QX_DB__URL = URL, QX_DB__POOL_SIZE = "abc" }, "QX_DB__POOL_SIZE")
            assert.equal('invalid setting QX_DB__POOL_SIZE: expected an integer, got "abc"', err.message)
            assert.equal('invalid: invalid setting QX_DB__POOL_SIZE: expected an integer, got "abc"',
                         tostring(err))
        end)

        it("are refused from the environment", function()
            local cases = {
                { "QX_DB__POOL_SIZE", "0" },
                { "QX_DB__POOL_SIZE", "10001" },
                { "QX_DB__POOL_SIZE", "1.5" },
                { "QX_DB__POOL_SIZE", "0x10" },
                { "QX_DB__POOL_SIZE", "1e3" },
                { "QX_DB__POOL_TIMEOUT_SECONDS", "-1" },
                { "QX_DB__POOL_TIMEOUT_SECONDS", "soon" },
                { "QX_DB__POOL_TIMEOUT_SECONDS", "99999999" },
                { "QX_DB__POOL_RECYCLE_SECONDS", "-2" },
                { "QX_DB__POOL_RECYCLE_SECONDS", "1.5" },
                { "QX_DB__STATEMENT_TIMEOUT_MS", "-1" },
                { "QX_DB__STATEMENT_TIMEOUT_MS", "3000000000" },
                { "QX_DB__CONNECT_TIMEOUT_SECONDS", "x" },
                { "QX_DB__CONNECT_TIMEOUT_SECONDS", "-0.5" },
            }
            for _, c in ipairs(cases) do
                fails(nil, { QX_DB__URL = URL, [c[1]] = c[2] }, c[1])
            end
        end)

        it("are refused from explicit options", function()
            fails({ url = URL, pool_size = "10" }, nil, "pool_size", "expected an integer, got string")
            fails({ url = URL, pool_size = 0 }, nil, "pool_size", "must be from 1 to 10000, got 0")
            fails({ url = URL, pool_size = 0 / 0 }, nil, "pool_size")
            fails({ url = URL, pool_timeout_seconds = -1 }, nil, "pool_timeout_seconds")
            fails({ url = URL, acquire_timeout_ms = 1.5 }, nil, "acquire_timeout_ms")
            fails({ url = URL, pool_recycle_seconds = -3 }, nil, "pool_recycle_seconds",
                  "or 0 / %-1 for never")
            fails({ url = URL, statement_timeout_ms = "1s" }, nil, "statement_timeout_ms")
            fails({ url = URL, connect_timeout_ms = -1 }, nil, "connect_timeout_ms")
            fails({ url = URL, cursor_key = "" }, nil, "cursor_key")
            fails({ url = URL, cursor_key = 12 }, nil, "cursor_key")
        end)
    end)

    describe("misuse", function()
        it("raises for unknown options", function()
            assert.has_error(function() db({ url = URL, pool_sise = 5 }) end,
                "settings: unknown option 'pool_sise' (known: acquire_timeout_ms, connect_timeout_ms, "
                .. "connect_timeout_seconds, cursor_key, pool_recycle_seconds, pool_size, pool_timeout_seconds, "
                .. "statement_timeout_ms, url)")
        end)

        it("raises for both forms of a timeout", function()
            assert.has_error(function() db({ url = URL, pool_timeout_seconds = 1, acquire_timeout_ms = 1 }) end,
                "settings: pass pool_timeout_seconds or acquire_timeout_ms, not both")
            assert.has_error(function() db({ url = URL, connect_timeout_seconds = 1, connect_timeout_ms = 1 }) end,
                "settings: pass connect_timeout_seconds or connect_timeout_ms, not both")
        end)

        it("raises for a non-table opts or a non-function getenv", function()
            assert.has_error(function() settings.db("url") end,
                "settings: options must be a table, got string")
            assert.has_error(function() settings.db({}, {}) end,
                "settings: getenv must be a function, got table")
        end)

        it("raises at the caller's line", function()
            local ok, err = pcall(function() settings.db({ nope = 1 }) end)
            assert.is_false(ok)
            assert.matches("settings_spec.lua:%d+: settings: unknown option", err)
        end)
    end)
end)

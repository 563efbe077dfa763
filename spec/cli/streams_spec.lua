-- `qx streams archive TYPE ID` as a user runs it: the stream is archived and said so; a stream
-- that does not exist, one archived already, a bad id and wrong arguments are refused clearly,
-- with nothing archived.
local qx = require "qx"
local support = require "support"

local INTERP = jit and "luajit" or "lua5.4"
local sh, slurp = support.sh, support.slurp

-- Runs bin/qx with the interpreter running the specs; returns exit code, stdout, stderr.
local function qx_cli(args)
    local words = {}
    for i, a in ipairs(args) do words[i] = sh(a) end
    local errf = os.tmpname()
    local p = assert(io.popen("env QX_DB__URL=" .. sh(support.db_url()) .. " LUA_PATH="
        .. sh(package.path) .. " LUA_CPATH=" .. sh(package.cpath) .. " " .. INTERP .. " bin/qx "
        .. table.concat(words, " ") .. " 2>" .. sh(errf) .. "; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local err = slurp(errf)
    os.remove(errf)
    return tonumber(out:match("exit=(%d+)%s*$")), (out:gsub("exit=%d+%s*$", "")), err
end

describe("qx streams #slow", function()
    local db, store, agg_type, Deposited, Account

    setup(function()
        db = support.migrated_db{ pool_size = 2 }
        store = qx.event_store{ db = db }
        agg_type = support.unique("Cli")
        Deposited = qx.event(support.unique("cli.deposited"))
        Account = qx.event_sourced(agg_type)
        Account:on(Deposited, function() end)
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function stream(n)
        local id = qx.uuid()
        assert(db:unit_of_work(function(uow)
            local acc = Account.new(id)
            for _ = 1, n do acc:record(Deposited{ amount = 1 }) end
            return uow:store(store):append(acc)
        end))
        return id
    end

    local function marked(id)
        return assert(db:query("SELECT count(*) AS n FROM qx_archived_streams "
            .. "WHERE aggregate_type = $1 AND aggregate_id = $2", agg_type, id))[1].n
    end

    it("archive moves the stream and says how many events moved", function()
        local id = stream(3)
        local code, out, err = qx_cli({ "streams", "archive", agg_type, id })
        assert.equal(0, code, err)
        local said = "archived " .. agg_type .. " " .. id .. ": 3 event(s), last sequence 3, at "
        assert.equal(1, out:find(said, 1, true), out)
        assert.equal(1, marked(id))
        -- twice: exit 1, archived already
        code, out, err = qx_cli({ "streams", "archive", agg_type, id })
        assert.equal(1, code)
        assert.equal("", out)
        assert.matches("conflict: .*stream archived already", err)
    end)

    it("a stream that does not exist is exit 1, not_found, nothing archived", function()
        local id = qx.uuid()
        local code, _, err = qx_cli({ "streams", "archive", agg_type, id })
        assert.equal(1, code)
        assert.matches("not_found: .*no such stream", err)
        assert.equal(0, marked(id))
    end)

    it("a bad id or wrong arguments exit 2 with the usage, nothing archived", function()
        local id = stream(1)
        local code, _, err = qx_cli({ "streams", "archive", agg_type, "nope" })
        assert.equal(2, code)
        assert.matches("invalid: .*uuid", err)
        code, _, err = qx_cli({ "streams", "archive", agg_type })
        assert.equal(2, code)
        assert.matches("usage: qx streams archive", err)
        code, _, err = qx_cli({ "streams", "archive", agg_type, id, "extra" })
        assert.equal(2, code)
        assert.matches("usage: qx streams archive", err)
        code, _, err = qx_cli({ "streams", "unarchive", agg_type, id })
        assert.equal(2, code)
        assert.matches("unknown streams command 'unarchive'", err)
        code, _, err = qx_cli({ "streams", "archive", agg_type, id, "--tenant", "x" })
        assert.equal(2, code)
        assert.matches("unknown flag %-%-tenant", err)
        code, _, err = qx_cli({ "streams" })
        assert.equal(2, code)
        assert.matches("usage: qx streams", err)
        assert.equal(0, marked(id))
    end)
end)

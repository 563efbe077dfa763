-- The `qx` command line. Each command is a table { summary, usage, switches?, values?,
-- run(flags, positional) -> exit code } in COMMANDS (switches and values: sets of the flag names,
-- with "_" for "-"); main() parses `qx COMMAND [--flag value | --flag=value | --switch] ...` and
-- refuses any other flag with the command's usage and exit code 2. A command that lives in its
-- own module is added here with one line: COMMANDS.name = require "qx.cli.name".
local _M = { _VERSION = "0.1.0" }

local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local stdout, stderr = io.stdout, io.stderr

local COMMANDS = {}
_M.COMMANDS = COMMANDS

local function say(...) stdout:write(...) stdout:write("\n") end
local function complain(...) stderr:write("qx: ", ...) stderr:write("\n") end
_M.say, _M.complain = say, complain

-- Parses flags strictly: a command knows its switches (booleans, which take no value) and its
-- flags (which take one: --name value or --name=value); anything else is refused, so a misspelt
-- flag cannot pass unnoticed or swallow the flag after it. A value that starts with "--" is
-- taken for a forgotten value. Returns flags, positional | nil, message.
function _M.parse(args, switches, values)
    switches, values = switches or {}, values or {}
    local flags, pos = {}, {}
    local i = 1
    while i <= #args do
        local a = args[i]
        local name, value = a:match("^%-%-([^=]+)=(.*)$")
        if not name then name = a:match("^%-%-(.+)$") end
        if name then
            local key = name:gsub("-", "_")
            if switches[key] then
                if value then return nil, "flag --" .. name .. " takes no value" end
                flags[key] = true
            elseif values[key] then
                if not value then
                    i = i + 1
                    value = args[i]
                    if value == nil or value:sub(1, 2) == "--" then
                        return nil, "flag --" .. name .. " needs a value"
                    end
                end
                flags[key] = value
            else
                return nil, "unknown flag --" .. name
            end
        else
            pos[#pos + 1] = a
        end
        i = i + 1
    end
    return flags, pos
end

-- Connects with --url or QX_DB__URL (and the other QX_DB__* settings); a pool of 2 unless
-- the command needs more.
function _M.connect(flags, pool_size)
    local qx = require "qx"
    local db, e = qx.connect{ url = flags.url, pool_size = pool_size or 2 }
    if not db then
        complain("cannot connect: ", tostring(e))
        return nil
    end
    return db
end

COMMANDS.migrate = {
    summary = "create or upgrade the qx_* tables, then apply the migrations of --dir (idempotent)",
    usage = "qx migrate [--url URL] [--dir DIR] [--status]",
    switches = { status = true },
    values = { url = true, dir = true },
    run = function(flags)
        local db = _M.connect(flags)
        if not db then return 1 end
        local migrate = require "qx.store.migrate"
        if flags.status then
            local rows, e = migrate.status(db)
            if not rows then db:close() complain(tostring(e)) return 1 end
            for _, r in ipairs(rows) do say(r.version, "  ", r.name, "  ", r.applied_at) end
            if #rows == 0 then say("no migrations applied") end
            if flags.dir then
                rows, e = require("qx.store.app_migrations").status(db, flags.dir)
                db:close()
                if not rows then complain(tostring(e)) return 1 end
                say(flags.dir, ":")
                for _, r in ipairs(rows) do
                    say(("  %-8s %s  %s"):format(r.state, r.file or (r.version .. " " .. r.name),
                                                  r.applied_at or ""))
                end
                if #rows == 0 then say("  no migrations in the folder") end
                return 0
            end
            db:close()
            return 0
        end
        local res, e = migrate.run(db, { dir = flags.dir })
        db:close()
        if not res then complain("migration failed: ", tostring(e)) return 1 end
        if #res.applied == 0 then
            say("schema is up to date (version ", res.current, ")")
        else
            say("applied ", #res.applied, " migration(s); schema at version ", res.current)
        end
        if res.app then
            for _, m in ipairs(res.app.applied) do say("applied ", flags.dir, "/", m.file) end
            local n = #res.app.applied
            say(flags.dir, ": ", n == 0 and "up to date" or "applied " .. n,
                " (version ", res.app.current, ")")
        end
        return 0
    end,
}

COMMANDS.version = {
    summary = "print qx's version and the Lua it runs on",
    usage = "qx version (or qx --version)",
    run = function()
        local qx = require "qx" -- loads the C module too: a broken install fails here
        local jit = rawget(_G, "jit")
        say("qx ", qx._VERSION, " on ", jit and jit.version or _VERSION)
        return 0
    end,
}

COMMANDS.relay = require "qx.cli.relay"
COMMANDS.outbox = require "qx.cli.outbox"
COMMANDS.streams = require "qx.cli.streams"
COMMANDS.projection = require "qx.cli.projection"
COMMANDS.events = require "qx.cli.events"
COMMANDS.snapshots = require "qx.cli.snapshots"
COMMANDS.consumer = require "qx.cli.consumer"

local function usage()
    say("usage: qx COMMAND [flags]\n\ncommands:")
    local names = {}
    for name in pairs(COMMANDS) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
        say(("  %-16s %s"):format(name, COMMANDS[name].summary))
    end
    say("\nenvironment: QX_DB__URL and the other QX_DB__* settings; `qx help COMMAND` for flags")
end

function _M.main(args)
    local name = args[1]
    if name == nil or name == "help" or name == "--help" or name == "-h" then
        local c = args[2] and COMMANDS[args[2]]
        if c then say("usage: ", c.usage) say(c.summary) else usage() end
        return name == nil and 2 or 0
    end
    if name == "--version" then name = "version" end
    local c = COMMANDS[name]
    if not c then
        complain("unknown command '", name, "' (try qx help)")
        return 2
    end
    local rest = {}
    for i = 2, #args do
        if args[i] == "--help" or args[i] == "-h" then
            say("usage: ", c.usage) say(c.summary)
            return 0
        end
        rest[#rest + 1] = args[i]
    end
    local flags, pos = _M.parse(rest, c.switches, c.values)
    if not flags then
        complain(pos)
        stderr:write("usage: ", c.usage, "\n")
        return 2
    end
    return c.run(flags, pos)
end

return _M

-- `qx projection`: run, rebuild and switch the application's projections.
--
--   qx projection list                      every projection: versions, live, behind, applied
--   qx projection status NAME [--version N]
--   qx projection run NAME [--version N] [--max-seconds S] [--poll-ms MS]
--   qx projection rebuild NAME [--version N] [--progress bar|lines|none]
--                                            [--progress-interval S]
--   qx projection switch NAME --version N [--max-behind N] [--wait S]
--   qx projection drop NAME --version N
--
-- The projections come from --app MODULE: a Lua module (or a file path ending in .lua) that
-- returns a list of projections, or a function(db) that returns one, db being the command's
-- connection (--url or QX_DB__URL). switch and drop need only the database.
local tostring = tostring
local tonumber = tonumber
local type = type
local ipairs = ipairs
local pairs = pairs
local pcall = pcall
local getmetatable = getmetatable
local fmt = string.format
local concat = table.concat
local sort = table.sort
local floor = math.floor

local USAGE = "qx projection list | status NAME | run NAME | rebuild NAME | switch NAME "
    .. "--version N | drop NAME --version N   [--app MODULE] [--version N] [--url URL] "
    .. "[--max-seconds S] [--poll-ms MS] [--progress bar|lines|none] [--progress-interval S] "
    .. "[--max-behind N] [--wait S]"

local NEEDS_APP = { list = false, status = true, run = true, rebuild = true, switch = false,
                    drop = false }


-- A whole number from a flag -> n | nil (flag absent) | false (bad)
local function integer(s, lo)
    if s == nil then return nil end
    local n = tonumber(s)
    if not n or n ~= floor(n) or n < lo or n > 2147483647 then return false end
    return n
end


-- The application's projections -> list | nil, message
local function load_app(name, db)
    local ok, app
    if name:find("/", 1, true) or name:match("%.lua$") then
        local chunk, e = loadfile(name)
        if not chunk then return nil, "cannot load --app " .. name .. ": " .. tostring(e) end
        ok, app = pcall(chunk)
    else
        ok, app = pcall(require, name)
    end
    if not ok then return nil, "--app " .. name .. " failed: " .. tostring(app) end
    if type(app) == "function" then
        ok, app = pcall(app, db)
        if not ok then return nil, "--app " .. name .. " failed: " .. tostring(app) end
    end
    local Projection = require("qx.store.projection").Projection
    if type(app) ~= "table" then
        return nil, "--app " .. name .. " must return a list of projections or a function(db) "
            .. "returning one, got a " .. type(app)
    end
    local list = {}
    for k, p in pairs(app) do
        if getmetatable(p) ~= Projection then
            return nil, "--app " .. name .. ": " .. tostring(k) .. " is not a qx.projection"
        end
        list[#list + 1] = p
    end
    sort(list, function(a, b)
        if a.name ~= b.name then return a.name < b.name end
        return (a.version or 0) < (b.version or 0)
    end)
    return list
end


-- The projection NAME (at --version) among the app's -> p | nil, message
local function pick(list, name, version, app)
    local names, found = {}, {}
    for _, p in ipairs(list) do
        if not found[p.name] then names[#names + 1] = p.name end
        found[p.name] = found[p.name] or {}
        local f = found[p.name]
        f[#f + 1] = p
    end
    local ps = found[name]
    if not ps then
        return nil, fmt("invalid: %s declares no projection %s (it declares: %s)", app, name,
                        #names > 0 and concat(names, ", ") or "none")
    end
    local vs = {}
    for i, p in ipairs(ps) do vs[i] = p.version and tostring(p.version) or "unversioned" end
    if version == nil then
        if #ps > 1 then
            return nil, fmt("invalid: projection %s has versions %s: give --version", name,
                            concat(vs, ", "))
        end
        return ps[1]
    end
    for _, p in ipairs(ps) do
        if p.version == version then return p end
    end
    return nil, fmt("invalid: projection %s has no version %d (%s declares: %s)", name, version,
                    app, concat(vs, ", "))
end


-- Whether stderr is a terminal (the shell's test -t, so no C is needed).
local function stderr_is_tty()
    local r = os.execute("test -t 2")
    return r == true or r == 0
end

local function seconds(s)
    if s == nil then return "?" end
    if s >= 3600 then return fmt("%dh%02dm", floor(s / 3600), floor(s % 3600 / 60)) end
    if s >= 60 then return fmt("%dm%02ds", floor(s / 60), floor(s % 60)) end
    return fmt("%.0fs", s)
end

-- on_progress for a rebuild: a bar redrawn in place on a terminal, else one line per report
local function reporter(mode)
    local err = io.stderr
    if mode == "bar" then
        local width = 30
        return function(info)
            local total = info.total or info.done
            local frac = total > 0 and info.done / total or 1
            local fill = floor(frac * width + 0.5)
            err:write(fmt("\r%s v%s [%s%s] %3d%% %d/%d events %.0f/s eta %s ", info.name,
                tostring(info.version or "-"), ("#"):rep(fill), ("."):rep(width - fill),
                floor(frac * 100 + 0.5), info.done, total, info.rate,
                info.remaining == 0 and "0s" or seconds(info.eta_seconds)))
            if info.remaining == 0 then err:write("\n") end
            err:flush()
        end
    end
    return function(info)
        local total = info.total or info.done
        err:write(fmt("projection %s version %s: %d/%d events (%d%%), %.0f/s, %s left\n",
            info.name, tostring(info.version or "-"), info.done, total,
            total > 0 and floor(info.done * 100 / total) or 100, info.rate,
            info.remaining == 0 and "0s" or seconds(info.eta_seconds)))
        err:flush()
    end
end


local function run(flags, pos)
    local cli = require "qx.cli"
    local sub, name = pos[1], pos[2]
    if sub == nil or NEEDS_APP[sub] == nil then
        cli.complain(sub and ("unknown projection command '" .. sub .. "'; ") or "",
                     "usage: ", USAGE)
        return 2
    end
    if sub ~= "list" and name == nil then
        cli.complain("projection ", sub, " needs the projection's NAME; usage: ", USAGE)
        return 2
    end
    if #pos > (sub == "list" and 1 or 2) then
        cli.complain("unexpected argument '", pos[#pos], "'; usage: ", USAGE)
        return 2
    end
    local version = integer(flags.version, 1)
    if version == false then cli.complain("--version must be an integer >= 1") return 2 end
    if (sub == "switch" or sub == "drop") and not version then
        cli.complain("projection ", sub, " needs --version N")
        return 2
    end
    if NEEDS_APP[sub] and not flags.app then
        cli.complain("projection ", sub, " needs --app MODULE (a module returning the "
                     .. "application's projections)")
        return 2
    end
    local max_seconds = tonumber(flags.max_seconds)
    if flags.max_seconds and (not max_seconds or max_seconds < 0) then
        cli.complain("--max-seconds must be a number >= 0") return 2
    end
    local poll_ms = integer(flags.poll_ms, 1)
    if poll_ms == false then cli.complain("--poll-ms must be an integer >= 1") return 2 end
    local max_behind = integer(flags.max_behind, 0)
    if max_behind == false then cli.complain("--max-behind must be an integer >= 0") return 2 end
    local mode = flags.progress
    if mode ~= nil and mode ~= "bar" and mode ~= "lines" and mode ~= "none" then
        cli.complain("--progress must be bar, lines or none") return 2
    end
    local wait = tonumber(flags.wait)
    if flags.wait and (not wait or wait < 0) then
        cli.complain("--wait must be a number of seconds >= 0") return 2
    end
    local interval = tonumber(flags.progress_interval)
    if flags.progress_interval and (not interval or interval <= 0) then
        cli.complain("--progress-interval must be a number of seconds > 0") return 2
    end

    local db = cli.connect(flags, 3)
    if not db then return 1 end
    local projection = require "qx.store.projection"
    local list
    if flags.app then
        local e
        list, e = load_app(flags.app, db)
        if not list then db:close() cli.complain(e) return 2 end
    end
    local function fail(e)
        db:close()
        cli.complain(tostring(e))
        return 1
    end

    if sub == "list" then
        local rows, e = projection.list(db)
        if not rows then return fail(e) end
        local seen, lines = {}, {}
        for _, r in ipairs(rows) do
            seen[r.name .. "@" .. r.version] = true
            lines[#lines + 1] = { r.name, tostring(r.version), r.live and "live" or "standby",
                                  tostring(r.behind), tostring(r.events_applied),
                                  concat(r.tables, ",") }
        end
        for _, p in ipairs(list or {}) do
            if p.version and not seen[p.name .. "@" .. p.version] then
                lines[#lines + 1] = { p.name, tostring(p.version), "not registered", "-", "-",
                                      concat(p.tables, ",") }
            elseif not p.version then
                local st, se = p:status()
                if not st then return fail(se) end
                lines[#lines + 1] = { p.name, "-", "unversioned", tostring(st.behind),
                                      tostring(st.events_applied), "-" }
            end
        end
        sort(lines, function(a, b)
            if a[1] ~= b[1] then return a[1] < b[1] end
            return (tonumber(a[2]) or 0) < (tonumber(b[2]) or 0)
        end)
        cli.say(fmt("%-32s %-7s %-14s %-8s %-10s %s", "NAME", "VERSION", "STATE", "BEHIND",
                    "APPLIED", "TABLES"))
        for _, l in ipairs(lines) do
            cli.say(fmt("%-32s %-7s %-14s %-8s %-10s %s", l[1], l[2], l[3], l[4], l[5], l[6]))
        end
        if #lines == 0 then cli.say("no projections") end
        db:close()
        return 0
    end

    if sub == "switch" then
        local info, e = projection.switch(db, name, version, { max_behind = max_behind,
                                                               wait_seconds = wait })
        if not info then return fail(e) end
        db:close()
        if info.previous == nil then
            cli.say(fmt("projection %s version %d is live (it was already)", name, version))
        else
            cli.say(fmt("projection %s version %d is live (was version %d; %d event(s) behind)",
                        name, version, info.previous, info.behind))
        end
        return 0
    end

    if sub == "drop" then
        local info, e = projection.drop(db, name, version)
        if not info then return fail(e) end
        db:close()
        cli.say(fmt("projection %s version %d dropped (tables: %s)", name, version,
                    #info.tables > 0 and concat(info.tables, ", ") or "none"))
        return 0
    end

    local p, perr = pick(list, name, version, flags.app)
    if not p then db:close() cli.complain(perr) return 2 end
    local label = p.version and fmt("%s version %d", p.name, p.version) or p.name

    if sub == "status" then
        local st, e = p:status()
        if not st then return fail(e) end
        db:close()
        cli.say("projection:     ", label)
        if p.version then cli.say("live:           ", tostring(st.live)) end
        cli.say("behind:         ", st.behind)
        cli.say("events applied: ", st.events_applied)
        cli.say("position:       ", st.global_position)
        cli.say("updated at:     ", st.updated_at)
        cli.say("rebuilt at:     ", st.rebuilt_at or "never")
        return 0
    end

    if sub == "rebuild" then
        if mode == nil then mode = stderr_is_tty() and "bar" or "lines" end
        p.on_progress = mode ~= "none" and reporter(mode) or nil
        p.progress_interval = interval or (mode == "bar" and 0.2 or 5)
        local n, e = p:rebuild()
        if not n then return fail(e) end
        db:close()
        cli.say(fmt("projection %s rebuilt: %d event(s) applied", label, n))
        return 0
    end

    -- run: until SIGTERM/SIGINT (after the batch in flight), or --max-seconds
    local core = require "qx.core"
    core.signals_watch(true)
    local n, e = p:run{ poll_ms = poll_ms, max_seconds = max_seconds,
                        stop = function() return core.signals_sleep(0) end }
    core.signals_watch(false)
    if not n then return fail(e) end
    db:close()
    cli.say(fmt("projection %s: %d event(s) applied", label, n))
    return 0
end

return {
    summary = "projections of --app MODULE: list, status, run, rebuild, switch, drop versions",
    usage = USAGE,
    values = { url = true, app = true, version = true, max_seconds = true, poll_ms = true,
               progress = true, progress_interval = true, max_behind = true, wait = true },
    run = run,
}

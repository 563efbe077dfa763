-- `qx events check --require MODULE`: every stored event name and version that the
-- application's classes cannot read (docs/evolution.md). Exit 0 when all are readable, 1 when
-- some are not (a deploy can refuse to start), 2 on a usage error.
local tostring = tostring

local USAGE = "qx events check --require MODULE [--url URL]"

local function check(flags)
    local cli = require "qx.cli"
    local app_classes = require "qx.cli.app_classes"
    local app, e = app_classes.load(flags.require)
    if not app then cli.complain(e) return 2 end
    local reg
    reg, e = app_classes.registry(app)
    if not reg then cli.complain(e) return 2 end
    local db = cli.connect(flags)
    if not db then return 1 end
    local store = require("qx.store.event_store").new{ db = db, registry = reg }
    local report
    report, e = store:check()
    db:close()
    if not report then cli.complain(tostring(e)) return 1 end
    for _, u in ipairs(report.unreadable) do
        cli.say("unreadable: ", u.count, " event(s) ", u.reason)
    end
    for _, u in ipairs(report.unknown) do
        cli.say("no class:   ", u.count, " event(s) ", u.event_name)
    end
    if report.ok then
        cli.say("ok: every stored version of the ", #app.events, " classes' events is readable")
        return 0
    end
    cli.say(#report.unreadable, " stored name/version pair(s) cannot be read")
    return 1
end

local function run(flags, pos)
    local cli = require "qx.cli"
    if pos[1] ~= "check" or pos[2] ~= nil then
        cli.complain("usage: ", USAGE)
        return 2
    end
    return check(flags)
end

return {
    summary = "events check: the stored event versions the application's classes cannot read",
    usage = USAGE,
    values = { url = true, require = true },
    run = run,
}

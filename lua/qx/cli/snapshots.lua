-- `qx snapshots rebuild --require MODULE --aggregate TYPE [--batch N] [--all]`: rewrites the
-- aggregate type's snapshots taken with another snapshot_version (--all: every one) from its
-- events, batch by batch, a line per batch (docs/evolution.md).
local tostring = tostring
local tonumber = tonumber
local ipairs = ipairs

local USAGE = "qx snapshots rebuild --require MODULE --aggregate TYPE [--batch N] [--all] "
              .. "[--url URL]"

local function rebuild(flags)
    local cli = require "qx.cli"
    local app_classes = require "qx.cli.app_classes"
    if flags.aggregate == nil then
        cli.complain("give the aggregate type with --aggregate TYPE")
        return 2
    end
    local batch = tonumber(flags.batch or 100)
    if not batch or batch % 1 ~= 0 or batch < 1 or batch > 10000 then
        cli.complain("--batch must be an integer from 1 to 10000")
        return 2
    end
    local app, e = app_classes.load(flags.require)
    if not app then cli.complain(e) return 2 end
    local class
    for _, c in ipairs(app.aggregates) do
        if c.aggregate_type == flags.aggregate then class = c end
    end
    if class == nil then
        local names = {}
        for i, c in ipairs(app.aggregates) do names[i] = c.aggregate_type end
        cli.complain("--require ", flags.require, " has no event-sourced class ", flags.aggregate,
                     " (it has: ", #names > 0 and table.concat(names, ", ") or "none", ")")
        return 2
    end
    local reg
    reg, e = app_classes.registry(app)
    if not reg then cli.complain(e) return 2 end
    local db = cli.connect(flags)
    if not db then return 1 end
    local store = require("qx.store.event_store").new{ db = db, registry = reg }
    local res
    res, e = store:rebuild_snapshots(class, { batch = batch, all = flags.all == true,
        on_progress = function(p)
            cli.say(("%s: %d/%d snapshots rebuilt (%.1f s)"):format(p.aggregate_type, p.done,
                                                                    p.total, p.elapsed_seconds))
        end })
    db:close()
    if not res then cli.complain(tostring(e)) return 1 end
    cli.say(class.aggregate_type, ": ", res.rebuilt, " snapshot(s) rebuilt")
    return 0
end

local function run(flags, pos)
    local cli = require "qx.cli"
    if pos[1] ~= "rebuild" or pos[2] ~= nil then
        cli.complain("usage: ", USAGE)
        return 2
    end
    return rebuild(flags)
end

return {
    summary = "snapshots rebuild: rewrite an aggregate type's snapshots from its events",
    usage = USAGE,
    switches = { all = true },
    values = { url = true, require = true, aggregate = true, batch = true },
    run = run,
}

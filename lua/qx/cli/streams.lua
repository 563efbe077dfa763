-- `qx streams`: look after the event store's streams.
--
--   qx streams archive TYPE ID [--tenant-id T]   close a stream: its events move to the
--                                               archive (docs/event-store.md, "Archived streams")
local tostring = tostring

local USAGE = "qx streams archive TYPE ID [--tenant-id T]   [--url URL]"

local function run(flags, pos)
    local cli = require "qx.cli"
    local sub = pos[1]
    if sub == nil then
        cli.complain("usage: ", USAGE)
        return 2
    end
    if sub ~= "archive" then
        cli.complain("unknown streams command '", sub, "'; usage: ", USAGE)
        return 2
    end
    local agg_type, id = pos[2], pos[3]
    if agg_type == nil or id == nil or pos[4] ~= nil then
        cli.complain("streams archive takes a type and an id; usage: ", USAGE)
        return 2
    end
    if agg_type == "" then
        cli.complain("the aggregate type is empty")
        return 2
    end
    local db = cli.connect(flags)
    if not db then return 1 end
    local store = require("qx.store.event_store").new{ db = db }
    local info, e = store:archive(agg_type, id, { tenant_id = flags.tenant_id })
    db:close()
    if not info then
        cli.complain(tostring(e))
        return e.code == "invalid" and 2 or 1
    end
    cli.say("archived ", agg_type, " ", id, ": ", info.events, " event(s), last sequence ",
            info.last_sequence, ", at ", info.archived_at)
    return 0
end

return {
    summary = "archive a stream of the event store (its events leave the hot table)",
    usage = USAGE,
    values = { url = true, tenant_id = true },
    run = run,
}

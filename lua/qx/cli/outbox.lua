-- `qx outbox`: look after the transactional outbox.
--
--   qx outbox status [--metrics]        pending, scheduled retries, oldest pending age, most
--                                       attempts, dead letters (--metrics: Prometheus text)
--   qx outbox dead [--limit N]          the dead letters, oldest first
--   qx outbox retry-dead ID... | --all  make dead letters pending again (attempts reset)
--   qx outbox purge --older-than S | --before TIMESTAMP
--                                       delete published rows (pending and dead rows stay)
local tostring = tostring
local tonumber = tonumber

local USAGE = "qx outbox status [--metrics] | dead [--limit N] | retry-dead ID... "
              .. "| retry-dead --all"
    .. " | purge --older-than SECONDS | purge --before TIMESTAMP   [--url URL]"

local function run(flags, pos)
    local cli = require "qx.cli"
    local sub = pos[1]
    if sub == nil then
        cli.complain("usage: ", USAGE)
        return 2
    end
    local handlers = {}

    function handlers.status(outbox)
        local st, e = outbox:status()
        if not st then cli.complain(tostring(e)) return 1 end
        if flags.metrics then
            io.stdout:write(require("qx.messaging.relay").outbox_metrics(st))
            return 0
        end
        cli.say("pending:                ", st.pending)
        cli.say("  waiting for a retry:  ", st.scheduled)
        cli.say("oldest pending age:     ", ("%.3f s"):format(st.oldest_pending_age_seconds))
        cli.say("most attempts (pending): ", st.max_attempts)
        cli.say("dead letters:           ", st.dead)
        cli.say("published (not purged): ", st.published)
        return 0
    end

    function handlers.dead(outbox)
        local limit = tonumber(flags.limit or 100)
        if not limit or limit % 1 ~= 0 or limit < 0 or limit > 10000 then
            cli.complain("--limit must be an integer from 0 to 10000")
            return 2
        end
        local rows, e = outbox:get_dead{ limit = limit }
        if not rows then cli.complain(tostring(e)) return 1 end
        for _, r in ipairs(rows) do
            cli.say(r.id, "  ", r.event_name, "  attempts ", r.attempts, "  dead since ", r.dead_at,
                    "  ", tostring(r.last_error == require("qx.core").null and "" or r.last_error))
        end
        if #rows == 0 then cli.say("no dead letters") end
        return 0
    end

    handlers["retry-dead"] = function(outbox)
        local ids = {}
        for i = 2, #pos do ids[#ids + 1] = pos[i] end
        if #ids == 0 and not flags.all then
            cli.complain("give the ids of the dead letters to retry, or --all")
            return 2
        end
        if #ids > 0 and flags.all then
            cli.complain("give ids or --all, not both")
            return 2
        end
        local n, e = outbox:retry_dead(#ids > 0 and ids or nil)
        if not n then cli.complain(tostring(e)) return e.code == "invalid" and 2 or 1 end
        cli.say(n, " dead letter(s) made pending again")
        return 0
    end

    function handlers.purge(outbox)
        local opts
        if flags.older_than ~= nil and flags.before ~= nil then
            cli.complain("give --older-than or --before, not both")
            return 2
        elseif flags.older_than ~= nil then
            local s = tonumber(flags.older_than)
            if not s or s < 0 then cli.complain("--older-than must be seconds >= 0") return 2 end
            opts = { older_than_seconds = s }
        elseif flags.before ~= nil then
            opts = { published_before = flags.before }
        else
            cli.complain("purge needs --older-than SECONDS or --before TIMESTAMP")
            return 2
        end
        local n, e = outbox:purge(opts)
        if not n then cli.complain(tostring(e)) return e.code == "invalid" and 2 or 1 end
        cli.say(n, " published row(s) purged")
        return 0
    end

    local h = handlers[sub]
    if not h then
        cli.complain("unknown outbox command '", sub, "'; usage: ", USAGE)
        return 2
    end
    local db = cli.connect(flags)
    if not db then return 1 end
    local code = h(require("qx.store.outbox").new(db))
    db:close()
    return code
end

return {
    summary = "outbox status (--metrics for Prometheus), dead letters, retry-dead, purge",
    usage = USAGE,
    switches = { metrics = true, all = true },
    values = { url = true, limit = true, older_than = true, before = true },
    run = run,
}

-- `qx consumer`: look after a JetStream consumer of qx.consumer, its inbox and dead letters.
--
--   qx consumer status --durable D [--stream S] [--servers URLS]
--                      the durable's view on the server: pending, waiting for an ack,
--                      redelivered, delivered and acked sequences, settings
--   qx consumer dead --durable D [--name N] [--limit N] [--include-replayed]
--                      the dead letters, oldest first
--   qx consumer replay --durable D [--name N] ID... | --all
--                      publish dead letters to their subject again, for the consumer to fetch
--   qx consumer purge-inbox --durable D [--name N] --older-than SECONDS
--                      delete inbox rows handled longer ago than that
--
-- --name is the consumer's name in the inbox and dead letters (qx.consumer's name option; the
-- durable by default). The database: --url or QX_DB__URL; NATS: --servers or QX_NATS__SERVERS.
local tostring = tostring
local tonumber = tonumber
local ipairs = ipairs

local USAGE = "qx consumer status --durable D [--stream S] | dead --durable D [--limit N] "
    .. "[--include-replayed] | replay --durable D ID... | replay --durable D --all "
    .. "| purge-inbox --durable D --older-than SECONDS   [--name N] [--url URL] [--servers URLS]"

local function text(v)
    if v == nil or v == require("qx.core").null then return "" end
    return tostring(v)
end

local function connect_nats(cli, flags)
    local conn, e = require("qx.messaging.nats").connect{ servers = flags.servers,
                                                           stream = flags.stream }
    if not conn then cli.complain(tostring(e)) return nil end
    return conn
end

local handlers = {}

function handlers.status(cli, flags)
    local qx = require "qx"
    local conn = connect_nats(cli, flags)
    if not conn then return 1 end
    local c, e = qx.consumer{ nats = conn, stream = flags.stream, durable = flags.durable,
                              registry = qx.registry{}, bind = true }
    if not c then
        conn:close()
        cli.complain(tostring(e))
        return 1
    end
    local info
    info, e = c:info()
    c:close()
    conn:close()
    if not info then cli.complain(tostring(e)) return 1 end
    cli.say("consumer:               ", text(info.stream), "/", text(info.durable))
    cli.say("pending (not delivered): ", text(info.num_pending))
    cli.say("waiting for an ack:     ", text(info.num_ack_pending))
    cli.say("redelivered, unacked:   ", text(info.num_redelivered))
    cli.say("pull requests waiting:  ", text(info.num_waiting))
    cli.say("last delivered seq:     ", text(info.delivered_stream_seq))
    cli.say("ack floor seq:          ", text(info.ack_floor_stream_seq))
    cli.say("ack wait:               ", ("%.3f s"):format((tonumber(info.ack_wait_ms) or 0) / 1000))
    cli.say("max ack pending:        ", text(info.max_ack_pending))
    return 0
end

function handlers.dead(cli, flags, _, admin)
    local limit = tonumber(flags.limit or 100)
    if not limit or limit % 1 ~= 0 or limit < 0 or limit > 10000 then
        cli.complain("--limit must be an integer from 0 to 10000")
        return 2
    end
    return admin(function(db, name)
        local rows, e = require("qx.messaging.consumer.dead_letters").dead_letters(db, name,
            { limit = limit, include_replayed = flags.include_replayed or nil })
        if not rows then cli.complain(tostring(e)) return 1 end
        for _, r in ipairs(rows) do
            cli.say(r.id, "  ", text(r.event_name), "  ", r.reason, "  deliveries ",
                    text(r.deliveries), "  dead since ", r.dead_at,
                    r.replayed_at ~= require("qx.core").null and ("  replayed " .. r.replayed_at)
                        or "", "  ", text(r.error):gsub("\n", " "))
        end
        if #rows == 0 then cli.say("no dead letters") end
        return 0
    end)
end

function handlers.replay(cli, flags, pos, admin)
    local ids = {}
    for i = 2, #pos do ids[#ids + 1] = pos[i] end
    if #ids == 0 and not flags.all then
        cli.complain("give the ids of the dead letters to replay, or --all")
        return 2
    end
    if #ids > 0 and flags.all then
        cli.complain("give ids or --all, not both")
        return 2
    end
    return admin(function(db, name)
        local conn = connect_nats(cli, flags)
        if not conn then return 1 end
        local r, e = require("qx.messaging.consumer.dead_letters").republish_dead(db, conn, name,
            #ids > 0 and ids or nil)
        conn:close()
        if not r then cli.complain(tostring(e)) return e.code == "invalid" and 2 or 1 end
        for id, fe in pairs(r.errors) do cli.complain(id, ": ", tostring(fe)) end
        cli.say(r.republished, " dead letter(s) republished",
                r.failed > 0 and (", " .. r.failed .. " failed") or "")
        return r.failed == 0 and 0 or 1
    end)
end

handlers["purge-inbox"] = function(cli, flags, _, admin)
    local s = tonumber(flags.older_than)
    if flags.older_than == nil then
        cli.complain("purge-inbox needs --older-than SECONDS")
        return 2
    end
    if not s or s < 0 or s ~= s or s == math.huge then
        cli.complain("--older-than must be seconds >= 0")
        return 2
    end
    return admin(function(db, name)
        local n, e = require("qx.messaging.consumer.dead_letters").purge_inbox(db, name,
            { older_than_seconds = s })
        if not n then cli.complain(tostring(e)) return 1 end
        cli.say(n, " inbox row(s) purged")
        return 0
    end)
end

local function run(flags, pos)
    local cli = require "qx.cli"
    local sub = pos[1]
    local h = sub and handlers[sub]
    if not h then
        if sub then cli.complain("unknown consumer command '", sub, "'") end
        cli.complain("usage: ", USAGE)
        return 2
    end
    if sub ~= "replay" and #pos > 1 then
        cli.complain("consumer ", sub, " takes no arguments, got '", pos[2], "'")
        return 2
    end
    if type(flags.durable) ~= "string" or flags.durable == "" then
        cli.complain("consumer ", sub, " needs --durable NAME")
        return 2
    end
    -- the commands on the database: connect, run, close
    local function admin(fn)
        local db = cli.connect(flags)
        if not db then return 1 end
        local ok, code = pcall(fn, db, flags.name or flags.durable)
        db:close()
        if not ok then error(code, 0) end
        return code
    end
    return h(cli, flags, pos, admin)
end

return {
    summary = "a consumer's status on the server, its dead letters, replay, purge-inbox",
    usage = USAGE,
    switches = { all = true, include_replayed = true },
    values = { url = true, servers = true, stream = true, durable = true, name = true,
               limit = true, older_than = true },
    run = run,
}

-- `qx relay`: runs the outbox relay until SIGTERM or SIGINT (the batch in flight is finished).
--
--   qx relay [--url URL] [--servers NATS_URLS] [--shard-id N] [--shard-count N]
--            [--batch-size N] [--max-in-flight N] [--max-attempts N] [--poll-interval S]
--            [--idle-interval S] [--lock-retry S] [--ack-timeout-ms MS] [--subject-prefix P]
--            [--metrics-file PATH [--metrics-interval S]] [--metrics-listen HOST:PORT]
--            [--delete-published] [--ensure-stream] [--once] [--verbose]
--
-- Flags override the environment (QX_DB__*, QX_NATS__*, QX_RELAY__*). --metrics-file writes the
-- Prometheus text (outbox figures and relay counters) to PATH every --metrics-interval seconds
-- (default 15; the outbox figures count the table's rows), for a textfile collector.
-- --metrics-listen serves the same text on /metrics and the relay's health on /health over HTTP
-- (docs/relay.md); an address that cannot be bound stops it before it connects. --once runs
-- one batch, prints its figures and exits (0 when nothing failed). --delete-published deletes a
-- row once JetStream has acked it instead of setting published_at. --ensure-stream creates the
-- stream first (development).
local tostring = tostring
local tonumber = tonumber
local type = type
local os_time = os.time
local stdout, stderr = io.stdout, io.stderr

local function log(...)
    stderr:write(os.date("!%Y-%m-%dT%H:%M:%SZ"), " qx relay: ", ...)
    stderr:write("\n")
    stderr:flush()
end

local function number_flag(flags, name, integer)
    local v = flags[name]
    if v == nil then return nil end
    local n = tonumber(v)
    if n == nil or (integer and n % 1 ~= 0) then
        return nil, "--" .. name:gsub("_", "-") .. " must be "
                    .. (integer and "an integer" or "a number")
    end
    return n
end

local function write_file(path, text)
    local tmp = path .. ".tmp"
    local f, e = io.open(tmp, "w")
    if not f then return nil, e end
    f:write(text)
    f:close()
    return os.rename(tmp, path)
end

-- the servers as a log may show them: no user, password or token
local function servers_for_log(servers)
    return (servers:gsub("(%w+://)[^@/,]*@", "%1"))
end

-- Connects to NATS the way a running relay reconnects: an unreachable server is tried again
-- every reconnect_wait, reconnect_attempts more times (-1: until it answers), each failure
-- logged; with once, one attempt. Call it with signals watched: a SIGTERM/SIGINT ends the
-- waiting. -> conn | nil, err
local function connect_nats(qx, core, opts, once)
    local s, e = qx.nats.settings(opts)
    if not s then return nil, e end
    local where, limit = servers_for_log(s.servers), once and 0 or s.reconnect_attempts
    local attempt = 0
    while true do
        local conn
        conn, e = qx.nats.connect(opts)
        if conn or e.code ~= "connection" then return conn, e end
        attempt = attempt + 1
        local last = limit >= 0 and attempt > limit
        log(("cannot connect to NATS at %s (attempt %d%s): %s%s"):format(where, attempt,
            limit >= 0 and (" of " .. (limit + 1)) or "",
            (tostring(e.message or e):gsub("^cannot connect to NATS: ", "")),
            last and "; giving up"
                or ("; trying again in %g s"):format(s.reconnect_wait_ms / 1000)))
        if last or core.signals_sleep(s.reconnect_wait_ms) then return nil, e end
    end
end

local function summary(r)
    if r.lock_lost then
        -- its marks were fenced: what JetStream acked is not marked, and goes again
        return ("claimed %d, %d acked by JetStream before the shard lock was found lost: none "
                .. "marked, they go again"):format(r.claimed, r.published)
    end
    return ("claimed %d, published %d (%d duplicates), failed %d, dead-lettered %d, held %d")
        :format(r.claimed, r.published, r.duplicates, r.failed, r.dead_lettered, r.held)
end

-- one line per failed publish of a batch (the first 16; the rest counted in one more line)
local function log_failures(r)
    local failures = r.failures or {}
    for _, f in ipairs(failures) do
        log(("publish of event %s failed (%s): %s"):format(f.event_id,
            f.dead and "dead-lettered"
                or f.counted and "counted toward max_attempts; retried later"
                or "not the event's fault, not counted; retried later", f.error))
    end
    local more = r.failed + r.dead_lettered - #failures
    if more > 0 then log(("... and %d more failed publishes in this batch"):format(more)) end
end

local function run(flags)
    local cli = require "qx.cli"
    local qx = require "qx"
    local core = require "qx.core"

    local opts = {}
    local e
    for _, f in ipairs({ "shard_id", "shard_count", "batch_size", "max_in_flight", "max_attempts",
                         "ack_timeout_ms" }) do
        opts[f], e = number_flag(flags, f, true)
        if e then cli.complain(e) return 2 end
    end
    for _, f in ipairs({ "poll_interval", "idle_interval", "lock_retry" }) do
        opts[f .. "_seconds"], e = number_flag(flags, f, false)
        if e then cli.complain(e) return 2 end
    end
    opts.subject_prefix = flags.subject_prefix
    if flags.delete_published then opts.delete_published = true end
    if flags.metrics_file ~= nil and type(flags.metrics_file) ~= "string" then
        cli.complain("--metrics-file needs a path") return 2
    end
    local metrics_every
    metrics_every, e = number_flag(flags, "metrics_interval", false)
    if e or (metrics_every and metrics_every <= 0) then
        cli.complain("--metrics-interval must be a number of seconds > 0") return 2
    end
    metrics_every = metrics_every or 15
    if flags.metrics_listen ~= nil then
        if flags.once then
            cli.complain("--metrics-listen serves while the relay runs: not with --once") return 2
        end
        -- bound and let go at once: a bad address is said before anything is connected
        local probe, pe = core.metrics_server{ listen = flags.metrics_listen }
        if not probe then cli.complain(tostring(pe)) return 2 end
        probe:close()
    end

    local db = cli.connect(flags)
    if not db then return 1 end
    -- from here until the relay runs (which handles them itself), SIGTERM/SIGINT set a flag
    core.signals_watch(true)
    local conn
    conn, e = connect_nats(qx, core, { servers = flags.servers }, flags.once)
    if core.signals_sleep(0) then
        log("stopped before NATS was reached")
        core.signals_watch(false)
        if conn then conn:close() end
        db:close()
        return 0
    end
    if not conn then
        core.signals_watch(false)
        cli.complain(tostring(e))
        db:close()
        return 1
    end
    if flags.ensure_stream then
        local ok, se = conn:ensure_stream()
        if not ok then cli.complain("ensure_stream: ", tostring(se)) return 1 end
    end
    opts.db, opts.nats = db, conn
    local relay
    relay, e = qx.relay(opts)
    if not relay then
        cli.complain(tostring(e))
        conn:close()
        db:close()
        return e and e.code == "invalid" and 2 or 1
    end
    local s = relay.settings

    if flags.once then
        local r, re = relay:run_once()
        core.signals_watch(false)
        relay:close()
        conn:close()
        db:close()
        if not r then cli.complain(tostring(re)) return 1 end
        log_failures(r)
        cli.say(r.leader and summary(r) or "not the leader of this shard: nothing done")
        return (r.failed == 0 and r.dead_lettered == 0) and 0 or 1
    end

    log(("starting: shard %d of %d, batch %d, window %d, stream subjects %s.>")
        :format(s.shard_id, s.shard_count, s.batch_size, s.max_in_flight, s.subject_prefix))
    local last_error, last_error_at, last_metrics = nil, 0, 0
    local state -- "leader", "standby" or "no database": each change is one line saying which
    local retry = ("%g s"):format(s.lock_retry_ms / 1000)
    local function on_batch(r, err)
        local now = r.leader and "leader" or r.database and "standby" or "no database"
        local said -- the line that tells the change says what err says
        if r.lock_lost then
            log("shard lock lost: its database session ended; stopped publishing, nothing more "
                .. "is marked under it (the rows in flight go again)")
            said, state = true, "lost" -- what comes next (standby, leader again) is a line too
        elseif now ~= state then
            if now == "leader" then
                log("leader of its shard: took the shard lock; publishing")
            elseif now == "standby" then
                log("standby: another relay holds this shard; trying for its lock every ", retry)
            else
                log("database lost", state == "leader" and " (stopped publishing)" or "", ": ",
                    err and tostring(err) or "no connection", "; reconnecting every ", retry)
                said = true
            end
            state = now
        end
        if err and not said then
            local msg = tostring(err)
            -- the same error again is logged at most every 30 s
            if msg ~= last_error or os_time() - last_error_at >= 30 then
                log("batch failed: ", msg)
                last_error, last_error_at = msg, os_time()
            end
        elseif not err and last_error then
            log("recovered")
            last_error = nil
        end
        log_failures(r)
        if flags.verbose and r.claimed > 0 then log(summary(r)) end
        if flags.metrics_file and os_time() - last_metrics >= metrics_every then
            last_metrics = os_time()
            local text = relay:metrics()
            if text then write_file(flags.metrics_file, text) end
        end
    end
    if not core.signals_sleep(0) then -- none came while it was being set up
        local ok, re = relay:run{ on_batch = on_batch, handle_signals = true,
                                  metrics_listen = flags.metrics_listen }
        if not ok then
            core.signals_watch(false)
            cli.complain(tostring(re))
            relay:close()
            conn:close()
            db:close()
            return 2
        end
    end
    core.signals_watch(false)
    local st = relay:stats()
    log(("stopped: %d published, %d failed, %d dead-lettered in %d batches")
        :format(st.published, st.failed, st.dead_lettered, st.batches))
    relay:close()
    conn:close()
    db:close()
    stdout:flush()
    return 0
end

return {
    summary = "publish the outbox to NATS JetStream until SIGTERM/SIGINT",
    usage = "qx relay [--url URL] [--servers NATS_URLS] [--shard-id N] [--shard-count N] "
        .. "[--batch-size N] [--max-in-flight N] [--max-attempts N] [--poll-interval S] "
        .. "[--idle-interval S] [--lock-retry S] [--ack-timeout-ms MS] [--subject-prefix P] "
        .. "[--metrics-file PATH [--metrics-interval S]] [--metrics-listen HOST:PORT] "
        .. "[--delete-published] [--ensure-stream] [--once] [--verbose]",
    switches = { once = true, verbose = true, ensure_stream = true, delete_published = true },
    values = { url = true, servers = true, shard_id = true, shard_count = true, batch_size = true,
               max_in_flight = true, max_attempts = true, poll_interval = true,
               idle_interval = true, lock_retry = true, ack_timeout_ms = true,
               subject_prefix = true, metrics_file = true, metrics_interval = true,
               metrics_listen = true },
    run = run,
}

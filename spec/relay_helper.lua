-- Shared by the relay specs: an outbox of its own (a schema per spec, so relays never see other
-- specs' rows), a stream of its own, committing events, reading the stream back, relay child
-- processes.
local support = require "support"
local qx = require "qx"
local core = require "qx.core"
local cjson = require "cjson"
local luassert = require "luassert"

local H = { support = support }

-- children run on the interpreter of this run (the ASan run puts its own lua5.4 first on PATH)
H.LUA = jit and "luajit" or "lua5.4"

local sh = support.sh
H.sh = sh

-- A fresh schema holding the qx tables, a db whose connections use it, a NATS connection with a
-- subject prefix and a stream of its own. opts.subjects: the stream's subjects (default the
-- prefix's ">"); opts.duplicate_window_ms; opts.max_msg_size; opts.servers (default the suite's
-- nats-server) and opts.replicas, for a cluster.
function H.setup(opts)
    opts = opts or {}
    local db, name, url = support.schema_db("relay")
    local prefix = "spec." .. name
    local stream = name:upper()
    local servers = opts.servers or support.nats_url()
    local conn = assert(qx.nats.connect{ servers = servers, stream = stream,
                                         subject_prefix = prefix, publish_timeout_ms = 2000,
                                         reconnect_wait_ms = 200 })
    local subjects = opts.subjects
    if subjects then
        for i, s in ipairs(subjects) do subjects[i] = prefix .. "." .. s end
    end
    local stream_opts = { subjects = subjects, duplicate_window_ms = opts.duplicate_window_ms,
                          max_msg_size = opts.max_msg_size, replicas = opts.replicas }
    local ok, e = conn:ensure_stream(stream_opts)
    -- a cluster just started may not know its peers' resources yet
    local deadline = core.clock() + 15
    while not ok and tostring(e):find("no suitable peers", 1, true) and core.clock() < deadline do
        H.sleep(0.2)
        ok, e = conn:ensure_stream(stream_opts)
    end
    assert(ok, e)
    return { name = name, url = url, db = db, conn = conn, stream = stream, prefix = prefix,
             servers = servers,
             classes = {}, counters = {}, children = {} }
end

function H.teardown(ctx)
    for pid in pairs(ctx.children) do H.kill(ctx, pid, "KILL") end
    ctx.conn:delete_stream()
    ctx.conn:close()
    support.drop_schema(ctx.name, ctx.db)
    ctx.db:close()
end

function H.relay(ctx, opts)
    local o = { db = ctx.db, nats = ctx.conn, poll_interval_ms = 50, idle_interval_ms = 200,
                lock_retry_ms = 100 }
    for k, v in pairs(opts or {}) do o[k] = v end
    return qx.relay(o)
end

local function class(ctx, name)
    local c = ctx.classes[name]
    if not c then
        c = qx.integration_event(name, { version = 1 })
        ctx.classes[name] = c
    end
    return c
end

-- Commits one unit of work recording events; each spec is { key = "k1" | nil, name = ...,
-- pad = bytes of padding in the payload | nil }.
-- Payloads carry the key and a per-key counter, so order can be checked on the stream.
-- Returns the events.
function H.commit(ctx, specs)
    local evs = {}
    assert(ctx.db:unit_of_work(function(uow)
        for i, s in ipairs(specs) do
            local key = s.key
            local n = (ctx.counters[key or ""] or 0) + 1
            ctx.counters[key or ""] = n
            local ev = class(ctx, s.name or "thing.happened"){ key = key or "", n = n,
                                                               pad = s.pad and ("x"):rep(s.pad) }
            if key then
                ev.aggregate_type = "spec"
                ev.aggregate_id = key
            end
            uow:record(ev)
            evs[i] = ev
        end
    end))
    return evs
end

-- n events spread over nkeys keys, in units of work of `per_tx` events
function H.commit_many(ctx, n, nkeys, per_tx)
    local all = {}
    local i = 0
    while i < n do
        local specs = {}
        for _ = 1, math.min(per_tx or 50, n - i) do
            i = i + 1
            specs[#specs + 1] = { key = "k" .. (i % nkeys) }
        end
        for _, ev in ipairs(H.commit(ctx, specs)) do all[#all + 1] = ev end
    end
    return all
end

-- Every message on the stream, in stream order: { seq, subject, headers, env }.
function H.read_stream(ctx)
    local info = assert(ctx.conn:stream_info())
    local msgs = {}
    if info.messages == 0 then return msgs end
    for seq = info.first_seq, info.last_seq do
        local m, e = ctx.conn:stream_get(seq)
        -- a cluster that just changed its stream leader may answer a read late: ask again
        local tries = 0
        while not m and e.code ~= "not_found" and tries < 60 do
            H.sleep(0.25)
            tries = tries + 1
            m, e = ctx.conn:stream_get(seq)
        end
        assert(m or e.code == "not_found", "reading the stream: " .. tostring(e))
        if m then
            msgs[#msgs + 1] = { seq = m.sequence, subject = m.subject, headers = m.headers,
                                env = cjson.decode(m.data) }
        end
    end
    return msgs
end

-- Checks the stream against the events committed: each exactly once, per-key order kept.
-- Returns the messages.
function H.check_stream(ctx, expected)
    local msgs = H.read_stream(ctx)
    local seen, last = {}, {}
    for _, m in ipairs(msgs) do
        local id = m.env.event_id
        assert(not seen[id], "event " .. tostring(id) .. " is on the stream twice")
        seen[id] = true
        luassert.equal(id, m.headers["Nats-Msg-Id"])
        local key, n = m.env.payload.key, m.env.payload.n
        if type(key) == "string" and key ~= "" and type(n) == "number" then
            assert(n > (last[key] or 0), ("key %s: event %d after %d"):format(key, n, last[key] or 0))
            last[key] = n
        end
    end
    for _, ev in ipairs(expected) do
        assert(seen[ev.event_id], "event " .. ev.event_id .. " is not on the stream")
    end
    luassert.equal(#expected, #msgs)
    return msgs
end

function H.sql(ctx, sql, ...)
    return assert(ctx.db:query(sql, ...))
end

-- Makes every UPDATE of outbox rows named `name` (every UPDATE when name is nil) take `seconds`
-- more, in the ctx's schema: a relay's marking transaction then surely still runs while the
-- relay claims its next batch.
function H.slow_marks(ctx, seconds, name)
    assert(name == nil or name:match("^[%w.]+$"), "slow_marks: a plain event name")
    assert(ctx.db:exec(string.format([[
CREATE FUNCTION slow_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF %s THEN PERFORM pg_sleep(%s); END IF;
    RETURN NULL;
END $$]], name and ("EXISTS (SELECT 1 FROM changed WHERE event_name = '" .. name .. "')")
                                    or "true", tostring(seconds))))
    assert(ctx.db:exec([[CREATE TRIGGER slow_mark AFTER UPDATE ON qx_outbox_events
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION slow_mark()]]))
end

function H.sleep(seconds)
    local conn = assert(qx.connect{ url = support.db_url(), pool_size = 1 })
    conn:query("SELECT pg_sleep($1)", seconds)
    conn:close()
end

-- Waits until fn() is true (checked every 50 ms), at most `seconds`; returns whether it was.
function H.wait_until(fn, seconds)
    local deadline = core.clock() + seconds
    local db = assert(qx.connect{ url = support.db_url(), pool_size = 1 })
    while true do
        if fn() then db:close() return true end
        if core.clock() > deadline then db:close() return false end
        db:query("SELECT pg_sleep(0.05)")
    end
end

function H.pending(ctx)
    return H.sql(ctx, "SELECT count(*) AS n FROM qx_outbox_events WHERE published_at IS NULL"
        .. " AND dead_at IS NULL")[1].n
end

-- Starts `qx relay ARGS` in the background against this spec's outbox and stream; returns its
-- pid. Its output goes to ctx.name .. ".log" in the system temp folder. extra_env: more
-- NAME=value words for env (a later one wins: QX_DB__URL=... to connect otherwise).
function H.spawn_relay(ctx, args, extra_env)
    local log = os.tmpname()
    local envs = {
        "LUA_PATH=" .. sh(package.path), "LUA_CPATH=" .. sh(package.cpath),
        "QX_DB__URL=" .. sh(ctx.url), "QX_NATS__SERVERS=" .. sh(ctx.servers),
        "QX_NATS__STREAM=" .. sh(ctx.stream), "QX_NATS__SUBJECT_PREFIX=" .. sh(ctx.prefix),
        "QX_NATS__RECONNECT_WAIT_SECONDS=0.2", "ASAN_OPTIONS=detect_leaks=0", extra_env or "",
    }
    local cmd = "env " .. table.concat(envs, " ") .. " " .. H.LUA .. " bin/qx relay " .. (args or "")
        .. " >" .. sh(log) .. " 2>&1 & echo $!"
    local p = assert(io.popen(cmd))
    local pid = tonumber(p:read("*l"))
    p:close()
    assert(pid, "could not start a relay")
    ctx.children[pid] = log
    return pid
end

-- Runs `qx ARGS` against this spec's outbox and stream; returns stdout .. stderr, exit code.
function H.cli(ctx, args, extra_env)
    local envs = {
        "LUA_PATH=" .. sh(package.path), "LUA_CPATH=" .. sh(package.cpath),
        "QX_DB__URL=" .. sh(ctx.url), "QX_NATS__SERVERS=" .. sh(ctx.servers),
        "QX_NATS__STREAM=" .. sh(ctx.stream), "QX_NATS__SUBJECT_PREFIX=" .. sh(ctx.prefix),
        "ASAN_OPTIONS=detect_leaks=0", extra_env or "",
    }
    local p = assert(io.popen("env " .. table.concat(envs, " ") .. " " .. H.LUA .. " bin/qx "
        .. args .. " 2>&1; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local code = tonumber(out:match("exit=(%d+)%s*$"))
    return out:gsub("exit=%d+%s*$", ""), code
end

function H.alive(pid)
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then return false end
    local st = f:read("*l") or ""
    f:close()
    local state = st:match("^%d+ %b() (%a)")
    return state ~= nil and state ~= "Z" and state ~= "X"
end

function H.kill(ctx, pid, sig)
    os.execute("kill -" .. (sig or "KILL") .. " " .. pid .. " 2>/dev/null")
    H.wait_until(function() return not H.alive(pid) end, 10)
    local log = ctx.children[pid]
    ctx.children[pid] = nil
    local out = ""
    if log then
        local f = io.open(log)
        if f then out = f:read("*a") f:close() end
        os.remove(log)
    end
    return out
end

function H.log_of(ctx, pid)
    local f = io.open(ctx.children[pid] or "")
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
end

-- ---- the test nats-server: stop, freeze, restart ---------------------------------------------

-- The servers' env file (scripts/servers.sh), which names the nats-server to stop; a restart
-- here writes the new pid into it so that `servers.sh stop` still stops the server.
local function env_file()
    local dir = os.getenv("QX_TEST_RUN_DIR")
    return dir and (dir .. "/env")
end

function H.nats_pid()
    local f = env_file() and io.open(env_file())
    if f then
        local s = f:read("*a")
        f:close()
        local pid = s:match("QX_TEST_NATS_PID=(%d+)")
        if pid then return tonumber(pid) end
    end
    return tonumber(os.getenv("QX_TEST_NATS_PID"))
end

local function nats_healthy()
    local r = os.execute("env -u LD_PRELOAD curl -sf --max-time 1 "
        .. sh(support.nats_monitor_url() .. "/healthz") .. " >/dev/null 2>&1")
    return r == true or r == 0 -- Lua 5.4 and LuaJIT report success differently
end

function H.nats_stop()
    local pid = assert(H.nats_pid(), "no nats-server pid")
    os.execute("kill -TERM " .. pid)
    assert(H.wait_until(function() return not H.alive(pid) end, 15), "nats-server did not stop")
end

-- Starts nats-server again on the same port, monitor port and store; records its pid.
function H.nats_start()
    local port, mon = os.getenv("QX_TEST_NATS_PORT"), os.getenv("QX_TEST_NATS_MONITOR_PORT")
    local store, log = os.getenv("QX_TEST_NATS_STORE"), os.getenv("QX_TEST_NATS_LOG")
    assert(port and mon and store and log, "the servers' env does not say how nats-server runs")
    local p = assert(io.popen("env -u LD_PRELOAD setsid nats-server -js -a 127.0.0.1 -p " .. port
        .. " -m " .. mon .. " -sd " .. sh(store) .. " -l " .. sh(log) .. " </dev/null >>"
        .. sh(log .. ".out") .. " 2>&1 & echo $!"))
    local pid = tonumber(p:read("*l"))
    p:close()
    local f = env_file() and io.open(env_file())
    if f then
        local s = f:read("*a")
        f:close()
        s = s:gsub("QX_TEST_NATS_PID=%d*", "QX_TEST_NATS_PID=" .. pid)
        local tmp = env_file() .. ".tmp"
        local w = assert(io.open(tmp, "w"))
        w:write(s)
        w:close()
        assert(os.rename(tmp, env_file()))
    end
    -- a restart can find the ports still held for a moment: try again if it died
    assert(H.wait_until(nats_healthy, 15), "nats-server did not come back")
    return pid
end

function H.nats_freeze() os.execute("kill -STOP " .. assert(H.nats_pid())) end
function H.nats_thaw() os.execute("kill -CONT " .. assert(H.nats_pid())) end

return H

-- Archiving a stream while another connection appends to it: the append either commits before
-- the archive and is archived with the stream, or fails with conflict "stream archived"; no
-- event is lost and none is left in the hot table. The other side runs in a child process (the
-- C calls block, so one process cannot hold both transactions open). Bounded in count and time.
local support = require "support"
local qx = require "qx"
local clock = require("qx.core").clock

local sh = support.sh

-- the interpreter running this spec (lua5.4, luajit, or the ASan build of lua5.4)
local function interpreter()
    local i = -1
    while arg and arg[i - 1] ~= nil do i = i - 1 end
    return (arg and arg[i]) or (jit and "luajit" or "lua5.4")
end

local function spawn(code, env)
    local file = os.tmpname()
    local f = assert(io.open(file, "w"))
    f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
    f:write(code)
    f:close()
    local parts = { "env ASAN_OPTIONS=detect_leaks=0" }
    for k, v in pairs(env) do parts[#parts + 1] = k .. "=" .. sh(v) end
    parts[#parts + 1] = sh(interpreter()) .. " " .. sh(file) .. " 2>&1"
    return { pipe = assert(io.popen(table.concat(parts, " "), "r")), file = file }
end

local function collect(child)
    local out = child.pipe:read("*a") or ""
    child.pipe:close()
    os.remove(child.file)
    return out
end

-- The model every process builds the same way from the environment.
local MODEL = [[
local qx = require "qx"
local env = os.getenv
local db = assert(qx.connect{ url = env("QX_DB__URL"), pool_size = 1 })
local Deposited = qx.event(env("C_EVENT"))
local Account = qx.event_sourced(env("C_TYPE"))
Account:on(Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
local store = qx.event_store{ db = db }
local id = env("C_ID")
]]

-- archives the stream; prints "OK events" or "ERR code message"
local ARCHIVER = MODEL .. [[
local info, e = store:archive(Account, id)
if info then print("OK " .. info.events) else print("ERR " .. e.code .. " " .. e.message) end
db:close()
]]

-- loads the stream, then (told by the file C_GO appearing) appends one event and commits;
-- prints "OK" or "ERR code message"
local LATE_APPENDER = MODEL .. [[
local r, e = db:unit_of_work(function(uow)
  local es = uow:store(store)
  local acc = assert(es:load(Account, id))
  acc:record(Deposited{ amount = 100 })
  assert(es:append(acc))
  local deadline = os.time() + 10
  while not io.open(env("C_GO")) and os.time() < deadline do end
  return true
end)
if r then print("OK") else print("ERR " .. e.code .. " " .. e.message) end
db:close()
]]

-- appends one event at a time until the stream is archived (or N commands ran); prints the
-- committed event ids, one "ID <uuid>" line each, then "DONE <reason>"
local WRITER = MODEL .. [[
local reason = "count"
for i = 1, tonumber(env("C_N")) do
  local ev_id
  local r, e = db:unit_of_work(function(uow)
    local es = uow:store(store)
    local acc, le = es:load(Account, id)
    if not acc then error(le) end
    local ev = Deposited{ amount = 1 }
    ev_id = ev.event_id
    acc:record(ev)
    assert(es:append(acc))
    return true
  end)
  if r then
    print("ID " .. ev_id)
  elseif e.archived or (e.code == "conflict" and e.message:find("stream archived", 1, true)) then
    reason = "archived"
    break
  elseif e.code ~= "conflict" then
    print("ERROR " .. tostring(e))
    break
  end
end
print("DONE " .. reason)
db:close()
]]

describe("event store: archive under concurrent append #concurrency #slow", function()
    local db

    setup(function()
        db = support.migrated_db{ pool_size = 4 }
    end)

    teardown(function()
        if db then db:close() end
    end)

    local function model()
        local m = { type = support.unique("Ac"), event = support.unique("ac.deposited") }
        m.Deposited = qx.event(m.event)
        m.Account = qx.event_sourced(m.type)
        m.Account:on(m.Deposited, function(self, ev) self.balance = (self.balance or 0) + ev.amount end)
        m.store = qx.event_store{ db = db }
        return m
    end

    local function env(m, id, extra)
        local e = { QX_DB__URL = support.db_url(), C_TYPE = m.type, C_EVENT = m.event, C_ID = id }
        for k, v in pairs(extra or {}) do e[k] = v end
        return e
    end

    local function deposit(m, id, n)
        return db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = es:load(m.Account, id) or m.Account.new(id)
            for _ = 1, n do acc:record(m.Deposited{ amount = 1 }) end
            assert(es:append(acc))
            return acc
        end)
    end

    local function count(sql, ...) return assert(db:query(sql, ...))[1].n end

    local function where(m, id)
        local hot = count("SELECT count(*) AS n FROM qx_aggregate_events WHERE aggregate_type = $1 "
                          .. "AND aggregate_id = $2", m.type, id)
        local arch = count("SELECT count(*) AS n FROM qx_aggregate_events_archive "
                           .. "WHERE aggregate_type = $1 AND aggregate_id = $2", m.type, id)
        return hot, arch
    end

    -- waits (5 s at most) until a backend waits for an advisory lock
    local function someone_waits()
        local deadline = clock() + 5
        while clock() < deadline do
            if count("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                     .. "AND NOT granted") > 0 then
                return true
            end
            support.spin(0.02)
        end
        return false
    end

    it("an append open when the archive starts commits first and is archived with the stream", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, 2))
        local child
        assert(db:unit_of_work(function(uow)
            local es = uow:store(m.store)
            local acc = assert(es:load(m.Account, id))
            acc:record(m.Deposited{ amount = 1 })
            assert(es:append(acc))
            assert(uow:flush())                       -- the insert is in, not committed
            child = spawn(ARCHIVER, env(m, id))
            assert.is_true(someone_waits())           -- the archive waits for this transaction
            return true
        end))
        local out = collect(child)
        assert.equal("OK 3\n", out)
        assert.same({ 0, 3 }, { where(m, id) })
    end)

    it("an append that reaches the stream while the archive is open fails with conflict: stream archived", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, 2))
        local go = os.tmpname()
        os.remove(go)
        local child = spawn(LATE_APPENDER, env(m, id, { C_GO = go }))
        support.spin(0.5)                                 -- the child has loaded the stream
        local info = assert(db:unit_of_work(function(uow)
            local r = assert(uow:store(m.store):archive(m.type, id))
            assert(io.open(go, "w")):close()              -- now the child appends and commits
            assert.is_true(someone_waits())               -- its insert waits for this archive
            return r
        end))
        os.remove(go)
        assert.equal(2, info.events)
        local out = collect(child)
        assert.matches("^ERR conflict .*stream archived", out)
        assert.same({ 0, 2 }, { where(m, id) })
    end)

    it("writers racing an archive: every committed event is archived, none left hot, sequences contiguous", function()
        local m = model()
        local id = qx.uuid()
        assert(deposit(m, id, 1))
        local writers = {}
        for w = 1, 3 do writers[w] = spawn(WRITER, env(m, id, { C_N = 400 })) end
        support.spin(0.4)
        local info, err = m.store:archive(m.type, id)
        assert.is_truthy(info, err and tostring(err))
        local committed = 0
        local ids = {}
        for w, c in ipairs(writers) do
            local out = collect(c)
            assert.is_nil(out:find("ERROR", 1, true), "writer " .. w .. ":\n" .. out)
            assert.matches("DONE %a+\n$", out)
            for ev in out:gmatch("ID (%S+)") do
                committed = committed + 1
                ids[#ids + 1] = ev
            end
        end
        local hot, arch = where(m, id)
        assert.equal(0, hot)
        assert.equal(1 + committed, arch)
        assert.equal(arch, info.events)
        -- every committed event is in the archive, at a sequence 1..n with no gap
        local rows = assert(db:query("SELECT count(DISTINCT sequence) AS n, min(sequence) AS lo, "
            .. "max(sequence) AS hi FROM qx_aggregate_events_archive WHERE aggregate_type = $1 "
            .. "AND aggregate_id = $2", m.type, id))[1]
        assert.same({ arch, 1, arch }, { rows.n, rows.lo, rows.hi })
        -- (an empty Lua table goes out as a JSON object: when every writer lost the race, none
        -- committed and there is nothing to look for)
        local found = #ids == 0 and 0 or count("SELECT count(*) AS n FROM qx_aggregate_events_archive "
            .. "WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)::uuid)", ids)
        assert.equal(committed, found)
    end)
end)

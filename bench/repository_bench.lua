-- Repository benchmark: get by id, a list page with a filter and a sort, a keyset page, and
-- save with the version check, as operations per second through qx (Lua 5.4 and LuaJIT),
-- beside the same statements replayed by a raw libpq C program (same SQL text, same
-- parameters, same pipelined round trips, prepared once) and beside LuaSQL (luasql.postgres,
-- the same SQL with the values inlined, as LuaSQL has no parameters).
--
--   QX_DB__URL=postgresql://... lua5.4 bench/repository_bench.lua [SECONDS [ROUNDS]]
--
-- Each contender runs each operation for SECONDS (default 2), in ROUNDS (default 5) rounds. In a
-- round the contenders take turns operation by operation (the order of the turns rotating from
-- round to round), so that the runs compared are seconds apart on a host whose speed drifts;
-- a ratio is the median of the rounds' ratios to the C program's run of the same operation in
-- the same round, and rates are medians of the rounds.
--
-- Needs `make` (build/lua5.4 and build/luajit) and a C compiler. Every operation of qx runs
-- in its own unit of work (BEGIN and the statement in one round trip, COMMIT in a second, as a
-- read must see its result before committing), except "get (reader)" and "keyset page
-- (reader)", which read outside a transaction (a description's reader: one statement, one round
-- trip), and "save (deferred)", which queues the guarded UPDATE with the COMMIT in one round trip.
-- paths from the tree this script is in, whatever the working directory
local ROOT = (arg[0]:match("^(.*)bench/[^/]*$") or "./")
if ROOT == "" then ROOT = "./" end
package.path = ROOT .. "lua/?.lua;" .. ROOT .. "lua/?/init.lua;" .. package.path

local WORKER = arg[1] == "--worker"
if not WORKER then
    package.cpath = ROOT .. "build/lua5.4/?.so;" .. package.cpath
end

local qx = require "qx"
local core = require "qx.core"
local cjson = require "cjson"

local SECONDS = tonumber(WORKER and arg[3] or arg[1]) or 2
local ROUNDS = tonumber(not WORKER and arg[2] or nil) or 5
local ROWS = 5000
local KEY = "bench-cursor-key-0123456789abcdef"

local function env(name)
    local v = os.getenv(name)
    assert(v and v ~= "", name .. " is not set")
    return v
end

local function describe_users(tbl)
    return qx.repository{ table = tbl, filterable = { "email", "name", "is_active" },
                          sortable = { "created_at", "email" }, tenanted = true, soft_delete = true,
                          max_page_size = 100 }
end

-- the operations, as closures over a db and a description; each returns true
local function operations(db, users, o)
    local ctx = { context = { tenant_id = o.tenant, user_id = "bench" } }
    local reader = users:reader(db, { tenant_id = o.tenant })
    local first = assert(reader:page{ limit = 20, sort = { "email" },
                                      filters = {{ "is_active", "eq", true }} })
    local cursor = assert(first.next_cursor)
    local saved = assert(reader:get(o.save_id))
    local deferred = assert(reader:get(o.defer_id))
    local function uow(fn) return assert(db:unit_of_work(fn, ctx)) end
    return {
        { "get", function()
                return uow(function(u) return assert(u:repo(users):get(o.get_id)) end) end },
        { "get (reader)", function() return assert(reader:get(o.get_id)) end },
        { "list page (filter + sort)", function()
                return uow(function(u)
                    return assert(u:repo(users):list{ filters = {{ "email", "ends_with", "@example.com" }},
                                                      sort = {{ "email", "desc" }}, page = 3, page_size = 20 })
                end) end },
        { "keyset page", function()
                return uow(function(u)
                    return assert(u:repo(users):page{ limit = 20, after = cursor, sort = { "email" },
                                                      filters = {{ "is_active", "eq", true }} })
                end) end },
        { "keyset page (reader)", function()
                return assert(reader:page{ limit = 20, after = cursor, sort = { "email" },
                                           filters = {{ "is_active", "eq", true }} })
          end },
        { "save", function()
                return uow(function(u) return assert(u:repo(users):save(saved)) end) end },
        { "save (deferred)", function()
                return uow(function(u) return assert(u:repo(users):save(deferred, { defer = true })) end) end },
    }
end

local function time_ops(ops)
    local out = {}
    for _, op in ipairs(ops) do
        local fn = op[2]
        for _ = 1, 50 do fn() end -- warm up: statement cache, JIT
        local n, t0, c0 = 0, core.clock(), os.clock()
        local t = t0
        repeat
            fn()
            n = n + 1
            if n % 16 == 0 then t = core.clock() end
        until t - t0 >= SECONDS
        t = core.clock()
        out[#out + 1] = { op[1], n / (t - t0), (os.clock() - c0) / n * 1e6 }
    end
    return out
end

-- ---- worker: qx under another interpreter, or LuaSQL ----------------------------------------
if WORKER then
    local kind = arg[2]
    local o = { tbl = arg[4], tenant = arg[5], get_id = arg[6], save_id = arg[7], defer_id = arg[8] }
    local only = arg[9]
    local results
    if kind == "qx" then
        local db = assert(qx.connect{ pool_size = 1, cursor_key = KEY })
        local ops = {}
        for _, op in ipairs(operations(db, describe_users(o.tbl), o)) do
            if op[1] == only then ops[#ops + 1] = op end
        end
        assert(#ops == 1, "unknown operation")
        results = time_ops(ops)
        db:close()
    end
    for _, r in ipairs(results) do
        io.write(r[1], "\t", string.format("%.1f", r[2]), "\t", string.format("%.1f", r[3]), "\n")
    end
    os.exit(0)
end

-- ---- driver -----------------------------------------------------------------------------

local db = assert(qx.connect{ pool_size = 2, cursor_key = KEY })
assert(qx.migrate(db))
local tbl = "bench_repo_users"
assert(db:exec("DROP TABLE IF EXISTS " .. tbl))
assert(db:exec("CREATE TABLE " .. tbl .. " (" .. qx.schema.id_column() .. ", email text NOT NULL, "
    .. "name text, is_active boolean NOT NULL DEFAULT true, " .. qx.schema.audit_columns() .. ")"))
assert(db:exec("CREATE INDEX ON " .. tbl .. " (tenant_id, email)"))
local tenant, other = qx.uuid(), qx.uuid()
for _, t in ipairs({ tenant, other }) do
    assert(db:exec("INSERT INTO " .. tbl .. " (id, email, name, is_active, tenant_id, created_by) "
        .. "SELECT qx_uuid_v7(), 'user' || lpad(g::text, 6, '0') || '@example.com', 'User ' || g, "
        .. "g % 10 <> 0, $1, 'bench' FROM generate_series(1, $2) g", t, ROWS))
end
assert(db:exec("ANALYZE " .. tbl))
local function id_of(n)
    return assert(db:query("SELECT id::text AS id FROM " .. tbl .. " WHERE tenant_id = $1 AND "
        .. "email = $2", tenant, ("user%06d@example.com"):format(n)))[1].id
end
local o = { tbl = tbl, tenant = tenant, get_id = id_of(1234), save_id = id_of(11),
            defer_id = id_of(12) }
local users = describe_users(tbl)

-- Capture what each operation sends: every batch (round trip) of the unit of work.
local function text(v)
    if v == nil or v == core.null then return nil end
    local t = type(v)
    if t == "boolean" then return v and "true" or "false" end
    if t == "number" then
        if v % 1 == 0 then return string.format("%d", v) end
        return string.format("%.17g", v)
    end
    if t == "table" then return cjson.encode(v) end
    return v
end

local tx_methods = debug.getregistry()["qx.tx"].__index

local function copy_of(sql, ...)
    local n = select("#", ...)
    local p = {}
    for j = 1, n do p[j] = text((select(j, ...))) end
    return { sql = sql, n = n, params = p }
end

-- Watches the unit of work's transaction: the statements queued and read, with their
-- parameters, and after each round trip its texts in order (tx:sent(): BEGIN and COMMIT too).
local function capture(fn)
    local batches, pending = {}, {}
    local saved = {}
    local function after(tx, before, final, ...)
        if tx:round_trips() > before then
            if final then pending[#pending + 1] = final end
            local copy, k = {}, 1
            for i, sql in ipairs(tx:sent()) do
                local s = pending[k]
                if s and s.sql == sql then
                    copy[i], k = s, k + 1
                else
                    copy[i] = { sql = sql, n = 0, params = {} }
                end
            end
            batches[#batches + 1] = copy
            pending = {}
        end
        return ...
    end
    local function wrap(m, make_final)
        local real = tx_methods[m]
        saved[m] = real
        tx_methods[m] = function(tx, ...)
            local before = tx:round_trips()
            return after(tx, before, make_final and make_final(...), real(tx, ...))
        end
    end
    local real_queue = tx_methods.queue
    saved.queue = real_queue
    tx_methods.queue = function(tx, ...)
        pending[#pending + 1] = copy_of(...)
        return real_queue(tx, ...)
    end
    for _, m in ipairs({ "query", "rows", "exec" }) do wrap(m, copy_of) end
    wrap("rows_upto", function(_, ...) return copy_of(...) end)
    for _, m in ipairs({ "flush", "commit", "rollback", "rollback_to" }) do wrap(m) end
    local ok, e = pcall(function()
        assert(db:unit_of_work(fn, { context = { tenant_id = tenant, user_id = "bench" } }))
    end)
    for m, real in pairs(saved) do tx_methods[m] = real end
    assert(ok, e)
    return batches
end

-- the C baseline saves rows of its own; so does each interpreter
local c_save, c_defer = id_of(21), id_of(22)
local jit_o = { tbl = tbl, tenant = tenant, get_id = o.get_id, save_id = id_of(31), defer_id = id_of(32) }

local reader = users:reader(db, { tenant_id = tenant })
local cursor = assert(reader:page{ limit = 20, sort = { "email" },
                                  filters = {{ "is_active", "eq", true }} }).next_cursor
local specs = {
    { "get", capture(function(uow) return assert(uow:repo(users):get(o.get_id)) end) },
    { "list page (filter + sort)", capture(function(uow)
            return assert(uow:repo(users):list{ filters = {{ "email", "ends_with", "@example.com" }},
                                                sort = {{ "email", "desc" }}, page = 3, page_size = 20 })
      end) },
    { "keyset page", capture(function(uow)
            return assert(uow:repo(users):page{ limit = 20, after = cursor, sort = { "email" },
                                                filters = {{ "is_active", "eq", true }} })
      end) },
}
do -- the saves, on the baseline's rows
    local e1, e2 = assert(reader:get(c_save)), assert(reader:get(c_defer))
    specs[#specs + 1] = { "save", capture(function(uow) return assert(uow:repo(users):save(e1)) end),
                          version = 1 }
    specs[#specs + 1] = { "save (deferred)", capture(function(uow)
        return assert(uow:repo(users):save(e2, { defer = true }))
    end), version = 1 }
end
-- the reader's get and keyset page: the SELECT alone, one round trip
local function select_of(spec)
    for _, s in ipairs(spec[2][1]) do
        if s.sql:find("^SELECT") and not s.sql:find("set_config") then return s end
    end
    error("no SELECT in " .. spec[1])
end
local function after_spec(name, reader_name)
    for i, spec in ipairs(specs) do
        if spec[1] == name then
            table.insert(specs, i + 1, { reader_name, { { select_of(spec) } } })
            return
        end
    end
    error("no operation " .. name)
end
after_spec("get", "get (reader)")
after_spec("keyset page", "keyset page (reader)")

-- where the version parameter is (the UPDATE's parameter equal to the captured version, 1)
local function version_slot(spec)
    for b, batch in ipairs(spec[2]) do
        for i, s in ipairs(batch) do
            if s.sql:find("UPDATE", 1, true) then
                for j = s.n, 1, -1 do
                    if s.params[j] == "1" and s.sql:find('"version" = $' .. j, 1, true) then return b, i, j end
                end
            end
        end
    end
    error("no version parameter in " .. spec[1])
end

for _, spec in ipairs(specs) do
    if spec.version then spec.slot = { version_slot(spec) } end
end

-- The spec file of the C baseline, with the current versions of its rows.
local function version_now(id)
    return assert(db:query("SELECT version FROM " .. tbl .. " WHERE id = $1", id))[1].version
end

local function write_spec(path, only)
    local f = assert(io.open(path, "wb"))
    for _, spec in ipairs(specs) do
        if spec[1] ~= only then goto continue end
        local vb, vs, vp = 0, 0, 0
        if spec.slot then
            vb, vs, vp = spec.slot[1], spec.slot[2], spec.slot[3]
            spec[2][vb][vs].params[vp] = tostring(version_now(spec[1] == "save" and c_save or c_defer))
        end
        f:write(("op %s %d %d %d %d\n"):format(spec[1]:gsub("[^%w]+", "_"), #spec[2], vb, vs, vp))
        for _, batch in ipairs(spec[2]) do
            f:write(("batch %d\n"):format(#batch))
            for _, st in ipairs(batch) do
                f:write(("stmt %d\n"):format(st.n), #st.sql, "\n", st.sql, "\n")
                for j = 1, st.n do
                    local v = st.params[j]
                    if v == nil then f:write("-1\n") else f:write(#v, "\n", v, "\n") end
                end
            end
        end
        ::continue::
    end
    f:close()
end

local BASELINE = ROOT .. "build/bench/repository_baseline"
os.execute("mkdir -p '" .. ROOT .. "build/bench'")
assert(os.execute("cc -O2 -o '" .. BASELINE .. "' '" .. ROOT .. "bench/repository_baseline.c' "
    .. "-I/usr/include/postgresql -lpq"), "cannot build the C baseline")

local function run_baseline(only)
    local path = os.tmpname()
    write_spec(path, only)
    local out = {}
    local p = assert(io.popen("'" .. BASELINE .. "' '" .. env("QX_DB__URL") .. "' "
        .. path .. " " .. SECONDS))
    for line in p:lines() do
        local name, ops, cpu = line:match("^(%S+) (%S+) (%S+)$")
        if name then out[name], out[name .. " cpu"] = tonumber(ops), tonumber(cpu) end
    end
    p:close()
    os.remove(path)
    assert(out[only:gsub("[^%w]+", "_")], "the C baseline failed on " .. only)
    return out
end

-- LuaSQL: the same statements with the values inlined (it has no parameters); a transaction
-- per operation where qx has one (LuaSQL sends BEGIN after each COMMIT itself).
local luasql_ops
do
    local ok, driver = pcall(require, "luasql.postgres")
    if ok then
        local env_ = assert(driver.postgres())
        local conn = assert(env_:connect(env("QX_DB__URL")))
        local function inline(st)
            return (st.sql:gsub("%$(%d+)", function(j)
                local v = st.params[tonumber(j)]
                if v == nil then return "NULL" end
                return "'" .. conn:escape(v) .. "'"
            end))
        end
        local function run(sql)
            local cur = assert(conn:execute(sql))
            if type(cur) == "userdata" then
                local row = cur:fetch({}, "a")
                while row do row = cur:fetch(row, "a") end
                cur:close()
            end
        end
        local rows_of = { save = id_of(41), ["save (deferred)"] = id_of(42) }
        luasql_ops = {}
        for _, spec in ipairs(specs) do
            local stmts, vslot, vp = {}, nil, nil
            for b, batch in ipairs(spec[2]) do
                for i, st in ipairs(batch) do
                    if st.sql ~= "BEGIN" and st.sql ~= "COMMIT" then
                        -- a copy on LuaSQL's own row
                        local c = { sql = st.sql, n = st.n, params = {} }
                        for j = 1, st.n do
                            local v = st.params[j]
                            if v == (spec[1] == "save" and c_save or c_defer) then v = rows_of[spec[1]] end
                            c.params[j] = v
                        end
                        stmts[#stmts + 1] = c
                        if spec.slot and b == spec.slot[1] and i == spec.slot[2] then
                            vslot, vp = c, spec.slot[3]
                        end
                    end
                end
            end
            local in_tx = spec[2][1][1].sql == "BEGIN"
            local version
            luasql_ops[#luasql_ops + 1] = { spec[1], function()
                if vslot then
                    version = version or version_now(rows_of[spec[1]])
                    vslot.params[vp] = tostring(version)
                    version = version + 1
                end
                for _, st in ipairs(stmts) do run(inline(st)) end
                if in_tx then conn:commit() end
                return true
            end, in_tx, conn }
        end
    end
end

local function run_luasql(only)
    local out = {}
    for _, op in ipairs(luasql_ops or {}) do
        if op[1] == only then
            op[4]:setautocommit(not op[3])
            local r = time_ops({ op })[1]
            out[r[1]], out[r[1] .. " cpu"] = r[2], r[3]
        end
    end
    return out
end

local function run_luajit(only)
    local out = {}
    local cmd = ("cd '%s' && env LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
        .. "LUA_CPATH='build/luajit/?.so;;' luajit bench/repository_bench.lua --worker qx %s %s %s %s %s %s '%s'"
        ):format(ROOT, SECONDS, jit_o.tbl,
        jit_o.tenant, jit_o.get_id, jit_o.save_id, jit_o.defer_id, only)
    local p = assert(io.popen(cmd))
    for line in p:lines() do
        local name, ops, cpu = line:match("^(.-)\t(%S+)\t(%S+)$")
        if name then out[name], out[name .. " cpu"] = tonumber(ops), tonumber(cpu) end
    end
    p:close()
    return out
end

local qx_ops = operations(db, users, o)
local function run_qx(only)
    local out = {}
    for _, op in ipairs(qx_ops) do
        if op[1] == only then
            local r = time_ops({ op })[1]
            out[r[1]], out[r[1] .. " cpu"] = r[2], r[3]
        end
    end
    return out
end

-- Rounds in which the contenders take turns operation by operation, the order of the turns
-- rotating from round to round: the runs compared are seconds apart, and none always goes first.
local contenders = { { "base", run_baseline }, { "qx", run_qx }, { "jit", run_luajit },
                     { "luasql", run_luasql } }
local rounds = { base = {}, qx = {}, jit = {}, luasql = {} }
for round = 1, ROUNDS do
    io.stderr:write(("round %d of %d\n"):format(round, ROUNDS))
    for _, who in ipairs(contenders) do rounds[who[1]][round] = {} end
    for _, spec in ipairs(specs) do
        for turn = 0, #contenders - 1 do
            local who = contenders[(round - 1 + turn) % #contenders + 1]
            local into = rounds[who[1]][round]
            for k, v in pairs(who[2](spec[1])) do into[k] = v end
        end
    end
end

local function median(list, key)
    local xs = {}
    for _, r in ipairs(list) do if r[key] then xs[#xs + 1] = r[key] end end
    if #xs == 0 then return nil end
    table.sort(xs)
    if #xs % 2 == 1 then return xs[(#xs + 1) / 2] end
    return (xs[#xs / 2] + xs[#xs / 2 + 1]) / 2
end

local function key(name) return (name:gsub("[^%w]+", "_")) end

-- a contender's ratio to the C program: the median of the rounds' ratios, and their range
local function ratios(list, name)
    local xs = {}
    for r, res in ipairs(list) do
        local b = rounds.base[r][key(name)]
        if res[name] and b then xs[#xs + 1] = res[name] / b end
    end
    if #xs == 0 then return nil end
    table.sort(xs)
    local m = #xs % 2 == 1 and xs[(#xs + 1) / 2] or (xs[#xs / 2] + xs[#xs / 2 + 1]) / 2
    return m, xs[1], xs[#xs]
end

print(("repository benchmark: %d rows per tenant, 2 tenants; %d rounds of %.1f s per "
    .. "measurement, the contenders taking turns operation by operation"):format(ROWS, ROUNDS, SECONDS))
print("rates: medians of the rounds; ratios: medians of the rounds' ratios to libpq")
print(("%-26s %11s %10s %6s %10s %6s %10s %6s"):format("operation", "libpq ops/s", "qx 5.4",
    "ratio", "qx LuaJIT", "ratio", "LuaSQL", "ratio"))
for _, spec in ipairs(specs) do
    local name = spec[1]
    local base = median(rounds.base, key(name))
    local a, j, l = median(rounds.qx, name), median(rounds.jit, name), median(rounds.luasql, name)
    local function num(x) return x and ("%.0f"):format(x) or "-" end
    local function ratio(list)
        local m = ratios(list, name)
        return m and ("%.2f"):format(m) or "-"
    end
    print(("%-26s %11s %10s %6s %10s %6s %10s %6s"):format(name, num(base), num(a), ratio(rounds.qx),
        num(j), ratio(rounds.jit), num(l), ratio(rounds.luasql)))
end
print("")
print("range of the rounds' ratios to libpq")
print(("%-26s %13s %13s %13s"):format("operation", "qx 5.4", "qx LuaJIT", "LuaSQL"))
for _, spec in ipairs(specs) do
    local name = spec[1]
    local function range(list)
        local m, lo, hi = ratios(list, name)
        return m and ("%.2f-%.2f"):format(lo, hi) or "-"
    end
    print(("%-26s %13s %13s %13s"):format(name, range(rounds.qx), range(rounds.jit),
        range(rounds.luasql)))
end
print("")
print("client CPU per operation (microseconds; the database server's time not included)")
print(("%-26s %11s %10s %10s %10s"):format("operation", "libpq", "qx 5.4", "qx LuaJIT", "LuaSQL"))
for _, spec in ipairs(specs) do
    local name = spec[1]
    local function num(x) return x and ("%.0f"):format(x) or "-" end
    print(("%-26s %11s %10s %10s %10s"):format(name, num(median(rounds.base, key(name) .. " cpu")),
        num(median(rounds.qx, name .. " cpu")), num(median(rounds.jit, name .. " cpu")),
        num(median(rounds.luasql, name .. " cpu"))))
end
assert(db:exec("DROP TABLE " .. tbl))
db:close()

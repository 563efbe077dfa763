-- luacheck settings: `make lint` (and the lint step of `make test`) runs `luacheck lua spec bench`.
-- Each part names the files it is for; keep them apart.

-- ---- lua/: the Lua layer ------------------------------------------------------------------
-- "max" is the union of Lua 5.1-5.4 and LuaJIT, the interpreters qx runs on (a module that
-- uses a name only one of them has tests for it first, e.g. `table.unpack or unpack`).
files["lua"] = {
    std = "max",
    max_line_length = 100,
}
-- the OpenResty helpers run inside nginx-lua, where ngx is a global
files["lua/qx/openresty"] = {
    globals = { "ngx" },  -- ngx.status and ngx.header are written
}

-- ---- spec/ and bench/: busted specs, their helpers, and the benchmarks ---------------------
-- describe/it/setup/teardown/pending/spy/stub/mock, assert with busted's modifiers; the helpers
-- (spec/support.lua and the like) are required by spec files and use busted's globals too.
files["spec"] = { std = "+busted" }
-- bench/ (plain scripts run by bench/run.sh) is checked with the defaults.

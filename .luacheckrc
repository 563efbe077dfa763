-- luacheck configuration: `make lint` (and the lint step of `make test`) runs `luacheck lua spec bench`.
-- Files run on Lua 5.4 and on LuaJIT (5.1 with extensions), so the default std ("max", the union
-- of them) stays.

-- (the lua/ part goes above this line)

---------------------------------------------------------------------------------------------------
-- spec/ and bench/: busted specs, their helpers, and the benchmarks.

-- describe/it/setup/teardown/pending/spy/stub/mock, assert with busted's modifiers; the helpers
-- (spec/support.lua and the like) are required by spec files and use busted's globals too.
files["spec"] = { std = "+busted" }
-- bench/ (plain scripts run by bench/run.sh) is checked with the defaults.

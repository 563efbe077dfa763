#!/usr/bin/env bash
# The OpenResty command path under load: wrk POSTs /orders of the shop example (a unit of work
# writing a row and an outbox event, run in an nginx worker thread) against one nginx worker
# with a thread pool of 2 and of 4; beside it, the same handler called directly in Lua 5.4 in
# one process (the baseline); and the latency of /health on that worker while the POST load
# runs.
#
#   bash bench/openresty_bench.sh        (needs QX_DB__URL: make bench starts the servers)
#
# Environment: QX_BENCH_SECONDS (default 10) per run, QX_BENCH_CONNECTIONS (default 16) wrk
# connections for the POST load. Each run uses a database of its own, dropped at the end.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${QX_BENCH_SECONDS:-10}
conns=${QX_BENCH_CONNECTIONS:-16}
pg_bin=${QX_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}

[ -n "${QX_DB__URL:-}" ] || { echo "openresty bench: set QX_DB__URL (make bench does)" >&2; exit 1; }
for tool in wrk nginx curl lua5.4; do
  command -v "$tool" >/dev/null || { echo "openresty bench: no $tool (scripts/deps.sh)" >&2; exit 1; }
done
[ -f "$root/build/luajit/qx/core.so" ] && [ -f "$root/build/lua5.4/qx/core.so" ] ||
  { echo "openresty bench: run make first" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/qx-openresty-bench.XXXXXX")
chmod 755 "$work"
dbname=qx_openresty_bench_$$
admin_url=$QX_DB__URL
case "$admin_url" in
  postgres*://*) base=${admin_url%%\?*}; base=${base%/*}; bench_url=$base/$dbname ;;
  *) bench_url="$admin_url dbname=$dbname" ;;
esac
psql() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -d "$admin_url" "$@"; }

prefixes=()
cleanup() {
  local p
  for p in "${prefixes[@]}"; do bash "$root/examples/openresty/run.sh" stop "$p" 2>/dev/null || true; done
  psql -c "DROP DATABASE IF EXISTS $dbname WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql -c "CREATE DATABASE $dbname"

# /health is probed at a steady ~100 requests/s (one connection, 10 ms between requests), so
# the probe measures the worker's responsiveness without competing for the CPU itself.
cat >"$work/paced.lua" <<'EOF'
function delay() return 10 end
EOF
cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"customer":"bench","sku":"B-1","quantity":1}'
EOF

# wrk's summary as "req/s p50 p99 non2xx"
summarise() {
  awk '
    /Requests\/sec:/ { rps = $2 }
    /^ +50%/ { p50 = $2 }
    /^ +99%/ { p99 = $2 }
    /Non-2xx or 3xx responses:/ { bad = $5 }
    /Socket errors:/ { serr = $0 }
    END { printf "%s %s %s %s\n", rps, p50, p99, (bad == "" ? 0 : bad) }' "$1"
}

echo "openresty bench: ${seconds}s per run, $conns connections, $(nproc) cores"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) at start"

for threads in 2 4; do
  prefix=$work/nginx-$threads
  prefixes+=("$prefix")
  QX_DB__URL=$bench_url QX_NGINX_THREADS=$threads QX_NGINX_WORKERS=1 \
    bash "$root/examples/openresty/run.sh" start "$prefix" 2>/dev/null
  # shellcheck disable=SC1091
  . "$prefix/env"
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "$QX_HTTP_URL/orders" >/dev/null # warm the VMs
  wrk -t1 -c1 -d"$((seconds + 1))s" --latency -s "$work/paced.lua" "$QX_HTTP_URL/health" >"$work/health-$threads.txt" &
  health=$!
  wrk -t1 -c"$conns" -d"${seconds}s" --latency -s "$work/post.lua" "$QX_HTTP_URL/orders" \
    >"$work/post-$threads.txt"
  wait "$health"
  read -r rps p50 p99 bad <<<"$(summarise "$work/post-$threads.txt")"
  read -r hrps hp50 hp99 hbad <<<"$(summarise "$work/health-$threads.txt")"
  printf 'nginx, 1 worker, thread pool %d: POST /orders %8s req/s  p50 %7s  p99 %7s  non-2xx %s\n' \
    "$threads" "$rps" "$p50" "$p99" "$bad"
  printf '        /health on the same worker meanwhile:      p50 %7s  p99 %7s  (%s req/s, non-2xx %s)\n' \
    "$hp50" "$hp99" "$hrps" "$hbad"
  backends=$("$pg_bin/psql" -X -A -t -d "$admin_url" -c \
    "SELECT count(*) FROM pg_stat_activity WHERE datname = '$dbname' AND application_name = 'qx'")
  echo "        PostgreSQL connections held by the thread VMs: $backends"
  bash "$root/examples/openresty/run.sh" stop "$prefix" 2>/dev/null
done

# The baseline: the same handler called directly in Lua 5.4 (no nginx, no threads), in one
# process and in two at once (as many as the smaller thread pool).
cat >"$work/direct.lua" <<'EOF'
local clock = require("qx.core").clock
local commands = require "shop.commands"
local seconds = tonumber(arg[1])
local cmd = { customer = "bench", sku = "B-1", quantity = 1 }
for _ = 1, 200 do assert(select(2, commands.place_order(cmd))) end
local n, t0 = 0, clock()
local deadline = t0 + seconds
while clock() < deadline do
  for _ = 1, 50 do
    local _, ok, e = commands.place_order(cmd)
    if not ok then error(e.message) end
  end
  n = n + 50
end
local dt = clock() - t0
print(string.format("%d %.6f", n, dt))
EOF
direct() {
  QX_DB__URL=$bench_url LUA_PATH="$root/examples/openresty/?.lua;$root/lua/?.lua;$root/lua/?/init.lua;;" \
    LUA_CPATH="$root/build/lua5.4/?.so;;" lua5.4 "$work/direct.lua" "$seconds"
}
for procs in 1 2; do
  for i in $(seq 1 "$procs"); do direct >"$work/direct-$procs-$i.txt" & done
  wait
  cat "$work"/direct-"$procs"-*.txt | awk -v p="$procs" '
    { n += $1; if ($2 > t) t = $2; ms += $2 / $1 * 1000 }
    END { printf "Lua 5.4 direct, %d process%s:   place_order %8.0f ops/s  mean %.3f ms\n",
                 p, (p == 1 ? "  " : "es"), n / t, ms / NR }'
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) at end"

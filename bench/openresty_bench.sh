#!/usr/bin/env bash
# The OpenResty command path under load: wrk POSTs /orders of the shop example (a unit of work
# writing a row and an outbox event, run in an nginx worker thread) against one nginx worker
# with a thread pool of 2 and of 4; beside it, the same handler called directly in Lua 5.4 in
# one process (the baseline); and the latency of /health on that worker while the POST load
# runs.
#
#   bash bench/openresty_bench.sh        (needs QX_DB__URL: make bench starts the servers)
#
# The four configurations take turns, QX_BENCH_ROUNDS times (default 3, each round in another
# order), and the medians are reported, so drift on a shared machine hits them alike.
#
# Environment: QX_BENCH_SECONDS (default 10) per run, QX_BENCH_ROUNDS, QX_BENCH_CONNECTIONS
# (default 16) wrk connections for the POST load, QX_BENCH_SYNC_COMMIT=off to run the bench
# database with synchronous_commit off (commits then stop waiting for the WAL flush, and what
# is left is the cost of the path itself). A database of its own, dropped at the end.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${QX_BENCH_SECONDS:-10}
conns=${QX_BENCH_CONNECTIONS:-16}
rounds=${QX_BENCH_ROUNDS:-3}
sync_commit=${QX_BENCH_SYNC_COMMIT:-on}
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
if [ "$sync_commit" = off ]; then
  psql -c "ALTER DATABASE $dbname SET synchronous_commit = off"
fi

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

# The baseline: the same handler called directly in Lua 5.4 (no nginx, no threads).
cat >"$work/direct.lua" <<'EOF'
local clock = require("qx.core").clock
local commands = require "shop.commands"
local seconds = tonumber(arg[1])
local cmd = { customer = "bench", sku = "B-1", quantity = 1 }
for _ = 1, 100 do assert(select(2, commands.place_order(cmd))) end
local n, t0 = 0, clock()
local deadline = t0 + seconds
while clock() < deadline do
  for _ = 1, 20 do
    local _, ok, e = commands.place_order(cmd)
    if not ok then error(e.message) end
  end
  n = n + 20
end
print(string.format("%d %.6f", n, clock() - t0))
EOF

# a copy of the module, so that a rebuild in the tree during the bench does not hit it
mkdir -p "$work/cpath/qx"
cp "$root/build/lua5.4/qx/core.so" "$work/cpath/qx/core.so"

# direct N: N Lua 5.4 processes at once -> "ops/s mean_ms"
direct() {
  local procs=$1 i pids=() failed=0
  for i in $(seq 1 "$procs"); do
    QX_DB__URL=$bench_url LUA_PATH="$root/examples/openresty/?.lua;$root/lua/?.lua;$root/lua/?/init.lua;;" \
      LUA_CPATH="$work/cpath/?.so;;" lua5.4 "$work/direct.lua" "$seconds" >"$work/direct-$i.txt" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || failed=1; done
  if [ "$failed" = 1 ]; then
    echo "openresty bench: a direct run failed; the figures would mean nothing" >&2
    exit 1
  fi
  cat "$work"/direct-*.txt | awk '{ n += $1; if ($2 > t) t = $2; ms += $2 / $1 * 1000 }
                                  END { printf "%.0f %.3f\n", n / t, ms / NR }'
  rm -f "$work"/direct-*.txt
}

# nginx T: POST load on the nginx with a pool of T threads, /health paced beside it
#   -> "req/s p50 p99 non2xx health_p50 health_p99 health_non2xx"
nginx_run() {
  local url=$1 threads=$2 health
  wrk -t1 -c1 -d"$((seconds + 1))s" --latency -s "$work/paced.lua" "$url/health" \
    >"$work/health.txt" &
  health=$!
  wrk -t1 -c"$conns" -d"${seconds}s" --latency -s "$work/post.lua" "$url/orders" >"$work/post.txt"
  wait "$health"
  read -r rps p50 p99 bad <<<"$(summarise "$work/post.txt")"
  read -r _ hp50 hp99 hbad <<<"$(summarise "$work/health.txt")"
  echo "$rps $p50 $p99 $bad $hp50 $hp99 $hbad"
}

# The thread hop alone: a handler that does no I/O, through the same qx.openresty.run.
mkdir -p "$work/lua"
cat >"$work/lua/qx_bench_noop.lua" <<'EOF'
return require("qx.openresty").handlers({ noop = function(_, cmd) return { n = cmd.n } end },
                                        { db = false })
EOF
cat >"$work/bench.conf" <<'EOF'
location = /bench/noop {
    content_by_lua_block {
        local openresty = require "qx.openresty"
        openresty.respond(openresty.run("qx", "qx_bench_noop", "noop", { n = 1 }))
    }
}
EOF
chmod 644 "$work/lua/qx_bench_noop.lua" "$work/bench.conf"

declare -A url
for threads in 2 4; do
  prefix=$work/nginx-$threads
  prefixes+=("$prefix")
  QX_DB__URL=$bench_url QX_NGINX_THREADS=$threads QX_NGINX_WORKERS=1 \
    QX_NGINX_LUA_PATH="$work/lua/?.lua;" QX_NGINX_INCLUDE="$work/bench.conf" \
    bash "$root/examples/openresty/run.sh" start "$prefix" 2>/dev/null
  url[$threads]=$(sed -n 's/^export QX_HTTP_URL=//p' "$prefix/env")
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "${url[$threads]}/orders" >/dev/null # warm the VMs
done

echo "openresty bench: $rounds rounds of ${seconds}s per configuration, $conns wrk connections,"
echo "  synchronous_commit $sync_commit,"
echo "  $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) at start"
: >"$work/results"
order=("direct 1" "nginx 2" "nginx 4" "direct 2")
for round in $(seq 1 "$rounds"); do
  for k in 0 1 2 3; do
    set -- ${order[$(((k + round - 1) % 4))]}
    if [ "$1" = direct ]; then
      line=$(direct "$2") || exit 1
      echo "direct$2 $line" >>"$work/results"
    else
      echo "nginx$2 $(nginx_run "${url[$2]}" "$2")" >>"$work/results"
    fi
  done
done

# wrk prints latencies with units; medians are taken in milliseconds
ms_of() { awk '{ v = $1; u = v; sub(/^[0-9.]+/, "", u); v += 0
                 if (u == "us") v /= 1000; else if (u == "s") v *= 1000; printf "%.3f\n", v }'; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
col() { awk -v k="$1" -v c="$2" '$1 == k { print $c }' "$work/results"; }
col_ms() { col "$1" "$2" | ms_of | median; }
total() { col "$1" "$2" | awk '{ n += $1 } END { print n + 0 }'; }

echo
echo "medians of $rounds rounds:"
for p in 1 2; do
  printf 'Lua 5.4 direct, %d process%s:                 %7s ops/s  (mean %s ms per command)\n' \
    "$p" "$([ "$p" = 1 ] && echo "  " || echo es)" "$(col "direct$p" 2 | median)" "$(col "direct$p" 3 | median)"
done
for t in 2 4; do
  printf 'nginx, 1 worker, thread pool %d, POST /orders: %7s req/s  p50 %s ms  p99 %s ms  non-2xx %s\n' \
    "$t" "$(col "nginx$t" 2 | median)" "$(col_ms "nginx$t" 3)" "$(col_ms "nginx$t" 4)" "$(total "nginx$t" 5)"
  printf '   /health on that worker meanwhile (~100/s):  p50 %s ms  p99 %s ms  non-2xx %s\n' \
    "$(col_ms "nginx$t" 6)" "$(col_ms "nginx$t" 7)" "$(total "nginx$t" 8)"
done
for t in 2 4; do
  wrk -t1 -c"$conns" -d"${seconds}s" --latency "${url[$t]}/bench/noop" >"$work/noop.txt"
  wrk -t1 -c"$conns" -d"${seconds}s" --latency "${url[$t]}/health" >"$work/health-only.txt"
  read -r nrps np50 np99 nbad <<<"$(summarise "$work/noop.txt")"
  read -r hrps hp50 hp99 hbad <<<"$(summarise "$work/health-only.txt")"
  printf 'thread hop alone, pool %d: a no-I/O handler %8s req/s (p50 %s, non-2xx %s); /health without a thread %8s req/s (p50 %s)\n' \
    "$t" "$nrps" "$np50" "$nbad" "$hrps" "$hp50"
done
echo "PostgreSQL connections held by the thread VMs of both nginx (pools of 2 and 4): $("$pg_bin/psql" -X -A -t -d "$admin_url" -c \
  "SELECT count(*) FROM pg_stat_activity WHERE datname = '$dbname' AND application_name = 'qx'")"
echo "load $(cut -d' ' -f1-3 /proc/loadavg) at end"
echo
echo "every run (config req-or-ops/s ...):"
cat "$work/results"

#!/usr/bin/env bash
# qx in nginx against pgmoon, the pure-Lua PostgreSQL driver on nginx cosockets, in the same
# nginx, on the same tables, with the same work, rounds alternating:
#
#   write  POST /orders: one order row and one outbox row in one durable transaction.
#          qx, two ways: the shop example's place_order (a unit of work: v7 id, the full
#          envelope) in the worker itself on T cosocket connections (qx.openresty.connect,
#          "worker"), and through qx.openresty.run on a thread pool of T threads ("threads");
#          pgmoon: the same two rows as one multi-statement simple query over a kept-alive
#          cosocket, its pool limited to T connections (pool_size = T, a backlog behind it).
#   read   GET /orders/{id}: qx's reader (get_order), both ways, against pgmoon's SELECT of the
#          same row.
#   floor  POST /floor/orders: the transport alone, in the worker: the unit of work's two
#          INSERTs and its wake-up on a leased connection of qx.openresty.connect's pool,
#          without the unit of work, the model or the repository (bench_floor below);
#          "nowake" the same without the wake-up (listeners would learn of nothing).
#   ceiling  pgbench sending the write's two INSERTs as one simple query, T connections.
#   hop    GET /hop: qx.openresty.run_json to a handler that does nothing and has no database,
#          the thread hand-off alone: the most any call through the thread pool can reach.
#
# T = 4, 8 and 16 (QX_BENCH_THREADS), one nginx worker each, wrk with QX_BENCH_CONNECTIONS (16)
# connections. Both sides hold T PostgreSQL connections: qx's thread VMs share one pool of T
# (shared_pool, QX_DB__POOL_SIZE), and each worker sends up to QX_BENCH_QUEUE (default 2) calls
# per thread at once, so that a thread finds the next call queued when it finishes one.
#
#   bash bench/openresty_pgmoon.sh       (needs QX_DB__URL and `make`)
#
# pgmoon is not part of qx: it is loaded at run time from PGMOON_DIR (default
# ../shared/anchors/pgmoon beside the checkout, the folder holding pgmoon.lua).
# Each run also takes the CPU a request costs the nginx worker, the PostgreSQL server and wrk
# (from /proc), and the summary says how many writes a second the machine's cores would allow
# at that cost.
# Environment: QX_BENCH_SECONDS (default 8) per run, QX_BENCH_ROUNDS (default 3),
# QX_BENCH_THREADS (default "4 8 16"), QX_BENCH_CONNECTIONS (default 16).
# A database of its own (synchronous_commit on: every commit waits for its WAL flush),
# dropped at the end.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${QX_BENCH_SECONDS:-8}
conns=${QX_BENCH_CONNECTIONS:-16}
rounds=${QX_BENCH_ROUNDS:-3}
threads_list=${QX_BENCH_THREADS:-4 8 16}
queue=${QX_BENCH_QUEUE:-2}
pg_bin=${QX_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
modules=${QX_NGINX_MODULES:-/usr/lib/nginx/modules}
# PGMOON_DIR, else shared/anchors/pgmoon beside the checkout or beside a folder above it
pgmoon_dir=${PGMOON_DIR:-}
if [ -z "$pgmoon_dir" ]; then
  pgmoon_dir=$root/../shared/anchors/pgmoon
  d=$root/..
  while [ "$(cd "$d" && pwd)" != / ]; do
    [ -f "$d/shared/anchors/pgmoon/pgmoon/init.lua" ] && { pgmoon_dir=$d/shared/anchors/pgmoon; break; }
    d=$d/..
  done
fi

die() { echo "openresty-pgmoon bench: $*" >&2; exit 1; }
[ -n "${QX_DB__URL:-}" ] || die "set QX_DB__URL (make bench does)"
for tool in wrk nginx curl; do command -v "$tool" >/dev/null || die "no $tool (scripts/deps.sh)"; done
[ -x "$pg_bin/pgbench" ] || die "no $pg_bin/pgbench"
[ -f "$root/build/luajit/qx/core.so" ] || die "run make first"
[ -f "$pgmoon_dir/pgmoon/init.lua" ] ||
  die "pgmoon not found in $pgmoon_dir (set PGMOON_DIR to the folder that holds pgmoon/init.lua)"
pgmoon_dir=$(cd "$pgmoon_dir" && pwd)

# host and port for pgmoon, from the URL
case "$QX_DB__URL" in
  postgres*://*) ;;
  *) die "QX_DB__URL must be a postgresql:// URL here" ;;
esac
hostport=${QX_DB__URL#*://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
pg_host=${hostport%%:*}; pg_port=${hostport##*:}
[ "$pg_port" != "$hostport" ] || pg_port=5432
pg_user=${QX_DB__URL#*://}; pg_user=${pg_user%%@*}; pg_user=${pg_user%%:*}

work=$(mktemp -d "${TMPDIR:-/tmp}/qx-pgmoon-bench.XXXXXX")
chmod 755 "$work"
dbname=qx_pgmoon_bench_$$
admin_url=$QX_DB__URL
base=${admin_url%%\?*}; base=${base%/*}; bench_url=$base/$dbname
psql() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -d "$admin_url" "$@"; }

pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    [ "$(cat "/proc/$p/comm" 2>/dev/null || true)" = nginx ] && kill -QUIT "$p" 2>/dev/null || true
  done
  sleep 0.5
  psql -c "DROP DATABASE IF EXISTS $dbname WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql -c "CREATE DATABASE $dbname"

# a copy of qx, so that edits and rebuilds in the tree during the bench do not reach it
mkdir -p "$work/lua" "$work/qx/build/luajit/qx"
cp -r "$root/lua" "$root/examples" "$work/qx/"
cp "$root/build/luajit/qx/core.so" "$work/qx/build/luajit/qx/"
src=$work/qx
# The pgmoon side, run in the worker (content_by_lua).
cat >"$work/lua/bench_pgmoon.lua" <<EOF
local pgmoon = require "pgmoon"
local cjson = require "cjson.safe"
local ngx = ngx
local _M = {}
local config = { host = "$pg_host", port = "$pg_port", database = "$dbname", user = "$pg_user",
                 pool_size = tonumber(os.getenv("QX_BENCH_POOL")), backlog = 4096 }

local function connect()
    local pg = pgmoon.new(config)
    local ok, err = pg:connect()
    if not ok then return nil, err end
    return pg
end

local function fail(status, message)
    if status >= 500 then ngx.log(ngx.ERR, "pgmoon: ", tostring(message)) end
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.print(cjson.encode({ error = { code = "error", message = message } }), "\n")
    return ngx.exit(status)
end

-- every nginx of the run starts LuaJIT's generator at the same seed otherwise
math.randomseed(ngx.now() * 1000 + ngx.worker.pid())

local function random_uuid()
    -- a v4 id from the worker's PRNG: less than qx does (v7 from getrandom)
    local r = math.random
    return string.format("%08x-%04x-4%03x-%04x-%04x%08x", r(0, 0xffffffff), r(0, 0xffff),
        r(0, 0xfff), 0x8000 + r(0, 0x3fff), r(0, 0xffff), r(0, 0xffffffff))
end

function _M.post_order()
    ngx.req.read_body()
    local cmd = cjson.decode(ngx.req.get_body_data() or "")
    if type(cmd) ~= "table" or type(cmd.customer) ~= "string" or type(cmd.sku) ~= "string"
       or type(cmd.quantity) ~= "number" then
        return fail(400, "bad command")
    end
    local pg, err = connect()
    if not pg then return fail(500, err) end
    local id, eid = random_uuid(), random_uuid()
    local now = ngx.utctime()
    local payload = cjson.encode({ event_id = eid, event_name = "shop.order.placed",
        event_version = 1, occurred_at = now, payload = { order_id = id, customer = cmd.customer,
        sku = cmd.sku, quantity = cmd.quantity } })
    local q = pg.escape_literal
    local sql = "INSERT INTO shop_orders (id, customer, sku, quantity, status, version) VALUES ("
        .. q(pg, id) .. ", " .. q(pg, cmd.customer) .. ", " .. q(pg, cmd.sku) .. ", "
        .. q(pg, cmd.quantity) .. ", 'placed', 1); "
        .. "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at) "
        .. "VALUES (" .. q(pg, eid) .. ", 'shop.order.placed', 1, " .. q(pg, payload) .. ", "
        .. q(pg, now) .. ")"
    local res
    res, err = pg:query(sql)
    if not res then pg:disconnect(); return fail(500, err) end
    pg:keepalive(60000, config.pool_size)
    ngx.status = 201
    ngx.header["Content-Type"] = "application/json"
    ngx.print(cjson.encode({ id = id, version = 1 }), "\n")
    return ngx.exit(201)
end

function _M.get_order(id)
    local pg, err = connect()
    if not pg then return fail(500, err) end
    local rows
    rows, err = pg:query("SELECT id, customer, sku, quantity, status, reason, version, "
        .. "created_at, updated_at FROM shop_orders WHERE id = " .. pg:escape_literal(id))
    if not rows then pg:disconnect(); return fail(500, err) end
    pg:keepalive(60000, config.pool_size)
    if not rows[1] then return fail(404, "no order") end
    ngx.header["Content-Type"] = "application/json"
    ngx.print(cjson.encode(rows[1]), "\n")
    return ngx.exit(200)
end

return _M
EOF

# The transport's floor in the worker: the same two INSERTs as the unit of work sends (the
# order row, the outbox row with its envelope and the transaction's id back), queued on a leased
# connection of qx.openresty.connect's pool and committed with the outbox's wake-up, without
# the unit of work, the model or the repository. It reaches into the pool (db.pool, conn:tx),
# which is not public API: a probe of what the codec, the pool and the cosockets cost. With
# $floor_wake "off" the commit wakes no one: what the wake-up costs.
cat >"$work/lua/bench_floor.lua" <<'EOF'
local openresty = require "qx.openresty"
local qx = require "qx"
local core = require "qx.core"
local cjson = require "cjson.safe"
local _M = {}
local db
local null = qx.null
local CHANNEL = require("qx.store.uow").OUTBOX_CHANNEL
local ORDER = "INSERT INTO shop_orders (id, customer, sku, quantity, status, version, "
    .. "created_at) VALUES ($1, $2, $3, $4, $5, $6, now())"
local OUTBOX = "INSERT INTO qx_outbox_events (id, event_name, event_version, payload, "
    .. "occurred_at, correlation_id, causation_id, tenant_id, partition_key) VALUES "
    .. "($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING " .. core.TX_ID_COLUMNS

function _M.post_order()
    local cmd, err = openresty.read_json()
    if type(cmd) ~= "table" or type(cmd.customer) ~= "string" or type(cmd.sku) ~= "string"
       or type(cmd.quantity) ~= "number" then
        return openresty.respond(nil, err or { code = "invalid", message = "bad command" })
    end
    if not db then db = assert(openresty.connect()) end
    local conn
    conn, err = db.pool:acquire()
    if not conn then return openresty.respond(nil, err) end
    local tx = conn:tx(nil)
    local id, eid, at, cid = qx.uuid(), qx.uuid(), qx.now(), qx.uuid()
    tx:queue(ORDER, id, cmd.customer, cmd.sku, cmd.quantity, "placed", 1)
    tx:queue_id(OUTBOX, eid, "shop.order.placed", 1, cjson.encode({
        event_id = eid, event_name = "shop.order.placed", event_version = 1, occurred_at = at,
        correlation_id = cid, payload = { order_id = id, customer = cmd.customer,
        sku = cmd.sku, quantity = cmd.quantity } }), at, cid, null, null, "Order:" .. id)
    local ok
    if ngx.var.floor_wake == "off" then
        ok, err = tx:commit()
    else
        ok, err = tx:commit(CHANNEL)
    end
    tx:close()
    conn:release()
    if not ok then return openresty.respond(nil, err) end
    return openresty.respond({ id = id, version = 1 }, nil, 201)
end

return _M
EOF

# The thread hop alone: a handler with no database that hands its command back.
cat >"$work/lua/bench_hop.lua" <<'EOF'
return require("qx.openresty").handlers({ noop = function(_, command) return command end },
    { db = false })
EOF

cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"customer":"bench","sku":"B-1","quantity":1}'
EOF

# nginx for T threads: the shop example's locations (qx) and /pgmoon/... beside them
render() {
  local t=$1 port=$2 prefix=$3
  mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/temp"
  cat >"$prefix/conf/nginx.conf" <<EOF
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log warn;
env QX_DB__URL=$bench_url;
env QX_BENCH_POOL=$t;
env QX_DB__POOL_SIZE=$t;
load_module $modules/ndk_http_module.so;
load_module $modules/ngx_http_lua_module.so;
thread_pool qx threads=$t max_queue=4096;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    client_max_body_size 64k;
    client_body_buffer_size 64k;
    lua_worker_thread_vm_pool_size $((t * 2 + 4));
    lua_socket_log_errors off;
    lua_package_path "$work/lua/?.lua;$pgmoon_dir/?.lua;$pgmoon_dir/?/init.lua;$src/examples/openresty/?.lua;$src/lua/?.lua;$src/lua/?/init.lua;;";
    lua_package_cpath "$src/build/luajit/?.so;;";
    init_by_lua_block {
        require("shop.setup").run()
        require("qx.openresty").thread_pool("qx", { concurrency = $((t * queue)), queue_timeout = 30 })
    }
    server {
        listen 127.0.0.1:$port;
        default_type application/json;
        location = /health { content_by_lua_block { ngx.say("ok") } }
        location = /orders { content_by_lua_block { require("shop.api").orders() } }
        location ~ "^/orders/([0-9a-fA-F-]{36})\$" {
            content_by_lua_block { require("shop.api").order(ngx.var[1]) }
        }
        location = /hop {
            content_by_lua_block {
                local openresty = require "qx.openresty"
                local res, err = openresty.run_json("qx", "bench_hop", "noop", '{"n":1}')
                return openresty.respond_json(res, err)
            }
        }
        location = /worker/orders {
            set \$qx_mode worker;
            content_by_lua_block { require("shop.api").orders() }
        }
        location ~ "^/worker/orders/([0-9a-fA-F-]{36})\$" {
            set \$qx_mode worker;
            content_by_lua_block { require("shop.api").order(ngx.var[1]) }
        }
        location = /pgmoon/orders { content_by_lua_block { require("bench_pgmoon").post_order() } }
        location = /floor/orders { content_by_lua_block { require("bench_floor").post_order() } }
        location = /nowake/orders {
            set \$floor_wake off;
            content_by_lua_block { require("bench_floor").post_order() }
        }
        location ~ "^/pgmoon/orders/([0-9a-fA-F-]{36})\$" {
            content_by_lua_block { require("bench_pgmoon").get_order(ngx.var[1]) }
        }
    }
}
EOF
}

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

declare -A url
for t in $threads_list; do
  prefix=$work/nginx-$t
  port=$(free_port)
  render "$t" "$port" "$prefix"
  env -u LUA_PATH -u LUA_CPATH nginx -p "$prefix/" -c "$prefix/conf/nginx.conf" \
    -e "$prefix/logs/error.log" || die "nginx for $t threads did not start"
  pids+=("$(cat "$prefix/logs/nginx.pid")")
  url[$t]=http://127.0.0.1:$port
  for i in $(seq 1 50); do curl -sf "${url[$t]}/health" >/dev/null 2>&1 && break; sleep 0.1; done
done

# the read side's rows: 200 orders, GET asks for them in turn
first=${threads_list%% *}
for i in $(seq 1 200); do
  curl -sf -X POST -H 'Content-Type: application/json' \
    -d '{"customer":"reader","sku":"R-1","quantity":2}' "${url[$first]}/orders"
done | sed -n 's/.*"id":"\([0-9a-f-]*\)".*/\1/p' >"$work/ids"
[ "$(wc -l <"$work/ids")" = 200 ] || die "could not make the orders to read"
{
  echo 'local ids, i = {}, 0'
  echo 'for l in io.lines("'"$work/ids"'") do ids[#ids + 1] = l end'
  echo 'prefix = os.getenv("QX_BENCH_PREFIX") or "/orders/"'
  echo 'function request() i = i % #ids + 1; return wrk.format("GET", prefix .. ids[i]) end'
} >"$work/get.lua"

cat >"$work/pgbench.sql" <<'EOF'
INSERT INTO shop_orders (id, customer, sku, quantity, status, version) VALUES (gen_random_uuid(), 'bench', 'B-1', 1, 'placed', 1) \; INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at) VALUES (gen_random_uuid(), 'shop.order.placed', 1, '{"event_name":"shop.order.placed","payload":{"customer":"bench","sku":"B-1","quantity":1}}', now())
EOF

# warm every VM and connection
for t in $threads_list; do
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "${url[$t]}/orders" >/dev/null
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "${url[$t]}/worker/orders" >/dev/null
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "${url[$t]}/pgmoon/orders" >/dev/null
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "${url[$t]}/floor/orders" >/dev/null
  wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "${url[$t]}/nowake/orders" >/dev/null
done

# CPU per request, from /proc: the nginx worker's (its threads included), the PostgreSQL
# server's (the postmaster's own, its children's that ended and were reaped, and its live
# children's: backends, WAL writer, ...) and wrk's. The server's folder comes from the server
# itself (SHOW data_directory); when it cannot be read, its column is "-". Everything the
# server does in a run counts: nothing else may use it then.
clk_tck=$(getconf CLK_TCK)
pg_dir=$("$pg_bin/psql" -X -A -t -d "$admin_url" -c "SHOW data_directory" 2>/dev/null || true)
stat_of() { local p; for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null || true; done; }
ticks() { # utime + stime of the pids, in clock ticks
  # shellcheck disable=SC2016
  stat_of "$@" | awk '{ sub(/^.*\) /, ""); s += $12 + $13 } END { print s + 0 }'
}
pg_ticks() { # the server's, reaped children included ("" when its folder cannot be read)
  local pm
  pm=$(head -n 1 "$pg_dir/postmaster.pid" 2>/dev/null) || return 0
  [ -n "$pm" ] || return 0
  # shellcheck disable=SC2046
  echo $(( $(stat_of "$pm" | awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }') \
           + $(ticks $(pgrep -P "$pm")) ))
}

# wrk's summary as "req/s p99_ms non2xx nginx_us pg_us wrk_us" (the CPU a request, from the
# ticks before and after: $2 nginx, $3 server, $4 wrk)
summarise() {
  awk -v ng="$2" -v pg="$3" -v wk="$4" -v hz="$clk_tck" '
    function ms(v,  u) { u = v; sub(/^[0-9.]+/, "", u); v += 0
                         if (u == "us") v /= 1000; else if (u == "s") v *= 1000; return v }
    function per(t) { return (t == "" || n == 0) ? "-" : sprintf("%.0f", t * 1e6 / hz / n) }
    / requests in / { n = $1 }
    /Requests\/sec:/ { rps = $2 }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx responses:/ { bad = $5 }
    END { printf "%s %.2f %s %s %s %s\n", rps, p99, (bad == "" ? 0 : bad), per(ng), per(pg), per(wk) }' "$1"
}
load() { # kind side t -> line
  local kind=$1 side=$2 t=$3 path ng0 pg0 ng1 pg1 wk pg=
  local workers
  workers=$(pgrep -P "$(cat "$work/nginx-$t/logs/nginx.pid")" | tr '\n' ' ')
  case "$side" in
    qx) path=/orders ;;
    worker) path=/worker/orders ;;
    floor) path=/floor/orders ;;
    nowake) path=/nowake/orders ;;
    *) path=/pgmoon/orders ;;
  esac
  # shellcheck disable=SC2086
  { ng0=$(ticks $workers); pg0=$(pg_ticks); }
  # wrk's CPU: what the subshell's waited-for children used (cutime + cstime)
  wk=$(
    if [ "$kind" = hop ]; then
      wrk -t1 -c"$conns" -d"${seconds}s" --latency "${url[$t]}/hop" >"$work/out"
    elif [ "$kind" = write ]; then
      wrk -t1 -c"$conns" -d"${seconds}s" --latency -s "$work/post.lua" "${url[$t]}$path" >"$work/out"
    else
      QX_BENCH_PREFIX=$path/ wrk -t1 -c"$conns" -d"${seconds}s" --latency -s "$work/get.lua" \
        "${url[$t]}" >"$work/out"
    fi
    awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$BASHPID/stat"
  )
  # shellcheck disable=SC2086
  { ng1=$(ticks $workers); pg1=$(pg_ticks); }
  [ -n "$pg0" ] && [ -n "$pg1" ] && pg=$((pg1 - pg0))
  summarise "$work/out" "$((ng1 - ng0))" "$pg" "$wk"
}
ceiling() {
  PGOPTIONS= "$pg_bin/pgbench" -n -M simple -c "$1" -j 1 -T "$seconds" -f "$work/pgbench.sql" \
    "$bench_url" 2>/dev/null | awk '/^tps/ { printf "%.0f 0 0\n", $3 }'
}

# QX_BENCH_HOLD=SECONDS: after the warm-up, wait that long with every nginx up (their URLs
# printed), to profile one side by hand; then go on.
if [ -n "${QX_BENCH_HOLD:-}" ]; then
  for t in $threads_list; do echo "T=$t: ${url[$t]} (nginx master $(cat "$work/nginx-$t/logs/nginx.pid"))"; done
  sleep "$QX_BENCH_HOLD"
fi

echo "openresty-pgmoon bench: $rounds rounds of ${seconds}s, threads $threads_list, $queue calls per thread, $conns wrk connections"
echo "  $(nproc) cores ($(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)), load $(cut -d' ' -f1-3 /proc/loadavg) at start"
: >"$work/results"
for round in $(seq 1 "$rounds"); do
  for t in $threads_list; do
    case $((round % 3)) in
      1) sides="worker qx pgmoon" writers="worker floor qx pgmoon nowake" ;;
      2) sides="pgmoon worker qx" writers="pgmoon nowake worker floor qx" ;;
      *) sides="qx pgmoon worker" writers="floor qx nowake pgmoon worker" ;;
    esac
    for side in $writers; do
      echo "$round $t write $side $(load write "$side" "$t")" >>"$work/results"
    done
    for side in $sides; do
      echo "$round $t read $side $(load read "$side" "$t")" >>"$work/results"
    done
    echo "$round $t ceiling pgbench $(ceiling "$t")" >>"$work/results"
    echo "$round $t hop qx $(load hop qx "$t")" >>"$work/results"
  done
done

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)]; else print "-" }'; }
range() { sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }
col() { awk -v t="$1" -v k="$2" -v s="$3" -v c="$4" '$2 == t && $3 == k && $4 == s { print $c }' "$work/results"; }
# per-round ratio qx / other
ratio() {
  awk -v t="$1" -v k="$2" -v s="$3" -v c="$4" -v me="${5:-qx}" '
    $2 == t && $3 == k && $4 == me { q[$1] = $c }
    $2 == t && $3 == ($5 == "" ? k : k) && $4 == s { o[$1] = $c }
    END { for (r in q) if (o[r] > 0) printf "%.2f\n", q[r] / o[r] }' "$work/results"
}
ratio_ceiling() {
  awk -v t="$1" -v me="${2:-qx}" '$2 == t && $3 == "write" && $4 == me { q[$1] = $5 }
                 $2 == t && $3 == "ceiling" { o[$1] = $5 }
                 END { for (r in q) if (o[r] > 0) printf "%.2f\n", q[r] / o[r] }' "$work/results"
}

echo
echo "medians of $rounds rounds (range in brackets); ratios are per round, qx / pgmoon"
echo "worker: qx in the nginx worker on cosockets (qx.openresty.connect); threads: qx.openresty.run"
for kind in write read; do
  echo
  echo "$kind: T = qx's connections (worker: pool_size; threads: threads and shared pool) = pgmoon's pool_size"
  printf '| T | worker req/s | threads req/s | pgmoon req/s | worker / pgmoon | threads / pgmoon | p99 worker / threads / pgmoon ms |%s\n' \
    "$([ "$kind" = write ] && echo ' pgbench tps (ceiling) | worker / ceiling |')"
  printf '| --- | ---: | ---: | ---: | ---: | ---: | ---: |%s\n' "$([ "$kind" = write ] && echo ' ---: | ---: |')"
  for t in $threads_list; do
    extra=
    if [ "$kind" = write ]; then
      extra=" $(col "$t" ceiling pgbench 5 | median) ($(col "$t" ceiling pgbench 5 | range)) | $(ratio_ceiling "$t" worker | median) |"
    fi
    printf '| %s | %s (%s) | %s (%s) | %s (%s) | %s (%s) | %s (%s) | %s / %s / %s |%s\n' "$t" \
      "$(col "$t" "$kind" worker 5 | median)" "$(col "$t" "$kind" worker 5 | range)" \
      "$(col "$t" "$kind" qx 5 | median)" "$(col "$t" "$kind" qx 5 | range)" \
      "$(col "$t" "$kind" pgmoon 5 | median)" "$(col "$t" "$kind" pgmoon 5 | range)" \
      "$(ratio "$t" "$kind" pgmoon 5 worker | median)" "$(ratio "$t" "$kind" pgmoon 5 worker | range)" \
      "$(ratio "$t" "$kind" pgmoon 5 | median)" "$(ratio "$t" "$kind" pgmoon 5 | range)" \
      "$(col "$t" "$kind" worker 6 | median)" "$(col "$t" "$kind" qx 6 | median)" \
      "$(col "$t" "$kind" pgmoon 6 | median)" "$extra"
  done
done
# per-round ratio of the hop to pgmoon's rate of a kind
ratio_hop() {
  awk -v t="$1" -v k="$2" '$2 == t && $3 == "hop" { q[$1] = $5 }
                           $2 == t && $3 == k && $4 == "pgmoon" { o[$1] = $5 }
                           END { for (r in q) if (o[r] > 0) printf "%.2f\n", q[r] / o[r] }' "$work/results"
}
echo
echo "the thread hop alone (run_json to a handler that does nothing, no database): the most a call"
echo "through the thread pool reaches; below 1.0 against pgmoon, no work in the thread can win"
echo "| T | hop req/s | p99 ms | hop / pgmoon write | hop / pgmoon read |"
echo "| --- | ---: | ---: | ---: | ---: |"
for t in $threads_list; do
  printf '| %s | %s (%s) | %s | %s | %s |\n' "$t" "$(col "$t" hop qx 5 | median)" \
    "$(col "$t" hop qx 5 | range)" "$(col "$t" hop qx 6 | median)" \
    "$(ratio_hop "$t" write | median)" "$(ratio_hop "$t" read | median)"
done
echo
echo "the transport's floor: the worker's codec, pool and cosockets sending the unit of work's two"
echo "INSERTs and its wake-up, without the unit of work (bench_floor above); nowake: the same"
echo "without the wake-up"
echo "| T | floor req/s | floor / pgmoon | nowake req/s | nowake / pgmoon | worker / floor |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for t in $threads_list; do
  printf '| %s | %s (%s) | %s (%s) | %s (%s) | %s (%s) | %s |\n' "$t" \
    "$(col "$t" write floor 5 | median)" "$(col "$t" write floor 5 | range)" \
    "$(ratio "$t" write pgmoon 5 floor | median)" "$(ratio "$t" write pgmoon 5 floor | range)" \
    "$(col "$t" write nowake 5 | median)" "$(col "$t" write nowake 5 | range)" \
    "$(ratio "$t" write pgmoon 5 nowake | median)" "$(ratio "$t" write pgmoon 5 nowake | range)" \
    "$(ratio "$t" write floor 5 worker | median)"
done
echo
echo "CPU a write, us (medians): the nginx worker / PostgreSQL's processes / wrk, and the writes a"
echo "second that $(nproc) cores allow at that cost (cores / the sum)"
echo "| T | worker | floor | nowake | threads | pgmoon | allowed: worker / floor / nowake / threads / pgmoon |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for t in $threads_list; do
  row="| $t |" allowed=
  for side in worker floor nowake qx pgmoon; do
    ng=$(col "$t" write "$side" 8 | median) pg=$(col "$t" write "$side" 9 | median)
    wk=$(col "$t" write "$side" 10 | median)
    row="$row $ng / $pg / $wk |"
    allowed="$allowed${allowed:+ / }$(awk -v a="$ng" -v b="$pg" -v c="$wk" -v n="$(nproc)" \
      'BEGIN { s = a + b + c; if (a == "-" || b == "-" || c == "-" || s <= 0) print "-"; else printf "%.0f", n * 1e6 / s }')"
  done
  echo "$row $allowed |"
done
bad=$(awk '{ n += $7 } END { print n + 0 }' "$work/results")
echo
echo "non-2xx responses over all runs: $bad"
if [ "$bad" != 0 ]; then
  for t in $threads_list; do
    echo "error log of the nginx of $t threads (last lines):"
    grep -v "^$" "$work/nginx-$t/logs/error.log" | tail -n 5 || true
  done
fi
echo "PostgreSQL connections to the bench database at the end, by client (all nginx of the run): $("$pg_bin/psql" -X -A -t -F= -d "$admin_url" -c \
  "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = '$dbname' GROUP BY 1 ORDER BY 1" | tr '\n' ' ')"
echo "load $(cut -d' ' -f1-3 /proc/loadavg) at end"
echo
echo "every run (round T kind side req/s p99_ms non2xx, then the CPU a request in us: nginx pg wrk):"
cat "$work/results"

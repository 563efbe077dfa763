#!/usr/bin/env bash
# Start and stop the shop example's nginx under a prefix folder.
#
#   examples/openresty/run.sh start  [PREFIX]   render PREFIX/conf/nginx.conf, start nginx,
#                                               wait for /health, write PREFIX/env
#   examples/openresty/run.sh stop   [PREFIX]   stop it by PID (graceful, then forced)
#   examples/openresty/run.sh status [PREFIX]   exit 0 when it is running
#
# PREFIX defaults to .run/openresty-example (under the tree). Environment:
#   QX_DB__URL            the database (required; other QX_DB__* settings are passed on)
#   QX_HTTP_PORT          port on 127.0.0.1 (default: a free one)
#   QX_NGINX_WORKERS      worker_processes (default 1)
#   QX_NGINX_THREADS      threads of the "qx" thread pool (default 4; 0 leaves the
#                         thread_pool directive out, to see that mistake reported)
#   QX_NGINX_LUA_PATH     extra lua_package_path entries, each ending in ";" (the caller's
#                         LUA_PATH and LUA_CPATH are not passed to nginx: they are usually
#                         another Lua's)
#   QX_NGINX_INCLUDE      a file of extra directives for the server block
#   QX_OPENRESTY_MODE     where the shop's commands run: "threads" (default: the thread pool,
#                         on libpq) or "worker" (the worker itself, on cosockets)
#   NGINX                 the nginx binary (default nginx); QX_NGINX_MODULES the folder of
#                         ndk_http_module.so and ngx_http_lua_module.so (default
#                         /usr/lib/nginx/modules)
# PREFIX/env gets QX_HTTP_PORT, QX_HTTP_URL and QX_NGINX_PID for scripts.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cmd=${1:-}
prefix=${2:-$root/.run/openresty-example}
NGINX=${NGINX:-nginx}
modules=${QX_NGINX_MODULES:-/usr/lib/nginx/modules}

log() { echo "openresty-example: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { echo "usage: $0 start|stop|status [PREFIX]" >&2; exit 2; }

alive() {
  local pid=${1:-} st
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  st=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

is_nginx() { [ "$(cat "/proc/$1/comm" 2>/dev/null || true)" = nginx ]; }

master_pid() {
  local pid
  pid=$(cat "$prefix/logs/nginx.pid" 2>/dev/null || true)
  if alive "$pid" && is_nginx "$pid"; then echo "$pid"; fi
}

children_of() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(awk '{ sub(/^.*\) /, ""); print $2 }' "$p/stat" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}

port_used() {
  local hex
  hex=$(printf '%04X' "$1")
  awk -v h=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null && return 0
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
  return 1
}

pick_port() {
  local p i
  for i in $(seq 1 200); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    port_used "$p" || { echo "$p"; return 0; }
  done
  die "no free port found"
}

case "${QX_OPENRESTY_MODE:-threads}" in
  threads|worker) ;;
  *) die "QX_OPENRESTY_MODE must be threads or worker, not '$QX_OPENRESTY_MODE'" ;;
esac

# As root, nginx runs its workers as nobody; they must be able to read the Lua files.
user_line() {
  [ "$(id -u)" -eq 0 ] || { echo "# not root: workers run as the current user"; return; }
  local f ok=1
  for f in "$root/lua/qx/openresty/init.lua" "$root/build/luajit/qx/core.so" \
           "$here/shop/commands.lua" "$here/shop/handlers.lua" ${QX_NGINX_INCLUDE:+"$QX_NGINX_INCLUDE"}; do
    runuser -u nobody -- test -r "$f" 2>/dev/null || ok=0
  done
  if [ "$ok" = 1 ]; then
    echo "# workers run as nginx's default user (nobody)"
  else
    log "the tree is not readable by nobody: workers run as root"
    echo "user root;"
  fi
}

render() {
  local port=$1 threads=${QX_NGINX_THREADS:-4} tp inc
  if [ "$threads" = 0 ]; then
    tp="# (no thread_pool directive: QX_NGINX_THREADS=0)"
  else
    tp="thread_pool qx threads=$threads max_queue=1024;"
  fi
  if [ -n "${QX_NGINX_INCLUDE:-}" ]; then
    inc="include $QX_NGINX_INCLUDE;"
  else
    inc="# QX_NGINX_INCLUDE: none"
  fi
  # values are paths and numbers; | never occurs in them
  sed -e "s|@USER_LINE@|$(user_line)|" \
      -e "s|@WORKERS@|${QX_NGINX_WORKERS:-1}|" \
      -e "s|@MODULES@|$modules|g" \
      -e "s|@THREAD_POOL_LINE@|$tp|" \
      -e "s|@CONCURRENCY@|$([ "$threads" = 0 ] && echo 1 || echo "$threads")|" \
      -e "s|@LUA_PATH@|${QX_NGINX_LUA_PATH:-}|" \
      -e "s|@EXAMPLE@|$here|g" \
      -e "s|@ROOT@|$root|g" \
      -e "s|@PORT@|$port|" \
      -e "s|@INCLUDE_LINE@|$inc|" \
      -e "s|@MODE@|${QX_OPENRESTY_MODE:-threads}|" \
      "$here/nginx.conf" >"$prefix/conf/nginx.conf"
}

healthy() {
  curl -sf --max-time 1 "http://127.0.0.1:$1/health" >/dev/null 2>&1
}

do_start() {
  [ -n "${QX_DB__URL:-}" ] || die "set QX_DB__URL (postgresql://...)"
  command -v "$NGINX" >/dev/null || die "no $NGINX (scripts/deps.sh installs nginx)"
  [ -f "$modules/ngx_http_lua_module.so" ] ||
    die "no $modules/ngx_http_lua_module.so (scripts/deps.sh installs libnginx-mod-http-lua)"
  [ -f "$root/build/luajit/qx/core.so" ] || die "no build/luajit/qx/core.so: run make"
  mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/temp"
  prefix=$(cd "$prefix" && pwd)
  if [ -n "$(master_pid)" ]; then
    log "already running (pid $(master_pid)); stop it first"
    return 1
  fi
  local attempt port out
  for attempt in 1 2 3 4 5; do
    port=${QX_HTTP_PORT:-$(pick_port)}
    render "$port"
    : >"$prefix/logs/error.log"
    # Without the caller's LUA_PATH/LUA_CPATH: ";;" in nginx.conf would bring them in, and they
    # are usually another Lua's (`eval "$(luarocks path)"` for 5.4: its cjson breaks LuaJIT).
    if out=$(env -u LUA_PATH -u LUA_CPATH \
             "$NGINX" -p "$prefix/" -c "$prefix/conf/nginx.conf" -e "$prefix/logs/error.log" 2>&1); then
      local i
      for i in $(seq 1 100); do
        healthy "$port" && break
        sleep 0.1
      done
      healthy "$port" || { tail -n 20 "$prefix/logs/error.log" >&2; do_stop; die "nginx did not answer /health"; }
      cat >"$prefix/env" <<EOF
export QX_HTTP_PORT=$port
export QX_HTTP_URL=http://127.0.0.1:$port
export QX_NGINX_PID=$(master_pid)
export QX_NGINX_PREFIX=$prefix
EOF
      log "nginx on http://127.0.0.1:$port (pid $(master_pid), prefix $prefix)"
      return 0
    fi
    if [ -z "${QX_HTTP_PORT:-}" ] && grep -q "Address already in use" <<<"$out"; then
      log "port $port was taken; trying another"
      continue
    fi
    echo "$out" >&2
    tail -n 20 "$prefix/logs/error.log" >&2 || true
    die "nginx did not start"
  done
  die "nginx did not start: no port could be bound"
}

do_stop() {
  [ -d "$prefix" ] || return 0
  local pid kids i
  pid=$(master_pid)
  [ -n "$pid" ] || { rm -f "$prefix/env"; return 0; }
  kids=$(children_of "$pid")
  kill -QUIT "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    log "nginx $pid did not quit gracefully; terminating it"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  for i in $kids; do
    if alive "$i" && is_nginx "$i"; then kill -KILL "$i" 2>/dev/null || true; fi
  done
  rm -f "$prefix/env"
  log "stopped nginx $pid"
}

case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  status) [ -n "$(master_pid)" ] && { echo "running (pid $(master_pid))"; exit 0; }; echo stopped; exit 1 ;;
  *) usage ;;
esac

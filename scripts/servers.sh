#!/usr/bin/env bash
# Throwaway PostgreSQL 15 cluster + nats-server (JetStream) for specs, demo and benchmarks.
#
#   scripts/servers.sh start  [DIR]   start both (reuses them when DIR's servers are alive)
#   scripts/servers.sh stop   [DIR]   stop both by PID and delete their data
#   scripts/servers.sh status [DIR]   exit 0 when both are up
#   scripts/servers.sh env    [DIR]   start them when they are not up, then print on stdout
#                                     the export lines your own code needs (the env file, and
#                                     LUA_PATH_5_4/LUA_CPATH_5_4 for this checkout's Lua 5.4
#                                     build): eval "$(scripts/servers.sh env)"
#
# DIR defaults to .run. Both servers listen on free ports of 127.0.0.1 only. After start,
# DIR/env is a sourceable shell file:
#   QX_DB__URL              postgresql://postgres@127.0.0.1:PORT/postgres (trust auth)
#   QX_NATS__SERVERS        nats://127.0.0.1:PORT (what qx.nats.connect() and `qx relay` read)
#   QX_TEST_NATS_URL        the same, under the name the specs use
#   QX_TEST_NATS_MONITOR    http://127.0.0.1:MONPORT
#   QX_TEST_PG_BIN QX_TEST_PG_PORT QX_TEST_PG_DATA QX_TEST_PG_SOCKET QX_TEST_PG_LOG QX_TEST_PG_PID
#   QX_TEST_NATS_PORT QX_TEST_NATS_MONITOR_PORT QX_TEST_NATS_STORE QX_TEST_NATS_LOG QX_TEST_NATS_PID
#   QX_TEST_RUN_DIR
#
# Environment: QX_FAST_PG=1 turns fsync off (faster specs; never for benchmarks).
#              QX_PG_BIN overrides /usr/lib/postgresql/15/bin.
# initdb refuses root: as root the cluster runs as the postgres user (runuser); as any other
# user it runs as that user.
set -euo pipefail

PG_BIN=${QX_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_USER=postgres

usage() { echo "usage: $0 start|stop|status|env [DIR]" >&2; exit 2; }

cmd=${1:-}
[ -n "$cmd" ] || usage
dir=${2:-.run}

log() { echo "servers: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# helpers

# as_pg, alive, comm_of, port_used, pick_port, healthy_nats
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

# Load DIR/env into shell variables (the file is ours: plain exports).
load_env() {
  # shellcheck disable=SC1090,SC1091
  [ -f "$dir/env" ] && . "$dir/env"
}

stop_pg() {
  local data=${QX_TEST_PG_DATA:-} pid=""
  [ -n "$data" ] || return 0
  if [ -f "$data/postmaster.pid" ]; then
    pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
  fi
  [ -n "$pid" ] || pid=${QX_TEST_PG_PID:-}
  if alive "$pid" && [ "$(comm_of "$pid")" = postgres ]; then
    if ! as_pg "$PG_BIN/pg_ctl" -D "$data" -m fast -w -t 20 stop >/dev/null 2>&1; then
      log "pg_ctl stop failed; killing postmaster $pid"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
}

stop_nats() {
  local pid=${QX_TEST_NATS_PID:-} i
  if alive "$pid" && [ "$(comm_of "$pid")" = nats-server ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "nats-server $pid did not stop; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 20); do alive "$pid" || break; sleep 0.1; done
    fi
  fi
}

# Stop whatever DIR/env describes and delete the data (logs stay in DIR).
stop_all() {
  if ! load_env; then
    return 0
  fi
  stop_pg
  stop_nats
  if [ -n "${QX_TEST_PG_DATA:-}" ]; then rm -rf "$QX_TEST_PG_DATA"; fi
  if [ -n "${QX_TEST_NATS_STORE:-}" ]; then rm -rf "$QX_TEST_NATS_STORE"; fi
  # Folders made outside DIR when DIR was not usable by the cluster owner or too long.
  case "${QX_TEST_PG_ROOT:-}" in /tmp/qx-pg.*) rm -rf "$QX_TEST_PG_ROOT" ;; esac
  case "${QX_TEST_PG_SOCKET:-}" in /tmp/qx-sock.*) rm -rf "$QX_TEST_PG_SOCKET" ;; esac
  rm -f "$dir/env"
}

running() {
  load_env || return 1
  local pgpid
  pgpid=$(head -n 1 "${QX_TEST_PG_DATA:-/nonexistent}/postmaster.pid" 2>/dev/null || true)
  alive "$pgpid" && [ "$pgpid" = "${QX_TEST_PG_PID:-}" ] || return 1
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$QX_TEST_PG_PORT" -t 2 || return 1
  alive "${QX_TEST_NATS_PID:-}" && [ "$(comm_of "$QX_TEST_NATS_PID")" = nats-server ] || return 1
  healthy_nats "$QX_TEST_NATS_MONITOR_PORT" || return 1
}

# ---------------------------------------------------------------------------------------------
# start

start_pg() {
  local root=$1 sock=$2 port attempt
  local data=$root/data logf=$root/server.log
  shift 2
  [ -x "$PG_BIN/initdb" ] || die "no $PG_BIN/initdb (run scripts/deps.sh)"
  as_pg "$PG_BIN/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    >"$root/initdb.log" 2>&1 || { cat "$root/initdb.log" >&2; die "initdb failed"; }
  {
    echo "# qx throwaway cluster"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$sock'"
    echo "max_connections = 200"
    echo "log_min_messages = warning"
    echo "log_line_prefix = '%m [%p] '"
    if [ "${QX_FAST_PG:-0}" = 1 ]; then
      echo "fsync = off"
      echo "full_page_writes = off"
    fi
  } >>"$data/postgresql.conf"
  # Trust for everyone, as initdb -A trust writes it, after a line per role of the wire codec's
  # specs (spec/core/wire_spec.lua), which log in with each password method (and one refused).
  # The first line that matches decides, so theirs come first.
  cat >"$data/pg_hba.conf" <<'HBA'
# qx throwaway cluster
# TYPE  DATABASE     USER              ADDRESS        METHOD
host    all          qx_wire_password  127.0.0.1/32   password
host    all          qx_wire_md5       127.0.0.1/32   md5
host    all          qx_wire_scram     127.0.0.1/32   scram-sha-256
host    all          qx_wire_reject    127.0.0.1/32   reject
local   all          all                              trust
host    all          all               127.0.0.1/32   trust
host    all          all               ::1/128        trust
local   replication  all                              trust
host    replication  all               127.0.0.1/32   trust
host    replication  all               ::1/128        trust
HBA
  for attempt in 1 2 3 4 5; do
    port=$(pick_port "$@")
    if as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$logf" -w -t 30 -o "-p $port" start >/dev/null 2>&1; then
      PG_PORT=$port
      PG_PID=$(head -n 1 "$data/postmaster.pid")
      return 0
    fi
    if tail -n 20 "$logf" 2>/dev/null | grep -q "could not bind\|could not create any TCP/IP sockets\|Address already in use"; then
      log "port $port was taken; trying another"
      continue
    fi
    tail -n 20 "$logf" >&2 2>/dev/null || true
    die "PostgreSQL did not start"
  done
  die "PostgreSQL did not start: no port could be bound"
}

start_nats() {
  local store=$1 logf=$2 attempt port mon pid i
  shift 2
  command -v nats-server >/dev/null || die "no nats-server (run scripts/deps.sh)"
  for attempt in 1 2 3 4 5; do
    port=$(pick_port "$@")
    mon=$(pick_port "$@" "$port")
    : >"$logf"
    # setsid: keep the server out of the caller's terminal signals; stop kills it by PID.
    setsid nats-server -js -a 127.0.0.1 -p "$port" -m "$mon" -sd "$store" -l "$logf" \
      </dev/null >>"$logf.out" 2>&1 &
    pid=$!
    for i in $(seq 1 100); do
      alive "$pid" || break
      if healthy_nats "$mon"; then
        NATS_PORT=$port NATS_MON=$mon NATS_PID=$pid
        return 0
      fi
      sleep 0.1
    done
    if alive "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
      tail -n 20 "$logf" >&2 || true
      die "nats-server did not become healthy within 10 s"
    fi
    wait "$pid" 2>/dev/null || true
    if grep -q "address already in use" "$logf" "$logf.out" 2>/dev/null; then
      log "port $port or $mon was taken; trying another"
      continue
    fi
    tail -n 20 "$logf" "$logf.out" >&2 || true
    die "nats-server exited at start"
  done
  die "nats-server did not start: no port could be bound"
}

do_start() {
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)

  if running; then
    log "already running in $dir (postgres :$QX_TEST_PG_PORT, nats :$QX_TEST_NATS_PORT)"
    return 0
  fi
  stop_all
  unset QX_TEST_PG_DATA QX_TEST_NATS_STORE QX_TEST_PG_ROOT QX_TEST_PG_SOCKET || true

  # PostgreSQL folders: DIR/pg owned by the cluster owner, unless the owner cannot reach
  # DIR (e.g. under a private home), then a private folder in /tmp.
  local pgroot=$dir/pg sock
  rm -rf "$pgroot" "$dir/nats"
  mkdir -p "$pgroot"
  if [ "$(id -u)" -eq 0 ]; then chown "$PG_USER:" "$pgroot"; fi
  chmod 755 "$pgroot"
  if ! as_pg test -w "$pgroot" 2>/dev/null; then
    rm -rf "$pgroot"
    pgroot=$(mktemp -d /tmp/qx-pg.XXXXXX)
    if [ "$(id -u)" -eq 0 ]; then chown "$PG_USER:" "$pgroot"; fi
    log "$dir is not usable by $PG_USER; cluster lives in $pgroot"
  fi
  sock=$pgroot/sock
  # A unix socket path is limited to 107 bytes.
  if [ $(( ${#sock} + 20 )) -gt 100 ]; then
    sock=$(mktemp -d /tmp/qx-sock.XXXXXX)
  else
    mkdir -p "$sock"
  fi
  if [ "$(id -u)" -eq 0 ]; then chown "$PG_USER:" "$sock"; fi
  chmod 755 "$sock"

  # Record what exists so far, so that a failed start can be cleaned by stop.
  write_env() {
    local tmp=$dir/env.tmp
    cat >"$tmp" <<EOF
# written by scripts/servers.sh start; source it
export QX_DB__URL=postgresql://postgres@127.0.0.1:${PG_PORT:-0}/postgres
export QX_NATS__SERVERS=nats://127.0.0.1:${NATS_PORT:-0}
export QX_TEST_NATS_URL=nats://127.0.0.1:${NATS_PORT:-0}
export QX_TEST_NATS_MONITOR=http://127.0.0.1:${NATS_MON:-0}
export QX_TEST_PG_BIN=$PG_BIN
export QX_TEST_PG_PORT=${PG_PORT:-}
export QX_TEST_PG_DATA=$pgroot/data
export QX_TEST_PG_ROOT=$pgroot
export QX_TEST_PG_SOCKET=$sock
export QX_TEST_PG_LOG=$pgroot/server.log
export QX_TEST_PG_PID=${PG_PID:-}
export QX_TEST_NATS_PORT=${NATS_PORT:-}
export QX_TEST_NATS_MONITOR_PORT=${NATS_MON:-}
export QX_TEST_NATS_STORE=$dir/nats/store
export QX_TEST_NATS_LOG=$dir/nats/nats.log
export QX_TEST_NATS_PID=${NATS_PID:-}
export QX_TEST_RUN_DIR=$dir
EOF
    mv -f "$tmp" "$dir/env"
  }
  write_env
  trap 'log "start failed; cleaning up"; stop_all' EXIT

  mkdir -p "$dir/nats/store"
  start_pg "$pgroot" "$sock"
  write_env
  start_nats "$dir/nats/store" "$dir/nats/nats.log" "$PG_PORT"
  write_env
  trap - EXIT

  log "postgres :$PG_PORT (pid $PG_PID), nats :$NATS_PORT monitor :$NATS_MON (pid $NATS_PID); env in $dir/env"
}

do_stop() {
  [ -d "$dir" ] || { log "nothing in $dir"; return 0; }
  dir=$(cd "$dir" && pwd)
  if [ ! -f "$dir/env" ]; then
    log "not running in $dir"
    return 0
  fi
  stop_all
  log "stopped servers in $dir"
}

do_status() {
  [ -d "$dir" ] || { echo "stopped"; return 1; }
  dir=$(cd "$dir" && pwd)
  if running; then
    echo "running: postgres $QX_DB__URL (pid $QX_TEST_PG_PID), nats $QX_TEST_NATS_URL (pid $QX_TEST_NATS_PID)"
    return 0
  fi
  echo "stopped"
  return 1
}

# The servers' environment plus the module paths of this checkout, as export lines on stdout.
# LUA_PATH_5_4/LUA_CPATH_5_4 are read by Lua 5.4 only, so a LuaJIT started from the same shell
# is not handed the Lua 5.4 build; for LuaJIT set LUA_PATH/LUA_CPATH with build/luajit.
do_env() {
  do_status >/dev/null 2>&1 || do_start
  local root
  root=$(cd "$(dirname "$0")/.." && pwd)
  grep '^export QX_DB__URL=\|^export QX_NATS__SERVERS=\|^export QX_TEST_NATS_URL=' "$dir/env"
  echo "export LUA_PATH_5_4='$root/lua/?.lua;$root/lua/?/init.lua;;'"
  echo "export LUA_CPATH_5_4='$root/build/lua5.4/?.so;;'"
  echo "export PATH='$root/bin':\"\$PATH\""
}

case "$cmd" in
  env) do_env ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# A PostgreSQL 15 primary and a streaming standby on 127.0.0.1, for trying qx through a failover
# on one machine (the specs tagged #cluster use it too).
#
#   scripts/pg-standby.sh start    DIR [sync]  a primary, then a standby from pg_basebackup;
#                                              with sync, commits wait for the standby
#                                              (synchronous_standby_names, remote_apply)
#   scripts/pg-standby.sh stop     DIR         stop both by PID and delete their data
#   scripts/pg-standby.sh status   DIR         one line per server; exit 0 when both are up
#   scripts/pg-standby.sh failover DIR         stop the primary at once (-m immediate, like a
#                                              crash) and promote the standby
#   scripts/pg-standby.sh kill     DIR         stop the primary at once, promote nothing
#   scripts/pg-standby.sh promote  DIR         promote the standby
#
# After start, DIR/env is a sourceable shell file:
#   QX_DB__URL   postgresql://postgres@127.0.0.1:P1,127.0.0.1:P2/postgres?target_session_attrs=read-write
#                (libpq tries both hosts and keeps the one that takes writes)
#   QX_PG_PRIMARY_PORT QX_PG_STANDBY_PORT QX_PG_PRIMARY_DATA QX_PG_STANDBY_DATA QX_PG_BIN
# initdb refuses root: as root the servers run as the postgres user (runuser).
set -euo pipefail

PG_BIN=${QX_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_USER=postgres

usage() { echo "usage: $0 start DIR [sync] | stop|status|failover|kill|promote DIR" >&2; exit 2; }

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage

log() { echo "pg-standby: $*" >&2; }
die() { log "$*"; exit 1; }

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

load_env() {
  # shellcheck disable=SC1090,SC1091
  [ -f "$dir/env" ] && . "$dir/env"
}

pid_of() { head -n 1 "$1/postmaster.pid" 2>/dev/null || true; }

up() {
  local data=$1 pid
  pid=$(pid_of "$data")
  alive "$pid" && [ "$(comm_of "$pid")" = postgres ]
}

pg_start() {
  local data=$1 port=$2
  as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 -o "-p $port" start >/dev/null 2>&1 || {
    tail -n 20 "$data/server.log" >&2 || true
    die "PostgreSQL in $data did not start on :$port"
  }
}

pg_stop() {
  local data=$1 mode=${2:-fast}
  up "$data" || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$data" -m "$mode" -w -t 30 stop >/dev/null 2>&1 || {
    local pid
    pid=$(pid_of "$data")
    log "pg_ctl stop failed; killing $pid"
    kill -KILL "$pid" 2>/dev/null || true
  }
}

do_start() {
  local sync=${1:-} p1 p2 primary standby
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if load_env && { up "$QX_PG_PRIMARY_DATA" || up "$QX_PG_STANDBY_DATA"; }; then
    die "$dir already runs servers: stop them first"
  fi
  [ -x "$PG_BIN/initdb" ] || die "no $PG_BIN/initdb (run scripts/deps.sh)"
  primary=$dir/primary
  standby=$dir/standby
  rm -rf "$primary" "$standby"
  mkdir -p "$primary" "$standby"
  if [ "$(id -u)" -eq 0 ]; then chown "$PG_USER:" "$dir" "$primary" "$standby"; fi
  chmod 700 "$primary" "$standby"
  p1=$(pick_port)
  p2=$(pick_port "$p1")
  cat >"$dir/env" <<EOF
# written by scripts/pg-standby.sh start; source it
export QX_DB__URL='postgresql://postgres@127.0.0.1:$p1,127.0.0.1:$p2/postgres?target_session_attrs=read-write'
export QX_PG_PRIMARY_PORT=$p1
export QX_PG_STANDBY_PORT=$p2
export QX_PG_PRIMARY_DATA=$primary
export QX_PG_STANDBY_DATA=$standby
export QX_PG_BIN=$PG_BIN
EOF
  trap 'log "start failed; stopping what started"; do_stop' EXIT
  as_pg "$PG_BIN/initdb" -D "$primary" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  {
    echo "# qx primary"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = ''"
    echo "max_connections = 200"
    echo "log_min_messages = warning"
    echo "wal_keep_size = '256MB'"
    if [ "$sync" = sync ]; then
      echo "synchronous_standby_names = 'standby'"
      echo "synchronous_commit = remote_apply"
    fi
  } >>"$primary/postgresql.conf"
  pg_start "$primary" "$p1"
  as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$p1" -U postgres -D "$standby" -R -X stream \
    >"$dir/basebackup.log" 2>&1 || { cat "$dir/basebackup.log" >&2; die "pg_basebackup failed"; }
  # the standby names itself, so that synchronous_standby_names can point at it; once promoted
  # it has no standby of its own, and a copied synchronous_standby_names would make every
  # commit on it wait forever
  {
    echo "primary_conninfo = 'host=127.0.0.1 port=$p1 user=postgres application_name=standby'"
    echo "synchronous_standby_names = ''"
  } >>"$standby/postgresql.auto.conf"
  pg_start "$standby" "$p2"
  local i state=""
  for i in $(seq 1 100); do
    state=$(as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$p2" -U postgres -Atqc \
              "SELECT status FROM pg_stat_wal_receiver" postgres 2>/dev/null || true)
    [ "$state" = streaming ] && break
    sleep 0.1
  done
  [ "$state" = streaming ] || die "the standby is not streaming"
  trap - EXIT
  log "primary :$p1, standby :$p2${sync:+ (synchronous)}; env in $dir/env"
}

do_stop() {
  load_env || return 0
  pg_stop "$QX_PG_STANDBY_DATA" fast
  pg_stop "$QX_PG_PRIMARY_DATA" fast
  rm -rf "$QX_PG_PRIMARY_DATA" "$QX_PG_STANDBY_DATA"
  rm -f "$dir/env"
}

do_status() {
  load_env || { echo "stopped"; return 1; }
  local ok=0 role data port
  for role in primary standby; do
    if [ $role = primary ]; then data=$QX_PG_PRIMARY_DATA port=$QX_PG_PRIMARY_PORT
    else data=$QX_PG_STANDBY_DATA port=$QX_PG_STANDBY_PORT; fi
    if up "$data"; then
      echo "$role :$port pid $(pid_of "$data") $(as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$port" \
        -U postgres -Atqc "SELECT CASE WHEN pg_is_in_recovery() THEN 'in recovery' ELSE 'read-write' END" \
        postgres 2>/dev/null || echo '?')"
    else
      echo "$role :$port stopped"
      ok=1
    fi
  done
  return $ok
}

do_promote() {
  load_env || die "nothing runs in $dir"
  as_pg "$PG_BIN/pg_ctl" -D "$QX_PG_STANDBY_DATA" -w -t 30 promote >/dev/null 2>&1 ||
    die "promote failed"
}

case "$cmd" in
  start) do_start "${3:-}" ;;
  stop) do_stop ;;
  status) do_status ;;
  kill) load_env || die "nothing runs in $dir"; pg_stop "$QX_PG_PRIMARY_DATA" immediate ;;
  promote) do_promote ;;
  failover)
    load_env || die "nothing runs in $dir"
    pg_stop "$QX_PG_PRIMARY_DATA" immediate
    do_promote
    ;;
  *) usage ;;
esac

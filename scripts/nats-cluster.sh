#!/usr/bin/env bash
# A NATS JetStream cluster of N nodes (default 3) on 127.0.0.1, for trying qx against replicated
# streams, failovers and frozen servers on one machine (the specs tagged #cluster use it too).
#
#   scripts/nats-cluster.sh start  DIR [N]   start N nodes (cluster routes, JetStream with file
#                                            storage on each); waits until a metadata leader is
#                                            elected
#   scripts/nats-cluster.sh stop   DIR       stop every node by PID and delete DIR's stores
#   scripts/nats-cluster.sh status DIR       one line per node; exit 0 when all are up
#   scripts/nats-cluster.sh kill   DIR NODE  SIGKILL one node (n1, n2, ...)
#   scripts/nats-cluster.sh freeze DIR NODE  SIGSTOP one node: it keeps its sockets and answers
#                                            nothing, like a frozen host
#   scripts/nats-cluster.sh thaw   DIR NODE  SIGCONT
#   scripts/nats-cluster.sh restart DIR NODE start a stopped node again (same ports and store)
#
# After start, DIR/env is a sourceable shell file:
#   QX_NATS__SERVERS        nats://127.0.0.1:P1,nats://127.0.0.1:P2,... (what qx reads)
#   QX_CLUSTER_NODES        "n1 n2 n3"
#   QX_CLUSTER_<NODE>_PORT  QX_CLUSTER_<NODE>_MONITOR_PORT  (NODE upper-case: N1, N2, ...)
# and DIR/<node>/pid holds each running node's PID. A stream is replicated when it is made with
# replicas (qx: conn:ensure_stream{ replicas = 3 }).
# Environment: QX_CLUSTER_STANDALONE=1 starts the N servers on their own, not clustered (a
# client's server list without a cluster behind it).
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [N] | stop DIR | status DIR | kill|freeze|thaw|restart DIR NODE" >&2
  exit 2
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage

log() { echo "nats-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

PG_USER=postgres
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

node_pid() { cat "$dir/$1/pid" 2>/dev/null || true; }

node_alive() {
  local pid
  pid=$(node_pid "$1")
  alive "$pid" && [ "$(comm_of "$pid")" = nats-server ]
}

# starts node $1 from its config and waits until it answers /healthz
start_node() {
  local node=$1 mon pid i
  mon=$(awk '/^http:/ { sub(/.*:/, ""); print }' "$dir/$node/server.conf")
  : >"$dir/$node/log"
  setsid nats-server -c "$dir/$node/server.conf" -l "$dir/$node/log" \
    </dev/null >>"$dir/$node/log.out" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/$node/pid"
  for i in $(seq 1 100); do
    alive "$pid" || break
    # /healthz answers once the server listens; JetStream may still be electing
    curl -sf --max-time 1 "http://127.0.0.1:$mon/varz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  tail -n 20 "$dir/$node/log" "$dir/$node/log.out" >&2 || true
  die "$node did not start"
}

stop_node() {
  local node=$1 pid i
  pid=$(node_pid "$node")
  if alive "$pid" && [ "$(comm_of "$pid")" = nats-server ]; then
    kill -CONT "$pid" 2>/dev/null || true # a frozen node cannot act on TERM
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/$node/pid"
}

nodes() {
  # shellcheck disable=SC1090,SC1091
  [ -f "$dir/env" ] && . "$dir/env"
  echo "${QX_CLUSTER_NODES:-}"
}

# 0 when one of the monitor ports (after N) leads the metadata cluster with N-1 current replicas
meta_ready() {
  local n=$1 mon current
  shift
  for mon in "$@"; do
    current=$(curl -sf --max-time 1 "http://127.0.0.1:$mon/jsz" 2>/dev/null | tr -d ' \n' |
              grep -o '"replicas":\[[^]]*\]' | grep -o '"current":true' | wc -l) || true
    [ "${current:-0}" -ge $((n - 1)) ] && return 0
  done
  return 1
}

do_start() {
  local n=${1:-3} i node ports=() mons=() cports=() taken=() routes="" servers=""
  [ "$n" -ge 1 ] 2>/dev/null || die "N must be a number >= 1"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  for node in $(nodes); do node_alive "$node" && die "$dir already runs a cluster: stop it first"; done
  command -v nats-server >/dev/null || die "no nats-server (run scripts/deps.sh)"
  for i in $(seq 1 "$n"); do
    ports[i]=$(pick_port "${taken[@]}"); taken+=("${ports[i]}")
    mons[i]=$(pick_port "${taken[@]}"); taken+=("${mons[i]}")
    cports[i]=$(pick_port "${taken[@]}"); taken+=("${cports[i]}")
    routes="$routes${routes:+, }nats-route://127.0.0.1:${cports[i]}"
    servers="$servers${servers:+,}nats://127.0.0.1:${ports[i]}"
  done
  {
    echo "# written by scripts/nats-cluster.sh start; source it"
    echo "export QX_NATS__SERVERS=$servers"
    echo "export QX_CLUSTER_NODES=\"$(for i in $(seq 1 "$n"); do printf 'n%d ' "$i"; done | sed 's/ $//')\""
    for i in $(seq 1 "$n"); do
      echo "export QX_CLUSTER_N${i}_PORT=${ports[i]}"
      echo "export QX_CLUSTER_N${i}_MONITOR_PORT=${mons[i]}"
    done
  } >"$dir/env"
  trap 'log "start failed; stopping what started"; do_stop' EXIT
  for i in $(seq 1 "$n"); do
    node=n$i
    rm -rf "${dir:?}/$node"
    mkdir -p "$dir/$node/store"
    cat >"$dir/$node/server.conf" <<EOF
server_name: $node
listen: 127.0.0.1:${ports[i]}
http: 127.0.0.1:${mons[i]}
jetstream { store_dir: "$dir/$node/store" }
EOF
    if [ "$n" -gt 1 ] && [ "${QX_CLUSTER_STANDALONE:-0}" != 1 ]; then
      echo "cluster { name: qx, listen: 127.0.0.1:${cports[i]}, routes: [ $routes ] }" \
        >>"$dir/$node/server.conf"
    fi
  done
  for i in $(seq 1 "$n"); do start_node "n$i"; done
  # JetStream is usable once a metadata leader is elected and sees every other node current
  for i in $(seq 1 300); do
    if [ "$n" -eq 1 ] || [ "${QX_CLUSTER_STANDALONE:-0}" = 1 ] || meta_ready "$n" "${mons[@]}"; then
      trap - EXIT
      log "$n node(s) on $servers; env in $dir/env"
      return 0
    fi
    sleep 0.1
  done
  die "no JetStream metadata leader with all nodes current within 30 s"
}

do_stop() {
  local node
  for node in $(nodes); do
    stop_node "$node"
    rm -rf "${dir:?}/$node/store"
  done
  rm -f "$dir/env"
}

do_status() {
  local node ok=0 port
  [ -f "$dir/env" ] || { echo "stopped"; return 1; }
  for node in $(nodes); do
    port=$(awk '/^listen:/ { sub(/.*:/, ""); print }' "$dir/$node/server.conf")
    if node_alive "$node"; then
      echo "$node :$port pid $(node_pid "$node")"
    else
      echo "$node :$port stopped"
      ok=1
    fi
  done
  return $ok
}

one_node() {
  local node=${1:-}
  [ -n "$node" ] && [ -f "$dir/$node/server.conf" ] || die "no node '$node' in $dir"
  echo "$node"
}

case "$cmd" in
  start) do_start "${3:-3}" ;;
  stop) do_stop ;;
  status) do_status ;;
  kill)
    node=$(one_node "${3:-}")
    node_alive "$node" || die "$node is not running"
    pid=$(node_pid "$node")
    kill -KILL "$pid"
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    rm -f "$dir/$node/pid"
    ;;
  freeze)
    node=$(one_node "${3:-}")
    node_alive "$node" || die "$node is not running"
    kill -STOP "$(node_pid "$node")"
    ;;
  thaw)
    node=$(one_node "${3:-}")
    node_alive "$node" || die "$node is not running"
    kill -CONT "$(node_pid "$node")"
    ;;
  restart)
    node=$(one_node "${3:-}")
    node_alive "$node" && die "$node is running"
    start_node "$node"
    ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# `make demo`: the packages the demo needs, the Lua 5.4 build, throwaway servers, then
# examples/demo.lua. One line per step on screen; apt's, the compiler's and the servers' output go
# to the set-up log, whose tail and path are printed when a step fails. The servers are stopped
# whatever happens; the exit code is the failed step's or the demo's.
#
# Environment: DEMO_DIR (servers' folder, default .run/demo), SETUP_LOG (default
# .run/setup.log), MAKE (set by the Makefile).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
MAKE=${MAKE:-make}
DEMO_DIR=${DEMO_DIR:-.run/demo}
SETUP_LOG=${SETUP_LOG:-.run/setup.log}
mkdir -p "$(dirname "$SETUP_LOG")"
: > "$SETUP_LOG"

servers_up=0
stop_servers() {
  if [ "$servers_up" = 1 ]; then
    servers_up=0
    bash scripts/servers.sh stop "$DEMO_DIR" >>"$SETUP_LOG" 2>&1 || true
  fi
}
trap stop_servers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# step "what it does" command...: "what it does... done (N s)", or the log's tail on failure
step() {
  local what=$1 t0 rc
  shift
  printf '%s... ' "$what"
  t0=$(date +%s)
  { echo "=== $what: $*"; "$@"; } >>"$SETUP_LOG" 2>&1 </dev/null
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "failed (exit $rc)"
    echo "--- the last lines of $SETUP_LOG:"
    tail -n 25 "$SETUP_LOG"
    echo "--- the whole set-up log: $SETUP_LOG"
    exit $rc
  fi
  echo "done ($(($(date +%s) - t0)) s)"
}

if bash scripts/deps.sh --check demo >>"$SETUP_LOG" 2>&1; then
  echo "packages: all present"
else
  step "installing packages" bash scripts/deps.sh demo
fi
step "building" "$MAKE" --no-print-directory lua5.4
servers_up=1
step "starting PostgreSQL and NATS" bash scripts/servers.sh start "$DEMO_DIR"
echo "(set-up output: $SETUP_LOG)"

set -a
# shellcheck disable=SC1090,SC1091
. "$DEMO_DIR/env"
set +a
LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='build/lua5.4/?.so;;' lua5.4 examples/demo.lua

#!/usr/bin/env bash
# `make check`: the quick loop while changing qx. The specs not tagged #slow, on Lua 5.4 only,
# with build/lua5.4/qx/core.so (the Makefile builds it first). Servers: the ones running in
# CHECK_DIR (default .run/dev, e.g. from `make servers-start RUN_DIR=.run/dev`) when there
# are, else a pair started there for this run and stopped after it. The exit code is busted's.
#
# Environment (all optional):
#   CHECK_DIR     servers' folder                  (default .run/dev)
#   SPECS         spec files/folders for busted    (default "spec")
#   BUSTED_ARGS   extra busted arguments, e.g. "--filter=batch"
#   QX_FAST_PG    fsync off for a cluster started here (default 1)
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

CHECK_DIR=${CHECK_DIR:-.run/dev}
SPECS=${SPECS:-spec}
BUSTED_ARGS=${BUSTED_ARGS:-}
export QX_FAST_PG=${QX_FAST_PG:-1}

if bash scripts/servers.sh status "$CHECK_DIR" >/dev/null 2>&1; then
  echo "check: servers already running in $CHECK_DIR"
else
  trap 'bash scripts/servers.sh stop "$CHECK_DIR" || true' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  bash scripts/servers.sh start "$CHECK_DIR" || exit 1
fi
set -a
# shellcheck disable=SC1090,SC1091
. "$CHECK_DIR/env"
set +a

BUSTED=$(command -v busted) || { echo "busted not found" >&2; exit 1; }
# Each test's time goes to CHECK_DIR/check.progress (spec/qx_output.lua); the slowest are shown
# after the run, so that a test which has become slow is seen (and tagged #slow, or made fast).
progress=$CHECK_DIR/check.progress
t0=$(date +%s.%N)
# shellcheck disable=SC2086
QX_TEST_PROGRESS=$progress lua5.4 "$BUSTED" -o spec/qx_output.lua --cpath='build/lua5.4/?.so' \
  --exclude-tags=slow $BUSTED_ARGS $SPECS
rc=$?
echo
echo "check: slowest tests (all: $progress)"
grep '^took ' "$progress" 2>/dev/null | sort -k2 -rn | head -n 5 | cut -c1-150
echo "check: exit $rc, specs $(echo "$(date +%s.%N) - $t0" | bc | xargs printf '%.1f') s"
exit $rc

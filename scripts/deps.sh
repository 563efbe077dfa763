#!/usr/bin/env bash
# Install the Debian 12 packages qx needs, by group, so that each make target asks only for its
# own. Fast when everything is present: each package is checked with dpkg first and apt-get only
# runs (one update, one install) when something is missing.
#
#   scripts/deps.sh [--check] [GROUP...]
#     demo     build the Lua 5.4 module, start PostgreSQL and NATS, run the examples (make demo)
#     test     everything make test runs: LuaJIT, busted, luacheck, LuaRocks, nginx, valgrind...
#     bench    the benchmarks: LuaJIT, LuaSQL, nginx, wrk, hyperfine (make bench)
#     docs     LDoc, for the HTML API reference (make docs)
#     (none)   every group (make deps)
#   --check    only report what is missing; exit 1 if anything is
set -euo pipefail

# demo: the C toolchain, Lua 5.4, the C libraries, the servers, cjson
DEMO=(
  gcc make pkg-config curl
  liblua5.4-dev lua5.4
  libpq-dev libnats-dev libssl-dev
  # servers (postgresql-15 ships initdb, pg_ctl, psql and pgbench under
  # /usr/lib/postgresql/15/bin and provides postgresql-contrib-15)
  postgresql-15 nats-server
  lua-cjson
)
# OpenResty's LuaJIT (luajit2, not the plain luajit: it conflicts with the lua-resty-core that
# lua-nginx-module needs) and the OpenResty stand-in
LUAJIT=(libluajit2-5.1-dev luajit2)
NGINX=(nginx libnginx-mod-http-lua)
# test: busted, luacheck, LuaSocket (the wire codec's specs drive it over a socket), LuaRocks (the install spec), valgrind, systemd (systemd-analyze checks
# the relay's unit file)
# docs: LDoc (make docs builds the API reference; make test checks it still builds)
DOCS=(lua5.4 lua-ldoc)
TEST=("${DEMO[@]}" "${LUAJIT[@]}" "${NGINX[@]}" lua-busted lua-check lua-socket luarocks valgrind systemd "${DOCS[@]}")
# bench: LuaSQL (the repository bench's baseline), wrk and hyperfine
BENCH=("${DEMO[@]}" "${LUAJIT[@]}" "${NGINX[@]}" lua-sql-postgres wrk hyperfine)

check_only=0
PACKAGES=()
groups=()
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    demo) PACKAGES+=("${DEMO[@]}"); groups+=(demo) ;;
    test) PACKAGES+=("${TEST[@]}"); groups+=(test) ;;
    bench) PACKAGES+=("${BENCH[@]}"); groups+=(bench) ;;
    docs) PACKAGES+=("${DOCS[@]}"); groups+=(docs) ;;
    *) echo "usage: $0 [--check] [demo|test|bench|docs]..." >&2; exit 2 ;;
  esac
done
if [ ${#groups[@]} -eq 0 ]; then
  PACKAGES=("${TEST[@]}" "${BENCH[@]}")
fi
# once each, in order
mapfile -t PACKAGES < <(printf '%s\n' "${PACKAGES[@]}" | awk '!seen[$0]++')

# One dpkg-query for all packages (a dpkg -s per package costs ~20 ms each).
declare -A state=()
while read -r name status; do
  state[$name]=$status
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)

missing=()
for p in "${PACKAGES[@]}"; do
  if [ "${state[$p]:-}" != installed ]; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "deps: missing packages: ${missing[*]}" >&2
if [ "$check_only" = 1 ]; then
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "deps: installing needs root; run as root:" >&2
  echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "${missing[@]}" </dev/null

still=()
for p in "${missing[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || still+=("$p")
done
if [ ${#still[@]} -ne 0 ]; then
  echo "deps: still missing after apt-get install: ${still[*]}" >&2
  exit 1
fi
echo "deps: installed ${missing[*]}"

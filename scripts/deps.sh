#!/usr/bin/env bash
# Install the Debian 12 packages qx needs to build, test, demo and benchmark.
# Fast when everything is present: each package is checked with dpkg first and
# apt-get only runs (one update, one install) when something is missing.
#
#   scripts/deps.sh            install what is missing (as root)
#   scripts/deps.sh --check    only report what is missing; exit 1 if anything is
set -euo pipefail

PACKAGES=(
  # toolchain
  gcc make pkg-config curl
  # Lua 5.4 and OpenResty's LuaJIT (luajit2, not the plain luajit: it conflicts
  # with the lua-resty-core that lua-nginx-module needs)
  liblua5.4-dev lua5.4 libluajit2-5.1-dev luajit2
  # C libraries
  libpq-dev libnats-dev libssl-dev
  # servers for the specs (postgresql-15 ships initdb, pg_ctl, psql and pgbench
  # under /usr/lib/postgresql/15/bin and provides postgresql-contrib-15)
  postgresql-15 nats-server
  # Lua tooling and libraries
  lua-busted lua-check luarocks lua-cjson lua-sql-postgres
  # OpenResty stand-in
  nginx libnginx-mod-http-lua
  # checking and measuring (systemd-analyze checks the relay's unit file)
  valgrind wrk hyperfine systemd
)

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

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

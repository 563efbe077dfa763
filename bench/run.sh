#!/usr/bin/env bash
# Runs every benchmark in bench/ in turn: *.lua under Lua 5.4 with the tree's paths, *.sh with
# bash. Needs the servers' environment (make bench provides it). Figures go into
# bench/RESULTS.md by hand. compare.sh (two trees against each other) is not a benchmark of this
# tree and runs only when asked.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
export LUA_PATH="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH="$root/build/lua5.4/?.so;;"
failed=0
for b in "$here"/*.lua "$here"/*.sh; do
  [ -e "$b" ] || continue
  case "$(basename "$b")" in run.sh|bench_support.lua|compare.sh|compare.lua) continue ;; esac
  echo "== $(basename "$b")"
  case "$b" in
    *.lua) lua5.4 "$b" ;;
    *.sh) bash "$b" ;;
  esac || { echo "== $(basename "$b") failed" >&2; failed=1; }
done
exit $failed

#!/usr/bin/env bash
# Old tree against new tree: the unit-of-work, append, keyset-page and relay measures of two git
# refs of qx, in turns, with the ratio new/old per round, its median and its spread, printed as a
# Markdown table for bench/RESULTS.md. A measurement, not a test: exit 0 unless something failed
# to run.
#
#   bash bench/compare.sh OLD_REF NEW_REF [ROUNDS]      (ROUNDS defaults to 5)
#
# Both refs get a throwaway git worktree in a temporary folder, each built with `make lua5.4`;
# one pair of throwaway servers (scripts/servers.sh of this tree) serves both. Each tree runs its
# own bench scripts with its own lua/ and build/ (bench/compare.lua drives them). Knobs, the same
# for both trees: QX_CMP_UOW_N, QX_CMP_SECONDS, QX_CMP_RELAY_EVENTS (see bench/compare.lua).
# Everything it made (worktrees, servers, folder) goes at the end, also on failure or Ctrl-C.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: bash bench/compare.sh OLD_REF NEW_REF [ROUNDS]" >&2
  exit 2
fi
old_ref=$1 new_ref=$2 rounds=${3:-5}
case "$rounds" in ''|*[!0-9]*|0) echo "compare: ROUNDS must be a positive number" >&2; exit 2 ;; esac

say() { echo "compare: $*" >&2; }

commit_of() {
  git -C "$root" rev-parse --verify --quiet "$1^{commit}" || { say "no commit $1"; exit 2; }
}
old_sha=$(commit_of "$old_ref") || exit 2
new_sha=$(commit_of "$new_ref") || exit 2

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qx-compare.XXXXXX")
chmod 755 "$tmp"
added=()
servers=""
driver=""
cleanup() {
  trap - EXIT INT TERM
  # the driver runs in a process group of its own: with it go the benches and their children
  if [ -n "$driver" ] && kill -0 "$driver" 2>/dev/null; then
    kill -TERM -- "-$driver" 2>/dev/null || kill -TERM "$driver" 2>/dev/null || true
    wait "$driver" 2>/dev/null || true
  fi
  if [ -n "$servers" ]; then bash "$root/scripts/servers.sh" stop "$servers" >/dev/null 2>&1 || true; fi
  for wt in "${added[@]}"; do git -C "$root" worktree remove --force "$wt" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'say "interrupted"; cleanup; exit 130' INT TERM

for side in old new; do
  if [ $side = old ]; then sha=$old_sha ref=$old_ref; else sha=$new_sha ref=$new_ref; fi
  wt=$tmp/$side
  git -C "$root" worktree add --detach "$wt" "$sha" >"$tmp/$side-worktree.log" 2>&1 || {
    cat "$tmp/$side-worktree.log" >&2; say "cannot make a worktree of $ref"; exit 1; }
  added+=("$wt")
  say "building $side ($ref, ${sha:0:10})"
  make -C "$wt" -j2 lua5.4 >"$tmp/$side-build.log" 2>&1 || {
    tail -n 30 "$tmp/$side-build.log" >&2; say "the $side tree ($ref) does not build"; exit 1; }
done

servers=$tmp/servers
bash "$root/scripts/servers.sh" start "$servers" >"$tmp/servers.log" 2>&1 || {
  cat "$tmp/servers.log" >&2; say "the servers did not start"; exit 1; }
set -a
# shellcheck disable=SC1091
. "$servers/env"
set +a

say "measuring: $rounds rounds, old and new in turns"
# in the background and waited for, so that an interrupt reaches the trap at once
setsid lua5.4 "$here/compare.lua" drive "$tmp/old" "$tmp/new" "$rounds" \
  "$old_ref (${old_sha:0:10})" "$new_ref (${new_sha:0:10})" &
driver=$!
wait "$driver"
status=$?
driver=""
exit $status

#!/usr/bin/env bash
# `make docs`: the HTML API reference (LDoc, config.ld at the root) in build/docs/.
# LDoc exits 1 on an error but only prints a warning (an unknown tag, a parameter documented
# twice) and exits 0; a warning names file:line, and it fails this script too, so the
# reference stays clean.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v ldoc >/dev/null; then
  echo "docs: ldoc not found (scripts/deps.sh docs installs lua-ldoc)" >&2
  exit 1
fi
mkdir -p build/docs
out=$(ldoc -c config.ld . 2>&1)
rc=$?
problems=$(printf '%s\n' "$out" | grep -E '^[^ ]+\.lua:[0-9]+:' || true)
if [ "$rc" -ne 0 ] || [ -n "$problems" ]; then
  printf '%s\n' "$out" >&2
  echo "docs: LDoc reported problems (exit $rc)" >&2
  exit 1
fi
echo "docs: build/docs/index.html"

#!/usr/bin/env bash
# Run one command with throwaway servers: start them in DIR, export DIR/env, run the command,
# and stop the servers whatever happens. The exit code is the command's.
#
#   scripts/with-servers.sh DIR COMMAND [ARG...]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR COMMAND [ARG...]" >&2; exit 2; }
dir=$1
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

trap 'bash "$here/servers.sh" stop "$dir" || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bash "$here/servers.sh" start "$dir"
# shellcheck disable=SC1090,SC1091
. "$dir/env"
"$@"

# Shell helpers shared by scripts/servers.sh, scripts/nats-cluster.sh and scripts/pg-standby.sh
# (sourced; the caller defines PG_USER, log and die).

# Run a command as the cluster owner.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

# A process is alive when it exists and is not a zombie.
alive() {
  local pid=${1:-}
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  local st
  st=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

comm_of() { cat "/proc/$1/comm" 2>/dev/null || true; }

# A TCP port counts as used when any socket of this network namespace has it as local port,
# or when something on 127.0.0.1 accepts a connection on it.
port_used() {
  local p=$1 hex
  hex=$(printf '%04X' "$p")
  if awk -v h=":$hex" 'FNR > 1 { if (substr($2, length($2) - 4) == h) found = 1 }
                       END { exit found ? 0 : 1 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
    return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && return 0
  return 1
}

# Pick a free port below the ephemeral range (32768+), not in the list given as arguments.
pick_port() {
  local p tries=0 taken
  while [ $tries -lt 200 ]; do
    tries=$((tries + 1))
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    for taken in "$@"; do [ "$p" = "$taken" ] && continue 2; done
    port_used "$p" || { echo "$p"; return 0; }
  done
  die "no free port found"
}

healthy_nats() {
  curl -sf --max-time 1 "http://127.0.0.1:$1/healthz" >/dev/null 2>&1
}


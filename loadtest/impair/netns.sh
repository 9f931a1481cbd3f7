#!/usr/bin/env bash
# A server namespace and a generator namespace joined only through
# `tutti-load impair`, a user-space forwarder that applies loss, delay, jitter and
# reordering to every packet between them (this kernel has no netem).
#
#   tutti-srv: lo, TUN tutti-tun-s, 10.77.0.1/32, peer 10.77.0.2 via tutti-tun-s
#   tutti-gen: lo, TUN tutti-tun-g, 10.77.0.2/32, peer 10.77.0.1 via tutti-tun-g
#   root:      `tutti-load impair --tun-a tutti-tun-s --tun-b tutti-tun-g ...`
#              (it opens each device inside its namespace)
#
# Usage (as root):
#   netns.sh up [IMPAIR OPTIONS]      namespaces, devices, addresses; start the forwarder
#   netns.sh impair [IMPAIR OPTIONS]  restart the forwarder with other options
#   netns.sh down                     stop the forwarder (prints its counters), delete
#                                     the namespaces; does nothing when nothing is up
#   netns.sh exec-srv CMD...          run CMD in the server namespace
#   netns.sh exec-gen CMD...          run CMD in the generator namespace
#   netns.sh with [IMPAIR OPTIONS] -- CMD...
#                                     up, run CMD (in the root namespace; it uses
#                                     exec-srv/exec-gen), down when it ends or fails
#   netns.sh status                   namespaces, forwarder, its CPU, device counters
#
# IMPAIR OPTIONS are `tutti-load impair` options, e.g.
#   --loss 2 --delay 25ms --jitter 5ms --reorder 0 --seed 1 --duration 600s
# (one value for both directions, or SRV->GEN,GEN->SRV: --loss 0.5,2).
# See loadtest/impair/README.md. Settings come from the environment:
#   TUTTI_IMPAIR_SRV_NS (tutti-srv), TUTTI_IMPAIR_GEN_NS (tutti-gen),
#   TUTTI_IMPAIR_SRV_TUN (tutti-tun-s), TUTTI_IMPAIR_GEN_TUN (tutti-tun-g),
#   TUTTI_IMPAIR_SRV_ADDR (10.77.0.1), TUTTI_IMPAIR_GEN_ADDR (10.77.0.2),
#   TUTTI_IMPAIR_STATE (/run/tutti-impair: pid, log, counters),
#   TUTTI_LOAD_BIN (target/release/tutti-load of this checkout).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SELF="$ROOT/loadtest/impair/netns.sh"
SRV_NS=${TUTTI_IMPAIR_SRV_NS:-tutti-srv}
GEN_NS=${TUTTI_IMPAIR_GEN_NS:-tutti-gen}
SRV_TUN=${TUTTI_IMPAIR_SRV_TUN:-tutti-tun-s}
GEN_TUN=${TUTTI_IMPAIR_GEN_TUN:-tutti-tun-g}
SRV_ADDR=${TUTTI_IMPAIR_SRV_ADDR:-10.77.0.1}
GEN_ADDR=${TUTTI_IMPAIR_GEN_ADDR:-10.77.0.2}
STATE=${TUTTI_IMPAIR_STATE:-/run/tutti-impair}
LOAD_BIN=${TUTTI_LOAD_BIN:-$ROOT/target/release/tutti-load}
# The generator's clients ask for 4 MiB socket buffers; the limit is global.
UDP_BUF=4194304
TXQUEUELEN=10000

die() { echo "netns.sh: $*" >&2; exit 2; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (network namespaces, TUN devices)"; }
ns_exists() { [ -e "/run/netns/$1" ]; }

# The forwarder's pid, if it is running (the pid file may name a reused pid).
forwarder_pid() {
  local pid
  pid=$(cat "$STATE/forwarder.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "impair --tun-a $SRV_TUN" || return 1
  echo "$pid"
}

# CPU seconds (utime + stime) of a process, from /proc.
cpu_secs() {
  local stat hz
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  hz=$(getconf CLK_TCK)
  # Fields after the command name (which may hold spaces): utime is the 12th.
  awk -v hz="$hz" '{ print ($12 + $13) / hz }' <<<"${stat##*) }"
}

stop_forwarder() {
  local pid
  if pid=$(forwarder_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -e "/proc/$pid" ] || break
      sleep 0.1
    done
    if [ -e "/proc/$pid" ]; then
      echo "netns.sh: forwarder $pid ignored SIGTERM for 5 s; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$STATE/forwarder.pid"
  if [ -s "$STATE/counters.json" ]; then
    cat "$STATE/counters.json"
    mv -f "$STATE/counters.json" "$STATE/counters.last.json"
  fi
}

start_forwarder() {
  [ -x "$LOAD_BIN" ] || die "$LOAD_BIN is missing: cargo build --release -p tutti-load"
  mkdir -p "$STATE"
  : >"$STATE/forwarder.log"
  "$LOAD_BIN" impair --tun-a "$SRV_TUN" --netns-a "$SRV_NS" \
    --tun-b "$GEN_TUN" --netns-b "$GEN_NS" "$@" \
    >"$STATE/counters.json" 2>"$STATE/forwarder.log" </dev/null &
  local pid=$!
  echo "$pid" >"$STATE/forwarder.pid"
  echo "$*" >"$STATE/forwarder.args"
  for _ in $(seq 1 100); do
    grep -q "impair: ready" "$STATE/forwarder.log" && break
    [ -e "/proc/$pid" ] || { cat "$STATE/forwarder.log" >&2; die "the forwarder exited"; }
    sleep 0.05
  done
  grep -q "impair: ready" "$STATE/forwarder.log" || die "the forwarder did not start in 5 s"
  echo "forwarder $pid: $*"
}

# One namespace with its TUN device, address and route to the peer.
make_ns() {
  local ns=$1 dev=$2 addr=$3 peer=$4
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" tuntap add dev "$dev" mode tun
  ip -n "$ns" link set dev "$dev" txqueuelen "$TXQUEUELEN"
  ip -n "$ns" addr add "$addr/32" peer "$peer/32" dev "$dev"
  ip -n "$ns" link set dev "$dev" up
}

cmd_down() {
  need_root
  stop_forwarder
  local ns
  for ns in "$SRV_NS" "$GEN_NS"; do
    if ns_exists "$ns"; then ip netns del "$ns"; fi
  done
}

cmd_up() {
  need_root
  command -v ip >/dev/null || die "iproute2 (ip) is missing"
  [ -c /dev/net/tun ] || die "/dev/net/tun is missing"
  cmd_down >/dev/null
  # Anything that fails from here leaves nothing behind.
  trap 'cmd_down >/dev/null 2>&1 || true' EXIT
  make_ns "$SRV_NS" "$SRV_TUN" "$SRV_ADDR" "$GEN_ADDR"
  make_ns "$GEN_NS" "$GEN_TUN" "$GEN_ADDR" "$SRV_ADDR"
  local k
  for k in net.core.rmem_max net.core.wmem_max; do
    if [ "$(sysctl -n "$k")" -lt "$UDP_BUF" ]; then
      echo "netns.sh: raising $k to $UDP_BUF (global)" >&2
      sysctl -q -w "$k=$UDP_BUF"
    fi
  done
  start_forwarder "$@"
  trap - EXIT
  echo "up: $SRV_NS $SRV_ADDR ($SRV_TUN) <-> $GEN_NS $GEN_ADDR ($GEN_TUN)"
}

cmd_impair() {
  need_root
  if ! ns_exists "$SRV_NS" || ! ns_exists "$GEN_NS"; then die "not up: netns.sh up first"; fi
  stop_forwarder
  start_forwarder "$@"
}

cmd_status() {
  local ns pid
  for ns in "$SRV_NS" "$GEN_NS"; do
    if ns_exists "$ns"; then echo "namespace $ns: up"; else echo "namespace $ns: absent"; fi
  done
  if pid=$(forwarder_pid); then
    echo "forwarder $pid: $(cat "$STATE/forwarder.args" 2>/dev/null), cpu $(cpu_secs "$pid") s"
  else
    echo "forwarder: not running"
  fi
  if ns_exists "$SRV_NS"; then ip -n "$SRV_NS" -s link show dev "$SRV_TUN" || true; fi
  if ns_exists "$GEN_NS"; then ip -n "$GEN_NS" -s link show dev "$GEN_TUN" || true; fi
}

cmd_with() {
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
  [ "${1:-}" = "--" ] || die "usage: netns.sh with [IMPAIR OPTIONS] -- CMD..."
  shift
  [ $# -gt 0 ] || die "usage: netns.sh with [IMPAIR OPTIONS] -- CMD..."
  cmd_up "${opts[@]}"
  trap 'cmd_down' EXIT
  trap 'exit 130' INT TERM
  local fwd
  fwd=$(forwarder_pid) || fwd=
  export TUTTI_IMPAIR_SRV_NS="$SRV_NS" TUTTI_IMPAIR_GEN_NS="$GEN_NS" \
    TUTTI_IMPAIR_SRV_ADDR="$SRV_ADDR" TUTTI_IMPAIR_GEN_ADDR="$GEN_ADDR" \
    TUTTI_IMPAIR_STATE="$STATE" TUTTI_IMPAIR_FORWARDER_PID="$fwd"
  "$@"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down ;;
  impair) shift; cmd_impair "$@" ;;
  status) cmd_status ;;
  with) shift; cmd_with "$@" ;;
  exec-srv) shift; need_root; exec ip netns exec "$SRV_NS" "$@" ;;
  exec-gen) shift; need_root; exec ip netns exec "$GEN_NS" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

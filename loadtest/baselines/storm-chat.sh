#!/usr/bin/env bash
# Chat through reconnect storms: the latency of established sessions while
# thousands of other clients reconnect at once.
#
#   loadtest/baselines/storm-chat.sh [--server-bin PATH] [--workers N] [--rsa] [--storms N] [--rounds N]
#
# Runs chat-fanout.toml (1,000 clients, 10,000 deliveries/s) against a server
# `tutti-load --spawn` starts on free loopback ports (data on /dev/shm, a generated
# development certificate, or with --rsa an RSA-2048 one made with openssl;
# `worker_threads = N` with --workers), and, once its ramp-up and warm-up are
# over (22 s in), --storms runs of reconnect.toml (default 3) against the same
# server from a second generator (`tutti-load run --alongside`): 2,000 connects,
# all closed, all reopened resuming their TLS sessions, all closed, all reopened
# with full handshakes. Prints the chat latency over its measured window (30 s,
# which the storms fill) and each storm's rates. With --rounds N it repeats the
# whole thing N times, each on a fresh server. JSON reports go to
# loadtest/results/storm-chat-<UTC time>/ (the storms' inside each chat report,
# under details.alongside). Loopback only; every run has a timeout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOAD=$ROOT/target/release/tutti-load
BIN=$ROOT/target/release/tutti
WORKERS=""
RSA=0
STORMS=3
ROUNDS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --server-bin) BIN=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --rsa) RSA=1 ;;
    --storms) STORMS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "storm-chat.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for n in "$STORMS" "$ROUNDS" ${WORKERS:+"$WORKERS"}; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "storm-chat.sh: --workers, --storms and --rounds take a number" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "storm-chat.sh: jq is required" >&2; exit 1; }
[ -x "$LOAD" ] || { echo "storm-chat.sh: build first: cargo build --release -p tutti -p tutti-load" >&2; exit 1; }
SHM=/dev/shm
[ -d "$SHM" ] || SHM=${TMPDIR:-/tmp}
OUT=$ROOT/loadtest/results/storm-chat-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
log() { echo "[storm-chat $(date -u +%H:%M:%S)] $*" >&2; }

# The spawned server's extra configuration (tutti-load run --server-config).
{
  [ -n "$WORKERS" ] && echo "worker_threads = $WORKERS"
  if [ "$RSA" = 1 ]; then
    "$ROOT/loadtest/baselines/rsa-tls.sh" "$OUT"
  fi
  true
} > "$OUT/server.toml"

for r in $(seq "$ROUNDS"); do
  log "round $r: chat fan-out, with $STORMS reconnect storms from 22 s in"
  # chat-fanout.toml ramps up for 10 s and warms up for 10 s before its measured
  # 30 s; the storms start 2 s into that window.
  timeout 600 "$LOAD" run "$ROOT/loadtest/scenarios/chat-fanout.toml" --spawn --spawn-dir "$SHM" \
    --server-bin "$BIN" --server-config "$OUT/server.toml" --timeout 8m -q \
    --alongside "$ROOT/loadtest/scenarios/reconnect.toml" --alongside-after 22s \
    --alongside-runs "$STORMS" --json "$OUT/chat-$r.json" >/dev/null || true
done

echo "| round | chat p50 (ms) | p99 | p99.9 | max | lost | storms: first connect, resumed, full (/s) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for r in $(seq "$ROUNDS"); do
  if [ -f "$OUT/chat-$r.json" ]; then
    jq -r --arg r "$r" '
      ([.details.alongside[]? |
        if .error then "error: \(.error)"
        else "\(.connections.connects_per_sec|floor), \(.details.reconnect_resumed_per_sec|floor), \(.details.reconnect_full_per_sec|floor)"
        end] | join("; ")) as $s |
      "| \($r) | \(.latency_ms.p50) | \(.latency_ms.p99) | \(.latency_ms.p999) | \(.latency_ms.max) | \(.messages.lost) | \($s) |"' \
      "$OUT/chat-$r.json"
  else
    echo "| $r | (no report) | | | | | |"
  fi
done

#!/usr/bin/env bash
# Chat through reconnect storms: the latency of established sessions while
# thousands of other clients reconnect at once.
#
#   loadtest/baselines/storm-chat.sh [--server-bin PATH] [--workers N] [--rsa] [--storms N] [--rounds N]
#
# Starts `tutti serve` on free loopback ports (data on /dev/shm, a generated
# development certificate, or with --rsa an RSA-2048 one made with openssl;
# `worker_threads = N` with --workers), then runs chat-fanout.toml (1,000 clients,
# 10,000 deliveries/s) against it from one generator and, once its ramp-up and
# warm-up are over (22 s in), --storms runs of reconnect.toml (default 3) from a
# second generator: 2,000 connects, all closed, all reopened resuming their TLS
# sessions, all closed, all reopened with full handshakes. Prints the chat
# latency over its measured window (30 s, which the storms fill) and each storm's
# rates. With --rounds N it repeats the whole thing N times, each on a fresh
# server. JSON reports go to loadtest/results/storm-chat-<UTC time>/. Loopback
# only; every run has a timeout.
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
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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

DIR=""
SERVER=""
cleanup() {
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  [ -n "$DIR" ] && rm -rf "$DIR"
  true
}
trap cleanup EXIT

round() { # round number
  local r=$1
  DIR=$(mktemp -d "$SHM/tutti-storm-chat.XXXXXX")
  {
    [ -n "$WORKERS" ] && echo "worker_threads = $WORKERS"
    printf '[rooms]\njoin_policy = "open"\n[limits]\nmax_connections_per_address = 1000000\n'
    if [ "$RSA" = 1 ]; then
      openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
        -keyout "$DIR/key.pem" -out "$DIR/cert.pem" 2>/dev/null
      printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$DIR/cert.pem" "$DIR/key.pem"
    fi
  } > "$DIR/tutti.toml"
  TUTTI_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  TUTTI_API_KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export TUTTI_JWT_SECRET TUTTI_API_KEY
  TUTTI_LOG=warn "$BIN" serve --config "$DIR/tutti.toml" --listen 127.0.0.1:0 --http 127.0.0.1:0 \
    --data-dir "$DIR/data" --cert-dir "$DIR/certs" --web-dir "$DIR/web" > "$DIR/banner" 2> "$DIR/server.log" &
  SERVER=$!
  local quic="" http=""
  for _ in $(seq 100); do # the banner, within 10 s
    quic=$(sed -n 's/^ *raw quic: *\([^ ]*\).*/\1/p' "$DIR/banner")
    http=$(sed -n 's|^ *page: *http://\([^/]*\)/.*|\1|p' "$DIR/banner")
    [ -n "$quic" ] && [ -n "$http" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$DIR/server.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$quic" ] || { echo "storm-chat.sh: the server printed no address" >&2; exit 1; }
  local target=(--target "$quic" --http "$http" --server-pid "$SERVER" -q)
  log "round $r: chat fan-out against $quic"
  timeout 300 "$LOAD" run "$ROOT/loadtest/scenarios/chat-fanout.toml" "${target[@]}" \
    --json "$OUT/chat-$r.json" >/dev/null &
  local chat=$!
  # chat-fanout.toml ramps up for 10 s and warms up for 10 s before its measured
  # 30 s; the storms start 2 s into that window.
  sleep 22
  for s in $(seq "$STORMS"); do
    log "round $r: reconnect storm $s"
    timeout 120 "$LOAD" run "$ROOT/loadtest/scenarios/reconnect.toml" "${target[@]}" \
      --json "$OUT/storm-$r-$s.json" >/dev/null || true
  done
  wait "$chat" || true
  kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
  SERVER=""
  rm -rf "$DIR"
  DIR=""
}

for r in $(seq "$ROUNDS"); do round "$r"; done

echo "| round | chat p50 (ms) | p99 | p99.9 | max | lost | storms: first connect, resumed, full (/s) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for r in $(seq "$ROUNDS"); do
  storms=$(for f in "$OUT"/storm-"$r"-*.json; do
    [ -f "$f" ] && jq -r '"\(.connections.connects_per_sec|floor), \(.details.reconnect_resumed_per_sec|floor), \(.details.reconnect_full_per_sec|floor)"' "$f"
  done | paste -sd ';' | sed 's/;/; /g')
  if [ -f "$OUT/chat-$r.json" ]; then
    jq -r --arg r "$r" --arg s "$storms" \
      '"| \($r) | \(.latency_ms.p50) | \(.latency_ms.p99) | \(.latency_ms.p999) | \(.latency_ms.max) | \(.messages.lost) | \($s) |"' \
      "$OUT/chat-$r.json"
  else
    echo "| $r | (no report) | | | | | $storms |"
  fi
done

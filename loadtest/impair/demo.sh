#!/usr/bin/env bash
# One Tutti run through the impairment forwarder: namespaces up (netns.sh), a
# fresh `tutti serve` on 10.77.0.1 in the server namespace (data on /dev/shm),
# `tutti-load run` in the generator namespace against it, everything down again,
# then one summary line (and the reports in the output directory).
#
# Usage (as root, after `cargo build --release -p tutti -p tutti-load`):
#   loadtest/impair/demo.sh LABEL [IMPAIR OPTIONS]
#   loadtest/impair/demo.sh clean                                  (no impairment)
#   loadtest/impair/demo.sh lossy --loss 2 --delay 25ms --seed 1   (RTT 50 ms)
#   SYSTEM=socketio loadtest/impair/demo.sh LABEL [OPTIONS]      (Socket.IO, ws://)
#   SYSTEM=socketio TLS=1 loadtest/impair/demo.sh LABEL [OPTIONS] (Socket.IO, wss://)
#   CONGESTION=bbr loadtest/impair/demo.sh LABEL [OPTIONS]        (Tutti with BBR)
# Settings from the environment: SCENARIO (loadtest/impair/chat-impaired.toml),
# OUT (/tmp/tutti-impair), TUTTI_BIN and TUTTI_LOAD_BIN (target/release/...),
# and netns.sh's TUTTI_IMPAIR_* variables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NETNS="$ROOT/loadtest/impair/netns.sh"
SCENARIO=$(realpath "${SCENARIO:-$ROOT/loadtest/impair/chat-impaired.toml}")
OUT=${OUT:-/tmp/tutti-impair}
TUTTI_BIN=${TUTTI_BIN:-$ROOT/target/release/tutti}
export TUTTI_LOAD_BIN=${TUTTI_LOAD_BIN:-$ROOT/target/release/tutti-load}
SRV_ADDR=${TUTTI_IMPAIR_SRV_ADDR:-10.77.0.1}
STATE=${TUTTI_IMPAIR_STATE:-/run/tutti-impair}
QUIC_PORT=4433
HTTP_PORT=8080

[ $# -ge 1 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
LABEL=$1
shift
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root" >&2; exit 2; }
for b in "$TUTTI_BIN" "$TUTTI_LOAD_BIN"; do
  [ -x "$b" ] || { echo "demo.sh: $b is missing: cargo build --release -p tutti -p tutti-load" >&2; exit 2; }
done
mkdir -p "$OUT"
SHM=/dev/shm
[ -d "$SHM" ] || SHM=${TMPDIR:-/tmp}
WORK=$(mktemp -d "$SHM/tutti-impair.XXXXXX")
SERVER_PID=

cleanup() {
  if [ -n "$SERVER_PID" ] && [ -e "/proc/$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do [ -e "/proc/$SERVER_PID" ] || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  "$NETNS" down >"$OUT/$LABEL.forwarder.json" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_of() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  awk -v hz="$(getconf CLK_TCK)" '{ print ($12 + $13) / hz }' <<<"${stat##*) }"
}

"$NETNS" up "$@" --duration 600s >/dev/null
FWD_PID=$(cat "$STATE/forwarder.pid")

SIO=$ROOT/loadtest/baselines/socketio
wait_for() { # file pattern what
  for _ in $(seq 1 150); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    [ -e "/proc/$SERVER_PID" ] || { cat "$OUT/$LABEL.server.log" >&2; echo "demo.sh: the $3 exited" >&2; exit 2; }
    sleep 0.1
  done
  echo "demo.sh: no $3 banner in 15 s" >&2
  exit 2
}

if [ "${SYSTEM:-tutti}" = socketio ]; then
  SIO_PORT=3000
  SCHEME=http
  TLS_ARGS=()
  if [ "${TLS:-0}" = 1 ]; then
    SCHEME=https
    TLS_ARGS=(--tls "$WORK")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 -subj /CN=localhost \
      -addext "subjectAltName=IP:$SRV_ADDR" 2>/dev/null
  fi
  # server.js exits when its stdin closes: hold a FIFO open for it (closed with
  # this script).
  mkfifo "$WORK/stdin"
  exec 3<>"$WORK/stdin"
  # Typing relay and the history ring only when the scenario uses them.
  FEATURE_ARGS=()
  grep -Eq '^typing_per_client *= *[1-9.]' "$SCENARIO" && FEATURE_ARGS+=(--typing 1)
  grep -Eq '^(history_every|prefill_messages) *=' "$SCENARIO" && FEATURE_ARGS+=(--history 100)
  # An address change: the clients reconnect and resume (Connection State Recovery).
  grep -Eq '^rebind_at *=' "$SCENARIO" && FEATURE_ARGS+=(--recovery 1)
  "$NETNS" exec-srv node "$SIO/server.js" --host "$SRV_ADDR" --port "$SIO_PORT" "${TLS_ARGS[@]}" "${FEATURE_ARGS[@]}" \
    >"$WORK/server.out" 2>"$OUT/$LABEL.server.log" <"$WORK/stdin" &
  SERVER_PID=$!
  wait_for "$WORK/server.out" '"ready":true' "Socket.IO server"
else
  # The same server configuration as `tutti-load run --spawn`: users are put into
  # rooms directly, and every client comes from the generator's one address.
  printf '[rooms]\njoin_policy = "open"\n[limits]\nmax_connections_per_address = 1000000\n' \
    >"$WORK/tutti.toml"
  # CONGESTION=bbr: the server's limits.congestion_control (default cubic).
  if [ -n "${CONGESTION:-}" ]; then
    printf 'congestion_control = "%s"\n' "$CONGESTION" >>"$WORK/tutti.toml"
  fi
  TUTTI_JWT_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  TUTTI_API_KEY=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  export TUTTI_JWT_SECRET TUTTI_API_KEY
  unset TUTTI_CONFIG TUTTI_LISTEN TUTTI_HTTP TUTTI_CERT TUTTI_KEY TUTTI_NODE_ID TUTTI_CLUSTER_URL
  # `ip netns exec` runs the server itself (no fork), so $! is its pid.
  TUTTI_LOG=${TUTTI_LOG:-warn} "$NETNS" exec-srv "$TUTTI_BIN" serve --config "$WORK/tutti.toml" \
    --listen "$SRV_ADDR:$QUIC_PORT" --http "$SRV_ADDR:$HTTP_PORT" \
    --data-dir "$WORK/data" --cert-dir "$WORK/certs" --web-dir "$WORK/web" \
    >"$WORK/server.out" 2>"$OUT/$LABEL.server.log" </dev/null &
  SERVER_PID=$!
  wait_for "$WORK/server.out" "raw quic:" "server"
fi

FWD_CPU0=$(cpu_of "$FWD_PID")
T0=$(date +%s.%N)
RC=0
if [ "${SYSTEM:-tutti}" = socketio ]; then
  (cd "$SIO" && "$NETNS" exec-gen node load.js --scenario-file "$SCENARIO" --quiet \
    --url "$SCHEME://$SRV_ADDR:$SIO_PORT" --server-pid "$SERVER_PID" \
    --json "$OUT/$LABEL.json") >"$OUT/$LABEL.txt" || RC=$?
else
  "$NETNS" exec-gen "$TUTTI_LOAD_BIN" run "$SCENARIO" -q \
    --target "$SRV_ADDR:$QUIC_PORT" --http "$SRV_ADDR:$HTTP_PORT" --server-pid "$SERVER_PID" \
    --timeout 5m --json "$OUT/$LABEL.json" --hgrm "$OUT/$LABEL.hgrm" >"$OUT/$LABEL.txt" || RC=$?
fi
T1=$(date +%s.%N)
FWD_CPU1=$(cpu_of "$FWD_PID")
cleanup
trap - EXIT

FWD_CPU=$(awk -v a="$FWD_CPU0" -v b="$FWD_CPU1" 'BEGIN { printf "%.2f", b - a }')
WALL=$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }')
if [ -s "$OUT/$LABEL.json" ] && command -v jq >/dev/null; then
  jq -c --arg lbl "$LABEL" --arg args "$*" --argjson rc "$RC" \
    --argjson fwd_cpu "$FWD_CPU" --argjson wall "$WALL" \
    --slurpfile fwd "$OUT/$LABEL.forwarder.json" '{
      "label": $lbl, "impair": $args, "exit": $rc, "pass": .pass,
      latency_ms: (.latency_ms | {p50, p90, p99, p999, max, mean}),
      messages: (.messages | {expected, delivered, lost, duplicated, out_of_order}),
      connections: (.connections | {attempted, established, dropped}),
      typing: ((.details.typing // .typing) | if . == null then null else
        {sent, expected, received, delivery_pct} + (.latency_ms | {p50, p90, p99, p999, max}) end),
      history: ((.details.history // .history) | if . == null then null else
        {pages, errors, bytes} + (.latency_ms | {p50, p99, max}) end),
      rebind: (.details.rebind // .rebind),
      deliveries_per_sec: .throughput.deliveries_per_sec,
      cpu_secs: {server: .server.cpu_secs, generator: .generator.cpu_secs,
                 forwarder: $fwd_cpu, wall: $wall},
      forwarder: ($fwd[0] // {} | {a_to_b, b_to_a} | map_values(select(. != null) |
        {received, forwarded, dropped_loss, dropped_cap, write_errors, reordered,
         released_out_of_order, loss_pct_actual, mean_delay_ms, mean_timer_error_ms}))
    }' "$OUT/$LABEL.json" | tee "$OUT/$LABEL.summary.json"
else
  cat "$OUT/$LABEL.txt"
  echo "forwarder cpu ${FWD_CPU}s over ${WALL}s"
fi
exit "$RC"

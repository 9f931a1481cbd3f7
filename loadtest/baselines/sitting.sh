#!/usr/bin/env bash
# Server CPU per delivery and knees, Tutti and Socket.IO side by side in one sitting.
#
#   loadtest/baselines/sitting.sh [--skip-build] [--no-knee] [--no-pinned] [--no-connects]
#   loadtest/baselines/sitting.sh [--skip-build] --connects-only
#   loadtest/baselines/sitting.sh [--skip-build] [--no-pinned] --knees-only
#   loadtest/baselines/sitting.sh [--skip-build] --pairs=N
#   loadtest/baselines/sitting.sh --table=loadtest/results/sitting-...   (the table again)
#
# Runs, one after the other on this machine:
#   1. chat fan-out at 10,000 and 40,000 deliveries/s (chat-fanout.toml,
#      chat-fanout-40k.toml): Tutti over raw QUIC and WebTransport (data on
#      /dev/shm), Socket.IO over ws:// and wss:// (two generator workers);
#   2. the knee (knee.toml) of Tutti (raw QUIC) and of Socket.IO ws:// and wss://,
#      with the server and generator sharing every core;
#   3. the same knees pinned: the server on CPU 0 (`--server-cpus 0`), the
#      generator on the other CPUs (`taskset -c 1-`);
#   4. connects: 10,000 idle raw QUIC connections and 3,000 WebTransport ones, and
#      10,000 idle Socket.IO ws:// and wss:// ones (idle.toml: connect rate, server
#      memory and CPU per idle connection), and a mass
#      reconnect (reconnect.toml: resumed against full handshakes) with the
#      generated ECDSA P-256 certificate and with an RSA-2048 one (made here with
#      openssl, passed through `tutti-load run --server-config`).
# Then prints the tables: server CPU per delivery over the measured window (the
# first figure), p50/p99, the knees, and the connects. With --pairs=N it runs only N rounds of
# Tutti raw QUIC against Socket.IO wss:// at 40,000 then 10,000 deliveries/s,
# alternated (Tutti first in odd rounds, Socket.IO first in even ones, so that a
# drift of the host weighs on both), and prints each round's CPU per delivery and
# ratio. JSON reports go to loadtest/results/sitting-<UTC time>/. Loopback only;
# every run has a timeout.
set -euo pipefail

BUILD=1
KNEE=1
PINNED=1
CONNECTS=1
CHAT=1
TABLE_ONLY=""
PAIRS=0
for a in "$@"; do
  case "$a" in
    --table=*) TABLE_ONLY="${a#--table=}" ;;
    --pairs=*) PAIRS="${a#--pairs=}" ;;
    --skip-build) BUILD=0 ;;
    --no-knee) KNEE=0 ;;
    --no-pinned) PINNED=0 ;;
    --no-connects) CONNECTS=0 ;;
    --connects-only) CHAT=0; KNEE=0 ;;
    --knees-only) CHAT=0; CONNECTS=0 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "sitting.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
[[ "$PAIRS" =~ ^[0-9]+$ ]] || { echo "sitting.sh: --pairs takes a number of rounds" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SIO=$ROOT/loadtest/baselines/socketio
SCEN=$ROOT/loadtest/scenarios
OUT=${TABLE_ONLY:-$ROOT/loadtest/results/sitting-$(date -u +%Y%m%dT%H%M%SZ)}
LOAD=$ROOT/target/release/tutti-load
SHM=/dev/shm
[ -d "$SHM" ] || SHM=${TMPDIR:-/tmp}
mkdir -p "$OUT"
CPUS=$(nproc)
OTHERS="1-$((CPUS - 1))"

log() { echo "[sitting $(date -u +%H:%M:%S)] $*" >&2; }

if [ -n "$TABLE_ONLY" ]; then
  BUILD=0
fi
run_all() {
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release -p tutti -p tutti-load)
  (cd "$SIO" && npm ci --silent)
fi
command -v jq >/dev/null || { echo "sitting.sh: jq is required" >&2; exit 1; }
[ -x "$LOAD" ] || { echo "sitting.sh: no $LOAD: run without --skip-build" >&2; exit 1; }
# The Socket.IO runs (chat, knees, idle connections) need the baseline's packages,
# also with --skip-build (which would otherwise leave every Socket.IO row empty).
if [ "$CHAT" = 1 ] || [ "$KNEE" = 1 ] || [ "$CONNECTS" = 1 ] || [ "$PAIRS" -gt 0 ]; then
  command -v node >/dev/null || { echo "sitting.sh: node is required for the Socket.IO runs" >&2; exit 1; }
  if [ ! -d "$SIO/node_modules" ]; then
    log "installing the Socket.IO baseline's packages (npm ci)"
    (cd "$SIO" && npm ci --silent)
  fi
fi

tutti() { # name scenario (in loadtest/scenarios, or a path) [args...]
  local name=$1 scenario=$2; shift 2
  case $scenario in /*) ;; *) scenario=$SCEN/$scenario ;; esac
  log "tutti $name"
  # shellcheck disable=SC2086 # PIN is a command prefix (empty or taskset -c ...)
  timeout 900 ${PIN:-} "$LOAD" run "$scenario" --spawn --spawn-dir "$SHM" -q --json "$OUT/tutti-$name.json" "$@" >/dev/null || true
}
sio() { # name scenario [args...]
  local name=$1 scenario=$2; shift 2
  log "socket.io $name"
  (cd "$SIO" && timeout 900 node load.js --scenario-file "$SCEN/$scenario" --quiet --json "$OUT/sio-$name.json" "$@") >/dev/null || true
}

pair() { # round rate scenario [socket.io args...]: Tutti first in odd rounds
  local r=$1 rate=$2 scenario=$3; shift 3
  if [ $((r % 2)) = 1 ]; then
    tutti "quic-$rate-$r" "$scenario"
    sio "wss-$rate-$r" "$scenario" "$@" --tls 1
  else
    sio "wss-$rate-$r" "$scenario" "$@" --tls 1
    tutti "quic-$rate-$r" "$scenario"
  fi
}
if [ "$PAIRS" -gt 0 ]; then
  for r in $(seq "$PAIRS"); do
    pair "$r" 40k chat-fanout-40k.toml --rate 40000
    pair "$r" 10k chat-fanout.toml
  done
  echo "$PAIRS" > "$OUT/pairs"
  return
fi
if [ "$CHAT" = 1 ]; then
  tutti quic-10k chat-fanout.toml
  tutti wt-10k chat-fanout.toml --transport webtransport
  sio ws-10k chat-fanout.toml
  sio wss-10k chat-fanout.toml --tls 1
  tutti quic-40k chat-fanout-40k.toml
  tutti wt-40k chat-fanout-40k.toml --transport webtransport
  sio ws-40k chat-fanout-40k.toml --rate 40000
  sio wss-40k chat-fanout-40k.toml --rate 40000 --tls 1
fi
if [ "$KNEE" = 1 ]; then
  tutti knee knee.toml
  sio knee-ws knee.toml
  sio knee-wss knee.toml --tls 1
  if [ "$PINNED" = 1 ] && [ "$CPUS" -ge 2 ]; then
    log "pinned: servers on CPU 0, generators on $OTHERS"
    PIN="taskset -c $OTHERS" tutti knee-pinned knee.toml --server-cpus 0
    (cd "$SIO" && log "socket.io knee-wss-pinned" && timeout 900 taskset -c "$OTHERS" node load.js \
      --scenario-file "$SCEN/knee.toml" --quiet --json "$OUT/sio-knee-wss-pinned.json" --tls 1 --server-cpus 0) >/dev/null || true
    (cd "$SIO" && log "socket.io knee-ws-pinned" && timeout 900 taskset -c "$OTHERS" node load.js \
      --scenario-file "$SCEN/knee.toml" --quiet --json "$OUT/sio-knee-ws-pinned.json" --server-cpus 0) >/dev/null || true
  fi
fi
if [ "$CONNECTS" = 1 ]; then
  sed 's/^connections = 10000$/connections = 3000/' "$SCEN/idle.toml" > "$OUT/idle-3000.toml"
  tutti idle-quic idle.toml
  tutti idle-wt "$OUT/idle-3000.toml" --transport webtransport
  sio idle-ws idle.toml
  sio idle-wss idle.toml --tls 1
  tutti reconnect-ecdsa reconnect.toml
  # A throwaway RSA-2048 key and certificate for this sitting only (the results
  # directory is not kept in git).
  mkdir -p "$OUT/rsa"
  if "$ROOT/loadtest/baselines/rsa-tls.sh" "$OUT/rsa" > "$OUT/rsa.toml"; then
    tutti reconnect-rsa reconnect.toml --server-config "$OUT/rsa.toml"
  else
    log "openssl could not make an RSA certificate: the RSA reconnect storm is skipped"
  fi
fi

}
[ -n "$TABLE_ONLY" ] || run_all

# The table. Tutti's reports keep the window CPU per delivery in
# details.server_cpu_us_per_delivery, Socket.IO's in server.cpu_us_per_delivery;
# both keep it per knee step.
WINDOW_CPU='(.details.server_cpu_us_per_delivery // .server.cpu_us_per_delivery // null)'
row() { # label file
  local f=$OUT/$2
  [ -f "$f" ] || { printf '| %s | (no report) | | | |\n' "$1"; return; }
  jq -r --arg l "$1" "$WINDOW_CPU as \$cpu | "'
    [ $l,
      ($cpu | if . == null then "?" else (. * 10 | round / 10 | tostring) end),
      ((.throughput.deliveries_per_sec // 0) | round | tostring),
      ((.latency_ms.p50 // 0) * 100 | round / 100 | tostring),
      ((.latency_ms.p99 // 0) * 100 | round / 100 | tostring) ]
    | "| " + join(" | ") + " |"' "$f"
}
knee() { # label file
  local f=$OUT/$2
  [ -f "$f" ] || { printf '| %s | (no report) | |\n' "$1"; return; }
  jq -r --arg l "$1" '
    (.knee.deliveries_per_sec // .knee_deliveries_per_sec // 0) as $k
    | ([ .knee.steps // [] | .[] | select(.pass) ] | max_by(.offered_deliveries_per_sec) | .server_cpu_us_per_delivery? // null) as $cpu
    | [ $l, ($k | round | tostring),
        ($cpu | if . == null then "?" else (. * 10 | round / 10 | tostring) end) ]
    | "| " + join(" | ") + " |"' "$f"
}
connects() { # label file: connect rate, memory and CPU per idle connection, reconnect storms
  local f=$OUT/$2
  [ -f "$f" ] || { printf '| %s | (no report) | | | | | | | |\n' "$1"; return; }
  jq -r --arg l "$1" '
    def r(n): if . == null then "" else (. * n | round / n | tostring) end;
    .details as $d
    | [ $l,
        (.connections.connects_per_sec | r(1) | split(".")[0]),
        ((.server.rss_per_conn_bytes // null) | if . == null then "" else (. / 1024 | r(10)) end),
        (if $d.reconnect_resumed_per_sec then "" else
           ($d.server_idle_cpu_us_per_conn_per_sec // .server.idle_cpu_us_per_conn_per_sec) | r(100) end),
        ($d.reconnect_resumed_per_sec | r(1) | split(".")[0]),
        ($d.reconnect_full_per_sec | r(1) | split(".")[0]),
        (if $d.reconnect_full_per_sec then ($d.reconnect_resumed_per_sec / $d.reconnect_full_per_sec | r(100)) else "" end),
        (if $d.server_cpu_ms_per_resumed_connect then
           ($d.server_cpu_ms_per_resumed_connect | r(100)) + " / " + ($d.server_cpu_ms_per_full_connect | r(100))
         else "" end),
        (if $d.generator_cpu_ms_per_resumed_connect then
           ($d.generator_cpu_ms_per_resumed_connect | r(100)) + " / " + ($d.generator_cpu_ms_per_full_connect | r(100))
         else "" end) ]
    | "| " + join(" | ") + " |"' "$f"
}
cpu() { # file: the window CPU per delivery, or nothing
  [ -f "$OUT/$1" ] && jq -r "$WINDOW_CPU // empty" "$OUT/$1"
}
[ -f "$OUT/pairs" ] && PAIRS=$(cat "$OUT/pairs")
if [ "$PAIRS" -gt 0 ]; then
  {
    echo "| rate | round | Tutti raw QUIC (us per delivery) | Socket.IO wss:// (us per delivery) | ratio |"
    echo "| --- | --- | --- | --- | --- |"
    for rate in 40k 10k; do
      ratios=()
      for r in $(seq "$PAIRS"); do
        t=$(cpu "tutti-quic-$rate-$r.json"); w=$(cpu "sio-wss-$rate-$r.json")
        if [ -n "$t" ] && [ -n "$w" ]; then
          ratio=$(awk -v t="$t" -v w="$w" 'BEGIN { printf "%.2f", t / w }')
          ratios+=("$ratio")
          awk -v rate="$rate" -v r="$r" -v t="$t" -v w="$w" -v q="$ratio" \
            'BEGIN { printf "| %s/s | %s | %.1f | %.1f | %s |\n", rate, r, t, w, q }'
        else
          echo "| $rate/s | $r | ${t:-(no report)} | ${w:-(no report)} | |"
        fi
      done
      if ((${#ratios[@]})); then
        printf '%s\n' "${ratios[@]}" | awk -v rate="$rate" \
          '{ s += $1; n++ } END { printf "| %s/s | mean of %d | | | %.2f |\n", rate, n, s / n }'
      fi
    done
  } | tee "$OUT/table.md"
  log "reports in $OUT"
  exit 0
fi
# Each table is printed when its part ran (or, with --table, left reports).
some() { # files...: whether any of these reports exists
  local f
  for f in "$@"; do [ -f "$OUT/$f" ] && return 0; done
  return 1
}
{
  if [ "$CHAT" = 1 ] && some tutti-quic-10k.json sio-ws-10k.json tutti-quic-40k.json; then
    echo "| run | server CPU per delivery (us, measured window) | deliveries/s | p50 ms | p99 ms |"
    echo "| --- | --- | --- | --- | --- |"
    for r in "Tutti raw QUIC, 10k|tutti-quic-10k" "Tutti WebTransport, 10k|tutti-wt-10k" \
             "Socket.IO ws://, 10k|sio-ws-10k" "Socket.IO wss://, 10k|sio-wss-10k" \
             "Tutti raw QUIC, 40k|tutti-quic-40k" "Tutti WebTransport, 40k|tutti-wt-40k" \
             "Socket.IO ws://, 40k|sio-ws-40k" "Socket.IO wss://, 40k|sio-wss-40k"; do
      row "${r%%|*}" "${r#*|}.json"
    done
  fi
  if [ "$KNEE" = 1 ] && some tutti-knee.json sio-knee-ws.json sio-knee-wss.json; then
    echo
    echo "| knee | deliveries/s | server CPU per delivery at the knee (us) |"
    echo "| --- | --- | --- |"
    for r in "Tutti raw QUIC, shared cores|tutti-knee" "Socket.IO ws://, shared cores|sio-knee-ws" \
             "Socket.IO wss://, shared cores|sio-knee-wss" "Tutti raw QUIC, pinned|tutti-knee-pinned" \
             "Socket.IO ws://, pinned|sio-knee-ws-pinned" "Socket.IO wss://, pinned|sio-knee-wss-pinned"; do
      knee "${r%%|*}" "${r#*|}.json"
    done
  fi
  if [ "$CONNECTS" = 1 ] && some tutti-idle-quic.json tutti-idle-wt.json tutti-reconnect-ecdsa.json; then
    echo
    echo "| connects | connect rate (/s) | server memory per connection (KiB) | server CPU per idle connection (us/s) | resumed reconnects (/s) | full reconnects (/s) | resumed / full | server CPU per connect, resumed / full (ms) | generator CPU per connect, resumed / full (ms) |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for r in "Tutti raw QUIC, 10,000 idle|tutti-idle-quic" "Tutti WebTransport, 3,000 idle|tutti-idle-wt" \
             "Socket.IO ws://, 10,000 idle|sio-idle-ws" "Socket.IO wss://, 10,000 idle|sio-idle-wss" \
             "Tutti raw QUIC, mass reconnect, ECDSA P-256|tutti-reconnect-ecdsa" \
             "Tutti raw QUIC, mass reconnect, RSA-2048|tutti-reconnect-rsa"; do
      connects "${r%%|*}" "${r#*|}.json"
    done
  fi
} | tee "$OUT/table.md"
log "reports in $OUT"

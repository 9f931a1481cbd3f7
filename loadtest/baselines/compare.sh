#!/usr/bin/env bash
# Tutti vs Socket.IO, back to back on this machine, with the same scenario files.
#
#   loadtest/baselines/compare.sh [--quick] [--skip-build] [--only tutti|socketio]
#
# 1. builds: `cargo build --release -p tutti -p tutti-load` (repo root) and `npm ci` in
#    loadtest/baselines/socketio;
# 2. runs Tutti (`tutti-load run loadtest/scenarios/X.toml --spawn --spawn-dir DIR --json OUT`)
#    and then Socket.IO (`node load.js --scenario-file loadtest/scenarios/X.toml --json OUT`)
#    for X = chat-fanout, knee, idle; both read the very same TOML files;
# 3. runs Tutti's chat-fanout once more with its data on disk (DISK_DIR);
# 4. prints a side-by-side table with the targets marked met / not met.
#
# Socket.IO keeps nothing; Tutti commits every chat message with an fsync. So that
# the table compares the real-time paths, Tutti's data goes to DIR = $TUTTI_SPAWN_DIR
# (default /dev/shm, a tmpfs, when it exists); step 3 shows what the disk adds
# (DISK_DIR = $TUTTI_DISK_DIR, default loadtest/results/, on the repository's disk).
#
# --quick   shortened copies of the three scenario files (short warm-up and windows, at
#           most 4 knee steps, at most 2,000 idle connections), for a sanity check only.
# Results: loadtest/results/compare-<UTC time>/ (one JSON per system and scenario,
# the scenario files used, machine load, the table as table.txt).
# Every run is bounded by `timeout`; only loopback addresses are used.

set -euo pipefail

QUICK=0
BUILD=1
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --skip-build) BUILD=0 ;;
    --only) shift; ONLY="${1:-}" ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SIO="$ROOT/loadtest/baselines/socketio"
SCEN="$ROOT/loadtest/scenarios"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$ROOT/loadtest/results/compare-$STAMP"
TUTTI_LOAD="$ROOT/target/release/tutti-load"
if [ -z "${TUTTI_SPAWN_DIR:-}" ]; then
  if [ -d /dev/shm ]; then TUTTI_SPAWN_DIR=/dev/shm; else TUTTI_SPAWN_DIR="${TMPDIR:-/tmp}"; fi
fi
TUTTI_DISK_DIR="${TUTTI_DISK_DIR:-$ROOT/loadtest/results}"
mkdir -p "$OUT/scenarios"

log() { echo "[compare $(date -u +%H:%M:%S)] $*" >&2; }
machine() { echo "$(date -u +%FT%TZ) $1: $(cut -d' ' -f1-3 /proc/loadavg) (loadavg 1/5/15 min)" >> "$OUT/machine.txt"; }

command -v node >/dev/null || { echo "compare.sh: node is required" >&2; exit 1; }
for s in chat-fanout knee idle; do
  [ -f "$SCEN/$s.toml" ] || { echo "compare.sh: missing $SCEN/$s.toml" >&2; exit 1; }
done

if [ "$BUILD" = 1 ]; then
  if [ "$ONLY" != socketio ]; then
    log "cargo build --release -p tutti -p tutti-load"
    (cd "$ROOT" && cargo build --release -p tutti -p tutti-load)
  fi
  if [ "$ONLY" != tutti ]; then
    log "npm ci ($SIO)"
    (cd "$SIO" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
[ "$ONLY" = socketio ] || [ -x "$TUTTI_LOAD" ] || { echo "compare.sh: $TUTTI_LOAD not built" >&2; exit 1; }
[ "$ONLY" = tutti ] || [ -d "$SIO/node_modules/socket.io" ] || { echo "compare.sh: run npm ci in $SIO" >&2; exit 1; }

# The scenario files both systems run: the shipped ones, or shortened copies (--quick).
for s in chat-fanout knee idle; do
  if [ "$QUICK" = 1 ]; then
    node - "$SCEN/$s.toml" "$OUT/scenarios/$s.toml" "$SIO" <<'EOF'
const [src, dst, sio] = process.argv.slice(2);
const fs = require('node:fs');
const TOML = require(require.resolve('smol-toml', { paths: [sio] }));
const t = TOML.parse(fs.readFileSync(src, 'utf8'));
t.chat = t.chat || {};
if (t.kind === 'chat_fanout' || t.kind === 'knee') {
  Object.assign(t.chat, { ramp_up: '1s', warm_up: '1s', measure: '3s', drain: '3s' });
}
if (t.kind === 'knee') {
  t.knee = t.knee || {};
  t.knee.step_warm_up = '1s';
  t.knee.step_measure = '3s';
  t.knee.max_steps = Math.min(t.knee.max_steps ?? 8, 4);
}
if (t.kind === 'idle') {
  t.idle = t.idle || {};
  t.idle.connections = Math.min(t.idle.connections ?? 1000, 2000);
  t.idle.hold = '2s';
  t.idle.ramp_up = '0s';
}
fs.writeFileSync(dst, '# --quick copy of ' + src + '\n' + TOML.stringify(t) + '\n');
EOF
  else
    cp "$SCEN/$s.toml" "$OUT/scenarios/$s.toml"
  fi
done

# Time limits per run (seconds): generous, but every run ends.
limit() { case "$1" in chat-fanout) echo 900 ;; knee) echo 2400 ;; idle) echo 900 ;; esac; }

# run_tutti SCENARIO [NAME DIR]: NAME names the output files, DIR holds the data.
run_tutti() {
  local s="$1" name="${2:-$1}" dir="${3:-$TUTTI_SPAWN_DIR}"
  local f="$OUT/tutti-$name.json"
  machine "before tutti $name"
  log "tutti-load run $s (data in $dir)"
  local rc=0
  (cd "$ROOT" && timeout --kill-after=10 "$(limit "$s")" "$TUTTI_LOAD" run "$OUT/scenarios/$s.toml" --spawn --spawn-dir "$dir" --json "$f") \
    > "$OUT/tutti-$name.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || log "tutti $name exited $rc (1: an SLO failed or an error; the JSON, if any, is kept), see $OUT/tutti-$name.log"
}

run_socketio() {
  local s="$1" f="$OUT/socketio-$1.json"
  machine "before socketio $s"
  log "socket.io load.js $s"
  local rc=0
  (cd "$SIO" && timeout --kill-after=10 "$(limit "$s")" node load.js --scenario-file "$OUT/scenarios/$s.toml" --json "$f") \
    > "$OUT/socketio-$s.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || log "socket.io $s exited $rc (an error), see $OUT/socketio-$s.log"
}

# Tutti's three, then Socket.IO's three: each system runs alone on the machine.
if [ "$ONLY" != socketio ]; then
  for s in chat-fanout knee idle; do run_tutti "$s"; sleep 2; done
  mkdir -p "$TUTTI_DISK_DIR"
  run_tutti chat-fanout chat-fanout-disk "$TUTTI_DISK_DIR"; sleep 2
fi
if [ "$ONLY" != tutti ]; then for s in chat-fanout knee idle; do run_socketio "$s"; sleep 2; done; fi
machine "end"

# The table (node: it is needed for the baseline anyway and reads missing keys gracefully).
node - "$OUT" "$QUICK" <<'EOF' | tee "$OUT/table.txt"
const fs = require('node:fs');
const [out, quick] = process.argv.slice(2);
const load = (f) => { try { return JSON.parse(fs.readFileSync(`${out}/${f}`, 'utf8')); } catch { return null; } };
const get = (o, p) => p.split('.').reduce((x, k) => (x == null ? undefined : x[k]), o);
const T = { chat: load('tutti-chat-fanout.json'), knee: load('tutti-knee.json'), idle: load('tutti-idle.json'),
  disk: load('tutti-chat-fanout-disk.json') };
const S = { chat: load('socketio-chat-fanout.json'), knee: load('socketio-knee.json'), idle: load('socketio-idle.json') };
const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : null);
const connRate = (r) => {
  if (!r) return null;
  const c = num(get(r, 'connections.connects_per_sec'));
  if (c !== null) return c;
  const e = num(get(r, 'connections.established')); const s = num(get(r, 'connections.connect_secs'));
  return e !== null && s ? e / s : null;
};
const idleConns = (r) => num(get(r, 'connections.attempted'));
const rows = [
  { name: 'p99 latency, chat fan-out (ms)', t: num(get(T.chat, 'latency_ms.p99')), s: num(get(S.chat, 'latency_ms.p99')),
    fmt: (x) => x.toFixed(3), target: 'Tutti <= Socket.IO', met: (t, s) => t <= s },
  { name: '  Tutti with its data on disk (ms)', t: num(get(T.disk, 'latency_ms.p99')), s: null, fmt: (x) => x.toFixed(3) },
  { name: '  Tutti group commit p99/max (ms)',
    t: [T.chat, T.disk].map((r) => [num(get(r, 'server.latency_ms.commit.p99_ms')), num(get(r, 'server.latency_ms.commit.max_ms'))]),
    s: null, fmt: (x) => x.map(([p, m]) => (p === null ? '-' : `${p.toFixed(1)}/${m.toFixed(0)}`)).join(' ') },
  { name: '  at deliveries/s (achieved)', t: num(get(T.chat, 'throughput.deliveries_per_sec')), s: num(get(S.chat, 'throughput.deliveries_per_sec')),
    fmt: (x) => Math.round(x).toLocaleString('en-US') },
  { name: 'knee (deliveries/s)', t: num(get(T.knee, 'knee.deliveries_per_sec')), s: num(get(S.knee, 'knee.deliveries_per_sec')),
    fmt: (x) => Math.round(x).toLocaleString('en-US'), target: 'Tutti >= 2x Socket.IO', met: (t, s) => t >= 2 * s },
  { name: 'memory per idle connection (KiB)', t: num(get(T.idle, 'server.rss_per_conn_bytes')), s: num(get(S.idle, 'server.rss_per_conn_bytes')),
    fmt: (x) => (x / 1024).toFixed(1), target: 'Tutti <= Socket.IO', met: (t, s) => t <= s },
  { name: '  idle connections', t: idleConns(T.idle), s: idleConns(S.idle), fmt: (x) => x.toLocaleString('en-US') },
  { name: 'connect rate (connects/s)', t: connRate(T.idle), s: connRate(S.idle),
    fmt: (x) => Math.round(x).toLocaleString('en-US'), target: 'Tutti >= Socket.IO', met: (t, s) => t >= s },
  { name: '  connect time (s)', t: num(get(T.idle, 'connections.connect_secs')), s: num(get(S.idle, 'connections.connect_secs')), fmt: (x) => x.toFixed(2) },
  { name: 'lost, chat fan-out', t: num(get(T.chat, 'messages.lost')), s: num(get(S.chat, 'messages.lost')), fmt: String },
  { name: 'lost, knee step shown', t: num(get(T.knee, 'messages.lost')), s: num(get(S.knee, 'messages.lost')), fmt: String },
  { name: 'dropped connections (chat/knee/idle)',
    t: [T.chat, T.knee, T.idle].map((r) => num(get(r, 'connections.dropped'))), s: [S.chat, S.knee, S.idle].map((r) => num(get(r, 'connections.dropped'))),
    fmt: (x) => x.map((v) => (v === null ? '-' : v)).join('/') },
  { name: 'generator_bound (chat/knee)',
    t: [T.chat, T.knee].map((r) => get(r, 'generator.generator_bound')), s: [S.chat, S.knee].map((r) => get(r, 'generator.generator_bound')),
    fmt: (x) => x.map((v) => (v === undefined ? '-' : String(v))).join('/') },
  { name: 'server CPU, whole chat run (s)', t: num(get(T.chat, 'server.cpu_secs')), s: num(get(S.chat, 'server.cpu_secs')), fmt: (x) => x.toFixed(2) },
  { name: 'other processes\' CPU, chat (cores)', t: num(get(T.chat, 'machine.other_cpu_util')), s: num(get(S.chat, 'machine.other_cpu_util')), fmt: (x) => x.toFixed(2) },
];
const cell = (r, v) => (v === null || v === undefined ? 'n/a' : r.fmt(v));
const lines = [];
lines.push(`Tutti vs Socket.IO${quick === '1' ? ' (--quick: shortened runs, sanity check only)' : ''}, results in ${out}`);
const w = [38, 14, 14, 24, 8];
const row = (cs) => cs.map((c, i) => String(c).padEnd(w[i])).join(' ').trimEnd();
lines.push(row(['', 'Tutti', 'Socket.IO', 'target', 'verdict']));
lines.push(row(w.map((n) => '-'.repeat(n))));
let met = 0; let total = 0;
for (const r of rows) {
  let verdict = '';
  if (r.target) {
    total++;
    if (r.t === null || r.s === null) verdict = 'unknown';
    else if (r.met(r.t, r.s)) { verdict = 'met'; met++; } else verdict = 'NOT MET';
  }
  lines.push(row([r.name, cell(r, r.t), cell(r, r.s), r.target || '', verdict]));
}
lines.push('');
lines.push(`targets met: ${met}/${total}`);
lines.push('Tutti kept its data on tmpfs except in "data on disk"; group commit is shown for tmpfs, then disk.');
const ramp = get(T.idle, 'params.idle.ramp_up') ?? get(S.idle, 'params.ramp_up_secs');
if (ramp !== undefined && ramp !== null && !/^0(s|ms)?$/.test(String(ramp)) && ramp !== 0) {
  lines.push(`note: the idle scenario spreads connection starts over ramp_up = ${ramp}, so both connect rates are capped by the ramp;`,
    '      set [idle] ramp_up = "0s" in idle.toml for a connect-rate comparison.');
}
const other = [S.chat, S.knee].map((r) => num(get(r, 'machine.other_cpu_util'))).filter((x) => x !== null);
if (other.some((x) => x > 0.1)) lines.push(`note: other processes used up to ${Math.max(...other).toFixed(2)} cores during Socket.IO windows: numbers skewed.`);
try { lines.push('', 'machine load (loadavg 1/5/15 min):', fs.readFileSync(`${out}/machine.txt`, 'utf8').trimEnd()); } catch {}
console.log(lines.join('\n'));
EOF

#!/usr/bin/env node
// Load client for the Socket.IO baseline: chat fan-out, knee search and idle connections,
// with the same definitions as Tutti's `tutti-load` and the same JSON report keys.
//
//   node load.js --scenario-file ../../scenarios/chat-fanout.toml --json out.json
//   node load.js --scenario chat-fanout [--rate 10000] [--json out.json]
//   node load.js --scenario knee        [--start 10000 --factor 1.5] [--json out.json]
//   node load.js --scenario idle        [--conns 5000,10000] [--json out.json]
//
// Parameters come from defaults < a tutti-load scenario file (--scenario-file, the very
// TOML tutti-load reads) < flags. See README.md for every flag and the definitions:
// - `clients` connections in rooms of `room_size`; the sender is in its room, so one
//   send = room_size deliveries. The rate is total deliveries/s; each client sends
//   rate / (clients * room_size) messages/s on a fixed schedule.
// - Each payload is exactly `payload` bytes of ASCII: phase flag, sender, sequence number
//   and the send time in ms (performance.timeOrigin + performance.now(), sub-ms), padded
//   with 'x'. A whole room lives in one worker process, so the sender and every receiver
//   of a message read the same process clock.
// - Warm-up then a measured window: only messages whose scheduled send time falls in the
//   window count. After the window, sending stops and the run waits up to `drain` for the
//   rest; whatever is missing then is lost.
// - Latency percentiles by exact sorting of every sample (nearest rank).
// - Optional chat extras, off by default ([chat] typing_per_client, history_every,
//   prefill_messages): volatile typing indicators, history pages fetched with an ack, and
//   messages sent into every room before the warm-up (README.md, "Chat extras").
// - Optional address change ([chat] rebind_at, off by default): at warm-up end + rebind_at
//   every connected client drops its connection abruptly and reconnects at once, resuming
//   with Socket.IO's Connection State Recovery (README.md, "Address change").
// Every loop is bounded in count and time; only loopback addresses are accepted.

'use strict';

const { spawn, fork } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const os = require('node:os');
const { performance } = require('node:perf_hooks');

const wall = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const CLK_TCK = 100; // getconf CLK_TCK on Linux
const HISTORY_PAGE = 100; // messages server.js keeps per room and returns in one history page
const PREFILL_TIMEOUT_MS = 30000; // the prefill waits at most this long for its echoes
const PREFILL_WINDOW = 10; // prefill messages in flight per sending client

// ---------------------------------------------------------------- /proc readers

function procCpuSecs(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // after "(comm) ": field 3 is state; utime is field 14, stime field 15 (1-based)
    const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[14 - 3]) + Number(rest[15 - 3])) / CLK_TCK;
  } catch {
    return null;
  }
}

function procRssBytes(pid) {
  try {
    const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/^VmRSS:\s+(\d+)\s+kB/m);
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

// Busy CPU seconds of the whole machine (all cores) from /proc/stat: tells how much of
// the machine something other than the server and the generator used in the window.
function machineBusySecs() {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal: process-context time and
    // interrupt time (loopback TCP is partly processed in softirq, so that part is
    // the benchmark's own traffic, not another process)
    return { proc: (f[0] + f[1] + f[2] + (f[7] || 0)) / CLK_TCK, irq: (f[5] + f[6]) / CLK_TCK };
  } catch {
    return null;
  }
}

function loadavg() {
  return os.loadavg().map((x) => Math.round(x * 100) / 100);
}

// ---------------------------------------------------------------- parameters

const DEFAULTS = {
  scenario: 'chat-fanout',
  // [chat]
  clients: 1000,
  roomSize: 10,
  payload: 100,
  rate: 10000,          // total deliveries/s
  rampUp: 0,            // s: connection starts spread evenly over this
  warmup: 5,            // s
  duration: 20,         // s, the measured window
  drain: 5,             // s
  connectConcurrency: 256, // handshakes in flight at once, over all workers
  // optional extras of the chat fan-out (0 = off, and then nothing of them runs)
  typingPerClient: 0,   // typing indicators per second per client (volatile event "t")
  historyEvery: 0,      // s between two history fetches of a client (event "h" with an ack)
  prefillMessages: 0,   // "m" messages sent into each room before the warm-up (not measured)
  rebindAt: 0,          // s into the measured window: every client drops its connection and reconnects (0 = never)
  recovery: 1,          // with rebindAt: 1 = the server runs Connection State Recovery (--recovery 1), 0 = without
  // [knee]
  start: 10000,
  factor: 1.5,
  maxSteps: 8,
  bisections: 1,        // geometric bisections after the first failing step
  stepWarmup: null,     // s; null: --warmup
  stepDuration: null,   // s; null: --duration
  // [idle]
  conns: '5000,10000',
  idleRampUp: 0,
  hold: 5,              // s, idle connections held before the RSS reading
  // [slo] (tutti-load's defaults)
  deliveryPct: 99.99,   // delivered/expected must be above this (percent)
  p99LimitMs: 100,      // p99 must be below this
  stabilityPct: 99.9,   // (established - dropped)/attempted must be above this (percent)
  lateSendMs: 20,       // a send starting this much after its schedule is late
  lateSendsPct: 1,      // more late sends than this (percent) marks the run generator_bound
  // generator
  workers: 2,           // generator processes; rooms are split between them
  client: 'raw',        // raw | socket.io-client
  tls: 0,               // 1: the server speaks wss:// (TLS 1.3, an ECDSA P-256 certificate, as deployed)
  serverCpus: null,     // e.g. "0": run the server under `taskset -c` (pinned setup)
  connectTimeout: 10,   // s per connection
  // plumbing
  json: null,
  url: null,
  serverPid: null,
  scenarioFile: null,
  quiet: false,
};

const NUMERIC = new Set(Object.keys(DEFAULTS).filter((k) => typeof DEFAULTS[k] === 'number' || DEFAULTS[k] === null)
  .filter((k) => !['json', 'url', 'scenarioFile', 'serverCpus'].includes(k)));

// humantime-style durations as tutti-load writes them: "10s", "500ms", "1m 30s", "2min"
function parseDuration(v) {
  if (typeof v === 'number') return v;
  const units = { ns: 1e-9, us: 1e-6, 'µs': 1e-6, ms: 1e-3, s: 1, sec: 1, secs: 1, m: 60, min: 60, mins: 60, h: 3600 };
  let total = 0;
  let matched = '';
  for (const m of String(v).matchAll(/(\d+(?:\.\d+)?)\s*([a-zµ]+)/g)) {
    if (!(m[2] in units)) throw new Error(`bad duration unit in ${v}`);
    total += Number(m[1]) * units[m[2]];
    matched += m[0];
  }
  if (!matched) throw new Error(`bad duration ${v}`);
  return total;
}

function fromScenarioFile(file) {
  const TOML = require('smol-toml');
  const t = TOML.parse(fs.readFileSync(file, 'utf8'));
  const o = {};
  const kinds = { chat_fanout: 'chat-fanout', knee: 'knee', idle: 'idle' };
  if (!(t.kind in kinds)) throw new Error(`${file}: kind ${t.kind} has no Socket.IO equivalent`);
  o.scenario = kinds[t.kind];
  const c = t.chat || {};
  if (c.clients !== undefined) o.clients = c.clients;
  if (c.room_size !== undefined) o.roomSize = c.room_size;
  if (c.payload_bytes !== undefined) o.payload = c.payload_bytes;
  const clients = o.clients ?? DEFAULTS.clients;
  const roomSize = o.roomSize ?? DEFAULTS.roomSize;
  // tutti-load's default rate_per_client is 1.0
  o.rate = clients * (c.rate_per_client ?? 1.0) * roomSize;
  // tutti-load's [chat] defaults where the file is silent
  o.rampUp = parseDuration(c.ramp_up ?? '2s');
  o.warmup = parseDuration(c.warm_up ?? '2s');
  o.duration = parseDuration(c.measure ?? '10s');
  o.drain = parseDuration(c.drain ?? '5s');
  o.connectConcurrency = c.connect_concurrency ?? 64;
  if (c.typing_per_client !== undefined) o.typingPerClient = c.typing_per_client;
  if (c.history_every !== undefined) o.historyEvery = parseDuration(c.history_every);
  if (c.prefill_messages !== undefined) o.prefillMessages = c.prefill_messages;
  if (c.rebind_at !== undefined) o.rebindAt = parseDuration(c.rebind_at);
  const k = t.knee || {};
  o.start = k.start_deliveries_per_sec ?? 5000;
  o.factor = k.factor ?? 1.5;
  o.maxSteps = k.max_steps ?? 8;
  o.bisections = k.bisections ?? 1;
  o.stepWarmup = parseDuration(k.step_warm_up ?? '3s');
  o.stepDuration = parseDuration(k.step_measure ?? '10s');
  if (o.scenario === 'idle') {
    const i = t.idle || {};
    o.conns = String(i.connections ?? 1000);
    o.idleRampUp = parseDuration(i.ramp_up ?? '10s');
    o.hold = parseDuration(i.hold ?? '10s');
    o.connectConcurrency = i.connect_concurrency ?? 256;
  }
  const s = t.slo || {};
  if (s.message_delivery_pct !== undefined) o.deliveryPct = s.message_delivery_pct;
  if (s.latency_p99_ms !== undefined) o.p99LimitMs = s.latency_p99_ms;
  if (s.connection_stability_pct !== undefined) o.stabilityPct = s.connection_stability_pct;
  if (s.late_send_ms !== undefined) o.lateSendMs = s.late_send_ms;
  if (s.late_sends_pct !== undefined) o.lateSendsPct = s.late_sends_pct;
  o.scenarioName = t.name;
  return o;
}

function parseArgs(argv) {
  const cli = {};
  for (let i = 0; i < argv.length; i++) {
    const t = argv[i];
    if (!t.startsWith('--')) throw new Error(`unexpected argument ${t}`);
    const key = t.slice(2).replace(/-([a-z0-9])/g, (_, c) => c.toUpperCase());
    if (key === 'help') {
      console.log(fs.readFileSync(path.join(__dirname, 'README.md'), 'utf8'));
      process.exit(0);
    }
    if (key === 'quiet') { cli.quiet = true; continue; }
    if (!(key in DEFAULTS)) throw new Error(`unknown flag ${t}`);
    const v = argv[++i];
    if (v === undefined) throw new Error(`flag ${t} needs a value`);
    if (NUMERIC.has(key)) {
      const d = ['rampUp', 'warmup', 'duration', 'drain', 'stepWarmup', 'stepDuration', 'idleRampUp', 'hold', 'historyEvery', 'rebindAt'].includes(key)
        ? parseDuration(/^\d+(\.\d+)?$/.test(v) ? `${v}s` : v) : Number(v);
      if (!Number.isFinite(d)) throw new Error(`flag ${t}: not a number: ${v}`);
      cli[key] = d;
    } else {
      cli[key] = v;
    }
  }
  const file = cli.scenarioFile ? fromScenarioFile(cli.scenarioFile) : {};
  const a = { ...DEFAULTS, ...file, ...cli };
  if (a.stepWarmup === null) a.stepWarmup = a.warmup;
  if (a.stepDuration === null) a.stepDuration = a.duration;
  if (!['chat-fanout', 'knee', 'idle'].includes(a.scenario)) throw new Error(`unknown scenario ${a.scenario}`);
  if (!['raw', 'socket.io-client'].includes(a.client)) throw new Error('--client must be raw or socket.io-client');
  if (a.clients % a.roomSize !== 0) throw new Error('--clients must be a multiple of --room-size');
  if (a.payload < 48 || a.payload > 4096) throw new Error('--payload must be 48..4096 bytes');
  if (a.workers < 1 || a.workers > 16) throw new Error('--workers must be 1..16');
  if (![0, 1].includes(a.tls)) throw new Error('--tls must be 0 or 1');
  if (a.serverCpus !== null && !/^[0-9,-]+$/.test(String(a.serverCpus))) throw new Error('--server-cpus: a CPU list such as 0 or 0-1');
  if (a.factor <= 1) throw new Error('--factor must be above 1');
  if (a.maxSteps < 1 || a.maxSteps > 30) throw new Error('--max-steps must be 1..30');
  if (!Number.isInteger(a.bisections) || a.bisections < 0 || a.bisections > 8) throw new Error('--bisections must be 0..8');
  for (const k of ['warmup', 'duration', 'drain', 'stepWarmup', 'stepDuration', 'hold', 'rampUp', 'idleRampUp']) {
    if (a[k] < 0 || a[k] > 3600) throw new Error(`--${k}: 0..3600 s`);
  }
  if (a.duration <= 0 || a.stepDuration <= 0) throw new Error('the measured window must be longer than zero');
  if (!(a.typingPerClient >= 0 && a.typingPerClient <= 100)) throw new Error('--typing-per-client (typing_per_client): 0..100 per second');
  if (!(a.historyEvery === 0 || (a.historyEvery >= 0.01 && a.historyEvery <= 3600))) throw new Error('--history-every (history_every): 0 (off) or 10ms..3600s');
  if (!(Number.isInteger(a.prefillMessages) && a.prefillMessages >= 0 && a.prefillMessages <= 10000)) throw new Error('--prefill-messages (prefill_messages): an integer 0..10000');
  // as tutti-load: the address change must fall inside the measured window
  if (!(a.rebindAt >= 0 && (a.rebindAt === 0 || a.scenario !== 'chat-fanout' || a.rebindAt < a.duration))) {
    throw new Error('--rebind-at (rebind_at): 0 (off) or a time inside the measured window (below --duration / measure)');
  }
  if (![0, 1].includes(a.recovery)) throw new Error('--recovery must be 0 or 1');
  if (a.url) {
    const u = new URL(a.url);
    // Loopback, or the namespaces of loadtest/impair/netns.sh (10.77.0.0/16).
    if (!(u.hostname === 'localhost' || u.hostname.startsWith('127.') || u.hostname === '[::1]' || u.hostname.startsWith('10.77.'))) {
      throw new Error(`refusing non-loopback url ${a.url}`);
    }
    if (!a.serverPid) throw new Error('--url needs --server-pid (for CPU and RSS)');
  }
  return a;
}

function log(a, ...m) {
  if (!a.quiet) console.error(`[${new Date().toISOString()}]`, ...m);
}

function round(x, d = 3) {
  if (x === null || x === undefined || !Number.isFinite(x)) return x ?? null;
  const f = 10 ** d;
  return Math.round(x * f) / f;
}

function pct(part, whole) {
  return whole === 0 ? 100 : (part * 100) / whole;
}

// ---------------------------------------------------------------- server process

// A self-signed ECDSA P-256 certificate for 127.0.0.1 (as Tutti's development
// certificate), made once per run with openssl in a temporary directory.
function makeCert() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sio-tls-'));
  const r = require('node:child_process').spawnSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'), '-days', '2',
    '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`openssl failed: ${r.stderr}`);
  return dir;
}

async function startServer(a) {
  if (a.url) return { url: a.url, pid: a.serverPid, stop: async () => {} };
  const args = [path.join(__dirname, 'server.js'), '--port', '0'];
  const certDir = a.tls ? makeCert() : null;
  if (certDir) args.push('--tls', certDir);
  // The chat extras' handlers exist in the server only when the run uses them, so that a
  // run without them costs the server exactly what it did before.
  if (a.scenario === 'chat-fanout') {
    if (a.typingPerClient > 0) args.push('--typing', '1');
    if (a.historyEvery > 0 || a.prefillMessages > 0) args.push('--history', String(HISTORY_PAGE));
    if (a.rebindAt > 0 && a.recovery === 1) args.push('--recovery', '1');
  }
  // Pinned: the server on its own CPUs (run load.js itself under `taskset -c` on the others).
  const [cmd, argv] = a.serverCpus !== null
    ? ['taskset', ['-c', String(a.serverCpus), process.execPath, ...args]]
    : [process.execPath, args];
  const child = spawn(cmd, argv, {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const info = await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error('server did not start within 15 s')), 15000);
    child.stdout.on('data', (d) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        try { resolve(JSON.parse(buf.slice(0, nl))); } catch (e) { reject(e); }
      }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited ${code}`)); });
  });
  child.removeAllListeners('exit');
  child.stdout.resume();
  return {
    url: `${a.tls ? 'https' : 'http'}://127.0.0.1:${info.port}`,
    // taskset execs node in place: the pid is the server's either way.
    pid: child.pid,
    stop: async () => {
      if (certDir) fs.rmSync(certDir, { recursive: true, force: true });
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const t0 = Date.now();
      while (child.exitCode === null && child.signalCode === null && Date.now() - t0 < 3000) await sleep(20);
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    },
  };
}

// ---------------------------------------------------------------- worker pool (master side)

class Worker {
  constructor(idx) {
    this.idx = idx;
    this.proc = fork(__filename, ['--worker'], { serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.waiters = [];
    this.proc.on('message', (m) => {
      const w = this.waiters.shift();
      if (!w) return;
      if (m && m.ev === 'error') w.reject(new Error(`worker ${idx}: ${m.error}`));
      else w.resolve(m);
    });
    this.proc.on('exit', (code) => {
      for (const w of this.waiters.splice(0)) w.reject(new Error(`worker ${idx} exited ${code}`));
    });
  }
  call(msg, timeoutMs) {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`worker ${this.idx}: no answer to ${msg.cmd} in ${timeoutMs} ms`)), timeoutMs);
      this.waiters.push({
        resolve: (m) => { clearTimeout(t); resolve(m); },
        reject: (e) => { clearTimeout(t); reject(e); },
      });
      this.proc.send(msg);
    });
  }
  async stop() {
    try { await this.call({ cmd: 'close' }, 5000); } catch { /* ignore */ }
    if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
  }
}

// Rooms are assigned whole to workers (room r -> worker r % W), so every delivery of a
// message is received by the process that sent it.
function assignRooms(a, nWorkers) {
  const per = Array.from({ length: nWorkers }, () => []);
  const nRooms = a.clients / a.roomSize;
  for (let r = 0; r < nRooms; r++) {
    for (let j = 0; j < a.roomSize; j++) per[r % nWorkers].push({ id: r * a.roomSize + j, room: `r${r}` });
  }
  return per;
}

async function connectAll(a, workers, url, per, rampSecs, concurrency) {
  const longest = Math.max(...per.map((p) => p.length));
  const totalTimeout = (rampSecs + a.connectTimeout + 10) * 1000 + 5 * longest;
  const t0 = wall() + 100;
  const res = await Promise.all(workers.map((w, i) => w.call({
    cmd: 'connect', url, clients: per[i], impl: a.client, t0, rampMs: rampSecs * 1000,
    concurrency: Math.max(1, Math.ceil(concurrency / workers.length)),
    timeoutMs: a.connectTimeout * 1000, roomSize: a.roomSize,
    // clients that understand typing frames and history acks (only when the run uses them)
    extras: a.scenario === 'chat-fanout' && (a.typingPerClient > 0 || a.historyEvery > 0),
  }, totalTimeout)));
  const attempted = res.reduce((s, r) => s + r.attempted, 0);
  const established = res.reduce((s, r) => s + r.established, 0);
  const first = Math.min(...res.map((r) => r.firstStart));
  const last = Math.max(...res.map((r) => r.lastDone));
  const secs = Math.max(0, (last - first) / 1000);
  return {
    attempted, established, dropped: 0, connect_secs: round(secs, 3),
    connects_per_sec: secs > 0 ? round(established / secs, 1) : null,
    errors: res.flatMap((r) => r.errors).slice(0, 5),
  };
}

function percentiles(samples) {
  const n = samples.length;
  if (n === 0) return { p50: null, p90: null, p99: null, p999: null, max: null, mean: null };
  samples.sort();
  const q = (p) => samples[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))];
  let sum = 0;
  for (let i = 0; i < n; i++) sum += samples[i];
  return {
    p50: round(q(0.5), 4), p90: round(q(0.9), 4), p99: round(q(0.99), 4), p999: round(q(0.999), 4),
    max: round(samples[n - 1], 4), mean: round(sum / n, 4),
  };
}

function concat(arrays) {
  const out = new Float64Array(arrays.reduce((s, x) => s + x.length, 0));
  let o = 0;
  for (const x of arrays) { out.set(x, o); o += x.length; }
  return out;
}

// A server plus connected clients in their rooms; phases at different rates reuse it.
async function setupWorld(a) {
  const server = await startServer(a);
  const workers = Array.from({ length: a.workers }, (_, i) => new Worker(i));
  const world = {
    server, workers, per: assignRooms(a, a.workers), phases: 0,
    serverCpu0: procCpuSecs(server.pid), selfCpu0: process.cpuUsage(),
    teardown: async () => { await Promise.all(workers.map((w) => w.stop())); await server.stop(); },
  };
  try {
    world.conn = await connectAll(a, workers, server.url, world.per, a.rampUp, a.connectConcurrency);
    log(a, `connected ${world.conn.established}/${world.conn.attempted} in ${world.conn.connect_secs} s`);
    if (world.conn.established !== world.conn.attempted) {
      throw new Error(`only ${world.conn.established}/${world.conn.attempted} connected: ${JSON.stringify(world.conn.errors)}`);
    }
  } catch (e) {
    await world.teardown();
    throw e;
  }
  return world;
}

// CPU over the whole run, as tutti-load counts it (from before the first connect to the
// end of the last drain): the server's, and the generator's (master + workers).
async function runCpu(world) {
  const st = await Promise.all(world.workers.map((w) => w.call({ cmd: 'status' }, 10000)));
  const s1 = procCpuSecs(world.server.pid);
  const self = process.cpuUsage(world.selfCpu0);
  return {
    server: s1 !== null && world.serverCpu0 !== null ? s1 - world.serverCpu0 : null,
    generator: st.reduce((x, y) => x + y.cpuSecs, 0) + (self.user + self.system) / 1e6,
  };
}

function applyRunCpu(r, cpu) {
  r.server = { ...r.server, window_cpu_secs: r.server.cpu_secs, cpu_secs: round(cpu.server, 2) };
  r.generator = { ...r.generator, window_cpu_secs: r.generator.cpu_secs, cpu_secs: round(cpu.generator, 2) };
}

// One phase at `rate` deliveries/s: warm-up, measured window, drain. `extra` (chat
// fan-out only): { typingPerClient, historyEvery, rebindAt } of the optional typing
// indicators, history fetches and address change; null or zeros: none.
async function phase(a, world, rate, warmSecs, durSecs, extra = null) {
  const { server, workers, per } = world;
  const phaseNo = ++world.phases;
  const established = world.conn.established;
  const perClient = rate / (established * a.roomSize); // messages/s per client
  const t0 = wall() + 300;
  const warmMs = warmSecs * 1000;
  const durMs = durSecs * 1000;
  const mStart = t0 + warmMs;
  const mEnd = mStart + durMs;
  const typingPerSec = extra ? extra.typingPerClient : 0;
  const historyEveryMs = extra ? extra.historyEvery * 1000 : 0;
  // the address change, in ms after t0 (warm-up + rebind_at); 0: none
  const rebindMs = extra && extra.rebindAt > 0 ? warmMs + extra.rebindAt * 1000 : 0;
  const runP = Promise.all(workers.map((w, i) => w.call({
    cmd: 'run', phase: phaseNo, t0, warmMs, durMs, drainMs: a.drain * 1000,
    sendsPerSec: perClient * per[i].length, payload: a.payload, roomSize: a.roomSize, lateSendMs: a.lateSendMs,
    typingPerSec, historyEveryMs, rebindMs, rebindTimeoutMs: a.connectTimeout * 1000 + 5000,
  }, warmMs + durMs + a.drain * 1000 + (rebindMs > 0 ? a.connectTimeout * 1000 + 5000 : 0) + 60000)));
  await sleep(Math.max(0, mStart - wall()));
  const cpu0 = procCpuSecs(server.pid);
  const busy0 = machineBusySecs();
  const self0 = process.cpuUsage();
  const load0 = loadavg();
  await sleep(Math.max(0, mEnd - wall()));
  const cpu1 = procCpuSecs(server.pid);
  const busy1 = machineBusySecs();
  const self1 = process.cpuUsage(self0);
  const rss = procRssBytes(server.pid);
  const res = await runP;

  const sum = (f) => res.reduce((s, r) => s + r[f], 0);
  const sent = sum('sent');
  const expected = sum('expected');
  const delivered = sum('delivered');
  const dropped = sum('dropped');
  const late = sum('late');
  const lat = percentiles(concat(res.map((r) => r.samples)));
  const behindMax = Math.max(0, ...res.map((r) => r.behindMax));
  const genCpu = sum('cpuSecs');
  const serverCpu = cpu0 !== null && cpu1 !== null ? cpu1 - cpu0 : null;
  const selfCpu = (self1.user + self1.system) / 1e6;
  const busy = busy0 !== null && busy1 !== null ? busy1.proc - busy0.proc : null;
  const irq = busy0 !== null && busy1 !== null ? busy1.irq - busy0.irq : null;
  const other = busy !== null && serverCpu !== null ? Math.max(0, busy - serverCpu - genCpu - selfCpu) : null;
  const generatorBound = sent > 0 && pct(late, sent) > a.lateSendsPct;
  const deliveredPct = pct(Math.min(delivered, expected), expected);
  const newlyDropped = dropped - (world.dropped || 0);
  world.dropped = dropped;
  const pass = expected > 0 && deliveredPct > a.deliveryPct && lat.p99 !== null && lat.p99 < a.p99LimitMs && newlyDropped === 0;
  const extras = {};
  if (typingPerSec > 0) {
    const t = res.map((r) => r.typing);
    const tSum = (f) => t.reduce((s, x) => s + x[f], 0);
    const tExp = tSum('expected');
    const tRecv = tSum('received');
    const tl = percentiles(concat(t.map((x) => x.samples)));
    extras.typing = {
      sent: tSum('sent'), expected: tExp, received: tRecv, delivery_pct: round(pct(tRecv, tExp), 4),
      latency_ms: { p50: tl.p50, p90: tl.p90, p99: tl.p99, p999: tl.p999, max: tl.max },
    };
  }
  if (historyEveryMs > 0) {
    const h = res.map((r) => r.history);
    const hSum = (f) => h.reduce((s, x) => s + x[f], 0);
    const hl = percentiles(concat(h.map((x) => x.samples)));
    extras.history = {
      pages: hSum('pages'), errors: hSum('errors'), bytes: hSum('bytes'),
      latency_ms: { p50: hl.p50, p99: hl.p99, max: hl.max },
    };
  }
  if (rebindMs > 0) {
    const b = res.map((r) => r.rebind);
    const bSum = (f) => b.reduce((s, x) => s + x[f], 0);
    const bl = percentiles(concat(b.map((x) => x.ms)));
    extras.rebind = {
      at_secs: round(rebindMs / 1000, 3), clients: bSum('clients'), reconnected: bSum('reconnected'),
      recovered: bSum('recovered'), reconnect_ms: { p50: bl.p50, p99: bl.p99, max: bl.max },
      failed: bSum('failed'), replayed_messages: bSum('replayed'),
    };
    const errs = b.flatMap((x) => x.errors).slice(0, 5);
    if (errs.length > 0) log(a, `  rebind errors: ${JSON.stringify(errs)}`);
  }
  return {
    rate,
    connections: { ...world.conn, dropped },
    messages: { sent, expected, delivered, lost: Math.max(0, expected - delivered), duplicated: sum('duplicated'), out_of_order: sum('outOfOrder') },
    throughput: { deliveries_per_sec: round(delivered / durSecs, 1), sends_per_sec: round(sent / durSecs, 1) },
    latency_ms: lat,
    ...extras,
    server: {
      pid: server.pid, cpu_secs: round(serverCpu, 2),
      cpu_util: serverCpu !== null ? round(serverCpu / durSecs, 3) : null,
      // The first figure of a comparison: server CPU per delivery over the measured window.
      cpu_us_per_delivery: serverCpu !== null && delivered > 0 ? round((serverCpu * 1e6) / delivered, 2) : null,
      rss_bytes: rss, rss_per_conn_bytes: rss !== null ? Math.round(rss / established) : null,
    },
    generator: {
      cpu_secs: round(genCpu, 2), cpu_util: round(genCpu / durSecs, 3), workers: a.workers, client: a.client,
      behind_schedule_max_ms: round(behindMax, 3), late_sends: late, late_sends_pct: round(pct(late, sent), 3),
      generator_bound: generatorBound,
    },
    machine: {
      cores: os.cpus().length, loadavg_at_start: load0,
      busy_cpu_util: busy !== null ? round((busy + irq) / durSecs, 3) : null,
      irq_cpu_util: irq !== null ? round(irq / durSecs, 3) : null,
      other_cpu_util: other !== null ? round(other / durSecs, 3) : null,
    },
    delivered_pct: round(deliveredPct, 4),
    newly_dropped: newlyDropped,
    pass,
  };
}

function report(a, kind, params, body) {
  return {
    system: 'socketio',
    scenario: a.scenarioName || { 'chat-fanout': 'chat-fanout', knee: 'knee', idle: 'idle' }[a.scenario],
    kind,
    transport: 'websocket',
    date: new Date().toISOString(),
    params,
    ...body,
    host: { node: process.version, cpus: os.cpus().length, loadavg_at_end: loadavg() },
  };
}

function fanoutParams(a) {
  return {
    clients: a.clients, room_size: a.roomSize, payload_bytes: a.payload,
    rate_per_client: a.rate / (a.clients * a.roomSize), deliveries_per_sec: a.rate,
    ramp_up_secs: a.rampUp, warmup_secs: a.warmup, duration_secs: a.duration, drain_secs: a.drain,
    connect_concurrency: a.connectConcurrency, workers: a.workers, client: a.client,
    slo: { message_delivery_pct: a.deliveryPct, latency_p99_ms: a.p99LimitMs, late_send_ms: a.lateSendMs, late_sends_pct: a.lateSendsPct },
    percentiles: 'exact (every sample sorted, nearest rank)',
    scenario_file: a.scenarioFile,
  };
}

function strip(r) {
  const { rate: _r, delivered_pct: _d, newly_dropped: _n, ...b } = r;
  return b;
}

// Before the warm-up: the first connected member of every room sends `prefillMessages`
// "m" messages (flag 'P': no count ever includes them) and waits for its own copies,
// so that the server's history ring of each room is full. Bounded by PREFILL_TIMEOUT_MS.
async function prefillAll(a, world) {
  const t0 = wall();
  const res = await Promise.all(world.workers.map((w) => w.call({
    cmd: 'prefill', count: a.prefillMessages, payload: a.payload, timeoutMs: PREFILL_TIMEOUT_MS, window: PREFILL_WINDOW,
  }, PREFILL_TIMEOUT_MS + 10000)));
  const sum = (f) => res.reduce((s, r) => s + r[f], 0);
  const out = {
    messages_per_room: a.prefillMessages, rooms: sum('rooms'), sent: sum('sent'), echoed: sum('echoed'),
    secs: round((wall() - t0) / 1000, 3), complete: res.every((r) => r.complete),
  };
  log(a, `prefill: ${out.echoed}/${out.rooms * a.prefillMessages} messages back in ${out.secs} s${out.complete ? '' : ' (TIMED OUT)'}`);
  return out;
}

async function scenarioChat(a) {
  log(a, `chat-fanout: ${a.clients} clients, rooms of ${a.roomSize}, ${a.rate} deliveries/s, ${a.warmup}+${a.duration} s, load ${loadavg()}`);
  if (a.typingPerClient > 0 || a.historyEvery > 0 || a.prefillMessages > 0) {
    log(a, `  extras: typing ${a.typingPerClient}/s per client, history every ${a.historyEvery} s, prefill ${a.prefillMessages} messages per room`);
  }
  if (a.rebindAt > 0) log(a, `  address change ${a.rebindAt} s into the window: every client reconnects, connection state recovery ${a.recovery ? 'on' : 'off'}`);
  const world = await setupWorld(a);
  let r;
  let pre = null;
  try {
    if (a.prefillMessages > 0) pre = await prefillAll(a, world);
    r = await phase(a, world, a.rate, a.warmup, a.duration, { typingPerClient: a.typingPerClient, historyEvery: a.historyEvery, rebindAt: a.rebindAt });
    applyRunCpu(r, await runCpu(world));
  } finally {
    await world.teardown();
  }
  log(a, `  -> p99 ${r.latency_ms.p99} ms, lost ${r.messages.lost}, server cpu ${r.server.cpu_util} (${r.server.cpu_us_per_delivery} us/delivery), generator cpu ${r.generator.cpu_util}, other cpu ${r.machine.other_cpu_util}`);
  if (r.typing) log(a, `  typing: ${r.typing.received}/${r.typing.expected} (${r.typing.delivery_pct} %), p99 ${r.typing.latency_ms.p99} ms`);
  if (r.history) log(a, `  history: ${r.history.pages} pages, ${r.history.errors} errors, ${r.history.bytes} bytes, p99 ${r.history.latency_ms.p99} ms`);
  if (r.rebind) log(a, `  rebind: ${r.rebind.reconnected}/${r.rebind.clients} reconnected, ${r.rebind.recovered} recovered, ${r.rebind.replayed_messages} messages replayed, reconnect p50 ${r.rebind.reconnect_ms.p50} ms, max ${r.rebind.reconnect_ms.max} ms`);
  const stable = pct(r.connections.established - r.connections.dropped, r.connections.attempted);
  r.pass = r.pass && stable > a.stabilityPct;
  // the extras appear in the report only when used (a run without them: the same shape as before)
  const params = fanoutParams(a);
  if (a.typingPerClient > 0) params.typing_per_client = a.typingPerClient;
  if (a.historyEvery > 0) { params.history_every_secs = a.historyEvery; params.history_page_messages = HISTORY_PAGE; }
  if (a.prefillMessages > 0) params.prefill_messages = a.prefillMessages;
  if (a.rebindAt > 0) { params.rebind_at_secs = a.rebindAt; params.connection_state_recovery = a.recovery === 1; }
  const body = strip(r);
  if (pre) body.prefill = pre;
  return report(a, 'chat_fanout', params, body);
}

async function scenarioKnee(a) {
  log(a, `knee: ${a.clients} clients, rooms of ${a.roomSize}, from ${a.start} deliveries/s x${a.factor}, steps ${a.stepWarmup}+${a.stepDuration} s, load ${loadavg()}`);
  if (a.typingPerClient > 0 || a.historyEvery > 0 || a.prefillMessages > 0 || a.rebindAt > 0) {
    log(a, '  note: typing_per_client, history_every, prefill_messages and rebind_at apply to chat fan-out only; ignored here');
  }
  const world = await setupWorld(a);
  const steps = [];
  let best = null;
  let last = null;
  let lo = null;
  let hi = null;
  const runStep = async (rate) => {
    if (world.phases > 0) {
      // a failed step may leave a backlog in the server: let it flush before the next step
      const q = await Promise.all(world.workers.map((w) => w.call({ cmd: 'quiesce', quietMs: 1000, maxMs: 60000 }, 70000)));
      const waited = Math.max(...q.map((x) => x.waitedMs));
      if (waited > 1500) log(a, `  waited ${(waited / 1000).toFixed(1)} s for the previous step's backlog to flush (quiet: ${q.every((x) => x.quiet)})`);
    }
    const r = await phase(a, world, rate, a.stepWarmup, a.stepDuration);
    const step = {
      offered_deliveries_per_sec: round(rate, 1), deliveries_per_sec: r.throughput.deliveries_per_sec,
      p99_ms: r.latency_ms.p99 ?? -1, lost: r.messages.lost, dropped: r.newly_dropped,
      generator_bound: r.generator.generator_bound, pass: r.pass,
      duplicated: r.messages.duplicated, out_of_order: r.messages.out_of_order,
      server_cpu_util: r.server.cpu_util, server_cpu_us_per_delivery: r.server.cpu_us_per_delivery,
      generator_cpu_util: r.generator.cpu_util,
      other_cpu_util: r.machine.other_cpu_util, behind_schedule_max_ms: r.generator.behind_schedule_max_ms,
      loadavg_at_start: r.machine.loadavg_at_start,
    };
    steps.push(step);
    log(a, `  step ${steps.length}: ${Math.round(rate)}/s -> p99 ${step.p99_ms} ms, lost ${step.lost}, achieved ${step.deliveries_per_sec}/s, server cpu ${step.server_cpu_util} (${step.server_cpu_us_per_delivery} us/delivery), generator cpu ${step.generator_cpu_util}, other cpu ${step.other_cpu_util}, generator_bound ${step.generator_bound}: ${step.pass ? 'PASS' : 'FAIL'}`);
    return r;
  };
  try {
    let rate = a.start;
    for (let i = 0; i < a.maxSteps; i++) {
      const r = await runStep(rate);
      if (r.pass) { best = r; lo = rate; rate *= a.factor; } else { last = r; hi = rate; break; }
    }
    if (lo !== null && hi === null) log(a, `every step passed: the knee is above ${Math.round(lo)}/s (raise max_steps)`);
    // Geometric bisections, like the ladder (as tutti-load): each takes the square
    // root of the ratio between the last passing and the first failing rate.
    for (let i = 0; lo !== null && hi !== null && i < a.bisections; i++) {
      const mid = Math.sqrt(lo * hi);
      const r = await runStep(mid);
      if (r.pass) { best = r; lo = mid; } else { last = r; hi = mid; }
    }
    const cpu = await runCpu(world);
    for (const r of [best, last]) if (r) applyRunCpu(r, cpu);
  } finally {
    await world.teardown();
  }
  const shown = best || last;
  return report(a, 'knee', {
    ...fanoutParams(a), start_deliveries_per_sec: a.start, factor: a.factor, max_steps: a.maxSteps, bisections: a.bisections,
    step_warmup_secs: a.stepWarmup, step_duration_secs: a.stepDuration,
    rule: 'one set of connections; step the rate up by factor until a step fails (delivery <= slo, p99 >= slo, a dropped connection), then `bisections` geometric bisections; the knee is the achieved rate of the highest passing step; before each step, wait (at most 60 s) until no message has arrived for 1 s',
  }, {
    ...(shown ? strip(shown) : {}),
    knee: {
      deliveries_per_sec: best ? best.throughput.deliveries_per_sec : 0,
      offered_deliveries_per_sec: best ? round(best.rate, 1) : 0,
      steps,
    },
    pass: best !== null,
  });
}

async function scenarioIdle(a) {
  const ns = String(a.conns).split(',').map((x) => Number(x.trim())).filter((x) => x > 0);
  if (ns.length === 0 || ns.some((n) => !Number.isInteger(n) || n > 50000)) throw new Error('--conns: 1..50000');
  const runs = [];
  for (const n of ns) {
    const load0 = loadavg();
    log(a, `idle: ${n} connections (load ${load0})`);
    const server = await startServer(a);
    const workers = Array.from({ length: a.workers }, (_, i) => new Worker(i));
    try {
      await sleep(1000);
      const rss0 = procRssBytes(server.pid);
      const cpu0 = procCpuSecs(server.pid);
      const busy0 = machineBusySecs();
      const tc = wall();
      const per = Array.from({ length: a.workers }, () => []);
      for (let i = 0; i < n; i++) per[i % a.workers].push({ id: i, room: `r${Math.floor(i / a.roomSize)}` });
      const conn = await connectAll(a, workers, server.url, per, a.idleRampUp, a.connectConcurrency);
      const connWall = (wall() - tc) / 1000;
      const cpuC = procCpuSecs(server.pid);
      const busyC = machineBusySecs();
      const busyConn = busy0 !== null && busyC !== null ? busyC.proc + busyC.irq - busy0.proc - busy0.irq : null;
      log(a, `  connected ${conn.established}/${conn.attempted} in ${conn.connect_secs} s (${conn.connects_per_sec}/s)`);
      // what holding the connections costs: server and generator CPU over the last
      // two thirds of the hold (the first third lets the connects' tail settle), as
      // tutti-load measures it
      await sleep((a.hold * 1000) / 3);
      const st0 = await Promise.all(workers.map((w) => w.call({ cmd: 'status' }, 10000)));
      const cpuH = procCpuSecs(server.pid);
      const th = wall();
      await sleep((a.hold * 1000 * 2) / 3);
      const rss1 = procRssBytes(server.pid);
      const cpu1 = procCpuSecs(server.pid);
      const holdSecs = (wall() - th) / 1000;
      const st = await Promise.all(workers.map((w) => w.call({ cmd: 'status' }, 10000)));
      conn.dropped = st.reduce((s, x) => s + x.dropped, 0);
      const genCpu = st.reduce((s, x) => s + x.cpuSecs, 0);
      const genHold = genCpu - st0.reduce((s, x) => s + x.cpuSecs, 0);
      const perConnSec = (secs) => (conn.established > 0 && secs !== null ? round((secs * 1e6) / holdSecs / conn.established, 3) : null);
      const perConn = conn.established > 0 ? Math.round((rss1 - rss0) / conn.established) : null;
      log(a, `  server rss before ${rss0} after hold ${rss1} -> ${perConn} bytes/conn, dropped ${conn.dropped}`);
      const idleCpu = perConnSec(cpuH !== null && cpu1 !== null ? cpu1 - cpuH : null);
      log(a, `  cpu per idle connection: server ${idleCpu} us/s, generator ${perConnSec(genHold)} us/s`);
      runs.push({
        n, loadavg_at_start: load0, connections: conn,
        server: {
          pid: server.pid, cpu_secs: round(cpu1 - cpu0, 2), connect_cpu_secs: round(cpuC - cpu0, 2),
          rss_bytes: rss1, rss_before_bytes: rss0, rss_per_conn_bytes: perConn,
          hold_cpu_secs: cpuH !== null && cpu1 !== null ? round(cpu1 - cpuH, 3) : null,
          idle_cpu_us_per_conn_per_sec: idleCpu,
        },
        generator: { cpu_secs: round(genCpu, 2), idle_cpu_us_per_conn_per_sec: perConnSec(genHold), behind_schedule_max_ms: 0, generator_bound: false, workers: a.workers, client: a.client },
        machine_busy_cpu_util_while_connecting: busyConn !== null ? round(busyConn / connWall, 3) : null,
        pass: pct(conn.established - conn.dropped, conn.attempted) > a.stabilityPct,
      });
    } finally {
      await Promise.all(workers.map((w) => w.stop()));
      await server.stop();
    }
    await sleep(1000);
  }
  const last = runs[runs.length - 1];
  return report(a, 'idle', {
    connections: ns, ramp_up_secs: a.idleRampUp, hold_secs: a.hold, connect_concurrency: a.connectConcurrency,
    workers: a.workers, client: a.client, scenario_file: a.scenarioFile,
    rss_rule: '(server VmRSS at the end of the hold - VmRSS before the first connect) / established',
  }, {
    connections: last.connections,
    messages: { sent: 0, expected: 0, delivered: 0, lost: 0, duplicated: 0, out_of_order: 0 },
    throughput: { deliveries_per_sec: 0, sends_per_sec: 0 },
    latency_ms: { p50: null, p90: null, p99: null, p999: null, max: null, mean: null },
    server: last.server,
    generator: last.generator,
    runs,
    pass: runs.every((r) => r.pass),
  });
}

async function master() {
  let a;
  try {
    a = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`load.js: ${e.message} (see --help)`);
    process.exit(2);
  }
  // hard stop, whatever happens
  setTimeout(() => { console.error('load.js: overall time limit (2 h) reached'); process.exit(3); }, 2 * 3600 * 1000).unref();
  let out;
  if (a.scenario === 'chat-fanout') out = await scenarioChat(a);
  else if (a.scenario === 'knee') out = await scenarioKnee(a);
  else out = await scenarioIdle(a);
  const text = JSON.stringify(out, null, 2);
  if (a.json) {
    fs.mkdirSync(path.dirname(path.resolve(a.json)), { recursive: true });
    fs.writeFileSync(a.json, text + '\n');
    log(a, `wrote ${a.json}`);
  } else {
    process.stdout.write(text + '\n');
  }
  process.exit(0);
}

// ---------------------------------------------------------------- worker side

// Bytes of the payload strings in a history ack frame `43<id>[[<"p1","p2",...>]]`
// (socket.io's ACK packet; its one argument is the page, oldest first). The generator's
// payloads are plain ASCII with no quote or backslash, so the strings' lengths follow from
// the frame length and the number of quotes without parsing 100 x payload bytes;
// anything else goes through JSON.parse.
function ackPageBytes(s, j) {
  if (s.startsWith('[["', j) && s.endsWith('"]]') && s.indexOf('\\', j) < 0) {
    let quotes = 0;
    for (let q = s.indexOf('"', j); q >= 0; q = s.indexOf('"', q + 1)) quotes++;
    const n = quotes / 2;
    return s.length - j - 4 - 2 * n - (n - 1); // "[[" "]]", the quotes, the commas
  }
  let page;
  try { page = JSON.parse(s.slice(j))[0]; } catch { return 0; }
  if (!Array.isArray(page)) return 0;
  let b = 0;
  for (const x of page) b += String(x).length;
  return b;
}

// The typing frame the server relays: 42["t",{"u":<sender>,"typing":<bool>}]
function parseTyping(s, onTyping) {
  if (s.startsWith('42["t",{"u":')) {
    const c = s.indexOf(',', 12);
    const u = +s.slice(12, c);
    if (c > 12 && Number.isInteger(u) && s.startsWith(',"typing":', c)) { onTyping(u, s.charCodeAt(c + 10) === 116); return; }
  }
  try {
    const [ev, p] = JSON.parse(s.slice(2));
    if (ev === 't' && p && Number.isInteger(p.u)) onTyping(p.u, p.typing === true);
  } catch { /* not ours */ }
}

// ext (null unless the run has typing indicators or history fetches):
// { onTyping(sender, bool), onAck(id, pageBytes, receiveTimeMs) }
//
// Connection State Recovery (server.js --recovery 1; the wire format of socket.io 4.8,
// node_modules/socket.io/dist/socket.js, namespace.js, socket.io-adapter/dist/
// in-memory-adapter.js, as socket.io-client/build/cjs/socket.js speaks it):
// - the CONNECT ack is 40{"sid":"…","pid":"…"}; without recovery there is no "pid";
// - every stored broadcast has the server's offset appended as a last string argument,
//   42["m","<payload>","<offset>"]: the client strips it and keeps the last one;
// - rebind() drops the connection abruptly (the TCP socket is destroyed, no DISCONNECT
//   packet) and opens a new one whose CONNECT auth is {"pid","offset","room"}; when the
//   server restores the session it answers with the same pid (that is socket.io-client's
//   `recovered`: pid && pid === the previous one) and writes the missed events BEFORE the
//   CONNECT ack; they are buffered and handled at the ack, in order, before anything
//   later, as socket.io-client's receiveBuffer does;
// - frames sent while reconnecting are queued and go out right after the ack (as
//   socket.io-client's sendBuffer); if the reconnect fails they are never sent.
const REBIND_QUEUE_MAX = 100000; // frames queued per client while it reconnects (bounded)

function makeRawClient(url, room, onPayload, onClose, timeoutMs, ext = null) {
  const WebSocket = require('ws');
  const u = new URL(url);
  const wsUrl = `${u.protocol === 'https:' ? 'wss' : 'ws'}://${u.host}/socket.io/?EIO=4&transport=websocket`;
  let ws = null;       // the current connection (null while none is current)
  let pid = null;      // the session id of the CONNECT ack (recovery on), else null
  let offset = null;   // the offset of the last broadcast event received (recovery on)
  let queue = null;    // frames sent while reconnecting; null while connected
  let dead = false;    // a reconnect failed, or close(): nothing is sent any more

  // An EVENT frame 42[...] on a connected socket
  const onEvent = (s) => {
    if (ext === null || s.charCodeAt(4) === 109) {
      if (pid !== null) {
        // 42["m","<payload>","<offset>"]: the generator's payloads have no quotes
        const q = s.lastIndexOf('","');
        if (q > 7) { offset = s.slice(q + 3, s.length - 2); onPayload(s.slice(8, q)); return; }
      }
      onPayload(s.slice(8, s.length - 2));
      return;
    }
    parseTyping(s, ext.onTyping);
  };

  const frame = (f) => {
    if (queue === null) ws.send(f);
    else if (!dead && queue.length < REBIND_QUEUE_MAX) queue.push(f);
  };

  // One connection: engine.io OPEN, CONNECT with `auth`, and at the CONNECT ack
  // onUp(ackPid, earlyEvents, ackTimeMs) synchronously (before any later frame is handled).
  const open = (auth, onUp) => new Promise((resolve, reject) => {
    // The benchmark's own self-signed certificate: the client does not verify it
    // (that costs the generator only, never the server).
    const sock = new WebSocket(wsUrl, { perMessageDeflate: false, rejectUnauthorized: false });
    ws = sock;
    let state = 0; // 0 = waiting engine.io OPEN, 1 = waiting socket.io CONNECT, 2 = connected
    let early = null; // events before the CONNECT ack (a recovery replay)
    const timer = setTimeout(() => { sock.terminate(); reject(new Error('connect timeout')); }, timeoutMs);
    sock.on('message', (data) => {
      const s = data.toString();
      if (state === 2) {
        // a connection rebind() dropped: frames ws still had buffered when its socket
        // closed are not received (the replay on the new one brings them)
        if (sock !== ws) return;
        if (s.charCodeAt(0) === 52 && s.charCodeAt(1) === 50) { onEvent(s); return; }
        if (s === '2') { sock.send('3'); return; }
        if (ext !== null && s.charCodeAt(0) === 52 && s.charCodeAt(1) === 51) {
          let j = 2;
          while (j < s.length && s.charCodeAt(j) >= 48 && s.charCodeAt(j) <= 57) j++;
          if (j > 2) { const now = wall(); ext.onAck(+s.slice(2, j), ackPageBytes(s, j), now); }
        }
        return;
      }
      if (state === 0 && s[0] === '0') {
        state = 1;
        sock.send('40' + JSON.stringify(auth));
      } else if (state === 1 && s.startsWith('40')) {
        const now = wall();
        state = 2;
        clearTimeout(timer);
        let ackPid = null;
        try { const d = JSON.parse(s.slice(2)); if (d && typeof d.pid === 'string') ackPid = d.pid; } catch { /* no pid */ }
        onUp(ackPid, early || [], now);
        resolve();
      } else if (state === 1 && s.startsWith('42')) {
        if (early === null) early = [];
        if (early.length < REBIND_QUEUE_MAX) early.push(s);
      } else if (state === 1 && s.startsWith('44')) {
        clearTimeout(timer);
        sock.terminate();
        reject(new Error(`connect error ${s}`));
      } else if (s === '2') {
        sock.send('3');
      }
    });
    sock.on('error', (e) => { if (state < 2) { clearTimeout(timer); reject(e); } });
    sock.on('close', () => {
      if (state < 2) { clearTimeout(timer); reject(new Error('closed during handshake')); }
      else if (sock === ws) onClose(); // not a connection rebind() dropped on purpose
    });
  });

  const client = {
    send(p) { frame('42["m","' + p + '"]'); },
    // socket.emit("t", { u, typing }) (the server relays it as a volatile event)
    typing(u, v) { frame('42["t",{"u":' + u + ',"typing":' + v + '}]'); },
    // socket.emit("h", ackCallback): an EVENT packet with ack id `id`
    fetch(id) { frame('42' + id + '["h"]'); },
    close() { dead = true; if (ws) ws.terminate(); },
    // The address changed: drop the connection as if the network went away and
    // reconnect now. Resolves { ms (close -> CONNECT ack), recovered, replayed }.
    rebind() {
      const t0 = wall();
      const old = ws;
      queue = [];
      ws = null; // its close event is not a drop
      old.terminate();
      const auth = pid !== null ? { pid, offset: offset ?? undefined, room } : { room };
      let out = null;
      return open(auth, (ackPid, early, now) => {
        const recovered = pid !== null && ackPid === pid;
        pid = ackPid;
        for (const e of early) onEvent(e); // the replay, before anything later
        const q = queue;
        queue = null;
        if (!dead) for (const f of q) ws.send(f);
        out = { ms: now - t0, recovered, replayed: early.length };
      }).then(() => out, (e) => {
        dead = true;
        queue = [];
        throw e;
      });
    },
  };
  return open({ room }, (ackPid) => { pid = ackPid; }).then(() => client);
}

// The official client. rebind() terminates the engine's `ws` WebSocket (no DISCONNECT
// packet) and lets socket.io-client's own Manager reconnect (1 ms first delay, no
// jitter): it sends {pid, offset} itself, buffers emits meanwhile and sets `recovered`.
function makeSioClient(url, room, onPayload, onClose, timeoutMs, ext = null) {
  const { io } = require('socket.io-client');
  return new Promise((resolve, reject) => {
    const s = io(url, { transports: ['websocket'], forceNew: true, reconnection: false, auth: { room }, timeout: timeoutMs, rejectUnauthorized: false });
    let up = false;
    let rb = null; // the reconnect in progress: { t0, replayed, resolve, reject, timer }
    const client = {
      send(p) { s.emit('m', p); },
      typing(u, v) { s.emit('t', { u, typing: v }); },
      fetch(id) {
        s.emit('h', (page) => {
          const now = wall();
          let b = 0;
          if (Array.isArray(page)) for (const x of page) b += String(x).length;
          ext.onAck(id, b, now);
        });
      },
      close() { s.disconnect(); },
      rebind() {
        return new Promise((res, rej) => {
          const t = s.io.engine && s.io.engine.transport && s.io.engine.transport.ws;
          if (!t || typeof t.terminate !== 'function') { rej(new Error('no ws transport to drop')); return; }
          s.io.reconnectionDelay(1).reconnectionDelayMax(1000).randomizationFactor(0).reconnection(true);
          rb = {
            t0: wall(), replayed: 0, resolve: res, reject: rej,
            timer: setTimeout(() => {
              rb = null;
              s.io.reconnection(false);
              s.disconnect();
              rej(new Error('reconnect timeout'));
            }, timeoutMs),
          };
          t.terminate();
        });
      },
    };
    s.on('connect', () => {
      if (rb !== null) {
        // the recovery replay has been emitted just before this (emitBuffered)
        const r = rb;
        rb = null;
        clearTimeout(r.timer);
        s.io.reconnection(false);
        r.resolve({ ms: wall() - r.t0, recovered: !!s.recovered, replayed: r.replayed });
        return;
      }
      if (!up) { up = true; resolve(client); }
    });
    s.on('connect_error', (e) => { if (!up) { s.close(); reject(e); } });
    // the offset socket.io-client leaves as a last argument is ignored here
    s.on('m', (p) => { if (rb !== null) rb.replayed++; onPayload(p); });
    if (ext !== null) s.on('t', (p) => { if (p && Number.isInteger(p.u)) ext.onTyping(p.u, p.typing === true); });
    s.on('disconnect', (reason) => { if (up && rb === null && reason !== 'io client disconnect') onClose(); });
  });
}

function worker() {
  const W = {
    clients: [],     // local index -> client
    ids: [],         // local index -> global id
    roomSize: 10,
    dropped: 0,
    received: 0,     // every chat message received, any phase
    closing: false,
    run: null,       // counters of the phase being run
    rooms: [],       // local index -> local room number
    roomConn: null,  // local room number -> members connected now
    alive: null,     // local index -> 1 while connected
    localOf: new Map(), // global id -> local index
    ty: null,        // typing indicators of the phase being run (when it has them)
    hi: null,        // history fetches of the phase being run (when it has them)
    pre: null,       // the prefill in progress
    ackId: 0,        // last history ack id used (unique within the worker)
  };

  function makeOnClose(i) {
    return () => {
      if (!W.closing) W.dropped++;
      if (W.alive[i]) { W.alive[i] = 0; W.roomConn[W.rooms[i]]--; }
    };
  }

  function addSample(S, x) {
    if (S.nSamples === S.samples.length) {
      const ns = new Float64Array(S.samples.length * 2 + 1024);
      ns.set(S.samples);
      S.samples = ns;
    }
    S.samples[S.nSamples++] = x;
  }

  // Typing indicator {u, typing: v} received by local client r. Latency: now - the send
  // time of sender u's most recent indicator carrying the same value; counted when that
  // indicator was measured, at most once per (sender, indicator) per receiver.
  function onTyping(r, u, v) {
    const T = W.ty;
    if (T === null) return;
    const now = wall();
    const si = W.localOf.get(u);
    if (si === undefined || si === r) return;
    const x = si * 2 + (v ? 1 : 0);
    const idx = T.lastIdx[x];
    if (idx < 0 || T.measured[x] === 0) return;
    const key = (r * W.roomSize + (u % W.roomSize)) * 2 + (v ? 1 : 0);
    if (T.counted[key] === idx) { T.duplicated++; return; }
    T.counted[key] = idx;
    T.received++;
    addSample(T, now - T.lastMs[x]);
  }

  function onAck(id, bytes, now) {
    const H = W.hi;
    if (H === null) return;
    const p = H.pending.get(id);
    if (p === undefined) return;
    H.pending.delete(id);
    if (!p.measured) return;
    H.outstanding--;
    H.pages++;
    H.bytes += bytes;
    addSample(H, now - p.start);
  }

  function makeExt(r) {
    return { onTyping: (u, v) => onTyping(r, u, v), onAck };
  }

  // Prefill: the sender of a room keeps `window` messages in flight and sends the next
  // one when one of its own comes back.
  function prefillSend(li) {
    const P = W.pre;
    const seq = P.sent[li]++;
    const head = 'P' + W.ids[li] + ':' + seq + ':' + wall().toFixed(4) + ':';
    W.clients[li].send(head + P.pad.slice(0, P.payload - head.length));
  }

  function prefillEcho(li) {
    const P = W.pre;
    if (P.isSender[li] === 0 || P.got[li] >= P.count) return;
    P.got[li]++;
    P.echoed++;
    if (P.sent[li] < P.count && W.alive[li]) prefillSend(li);
  }

  async function prefill(m) {
    const n = W.clients.length;
    const senders = [];
    const seenRoom = new Set();
    for (let li = 0; li < n; li++) {
      if (W.alive[li] && !seenRoom.has(W.rooms[li])) { seenRoom.add(W.rooms[li]); senders.push(li); }
    }
    const P = W.pre = {
      count: m.count, payload: m.payload, pad: 'x'.repeat(m.payload), echoed: 0,
      sent: new Int32Array(n), got: new Int32Array(n), isSender: new Uint8Array(n),
    };
    for (const li of senders) P.isSender[li] = 1;
    for (const li of senders) for (let w = 0; w < Math.min(m.window, m.count); w++) prefillSend(li);
    const target = senders.length * m.count;
    const end = wall() + m.timeoutMs;
    const waiting = () => senders.some((li) => W.alive[li] && P.got[li] < P.count);
    while (P.echoed < target && wall() < end && waiting()) await sleep(5);
    W.pre = null;
    return {
      ev: 'prefilled', rooms: senders.length, sent: P.sent.reduce((x, y) => x + y, 0), echoed: P.echoed,
      complete: P.echoed === target,
    };
  }

  // Receive: payload "<flag><sender>:<seq>:<ts>:xxxx". The flag is a lowercase letter
  // per phase for measured messages and 'W' for warm-up ones (ignored).
  function makeHandler(localIdx) {
    return (p) => {
      W.received++;
      const R = W.run;
      if (R === null || p.charCodeAt(0) !== R.flag) {
        if (W.pre !== null && p.charCodeAt(0) === 80) prefillEcho(localIdx); // 'P': prefill
        return;
      }
      const now = wall();
      const c1 = p.indexOf(':', 1);
      const c2 = p.indexOf(':', c1 + 1);
      const c3 = p.indexOf(':', c2 + 1);
      const sender = +p.slice(1, c1);
      const seq = +p.slice(c1 + 1, c2);
      const ts = +p.slice(c2 + 1, c3);
      const key = localIdx * W.roomSize + (sender % W.roomSize);
      let bm = R.seen[key];
      if (bm === undefined || seq >= bm.length) {
        if (seq > 10_000_000) return; // garbage; bounded memory
        const nb = new Uint8Array(Math.max(seq + 1, bm ? bm.length * 2 : R.seqCap));
        if (bm) nb.set(bm);
        bm = R.seen[key] = nb;
      }
      if (bm[seq]) { R.duplicated++; return; }
      bm[seq] = 1;
      if (seq < R.maxSeq[key]) R.outOfOrder++;
      else R.maxSeq[key] = seq;
      R.delivered++;
      if (R.nSamples === R.samples.length) {
        const ns = new Float64Array(R.samples.length * 2 + 1024);
        ns.set(R.samples);
        R.samples = ns;
      }
      R.samples[R.nSamples++] = now - ts;
    };
  }

  async function connect(m) {
    W.roomSize = m.roomSize;
    const make = m.impl === 'raw' ? makeRawClient : makeSioClient;
    const n = m.clients.length;
    let next = 0;
    let established = 0;
    const errors = [];
    const roomNo = new Map();
    for (let i = 0; i < n; i++) {
      const c = m.clients[i];
      W.ids[i] = c.id;
      W.localOf.set(c.id, i);
      if (!roomNo.has(c.room)) roomNo.set(c.room, roomNo.size);
      W.rooms[i] = roomNo.get(c.room);
    }
    W.roomConn = new Int32Array(roomNo.size);
    W.alive = new Uint8Array(n);
    await sleep(Math.max(0, m.t0 - wall()));
    let firstStart = null;
    let lastDone = wall();
    const lane = async () => {
      while (next < n) {
        const i = next++;
        const c = m.clients[i];
        W.ids[i] = c.id;
        const at = m.t0 + (m.rampMs * i) / n; // starts spread evenly over the ramp
        const wait = at - wall();
        if (wait > 0) await sleep(wait);
        if (firstStart === null) firstStart = wall();
        try {
          W.clients[i] = await make(m.url, c.room, makeHandler(i), makeOnClose(i), m.timeoutMs, m.extras ? makeExt(i) : null);
          established++;
          W.alive[i] = 1;
          W.roomConn[W.rooms[i]]++;
          lastDone = wall();
        } catch (e) {
          if (errors.length < 5) errors.push(String(e && e.message));
        }
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, Math.min(m.concurrency, n)) }, lane));
    return { ev: 'connected', attempted: n, established, firstStart: firstStart ?? lastDone, lastDone, errors };
  }

  async function run(m) {
    const n = W.clients.length;
    const interval = 1000 / m.sendsPerSec; // ms between two sends of this worker
    const endMs = m.warmMs + m.durMs;
    const total = Math.floor(endMs / interval);  // sends scheduled in warm-up + window
    const mFirst = Math.ceil(m.warmMs / interval); // first send scheduled in the window
    const mCount = Math.max(0, total - mFirst);
    const flagChar = String.fromCharCode(97 + (m.phase % 26));
    const pad = 'x'.repeat(m.payload);
    const seqs = new Int32Array(n);
    W.run = {
      flag: flagChar.charCodeAt(0),
      seen: new Array(n * W.roomSize),
      maxSeq: new Int32Array(n * W.roomSize).fill(-1),
      seqCap: Math.ceil(total / n) + 2,
      samples: new Float64Array(mCount * W.roomSize + 1024),
      nSamples: 0,
      delivered: 0, duplicated: 0, outOfOrder: 0,
    };
    const R = W.run;
    // Typing indicators and history fetches: per client a fixed period with a random
    // phase; over the worker, in phase order (event q: client order[q mod n], at
    // phase + floor(q / n) * period, so the times never decrease).
    const sched = (periodMs) => {
      const ph = new Float64Array(n);
      for (let i = 0; i < n; i++) ph[i] = Math.random() * periodMs;
      const order = Int32Array.from({ length: n }, (_, i) => i).sort((x, y) => ph[x] - ph[y]);
      return { ph, order, period: periodMs, q: 0, done: n === 0 };
    };
    const TS = m.typingPerSec > 0 ? sched(1000 / m.typingPerSec) : null;
    const T = W.ty = TS === null ? null : {
      lastMs: new Float64Array(2 * n), lastIdx: new Int32Array(2 * n).fill(-1), measured: new Uint8Array(2 * n),
      counted: new Int32Array(2 * n * W.roomSize).fill(-1),
      samples: new Float64Array(1024), nSamples: 0, sent: 0, expected: 0, received: 0, duplicated: 0,
    };
    const HS = m.historyEveryMs > 0 ? sched(m.historyEveryMs) : null;
    const H = W.hi = HS === null ? null : {
      pending: new Map(), outstanding: 0, pages: 0, bytes: 0, samples: new Float64Array(1024), nSamples: 0,
    };
    // The address change (m.rebindMs after t0, 0: none): every connected client drops
    // its connection and reconnects at once (each on its own, as separate devices would;
    // no concurrency limit). While it is away it is not `alive` (no typing indicators or
    // history fetches, and not counted as a typing receiver); its "m" sends keep their
    // schedule and send time and are queued until it is back (so they count as sent and
    // their latency includes the wait); if it does not get back within the connect
    // timeout it is dropped and they are lost.
    const RB = m.rebindMs > 0 ? {
      started: false, clients: 0, reconnected: 0, recovered: 0, failed: 0, replayed: 0,
      ms: [], errors: [], pending: [],
    } : null;
    const rebindAll = () => {
      RB.started = true;
      for (let li = 0; li < n; li++) {
        const cl = W.clients[li];
        if (!cl || !W.alive[li]) continue;
        RB.clients++;
        W.alive[li] = 0;
        W.roomConn[W.rooms[li]]--;
        let p;
        try { p = cl.rebind(); } catch (e) { p = Promise.reject(e); }
        RB.pending.push(p.then((r) => {
          RB.reconnected++;
          if (r.recovered) RB.recovered++;
          RB.replayed += r.replayed;
          RB.ms.push(r.ms);
          if (!W.closing) { W.alive[li] = 1; W.roomConn[W.rooms[li]]++; }
        }, (e) => {
          RB.failed++;
          if (!W.closing) W.dropped++;
          if (RB.errors.length < 5) RB.errors.push(String(e && e.message));
        }));
      }
    };
    // the next event of schedule S if it is due at `el` (ms since t0), else -1
    const nextDue = (S, el) => {
      const li = S.order[S.q % n];
      const t = S.ph[li] + Math.floor(S.q / n) * S.period;
      if (t >= endMs) { S.done = true; return -1; }
      return t > el ? -1 : li;
    };
    let k = 0;
    let sentMeasured = 0;
    let late = 0;
    let behindMax = 0;
    let cpu0 = null;
    const cpuStart = process.cpuUsage();
    const hardEnd = m.t0 + endMs + 60000;
    await new Promise((resolve) => {
      const tick = () => {
        const now = wall();
        const el = now - m.t0;
        if (cpu0 === null && el >= m.warmMs) cpu0 = process.cpuUsage();
        if (RB !== null && !RB.started && el >= m.rebindMs) rebindAll();
        const due = Math.min(total, Math.floor(el / interval) + 1);
        let budget = 200000; // bounded per tick
        while (k < due && budget-- > 0) {
          const li = k % n;
          const cl = W.clients[li];
          const measured = k >= mFirst;
          const seq = seqs[li]++;
          const ts = wall();
          const head = (measured ? flagChar : 'W') + W.ids[li] + ':' + seq + ':' + ts.toFixed(4) + ':';
          if (cl) cl.send(head + pad.slice(0, m.payload - head.length));
          if (measured) {
            const behind = ts - (m.t0 + k * interval);
            if (behind > behindMax) behindMax = behind;
            if (behind > m.lateSendMs) late++;
            sentMeasured++;
          }
          k++;
        }
        if (TS !== null) {
          let tb = 100000;
          while (!TS.done && tb-- > 0) {
            const li = nextDue(TS, el);
            if (li < 0) break;
            const j = Math.floor(TS.q / n); // this client's indicator number: true, false, true, ...
            const measured = TS.ph[li] + j * TS.period >= m.warmMs;
            TS.q++;
            if (!W.alive[li]) continue;
            const v = (j & 1) === 0;
            const x = li * 2 + (v ? 1 : 0);
            T.lastMs[x] = wall();
            T.lastIdx[x] = j;
            T.measured[x] = measured ? 1 : 0;
            W.clients[li].typing(W.ids[li], v);
            if (measured) { T.sent++; T.expected += W.roomConn[W.rooms[li]] - 1; }
          }
        }
        if (HS !== null) {
          let hb = 100000;
          while (!HS.done && hb-- > 0) {
            const li = nextDue(HS, el);
            if (li < 0) break;
            const measured = HS.ph[li] + Math.floor(HS.q / n) * HS.period >= m.warmMs;
            HS.q++;
            if (!W.alive[li]) continue;
            const id = ++W.ackId;
            H.pending.set(id, { start: wall(), measured });
            if (measured) H.outstanding++;
            W.clients[li].fetch(id);
          }
        }
        if ((k >= total && (TS === null || TS.done) && (HS === null || HS.done) && (RB === null || RB.started)) || now > hardEnd) return resolve();
        setTimeout(tick, 1);
      };
      setTimeout(tick, Math.max(0, m.t0 - wall()));
    });
    const cpu = process.cpuUsage(cpu0 ?? cpuStart);
    const expected = sentMeasured * W.roomSize;
    const drainEnd = wall() + m.drainMs;
    while ((R.delivered < expected || (T !== null && T.received < T.expected) || (H !== null && H.outstanding > 0))
      && wall() < drainEnd) await sleep(5);
    // every reconnect ends within the connect timeout (bounded wait, in case)
    if (RB !== null) await Promise.race([Promise.allSettled(RB.pending), sleep(m.rebindTimeoutMs ?? 15000)]);
    W.run = null;
    W.ty = null;
    W.hi = null;
    return {
      ev: 'result', sent: sentMeasured, expected, delivered: R.delivered,
      typing: T === null ? null : {
        sent: T.sent, expected: T.expected, received: T.received, duplicated: T.duplicated,
        samples: T.samples.slice(0, T.nSamples),
      },
      // measured fetches still outstanding at the end of the drain are errors
      history: H === null ? null : {
        pages: H.pages, errors: H.outstanding, bytes: H.bytes, samples: H.samples.slice(0, H.nSamples),
      },
      rebind: RB === null ? null : {
        clients: RB.clients, reconnected: RB.reconnected, recovered: RB.recovered, failed: RB.failed,
        replayed: RB.replayed, ms: Float64Array.from(RB.ms), errors: RB.errors,
      },
      duplicated: R.duplicated, outOfOrder: R.outOfOrder, dropped: W.dropped,
      samples: R.samples.slice(0, R.nSamples), late, behindMax,
      cpuSecs: (cpu.user + cpu.system) / 1e6,
    };
  }

  process.on('message', async (m) => {
    try {
      if (m.cmd === 'connect') process.send(await connect(m));
      else if (m.cmd === 'run') process.send(await run(m));
      else if (m.cmd === 'prefill') process.send(await prefill(m));
      else if (m.cmd === 'quiesce') {
        // wait until nothing has arrived for quietMs (bounded by maxMs): the backlog of
        // an overloaded step must not spill into the next one
        const t0 = wall();
        let last = W.received;
        let lastChange = wall();
        while (wall() - lastChange < m.quietMs && wall() - t0 < m.maxMs) {
          await sleep(100);
          if (W.received !== last) { last = W.received; lastChange = wall(); }
        }
        process.send({ ev: 'quiet', waitedMs: wall() - t0, quiet: wall() - lastChange >= m.quietMs });
      } else if (m.cmd === 'status') {
        const c = process.cpuUsage();
        process.send({ ev: 'status', dropped: W.dropped, cpuSecs: (c.user + c.system) / 1e6 });
      } else if (m.cmd === 'close') {
        W.closing = true;
        for (const c of W.clients) if (c) c.close();
        process.send({ ev: 'closed' }, () => process.exit(0));
      }
    } catch (e) {
      process.send({ ev: 'error', error: String(e && e.stack) });
    }
  });
  process.on('disconnect', () => process.exit(0));
}

if (process.argv[2] === '--worker') worker();
else master().catch((e) => { console.error(e && e.stack); process.exit(1); });

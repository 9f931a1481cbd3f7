// Unit tests of src/metrics-model.ts: how the dashboard folds "only what changed"
// metrics updates into rolling series.
import { test } from "node:test";
import assert from "node:assert/strict";
import { importTs } from "../tools/import-ts.mjs";

const { MetricsModel } = await importTs("metrics-model");

const T0 = 1_700_000_000_000;
let seq = 0;
function update(i, { events = {}, values = {}, latencies = {}, intervalMs = 1000, s, atMs, node } = {}) {
  seq = s ?? seq + 1;
  return {
    ...(node === undefined ? {} : { nodeId: node }),
    seq: BigInt(seq),
    atMs: BigInt(atMs ?? T0 + i * intervalMs),
    intervalMs,
    events: Object.entries(events).map(([type, count]) => ({ type, count: BigInt(count) })),
    values: Object.entries(values).map(([name, value]) => ({ name, value })),
    latencies: Object.entries(latencies).map(([name, l]) => ({
      name, count: BigInt(l.count ?? 1), p50: l.p50, p90: l.p90 ?? l.p50, p99: l.p99, p999: l.p99, max: l.max ?? l.p99,
    })),
  };
}

test("event counts become rates; absent types had 0; totals add up", () => {
  seq = 0;
  const m = new MetricsModel();
  m.apply(update(1, { events: { signup: 40 } }));
  m.apply(update(2, { events: { checkout: 7 } }));
  m.apply(update(3, { events: { signup: 2 } }));
  const s = m.snapshot();
  assert.deepEqual(s.totals, { signup: 42, checkout: 7 });
  assert.deepEqual(s.series.events.signup.map((p) => p[1]), [40, 0, 2]);
  assert.deepEqual(s.series.events.checkout.map((p) => p[1]), [0, 7, 0]);
  assert.equal(s.series.events.signup[0][0], T0 + 1000);
  assert.equal(s.updates, 3);
  assert.equal(m.currentRate(), 2);
  assert.deepEqual(m.eventTypes(), ["signup", "checkout"]);
});

test("the rate divides by the interval the update covers", () => {
  seq = 0;
  const m = new MetricsModel({ intervalMs: 500 });
  m.apply(update(1, { events: { a: 10 }, intervalMs: 500 }));
  m.apply(update(2, { events: { a: 10 }, intervalMs: 2000, atMs: T0 + 2500 }));
  assert.deepEqual(m.snapshot().series.events.a.map((p) => p[1]), [20, 5]);
  assert.equal(m.intervalMs, 2000);
});

test("gauges carry forward; unknown before their first value", () => {
  seq = 0;
  const m = new MetricsModel();
  m.apply(update(1, { values: { "sessions.webtransport": 1 } }));
  m.apply(update(2, { values: { "sessions.quic": 1, connections: 2 } }));
  m.apply(update(3, { values: { "sessions.quic": 0 } }));
  const s = m.snapshot();
  assert.deepEqual(s.series.connections["sessions.webtransport"].map((p) => p[1]), [1, 1, 1]);
  assert.deepEqual(s.series.connections["sessions.quic"].map((p) => p[1]), [null, 1, 0]);
  assert.deepEqual(s.series.connections.connections.map((p) => p[1]), [null, 2, 2]);
  assert.deepEqual(s.values, { "sessions.webtransport": 1, "sessions.quic": 0, connections: 2 });
  const chart = m.connectionsChart();
  assert.deepEqual(chart.keys, ["sessions.quic", "sessions.webtransport", "connections"]);
  assert.deepEqual(chart.columns[0], [T0 / 1000 + 1, T0 / 1000 + 2, T0 / 1000 + 3]);
});

test("latencies: gaps where an interval had no samples; well-known histograms first", () => {
  seq = 0;
  const m = new MetricsModel();
  m.apply(update(1, { latencies: { "latency.request.chat_send": { p50: 1, p99: 3, count: 5 }, "latency.fanout": { p50: 0.2, p99: 0.9 } } }));
  m.apply(update(2, { latencies: { "latency.handshake": { p50: 4, p99: 8 } } }));
  const s = m.snapshot();
  assert.deepEqual(s.series.latency["latency.fanout"].p99.map((p) => p[1]), [0.9, null]);
  assert.deepEqual(s.series.latency["latency.handshake"].p50.map((p) => p[1]), [null, 4]);
  assert.equal(s.latencies["latency.request.chat_send"].count, 5);
  assert.deepEqual(m.latencyNames(), ["latency.fanout", "latency.handshake", "latency.request.chat_send"]);
  const chart = m.latencyChart(2);
  assert.deepEqual(chart.keys, ["latency.fanout p50", "latency.fanout p99", "latency.handshake p50", "latency.handshake p99"]);
  assert.equal(chart.columns.length, 5);
});

test("a silent stretch reads as zero events; time stays increasing", () => {
  seq = 0;
  const m = new MetricsModel();
  m.apply(update(1, { events: { a: 3 }, values: { connections: 1 } }));
  m.apply(update(6, { events: { a: 1 } })); // updates 2-5 had nothing to send
  const s = m.snapshot();
  assert.deepEqual(s.series.time, [T0 + 1000, T0 + 5000, T0 + 6000]);
  assert.deepEqual(s.series.events.a.map((p) => p[1]), [3, 0, 1]);
  assert.deepEqual(s.series.connections.connections.map((p) => p[1]), [1, 1, 1]);
  m.quiet(T0 + 6000); // not after the last point: ignored
  m.quiet(T0 + 8000);
  assert.deepEqual(m.snapshot().series.events.a.map((p) => p[1]), [3, 0, 1, 0]);
  m.apply(update(7, { events: { a: 1 } })); // the server's clock is behind ours
  const times = m.snapshot().series.time;
  assert.ok(times.every((t, i) => i === 0 || t > times[i - 1]), `times: ${times}`);
});

test("seq gaps are counted as lost updates; a new subscription restarts at 1", () => {
  seq = 0;
  const m = new MetricsModel();
  m.apply(update(1, { s: 1 }));
  m.apply(update(2, { s: 2 }));
  m.apply(update(3, { s: 5 }));
  assert.equal(m.lostUpdates, 2);
  m.apply(update(4, { s: 1 }));
  assert.equal(m.lostUpdates, 2);
  assert.equal(m.lastSeq, 1);
});

test("a rolling window: old points go, series with nothing left are dropped", () => {
  seq = 0;
  const m = new MetricsModel({ capacity: 3 });
  m.apply(update(1, { events: { old: 1 }, latencies: { "latency.rtt": { p50: 1, p99: 2 } }, values: { errors: 1 } }));
  for (let i = 2; i <= 4; i++) m.apply(update(i, { events: { fresh: i } }));
  const s = m.snapshot();
  assert.equal(s.series.time.length, 3);
  assert.deepEqual(Object.keys(s.series.events), ["fresh"]);
  assert.deepEqual(s.series.events.fresh.map((p) => p[1]), [2, 3, 4]);
  assert.deepEqual(Object.keys(s.series.latency), []);
  assert.deepEqual(s.totals, { old: 1, fresh: 9 });
  assert.equal(s.values.errors, 1);
  assert.equal(m.eventsChart().columns[1].length, 3);
});

// ------------------------------------------------------------------ clusters

/** An update of node `node` with its own seq `s`, at T0 + `ms`. */
const of = (node, s, ms, parts = {}) => update(0, { ...parts, node, s, atMs: T0 + ms });

test("cluster: one point per interval holds each node's update: rates and gauges summed, the largest percentiles", () => {
  const m = new MetricsModel();
  m.apply(of("a", 1, 1000, {
    events: { x: 10 }, values: { "sessions.quic": 2, "sessions.webtransport": 1, connections: 3 },
    latencies: { "latency.fanout": { p50: 1, p99: 4, count: 100 } },
  }));
  m.apply(of("b", 1, 1300, {
    events: { x: 5, y: 1 }, values: { "sessions.quic": 1, connections: 1 },
    latencies: { "latency.fanout": { p50: 2, p99: 9, count: 50 } },
  }));
  let s = m.snapshot();
  assert.deepEqual(s.series.time, [T0 + 1000], "one point for both nodes");
  assert.deepEqual(s.series.events.x.map((p) => p[1]), [15]);
  assert.deepEqual(s.series.events.y.map((p) => p[1]), [1]);
  assert.deepEqual(s.values, { "sessions.quic": 3, "sessions.webtransport": 1, connections: 4 });
  assert.deepEqual(s.series.latency["latency.fanout"].p99.map((p) => p[1]), [9]);
  assert.deepEqual(s.series.latency["latency.fanout"].p50.map((p) => p[1]), [2]);
  assert.equal(s.latencies["latency.fanout"].count, 150);
  assert.equal(s.latencies["latency.fanout"].p99, 9);
  assert.deepEqual(s.totals, { x: 15, y: 1 });
  assert.equal(m.currentRate(), 16);

  // The next interval: a's update starts a point (the newest has a's already), b's
  // joins it; b's gauges it did not send are carried in the sums.
  m.apply(of("a", 2, 2000, { values: { "sessions.quic": 5 } }));
  m.apply(of("b", 2, 2300, { events: { x: 2 } }));
  s = m.snapshot();
  assert.deepEqual(s.series.time, [T0 + 1000, T0 + 2000]);
  assert.deepEqual(s.series.connections["sessions.quic"].map((p) => p[1]), [3, 6]);
  assert.deepEqual(s.series.connections.connections.map((p) => p[1]), [4, 4]);
  assert.deepEqual(s.series.events.x.map((p) => p[1]), [15, 2]);
  assert.deepEqual(s.series.latency["latency.fanout"].p99.map((p) => p[1]), [9, null], "no samples: a gap");

  // Each node's own state, for the per-node table.
  assert.deepEqual(Object.keys(s.nodes).sort(), ["a", "b"]);
  assert.deepEqual(
    { ...s.nodes.a, values: undefined },
    { updates: 2, lastSeq: 2, lostUpdates: 0, atMs: T0 + 2000, sessions: 6, connections: 3,
      eventsPerSecond: 0, deliveriesPerSecond: 0, fanoutP99: 4, values: undefined },
  );
  assert.equal(s.nodes.b.sessions, 1);
  assert.equal(s.nodes.b.eventsPerSecond, 2);
  assert.equal(s.nodes.b.fanoutP99, 9);
  assert.equal(m.nodes.get("a").values.get("sessions.quic"), 5);
});

test("cluster: a node's second update before the others' is a new point; deliveries per second per node", () => {
  const m = new MetricsModel({ intervalMs: 500 });
  m.apply(of("a", 1, 500, { intervalMs: 500, latencies: { "latency.fanout": { p50: 1, p99: 2, count: 40 } } }));
  m.apply(of("a", 2, 1000, { intervalMs: 500, events: { x: 1 } }));
  m.apply(of("b", 1, 1100, { intervalMs: 500, events: { x: 3 }, latencies: { "latency.fanout": { p50: 1, p99: 2, count: 10 } } }));
  // c's update is more than half an interval after the newest point: a point of its own.
  m.apply(of("c", 1, 1400, { intervalMs: 500, events: { x: 1 } }));
  const s = m.snapshot();
  assert.deepEqual(s.series.time, [T0 + 500, T0 + 1000, T0 + 1400]);
  assert.deepEqual(s.series.events.x.map((p) => p[1]), [0, 8, 2]);
  assert.equal(s.nodes.a.deliveriesPerSecond, 0, "a's last update had no deliveries");
  assert.equal(s.nodes.b.deliveriesPerSecond, 20, "10 in 500 ms");
});

test("cluster: seq gaps are counted per node (interleaved nodes are not gaps); resetNodes forgets a node gone", () => {
  const m = new MetricsModel();
  m.apply(of("a", 1, 1000, { values: { connections: 2 } }));
  m.apply(of("b", 1, 1100, { values: { connections: 5 } }));
  m.apply(of("a", 2, 2000));
  m.apply(of("b", 2, 2100));
  m.apply(of("a", 3, 3000));
  m.apply(of("b", 5, 3100));
  const s = m.snapshot();
  assert.equal(s.lostUpdates, 2);
  assert.equal(s.nodes.a.lostUpdates, 0);
  assert.equal(s.nodes.b.lostUpdates, 2);
  assert.equal(s.values.connections, 7);
  // A new subscription: b is gone; a's first update carries its values again.
  m.resetNodes();
  m.apply(of("a", 1, 4000, { values: { connections: 2 } }));
  assert.equal(m.snapshot().values.connections, 2);
  assert.deepEqual(Object.keys(m.snapshot().nodes), ["a"]);
  assert.equal(m.snapshot().lostUpdates, 2, "what was lost stays counted");
});

test("a single node's updates (no node id) are one node, \"\"", () => {
  seq = 0;
  const m = new MetricsModel();
  m.apply(update(1, { values: { "sessions.webtransport": 1 } }));
  m.apply(update(2, { events: { a: 1 } }));
  const s = m.snapshot();
  assert.deepEqual(Object.keys(s.nodes), [""]);
  assert.equal(s.nodes[""].sessions, 1);
  assert.equal(s.nodes[""].lastSeq, 2);
  assert.equal(s.series.time.length, 2);
});

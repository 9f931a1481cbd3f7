// MetricsModel: folds the server's MetricsUpdate pushes into rolling time series
// for the dashboard's charts. No DOM here (unit-tested in node).
//
// An update carries only what changed since the previous one, so the model carries
// values forward: an event type absent from an update had 0 occurrences in that
// interval, a counter or gauge absent from it kept its value, and a histogram absent
// from it had no samples (a gap in its line, not a zero).
//
// In a cluster (a subscription with `all_nodes`) updates come from every node, each
// naming its node and numbering its own `seq`. The model keeps each node's state
// (`nodes`) and draws the cluster: one point per interval holding at most one
// update of each node, event rates and counters and gauges summed over the nodes,
// histogram sample counts summed and percentiles the largest node's (an upper
// bound of the cluster's). Updates without a node id come from a single node.

/** The parts of a MetricsUpdate the model reads (the generated message fits). */
export interface UpdateLike {
  /** The node the update is from; empty or absent on a single node. */
  nodeId?: string;
  seq: bigint | number;
  atMs: bigint | number;
  intervalMs: number;
  events: ReadonlyArray<{ type: string; count: bigint | number }>;
  values: ReadonlyArray<{ name: string; value: number }>;
  latencies: ReadonlyArray<LatencyLike>;
}

export interface LatencyLike {
  name: string;
  count: bigint | number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
}

/** The latest summary of a histogram, with `count` as a number. */
export interface Latency {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  atMs: number;
}

/** One node's latest state (see `MetricsModel.nodes`). */
export interface NodeMetrics {
  /** The node's id ("" on a single node). */
  nodeId: string;
  /** Updates applied from it. */
  updates: number;
  /** Its last update's seq. */
  lastSeq: number;
  /** Its updates the seq numbers say were lost. */
  lostUpdates: number;
  /** The end of its last update's interval, ms since the epoch. */
  atMs: number;
  /** Its counters and gauges, carried forward. */
  values: Map<string, number>;
  /** Its latest summary of every histogram. */
  latencies: Map<string, Latency>;
  /** Events per second in its last update. */
  eventsPerSecond: number;
  /** Deliveries per second in its last update (`latency.fanout` samples). */
  deliveriesPerSecond: number;
}

/** A node's state in `snapshot()`. */
export interface NodeSnapshot {
  updates: number;
  lastSeq: number;
  lostUpdates: number;
  atMs: number;
  /** Open sessions: `sessions.quic` + `sessions.webtransport` (null: not known yet). */
  sessions: number | null;
  connections: number | null;
  eventsPerSecond: number;
  deliveriesPerSecond: number;
  /** The p99 of `latency.fanout` in its last interval with samples, ms (null: none yet). */
  fanoutP99: number | null;
  values: Record<string, number>;
}

/** One point of a series: [time in ms since the epoch (server clock), value]. */
export type Point = [number, number | null];

/** Columnar data for one chart: the keys of the lines and uPlot's data layout. */
export interface ChartData {
  keys: string[];
  /** [x in seconds, ...one column per key], all of the same length. */
  columns: Array<Array<number | null>>;
}

/** What `snapshot()` returns: plain JSON, for the page's `window.tuttiDashboard`. */
export interface ModelSnapshot {
  interval: number;
  updates: number;
  lastSeq: number;
  lostUpdates: number;
  /** Each node's state, by node id ("" on a single node). */
  nodes: Record<string, NodeSnapshot>;
  totals: Record<string, number>;
  values: Record<string, number>;
  latencies: Record<string, Latency>;
  series: {
    time: number[];
    events: Record<string, Point[]>;
    connections: Record<string, Point[]>;
    latency: Record<string, { p50: Point[]; p99: Point[] }>;
  };
}

/** The values drawn on the connections chart, in this order (those known). */
export const CONNECTION_METRICS = ["sessions.quic", "sessions.webtransport", "connections"];
/** Histograms drawn on the latency chart before any `latency.request.*`. */
export const LATENCY_FIRST = ["latency.fanout", "latency.handshake", "latency.commit", "latency.rtt"];

interface LatencyColumns {
  p50: Array<number | null>;
  p90: Array<number | null>;
  p99: Array<number | null>;
  max: Array<number | null>;
  samples: Array<number>;
}

const num = (v: bigint | number): number => (typeof v === "bigint" ? Number(v) : v);

/** The histogram whose samples are deliveries (one per push delivered). */
const DELIVERIES = "latency.fanout";

/** The larger of two percentiles, either possibly missing. */
const larger = (a: number | null | undefined, b: number): number => (a == null ? b : Math.max(a, b));

export class MetricsModel {
  /** How many points each series keeps. */
  readonly capacity: number;
  /** The subscription's interval in ms (updated from each update). */
  intervalMs: number;
  /** Updates applied, from every node. */
  updates = 0;
  /** The last update's seq (of its node). */
  lastSeq = 0;
  /** Updates the seq numbers say were lost, over every node. */
  lostUpdates = 0;
  /** Each node's state, by node id ("" on a single node). */
  readonly nodes = new Map<string, NodeMetrics>();
  /** The nodes whose update the newest point holds. */
  private pointNodes = new Set<string>();

  /** The time axis, ms since the epoch on the server's clock. */
  readonly times: number[] = [];
  /** Event rate (per second) per type, aligned with `times`. */
  readonly events = new Map<string, number[]>();
  /** Counter and gauge values carried forward, aligned with `times` (null: unknown yet). */
  readonly values = new Map<string, Array<number | null>>();
  /** Histogram percentiles per interval (null: no samples then). */
  readonly latencies = new Map<string, LatencyColumns>();
  /** Occurrences per event type since the model started (every node). */
  readonly totals = new Map<string, number>();
  /** The current value of every counter and gauge seen, summed over the nodes. */
  readonly current = new Map<string, number>();
  /**
   * The latest summary of every histogram seen: over the nodes of its newest point
   * (counts summed, percentiles the largest node's).
   */
  readonly lastLatency = new Map<string, Latency>();

  constructor(options: { capacity?: number; intervalMs?: number } = {}) {
    this.capacity = Math.max(2, options.capacity ?? 120);
    this.intervalMs = options.intervalMs ?? 1000;
  }

  /** The time of the newest point, or undefined before the first. */
  get lastTime(): number | undefined {
    return this.times[this.times.length - 1];
  }

  /**
   * Forgets every node's state (not the series): for a new subscription, whose
   * first updates carry every value again, so that a node gone meanwhile no
   * longer counts in the sums.
   */
  resetNodes(): void {
    this.nodes.clear();
    this.current.clear();
    this.pointNodes = new Set();
  }

  /**
   * Folds one update in: as a new point, or into the newest point when that holds
   * another node's update but none of this node's yet, and is at most half an
   * interval older.
   */
  apply(update: UpdateLike): void {
    const id = update.nodeId ?? "";
    let node = this.nodes.get(id);
    if (!node) {
      node = {
        nodeId: id,
        updates: 0,
        lastSeq: 0,
        lostUpdates: 0,
        atMs: 0,
        values: new Map(),
        latencies: new Map(),
        eventsPerSecond: 0,
        deliveriesPerSecond: 0,
      };
      this.nodes.set(id, node);
    }
    const seq = num(update.seq);
    if (node.lastSeq > 0 && seq > node.lastSeq + 1) {
      node.lostUpdates += seq - node.lastSeq - 1;
      this.lostUpdates += seq - node.lastSeq - 1;
    }
    node.lastSeq = seq; // a new subscription starts again at 1
    this.lastSeq = seq;
    node.updates++;
    this.updates++;
    if (update.intervalMs > 0) this.intervalMs = update.intervalMs;
    const at = num(update.atMs);
    node.atMs = at;

    const perSecond = 1000 / (update.intervalMs > 0 ? update.intervalMs : this.intervalMs);
    const rates = new Map<string, number>();
    let events = 0;
    for (const e of update.events) {
      const count = num(e.count);
      events += count;
      rates.set(e.type, (rates.get(e.type) ?? 0) + count * perSecond);
      this.totals.set(e.type, (this.totals.get(e.type) ?? 0) + count);
    }
    node.eventsPerSecond = events * perSecond;
    for (const v of update.values) {
      node.values.set(v.name, v.value);
      let sum = 0;
      for (const n of this.nodes.values()) sum += n.values.get(v.name) ?? 0;
      this.current.set(v.name, sum);
    }
    const samples = new Map<string, LatencyLike>();
    node.deliveriesPerSecond = 0;
    for (const l of update.latencies) {
      samples.set(l.name, l);
      const summary = { count: num(l.count), p50: l.p50, p90: l.p90, p99: l.p99, p999: l.p999, max: l.max, atMs: at };
      node.latencies.set(l.name, summary);
      if (l.name === DELIVERIES) node.deliveriesPerSecond = summary.count * perSecond;
    }

    const last = this.lastTime;
    const merge =
      last !== undefined &&
      this.pointNodes.size > 0 &&
      !this.pointNodes.has(id) &&
      at <= last + 0.5 * this.intervalMs;
    if (!merge) {
      // No update for a while means nothing changed: the event rates were 0 from
      // the last point until this update's interval began.
      if (last !== undefined && at - this.intervalMs - last > 0.5 * this.intervalMs) {
        this.quiet(at - this.intervalMs);
      }
      this.newPoint(at);
      this.pointNodes = new Set();
    }
    this.pointNodes.add(id);
    this.addToNewest(rates, samples);
    this.trim();
  }

  /** Adds a point where nothing happened (no update came for a while). */
  quiet(atMs: number): void {
    const last = this.lastTime;
    if (last !== undefined && atMs <= last) return;
    this.newPoint(atMs);
    this.pointNodes = new Set();
    this.trim();
  }

  /** Appends a point: no events, counters and gauges carried, no samples. */
  private newPoint(atMs: number): void {
    const last = this.lastTime;
    this.times.push(last !== undefined && atMs <= last ? last + 1 : atMs);
    for (const column of this.events.values()) column.push(0);
    for (const [name, column] of this.values) column.push(this.current.get(name) ?? null);
    for (const c of this.latencies.values()) {
      for (const col of [c.p50, c.p90, c.p99, c.max]) col.push(null);
      c.samples.push(0);
    }
  }

  /** Adds one node's update to the newest point. */
  private addToNewest(rates: Map<string, number>, samples: Map<string, LatencyLike>): void {
    const length = this.times.length;
    const i = length - 1;
    const at = this.times[i]!;
    for (const [type, rate] of rates) {
      let column = this.events.get(type);
      if (!column) this.events.set(type, (column = new Array<number>(length).fill(0)));
      column[i] = column[i]! + rate;
    }
    for (const [name, value] of this.current) {
      let column = this.values.get(name);
      if (!column) this.values.set(name, (column = new Array<number | null>(length).fill(null)));
      column[i] = value;
    }
    for (const [name, s] of samples) {
      let c = this.latencies.get(name);
      if (!c) {
        const empty = (): Array<number | null> => new Array<number | null>(length).fill(null);
        c = { p50: empty(), p90: empty(), p99: empty(), max: empty(), samples: new Array<number>(length).fill(0) };
        this.latencies.set(name, c);
      }
      c.p50[i] = larger(c.p50[i], s.p50);
      c.p90[i] = larger(c.p90[i], s.p90);
      c.p99[i] = larger(c.p99[i], s.p99);
      c.max[i] = larger(c.max[i], s.max);
      c.samples[i] = c.samples[i]! + num(s.count);
      const seen = this.lastLatency.get(name);
      const p999 = seen && seen.atMs === at ? Math.max(seen.p999, s.p999) : s.p999;
      this.lastLatency.set(name, {
        count: c.samples[i]!,
        p50: c.p50[i]!,
        p90: c.p90[i]!,
        p99: c.p99[i]!,
        p999,
        max: c.max[i]!,
        atMs: at,
      });
    }
  }

  /** Keeps `capacity` points; forgets series with nothing left in the window. */
  private trim(): void {
    const extra = this.times.length - this.capacity;
    if (extra <= 0) return;
    this.times.splice(0, extra);
    for (const [type, column] of this.events) {
      column.splice(0, extra);
      if (column.every((v) => v === 0)) this.events.delete(type);
    }
    for (const column of this.values.values()) column.splice(0, extra);
    for (const [name, c] of this.latencies) {
      for (const col of [c.p50, c.p90, c.p99, c.max, c.samples]) col.splice(0, extra);
      if (c.samples.every((n) => n === 0)) this.latencies.delete(name);
    }
  }

  /** The event rate of the newest point, summed over types. */
  currentRate(): number {
    let sum = 0;
    for (const column of this.events.values()) sum += column[column.length - 1] ?? 0;
    return sum;
  }

  /** Event types on the chart: by total in the window, largest first. */
  eventTypes(): string[] {
    const weight = (t: string): number => (this.events.get(t) ?? []).reduce((a, b) => a + b, 0);
    return [...this.events.keys()].sort((a, b) => weight(b) - weight(a) || a.localeCompare(b));
  }

  /**
   * Histograms on the latency chart: the well-known ones first, then
   * `latency.request.*` (and any other) by samples in the window; at most `limit`.
   */
  latencyNames(limit = 6): string[] {
    const samples = (n: string): number =>
      (this.latencies.get(n)?.samples ?? []).reduce((a, b) => a + b, 0);
    const names = [...this.latencies.keys()];
    const first = LATENCY_FIRST.filter((n) => this.latencies.has(n));
    const rest = names
      .filter((n) => !LATENCY_FIRST.includes(n))
      .sort((a, b) => samples(b) - samples(a) || a.localeCompare(b));
    return [...first, ...rest].slice(0, limit);
  }

  /** uPlot data for the event-rate chart (one line per type). */
  eventsChart(): ChartData {
    const keys = this.eventTypes();
    return { keys, columns: [this.seconds(), ...keys.map((k) => [...(this.events.get(k) ?? [])])] };
  }

  /** uPlot data for the connections chart. */
  connectionsChart(): ChartData {
    const keys = CONNECTION_METRICS.filter((k) => this.values.has(k));
    return { keys, columns: [this.seconds(), ...keys.map((k) => [...(this.values.get(k) ?? [])])] };
  }

  /** uPlot data for the latency chart: "<name> p50" and "<name> p99" per histogram. */
  latencyChart(limit = 6): ChartData {
    const keys: string[] = [];
    const columns: Array<Array<number | null>> = [this.seconds()];
    for (const name of this.latencyNames(limit)) {
      const c = this.latencies.get(name);
      if (!c) continue;
      keys.push(`${name} p50`, `${name} p99`);
      columns.push([...c.p50], [...c.p99]);
    }
    return { keys, columns };
  }

  /** Everything, as plain JSON. */
  snapshot(): ModelSnapshot {
    const points = (column: ReadonlyArray<number | null>): Point[] =>
      column.map((v, i) => [this.times[i] ?? 0, v]);
    const events: Record<string, Point[]> = {};
    for (const [type, column] of this.events) events[type] = points(column);
    const connections: Record<string, Point[]> = {};
    for (const name of CONNECTION_METRICS) {
      const column = this.values.get(name);
      if (column) connections[name] = points(column);
    }
    const latency: Record<string, { p50: Point[]; p99: Point[] }> = {};
    for (const [name, c] of this.latencies) latency[name] = { p50: points(c.p50), p99: points(c.p99) };
    const nodes: Record<string, NodeSnapshot> = {};
    for (const [id, n] of this.nodes) {
      const quic = n.values.get("sessions.quic");
      const wt = n.values.get("sessions.webtransport");
      nodes[id] = {
        updates: n.updates,
        lastSeq: n.lastSeq,
        lostUpdates: n.lostUpdates,
        atMs: n.atMs,
        sessions: quic === undefined && wt === undefined ? null : (quic ?? 0) + (wt ?? 0),
        connections: n.values.get("connections") ?? null,
        eventsPerSecond: n.eventsPerSecond,
        deliveriesPerSecond: n.deliveriesPerSecond,
        fanoutP99: n.latencies.get(DELIVERIES)?.p99 ?? null,
        values: Object.fromEntries(n.values),
      };
    }
    return {
      interval: this.intervalMs,
      updates: this.updates,
      lastSeq: this.lastSeq,
      lostUpdates: this.lostUpdates,
      nodes,
      totals: Object.fromEntries(this.totals),
      values: Object.fromEntries(this.current),
      latencies: Object.fromEntries(this.lastLatency),
      series: { time: [...this.times], events, connections, latency },
    };
  }

  private seconds(): number[] {
    return this.times.map((t) => t / 1000);
  }
}

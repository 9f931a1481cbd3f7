// MetricsModel: folds the server's MetricsUpdate pushes into rolling time series
// for the dashboard's charts. No DOM here (unit-tested in node).
//
// An update carries only what changed since the previous one, so the model carries
// values forward: an event type absent from an update had 0 occurrences in that
// interval, a counter or gauge absent from it kept its value, and a histogram absent
// from it had no samples (a gap in its line, not a zero).

/** The parts of a MetricsUpdate the model reads (the generated message fits). */
export interface UpdateLike {
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

export class MetricsModel {
  /** How many points each series keeps. */
  readonly capacity: number;
  /** The subscription's interval in ms (updated from each update). */
  intervalMs: number;
  /** Updates applied. */
  updates = 0;
  /** The last update's seq. */
  lastSeq = 0;
  /** Updates the seq numbers say were lost. */
  lostUpdates = 0;

  /** The time axis, ms since the epoch on the server's clock. */
  readonly times: number[] = [];
  /** Event rate (per second) per type, aligned with `times`. */
  readonly events = new Map<string, number[]>();
  /** Counter and gauge values carried forward, aligned with `times` (null: unknown yet). */
  readonly values = new Map<string, Array<number | null>>();
  /** Histogram percentiles per interval (null: no samples then). */
  readonly latencies = new Map<string, LatencyColumns>();
  /** Occurrences per event type since the model started. */
  readonly totals = new Map<string, number>();
  /** The current value of every counter and gauge seen. */
  readonly current = new Map<string, number>();
  /** The latest summary of every histogram seen. */
  readonly lastLatency = new Map<string, Latency>();

  constructor(options: { capacity?: number; intervalMs?: number } = {}) {
    this.capacity = Math.max(2, options.capacity ?? 120);
    this.intervalMs = options.intervalMs ?? 1000;
  }

  /** The time of the newest point, or undefined before the first. */
  get lastTime(): number | undefined {
    return this.times[this.times.length - 1];
  }

  /** Folds one update in as a new point. */
  apply(update: UpdateLike): void {
    const seq = num(update.seq);
    if (this.lastSeq > 0 && seq > this.lastSeq + 1) this.lostUpdates += seq - this.lastSeq - 1;
    this.lastSeq = seq; // a new subscription starts again at 1
    this.updates++;
    if (update.intervalMs > 0) this.intervalMs = update.intervalMs;
    const at = num(update.atMs);

    // No update for a while means nothing changed: the event rates were 0 from the
    // last point until this update's interval began.
    const last = this.lastTime;
    if (last !== undefined && at - this.intervalMs - last > 0.5 * this.intervalMs) {
      this.quiet(at - this.intervalMs);
    }

    const perSecond = 1000 / (update.intervalMs > 0 ? update.intervalMs : this.intervalMs);
    const rates = new Map<string, number>();
    for (const e of update.events) {
      const count = num(e.count);
      rates.set(e.type, (rates.get(e.type) ?? 0) + count * perSecond);
      this.totals.set(e.type, (this.totals.get(e.type) ?? 0) + count);
    }
    for (const v of update.values) this.current.set(v.name, v.value);
    const samples = new Map<string, LatencyLike>();
    for (const l of update.latencies) {
      samples.set(l.name, l);
      this.lastLatency.set(l.name, {
        count: num(l.count),
        p50: l.p50,
        p90: l.p90,
        p99: l.p99,
        p999: l.p999,
        max: l.max,
        atMs: at,
      });
    }
    this.push(at, rates, samples);
  }

  /** Adds a point where nothing happened (no update came for a while). */
  quiet(atMs: number): void {
    const last = this.lastTime;
    if (last !== undefined && atMs <= last) return;
    this.push(atMs, new Map(), new Map());
  }

  private push(atMs: number, rates: Map<string, number>, samples: Map<string, LatencyLike>): void {
    const last = this.lastTime;
    const at = last !== undefined && atMs <= last ? last + 1 : atMs;
    const before = this.times.length;
    this.times.push(at);

    for (const type of rates.keys()) {
      if (!this.events.has(type)) this.events.set(type, new Array<number>(before).fill(0));
    }
    for (const [type, column] of this.events) column.push(rates.get(type) ?? 0);

    for (const name of this.current.keys()) {
      if (!this.values.has(name)) this.values.set(name, new Array<number | null>(before).fill(null));
    }
    for (const [name, column] of this.values) column.push(this.current.get(name) ?? null);

    for (const name of samples.keys()) {
      if (!this.latencies.has(name)) {
        const empty = (): Array<number | null> => new Array<number | null>(before).fill(null);
        this.latencies.set(name, {
          p50: empty(),
          p90: empty(),
          p99: empty(),
          max: empty(),
          samples: new Array<number>(before).fill(0),
        });
      }
    }
    for (const [name, c] of this.latencies) {
      const s = samples.get(name);
      c.p50.push(s ? s.p50 : null);
      c.p90.push(s ? s.p90 : null);
      c.p99.push(s ? s.p99 : null);
      c.max.push(s ? s.max : null);
      c.samples.push(s ? num(s.count) : 0);
    }
    this.trim();
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
    return {
      interval: this.intervalMs,
      updates: this.updates,
      lastSeq: this.lastSeq,
      lostUpdates: this.lostUpdates,
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

// The live dashboard (served at /dashboard): connects over WebTransport with a token
// that has the `metrics` role, subscribes to every event type and server metric of
// every node of the cluster (`all_nodes`; one node when not in a cluster), and draws
// the cluster's event rates, connections and latency percentiles as updates arrive,
// with a table of each node's sessions, deliveries and fan-out p99.
//
// URL parameters: `?token=` (else a development server hands one out),
// `?interval=<ms>` (default 1000).
//
// For tests and tools the page publishes its data on `window.tuttiDashboard`
// (see DashboardState) and its state on `#status` (`data-state`).

import "uplot/dist/uPlot.min.css";
import { TuttiClient, TuttiError, fetchCertificateHashes } from "./client";
import type { MetricsUpdate } from "./client";
import { LiveChart, fmt } from "./charts";
import { MetricsModel } from "./metrics-model";
import type { ModelSnapshot } from "./metrics-model";
import { serverInfo, webTransportUrl } from "./server-api";

type Status = "connecting" | "connected" | "reconnecting" | "error";

/** What `window.tuttiDashboard` holds (plain JSON, refreshed on every change). */
export interface DashboardState extends ModelSnapshot {
  status: Status;
  connected: boolean;
  error: { code: number; name: string; message: string } | null;
  user: string | null;
  node: string | null;
  /** The metric names the subscription matched. */
  metrics: string[];
}

const DEFAULT_INTERVAL_MS = 1000;
const WINDOW_POINTS = 120;
const MAX_BACKOFF_MS = 15_000;
/** Histograms drawn on the latency chart (p50 and p99 each); the table has all. */
const LATENCY_LINES = 5;

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} missing from the page`);
  return found as T;
}

const ui = {
  status: el("status"),
  error: el("error"),
  user: el("user"),
  node: el("node"),
  interval: el("interval"),
  updated: el("updated"),
  tiles: el("tiles"),
  eventsEmpty: el("events-empty"),
  latencyTable: el<HTMLTableSectionElement>("latency-rows"),
  valuesTable: el<HTMLTableSectionElement>("value-rows"),
  nodesTable: el<HTMLTableSectionElement>("node-rows"),
};

const params = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
const urlToken = (params.get("token") ?? fragment.get("token") ?? "").trim() || null;
const requestedInterval = Number(params.get("interval") ?? DEFAULT_INTERVAL_MS);
const intervalMs =
  Number.isFinite(requestedInterval) && requestedInterval > 0 ? requestedInterval : DEFAULT_INTERVAL_MS;

const model = new MetricsModel({ capacity: WINDOW_POINTS, intervalMs });
const charts = {
  events: new LiveChart(el("chart-events"), { unit: "events/s", decimals: 1 }),
  connections: new LiveChart(el("chart-connections"), { unit: "", decimals: 0, spanGaps: true }),
  latency: new LiveChart(el("chart-latency"), {
    unit: "ms",
    decimals: 2,
    group: (key) => key.replace(/ p\d+$/, ""),
    dashed: (key) => key.endsWith(" p50"),
    label: (key) => key.replace(/^latency\./, ""),
    liveLegend: false,
  }),
};

const state: DashboardState = {
  ...model.snapshot(),
  status: "connecting",
  connected: false,
  error: null,
  user: null,
  node: null,
  metrics: [],
};
(window as unknown as { tuttiDashboard: DashboardState }).tuttiDashboard = state;

/** Server clock minus ours, from Welcome and each update (to place quiet points). */
let clockSkewMs = 0;

function setStatus(status: Status, error?: unknown): void {
  state.status = status;
  state.connected = status === "connected";
  ui.status.textContent = status;
  ui.status.dataset["state"] = status;
  if (error !== undefined) {
    const e =
      error instanceof TuttiError
        ? { code: error.code, name: error.name, message: error.message }
        : { code: 0, name: "ERROR", message: error instanceof Error ? error.message : String(error) };
    state.error = e;
    ui.error.textContent =
      (status === "reconnecting" ? "connection lost, retrying: " : "") +
      (error instanceof TuttiError ? error.toString() : e.message);
    if (error instanceof TuttiError && error.name === "PERMISSION_DENIED") {
      ui.error.textContent += "\nOpen this page with ?token=<a token that has the `metrics` role>.";
    }
  } else if (status === "connected") {
    state.error = null;
    ui.error.textContent = "";
  }
}

// ------------------------------------------------------------------ rendering

let renderQueued = false;

/** Redraws on the next frame (coalesces bursts of updates). */
function render(): void {
  Object.assign(state, model.snapshot());
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    draw();
  });
  // Hidden tabs get no animation frames: draw anyway, rarely.
  if (document.hidden) setTimeout(() => renderQueued && draw(), 1000);
}

function draw(): void {
  renderQueued = false;
  const events = model.eventsChart();
  charts.events.update(events);
  ui.eventsEmpty.hidden = events.keys.length > 0;
  charts.connections.update(model.connectionsChart());
  charts.latency.update(model.latencyChart(LATENCY_LINES));
  drawTiles();
  drawLatencyTable();
  drawValuesTable();
  drawNodesTable();
  const last = model.lastTime;
  ui.updated.textContent = last ? new Date(last).toLocaleTimeString() : "–";
}

function drawTiles(): void {
  const v = (name: string): string => {
    const value = model.current.get(name);
    return value === undefined ? "–" : fmt(value);
  };
  const tiles: Array<[string, string]> = [
    ["events/s", model.updates > 0 ? fmt(model.currentRate()) : "–"],
    ["connections", v("connections")],
    ["QUIC sessions", v("sessions.quic")],
    ["WebTransport sessions", v("sessions.webtransport")],
    ["errors", v("errors")],
    ["slow consumers", v("slow_consumers")],
  ];
  ui.tiles.replaceChildren(
    ...tiles.map(([label, value]) => {
      const tile = document.createElement("div");
      tile.className = "tile";
      const b = document.createElement("b");
      b.textContent = value;
      const span = document.createElement("span");
      span.textContent = label;
      tile.append(b, span);
      return tile;
    }),
  );
}

function row(cells: string[]): HTMLTableRowElement {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.append(td);
  }
  return tr;
}

function drawLatencyTable(): void {
  const names = [...model.lastLatency.keys()].sort();
  const ms = (n: number): string => n.toFixed(2);
  ui.latencyTable.replaceChildren(
    ...names.map((name) => {
      const l = model.lastLatency.get(name)!;
      return row([name.replace(/^latency\./, ""), String(l.count), ms(l.p50), ms(l.p90), ms(l.p99), ms(l.p999), ms(l.max)]);
    }),
  );
}

function drawValuesTable(): void {
  const names = [...model.current.keys()].sort();
  ui.valuesTable.replaceChildren(
    ...names.map((name) => row([name, String(model.current.get(name))])),
  );
}

/** One row per node: its sessions, connections, rates and fan-out p99. */
function drawNodesTable(): void {
  const nodes = state.nodes;
  const count = (v: number | null): string => (v === null ? "–" : fmt(v));
  ui.nodesTable.replaceChildren(
    ...Object.keys(nodes)
      .sort()
      .map((id) => {
        const n = nodes[id]!;
        const tr = row([
          id || state.node || "this node",
          count(n.sessions),
          count(n.connections),
          fmt(n.eventsPerSecond),
          fmt(n.deliveriesPerSecond),
          n.fanoutP99 === null ? "–" : n.fanoutP99.toFixed(2),
          n.atMs > 0 ? new Date(n.atMs).toLocaleTimeString() : "–",
        ]);
        tr.dataset["node"] = id;
        return tr;
      }),
  );
}

// ------------------------------------------------------------------ session

function onUpdate(update: MetricsUpdate): void {
  clockSkewMs = Number(update.atMs) - Date.now();
  model.apply(update);
  render();
}

/** When nothing changes the server sends nothing: keep the time axis moving. */
function quietTick(): void {
  if (!state.connected) return;
  const now = Date.now() + clockSkewMs;
  const last = model.lastTime;
  if (last !== undefined && now - last > 2.5 * model.intervalMs) {
    model.quiet(now - model.intervalMs);
    render();
  }
}

/**
 * The token in the page's address. Development servers mint no roles, so the
 * dashboard always needs one with the metrics role (`tutti token --role metrics`).
 */
async function tokenForSession(devMode: boolean): Promise<string> {
  if (urlToken) return urlToken;
  const mint = `tutti token --user NAME --role metrics${devMode ? " --dev" : ""}`;
  throw new Error(`open this page with ?token=<a token with the metrics role> (${mint})`);
}

/** Connects and subscribes; resolves with the session's end. */
async function session(): Promise<TuttiError> {
  const info = await serverInfo();
  const [hashes, token] = await Promise.all([
    fetchCertificateHashes(location.origin).catch(() => []),
    tokenForSession(info.dev_mode === true),
  ]);
  const client = await TuttiClient.connect({ url: webTransportUrl(info), token, certificateHashes: hashes });
  (window as unknown as { tutti: unknown }).tutti = { client };
  try {
    clockSkewMs = Number(client.welcome.serverTimeMs) - Date.now();
    // A new subscription's first updates carry every value again: forget the nodes
    // of the last one (a node that went away meanwhile must not count in the sums).
    model.resetNodes();
    client.onMetrics(onUpdate);
    const sub = await client.subscribeMetrics({ eventTypes: ["*"], metrics: ["*"], intervalMs, allNodes: true });
    state.user = client.welcome.userId;
    state.node = client.welcome.nodeId;
    state.metrics = [...sub.metrics];
    if (sub.intervalMs > 0) model.intervalMs = sub.intervalMs;
    ui.user.textContent = state.user;
    ui.node.textContent = state.node;
    ui.interval.textContent = `${model.intervalMs} ms`;
    setStatus("connected");
    render();
  } catch (err) {
    client.close("metrics subscription failed");
    throw err;
  }
  return client.closed;
}

/** Runs sessions; reconnects with backoff when the reason allows it. */
async function run(): Promise<void> {
  let backoff = 1000;
  for (;;) {
    let reason: unknown;
    try {
      reason = await session();
      backoff = 1000; // it was up: start the backoff again
    } catch (err) {
      reason = err;
    }
    // A session that ended or could not open may come back (a restart, a network
    // blip; fetch throws TypeError when the server is unreachable); a refusal won't.
    const retry = reason instanceof TuttiError ? reason.reconnect : reason instanceof TypeError;
    if (!retry) {
      setStatus("error", reason);
      return;
    }
    setStatus("reconnecting", reason);
    await new Promise((resolve) => setTimeout(resolve, backoff));
    backoff = Math.min(MAX_BACKOFF_MS, backoff * 2);
  }
}

setStatus("connecting");
draw();
setInterval(quietTick, intervalMs);
void run();

// End-to-end test of the live dashboard (/dashboard): the real `tutti serve`, headless
// Chromium on the page, and a native client (`tutti track`, raw QUIC) tracking
// events that must show up in the page's charts within a few seconds.
//
//   TUTTI_BIN, CHROMIUM, CI: see tools/e2e.mjs
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  RESULTS, devToken, launchBrowser, missing, roleToken, runTutti, startServer, stopServer, suiteOrSkip,
} from "../tools/e2e.mjs";

const CONNECT_TIMEOUT_MS = 20_000;
/** How long tracked events may take to reach the chart. */
const SHOW_UP_TIMEOUT_MS = 10_000;

suiteOrSkip("dashboard end-to-end", missing(["dashboard.html", "dashboard.js", "dashboard.css"]), suite);

function suite() {
  const root = mkdtempSync(join(tmpdir(), "tutti-web-dashboard-"));
  const dirs = { data: join(root, "data"), certs: join(root, "certs"), browser: join(root, "browser") };
  const prodDirs = { data: join(root, "prod-data"), certs: join(root, "prod-certs") };
  let server;
  let urls;
  let browser;

  before(async () => {
    for (const d of [...Object.values(dirs), ...Object.values(prodDirs)]) mkdirSync(d, { recursive: true });
    mkdirSync(RESULTS, { recursive: true });
    server = startServer(dirs);
    urls = await server.ready;
    browser = await launchBrowser(dirs.browser);
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await stopServer(server?.child);
    rmSync(root, { recursive: true, force: true });
  });

  const dashboardUrl = (base, query = "") => new URL(`/dashboard${query}`, base).toString();

  /** Opens the dashboard in a fresh context; collects console output for failure messages. */
  async function open(query = "", base = urls.page) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const logs = [];
    page.on("console", (m) => logs.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`[pageerror] ${e.message}`));
    await page.goto(dashboardUrl(base, query));
    return { page, context, logs };
  }

  const dashboard = (page) => page.evaluate(() => window.tuttiDashboard);

  /** What to print when a wait fails: the page's state, console and the server's output. */
  async function diagnose(page, logs) {
    const status = await page.textContent("#status").catch(() => "?");
    const error = await page.textContent("#error").catch(() => "?");
    const data = await dashboard(page).catch((e) => `(${e.message})`);
    return (
      `#status "${status}"; #error: ${error}\nwindow.tuttiDashboard: ${JSON.stringify(data)?.slice(0, 3000)}\n` +
      `console:\n${logs.join("\n")}\nserver output:\n${server.output().slice(-4000)}`
    );
  }

  async function waitForStatus(page, logs, want, timeout = CONNECT_TIMEOUT_MS) {
    try {
      await page.waitForFunction(
        (w) => document.querySelector("#status")?.dataset.state === w,
        want,
        { timeout },
      );
    } catch {
      assert.fail(`#status never became "${want}"\n${await diagnose(page, logs)}`);
    }
  }

  /** The server's certificate pin, as hex (GET /cert-hash). */
  async function pin() {
    const { hashes } = await (await fetch(new URL("/cert-hash", urls.page))).json();
    assert.equal(hashes[0].algorithm, "sha-256");
    return hashes[0].value;
  }

  test("GET /dashboard serves the page, its script and its style sheet", async () => {
    const res = await fetch(dashboardUrl(urls.page));
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /text\/html/);
    const html = await res.text();
    assert.match(html, /<script[^>]+src="\/dashboard\.js"/);
    for (const [path, type] of [["/dashboard.js", /javascript/], ["/dashboard.css", /text\/css/]]) {
      const asset = await fetch(new URL(path, urls.page));
      assert.equal(asset.status, 200, path);
      assert.match(asset.headers.get("content-type") ?? "", type, path);
    }
    // The client page stays where it was.
    assert.match(await (await fetch(urls.page)).text(), /<script[^>]+app\.js/);
  });

  test("events tracked by a native client show up in the dashboard's charts", async () => {
    assert.ok(urls.quic, `the server printed no "raw quic:" address:\n${server.output()}`);
    // An operator's token with the metrics role, from `tutti token --role metrics`.
    const metricsToken = await roleToken(dirs.data, "dashboard", ["metrics"]);
    const { page, context, logs } = await open(`?token=${encodeURIComponent(metricsToken)}`);
    try {
      await waitForStatus(page, logs, "connected");
      const start = await dashboard(page);
      assert.equal(start.connected, true);
      assert.equal(start.user, "dashboard");
      assert.equal(start.interval, 1000);
      assert.ok(start.metrics.length > 0, `the subscription matched no metric: ${JSON.stringify(start)}`);

      // A native client (raw QUIC) tracks events as another user.
      const token = await devToken(urls.page, { user: "bot" });
      const quicPin = await pin();
      const tracked = [["signup", 40], ["checkout", 7]];
      for (const [type, count] of tracked) {
        const { stdout } = await runTutti([
          "track", "--quic", urls.quic, "--pin", quicPin, "--token", token,
          "--type", type, "--count", String(count), "--dimension", "plan=free",
        ]);
        assert.match(stdout, new RegExp(`\\b${count}\\b`), `tutti track printed: ${stdout}`);
      }
      const trackedAt = Date.now();

      // Totals and the events chart's data: exactly what was tracked.
      try {
        await page.waitForFunction(
          (want) => {
            const d = window.tuttiDashboard;
            return want.every(([type, count]) =>
              d.totals[type] === count && (d.series.events[type] ?? []).some(([, rate]) => rate > 0));
          },
          tracked,
          { timeout: SHOW_UP_TIMEOUT_MS, polling: 100 },
        );
      } catch {
        assert.fail(`the tracked events did not reach the chart within ${SHOW_UP_TIMEOUT_MS} ms\n${await diagnose(page, logs)}`);
      }
      const delay = Date.now() - trackedAt;
      const d = await dashboard(page);
      for (const [type, count] of tracked) {
        assert.equal(d.totals[type], count, type);
        const points = d.series.events[type];
        // Rates (events/s) times the interval add back up to the count.
        const sum = points.reduce((acc, [, rate]) => acc + (rate * d.interval) / 1000, 0);
        assert.ok(Math.abs(sum - count) < 1e-6, `${type}: points ${JSON.stringify(points)} sum to ${sum}`);
        assert.ok(points.every(([t], i) => i === 0 || t > points[i - 1][0]), `${type}: time goes forward`);
      }
      assert.equal(d.lostUpdates, 0);

      // The chart itself (uPlot) draws a line per type.
      const legend = await page.$$eval("#chart-events .u-legend .u-series .u-label", (els) => els.map((e) => e.textContent));
      for (const [type] of tracked) assert.ok(legend.includes(type), `legend: ${legend}`);
      assert.equal(await page.$$eval("#chart-events canvas", (els) => els.length), 1);

      // Connections: at least this page's WebTransport session.
      const sessions = (name) => d.series.connections[name]?.at(-1)?.[1] ?? 0;
      assert.ok(sessions("sessions.webtransport") >= 1, `connections: ${JSON.stringify(d.series.connections)}`);
      assert.ok(sessions("sessions.quic") + sessions("sessions.webtransport") >= 1);
      assert.ok(d.values.connections >= 1, `values: ${JSON.stringify(d.values)}`);
      // One node (not in a cluster: no node id) in the per-node table, with this page's session.
      assert.deepEqual(Object.keys(d.nodes), [""], `nodes: ${JSON.stringify(d.nodes)}`);
      assert.ok(d.nodes[""].sessions >= 1, JSON.stringify(d.nodes));
      const rows = await page.$$eval("#node-rows tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)));
      assert.equal(rows.length, 1, JSON.stringify(rows));
      assert.equal(rows[0][0], d.node, "the row is named after the node of Welcome");

      // Latency: the native client's track requests were timed.
      const track = d.latencies["latency.request.analytics_track"];
      assert.ok(track && track.count >= 1, `latencies: ${JSON.stringify(d.latencies)}`);
      assert.ok(track.p50 >= 0 && track.p99 >= track.p50 && track.max >= track.p99, JSON.stringify(track));

      // Let a couple more updates draw, then keep a picture of it.
      await page.waitForFunction((n) => window.tuttiDashboard.updates >= n, d.updates + 3, { timeout: 6_000 }).catch(() => {});
      await page.screenshot({ path: join(RESULTS, "dashboard.png"), fullPage: true });
      console.log(`tracked events reached the dashboard's chart in ${delay} ms`);
    } finally {
      await context.close();
    }
  });

  test("a token without the metrics role is refused with PERMISSION_DENIED", async () => {
    const token = await devToken(urls.page, { user: "eve" });
    const { page, context, logs } = await open(`?token=${encodeURIComponent(token)}`);
    try {
      await waitForStatus(page, logs, "error");
      const error = (await page.textContent("#error")) ?? "";
      assert.match(error, /PERMISSION_DENIED \(103\)/, `#error: ${error}`);
      assert.match(error, /metrics/);
      const d = await dashboard(page);
      assert.equal(d.error.code, 103);
      assert.equal(d.error.name, "PERMISSION_DENIED");
      assert.equal(d.connected, false);
      assert.equal(d.updates, 0);
      await page.screenshot({ path: join(RESULTS, "dashboard-denied.png"), fullPage: true });
    } finally {
      await context.close();
    }
  });

  test("the development token endpoint grants no metrics role", async () => {
    const res = await fetch(new URL("/api/dev/token", urls.page), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: "mallory", roles: ["metrics"] }),
    });
    assert.equal(res.status, 403);
    const body = await res.json();
    assert.equal(body.name, "PERMISSION_DENIED");
    // Without ?token= a development server's page says how to get one.
    const { page, context, logs } = await open();
    try {
      await waitForStatus(page, logs, "error", 10_000);
      assert.match((await page.textContent("#error")) ?? "", /\?token=.*--role metrics --dev/);
    } finally {
      await context.close();
    }
  });

  test("on a production server without ?token= the page says to pass one", async () => {
    const prod = startServer(prodDirs, { TUTTI_JWT_SECRET: randomBytes(32).toString("hex") });
    try {
      const prodUrls = await prod.ready;
      const { page, context, logs } = await open("", prodUrls.page);
      try {
        await waitForStatus(page, logs, "error", 10_000);
        assert.match((await page.textContent("#error")) ?? "", /\?token=/);
      } finally {
        await context.close();
      }
    } finally {
      await stopServer(prod.child);
    }
  });
}

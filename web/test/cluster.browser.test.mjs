// The client library in a real cluster: a NATS server with JetStream and three
// `tutti serve --cluster` nodes (a, b, c) on loopback, each with its own data and
// development certificate, and headless Chromium on node a's app page. The page's
// `Tutti` connection learns the node list from Welcome and, with no help from the
// test, follows a REDIRECT from a node over its share, reconnects to another node
// when its node is SIGKILLed, and honours GOING_AWAY (retry-after and node list)
// when its node drains (SIGTERM); after each move it sends a chat message and reads
// it back. The tests run in order on one cluster.
//
// Needs what the other browser tests need plus the NATS server (TUTTI_NATS_SERVER,
// or ../.venv/bin/nats-server from scripts/test.sh); without it the suite is
// skipped, or fails when CI is set.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  NATS_SERVER, killProcess, launchBrowser, missing, runTutti, startNats, startServer, stopServer, suiteOrSkip,
} from "../tools/e2e.mjs";

/** Bound on each wait for the client to move (a kill is noticed by the QUIC idle timeout at worst). */
const MOVE_MS = 20_000;
const WAIT_MS = 10_000;
const SECRET = "cluster-browser-test-secret-0123456789abcdef";
const API_KEY = "cluster-browser-test-api-key-0123456789abcdef";

const why = [
  missing(["index.html", "app.js"]),
  existsSync(NATS_SERVER) ? undefined : `no NATS server at ${NATS_SERVER} (run scripts/test.sh once, or set TUTTI_NATS_SERVER)`,
].filter(Boolean).join("; ") || undefined;

// Redirects from the 4th session on a node whose two peers have none (the node's
// count includes the new session: 4 > 1.5 x 4/3, and a peer has room); GOING_AWAY
// spreads reconnects within 1 s; a dead node leaves the list after 3 s. A session
// with no packet for 5 s is dead (QUIC idle timeout), heartbeats every second.
const CONFIG = `
[timeouts]
idle = "5s"
heartbeat = "1s"
drain = "5s"

[cluster]
heartbeat = "200ms"
node_ttl = "3s"
write_timeout = "2s"
redirect_min_sessions = 2
max_share = 1.5
drain_spread = "1s"
`;

suiteOrSkip("cluster end-to-end", why, suite);

function suite() {
  const root = mkdtempSync(join(tmpdir(), "tutti-cluster-e2e-"));
  const config = join(root, "tutti.toml");
  let nats;
  /** id -> { id, server, urls } */
  const nodes = new Map();
  let browser;
  let context;
  let page;
  const logs = [];

  async function startNode(id) {
    const dirs = { data: join(root, id, "data"), certs: join(root, id, "certs") };
    for (const d of Object.values(dirs)) mkdirSync(d, { recursive: true });
    const server = startServer(dirs, {
      TUTTI_JWT_SECRET: SECRET,
      TUTTI_API_KEY: API_KEY,
      TUTTI_DEV: "true", // POST /api/dev/token, signing with the shared secret
      TUTTI_NODE_ID: id,
      TUTTI_CLUSTER_URL: nats.url,
      TUTTI_CONFIG: config,
    });
    const urls = await server.ready;
    nodes.set(id, { id, server, urls });
  }

  /** The node ids `GET /cluster` of node `id` lists. */
  async function listed(id) {
    const res = await fetch(new URL("/cluster", nodes.get(id).urls.page));
    assert.equal(res.status, 200);
    const body = await res.json();
    return (Array.isArray(body) ? body : body.nodes).map((n) => n.id ?? n.node_id).sort();
  }

  /** Waits (bounded) until node `id`'s list shows these session counts ({ a: 1, ... }). */
  async function untilSessions(id, counts) {
    const deadline = Date.now() + WAIT_MS;
    const want = JSON.stringify(Object.entries(counts).sort());
    let seen;
    for (;;) {
      seen = await fetch(new URL("/cluster", nodes.get(id).urls.page))
        .then((r) => r.json())
        .then((b) => JSON.stringify((Array.isArray(b) ? b : b.nodes).map((n) => [n.id, n.sessions]).sort()))
        .catch((e) => String(e));
      if (seen === want) return;
      if (Date.now() > deadline) assert.fail(`node ${id} shows sessions ${seen}, not ${want}`);
      await new Promise((r) => setTimeout(r, 50)); // polling interval of a bounded wait
    }
  }

  /** Waits (bounded) until node `id` lists exactly `ids`. */
  async function untilListed(id, ids) {
    const deadline = Date.now() + WAIT_MS;
    let seen;
    for (;;) {
      seen = await listed(id).catch((e) => String(e));
      if (JSON.stringify(seen) === JSON.stringify(ids)) return;
      if (Date.now() > deadline) assert.fail(`node ${id} lists ${JSON.stringify(seen)}, not ${JSON.stringify(ids)}`);
      await new Promise((r) => setTimeout(r, 50)); // polling interval of a bounded wait
    }
  }

  async function waitInPage(fn, arg, what, timeout = WAIT_MS) {
    try {
      await page.waitForFunction(fn, arg, { timeout });
    } catch {
      const state = await page.evaluate(() => JSON.stringify(window.clusterTest?.states ?? [])).catch(() => "?");
      const out = [...nodes.values()].map((n) => `--- ${n.id}\n${n.server.output().slice(-2000)}`).join("\n");
      assert.fail(`${what}: not within ${timeout} ms\nstates: ${state}\nconsole:\n${logs.join("\n")}\n${out}`);
    }
  }

  before(async () => {
    writeFileSync(config, CONFIG);
    mkdirSync(join(root, "browser"), { recursive: true });
    nats = await startNats(join(root, "nats"));
    await Promise.all(["a", "b", "c"].map(startNode));
    for (const id of ["a", "b", "c"]) await untilListed(id, ["a", "b", "c"]);
    browser = await launchBrowser(join(root, "browser"));
    context = await browser.newContext();
    page = await context.newPage();
    page.on("console", (m) => logs.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`[pageerror] ${e.message}`));
    // Alice signs in on node a's app page: the app's own Tutti connection.
    await page.goto(nodes.get("a").urls.page);
    await page.fill("#signin-name", "alice");
    await page.click("#signin-submit");
    await waitInPage(() => window.tuttiApp?.tutti.state === "connected", null, "alice connected");
    await page.evaluate(() => {
      const { tutti } = window.tuttiApp;
      const t = { states: [], delivered: [] };
      window.clusterTest = t;
      tutti.onState((s) => t.states.push({
        state: s.state, nodeId: s.nodeId, delayMs: s.delayMs,
        code: s.error?.code, retryAfterMs: s.error?.retryAfterMs, nodes: s.error?.nodes.map((n) => n.nodeId),
      }));
      tutti.onMessage((m) => t.delivered.push(m.text));
    });
  });

  after(async () => {
    await context?.close().catch(() => {});
    await browser?.close().catch(() => {});
    for (const n of nodes.values()) await killProcess(n.server.child);
    await killProcess(nats?.child);
    rmSync(root, { recursive: true, force: true });
  });

  const aliceNode = () => page.evaluate(() => window.tuttiApp.tutti.nodeId);

  /** Alice sends `text` to her room and waits for the library to deliver it back. */
  async function roundTrip(roomId, text) {
    await page.evaluate(([r, t]) => window.tuttiApp.tutti.sendMessage(r, t), [roomId, text]);
    await waitInPage((t) => window.clusterTest.delivered.includes(t), text, `"${text}" delivered back`);
  }

  let roomId;

  test("the dashboard on one node shows every node of the cluster", async () => {
    const { stdout } = await runTutti(["token", "--user", "ops", "--role", "metrics"], { env: { TUTTI_JWT_SECRET: SECRET } });
    const dash = await context.newPage();
    try {
      await dash.goto(new URL(`/dashboard?token=${encodeURIComponent(stdout.trim())}`, nodes.get("b").urls.page).toString());
      try {
        await dash.waitForFunction(() => {
          const d = window.tuttiDashboard;
          return d.connected && ["a", "b", "c"].every((id) => d.nodes[id]?.sessions !== null && d.nodes[id]?.sessions !== undefined);
        }, null, { timeout: WAIT_MS });
      } catch {
        const d = await dash.evaluate(() => JSON.stringify({ ...window.tuttiDashboard, series: undefined })).catch(() => "?");
        assert.fail(`the dashboard did not list nodes a, b and c within ${WAIT_MS} ms: ${d}`);
      }
      const d = await dash.evaluate(() => window.tuttiDashboard);
      assert.deepEqual(Object.keys(d.nodes).sort(), ["a", "b", "c"]);
      assert.equal(d.nodes.a.sessions, 1, "alice's session on a");
      assert.equal(d.nodes.b.sessions, 1, "the dashboard's own session on b");
      assert.equal(d.nodes.c.sessions, 0);
      assert.equal(d.values["sessions.webtransport"], 2, "the cluster's total");
      assert.equal(d.lostUpdates, 0);
      const rows = await dash.$$eval("#node-rows tr", (trs) => trs.map((tr) => tr.cells[0].textContent));
      assert.deepEqual(rows, ["a", "b", "c"]);
    } finally {
      await dash.close();
    }
  });

  test("Welcome lists the nodes; a node over its share redirects a new session, followed at once", async () => {
    assert.equal(await aliceNode(), "a");
    const listedNodes = await page.evaluate(() => window.tuttiApp.tutti.nodes.map((n) => ({
      id: n.nodeId, url: n.webtransportUrl, pin: n.certHash, draining: n.draining,
    })));
    assert.deepEqual(listedNodes.map((n) => n.id).sort(), ["a", "b", "c"]);
    for (const n of listedNodes) {
      assert.equal(n.url, nodes.get(n.id).urls.webtransport, `${n.id}'s URL`);
      assert.match(n.pin, /^[0-9a-f]{64}$/);
      assert.equal(n.draining, false);
    }
    roomId = (await page.evaluate(() => window.tuttiApp.tutti.createRoom("ops"))).roomId;
    await roundTrip(roomId, "on a");
    // Redirects are decided on the counts node a has heard: wait until it has heard
    // that the previous test's dashboard session on b is gone.
    await untilSessions("a", { a: 1, b: 0, c: 0 });

    // Three more sessions through node a's URL, each a Tutti of its own (bob, carol,
    // dave): a keeps the first two; with 4 sessions against none on b and c it sends
    // the third on, and the client follows without a backoff.
    const a = nodes.get("a").urls;
    const placed = await page.evaluate(async ({ url }) => {
      const Tutti = window.tuttiApp.tutti.constructor;
      const hashes = (await (await fetch("/cert-hash")).json()).hashes.map((h) => h.value);
      const out = [];
      window.extraSessions = [];
      for (const user of ["bob", "carol", "dave"]) {
        const { token } = await (await fetch("/api/dev/token", {
          method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user }),
        })).json();
        const t = new Tutti({ url, token, certificateHashes: hashes, autoStart: false });
        const states = [];
        t.onState((s) => states.push(s.state));
        t.start();
        await t.connected();
        window.extraSessions.push(t);
        out.push({ user, node: t.nodeId, states, reconnects: t.reconnects });
      }
      return out;
    }, { url: a.webtransport });
    assert.deepEqual(placed.slice(0, 2).map((p) => p.node), ["a", "a"], JSON.stringify(placed));
    const dave = placed[2];
    assert.ok(dave.node === "b" || dave.node === "c", `dave redirected to b or c: ${JSON.stringify(placed)}`);
    assert.deepEqual(dave.states, ["connecting", "connected"], "followed at once");
    assert.equal(dave.reconnects, 0);
    await page.evaluate(() => { for (const t of window.extraSessions) t.close(); });
  });

  test("node a is SIGKILLed: alice's connection moves to another node by itself and keeps working", async () => {
    assert.equal(await aliceNode(), "a");
    const t0 = Date.now();
    await killProcess(nodes.get("a").server.child, "SIGKILL");
    await waitInPage(
      () => window.tuttiApp.tutti.state === "connected" && window.tuttiApp.tutti.reconnects >= 1,
      null, "alice reconnected", MOVE_MS,
    );
    console.log(`alice reconnected ${Date.now() - t0} ms after node a was killed`);
    const now = await aliceNode();
    assert.ok(now === "b" || now === "c", `on b or c, not ${now}`);
    await roundTrip(roomId, `after the kill, on ${now}`);
    const history = await page.evaluate((r) => window.tuttiApp.tutti.history(r), roomId);
    assert.deepEqual(history.messages.map((m) => m.text), ["on a", `after the kill, on ${now}`]);
  });

  test("alice's node drains (SIGTERM): GOING_AWAY's retry-after and node list take her to the last node", async () => {
    const from = await aliceNode();
    const to = from === "b" ? "c" : "b";
    // Once node a has left the node list, the draining node lists only the other.
    await untilListed(from, [from, to].sort());
    const before = await page.evaluate(() => window.clusterTest.states.length);
    const t0 = Date.now();
    await stopServer(nodes.get(from).server.child); // SIGTERM: a graceful drain
    await waitInPage(
      ([n, to]) => window.clusterTest.states.length > n && window.tuttiApp.tutti.state === "connected" &&
        window.tuttiApp.tutti.nodeId === to,
      [before, to], `alice on ${to}`, MOVE_MS,
    );
    console.log(`alice moved from ${from} to ${to} ${Date.now() - t0} ms after the drain began`);
    const states = (await page.evaluate(() => window.clusterTest.states)).slice(before);
    const away = states.find((s) => s.state === "reconnecting");
    assert.ok(away, JSON.stringify(states));
    assert.equal(away.code, 3000, `GOING_AWAY: ${JSON.stringify(states)}`);
    assert.deepEqual(away.nodes, [to], "the draining node lists the other live node");
    assert.ok(away.retryAfterMs >= 0 && away.retryAfterMs < 1000, `retry-after within the 1 s spread: ${away.retryAfterMs}`);
    // (A drawn 0 means "at once" to the server and "not said" to the client: the backoff.)
    if (away.retryAfterMs > 0) assert.equal(away.delayMs, away.retryAfterMs, "waited the server's retry-after, not a backoff");
    assert.deepEqual(states.filter((s) => s.state !== "reconnecting").map((s) => [s.state, s.nodeId]), [["connected", to]],
      "one move, no failed attempt");
    await roundTrip(roomId, `after the drain, on ${to}`);
    const history = await page.evaluate((r) => window.tuttiApp.tutti.history(r), roomId);
    assert.equal(history.messages.length, 3);
    assert.equal(history.messages[2].text, `after the drain, on ${to}`);
  });
}

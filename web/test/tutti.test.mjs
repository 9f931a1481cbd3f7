// Unit tests of src/tutti.ts (the reconnecting connection) against the in-memory
// WebTransport fake, on virtual time: backoff delays are decided by an injected
// random source and elapse only when the test advances the clock.
import { test } from "node:test";
import assert from "node:assert/strict";
import { importBundle } from "../tools/import-ts.mjs";
import { FakeWebTransport, serverFrame, welcomeFrame } from "../tools/fake-transport.mjs";

const { Tutti, backoffDelay, isRetryableSend, TuttiError, StreamKind, CLOSE_CODES, pickNode, failoverOrder } = await importBundle(`
  export * from "./src/tutti";
  export { TuttiError, StreamKind, pickNode, failoverOrder } from "./src/client";
  export { CLOSE_CODES } from "./src/codes";
`, "tutti-test");

/** Timers that fire only when `advance` moves virtual time past them. */
class VirtualClock {
  now = 0;
  timers = [];
  setTimeout(fn, ms) {
    const t = { at: this.now + ms, fn };
    this.timers.push(t);
    return t;
  }
  clearTimeout(t) { this.timers = this.timers.filter((x) => x !== t); }
  /** Virtual time of the next timer, or undefined. */
  next() { return this.timers.length ? Math.min(...this.timers.map((t) => t.at)) : undefined; }
  advance(ms) {
    this.now += ms;
    for (;;) {
      const due = this.timers.filter((t) => t.at <= this.now).sort((a, b) => a.at - b.at)[0];
      if (!due) return;
      this.clearTimeout(due);
      due.fn();
    }
  }
}

/** Lets pending promise jobs and stream reads run until `cond()` holds (bounded). */
async function until(cond, what) {
  for (let i = 0; i < 2000; i++) {
    if (cond()) return;
    await new Promise((r) => setImmediate(r));
  }
  assert.fail(`never happened: ${what}`);
}

/**
 * A fake server: every connect creates a new FakeWebTransport session that welcomes
 * Hello (or closes it with `refuseWith`), answers requests with `answer`, and
 * records each Hello's resume map.
 */
class FakeServer {
  sessions = [];
  hellos = [];
  refuseWith = undefined;
  failConnects = 0;
  urls = [];
  answer = (body) => ({ case: "roomList", value: { rooms: [] } });
  /** Welcome's server time (unset: 0, as if unknown). */
  serverTimeMs = undefined;
  factory = (url) => {
    this.urls.push(url);
    if (this.failConnects > 0) {
      this.failConnects--;
      const fake = new FakeWebTransport({ ready: Promise.reject(new Error("network unreachable")) });
      fake.ready.catch(() => {});
      fake.closedD.reject(new Error("network unreachable"));
      return fake;
    }
    const fake = new FakeWebTransport({
      onClientFrame: (frame, s) => {
        if (frame.kind.case === "hello") {
          this.hellos.push(frame.kind.value);
          if (this.refuseWith) {
            s.send(serverFrame({ case: "close", value: { code: this.refuseWith, name: "", message: "refused" } }));
            s.serverClose(this.refuseWith);
          } else {
            s.send(welcomeFrame({ nodeId: `node-${this.sessions.length}`, serverTimeMs: this.serverTimeMs?.() ?? 0n }));
          }
        } else if (frame.kind.case === "request") {
          const { id, body } = frame.kind.value;
          const answer = this.answer(body, s);
          if (answer) s.send(serverFrame({ case: "response", value: { id, body: answer } }));
        }
      },
    });
    this.sessions.push(fake);
    return fake;
  };
  get last() { return this.sessions[this.sessions.length - 1]; }
}

function newTutti(server, clock, extra = {}) {
  const states = [];
  const tutti = new Tutti({
    url: "https://127.0.0.1:1/tutti",
    token: "tok",
    transport: server.factory,
    clock,
    random: () => 0.5,
    backoff: { baseMs: 1000, maxMs: 8000 },
    autoStart: false,
    ...extra,
  });
  tutti.onState((s) => states.push(s));
  tutti.start();
  return { tutti, states };
}

const chatPush = (room, offset, text) => ({
  stream: `room/${room}`, offset, event: { case: "chatMessage", value: { roomId: room, offset, text, senderId: "bob" } },
});

test("backoffDelay: full jitter under a doubling ceiling, capped", () => {
  const opts = { baseMs: 500, maxMs: 30_000 };
  const max = (n) => backoffDelay(n, opts, () => 0.999999);
  assert.deepEqual([1, 2, 3, 4, 5, 6, 7, 8].map(max), [499, 999, 1999, 3999, 7999, 15999, 29999, 29999]);
  assert.equal(backoffDelay(5, opts, () => 0), 0);
  assert.equal(backoffDelay(3, opts, () => 0.5), 1000);
  // Spread: 1,000 draws with Math.random cover the interval, none beyond it.
  const draws = Array.from({ length: 1000 }, () => backoffDelay(4, opts));
  assert.ok(draws.every((d) => d >= 0 && d < 4000));
  assert.ok(Math.min(...draws) < 400 && Math.max(...draws) > 3600, "jitter spans the interval");
});

test("a reconnect close code reconnects after the jittered delay and resumes by offset", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const { tutti, states } = newTutti(server, clock);
  const seen = [];
  tutti.onMessage((m) => seen.push(`${m.roomId}@${m.offset}:${m.text}`));
  await tutti.connected();
  assert.deepEqual(states.map((s) => s.state), ["connecting", "connected"]);
  assert.deepEqual(server.hellos[0].resume, {});

  server.last.openPushStream(StreamKind.CHAT, [chatPush("r1", 1n, "a"), chatPush("r1", 2n, "b")]);
  await until(() => seen.length === 2, "two live messages");

  server.last.send(serverFrame({ case: "close", value: { code: 3002, name: "SERVER_ERROR", message: "boom" } }));
  server.last.serverClose(3002);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  const r = states[states.length - 1];
  assert.equal(r.error.code, 3002);
  assert.equal(r.attempt, 1);
  assert.equal(r.delayMs, 500, "random 0.5 of the first ceiling (1000 ms)");
  assert.equal(server.sessions.length, 1, "no attempt before the delay elapses");
  clock.advance(499);
  await until(() => true, "");
  assert.equal(server.sessions.length, 1, "still waiting at 499 ms");
  clock.advance(1);
  await until(() => tutti.state === "connected", "connected again");
  assert.equal(server.sessions.length, 2);
  assert.deepEqual(server.hellos[1].resume, { "room/r1": 2n }, "Hello resumes after the last offset");
  assert.equal(tutti.reconnects, 1);

  // The server replays from the offset (a replay of 2 included) and goes on live.
  server.last.openPushStream(StreamKind.CHAT, [chatPush("r1", 2n, "b"), chatPush("r1", 3n, "c"), chatPush("r1", 4n, "d")]);
  await until(() => seen.length === 4, "missed messages");
  await until(() => true, "");
  assert.deepEqual(seen, ["r1@1:a", "r1@2:b", "r1@3:c", "r1@4:d"], "each message exactly once, in order");
  tutti.close();
  assert.equal(tutti.state, "disconnected");
});

test("a stop close code (UNAUTHORIZED) does not reconnect", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const { tutti, states } = newTutti(server, clock);
  await tutti.connected();
  server.last.send(serverFrame({ case: "close", value: { code: 3502, name: "TOKEN_EXPIRED", message: "expired" } }));
  server.last.serverClose(3502);
  await until(() => tutti.state === "disconnected", "disconnected");
  const last = states[states.length - 1];
  assert.equal(last.error.code, 3502);
  assert.equal(last.error.name, "TOKEN_EXPIRED");
  assert.equal(clock.next(), undefined, "no reconnect timer");
  clock.advance(60_000);
  await until(() => true, "");
  assert.equal(server.sessions.length, 1);
  await assert.rejects(tutti.rooms(), (e) => e.code === 3502);
});

test("refused at the handshake with a stop code: connected() rejects, no retry", async () => {
  const server = new FakeServer();
  server.refuseWith = 3501;
  const { tutti } = newTutti(server, new VirtualClock());
  await assert.rejects(tutti.connected(), (e) => e instanceof TuttiError && e.code === 3501 && e.name === "UNAUTHORIZED");
  assert.equal(tutti.state, "disconnected");
  assert.equal(server.sessions.length, 1);
});

test("network loss: backoff grows attempt by attempt, fails over down the node list, resets after a stable session", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const { tutti, states } = newTutti(server, clock, {
    url: ["https://127.0.0.1:1/tutti", "https://127.0.0.1:2/tutti"],
    random: () => 0.999,
  });
  await tutti.connected();
  server.failConnects = 3;
  server.last.lose();
  const delays = [];
  const reconnecting = (n) => until(() => states.filter((s) => s.state === "reconnecting").length === n, `reconnect attempt ${n}`);
  for (let i = 0; i < 3; i++) {
    await reconnecting(i + 1);
    const s = states[states.length - 1];
    assert.equal(s.state, "reconnecting");
    delays.push(s.delayMs);
    clock.advance(s.delayMs);
  }
  await reconnecting(4);
  delays.push(states[states.length - 1].delayMs);
  clock.advance(states[states.length - 1].delayMs);
  await until(() => tutti.state === "connected", "connected after 3 failures");
  assert.deepEqual(delays, [999, 1998, 3996, 7992], "ceilings 1 s, 2 s, 4 s, 8 s at random 0.999");
  assert.deepEqual(server.urls, [
    "https://127.0.0.1:1/tutti", "https://127.0.0.1:1/tutti", "https://127.0.0.1:2/tutti",
    "https://127.0.0.1:1/tutti", "https://127.0.0.1:2/tutti",
  ], "each failed attempt moves to the next node");

  // A session that ends at once does not reset the backoff: the next delay grows.
  server.last.serverClose(3000);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  assert.equal(states[states.length - 1].delayMs, 7992, "capped at 8 s");
  clock.advance(7992);
  await until(() => tutti.state === "connected", "connected");
  // One that stayed up 10 s does: the next loss starts from the first ceiling.
  clock.advance(10_000);
  server.last.serverClose(3000);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  assert.equal(states[states.length - 1].delayMs, 999);
  tutti.close();
});

test("requests wait while reconnecting; those in flight at the loss reject with the (retryable) reason", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const { tutti } = newTutti(server, clock);
  await tutti.connected();
  server.answer = () => undefined; // the first session never answers
  const inflight = tutti.sendMessage("r1", "lost?", { attempts: 1 });
  await until(() => server.last.clientFrames.some((f) => f.kind.case === "request"), "request sent");
  server.last.serverClose(3001);
  await assert.rejects(inflight, (e) => e.code === 3001 && e.reconnect === true);
  await until(() => tutti.state === "reconnecting", "reconnecting");

  server.answer = (body) => body.case === "roomList"
    ? { case: "roomList", value: { rooms: [{ room: { roomId: "r1", name: "One" }, unread: 3n }] } }
    : undefined;
  const waiting = tutti.rooms();
  clock.advance(clock.next() - clock.now);
  const rooms = await waiting;
  assert.equal(rooms[0].room.name, "One");
  assert.equal(rooms[0].unread, 3n);
  assert.equal(server.sessions.length, 2);
  tutti.close();
  await assert.rejects(tutti.rooms(), (e) => e.name === "CLOSED");
});

test("a chat send carries a client message id and is retried with the same id after a loss or UNAVAILABLE", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const { tutti } = newTutti(server, clock);
  await tutti.connected();
  const sends = () => server.sessions.flatMap((s) => s.clientFrames)
    .filter((f) => f.kind.case === "request" && f.kind.value.body.case === "chatSend")
    .map((f) => f.kind.value.body.value);
  server.answer = () => undefined; // the first session never answers
  const sent = tutti.sendMessage("r1", "once");
  await until(() => sends().length === 1, "first attempt sent");
  server.last.serverClose(3006); // STORAGE_UNAVAILABLE: reconnect and retry
  server.answer = (body) => body.case === "chatSend"
    ? { case: "chatSend", value: { message: { roomId: "r1", offset: 7n, text: body.value.text } } }
    : undefined;
  // Virtual time runs through the reconnect and the send's backoff.
  for (let i = 0; i < 2000 && sends().length < 2; i++) {
    if (clock.next() !== undefined) clock.advance(clock.next() - clock.now);
    await new Promise((r) => setImmediate(r));
  }
  const m = await sent;
  assert.equal(m.offset, 7n);
  const [first, second] = sends();
  assert.match(first.clientMessageId, /^[0-9a-f]{32}$/);
  // The id starts with the time in milliseconds (the virtual clock is not the wall clock).
  const ms = parseInt(first.clientMessageId.slice(0, 12), 16);
  assert.ok(Math.abs(ms - Date.now()) < 60_000, first.clientMessageId);
  assert.equal(second.clientMessageId, first.clientMessageId, "the retry reuses the id");
  // Two sends are two ids.
  const other = await tutti.sendMessage("r1", "again");
  assert.equal(other.text, "again");
  assert.notEqual(sends()[2].clientMessageId, first.clientMessageId);
  // An empty id is not sent: retries need one to be stored once.
  await tutti.sendMessage("r1", "third", { clientMessageId: "" });
  assert.match(sends()[3].clientMessageId, /^[0-9a-f]{32}$/);
  await tutti.sendMessage("r1", "fourth", { clientMessageId: "mine" });
  assert.equal(sends()[4].clientMessageId, "mine");
  // Ids take the server's clock from Welcome: a device whose clock is an hour
  // behind makes ids that line up with everyone else's.
  const hourAhead = BigInt(Date.now() + 3_600_000);
  server.serverTimeMs = () => hourAhead;
  const before = server.sessions.length;
  server.last.serverClose(3006);
  for (let i = 0; i < 2000 && !(server.sessions.length > before && tutti.session); i++) {
    if (clock.next() !== undefined) clock.advance(clock.next() - clock.now);
    await new Promise((r) => setImmediate(r));
  }
  await tutti.sendMessage("r1", "server clock");
  const skewed = parseInt(sends().at(-1).clientMessageId.slice(0, 12), 16);
  assert.ok(Math.abs(skewed - Number(hourAhead)) < 60_000, `${skewed} against ${hourAhead}`);
  assert.ok(isRetryableSend(new TuttiError(111, "UNAVAILABLE", "disk full")));
  assert.ok(!isRetryableSend(new TuttiError(101, "BAD_REQUEST", "no")));
  assert.ok(!isRetryableSend(new TuttiError(3501, "UNAUTHORIZED", "no")));
  tutti.close();
});

test("WebTransport.draining: the client leaves and reconnects (to the next node)", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const { tutti } = newTutti(server, clock, { url: ["https://127.0.0.1:1/tutti", "https://127.0.0.1:2/tutti"] });
  await tutti.connected();
  server.last.drain();
  await until(() => tutti.state === "reconnecting", "reconnecting on draining");
  clock.advance(clock.next() - clock.now);
  await until(() => tutti.state === "connected", "connected");
  assert.deepEqual(server.urls, ["https://127.0.0.1:1/tutti", "https://127.0.0.1:2/tutti"]);
  tutti.close();
});

test("trackStream: a first page starts tracking (pushes it holds are not repeated); a tracked stream keeps its offset", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  server.answer = (body) => body.case === "notifyList"
    ? { case: "notifyList", value: { notifications: [{ offset: 4n, notificationId: "alice:4" }, { offset: 5n, notificationId: "alice:5" }], unread: 2n } }
    : undefined;
  const { tutti } = newTutti(server, clock);
  const got = [];
  tutti.onNotification((n) => got.push(n.offset));
  const page = await tutti.notifications();
  assert.equal(page.unread, 2n);
  const notif = (offset) => ({ stream: "notifications", offset, event: { case: "notification", value: { offset } } });
  server.last.openPushStream(StreamKind.NOTIFICATIONS, [notif(5n), notif(6n)]);
  await until(() => got.length === 1, "one new notification");
  assert.deepEqual(got, [6n]);
  server.last.serverClose(3000);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  clock.advance(clock.next() - clock.now);
  await until(() => tutti.state === "connected", "connected");
  assert.deepEqual(server.hellos[1].resume, { notifications: 6n });
  // A page fetched later (newest 5 here) leaves the tracked offset alone: pushes after
  // 6 are still to come.
  await tutti.notifications();
  assert.deepEqual(tutti.resumeOffsets(), { notifications: 6n });
  tutti.markSeen("notifications", 9n);
  assert.deepEqual(tutti.resumeOffsets(), { notifications: 9n });
  tutti.close();
});

test("typing datagrams are paced to the server's 5 per second", async () => {
  const server = new FakeServer();
  const { tutti } = newTutti(server, new VirtualClock());
  await tutti.connected();
  const sent = [0, 50, 100, 150, 200, 250, 400, 600, 999].map((t) => tutti.setTyping("r1", true, 10_000 + t));
  assert.deepEqual(sent, [true, false, false, false, true, false, true, true, true], "one per 200 ms");
  assert.equal(tutti.setTyping("r1", true, 11_100), false, "five in the last second already");
  assert.equal(tutti.setTyping("r1", false, 10_999), true, "stopping is always sent");
  tutti.close();
});

test("a metrics subscription is made again on the new session after a reconnect", async () => {
  const server = new FakeServer();
  const clock = new VirtualClock();
  const subscribes = [];
  server.answer = (body, s) => {
    if (body.case === "metricsSubscribe") {
      subscribes.push({ session: server.sessions.indexOf(s), interval: body.value.intervalMs });
      return { case: "metricsSubscribe", value: { intervalMs: body.value.intervalMs, metrics: [] } };
    }
    if (body.case === "metricsUnsubscribe") return { case: "metricsUnsubscribe", value: {} };
    return { case: "roomList", value: { rooms: [] } };
  };
  const { tutti } = newTutti(server, clock);
  const updates = [];
  tutti.onMetrics((u) => updates.push(u.seq));
  await tutti.subscribeMetrics({ intervalMs: 250 });
  server.last.serverClose(3000);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  clock.advance(clock.next() - clock.now);
  await until(() => subscribes.length === 2, "subscribed again");
  assert.deepEqual(subscribes, [{ session: 0, interval: 250 }, { session: 1, interval: 250 }]);
  server.last.openPushStream(StreamKind.ANALYTICS, [{ event: { case: "metricsUpdate", value: { seq: 7n } } }]);
  await until(() => updates.length === 1, "update on the new session");
  await tutti.unsubscribeMetrics();
  server.last.serverClose(3000);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  clock.advance(clock.next() - clock.now);
  await until(() => tutti.state === "connected" && server.sessions.length === 3, "third session");
  await tutti.rooms(); // answered on the third session: its reconnect hooks have run
  assert.equal(subscribes.length, 2, "not after unsubscribing");
  tutti.close();
});

test("every close code of the protocol: 3000-3499 reconnect, 3500-3999 stop (mid-session and at the handshake)", async () => {
  const codes = Object.keys(CLOSE_CODES).map(Number).filter((c) => c >= 3000);
  assert.ok(codes.length >= 10);
  for (const code of codes) {
    for (const when of ["session", "handshake"]) {
      const server = new FakeServer();
      const clock = new VirtualClock();
      if (when === "handshake") server.refuseWith = code;
      const { tutti, states } = newTutti(server, clock);
      if (when === "session") {
        await tutti.connected();
        server.last.send(serverFrame({ case: "close", value: { code, name: CLOSE_CODES[code], message: "bye" } }));
        server.last.serverClose(code);
      }
      await until(() => tutti.state === "reconnecting" || tutti.state === "disconnected", `${code} ${when}: decided`);
      const last = states[states.length - 1];
      assert.equal(last.error.code, code, `${code} ${when}`);
      assert.equal(last.error.name, CLOSE_CODES[code]);
      assert.equal(tutti.state, code < 3500 ? "reconnecting" : "disconnected", `${code} ${when}`);
      if (code < 3500) {
        server.refuseWith = undefined;
        clock.advance(clock.next() - clock.now);
        await until(() => tutti.state === "connected", `${code} ${when}: reconnected`);
        assert.equal(server.sessions.length, 2);
      } else {
        assert.equal(clock.next(), undefined, `${code} ${when}: no retry scheduled`);
      }
      tutti.close();
    }
  }
});

// ------------------------------------------------------------------ clusters

const hex = (id) => Buffer.from(id.padEnd(32, "-")).toString("hex").slice(0, 64);
const urlOf = (id) => `https://${id}.example:4433/tutti`;
/** A Node of a Welcome or Close: its URL and pin are derived from its id. */
const node = (nodeId, sessions, draining = false) => ({
  nodeId, address: `${nodeId}:4433`, webtransportUrl: urlOf(nodeId), certHash: hex(nodeId), sessions: BigInt(sessions), draining,
});
const SEED = "https://127.0.0.1:1/tutti";
const SEED_PIN = "ab".repeat(32);

/**
 * A fake cluster behind the WebTransport factory: every URL is a node (the
 * configured one is "seed") that welcomes with `list` as Welcome.nodes, or is
 * down, or redirects; every attempt is recorded with the pins it carried.
 */
class FakeCluster {
  list = [];
  down = new Set();
  redirects = new Map(); // node id -> the Close.nodes it redirects to
  attempts = [];
  sessions = [];
  idOf(url) { return url === SEED ? "seed" : new URL(url).hostname.replace(/\.example$/, ""); }
  factory = (url, opts) => {
    const id = this.idOf(url);
    const pins = (opts.serverCertificateHashes ?? []).map((h) => Buffer.from(h.value).toString("hex"));
    this.attempts.push({ id, pins });
    if (this.down.has(id)) {
      const fake = new FakeWebTransport({ ready: Promise.reject(new Error("unreachable")) });
      fake.ready.catch(() => {});
      fake.closedD.reject(new Error("unreachable"));
      return fake;
    }
    const fake = new FakeWebTransport({
      onClientFrame: (frame, s) => {
        if (frame.kind.case === "hello") {
          const to = this.redirects.get(id);
          if (to) {
            s.send(serverFrame({ case: "close", value: { code: 3007, name: "REDIRECT", message: "over its share", nodes: to } }));
            s.serverClose(3007);
          } else {
            s.send(welcomeFrame({ nodeId: id, nodes: this.list }));
          }
        } else if (frame.kind.case === "request") {
          const { id: rid, body } = frame.kind.value;
          s.send(serverFrame({ case: "response", value: { id: rid, body: { case: "echo", value: { payload: body.value.payload } } } }));
        }
      },
    });
    this.sessions.push(fake);
    return fake;
  };
  ids() { return this.attempts.map((a) => a.id); }
  get last() { return this.sessions[this.sessions.length - 1]; }
}

function clusterTutti(cluster, clock, extra = {}) {
  const states = [];
  const tutti = new Tutti({
    url: SEED, token: "tok", certificateHashes: [SEED_PIN], transport: cluster.factory, clock,
    random: () => 0.5, backoff: { baseMs: 1000, maxMs: 8000 }, autoStart: false, ...extra,
  });
  tutti.onState((s) => states.push(s));
  tutti.start();
  return { tutti, states };
}

test("pickNode: the less loaded of two random nodes, never a draining one; failoverOrder: the choice, then by sessions", () => {
  const nodes = [node("a", 5), node("b", 1), node("c", 3), node("d", 0, true)];
  assert.equal(pickNode([]), undefined);
  assert.equal(pickNode([node("x", 0, true)]), undefined);
  assert.equal(pickNode([node("x", 7)]).nodeId, "x");
  // random 0 then 0: a (index 0) against b (index 1): b has fewer sessions.
  const seq = (...v) => () => v.shift();
  assert.equal(pickNode(nodes, seq(0, 0)).nodeId, "b");
  // random 0.99 then 0: c (index 2) against a (index 0): c.
  assert.equal(pickNode(nodes, seq(0.99, 0)).nodeId, "c");
  // Over many draws: the busiest live node never wins, the least loaded wins most
  // (whenever it is one of the two: 2/3 of the time), the draining one never comes.
  const wins = { a: 0, b: 0, c: 0, d: 0 };
  for (let i = 0; i < 3000; i++) wins[pickNode(nodes).nodeId]++;
  assert.equal(wins.a, 0);
  assert.equal(wins.d, 0);
  assert.ok(wins.b > 1800 && wins.c > 700, JSON.stringify(wins));

  assert.deepEqual(failoverOrder(nodes, seq(0.99, 0)).map((n) => n.nodeId), ["c", "b", "a"]);
  assert.deepEqual(failoverOrder(nodes, seq(0, 0), new Set(["b"])).map((n) => n.nodeId), ["c", "a", "b"], "a node just left goes last");
  assert.deepEqual(failoverOrder([], Math.random), []);
});

test("cluster: after a loss the power of two choices picks a listed node, failing over down the list at once, with each node's pin", async () => {
  const cluster = new FakeCluster();
  cluster.list = [node("seed", 9), node("n1", 1), node("n2", 5), node("n3", 0, true)];
  const clock = new VirtualClock();
  const { tutti, states } = clusterTutti(cluster, clock);
  await tutti.connected();
  assert.equal(tutti.nodeId, "seed");
  assert.deepEqual(tutti.nodes.map((n) => n.nodeId), ["seed", "n1", "n2", "n3"]);
  assert.deepEqual(cluster.attempts[0], { id: "seed", pins: [SEED_PIN] });

  // The seed is lost; n1 (the less loaded of n1 and n2; n3 is draining, the seed
  // was just left) is down too: n2 is tried at once, pinned to its own hash.
  cluster.down.add("n1");
  cluster.down.add("seed");
  cluster.last.lose();
  await until(() => tutti.state === "reconnecting", "reconnecting");
  assert.equal(states[states.length - 1].delayMs, 500, "one backoff after the loss");
  clock.advance(500);
  await until(() => tutti.state === "connected", "connected to n2");
  assert.deepEqual(cluster.attempts.slice(1), [
    { id: "n1", pins: [hex("n1")] },
    { id: "n2", pins: [hex("n2")] },
  ]);
  assert.equal(tutti.nodeId, "n2");
  assert.equal(states.filter((s) => s.state === "reconnecting").length, 1, "no backoff between the nodes of a round");
  assert.equal(states[states.length - 1].nodeId, "n2");
  tutti.close();
});

test("cluster: when every listed node fails the configured URL is tried, then the backoff; no pins configured, none sent", async () => {
  const cluster = new FakeCluster();
  cluster.list = [node("seed", 0), node("n1", 1), node("n2", 2)];
  const clock = new VirtualClock();
  const { tutti, states } = clusterTutti(cluster, clock, { certificateHashes: undefined });
  await tutti.connected();
  for (const id of ["n1", "n2", "seed"]) cluster.down.add(id);
  cluster.last.lose();
  await until(() => tutti.state === "reconnecting", "reconnecting");
  clock.advance(states[states.length - 1].delayMs);
  // Round 1: n1 and n2 (the seed, just left, last), the seed, the configured URL
  // (the seed again): all down; then the backoff grows.
  await until(() => states.filter((s) => s.state === "reconnecting").length === 2, "second backoff");
  assert.deepEqual(cluster.ids(), ["seed", "n1", "n2", "seed", "seed"]);
  assert.ok(cluster.attempts.every((a) => a.pins.length === 0), "unpinned, as configured");
  const second = states[states.length - 1];
  assert.equal(second.attempt, 2);
  assert.equal(second.delayMs, 1000, "random 0.5 of the second ceiling (2 s)");
  // The configured URL comes back first: the next round gets there after the list.
  cluster.down.delete("seed");
  cluster.list = [];
  clock.advance(1000);
  await until(() => tutti.state === "connected", "connected");
  assert.deepEqual(cluster.ids().slice(5), ["n1", "n2", "seed"]);
  assert.deepEqual(tutti.nodes, [], "a Welcome without nodes: back to the configured URLs");
  cluster.last.lose();
  await until(() => tutti.state === "reconnecting", "reconnecting");
  clock.advance(states[states.length - 1].delayMs);
  await until(() => tutti.state === "connected", "connected");
  assert.deepEqual(cluster.ids().slice(8), ["seed"], "only the configured URL");
  tutti.close();
});

test("cluster: a REDIRECT is followed once, at once, with the node's pin; a second one backs off", async () => {
  const cluster = new FakeCluster();
  cluster.list = [node("seed", 9), node("n1", 1), node("n2", 2)];
  cluster.redirects.set("seed", [node("n1", 1), node("n2", 2)]);
  const clock = new VirtualClock();
  const { tutti, states } = clusterTutti(cluster, clock);
  await tutti.connected();
  assert.deepEqual(cluster.attempts, [{ id: "seed", pins: [SEED_PIN] }, { id: "n1", pins: [hex("n1")] }]);
  assert.deepEqual(states.map((s) => s.state), ["connecting", "connected"], "no backoff");
  assert.equal(tutti.nodeId, "n1");
  assert.deepEqual(tutti.nodes.map((n) => n.nodeId), ["seed", "n1", "n2"]);

  // n1 is lost; the next round picks n2 (n1 was just left), which redirects to
  // n1... which redirects too: not followed again, the round ends with the backoff.
  cluster.redirects.set("n2", [node("n1", 1), node("seed", 9)]);
  cluster.redirects.set("n1", [node("n2", 2)]);
  cluster.last.lose();
  await until(() => tutti.state === "reconnecting", "reconnecting");
  clock.advance(states[states.length - 1].delayMs);
  await until(() => states.filter((s) => s.state === "reconnecting").length === 2, "backoff after the second REDIRECT");
  assert.deepEqual(cluster.ids().slice(2), ["n2", "n1"], "followed once, the rest of the list not tried");
  const r = states[states.length - 1];
  assert.equal(r.error.code, 3007);
  assert.equal(r.error.name, "REDIRECT");
  assert.equal(r.delayMs, 1000, "the backoff's second step");
  assert.deepEqual(tutti.nodes.map((n) => n.nodeId), ["n2"], "the last Close's list");
  // The cluster calms down: the next round goes to the node the last Close listed.
  cluster.redirects.clear();
  clock.advance(1000);
  await until(() => tutti.state === "connected", "connected");
  assert.equal(tutti.nodeId, "n2");
  assert.deepEqual(cluster.attempts[cluster.attempts.length - 1], { id: "n2", pins: [hex("n2")] });
  tutti.close();
});

test("cluster: GOING_AWAY from a draining node waits its retry_after_ms, then goes to a node of its list", async () => {
  const cluster = new FakeCluster();
  cluster.list = [node("seed", 3), node("n1", 4), node("n2", 1)];
  const clock = new VirtualClock();
  const { tutti, states } = clusterTutti(cluster, clock);
  await tutti.connected();
  const to = [node("n1", 4), node("n2", 1)];
  cluster.last.send(serverFrame({
    case: "close", value: { code: 3000, name: "GOING_AWAY", message: "draining", retryAfterMs: 1234, nodes: to },
  }));
  cluster.last.serverClose(3000);
  await until(() => tutti.state === "reconnecting", "reconnecting");
  const r = states[states.length - 1];
  assert.equal(r.delayMs, 1234, "the server's retry-after, not the backoff's 500");
  assert.equal(r.error.retryAfterMs, 1234);
  assert.deepEqual(tutti.nodes.map((n) => n.nodeId), ["n1", "n2"], "the draining node's list");
  clock.advance(1233);
  await until(() => true, "");
  assert.equal(cluster.attempts.length, 1, "nothing before the retry-after");
  clock.advance(1);
  await until(() => tutti.state === "connected", "connected");
  assert.deepEqual(cluster.attempts[1], { id: "n2", pins: [hex("n2")] }, "the less loaded of the list");
  assert.equal(tutti.nodeId, "n2");

  // GOING_AWAY without a retry-after (a single node shutting down): the backoff.
  cluster.last.send(serverFrame({ case: "close", value: { code: 3000, name: "GOING_AWAY", message: "bye" } }));
  cluster.last.serverClose(3000);
  await until(() => states.filter((s) => s.state === "reconnecting").length === 2, "reconnecting");
  assert.equal(states[states.length - 1].delayMs, 1000, "backoff (second step: the first session was short)");
  tutti.close();
});

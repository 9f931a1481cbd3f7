// Unit tests of src/client.ts against an in-memory fake of WebTransport (node web
// streams), so the protocol logic is checked without a browser or a server.
import { test } from "node:test";
import assert from "node:assert/strict";
import { importBundle } from "../tools/import-ts.mjs";
import { FakeWebTransport, deferred, serverFrame, welcomeFrame, welcomingServer } from "../tools/fake-transport.mjs";

const m = await importBundle(`
  export * from "./src/client";
  export * from "./src/framing";
  export * from "./src/gen/tutti/v1/frames_pb";
  export { create, toBinary, fromBinary } from "@bufbuild/protobuf";
`, "client-test");
const {
  TuttiClient, TuttiError, optionsForNode, FrameDecoder, encodeFrame, encodeVarint, create, toBinary, fromBinary,
  ClientFrameSchema, ServerFrameSchema, DatagramSchema, PushSchema, PushStreamHeaderSchema, StreamKind,
} = m;

async function connected(fake, options = {}) {
  return TuttiClient.connect({ url: "https://127.0.0.1:1/tutti", token: "tok", transport: () => fake, ...options });
}

test("connect sends Hello and resolves with the Welcome", async () => {
  let seenOptions;
  const fake = new FakeWebTransport({ onClientFrame: welcomingServer() });
  const client = await TuttiClient.connect({
    url: "https://127.0.0.1:1/tutti", token: "secret",
    certificateHashes: ["00ff" + "11".repeat(30), new Uint8Array(32).fill(7)],
    transport: (url, opts) => { seenOptions = { url, opts }; return fake; },
  });
  assert.equal(seenOptions.url, "https://127.0.0.1:1/tutti");
  const hashes = seenOptions.opts.serverCertificateHashes;
  assert.equal(hashes.length, 2);
  assert.equal(hashes[0].algorithm, "sha-256");
  assert.deepEqual([...hashes[0].value.subarray(0, 3)], [0, 255, 0x11]);
  assert.equal(hashes[1].value[31], 7);
  const hello = fake.clientFrames[0];
  assert.equal(hello.kind.case, "hello");
  assert.equal(hello.kind.value.token, "secret");
  assert.equal(hello.kind.value.client.name, "tutti-web");
  assert.equal(hello.kind.value.client.transport, "webtransport");
  assert.equal(hello.kind.value.protocolVersion, 1);
  assert.equal(client.userId, "alice");
  assert.equal(client.welcome.sessionId, "s-1");
  assert.equal(client.welcome.nodeId, "node-a");
  client.close();
  assert.equal(fake.closeCalls[0].closeCode, 0);
  const reason = await client.closed;
  assert.equal(reason.name, "NORMAL");
});

test("Welcome delivered one byte at a time, then coalesced with responses", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.sendChunked(welcomeFrame(), 1);
    },
  });
  const client = await connected(fake);
  assert.equal(client.userId, "alice");
  client.close();
});

test("responses out of order are matched by id; error responses reject", async () => {
  const requests = [];
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.send(welcomeFrame());
      if (frame.kind.case === "request") {
        requests.push(frame.kind.value);
        if (requests.length === 3) {
          // Answer 3, 1, 2 in one chunk; 2 fails.
          const [a, b, c] = requests;
          const echo = (r) => serverFrame({ case: "response", value: { id: r.id, body: { case: "echo", value: { payload: r.body.value.payload } } } });
          s.send(Buffer.concat([echo(c), echo(a), serverFrame({ case: "response", value: { id: b.id, body: { case: "error", value: { code: 105, name: "LIMIT_EXCEEDED", message: "too big" } } } })]));
        }
      }
    },
  });
  const client = await connected(fake);
  const p1 = client.echo("one");
  const p2 = client.echo("two");
  const p3 = client.echo(new Uint8Array([3]), true);
  const [r1, r2, r3] = await Promise.allSettled([p1, p2, p3]);
  assert.equal(new TextDecoder().decode(r1.value.payload), "one");
  assert.deepEqual([...r3.value.payload], [3]);
  assert.equal(r2.status, "rejected");
  assert.ok(r2.reason instanceof TuttiError);
  assert.equal(r2.reason.code, 105);
  assert.equal(r2.reason.name, "LIMIT_EXCEEDED");
  assert.equal(r2.reason.message, "too big");
  const ids = requests.map((r) => r.id);
  assert.equal(new Set(ids).size, 3);
  assert.ok(ids.every((id) => id > 0n));
  assert.equal(requests[2].body.value.push, true);
  client.close();
});

test("a Close frame before Welcome rejects connect with a typed error", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      s.send(serverFrame({ case: "close", value: { code: 3501, name: "UNAUTHORIZED", message: "bad signature" } }));
      setTimeout(() => s.serverClose(3501, "UNAUTHORIZED"), 5);
    },
  });
  await assert.rejects(connected(fake), (e) => {
    assert.ok(e instanceof TuttiError);
    assert.equal(e.code, 3501);
    assert.equal(e.name, "UNAUTHORIZED");
    assert.equal(e.message, "bad signature");
    assert.equal(e.reconnect, false);
    return true;
  });
});

test("an Error frame before Welcome rejects connect", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => s.send(serverFrame({ case: "error", value: { code: 202, name: "UNEXPECTED_FRAME", message: "no" } })),
  });
  await assert.rejects(connected(fake), { name: "UNEXPECTED_FRAME", code: 202 });
});

test("the session closing before Welcome (no frame) rejects with its close code", async () => {
  const fake = new FakeWebTransport({ onClientFrame: (frame, s) => s.serverClose(3501, "token rejected") });
  await assert.rejects(connected(fake), (e) => {
    assert.ok(e instanceof TuttiError);
    assert.equal(e.code, 3501);
    assert.equal(e.name, "UNAUTHORIZED");
    assert.equal(e.message, "token rejected");
    return true;
  });
});

test("a Close frame read just after the session closed still wins", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      s.closedD.resolve({ closeCode: 3000, reason: "" }); // the capsule overtakes the frame
      setTimeout(() => {
        s.send(serverFrame({ case: "close", value: { code: 3502, name: "TOKEN_EXPIRED", message: "expired" } }));
        s.endControl();
      }, 20);
    },
  });
  await assert.rejects(connected(fake), { name: "TOKEN_EXPIRED", code: 3502, message: "expired" });
});

test("when the Close frame is lost, the session close code is reported", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      s.serverClose(3000, ""); // errors the control stream: what follows is lost
      s.send(serverFrame({ case: "close", value: { code: 3502, name: "TOKEN_EXPIRED", message: "expired" } }));
    },
  });
  await assert.rejects(connected(fake), { name: "GOING_AWAY", code: 3000 });
});

test("the control stream ending before Welcome rejects", async () => {
  const fake = new FakeWebTransport({ onClientFrame: (frame, s) => s.endControl() });
  await assert.rejects(connected(fake), (e) => e instanceof TuttiError && e.source === "client");
});

test("a failing opening handshake rejects with CONNECT_FAILED", async () => {
  const ready = Promise.reject(new Error("Opening handshake failed."));
  const fake = new FakeWebTransport({ ready });
  fake.closedD.reject(new Error("Opening handshake failed."));
  await assert.rejects(connected(fake), { name: "CONNECT_FAILED", message: "Opening handshake failed." });
});

test("no Welcome within the handshake timeout rejects with TIMEOUT", async () => {
  const fake = new FakeWebTransport();
  await assert.rejects(connected(fake, { handshakeTimeoutMs: 50 }), { name: "TIMEOUT" });
  assert.equal(fake.closeCalls.length, 1);
});

test("a frame above the limit is a protocol error", async () => {
  const fake = new FakeWebTransport({ onClientFrame: (frame, s) => s.send(encodeVarint(5000)) });
  await assert.rejects(connected(fake, { maxFrameSize: 4096 }), { name: "PROTOCOL_ERROR" });
  assert.equal(fake.closeCalls[0].closeCode, 3503);
});

test("pushes arrive with their stream kind; early ones wait for a listener", async () => {
  const fake = new FakeWebTransport({ onClientFrame: welcomingServer() });
  const client = await connected(fake);
  fake.openPushStream(StreamKind.SYSTEM, [
    { stream: "", offset: 0n, event: { case: "echo", value: { payload: new Uint8Array([1]) } } },
    { stream: "", offset: 0n, event: { case: "echo", value: { payload: new Uint8Array([2]) } } },
  ]);
  await new Promise((r) => setTimeout(r, 20));
  const got = [];
  const done = deferred();
  client.onPush((push, kind) => {
    got.push([kind, push.event.value.payload[0]]);
    if (got.length === 3) done.resolve();
  });
  fake.openPushStream(StreamKind.CHAT, [
    { stream: "room/1", offset: 7n, event: { case: "echo", value: { payload: new Uint8Array([3]) } } },
  ]);
  await done.promise;
  assert.deepEqual(got, [[StreamKind.SYSTEM, 1], [StreamKind.SYSTEM, 2], [StreamKind.CHAT, 3]]);
  client.close();
});

test("pingDatagram measures a round trip and retries a lost ping", async () => {
  let pings = 0;
  const fake = new FakeWebTransport({
    onClientFrame: welcomingServer(),
    onDatagram: (dg, s) => {
      assert.equal(dg.kind.case, "ping");
      if (++pings === 1) return; // lost
      s.sendDatagram({ kind: { case: "pong", value: { nonce: dg.kind.value.nonce, sentAtUs: dg.kind.value.sentAtUs, serverTimeMs: 1n } } });
    },
  });
  const client = await connected(fake);
  const rtt = await client.pingDatagram({ timeoutMs: 50 });
  assert.equal(typeof rtt, "number");
  assert.ok(rtt >= 0 && rtt < 1000, `rtt ${rtt}`);
  assert.equal(pings, 2);
  client.close();
});

test("control ping is answered by a Pong", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      welcomingServer()(frame, s);
      if (frame.kind.case === "ping") s.send(serverFrame({ case: "pong", value: { nonce: frame.kind.value.nonce, serverTimeMs: 5n } }));
    },
  });
  const client = await connected(fake);
  assert.equal(typeof (await client.ping()), "number");
  client.close();
});

test("requests beyond max_inflight_requests wait for a slot", async () => {
  const held = [];
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.send(welcomeFrame({ limits: { maxFrameSize: 65536, maxInflightRequests: 2 } }));
      if (frame.kind.case === "request") held.push(frame.kind.value);
    },
  });
  const client = await connected(fake);
  const ps = [client.echo("a"), client.echo("b"), client.echo("c")];
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(held.length, 2, "the third request waits");
  const answer = (r) => fake.send(serverFrame({ case: "response", value: { id: r.id, body: { case: "echo", value: { payload: r.body.value.payload } } } }));
  answer(held[0]);
  await ps[0];
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(held.length, 3);
  answer(held[1]);
  answer(held[2]);
  const out = await Promise.all(ps);
  assert.deepEqual(out.map((r) => new TextDecoder().decode(r.payload)), ["a", "b", "c"]);
  client.close();
});

test("close() and a server Close reject pending requests", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => { if (frame.kind.case === "hello") s.send(welcomeFrame()); },
  });
  const client = await connected(fake);
  const pending = client.echo("never answered");
  fake.send(serverFrame({ case: "close", value: { code: 3000, name: "GOING_AWAY", message: "draining" } }));
  await assert.rejects(pending, { name: "GOING_AWAY", code: 3000, reconnect: true });
  const reason = await client.closed;
  assert.equal(reason.name, "GOING_AWAY");
  assert.equal(client.isOpen, false);
  await assert.rejects(client.echo("late"), { name: "GOING_AWAY" });

  const fake2 = new FakeWebTransport({
    onClientFrame: (frame, s) => { if (frame.kind.case === "hello") s.send(welcomeFrame()); },
  });
  const client2 = await connected(fake2);
  const pending2 = client2.echo("never answered");
  client2.close();
  await assert.rejects(pending2, { name: "CLOSED" });
});

test("Error frames after Welcome go to onError and keep the session", async () => {
  const fake = new FakeWebTransport({ onClientFrame: welcomingServer() });
  const client = await connected(fake);
  const seen = deferred();
  client.onError((e) => seen.resolve(e));
  fake.send(serverFrame({ case: "error", value: { code: 201, name: "FRAME_MALFORMED", message: "huh" } }));
  const e = await seen.promise;
  assert.equal(e.code, 201);
  assert.equal(client.isOpen, true);
  assert.equal(new TextDecoder().decode((await client.echo("still here")).payload), "still here");
  client.close();
});

test("subscribeMetrics sends MetricsSubscribeRequest; onMetrics gets the analytics pushes", async () => {
  let subscribe;
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.send(welcomeFrame());
      if (frame.kind.case === "request") {
        subscribe = frame.kind.value.body;
        s.send(serverFrame({ case: "response", value: { id: frame.kind.value.id, body: {
          case: "metricsSubscribe", value: { intervalMs: 1000, metrics: ["connections", "latency.fanout"] },
        } } }));
      }
    },
  });
  const client = await connected(fake);
  const updates = [];
  const others = [];
  client.onMetrics((u) => updates.push(u));
  client.onPush((p) => others.push(p.event.case));
  const sub = await client.subscribeMetrics({ intervalMs: 1000 });
  assert.equal(subscribe.case, "metricsSubscribe");
  assert.deepEqual(subscribe.value.eventTypes, ["*"]);
  assert.deepEqual(subscribe.value.metrics, ["*"]);
  assert.equal(subscribe.value.intervalMs, 1000);
  assert.equal(subscribe.value.allNodes, false);
  assert.equal(sub.intervalMs, 1000);
  assert.deepEqual(sub.metrics, ["connections", "latency.fanout"]);

  fake.openPushStream(StreamKind.ANALYTICS, [
    { event: { case: "metricsUpdate", value: { seq: 1n, atMs: 5000n, intervalMs: 1000,
      events: [{ type: "signup", count: 40n }], values: [{ name: "connections", value: 2 }],
      latencies: [{ name: "latency.fanout", count: 3n, p50: 0.5, p90: 1, p99: 2, p999: 2, max: 2 }] } } },
    { event: { case: "echo", value: { payload: new Uint8Array([1]) } } },
    { event: { case: "metricsUpdate", value: { seq: 2n, atMs: 6000n, intervalMs: 1000 } } },
  ]);
  for (let i = 0; i < 50 && updates.length < 2; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(updates.length, 2);
  assert.equal(updates[0].events[0].type, "signup");
  assert.equal(updates[0].events[0].count, 40n);
  assert.equal(updates[0].values[0].value, 2);
  assert.equal(updates[0].latencies[0].p99, 2);
  assert.equal(updates[1].seq, 2n);
  assert.deepEqual(others, ["metricsUpdate", "echo", "metricsUpdate"]);
  client.close();
});

test("call() checks the answer's kind; PERMISSION_DENIED rejects with its code", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.send(welcomeFrame());
      if (frame.kind.case !== "request") return;
      const { id, body } = frame.kind.value;
      const answer = body.case === "metricsSubscribe"
        ? { case: "error", value: { code: 103, name: "PERMISSION_DENIED", message: "needs the metrics role" } }
        : body.case === "analyticsTrack"
          ? { case: "analyticsTrack", value: { accepted: 47n } }
          : { case: "echo", value: {} }; // the wrong kind of answer
      s.send(serverFrame({ case: "response", value: { id, body: answer } }));
    },
  });
  const client = await connected(fake);
  await assert.rejects(client.subscribeMetrics(), (e) => {
    assert.ok(e instanceof TuttiError);
    assert.equal(e.code, 103);
    assert.equal(e.name, "PERMISSION_DENIED");
    assert.equal(e.reconnect, false);
    return true;
  });
  assert.equal(await client.track([{ type: "signup", count: 40 }, { type: "checkout", count: 7, dimensions: { plan: "pro" } }]), 47n);
  const track = fake.clientFrames.find((f) => f.kind.value?.body?.case === "analyticsTrack").kind.value.body.value;
  assert.deepEqual(track.events.map((e) => [e.type, e.count, { ...e.dimensions }]), [["signup", 40, {}], ["checkout", 7, { plan: "pro" }]]);
  await assert.rejects(client.call({ case: "analyticsTop", value: { windowMs: 60000n } }), /analyticsTop answered with echo/);
  assert.ok(client.isOpen);
  client.close();
});

test("getToken refreshes the session's token ahead of its expiry", async () => {
  const now = BigInt(Date.now());
  const refreshed = deferred();
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      // A token that expires 2 s from now: the refresh is asked for halfway.
      if (frame.kind.case === "hello") s.send(welcomeFrame({ serverTimeMs: now, tokenExpiresAtMs: now + 2000n }));
      if (frame.kind.case === "request" && frame.kind.value.body.case === "authRefresh") {
        const { id, body } = frame.kind.value;
        s.send(serverFrame({ case: "response", value: { id, body: { case: "authRefresh", value: { tokenExpiresAtMs: now + 3_600_000n } } } }));
        refreshed.resolve(body.value.token);
      }
    },
  });
  let asked = 0;
  const client = await connected(fake, { getToken: async () => { asked += 1; return "later"; } });
  assert.equal(client.tokenExpiresAtMs, Number(now) + 2000);
  assert.equal(await refreshed.promise, "later");
  assert.equal(asked, 1);
  // The answer moves the expiry; the next refresh is an hour away.
  while (client.tokenExpiresAtMs !== Number(now) + 3_600_000) await new Promise((r) => setTimeout(r, 5));
  client.close();
});

test("refreshToken rejects a refused token and keeps the old expiry", async () => {
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.send(welcomeFrame({ tokenExpiresAtMs: 5_000n }));
      if (frame.kind.case === "request") {
        const { id } = frame.kind.value;
        s.send(serverFrame({ case: "response", value: { id, body: { case: "error", value: { code: 103, name: "PERMISSION_DENIED", message: "the new token is for another user" } } } }));
      }
    },
  });
  const client = await connected(fake);
  await assert.rejects(client.refreshToken("bob's"), (e) => e.name === "PERMISSION_DENIED");
  assert.equal(client.tokenExpiresAtMs, 5000);
  client.close();
});

// ------------------------------------------------------------------ clusters

const clusterNode = (nodeId, sessions = 0n) => ({
  nodeId, address: `${nodeId}:4433`, webtransportUrl: `https://${nodeId}.example:4433/tutti`,
  certHash: (nodeId + "0".repeat(64)).slice(0, 64).replace(/[^0-9a-f]/g, "e"), sessions, draining: false,
});

/** A transport factory over per-URL fakes: `redirect` maps a URL to the Close.nodes it redirects with. */
function redirecting(redirect) {
  const attempts = [];
  const factory = (url, opts) => {
    attempts.push({ url, pins: (opts.serverCertificateHashes ?? []).map((h) => Buffer.from(h.value).toString("hex")) });
    return new FakeWebTransport({
      onClientFrame: (frame, s) => {
        if (frame.kind.case !== "hello") return;
        const nodes = redirect[url];
        if (nodes) {
          s.send(serverFrame({ case: "close", value: { code: 3007, name: "REDIRECT", message: "over its share", nodes } }));
          s.serverClose(3007);
        } else {
          s.send(welcomeFrame({ nodeId: new URL(url).hostname }));
        }
      },
    });
  };
  return { attempts, factory };
}

test("a Close frame carries its retry-after and node list on the error", async () => {
  const nodes = [clusterNode("b1", 3n), clusterNode("c2", 5n)];
  const fake = new FakeWebTransport({
    onClientFrame: (frame, s) => {
      if (frame.kind.case === "hello") s.send(welcomeFrame({ nodes }));
    },
  });
  const client = await connected(fake);
  assert.deepEqual(client.welcome.nodes.map((n) => [n.nodeId, n.sessions]), [["b1", 3n], ["c2", 5n]]);
  fake.send(serverFrame({ case: "close", value: { code: 3000, name: "GOING_AWAY", message: "draining", retryAfterMs: 750, nodes } }));
  const reason = await client.closed;
  assert.equal(reason.code, 3000);
  assert.equal(reason.retryAfterMs, 750);
  assert.deepEqual(reason.nodes.map((n) => n.webtransportUrl), nodes.map((n) => n.webtransportUrl));
  assert.equal(new TuttiError(3002, "SERVER_ERROR", "x").retryAfterMs, 0);
  assert.deepEqual(new TuttiError(3002, "SERVER_ERROR", "x").nodes, []);
});

test("connect follows a REDIRECT once to the first node listed, with that node's pin", async () => {
  const first = "https://a0.example:4433/tutti";
  const [b, c] = [clusterNode("b1"), clusterNode("c2")];
  const { attempts, factory } = redirecting({ [first]: [b, c] });
  const client = await TuttiClient.connect({ url: first, token: "t", certificateHashes: ["ff".repeat(32)], transport: factory });
  assert.equal(client.welcome.nodeId, "b1.example");
  assert.deepEqual(attempts, [
    { url: first, pins: ["ff".repeat(32)] },
    { url: b.webtransportUrl, pins: [b.certHash] },
  ]);
  client.close();

  // Without pins (a CA-signed certificate) the node is not pinned either.
  const plain = redirecting({ [first]: [b] });
  (await TuttiClient.connect({ url: first, token: "t", transport: plain.factory })).close();
  assert.deepEqual(plain.attempts[1], { url: b.webtransportUrl, pins: [] });
});

test("a second REDIRECT, one with no usable node, or followRedirect: false rejects with REDIRECT", async () => {
  const first = "https://a0.example:4433/tutti";
  const [b, c] = [clusterNode("b1"), clusterNode("c2")];
  const twice = redirecting({ [first]: [b], [b.webtransportUrl]: [c] });
  await assert.rejects(
    TuttiClient.connect({ url: first, token: "t", transport: twice.factory }),
    (e) => e.code === 3007 && e.name === "REDIRECT" && e.reconnect && e.nodes[0].nodeId === "c2",
  );
  assert.equal(twice.attempts.length, 2, "followed once, not to c2");

  const pinless = { ...b, certHash: "" };
  const bad = redirecting({ [first]: [pinless] });
  await assert.rejects(TuttiClient.connect({ url: first, token: "t", certificateHashes: ["ff".repeat(32)], transport: bad.factory }), { code: 3007 });
  assert.equal(bad.attempts.length, 1, "a pinned client does not go to a node without a pin");

  const off = redirecting({ [first]: [b] });
  await assert.rejects(TuttiClient.connect({ url: first, token: "t", transport: off.factory, followRedirect: false }), { code: 3007 });
  assert.equal(off.attempts.length, 1);
});

test("optionsForNode: the node's URL, and its pin in place of the configured ones", () => {
  const b = clusterNode("b1");
  const base = { url: "https://x/tutti", token: "t", certificateHashes: ["ff".repeat(32)], handshakeTimeoutMs: 5 };
  assert.deepEqual(optionsForNode(base, b), { ...base, url: b.webtransportUrl, certificateHashes: [b.certHash] });
  assert.equal(optionsForNode({ url: "u", token: "t" }, b).certificateHashes, undefined);
  assert.equal(optionsForNode(base, { ...b, webtransportUrl: "" }), undefined);
  assert.equal(optionsForNode(base, { ...b, certHash: "abc" }), undefined);
  assert.deepEqual(optionsForNode(base, { ...b, certHash: "AB".repeat(32) }).certificateHashes, ["ab".repeat(32)]);
});

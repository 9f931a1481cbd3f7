// Unit tests of src/document.ts (TuttiDocument) against in-memory fakes: a small OT
// server (the authority: transform against the history, apply, push to every
// session, drop duplicates by client id and seq) behind the WebTransport fake. Each
// push travels on a stream of its own, so pushes may be processed out of order.
import { test } from "node:test";
import assert from "node:assert/strict";
import { importBundle } from "../tools/import-ts.mjs";
import { FakeWebTransport, serverFrame, welcomeFrame } from "../tools/fake-transport.mjs";

const { Tutti, TuttiDocument, TextOperation, TextSelection, toTextOp, fromTextOp, StreamKind } = await importBundle(`
  export * from "./src/tutti";
  export { TextOperation, TextSelection, toTextOp, fromTextOp } from "./src/ot";
  export { StreamKind } from "./src/client";
`, "document-test");

async function until(cond, what) {
  for (let i = 0; i < 5000; i++) {
    if (cond()) return;
    await new Promise((r) => setImmediate(r));
  }
  assert.fail(`never happened: ${what}`);
}

/** Timers that fire only when advanced (the reconnect backoff). */
class VirtualClock {
  timers = [];
  setTimeout(fn) { const t = { fn }; this.timers.push(t); return t; }
  clearTimeout(t) { this.timers = this.timers.filter((x) => x !== t); }
  fireAll() { const ts = this.timers.splice(0); for (const t of ts) t.fn(); }
}

/** One shared document with an OT authority, and the sessions connected to it. */
class OtServer {
  text = "";
  history = []; // history[i] = { op, clientId, seq, userId } at revision i + 1
  sessions = new Set();
  /** When set, the next submit is applied but its pushes and response are lost. */
  dropNextSubmitDelivery = false;
  /** When set, the next submit is lost with the connection, never applied. */
  loseNextSubmit = false;
  /** When set, the next submit is refused with RESYNC_REQUIRED. */
  resyncNextSubmit = false;
  submits = 0;

  get revision() { return BigInt(this.history.length); }

  connect(userId) {
    let fake;
    fake = new FakeWebTransport({
      onClientFrame: (frame, s) => {
        if (frame.kind.case === "hello") { s.send(welcomeFrame({ userId, sessionId: `${userId}-${Math.random()}` })); return; }
        if (frame.kind.case !== "request") return;
        const { id, body } = frame.kind.value;
        const answer = this.handle(body, fake, userId);
        if (answer) s.send(serverFrame({ case: "response", value: { id, body: answer } }));
      },
    });
    this.sessions.add(fake);
    fake.closed.then(() => this.sessions.delete(fake), () => this.sessions.delete(fake));
    return fake;
  }

  push(revision) {
    for (const s of this.sessions) this.pushTo(s, revision);
  }

  handle(body, fake, userId) {
    switch (body.case) {
      case "docOpen": {
        const known = body.value.knownRevision;
        if (known !== undefined) {
          const operations = this.history.slice(Number(known)).map((h, i) => ({
            docId: "d", revision: known + BigInt(i + 1), op: toTextOp(h.op), userId: h.userId, clientId: h.clientId, seq: h.seq }));
          return { case: "docOpen", value: { docId: "d", revision: this.revision, role: 2, state: { case: "catchUp", value: { operations } } } };
        }
        return { case: "docOpen", value: { docId: "d", revision: this.revision, role: 2, state: { case: "snapshot", value: this.text } } };
      }
      case "docSubmit": {
        this.submits++;
        const { baseRevision, op, clientId, seq } = body.value;
        if (this.resyncNextSubmit) {
          this.resyncNextSubmit = false;
          return { case: "error", value: { code: 108, name: "RESYNC_REQUIRED", message: "base revision too old",
            resync: { docId: "d", revision: this.revision, text: this.text } } };
        }
        if (this.loseNextSubmit) {
          this.loseNextSubmit = false;
          fake.lose();
          return undefined;
        }
        const dup = this.history.find((h) => h.clientId === clientId && h.seq === seq);
        if (dup) return { case: "docSubmit", value: { revision: BigInt(this.history.indexOf(dup) + 1), duplicate: true } };
        let o = fromTextOp(op);
        for (const h of this.history.slice(Number(baseRevision))) o = TextOperation.transform(o, h.op)[0];
        this.text = o.apply(this.text);
        this.history.push({ op: o, clientId, seq, userId });
        if (this.dropNextSubmitDelivery) {
          this.dropNextSubmitDelivery = false;
          fake.lose(); // applied, but the connection dies before anything is delivered
          for (const s of this.sessions) if (s !== fake) this.pushTo(s, this.revision);
          return undefined;
        }
        this.push(this.revision);
        return { case: "docSubmit", value: { revision: this.revision, duplicate: false } };
      }
      case "docClose":
        return { case: "docClose", value: {} };
      default:
        return undefined;
    }
  }

  pushTo(s, revision) {
    const h = this.history[Number(revision) - 1];
    s.openPushStream(StreamKind.COLLAB, [{ stream: "doc/d", offset: revision, event: { case: "docOperation", value: {
      docId: "d", revision, op: toTextOp(h.op), userId: h.userId, clientId: h.clientId, seq: h.seq } } }]);
  }
}

async function user(server, name, clock = new VirtualClock()) {
  const tutti = new Tutti({ url: "https://127.0.0.1:1/tutti", token: name, transport: () => server.connect(name), clock, random: () => 0 });
  await tutti.connected();
  const doc = await TuttiDocument.open(tutti, "d", `${name}-client`);
  return { tutti, doc, clock };
}

const settled = (server, ...docs) => until(
  () => docs.every((d) => d.synchronized && d.text === server.text && d.revision === server.revision),
  "every document synchronized with the server",
);

test("concurrent edits with emoji, CJK and combining marks converge on the server's text", async () => {
  const server = new OtServer();
  server.text = "ab";
  const a = await user(server, "alice");
  const b = await user(server, "bob");
  const c = await user(server, "carol");
  // Edits at once, each on its own stale view; more before any acknowledgement.
  a.doc.insert(1, "🎉👩‍👩‍👧");
  b.doc.insert(0, "你好");
  c.doc.insert(2, "e\u0301");
  a.doc.insert(0, "«");
  b.doc.delete(2, 1);
  c.doc.insert(0, "ñ");
  await settled(server, a.doc, b.doc, c.doc);
  assert.equal(a.doc.text, b.doc.text);
  assert.equal(b.doc.text, c.doc.text);
  const cps = (t) => Array.from(t).length;
  const inserted = ["🎉👩‍👩‍👧", "你好", "e\u0301", "«", "ñ"].reduce((n, t) => n + cps(t), 0);
  assert.equal(cps(server.text), cps("ab") + inserted - 1, "every insert once, bob's one deletion");
  for (const u of [a, b, c]) u.tutti.close();
});

test("undo reverts only one's own edit, transformed past others' edits; redo restores it", async () => {
  const server = new OtServer();
  server.text = "hello";
  const a = await user(server, "alice");
  const b = await user(server, "bob");
  a.doc.insert(5, " world");
  await settled(server, a.doc, b.doc);
  b.doc.insert(0, ">> ");
  b.doc.insert(8, "!"); // after "hello" in ">> hello world"
  await settled(server, a.doc, b.doc);
  assert.equal(server.text, ">> hello! world");
  assert.ok(a.doc.canUndo);
  a.doc.undo();
  await settled(server, a.doc, b.doc);
  assert.equal(server.text, ">> hello!", "alice's ' world' is gone, bob's edits stay");
  a.doc.redo();
  await settled(server, a.doc, b.doc);
  assert.equal(server.text, ">> hello! world");
  assert.equal(b.doc.canUndo, true);
  for (const u of [a, b]) u.tutti.close();
});

test("a remote cursor from an older revision is placed through the operations since", async () => {
  const server = new OtServer();
  server.text = "0123456789";
  const a = await user(server, "alice");
  const b = await user(server, "bob");
  // Bob's cursor at 5 (before "5") at revision 0; then alice inserts "ABC" at 2.
  a.doc.insert(2, "ABC");
  await settled(server, a.doc, b.doc);
  for (const s of server.sessions) {
    s.openPushStream(StreamKind.COLLAB, [{ event: { case: "docCursor", value: { docId: "d", revision: 0n, anchor: 5n, head: 5n, userId: "bob", sessionId: "bob-1" } } }]);
  }
  await until(() => a.doc.participants().some((p) => p.userId === "bob" && p.selection), "bob's cursor");
  const sel = a.doc.participants().find((p) => p.userId === "bob").selection;
  assert.equal(sel.head, 8, "moved past the 3 inserted characters");
  assert.equal(a.doc.text.slice(sel.head, sel.head + 1), "5");
  for (const u of [a, b]) u.tutti.close();
});

test("after a lost connection the document re-opens from its revision: an applied edit is acknowledged by the catch-up, not applied twice", async () => {
  const server = new OtServer();
  server.text = "base";
  const a = await user(server, "alice");
  const b = await user(server, "bob");
  server.dropNextSubmitDelivery = true;
  a.doc.insert(4, "+1"); // applied by the server, but alice never hears back
  await until(() => a.tutti.state === "reconnecting", "alice reconnecting");
  a.doc.insert(0, "offline "); // edits go on while disconnected
  b.doc.insert(0, "bob ");
  await until(() => b.doc.synchronized && b.doc.revision === 2n, "bob acknowledged");
  a.clock.fireAll(); // the backoff elapses
  await settled(server, a.doc, b.doc);
  assert.equal(server.text, "offline bob base+1");
  assert.equal((server.text.match(/\+1/g) ?? []).length, 1, "the first edit was applied once");
  assert.equal(a.tutti.reconnects, 1);
  for (const u of [a, b]) u.tutti.close();
});

test("an edit lost with the connection is sent again after the reconnect, with the same seq", async () => {
  const server = new OtServer();
  server.text = "x";
  const a = await user(server, "alice");
  server.loseNextSubmit = true;
  a.doc.insert(1, "y");
  await until(() => a.tutti.state === "reconnecting", "alice reconnecting");
  a.clock.fireAll();
  await settled(server, a.doc);
  assert.equal(server.text, "xy");
  assert.equal(server.submits, 2, "sent twice");
  assert.equal(server.history.length, 1, "applied once");
  assert.equal(server.history[0].seq, 1n, "with the first seq");
  a.tutti.close();
});

test("RESYNC_REQUIRED: the document starts over from the server's text and reports the dropped edit", async () => {
  const server = new OtServer();
  server.text = "abc";
  const a = await user(server, "alice");
  const errors = [];
  a.doc.onError((e) => errors.push(`${e.code} ${e.name}`));
  const changes = [];
  a.doc.onChange((c) => changes.push(c.remote));
  server.resyncNextSubmit = true;
  a.doc.insert(3, "X");
  await until(() => errors.length === 1, "error reported");
  await settled(server, a.doc);
  assert.equal(a.doc.text, "abc");
  assert.deepEqual(errors, ["108 RESYNC_REQUIRED"]);
  assert.deepEqual(changes, [false, true], "the local edit, then the snapshot replacing it");
  assert.equal(a.doc.canUndo, false);
  a.doc.insert(0, ">");
  await settled(server, a.doc);
  assert.equal(server.text, ">abc", "editing goes on");
  a.tutti.close();
});

// Resilience end to end: the server restarts (GOING_AWAY to every session) and one
// browser stays cut off for a while (its requests for /api/info and /cert-hash fail,
// so its reconnect attempts fail and back off) while the other user keeps sending and
// editing. After the automatic reconnect every missed message reaches the app exactly
// once, the unread badge is exact, and the document converges with the server's text,
// edits made offline included. Same prerequisites as the other browser tests.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { RESULTS, appHarness, missing, startServer, stopServer, suiteOrSkip } from "../tools/e2e.mjs";

const WAIT_MS = 40_000;

suiteOrSkip("resilience end-to-end", missing(["index.html", "app.js"]), suite);

function suite() {
  const h = appHarness("tutti-resilience-e2e-");
  before(h.start);
  after(h.stop);

  async function signIn(user) {
    const s = await h.openSignedIn(user);
    await waitFor(s, () => document.querySelector("#conn")?.dataset.state === "connected", null, "connected");
    return s;
  }

  async function waitFor(s, fn, arg, what, timeout = WAIT_MS) {
    try {
      await s.page.waitForFunction(fn, arg, { timeout });
    } catch {
      const conn = await s.page.textContent("#conn").catch(() => "?");
      assert.fail(`${s.user}: ${what}: not within ${timeout} ms (conn: ${conn})\nconsole:\n${s.logs.join("\n")}\n` +
        `server output:\n${h.server.output().slice(-3000)}`);
    }
  }

  const docState = (s) => s.page.evaluate(() => {
    const { doc, view } = window.tuttiDoc;
    return { editor: view.state.doc.toString(), text: doc.text, synced: doc.synchronized, revision: String(doc.revision) };
  });

  test("server restart, one browser cut off while the other sends and edits: nothing lost, nothing twice", async () => {
    const alice = await signIn("alice");
    const bob = await signIn("bob");

    // Bob creates a room with alice and a document shared with her.
    await bob.page.fill("#new-room-name", "Ops");
    await bob.page.fill("#new-room-people", "alice");
    await bob.page.click("#new-room-submit");
    await waitFor(bob, () => document.querySelector("#room-title")?.textContent === "Ops", null, "room open");
    const roomId = await bob.page.$eval("#room-list li[aria-current=true]", (li) => li.dataset.room);
    // Alice accepts the invitation.
    await alice.page.click("#tab-chats");
    await waitFor(alice, (r) => !!document.querySelector(`#invite-list li[data-room="${r}"]`), roomId, "invitation");
    await alice.page.click(`#invite-list li[data-room="${roomId}"] .invite-accept`);
    await waitFor(alice, (r) => !!document.querySelector(`#room-list li[data-room="${r}"]`), roomId, "room joined");
    await bob.page.click("#tab-docs");
    await bob.page.fill("#doc-id", "runbook");
    await bob.page.click("#doc-create");
    await waitFor(bob, () => !!document.querySelector("#editor .cm-content"), null, "doc open");
    await bob.page.fill("#doc-share-user", "alice");
    await bob.page.click("#doc-share-submit");
    await waitFor(bob, () => document.querySelector("#doc-status")?.textContent.startsWith("Shared with alice"), null, "shared");
    await bob.page.focus("#editor .cm-content");
    await bob.page.keyboard.type("Runbook.");

    // Alice opens the document; she counts every chat message the library delivers.
    await alice.page.click("#tab-docs");
    await alice.page.fill("#doc-id", "bob~runbook");
    await alice.page.click("#doc-open");
    await waitFor(alice, () => window.tuttiDoc?.doc.text === "Runbook.", null, "alice has the document");
    await alice.page.evaluate(() => {
      window.delivered = [];
      window.tuttiApp.tutti.onMessage((m) => window.delivered.push(Number(m.offset)));
    });
    const send = async (line) => {
      await bob.page.click("#tab-chats");
      await bob.page.click(`#room-list li[data-room="${roomId}"] button`);
      await bob.page.fill("#composer-input", line);
      await bob.page.press("#composer-input", "Enter");
    };
    const badgeIs = (n) => [roomId, String(n)];
    const badgeTest = ([r, n]) => {
      const b = document.querySelector(`#room-list li[data-room="${r}"] .room-unread`);
      return !!b && b.dataset.count === n;
    };
    await send("m1");
    await waitFor(alice, badgeTest, badgeIs(1), "alice's badge 1");
    // Bob back to the document.
    await bob.page.click("#tab-docs");
    await bob.page.click('#doc-list li[data-doc="bob~runbook"] button');
    await waitFor(bob, () => window.tuttiDoc?.doc.text === "Runbook.", null, "bob back in the document");

    // Cut alice off: her reconnects cannot even learn where to go.
    await alice.page.route("**/api/info", (route) => route.abort());
    await alice.page.route("**/cert-hash", (route) => route.abort());
    const wtPort = new URL(h.urls.webtransport).port;
    const httpPort = new URL(h.urls.page).port;
    const t0 = Date.now();
    await stopServer(h.server.child);
    h.server = startServer(h.dirs, {}, { listen: `127.0.0.1:${wtPort}`, http: `127.0.0.1:${httpPort}` });
    await h.server.ready;
    await waitFor(alice, () => document.querySelector("#conn")?.dataset.state === "reconnecting", null, "alice reconnecting");
    await waitFor(bob, () => document.querySelector("#conn")?.dataset.state === "connected" && window.tuttiApp.tutti.reconnects >= 1, null, "bob reconnected");
    console.log(`server restarted; bob reconnected ${Date.now() - t0} ms after the stop`);

    // Bob keeps editing and sending; alice edits offline.
    await bob.page.focus("#editor .cm-content");
    await bob.page.keyboard.press("Control+End");
    await bob.page.keyboard.type(" Bob: restart done 🚀.");
    await alice.page.focus("#editor .cm-content");
    await alice.page.keyboard.press("Control+Home");
    await alice.page.keyboard.type("[alice offline ✍️] ");
    for (const line of ["m2", "m3", "m4 ü", "m5 日本", "m6"]) await send(line);
    assert.equal(await alice.page.$eval("#conn", (c) => c.dataset.state), "reconnecting", "alice was cut off the whole time");
    assert.deepEqual(await alice.page.evaluate(() => window.delivered), [1]);

    // Alice's network comes back: she reconnects by herself.
    const t1 = Date.now();
    await alice.page.unroute("**/api/info");
    await alice.page.unroute("**/cert-hash");
    await waitFor(alice, () => document.querySelector("#conn")?.dataset.state === "connected", null, "alice reconnected");
    console.log(`alice reconnected ${Date.now() - t1} ms after her network came back`);
    await waitFor(alice, badgeTest, badgeIs(6), "alice's badge exactly 6");
    await waitFor(alice, () => window.delivered.length >= 6, null, "six messages delivered");
    assert.deepEqual(await alice.page.evaluate(() => window.delivered), [1, 2, 3, 4, 5, 6], "each message once, in order");

    // The document converged: both editors, both documents and the server agree.
    // (Bob left it for the room; he opens it again.)
    await bob.page.click("#tab-docs");
    await bob.page.click('#doc-list li[data-doc="bob~runbook"] button');
    const deadline = Date.now() + WAIT_MS;
    let a;
    let b;
    for (;;) {
      [a, b] = await Promise.all([docState(alice), docState(bob)]);
      if (a.synced && b.synced && a.text === b.text && a.editor === a.text && b.editor === b.text && a.revision === b.revision) break;
      if (Date.now() > deadline) assert.fail(`no convergence: ${JSON.stringify({ a, b })}`);
      await alice.page.waitForTimeout(50); // polling interval of a bounded wait
    }
    assert.equal(a.text, "[alice offline ✍️] Runbook. Bob: restart done 🚀.");
    // The server's stored text, as a fresh session of bob's opens it.
    const fresh = await bob.context.newPage();
    await fresh.goto(bob.page.url());
    await fresh.waitForFunction(() => document.querySelector("#conn")?.dataset.state === "connected", null, { timeout: WAIT_MS });
    const stored = await fresh.evaluate(async () => {
      const open = await window.tuttiApp.tutti.call({ case: "docOpen", value: { docId: "bob~runbook" } });
      return open.state.value;
    });
    await fresh.close();
    assert.equal(stored, a.text, "the server's stored text");

    // In the room: every message once, in order.
    await alice.page.click("#tab-chats");
    await alice.page.click(`#room-list li[data-room="${roomId}"] button`);
    await waitFor(alice, () => document.querySelectorAll("#messages .msg").length === 6, null, "six messages shown");
    assert.deepEqual(await alice.page.$$eval("#messages .msg-text", (ns) => ns.map((n) => n.textContent)), ["m1", "m2", "m3", "m4 ü", "m5 日本", "m6"]);
    await waitFor(alice, badgeTest, badgeIs(0), "badge back to 0");
    await alice.page.screenshot({ path: join(RESULTS, "app-after-reconnect.png") });
    await alice.context.close();
    await bob.context.close();
  });
}

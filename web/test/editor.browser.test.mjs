// The collaborative editor end to end: three browser contexts (three users) type
// into one document at the same time, with emoji, CJK and combining marks, through
// CodeMirror's keyboard handling; the three editors and the server's stored text end
// byte-identical. A remote caret is drawn at the right character after concurrent
// edits, and undo reverts only one's own edit. A document shared with a user shows
// in their documents list (live, or from the server at sign-in) with their role,
// without having been opened in that browser. Same prerequisites as the other
// browser tests (tools/e2e.mjs).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { RESULTS, appHarness, missing, suiteOrSkip } from "../tools/e2e.mjs";

const WAIT_MS = 20_000;

suiteOrSkip("editor end-to-end", missing(["index.html", "app.js"]), suite);

/** Whether `sub`'s code points appear in `text` in order (others' may interleave). */
function isSubsequence(sub, text) {
  const t = Array.from(text);
  let i = 0;
  for (const ch of Array.from(sub)) {
    while (i < t.length && t[i] !== ch) i++;
    if (i === t.length) return false;
    i++;
  }
  return true;
}

function suite() {
  const h = appHarness("tutti-editor-e2e-");
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
      const status = await s.page.textContent("#doc-status").catch(() => "?");
      const err = await s.page.textContent("#app-error").catch(() => "?");
      assert.fail(`${s.user}: ${what}: not within ${timeout} ms (doc status: ${status}; error: ${err})\n` +
        `console:\n${s.logs.join("\n")}\nserver output:\n${h.server.output().slice(-3000)}`);
    }
  }

  /** Opens (or creates) a document; a created one's id is namespaced: "<user>~<id>". */
  async function openDoc(s, id, create = false) {
    await s.page.click("#tab-docs");
    await s.page.fill("#doc-id", id);
    await s.page.click(create ? "#doc-create" : "#doc-open");
    const docId = create ? `${s.user}~${id}` : id;
    await waitFor(s, (d) => document.querySelector("#doc-title")?.textContent === d && !!document.querySelector("#editor .cm-content"), docId, `${docId} open`);
    return docId;
  }

  /** Opens a document from the list, where it must appear with `role`. */
  async function openFromList(s, id, role) {
    await s.page.click("#tab-docs");
    await waitFor(s, ([d, r]) => document.querySelector(`#doc-list li[data-doc="${d}"]`)?.dataset.role === r, [id, role], `${id} listed as ${role}`);
    await s.page.click(`#doc-list li[data-doc="${id}"] button`);
    await waitFor(s, (d) => document.querySelector("#doc-title")?.textContent === d && !!document.querySelector("#editor .cm-content"), id, `${id} open`);
  }

  /** The editor's text, the document's text and whether all edits are acknowledged. */
  const editorState = (s) => s.page.evaluate(() => {
    const { doc, view } = window.tuttiDoc;
    return { editor: view.state.doc.toString(), doc: doc.text, synced: doc.synchronized, revision: String(doc.revision) };
  });

  /** Waits until every editor is synchronized with the same text and revision. */
  async function converged(users) {
    const deadline = Date.now() + WAIT_MS;
    let states;
    for (;;) {
      states = await Promise.all(users.map(editorState));
      const same = states.every((st) => st.synced && st.editor === st.doc && st.doc === states[0].doc && st.revision === states[0].revision);
      if (same) return states[0].doc;
      if (Date.now() > deadline) assert.fail(`no convergence within ${WAIT_MS} ms: ${JSON.stringify(states, null, 1)}`);
      await users[0].page.waitForTimeout(50); // polling interval of a bounded wait
    }
  }

  /** The text the server stores: a fresh session of the owner opens the document. */
  async function serverText(owner, id) {
    const page = await owner.context.newPage();
    try {
      await page.goto(owner.page.url());
      await page.waitForFunction(() => document.querySelector("#conn")?.dataset.state === "connected", null, { timeout: WAIT_MS });
      return await page.evaluate(async (d) => {
        const open = await window.tuttiApp.tutti.call({ case: "docOpen", value: { docId: d } });
        return open.state.value;
      }, id);
    } finally {
      await page.close();
    }
  }

  test("three users type at once with emoji, CJK and combining marks; cursors; own undo", async () => {
    const alice = await signIn("alice");
    const bob = await signIn("bob");
    const carol = await signIn("carol");
    const plan = await openDoc(alice, "plan", true);
    for (const who of ["bob", "carol"]) {
      await alice.page.fill("#doc-share-user", who);
      await alice.page.click("#doc-share-submit");
      await waitFor(alice, (w) => document.querySelector("#doc-status")?.textContent.startsWith(`Shared with ${w}`), who, `shared with ${who}`);
    }
    // Bob and Carol were signed in before the share: the document appears in their
    // lists by itself.
    await openFromList(bob, plan, "editor");
    await openFromList(carol, plan, "editor");
    assert.equal(await bob.page.textContent(`#doc-list li[data-doc="${plan}"] .room-last`), "shared by alice");
    await waitFor(alice, () => document.querySelectorAll("#doc-people li").length === 2, null, "who is here: bob and carol");

    // All three type at the same time, at the same place, one key at a time.
    const lines = {
      alice: "Hi 🎉 👩‍👩‍👧 done.",
      bob: "你好，世界 😀 ok",
      carol: "e\u0301te\u0301 cafe\u0301 n\u0303",
    };
    const t0 = Date.now();
    await Promise.all([alice, bob, carol].map(async (s) => {
      await s.page.focus("#editor .cm-content");
      await s.page.keyboard.type(lines[s.user], { delay: 15 });
    }));
    const text = await converged([alice, bob, carol]);
    console.log(`three editors converged ${Date.now() - t0} ms after typing started (${Array.from(text).length} code points)`);
    for (const [user, line] of Object.entries(lines)) {
      assert.ok(isSubsequence(line, text), `${user}'s keystrokes are all there, in order: ${JSON.stringify(text)}`);
    }
    assert.equal(Array.from(text).length, Object.values(lines).reduce((n, l) => n + Array.from(l).length, 0));
    const stored = await serverText(alice, plan);
    assert.ok(Buffer.from(stored, "utf8").equals(Buffer.from(text, "utf8")), `server ${JSON.stringify(stored)} vs editors ${JSON.stringify(text)}`);

    // Alice types "XY" at the end and puts her caret between X and Y.
    await alice.page.focus("#editor .cm-content");
    await alice.page.keyboard.press("Control+End");
    await alice.page.keyboard.type("XY");
    await alice.page.keyboard.press("ArrowLeft");
    await converged([alice, bob, carol]);
    // Meanwhile bob and carol insert text before it.
    await Promise.all([bob, carol].map(async (s) => {
      await s.page.focus("#editor .cm-content");
      await s.page.keyboard.press("Control+Home");
      await s.page.keyboard.type(s.user === "bob" ? "前 " : "👍🏽 ", { delay: 10 });
    }));
    await converged([alice, bob, carol]);
    // On bob's screen, alice's caret sits between X and Y.
    await waitFor(bob, () => {
      const caret = document.querySelector('#editor .remote-caret[data-user="alice"]');
      if (!caret) return false;
      const { view } = window.tuttiDoc;
      const pos = view.posAtDOM(caret);
      const t = view.state.doc.toString();
      return t.slice(pos - 1, pos) === "X" && t.slice(pos, pos + 1) === "Y";
    }, null, "alice's caret between X and Y on bob's screen");
    assert.equal(await bob.page.textContent('#editor .remote-caret[data-user="alice"] .remote-label'), "alice");
    await bob.page.screenshot({ path: join(RESULTS, "app-editor.png") });

    // Alice's undo removes her "XY" (her last edit) and nothing of bob's or carol's.
    const before = await converged([alice, bob, carol]);
    await alice.page.keyboard.press("Control+z");
    const undone = await converged([alice, bob, carol]);
    assert.equal(undone, before.replace("XY", ""), "only alice's XY is gone");
    assert.ok(undone.startsWith("前 ") || undone.startsWith("👍🏽 "), "bob's and carol's edits stay");
    assert.ok(undone.includes("前 ") && undone.includes("👍🏽 "));
    // Redo puts it back.
    await alice.page.keyboard.press("Control+y");
    assert.equal(await converged([alice, bob, carol]), before);
    assert.equal(await serverText(alice, plan), before);

    for (const s of [alice, bob, carol]) await s.context.close();
  });

  test("a viewer signed in after the share finds the document listed, sees edits live and cannot type", async () => {
    const owner = await signIn("olga");
    const readme = await openDoc(owner, "readme", true);
    await owner.page.fill("#doc-share-user", "victor");
    await owner.page.selectOption("#doc-share-role", "viewer");
    await owner.page.click("#doc-share-submit");
    await waitFor(owner, () => document.querySelector("#doc-status")?.textContent.startsWith("Shared with victor"), null, "shared");
    await waitFor(owner, (d) => document.querySelector(`#doc-list li[data-doc="${d}"]`)?.dataset.role === "owner", readme, "readme in olga's list");
    // A fresh browser context: nothing of this document was ever opened in it.
    const viewer = await signIn("victor");
    assert.equal(await viewer.page.evaluate(() => localStorage.length), 0);
    await openFromList(viewer, readme, "viewer");
    assert.equal(await viewer.page.textContent("#doc-role"), "(viewer)");
    await owner.page.focus("#editor .cm-content");
    await owner.page.keyboard.type("for your eyes");
    await waitFor(viewer, () => window.tuttiDoc.view.state.doc.toString() === "for your eyes", null, "live text");
    await viewer.page.focus("#editor .cm-content");
    await viewer.page.keyboard.type("nope");
    await owner.page.keyboard.type("!");
    await waitFor(viewer, () => window.tuttiDoc.view.state.doc.toString() === "for your eyes!", null, "viewer's keys ignored");
    await owner.context.close();
    await viewer.context.close();
  });
}

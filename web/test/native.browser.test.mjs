// A native Rust client (examples/peer.rs on `tutti::client`, over raw QUIC) and a
// browser (the app, over WebTransport) in the same room and the same document: each
// sees the other's messages and edits. Needs the example built next to the server:
// `cargo build --example peer` (or TUTTI_PEER=path); otherwise skipped (failed under CI).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { TUTTI_BIN, cleanEnv, devToken, launchBrowser, missing, startServer, stopServer, suiteOrSkip } from "../tools/e2e.mjs";

const PEER = process.env.TUTTI_PEER || join(dirname(TUTTI_BIN), "examples", "peer");
const WAIT_MS = 20_000;

const why = [missing(["index.html", "app.js"]), existsSync(PEER) ? undefined : `no native peer at ${PEER} (cargo build --example peer, or set TUTTI_PEER)`]
  .filter(Boolean).join("; ") || undefined;
suiteOrSkip("native client and browser", why, suite);

/** Runs the peer; `expect(re)` resolves with the first line (from now on) matching `re`. */
function startPeer(args) {
  const child = spawn(PEER, args, { env: cleanEnv(), stdio: ["pipe", "pipe", "pipe"] });
  const lines = [];
  const waiters = [];
  let stderr = "";
  child.stderr.on("data", (d) => { stderr += d; });
  createInterface({ input: child.stdout }).on("line", (line) => {
    lines.push(line);
    for (const w of [...waiters]) {
      const m = w.re.exec(line);
      if (m) {
        waiters.splice(waiters.indexOf(w), 1);
        clearTimeout(w.timer);
        w.resolve(m);
      }
    }
  });
  return {
    child,
    lines,
    send(line) { child.stdin.write(`${line}\n`); },
    expect(re, what = String(re)) {
      return new Promise((resolve, reject) => {
        const w = { re, resolve };
        w.timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`peer: no line matching ${what} within ${WAIT_MS} ms; output:\n${lines.join("\n")}\n${stderr}`));
        }, WAIT_MS);
        waiters.push(w);
      });
    },
    /** Asks for the document's text until `ok(parsed)` holds (bounded). */
    async textUntil(doc, ok) {
      const deadline = Date.now() + WAIT_MS;
      for (;;) {
        const pending = this.expect(new RegExp(`^text ${doc} (\\d+) (true|false) (.*)$`));
        this.send(`text ${doc}`);
        const m = await pending;
        const st = { revision: m[1], synced: m[2] === "true", text: JSON.parse(m[3]) };
        if (ok(st)) return st;
        if (Date.now() > deadline) throw new Error(`peer text never matched: ${JSON.stringify(st)}`);
        await new Promise((r) => setTimeout(r, 50)); // polling interval of a bounded wait
      }
    },
  };
}

function suite() {
  const root = mkdtempSync(join(tmpdir(), "tutti-native-e2e-"));
  const dirs = { data: join(root, "data"), certs: join(root, "certs"), browser: join(root, "browser") };
  let server;
  let urls;
  let browser;
  let peer;

  before(async () => {
    for (const d of Object.values(dirs)) mkdirSync(d, { recursive: true });
    server = startServer(dirs);
    urls = await server.ready;
    browser = await launchBrowser(dirs.browser);
  });

  after(async () => {
    peer?.child.kill();
    await browser?.close().catch(() => {});
    await stopServer(server?.child);
    rmSync(root, { recursive: true, force: true });
  });

  test("a Rust client and a browser chat in one room and edit one document", async () => {
    assert.ok(urls.quic, `the server prints its raw QUIC address; output:\n${server.output()}`);
    const context = await browser.newContext();
    const page = await context.newPage();
    const wait = (fn, arg, what) => page.waitForFunction(fn, arg, { timeout: WAIT_MS }).catch(() => assert.fail(`browser: ${what}`));
    await page.goto(urls.page);
    await page.fill("#signin-name", "alice");
    await page.click("#signin-submit");
    await wait(() => document.querySelector("#conn")?.dataset.state === "connected", null, "connected");
    await page.fill("#new-room-name", "Mixed");
    await page.fill("#new-room-people", "rusty");
    await page.click("#new-room-submit");
    await wait(() => document.querySelector("#room-title")?.textContent === "Mixed", null, "room open");
    const roomId = await page.$eval("#room-list li[aria-current=true]", (li) => li.dataset.room);

    const pin = (await (await fetch(new URL("/cert-hash", urls.page))).json()).hashes[0].value;
    const token = await devToken(urls.page, { user: "rusty" });
    peer = startPeer(["--addr", urls.quic, "--pin", pin, "--token", token]);
    await peer.expect(/^ready rusty$/);
    // Rusty was invited into the room: he accepts.
    peer.send(`accept ${roomId}`);
    await peer.expect(new RegExp(`^accepted ${roomId}$`));

    // Rust -> browser.
    peer.send(`send ${roomId} hello from Rust 🦀`);
    await peer.expect(new RegExp(`^sent ${roomId} 1$`));
    await wait(() => [...document.querySelectorAll("#messages .msg")].some((m) =>
      m.querySelector(".msg-sender")?.textContent === "rusty" && m.querySelector(".msg-text")?.textContent === "hello from Rust 🦀"), null, "the Rust message");
    // Browser -> Rust.
    const got = peer.expect(new RegExp(`^message ${roomId} 2 alice (.*)$`));
    await page.fill("#composer-input", "hello from the browser ✓");
    await page.press("#composer-input", "Enter");
    assert.equal(JSON.parse((await got)[1]), "hello from the browser ✓");

    // One document, edited from both sides at once.
    await page.click("#tab-docs");
    await page.fill("#doc-id", "shared");
    await page.click("#doc-create");
    await wait(() => !!document.querySelector("#editor .cm-content"), null, "doc open");
    await page.fill("#doc-share-user", "rusty");
    await page.click("#doc-share-submit");
    await wait(() => document.querySelector("#doc-status")?.textContent.startsWith("Shared with rusty"), null, "shared");
    // A chosen document id is namespaced by its creator.
    peer.send("open alice~shared");
    await peer.expect(/^opened alice~shared \d+$/);
    await page.focus("#editor .cm-content");
    const typing = page.keyboard.type("Browser é🎉 ", { delay: 10 });
    peer.send("insert alice~shared 0 Rust 🦀 ");
    peer.send("insert alice~shared 0 [n] ");
    await typing;
    const browserState = () => page.evaluate(() => ({ text: window.tuttiDoc.doc.text, synced: window.tuttiDoc.doc.synchronized, revision: String(window.tuttiDoc.doc.revision) }));
    let b;
    const st = await peer.textUntil("alice~shared", (p) => {
      return p.synced && p.text.length === "[n] Rust 🦀 Browser é🎉 ".length;
    });
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      b = await browserState();
      if (b.synced && b.revision === st.revision) break;
      if (Date.now() > deadline) assert.fail(`browser never reached revision ${st.revision}: ${JSON.stringify(b)}`);
      await page.waitForTimeout(50); // polling interval of a bounded wait
    }
    assert.equal(b.text, st.text, "the browser and the Rust client hold the same text");
    assert.ok(st.text.includes("Rust 🦀 ") && st.text.includes("[n] "), st.text);
    assert.equal(await page.evaluate(() => window.tuttiDoc.view.state.doc.toString()), st.text, "and the editor shows it");
    peer.send("quit");
    await context.close();
  });
}

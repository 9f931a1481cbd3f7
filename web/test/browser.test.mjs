// End-to-end: the real `tutti serve` binary, the connection diagnostic page
// (web/dist/debug.html) and headless Chromium talking WebTransport to it.
//
//   TUTTI_BIN   the server binary (default: ../target/debug/tutti)
//   CHROMIUM    the browser (default: /usr/bin/chromium)
//   CI          when set, a missing binary or browser fails instead of skipping
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import {
  TUTTI_BIN, RESULTS, cleanEnv, launchBrowser, missing, startServer, stopServer, suiteOrSkip,
} from "../tools/e2e.mjs";

const CONNECT_TIMEOUT_MS = 20_000;

suiteOrSkip("browser end-to-end", missing(["debug.html", "debug.js"]), suite);

/** An HS256 JWT for `sub`, signed with a key the server has never seen. */
function forgedJwt(sub) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, iat: now, exp: now + 3600 })}`;
  const sig = createHmac("sha256", randomBytes(32)).update(head).digest("base64url");
  return `${head}.${sig}`;
}

function suite() {
  const root = mkdtempSync(join(tmpdir(), "tutti-web-e2e-"));
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

  /** Opens the page in a fresh context; collects console output for failure messages. */
  async function open(fragment = "") {
    const context = await browser.newContext();
    const page = await context.newPage();
    const logs = [];
    page.on("console", (m) => logs.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`[pageerror] ${e.message}`));
    await page.goto(new URL("/debug", urls.page).href + fragment);
    return { page, context, logs };
  }

  async function waitForState(page, logs, want) {
    try {
      await page.waitForFunction(
        (w) => document.querySelector("#state")?.textContent === w,
        want,
        { timeout: CONNECT_TIMEOUT_MS },
      );
    } catch {
      const state = await page.textContent("#state").catch(() => "?");
      const error = await page.textContent("#error").catch(() => "?");
      const events = await page.textContent("#log").catch(() => "?");
      assert.fail(
        `#state stayed "${state}" (wanted "${want}"); #error: ${error}\nevents: ${events}\n` +
        `console:\n${logs.join("\n")}\nserver output:\n${server.output().slice(-4000)}`,
      );
    }
  }

  const text = (page, sel) => page.textContent(sel).then((t) => (t ?? "").trim());

  test("server serves the page, /api/info and /cert-hash", async () => {
    const page = await fetch(urls.page);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /<script[^>]+app\.js/);
    const debug = await fetch(new URL("/debug.html", urls.page));
    assert.equal(debug.status, 200);
    assert.match(await debug.text(), /<script[^>]+debug\.js/);
    const info = await (await fetch(new URL("/api/info", urls.page))).json();
    assert.equal(info.webtransport, urls.webtransport);
    assert.equal(info.dev_mode, true);
    const hashes = await (await fetch(new URL("/cert-hash", urls.page))).json();
    assert.equal(hashes.hashes[0].algorithm, "sha-256");
    assert.match(hashes.hashes[0].value, /^[0-9a-f]{64}$/);
  });

  test("`tutti token` without a secret and without --dev refuses", async () => {
    await assert.rejects(
      promisify(execFile)(TUTTI_BIN, ["token", "--user", "alice", "--data-dir", dirs.data], { env: cleanEnv(), timeout: 30_000 }),
      (e) => /no token secret/.test(e.stderr),
    );
  });

  test("a token from `tutti token --dev` connects as alice", async () => {
    const { stdout } = await promisify(execFile)(
      TUTTI_BIN,
      ["token", "--dev", "--user", "alice", "--data-dir", dirs.data],
      { env: cleanEnv(), timeout: 30_000 },
    );
    const token = stdout.trim();
    assert.ok(token.length > 20 && !token.includes("\n"), `token: ${JSON.stringify(stdout)}`);

    const { page, context, logs } = await open(`#token=${encodeURIComponent(token)}`);
    try {
      await waitForState(page, logs, "connected");
      assert.equal(await text(page, "#user"), "alice");
      assert.ok((await text(page, "#session")).length > 0, "#session is filled in");
      assert.ok((await text(page, "#node")).length > 0, "#node is filled in");
      await page.waitForFunction(() => /ms$/.test(document.querySelector("#rtt")?.textContent ?? ""), null, { timeout: 10_000 });

      // Request + push: the Echo button asks for a response and a push.
      await page.click("#echo");
      await page.waitForFunction(() => {
        const log = document.querySelector("#log")?.textContent ?? "";
        return log.includes("echo response:") && log.includes("push SYSTEM");
      }, null, { timeout: 10_000 }).catch(async () => {
        assert.fail(`no echo response and push; events: ${await text(page, "#log")}`);
      });

      // Pipelined requests from the page's client, answered by id.
      const echoed = await page.evaluate(async () => {
        const { client } = window.tutti;
        const texts = Array.from({ length: 20 }, (_, i) => `message ${i}`);
        const out = await Promise.all(texts.map((t) => client.echo(t)));
        return out.map((r) => new TextDecoder().decode(r.payload));
      });
      assert.deepEqual(echoed, Array.from({ length: 20 }, (_, i) => `message ${i}`));

      await page.screenshot({ path: join(RESULTS, "connected-alice.png"), fullPage: true });
      await page.click("#disconnect");
      await waitForState(page, logs, "closed");
    } finally {
      await context.close();
    }
  });

  for (const [label, token] of [["a JWT signed with another key", forgedJwt("alice")], ["not-a-token", "not-a-token"]]) {
    test(`a forged token (${label}) is refused with UNAUTHORIZED`, async () => {
      const { page, context, logs } = await open(`#token=${encodeURIComponent(token)}`);
      try {
        await waitForState(page, logs, "error");
        const error = await text(page, "#error");
        assert.match(error, /UNAUTHORIZED/, `#error: ${error}`);
        assert.equal(await text(page, "#user"), "");
        if (token === "not-a-token") await page.screenshot({ path: join(RESULTS, "unauthorized.png"), fullPage: true });
      } finally {
        await context.close();
      }
    });
  }

  test("the development form connects as bob", async () => {
    const { page, context, logs } = await open();
    try {
      await page.waitForSelector("#login-form", { state: "visible", timeout: 10_000 });
      await page.fill("#name", "bob");
      await page.click("#login-submit");
      await waitForState(page, logs, "connected");
      assert.equal(await text(page, "#user"), "bob");
      await page.screenshot({ path: join(RESULTS, "connected-bob.png"), fullPage: true });
    } finally {
      await context.close();
    }
  });

  test("on a production server (configured secret) the dev form says to pass #token=", async () => {
    const prod = startServer(prodDirs, { TUTTI_JWT_SECRET: randomBytes(32).toString("hex") });
    try {
      const prodUrls = await prod.ready;
      const info = await (await fetch(new URL("/api/info", prodUrls.page))).json();
      assert.equal(info.dev_mode, false);
      const context = await browser.newContext();
      try {
        const page = await context.newPage();
        await page.goto(new URL("/debug", prodUrls.page).href);
        await page.fill("#name", "mallory");
        await page.click("#login-submit");
        await page.waitForFunction(() => document.querySelector("#state")?.textContent === "error", null, { timeout: 10_000 });
        assert.match(await text(page, "#error"), /production server: pass #token=/);
      } finally {
        await context.close();
      }
    } finally {
      await stopServer(prod.child);
    }
  });
}

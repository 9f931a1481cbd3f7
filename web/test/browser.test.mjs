// End-to-end: the real `tutti serve` binary, the built page (web/dist) and headless
// Chromium talking WebTransport to it.
//
//   TUTTI_BIN   the server binary (default: ../target/debug/tutti)
//   CHROMIUM    the browser (default: /usr/bin/chromium)
//   CI          when set, a missing binary or browser fails instead of skipping
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { WEB_DIR } from "../tools/import-ts.mjs";

const TUTTI_BIN = process.env.TUTTI_BIN || resolve(WEB_DIR, "..", "target", "debug", "tutti");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const DIST = join(WEB_DIR, "dist");
const RESULTS = join(WEB_DIR, "test-results");
const STARTUP_TIMEOUT_MS = 30_000;
const CONNECT_TIMEOUT_MS = 20_000;

/** Why the suite cannot run here, or undefined. Fails instead of skipping in CI. */
function missing() {
  const why = [];
  if (!existsSync(TUTTI_BIN)) why.push(`no server binary at ${TUTTI_BIN} (cargo build, or set TUTTI_BIN)`);
  if (!existsSync(CHROMIUM)) why.push(`no browser at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  if (!existsSync(join(DIST, "index.html")) || !existsSync(join(DIST, "app.js"))) {
    why.push(`no built page in ${DIST} (npm run build)`);
  }
  return why.length ? why.join("; ") : undefined;
}

const skipReason = missing();
if (skipReason && process.env.CI) {
  test("browser end-to-end prerequisites", () => assert.fail(skipReason));
} else if (skipReason) {
  test("browser end-to-end", { skip: skipReason }, () => {});
} else {
  suite();
}

/** Environment for child processes: no TUTTI_* settings leak in from the shell. */
function cleanEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith("TUTTI_") || k === "TUTTI_LOG") env[k] = v;
  }
  return { ...env, ...extra };
}

/** Starts `tutti serve` and resolves with the URLs it prints. */
function startServer(dirs, env = {}) {
  const args = [
    "serve",
    "--listen", "127.0.0.1:0",
    "--http", "127.0.0.1:0",
    "--data-dir", dirs.data,
    "--cert-dir", dirs.certs,
    "--web-dir", DIST,
  ];
  const child = spawn(TUTTI_BIN, args, { env: cleanEnv(env), stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  const ready = new Promise((resolvePromise, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`no "page:" line from the server within ${STARTUP_TIMEOUT_MS} ms; output:\n${output}`)),
      STARTUP_TIMEOUT_MS,
    );
    const check = () => {
      const page = /^\s*page:\s+(\S+)/m.exec(output);
      const wt = /^\s*webtransport:\s+(\S+)/m.exec(output);
      if (page && wt) {
        clearTimeout(timer);
        resolvePromise({ page: page[1], webtransport: wt[1] });
      }
    };
    child.stdout.on("data", (d) => { output += d; check(); });
    child.stderr.on("data", (d) => { output += d; });
    child.on("error", (e) => { clearTimeout(timer); reject(new Error(`cannot start ${TUTTI_BIN}: ${e.message}`)); });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (code ${code}, signal ${signal}) before it was ready; output:\n${output}`));
    });
  });
  return { child, ready, output: () => output };
}

async function stopServer(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

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
  let chromium;

  before(async () => {
    for (const d of [...Object.values(dirs), ...Object.values(prodDirs)]) mkdirSync(d, { recursive: true });
    mkdirSync(RESULTS, { recursive: true });
    server = startServer(dirs);
    urls = await server.ready;
    ({ chromium } = await import("playwright-core"));
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      // Chromium writes to ~/.config and ~/.cache even with its own profile.
      env: cleanEnv({ XDG_CONFIG_HOME: dirs.browser, XDG_CACHE_HOME: dirs.browser, TMPDIR: dirs.browser }),
    });
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
    await page.goto(urls.page + fragment);
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
    const info = await (await fetch(new URL("/api/info", urls.page))).json();
    assert.equal(info.webtransport, urls.webtransport);
    assert.equal(info.dev_mode, true);
    const hashes = await (await fetch(new URL("/cert-hash", urls.page))).json();
    assert.equal(hashes.hashes[0].algorithm, "sha-256");
    assert.match(hashes.hashes[0].value, /^[0-9a-f]{64}$/);
  });

  test("a token from `tutti token` connects as alice", async () => {
    const { stdout } = await promisify(execFile)(
      TUTTI_BIN,
      ["token", "--user", "alice", "--data-dir", dirs.data],
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
        await page.goto(prodUrls.page);
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

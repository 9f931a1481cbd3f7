// The app's download budget: what a browser fetches for / (index.html, app.css and
// app.js, CodeMirror included), gzipped, stays under BUDGET. Runs on the built
// dist/ (`npm test` builds first).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { DIST } from "../tools/e2e.mjs";

/** The budget for the app page, gzipped. */
const BUDGET_KIB = 200;

test(`the app at / is under ${BUDGET_KIB} KiB gzipped (editor included)`, () => {
  const files = ["index.html", "app.css", "app.js"];
  let total = 0;
  const sizes = {};
  for (const f of files) {
    const gz = gzipSync(readFileSync(join(DIST, f)), { level: 9 }).length;
    sizes[f] = `${(gz / 1024).toFixed(1)} KiB`;
    total += gz;
  }
  console.log(`app gzipped: ${(total / 1024).toFixed(1)} KiB (${JSON.stringify(sizes)}), budget ${BUDGET_KIB} KiB`);
  assert.ok(readFileSync(join(DIST, "app.js"), "utf8").includes("cm-editor"), "the bundle holds the editor");
  assert.ok(total < BUDGET_KIB * 1024, `${(total / 1024).toFixed(1)} KiB gzipped is over the ${BUDGET_KIB} KiB budget`);
});

test("the library builds as an ES module with type declarations", async () => {
  const lib = await import(new URL(`file://${join(DIST, "lib", "index.js")}`).href);
  for (const name of ["Tutti", "TuttiClient", "TuttiDocument", "TuttiError", "TextOperation", "backoffDelay", "fetchCertificateHashes"]) {
    assert.equal(typeof lib[name], "function", name);
  }
  assert.equal(lib.ERROR_CODES[104], "NOT_FOUND");
  const types = readFileSync(join(DIST, "lib", "types", "tutti.d.ts"), "utf8");
  assert.match(types, /export declare class Tutti\b/);
  assert.match(types, /sendMessage\(roomId: string, text: string, options\?: \{/);
});

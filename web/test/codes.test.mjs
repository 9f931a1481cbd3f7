// Pins src/codes.ts (the client's code table) against the server's source of truth,
// src/protocol/codes.rs: every code the server defines, with the same number and
// name, and nothing more.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { WEB_DIR, importTs } from "../tools/import-ts.mjs";

const { ERROR_CODES, CLOSE_CODES, shouldReconnect } = await importTs("codes");
const rust = readFileSync(join(WEB_DIR, "..", "src", "protocol", "codes.rs"), "utf8");

/** `{ number: "NAME" }` of `pub enum <name> { Variant = 100 => "NAME", ... }` in codes.rs. */
function rustCodes(name) {
  const start = rust.indexOf(`pub enum ${name} {`);
  assert.ok(start >= 0, `pub enum ${name} in codes.rs`);
  const body = rust.slice(start, rust.indexOf("\n    }", start));
  const out = {};
  for (const [, num, text] of body.matchAll(/^\s*\w+\s*=\s*(\d+)\s*=>\s*"([A-Z_]+)"\s*,/gm)) out[num] = text;
  assert.ok(Object.keys(out).length >= 5, `${name}: parsed ${JSON.stringify(out)}`);
  return out;
}

test("ERROR_CODES equals the server's ErrorCode", () => {
  assert.deepEqual({ ...ERROR_CODES }, rustCodes("ErrorCode"));
});

test("CLOSE_CODES equals the server's CloseCode, and reconnect follows the ranges", () => {
  const rustClose = rustCodes("CloseCode");
  assert.deepEqual({ ...CLOSE_CODES }, rustClose);
  assert.match(rust, /\(3000\.\.3500\)\.contains/, "the server's reconnect range is 3000..3500");
  for (const code of Object.keys(rustClose).map(Number)) {
    assert.equal(shouldReconnect(code), code >= 3000 && code < 3500, `code ${code}`);
  }
});

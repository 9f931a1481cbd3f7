// Test helper: loads TypeScript modules of src/ in node by bundling them with
// esbuild (no browser, no build step needed). Kept out of test/ so that
// `node --test test/` does not run it as a test file.
import { build } from "esbuild";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

export const WEB_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");

/**
 * Bundles `source` (ES module text; imports resolve from web/) and imports it.
 * One bundle per call, so classes are shared between everything it exports.
 */
export async function importBundle(source, name = "bundle") {
  const result = await build({
    stdin: { contents: source, resolveDir: WEB_DIR, loader: "ts", sourcefile: `${name}.ts` },
    bundle: true,
    format: "esm",
    platform: "neutral",
    target: "es2022",
    write: false,
    logLevel: "silent",
  });
  const dir = mkdtempSync(join(tmpdir(), "tutti-web-test-"));
  const file = join(dir, `${name}.mjs`);
  writeFileSync(file, result.outputFiles[0].contents);
  try {
    return await import(pathToFileURL(file).href);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Imports `src/<name>.ts` (and what it imports) as an ES module. */
export function importTs(name) {
  return importBundle(`export * from "./src/${name}";`, name);
}

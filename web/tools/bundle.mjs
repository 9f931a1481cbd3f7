// Bundles the pages into dist/: the app (index.html + app.js, served at /), the
// connection diagnostic (debug.html + debug.js, at /debug) and the dashboard (dashboard.html + dashboard.js + dashboard.css, served at
// /dashboard). Run from anywhere: `node tools/bundle.mjs` (npm run bundle).
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { WEB_DIR } from "./import-ts.mjs";

const dist = join(WEB_DIR, "dist");
mkdirSync(dist, { recursive: true });

const common = {
  absWorkingDir: WEB_DIR,
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  sourcemap: true,
  logLevel: "warning",
};

await Promise.all([
  build({ ...common, entryPoints: ["src/app.ts"], outfile: join(dist, "app.js") }),
  build({ ...common, entryPoints: ["src/debug.ts"], outfile: join(dist, "debug.js") }),
  // The CSS it imports (uPlot's) goes to dist/dashboard.css.
  build({ ...common, entryPoints: ["src/dashboard.ts"], outfile: join(dist, "dashboard.js") }),
  // The client library as an ES module for other applications' bundlers; its types
  // come from `npm run types` (dist/lib/types).
  build({
    ...common,
    minify: false,
    entryPoints: ["src/index.ts"],
    outfile: join(dist, "lib", "index.js"),
    external: ["@bufbuild/protobuf", "@bufbuild/protobuf/*"],
  }),
]);
for (const page of ["index.html", "app.css", "debug.html", "dashboard.html"]) copyFileSync(join(WEB_DIR, page), join(dist, page));
console.log("bundled dist/: index.html app.js app.css debug.html debug.js dashboard.html dashboard.js dashboard.css lib/index.js");

// Copies the map library from node_modules into static/vendor/, which the API serves
// under /console/vendor/. Runs after `npm ci` (postinstall), so a clean checkout gets the
// console's assets from the npm registry at build time and never from a CDN at run time.
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "static", "vendor", "leaflet");
const dist = join(here, "node_modules", "leaflet", "dist");
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
for (const name of ["leaflet-src.esm.js", "leaflet.css", "images"]) {
  cpSync(join(dist, name), join(out, name), { recursive: true });
}
cpSync(join(here, "node_modules", "leaflet", "LICENSE"), join(out, "LICENSE"));
console.log(`tocsin console: leaflet copied to ${out}`);

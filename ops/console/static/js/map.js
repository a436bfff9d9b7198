// The alert area: a Leaflet map over the gazetteer's counties (no tiles), with three ways
// to target - draw a polygon, draw a circle, pick counties - and keyboard equivalents for
// each (map-centre vertices, circle fields, a county checklist). The area is
//   { polygon: GeoJSON Polygon | null, circle: {lon, lat, radius_km} | null, codes: [] }
// exactly as the API's AreaIn takes it.

import { el, fill, $ } from "./ui.js";
import { get } from "./api.js";

const CLOSE_PX = 12; // a click this close to the first vertex closes the polygon

const STYLE = {
  county: { color: "#1f2937", weight: 1.2, fillColor: "#f6f1e1", fillOpacity: 1 },
  outside: { color: "#6b7280", weight: 0.6, fillColor: "#dcdfe3", fillOpacity: 1 },
  picked: { color: "#7a2e00", weight: 3, fillColor: "#f59e0b", fillOpacity: 0.55 },
  shape: { color: "#b00020", weight: 3, dashArray: "6 4", fillColor: "#e11d48", fillOpacity: 0.2 },
  drawing: { color: "#b00020", weight: 2, dashArray: "4 4" },
};

async function loadLeaflet() {
  try {
    return await import("../vendor/leaflet/leaflet-src.esm.js");
  } catch {
    return null; // not vendored: the checklist and circle fields still work
  }
}

export class AreaMap {
  constructor(root, onChange) {
    this.root = root;
    this.onChange = onChange;
    this.polygon = null;
    this.circle = null;
    this.codes = new Set();
    this.counties = new Map(); // code -> {name, state, in_jurisdiction, layer}
    this.mode = "pan";
    this.vertices = [];
    this.centre = null;
    this.L = null;
    this.map = null;
  }

  /** The area as the API takes it (null when nothing is chosen). */
  area() {
    if (!this.polygon && !this.circle && !this.codes.size) return null;
    const out = { codes: [...this.codes].sort() };
    if (this.polygon) out.polygon = this.polygon;
    if (this.circle) out.circle = this.circle;
    return out;
  }

  /** A description for people: county names, "drawn area", "circle of 5 km". */
  describe() {
    const parts = [...this.codes].sort().map((c) => this.countyName(c));
    if (this.polygon) parts.push("the drawn area");
    if (this.circle) parts.push(`${this.circle.radius_km} km around ${this.circle.lat.toFixed(4)}, ${this.circle.lon.toFixed(4)}`);
    return parts.join("; ");
  }

  countyName(code) {
    const c = this.counties.get(code);
    return c ? `${c.name}, ${c.state}` : code;
  }

  async start() {
    const [L, layer] = await Promise.all([loadLeaflet(), get("/geo/counties")]);
    this.L = L;
    this.buildLists(layer);
    if (!L) {
      $("#map", this.root).replaceWith(el("p.error", { id: "map", role: "alert" },
        "The map library is not installed (run make install); use the county list and circle fields below."));
      return;
    }
    this.buildMap(L, layer);
  }

  buildMap(L, layer) {
    const map = L.map($("#map", this.root), {
      attributionControl: false, zoomSnap: 0.25, doubleClickZoom: false, keyboard: true,
    });
    this.map = map;
    const geo = L.geoJSON(layer, {
      style: (f) => (f.properties.in_jurisdiction ? STYLE.county : STYLE.outside),
      onEachFeature: (f, lyr) => {
        const entry = this.counties.get(f.properties.code);
        if (entry) entry.layer = lyr;
        lyr.bindTooltip(`${f.properties.name}, ${f.properties.state}`, { sticky: true });
        lyr.on("click", () => {
          if (this.mode === "counties") this.toggleCounty(f.properties.code);
        });
      },
    }).addTo(map);
    this.geo = geo;
    this.shapes = L.layerGroup().addTo(map);
    this.sketch = L.layerGroup().addTo(map);
    this.framed = false;
    if (!$("#map", this.root).clientWidth) map.setView([0, 0], 1); // hidden: framed when shown
    else this.shown();
    map.on("click", (e) => this.mapClick(e));
    map.on("mousemove", (e) => this.mapMove(e));
    map.getContainer().addEventListener("keydown", (e) => {
      if (e.key === "Escape") this.setMode("pan");
      if (e.key === "Enter" && this.mode === "polygon") this.finishPolygon();
    });
  }

  buildLists(layer) {
    const mine = layer.features.filter((f) => f.properties.in_jurisdiction);
    mine.sort((a, b) => `${a.properties.state}${a.properties.name}`.localeCompare(`${b.properties.state}${b.properties.name}`));
    for (const f of layer.features) {
      this.counties.set(f.properties.code, { ...f.properties, layer: null, bbox: bbox(f.geometry) });
    }
    const zoom = $("#zoom-county", this.root);
    fill(zoom, el("option", { value: "" }, "Whole jurisdiction"),
      ...mine.map((f) => el("option", { value: f.properties.code }, `${f.properties.name}, ${f.properties.state}`)));
    zoom.addEventListener("change", () => this.zoomTo(zoom.value));
    const list = $("#county-list", this.root);
    fill(list, ...mine.map((f) => {
      const id = `county-${f.properties.code.replace(":", "-")}`;
      return el("li", {},
        el("input", { type: "checkbox", id, value: f.properties.code,
          onchange: (e) => this.toggleCounty(f.properties.code, e.target.checked) }),
        el("label", { for: id }, `${f.properties.name}, ${f.properties.state}`));
    }));
    this.jurisdictionBbox = layer.jurisdiction_bbox;
  }

  /** The map's view became visible: measure it, and frame the jurisdiction once. */
  shown() {
    if (!this.map) return;
    this.map.invalidateSize(false);
    if (!this.framed) {
      this.framed = true;
      if (this.jurisdictionBbox) this.zoomTo("");
      else this.map.fitBounds(this.geo.getBounds(), { animate: false });
    }
  }

  zoomTo(code) {
    if (!this.map) return;
    const c = this.counties.get(code);
    const b = c ? c.bbox : this.jurisdictionBbox;
    if (b) this.map.fitBounds([[b[1], b[0]], [b[3], b[2]]], { animate: false });
  }

  setMode(mode) {
    this.mode = this.mode === mode ? "pan" : mode;
    this.vertices = [];
    this.centre = null;
    this.sketch?.clearLayers();
    for (const btn of this.root.querySelectorAll("[data-mode]")) {
      btn.setAttribute("aria-pressed", String(btn.dataset.mode === this.mode));
    }
    const hints = {
      pan: "Move the map with the arrow keys or by dragging; choose a tool to target an area.",
      polygon: "Click the map to add corners (or press 'Add corner at map centre'); click the first corner, press Enter or 'Finish polygon' to close it. Escape stops.",
      circle: "Click the centre, then click again at the edge. Or type the centre and radius below.",
      counties: "Click counties to add or remove them, or tick them in the list below.",
    };
    $("#map-hint", this.root).textContent = hints[this.mode];
    $("#finish-shape", this.root).disabled = this.mode !== "polygon";
    $("#add-centre", this.root).disabled = this.mode !== "polygon" && this.mode !== "circle";
    this.map?.getContainer().classList.toggle("drawing", this.mode !== "pan");
  }

  mapClick(e) {
    if (this.mode === "polygon") this.addVertex(e.latlng);
    else if (this.mode === "circle") this.circleClick(e.latlng);
  }

  mapMove(e) {
    if (this.mode === "circle" && this.centre) this.drawSketch(e.latlng);
    else if (this.mode === "polygon" && this.vertices.length) this.drawSketch(e.latlng);
  }

  addCentre() {
    if (!this.map) return;
    const c = this.map.getCenter();
    if (this.mode === "polygon") this.addVertex(c);
    else if (this.mode === "circle") this.circleClick(c);
  }

  addVertex(latlng) {
    const L = this.L;
    if (this.vertices.length >= 3) {
      const first = this.map.latLngToContainerPoint(this.vertices[0]);
      if (first.distanceTo(this.map.latLngToContainerPoint(latlng)) <= CLOSE_PX) {
        this.finishPolygon();
        return;
      }
    }
    this.vertices.push(L.latLng(latlng.lat, latlng.lng));
    this.drawSketch(null);
    $("#map-hint", this.root).textContent = `${this.vertices.length} corner(s); ${this.vertices.length >= 3 ? "finish to close the polygon" : "add at least 3"}.`;
  }

  drawSketch(cursor) {
    const L = this.L;
    this.sketch.clearLayers();
    if (this.mode === "polygon") {
      const pts = cursor ? [...this.vertices, cursor] : this.vertices;
      if (pts.length > 1) L.polyline(pts, STYLE.drawing).addTo(this.sketch);
      for (const v of this.vertices) L.circleMarker(v, { radius: 5, color: "#b00020", fillOpacity: 1 }).addTo(this.sketch);
    } else if (this.mode === "circle" && this.centre) {
      L.circleMarker(this.centre, { radius: 5, color: "#b00020", fillOpacity: 1 }).addTo(this.sketch);
      if (cursor) L.circle(this.centre, { ...STYLE.drawing, radius: this.centre.distanceTo(cursor) }).addTo(this.sketch);
    }
  }

  finishPolygon() {
    if (this.vertices.length < 3) {
      $("#map-hint", this.root).textContent = "A polygon needs at least 3 corners.";
      return;
    }
    const ring = this.vertices.map((v) => [round(v.lng), round(v.lat)]);
    ring.push(ring[0]);
    this.polygon = { type: "Polygon", coordinates: [ring] };
    this.setMode("pan");
    this.changed();
  }

  circleClick(latlng) {
    if (!this.centre) {
      this.centre = this.L.latLng(latlng.lat, latlng.lng);
      this.drawSketch(null);
      $("#map-hint", this.root).textContent = "Now click at the edge of the circle.";
      return;
    }
    const km = Math.max(0.1, this.centre.distanceTo(latlng) / 1000);
    this.setCircle(this.centre.lng, this.centre.lat, Math.round(km * 10) / 10);
    this.setMode("pan");
  }

  setCircle(lon, lat, radiusKm) {
    this.circle = { lon: round(lon), lat: round(lat), radius_km: radiusKm };
    $("#circle-lon", this.root).value = this.circle.lon;
    $("#circle-lat", this.root).value = this.circle.lat;
    $("#circle-radius", this.root).value = radiusKm;
    this.changed();
  }

  toggleCounty(code, on) {
    const want = on === undefined ? !this.codes.has(code) : on;
    if (want) this.codes.add(code);
    else this.codes.delete(code);
    const box = document.getElementById(`county-${code.replace(":", "-")}`);
    if (box) box.checked = want;
    this.changed();
  }

  clear() {
    this.polygon = null;
    this.circle = null;
    for (const code of [...this.codes]) {
      const box = document.getElementById(`county-${code.replace(":", "-")}`);
      if (box) box.checked = false;
    }
    this.codes.clear();
    for (const id of ["#circle-lon", "#circle-lat", "#circle-radius"]) $(id, this.root).value = "";
    this.setMode("pan");
    this.changed();
  }

  /** Redraw the chosen area and tell the form. */
  changed() {
    if (this.map) {
      const L = this.L;
      this.shapes.clearLayers();
      if (this.polygon) L.polygon(this.polygon.coordinates[0].map(([x, y]) => [y, x]), STYLE.shape).addTo(this.shapes);
      if (this.circle) L.circle([this.circle.lat, this.circle.lon], { ...STYLE.shape, radius: this.circle.radius_km * 1000 }).addTo(this.shapes);
      for (const [code, c] of this.counties) {
        if (!c.layer) continue;
        c.layer.setStyle(this.codes.has(code) ? STYLE.picked : c.in_jurisdiction ? STYLE.county : STYLE.outside);
      }
    }
    $("#area-summary", this.root).textContent = this.describe() || "No area chosen yet.";
    this.onChange();
  }
}

function round(x) {
  return Math.round(x * 1e6) / 1e6;
}

function bbox(geometry) {
  let [x0, y0, x1, y1] = [180, 90, -180, -90];
  const walk = (c) => {
    if (typeof c[0] === "number") {
      x0 = Math.min(x0, c[0]); y0 = Math.min(y0, c[1]);
      x1 = Math.max(x1, c[0]); y1 = Math.max(y1, c[1]);
    } else c.forEach(walk);
  };
  walk(geometry.coordinates);
  return [x0, y0, x1, y1];
}

// Compose: CAP fields (prefilled from a template per event type), the area map, a live
// reach preview (debounced, stale answers dropped), and submit.

import { post, get, ApiError } from "./api.js";
import { el, fill, $, plural, debounce, statusBanner, STATUS_TEXT, announce } from "./ui.js";
import { AreaMap } from "./map.js";

const PREVIEW_DELAY_MS = 400;

export class Compose {
  constructor(root, me, openAlert) {
    this.root = root;
    this.me = me;
    this.openAlert = openAlert;
    this.form = $("#compose-form", root);
    this.areaMap = new AreaMap(root, () => this.areaChanged());
    this.previewNow = debounce(() => this.preview(), PREVIEW_DELAY_MS);
    this.inflight = null;
    this.descTouched = false;
  }

  async start() {
    const { templates } = await get("templates.json");
    const allowed = new Set(this.me.org?.event_codes || []);
    this.templates = templates.filter((t) => !allowed.size || allowed.has(t.event_code));
    const select = $("#template", this.root);
    select.replaceChildren(el("option", { value: "" }, "— choose an event type —"),
      ...this.templates.map((t) => el("option", { value: t.event_code }, `${t.event} (${t.event_code})`)));
    select.addEventListener("change", () => this.applyTemplate(select.value));
    this.form.addEventListener("input", (e) => {
      if (e.target.id === "area-desc") this.descTouched = true;
      this.previewNow();
    });
    this.form.addEventListener("change", () => this.statusChanged());
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
    for (const btn of this.root.querySelectorAll("[data-mode]")) {
      btn.addEventListener("click", () => this.areaMap.setMode(btn.dataset.mode));
    }
    $("#finish-shape", this.root).addEventListener("click", () => this.areaMap.finishPolygon());
    $("#add-centre", this.root).addEventListener("click", () => this.areaMap.addCentre());
    $("#clear-area", this.root).addEventListener("click", () => this.areaMap.clear());
    $("#set-circle", this.root).addEventListener("click", () => this.circleFromFields());
    this.statusChanged();
    await this.areaMap.start();
    this.areaMap.setMode("pan");
    if (!this.root.hidden) this.areaMap.shown();
  }

  applyTemplate(code) {
    const t = this.templates.find((x) => x.event_code === code);
    if (!t) return;
    for (const name of ["event", "event_code", "category", "urgency", "severity", "certainty",
      "headline", "description", "instruction", "expires_in_minutes"]) {
      const field = this.form.elements[name];
      if (field && t[name] !== undefined) field.value = t[name];
    }
    this.form.elements.expires.value = "";
    announce(`Filled from the ${t.event} template: review every field before submitting.`);
    this.previewNow();
  }

  circleFromFields() {
    const lon = parseFloat($("#circle-lon", this.root).value);
    const lat = parseFloat($("#circle-lat", this.root).value);
    const r = parseFloat($("#circle-radius", this.root).value);
    if ([lon, lat, r].some(Number.isNaN) || r <= 0) {
      announce("The circle needs a longitude, a latitude and a radius above 0 km.", "error");
      return;
    }
    this.areaMap.setCircle(lon, lat, r);
  }

  areaChanged() {
    if (!this.descTouched) this.form.elements.area_desc.value = this.areaMap.describe();
    this.previewNow();
  }

  status() {
    return this.form.elements.status.value; // "" until the originator chooses
  }

  statusChanged() {
    const status = this.status();
    const marker = $("#compose-status", this.root);
    this.root.dataset.status = status || "none";
    fill(marker, status ? statusBanner(status, STATUS_TEXT[status])
      : el("p.notice", {}, "Choose Actual, Exercise or Test: there is no default."));
    $("#submit-alert", this.root).textContent = status ? `Submit ${status.toUpperCase()} alert` : "Submit alert";
    this.previewNow();
  }

  /** The DraftIn the API takes, or a reason why there is none yet. */
  draft() {
    const f = this.form.elements;
    const area = this.areaMap.area();
    if (!this.status()) return { missing: "choose the status (Actual, Exercise or Test)" };
    if (!area) return { missing: "choose an area on the map or in the lists" };
    if (!f.event.value.trim()) return { missing: "enter the event (or pick an event type)" };
    const body = {
      status: this.status(), event: f.event.value.trim(), event_code: f.event_code.value.trim(),
      category: f.category.value, urgency: f.urgency.value, severity: f.severity.value,
      certainty: f.certainty.value, headline: f.headline.value, description: f.description.value,
      instruction: f.instruction.value, area: { ...area, desc: f.area_desc.value.slice(0, 500) },
    };
    if (f.expires.value) body.expires = new Date(f.expires.value).toISOString();
    else if (f.expires_in_minutes.value) body.expires_in_minutes = parseInt(f.expires_in_minutes.value, 10);
    return { body };
  }

  async preview() {
    const out = $("#preview", this.root);
    const { body, missing } = this.draft();
    this.inflight?.abort();
    if (!body) {
      out.dataset.state = "idle";
      fill(out, el("p", {}, `Reach preview: ${missing}.`));
      return;
    }
    const ctrl = new AbortController();
    this.inflight = ctrl;
    out.dataset.state = "loading";
    out.setAttribute("aria-busy", "true");
    try {
      const p = await post("/alerts/preview", body, { signal: ctrl.signal });
      if (ctrl.signal.aborted) return;
      fill(out, ...renderPreview(p));
      out.dataset.state = "ready";
    } catch (err) {
      if (err.name === "AbortError") return;
      out.dataset.state = "error";
      fill(out, el("p.error", { role: "alert" }, `Preview refused: ${err.message}`));
    } finally {
      if (this.inflight === ctrl) out.removeAttribute("aria-busy");
    }
  }

  async submit() {
    const { body, missing } = this.draft();
    const button = $("#submit-alert", this.root);
    if (!body) {
      announce(`Cannot submit yet: ${missing}.`, "error");
      return;
    }
    button.disabled = true;
    try {
      const rec = await post("/alerts", body);
      const submitted = await post(`/alerts/${rec.id}/submit`);
      announce(submitted.state === "pending_approval"
        ? "Submitted: waiting for a second person to approve it."
        : `Submitted: ${submitted.state}.`, "ok");
      // The next alert's status must be chosen again: never carried over by accident.
      for (const radio of this.form.querySelectorAll("input[name=status]")) radio.checked = false;
      this.statusChanged();
      this.openAlert(submitted.id);
    } catch (err) {
      announce(`Not submitted: ${err instanceof ApiError ? err.message : err}`, "error");
    } finally {
      button.disabled = false;
    }
  }
}

/** The preview as elements: totals, a per-channel table, warnings, the messages. */
export function renderPreview(p) {
  const channels = Object.keys(p.reach.channels);
  const table = el("table.reach", {},
    el("caption", {}, "Reach per channel"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Channel"),
      el("th", { scope: "col" }, "Messages"), el("th", { scope: "col" }, "Citizens"))),
    el("tbody", {}, channels.map((c) => el("tr", {},
      el("th", { scope: "row" }, c),
      el("td", { "data-channel": c, class: "reach-messages" }, p.reach.channels[c]),
      el("td", {}, p.reach.citizen_channels[c])))));
  const total = el("p.reach-total", {},
    el("strong", { id: "reach-total" }, String(p.reach.citizens)),
    ` ${p.reach.citizens === 1 ? "citizen" : "citizens"} reached (${plural(p.reach.subscriptions, "subscription")}; `,
    `${p.in_area.subscriptions} in the area before preferences) · ${p.area_km2} km²`);
  const parts = [p.is_test ? statusBanner(p.status, p.status_banner) : null, total, table];
  if (p.warnings?.length) parts.push(el("ul.warnings", { "aria-label": "Warnings" }, p.warnings.map((w) => el("li", {}, w))));
  const msgs = el("details.messages", {}, el("summary", {}, `What people will read (${p.messages.length} messages)`),
    p.messages.map((m) => el("div.message", {},
      el("h4", {}, `${m.channel} · ${m.language}${m.sms_segments ? ` · ${m.sms_segments} SMS segment(s)` : ""}`),
      m.subject ? el("p", {}, el("strong", {}, m.subject)) : null,
      el("pre", {}, m.body))));
  parts.push(msgs, el("p.small", {}, `Computed in ${p.computed_in_ms} ms over ${p.indexed_subscriptions} subscriptions.`));
  return parts;
}

// The approver's queue (approve and send, or reject with a reason, each with its reach
// preview beside it) and the alert history with filters.

import { get, post } from "./api.js";
import { el, fill, $, statusBadge, stateBadge, when, announce, areaText } from "./ui.js";
import { renderPreview } from "./compose.js";

export class Queue {
  constructor(root, me, openAlert) {
    this.root = root;
    this.me = me;
    this.openAlert = openAlert;
    $("#queue-refresh", root).addEventListener("click", () => this.load());
  }

  async load() {
    const list = $("#queue-list", this.root);
    list.setAttribute("aria-busy", "true");
    try {
      const pending = await get("/alerts?state=pending_approval&limit=50");
      fill(list, ...(pending.length ? pending.map((rec) => this.card(rec))
        : [el("p", {}, "Nothing is waiting for approval.")]));
      for (const rec of pending) this.preview(rec);
    } catch (err) {
      fill(list, el("p.error", { role: "alert" }, err.message));
    } finally {
      list.removeAttribute("aria-busy");
    }
  }

  card(rec) {
    const d = rec.draft;
    const mine = [rec.created_by, rec.submitted_by, ...rec.editors].includes(this.me.user);
    const reasonId = `reject-reason-${rec.id}`;
    return el(`article.card.status-${d.status.toLowerCase()}`, { "data-alert": rec.id, "aria-labelledby": `q-${rec.id}` },
      el("h3", { id: `q-${rec.id}` }, statusBadge(d.status), " ", `${d.event}${d.headline ? ` — ${d.headline}` : ""}`),
      el("p", {}, `${d.severity} / ${d.urgency} / ${d.certainty} · ${areaText(d.area)}`),
      el("p", {}, `Composed ${when(rec.created_at)} by ${rec.created_by}; submitted by ${rec.submitted_by}`),
      d.description ? el("p", {}, d.description) : null,
      d.instruction ? el("p", {}, el("strong", {}, "Instruction: "), d.instruction) : null,
      el("div.card-preview", { id: `qp-${rec.id}`, "aria-live": "polite" }, "Loading the reach preview…"),
      mine && d.status === "Actual" ? el("p.notice", {}, "You composed or submitted this alert: a different approver must approve it.") : null,
      el("div.actions", {},
        el("button.primary", { type: "button", onclick: (e) => this.approve(rec, e.target) }, `Approve and send ${d.status.toUpperCase()} alert`),
        el("label", { for: reasonId }, "Reason to reject"),
        el("input", { id: reasonId, type: "text", minlength: 3, maxlength: 1000 }),
        el("button", { type: "button", onclick: (e) => this.reject(rec, e.target) }, "Reject"),
        el("button", { type: "button", onclick: () => this.openAlert(rec.id) }, "Open")));
  }

  async preview(rec) {
    const box = document.getElementById(`qp-${rec.id}`);
    try {
      fill(box, ...renderPreview(await get(`/alerts/${rec.id}/preview`)));
    } catch (err) {
      fill(box, el("p.error", {}, `Preview unavailable: ${err.message}`));
    }
  }

  async approve(rec, button) {
    button.disabled = true;
    try {
      const out = await post(`/alerts/${rec.id}/approve`, { send: true });
      announce(`Approved: the alert is ${out.state}.`, "ok");
      this.openAlert(rec.id);
    } catch (err) {
      announce(`Not approved: ${err.message}`, "error");
      button.disabled = false;
    }
  }

  async reject(rec, button) {
    const reason = document.getElementById(`reject-reason-${rec.id}`).value.trim();
    if (reason.length < 3) {
      announce("Give a reason to reject (at least 3 characters).", "error");
      document.getElementById(`reject-reason-${rec.id}`).focus();
      return;
    }
    button.disabled = true;
    try {
      await post(`/alerts/${rec.id}/reject`, { reason });
      announce("Rejected: the originator can edit and resubmit it.", "ok");
      await this.load();
    } catch (err) {
      announce(`Not rejected: ${err.message}`, "error");
      button.disabled = false;
    }
  }
}

export class History {
  constructor(root, openAlert) {
    this.root = root;
    this.openAlert = openAlert;
    $("#history-filters", root).addEventListener("submit", (e) => { e.preventDefault(); this.load(); });
  }

  async load() {
    const state = $("#filter-state", this.root).value;
    const status = $("#filter-status", this.root).value;
    const q = new URLSearchParams({ limit: "100" });
    if (state) q.set("state", state);
    if (status) q.set("status", status);
    const body = $("#history-body", this.root);
    try {
      const rows = await get(`/alerts?${q}`);
      fill(body, ...rows.map((rec) => el(`tr.status-${rec.draft.status.toLowerCase()}`, { "data-alert": rec.id },
        el("td", {}, when(rec.created_at)),
        el("td", {}, statusBadge(rec.draft.status)),
        el("td", {}, rec.kind === "alert" ? rec.draft.event : `${rec.kind}: ${rec.draft.event}`),
        el("td", {}, stateBadge(rec.state)),
        el("td", {}, areaText(rec.draft.area)),
        el("td", {}, el("button", { type: "button", onclick: () => this.openAlert(rec.parent || rec.id) }, "Open")))));
      $("#history-count", this.root).textContent = `${rows.length} alert(s)`;
    } catch (err) {
      $("#history-count", this.root).textContent = err.message;
    }
  }
}

// One alert: its status marking, live delivery progress per message and channel (from the
// SSE progress stream), and the Cancel and Correction actions, which stay in a sticky bar
// at the top of this screen whatever its state, so stopping a mistake is one click away.

import { get, post, stream } from "./api.js";
import { el, fill, $, plural, statusBanner, stateBadge, when, announce, areaText, STATE_TEXT } from "./ui.js";

const CANCELLABLE = ["draft", "pending_approval", "approved", "rejected", "sent"];
const CORRECTABLE = ["sent", "cancelled"];
const DEFAULT_CORRECTION = "The earlier alert was sent in error. There is no emergency. No action is needed.";

export class AlertView {
  constructor(root, me) {
    this.root = root;
    this.me = me;
    this.id = "";
    this.rec = null;
    this.ctrl = null;
    $("#cancel-open", root).addEventListener("click", () => this.openForm("cancel"));
    $("#correct-open", root).addEventListener("click", () => this.openForm("correct"));
    $("#cancel-form", root).addEventListener("submit", (e) => { e.preventDefault(); this.act("cancel"); });
    $("#correct-form", root).addEventListener("submit", (e) => { e.preventDefault(); this.act("correct"); });
    for (const btn of root.querySelectorAll("[data-close-form]")) {
      btn.addEventListener("click", () => this.closeForms());
    }
  }

  async show(id) {
    this.stop();
    this.id = id;
    this.closeForms();
    fill($("#progress", this.root));
    $("#delivery-status", this.root).textContent = "loading…";
    try {
      this.render(await get(`/alerts/${id}`));
    } catch (err) {
      $("#alert-title", this.root).textContent = "Alert not available";
      $("#delivery-status", this.root).textContent = err.message;
      return;
    }
    this.follow();
  }

  stop() {
    this.ctrl?.abort();
    this.ctrl = null;
  }

  /** Follow the progress stream; restart it after a network drop while still shown. */
  async follow() {
    const ctrl = new AbortController();
    this.ctrl = ctrl;
    const id = this.id;
    while (!ctrl.signal.aborted) {
      try {
        await stream(`/alerts/${id}/progress/stream`, (type, data) => {
          if (type === "progress" || type === "done") this.progress(data, type === "done");
        }, { signal: ctrl.signal });
        if (!ctrl.signal.aborted) this.render(await get(`/alerts/${id}`));
        return; // the server ended it: done (a new action restarts it)
      } catch (err) {
        if (ctrl.signal.aborted) return;
        $("#delivery-status", this.root).textContent = `progress unavailable (${err.message}); retrying…`;
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
  }

  render(rec) {
    this.rec = rec;
    const d = rec.draft;
    this.root.dataset.status = d.status.toLowerCase();
    fill($("#alert-banner", this.root), statusBanner(d.status, rec.status_banner || undefined));
    $("#alert-title", this.root).textContent = `${d.event}${d.headline ? ` — ${d.headline}` : ""}`;
    fill($("#alert-state", this.root), "State: ", stateBadge(rec.state));
    fill($("#alert-facts", this.root),
      fact("Status", d.status), fact("Severity / urgency / certainty", `${d.severity} / ${d.urgency} / ${d.certainty}`),
      fact("Area", areaText(d.area)), fact("Composed", `${when(rec.created_at)} by ${rec.created_by}`),
      rec.approved_by ? fact("Approved by", rec.approved_by) : null,
      rec.rejected_by ? fact("Rejected by", `${rec.rejected_by}: ${rec.reject_reason}`) : null,
      rec.cap ? fact("CAP identifier", rec.cap.identifier) : null,
      rec.parent ? fact("Follow-up of", rec.parent) : null);
    fill($("#alert-history", this.root), ...rec.history.map((h) =>
      el("li", {}, `${when(h.at)} — ${h.actor} ${h.action}${h.detail ? `: ${h.detail}` : ""}`)));
    const cancel = $("#cancel-open", this.root);
    const correct = $("#correct-open", this.root);
    const writer = this.me.roles.includes("originator") || this.me.roles.includes("approver");
    cancel.disabled = !writer || !CANCELLABLE.includes(rec.state);
    correct.disabled = !writer || !CORRECTABLE.includes(rec.state);
    cancel.textContent = rec.state === "sent" ? "Cancel alert…" : "Withdraw / cancel…";
    $("#action-note", this.root).textContent = !writer ? "Your role cannot cancel or correct."
      : rec.state === "sent" ? "Cancel tells everyone already warned; a correction says it was sent in error."
        : rec.state === "cancelled" ? "Cancelled. A correction still tells everyone it reached that it was sent in error."
          : rec.state === "corrected" ? "Corrected: everyone it reached is being told."
            : `This alert is ${STATE_TEXT[rec.state] || rec.state}.`;
  }

  progress(p, done) {
    if (this.rec && p.state !== this.rec.state) {
      get(`/alerts/${this.id}`).then((rec) => this.render(rec)).catch(() => {});
    }
    const box = $("#progress", this.root);
    fill(box, ...p.messages.map((m) => messageProgress(m)));
    const status = $("#delivery-status", this.root);
    status.dataset.complete = String(p.complete);
    if (p.complete) {
      const last = p.messages[p.messages.length - 1];
      status.textContent = last && last.msg_type === "Cancel"
        ? `delivered — ${p.state === "corrected" ? "correction" : "cancellation"} reached everyone warned`
        : "delivered — every recipient has a result";
    } else if (!p.messages.length) {
      status.textContent = p.state === "pending_approval" ? "waiting for approval — nothing sent yet"
        : `${STATE_TEXT[p.state] || p.state} — nothing sent`;
    } else {
      status.textContent = done ? `ended (${p.state})` : "delivering…";
    }
  }

  openForm(which) {
    this.closeForms();
    const form = $(which === "cancel" ? "#cancel-form" : "#correct-form", this.root);
    if (which === "correct") $("#correct-text", this.root).value = DEFAULT_CORRECTION;
    form.hidden = false;
    form.querySelector("textarea").focus();
  }

  closeForms() {
    $("#cancel-form", this.root).hidden = true;
    $("#correct-form", this.root).hidden = true;
  }

  async act(which) {
    const form = $(which === "cancel" ? "#cancel-form" : "#correct-form", this.root);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const body = which === "cancel" ? { reason: $("#cancel-text", this.root).value }
        : { message: $("#correct-text", this.root).value };
      const out = await post(`/alerts/${this.id}/${which}`, body);
      announce(which === "cancel"
        ? (out.cap ? "Cancellation sent to everyone already warned." : "Withdrawn before sending.")
        : "Correction sent to everyone the alert reached.", "ok");
      this.closeForms();
      await this.show(this.rec?.parent || this.id);
    } catch (err) {
      announce(`${which === "cancel" ? "Cancel" : "Correction"} refused: ${err.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }
}

function fact(name, value) {
  return [el("dt", {}, name), el("dd", {}, value)];
}

const KIND_TEXT = { alert: "Alert", update: "Update", cancel: "Cancellation", correction: "Correction" };

function messageProgress(m) {
  const label = KIND_TEXT[m.kind] || m.kind;
  const channels = Object.keys(m.expected);
  const rows = channels.map((c) => {
    const expected = m.expected[c];
    const settled = m.settled[c] || 0;
    const outcomes = Object.entries(m.outcomes).filter(([k]) => k.startsWith(`${c}:`))
      .map(([k, n]) => `${n} ${k.split(":")[1]}`).join(", ");
    const id = `bar-${m.record}-${c}`;
    return el("div.bar", { "data-channel": c },
      el("label", { for: id }, `${c}: ${settled} of ${expected} settled${outcomes ? ` (${outcomes})` : ""}`),
      el("progress", { id, max: Math.max(expected, 1), value: expected ? settled : 1 }));
  });
  const messages = Object.values(m.expected).reduce((a, b) => a + b, 0);
  const head = !m.ingested ? "waiting for the pipeline to accept it"
    : m.msg_type === "Cancel" ? `${plural(messages, "message")} to those already warned`
      : `${plural(m.matched, "subscription")} matched, ${plural(messages, "message")}`;
  return el("section.message-progress", { "data-kind": m.kind, "data-complete": String(m.complete) },
    el("h3", {}, `${label}: ${m.complete ? "delivered" : "in progress"}`),
    el("p", {}, head, m.first_delivery ? ` · first ${when(m.first_delivery)}, last ${when(m.last_delivery)}` : ""),
    rows.length ? rows : el("p", {}, m.ingested ? "Nobody to deliver to on any channel." : ""));
}

// Small DOM helpers, and the status markings every screen shares: a Test or Exercise
// alert is marked by a text badge, a banner, a colour and a border pattern together,
// never by colour alone.

/** el("p.note", {id: "x"}, "text", child...) -> element. Strings become text nodes. */
export function el(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag || "div");
  if (classes.length) node.className = classes.join(" ");
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** Replace a node's children (arrays flattened, null/false skipped, strings as text). */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export const STATUS_TEXT = {
  Actual: "a real alert to the public",
  Exercise: "not a real alert; reaches only citizens who opted in to tests",
  Test: "not a real alert; reaches only citizens who opted in to tests",
};

/** The short badge: "ACTUAL", "TEST", "EXERCISE" (text, colour and pattern). */
export function statusBadge(status) {
  return el(`span.badge.status-${(status || "Actual").toLowerCase()}`, {}, (status || "Actual").toUpperCase());
}

/** The full-width banner for a screen showing one alert: "TEST — not a real alert...". */
export function statusBanner(status, text) {
  const word = (status || "Actual").toUpperCase();
  // The API's own banners already start with the word ("TEST - not a real alert...").
  const rest = (text || STATUS_TEXT[status] || "").replace(new RegExp(`^${word}\\s*[-—]\\s*`), "");
  return el(`div.banner.status-${word.toLowerCase()}`, { role: "note" },
    el("strong", {}, word), ` — ${rest}`);
}

export const STATE_TEXT = {
  draft: "draft",
  pending_approval: "waiting for approval",
  approved: "approved",
  rejected: "rejected",
  sending: "sending",
  sent: "sent",
  cancelled: "cancelled",
  corrected: "corrected",
  failed: "failed",
};

export function stateBadge(state) {
  return el(`span.state.state-${state}`, {}, STATE_TEXT[state] || state);
}

/** "1 citizen", "3 citizens". */
export function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

export function when(epochSeconds) {
  if (!epochSeconds) return "—";
  return new Date(epochSeconds * 1000).toLocaleString();
}

export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Put a message in the page's live region (announced by screen readers). */
export function announce(text, kind = "info") {
  const box = $("#announce");
  box.className = `announce ${kind}`;
  box.textContent = text;
}

export function areaText(area) {
  if (area.desc) return area.desc;
  const parts = [];
  if (area.codes?.length) parts.push(area.codes.join(", "));
  if (area.polygon) parts.push("drawn polygon");
  if (area.circle) parts.push(`circle ${area.circle.radius_km} km`);
  return parts.join(" · ");
}

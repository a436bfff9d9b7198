// The console's entry point: sign in with an API token, then route between the views the
// caller's roles allow (#/compose, #/queue, #/alerts, #/alert/<id>).

import { get, token } from "./api.js";
import { $, announce } from "./ui.js";
import { Compose } from "./compose.js";
import { AlertView } from "./alert.js";
import { Queue, History } from "./lists.js";

const VIEWS = {
  compose: { roles: ["originator"], section: "#compose-view" },
  queue: { roles: ["approver"], section: "#queue-view" },
  alerts: { roles: ["originator", "approver", "auditor", "admin"], section: "#history-view" },
  alert: { roles: ["originator", "approver", "auditor", "admin"], section: "#alert-view" },
};

const app = { me: null, compose: null, alert: null, queue: null, history: null };
window.tocsinConsole = app; // for people debugging in the browser's devtools (and the tests)

function allowed(view) {
  return VIEWS[view].roles.some((r) => app.me.roles.includes(r));
}

function openAlert(id) {
  location.hash = `#/alert/${id}`;
}

async function route() {
  if (!app.me) return;
  const [, view = "", arg = ""] = location.hash.split("/");
  let name = VIEWS[view] && allowed(view) ? view : Object.keys(VIEWS).find(allowed);
  if (name === "alert" && !arg) name = "alerts";
  for (const [key, v] of Object.entries(VIEWS)) $(v.section).hidden = key !== name;
  for (const link of document.querySelectorAll("#tabs a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name !== "alert") app.alert.stop();
  if (name === "queue") await app.queue.load();
  if (name === "alerts") await app.history.load();
  if (name === "alert") await app.alert.show(arg);
  if (name === "compose") app.compose?.areaMap.shown();
  $(`${VIEWS[name].section} h2`)?.focus();
}

async function signIn(value) {
  token.set(value);
  try {
    app.me = await get("/me");
  } catch (err) {
    token.clear();
    app.me = null;
    $("#signin-error").textContent = err.status === 401 ? "That token is not valid (or was revoked)." : err.message;
    return;
  }
  $("#signin-error").textContent = "";
  $("#signin").hidden = true;
  $("#workspace").hidden = false;
  $("#signout").hidden = false;
  $("#who").textContent = `${app.me.name} · ${app.me.org ? app.me.org.name : app.me.user} · ${app.me.roles.join(", ")}`;
  for (const link of document.querySelectorAll("#tabs a")) {
    link.parentElement.hidden = !allowed(link.dataset.view);
  }
  app.alert = new AlertView($("#alert-view"), app.me);
  app.queue = new Queue($("#queue-view"), app.me, openAlert);
  app.history = new History($("#history-view"), openAlert);
  if (app.me.roles.includes("originator")) {
    app.compose = new Compose($("#compose-view"), app.me, openAlert);
    // The map loads in the background: the queue, history and alert views need not wait.
    app.compose.start().catch((err) => announce(`The compose screen could not load: ${err.message}`, "error"));
  }
  await route();
}

function signOut() {
  token.clear();
  location.hash = "";
  location.reload();
}

$("#signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  signIn($("#token").value.trim());
});
$("#signout").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
if (token.get()) signIn(token.get());
else $("#token").focus();

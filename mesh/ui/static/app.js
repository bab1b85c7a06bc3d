// raftmesh web UI: plain JavaScript, no build step. It uses the same HTTP API
// as every other client. The API token (when the mesh has one) lives in this
// tab's sessionStorage and travels only in the Authorization header.
"use strict";

const TOKEN_KEY = "raftmesh-api-token";
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
const RETRYABLE = new Set(["failed", "timed_out"]);
const PAUSABLE = new Set(["queued", "waiting", "running"]);
const PAGE = 50;
const view = document.getElementById("view");
let timer = null;        // the current page's refresh
let stream = null;       // the current page's event stream (an AbortController)
let generation = 0;      // bumps on every navigation; stale callbacks check it
let caller = null;       // what the token is ({admin, tenant}), from /v1/whoami
// The whole mesh's pages: a tenant's token is not shown them (the API would
// answer 403), so they are not asked for.
const ADMIN_PAGES = new Set(["overview", "diagnostics"]);

class Unauthorized extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (resp.status === 401) {
    askToken("The token was refused: enter it again.");
    throw new Unauthorized("unauthorized");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const msg = body.error ? body.error.message : resp.status + " " + resp.statusText;
    throw new Error(msg);
  }
  return body;
}

// --- token -----------------------------------------------------------------

function tokenRequired() { return document.body.dataset.tokenRequired === "1"; }

function askToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  caller = null;
  const dialog = document.getElementById("token-dialog");
  document.getElementById("token-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
  document.getElementById("token-input").focus();
  showAuth();
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = document.getElementById("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  caller = null;
  document.getElementById("token-input").value = "";
  document.getElementById("token-dialog").close();
  showAuth();
  route();
});

function showAuth() {
  const el = document.getElementById("auth");
  el.replaceChildren();
  if (!tokenRequired()) { el.textContent = "no API token required"; return; }
  if (!token()) { el.textContent = "token needed"; return; }
  el.append(caller && !caller.admin ? `tenant ${caller.tenant} ` : "token set ");
  const b = button("forget", () => { askToken(""); });
  el.append(b);
}

// --- small DOM helpers ------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function button(label, onclick) { return h("button", { type: "button", onclick }, label); }

function table(columns, rows, numeric = []) {
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: numeric.includes(c) ? "num" : null }, c)))),
    h("tbody", {}, rows.length ? rows : [h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "none"))]));
}

function td(content, cls) { return h("td", { class: cls || null }, content); }
function status(s) { return h("span", { class: s }, s); }
function pill(s) { return h("span", { class: "pill " + s }, s); }

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const d = Date.now() / 1000 - seconds;
  if (d < 60) return d.toFixed(0) + " s ago";
  if (d < 3600) return (d / 60).toFixed(0) + " min ago";
  return new Date(seconds * 1000).toLocaleString();
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString([], { hour12: false }) : "-";
}

function secs(s) {
  if (s === null || s === undefined) return "-";
  return s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s";
}

function duration(run) {
  if (!run.started_at) return "-";
  const end = run.finished_at || Date.now() / 1000;
  return secs(end - run.started_at);
}

function kv(items) {
  return h("div", { class: "kv" }, items.map(([k, v]) => h("div", {}, h("span", {}, k), h("b", {}, v))));
}

function failure(err) {
  if (err instanceof Unauthorized) return h("p", { class: "muted" }, "waiting for the API token");
  return h("p", { class: "error" }, "could not load: " + err.message);
}

// --- router -----------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "") || "overview";
  const [path, query] = raw.split("?");
  return { parts: path.split("/"), query: new URLSearchParams(query || "") };
}

function route() {
  generation += 1;
  if (timer) clearInterval(timer);
  timer = null;
  if (stream) stream.abort();
  stream = null;
  const { parts, query } = parseHash();
  document.querySelectorAll("nav a").forEach((a) => {
    a.classList.toggle("active", a.dataset.nav === parts[0] || (parts[0] === "run" && a.dataset.nav === "runs"));
  });
  view.replaceChildren(h("p", { class: "muted" }, "loading..."));
  if (tokenRequired() && !token()) { askToken(""); return; }
  api("/v1/agents").then((a) => { document.getElementById("peer").textContent = "served by " + a.peer; }, () => {});
  const mine = generation;
  whoami().then((me) => {
    if (mine !== generation) return;
    showAuth();
    const pages = { overview, runs, run: runDetail, diagnostics };
    if (!location.hash && !me.admin) { location.hash = "#/runs"; return; }  // routes again
    const name = pages[parts[0]] ? parts[0] : "overview";
    if (!me.admin && ADMIN_PAGES.has(name)) { view.replaceChildren(adminOnly(name, me)); return; }
    pages[name](parts.slice(1), query);
  }, (err) => { if (mine === generation) view.replaceChildren(failure(err)); });
}

async function whoami() {
  if (caller === null) caller = await api("/v1/whoami");
  return caller;
}

function adminOnly(name, me) {
  const title = name === "overview" ? "Overview" : "Diagnostics";
  return h("section", { class: "admin-only" },
    h("h2", {}, title),
    h("p", {}, "This page shows the whole mesh and needs an admin token; this token acts as tenant ",
      h("b", {}, me.tenant), "."),
    h("p", {}, h("a", { href: "#/runs" }, "Runs"), " lists that tenant's runs."));
}

function every(ms, fn) {
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    try { await fn(mine); } catch (err) { if (mine === generation) view.replaceChildren(failure(err)); }
  };
  tick();
  timer = setInterval(tick, ms);
}

// --- overview ---------------------------------------------------------------

function chart(series) {
  const w = 600, hgt = 120, pad = 22;
  const max = Math.max(1, ...series.map((p) => Math.max(p.submitted, p.finished)));
  const x = (i) => pad + (i * (w - 2 * pad)) / Math.max(1, series.length - 1);
  const y = (v) => hgt - pad + 4 - (v * (hgt - 2 * pad)) / max;
  const line = (key) => series.map((p, i) => x(i).toFixed(1) + "," + y(p[key]).toFixed(1)).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "chart");
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  add("line", { x1: pad, y1: y(0), x2: w - pad, y2: y(0), stroke: "#d8dadc" });
  add("text", { x: 2, y: y(max) + 4 }, String(max));
  add("text", { x: 2, y: y(0) + 4 }, "0");
  if (series.length) {
    add("text", { x: pad, y: hgt - 4 }, clock(series[0].t));
    add("text", { x: w - pad - 44, y: hgt - 4 }, "now");
  }
  add("polyline", { class: "submitted", points: line("submitted") });
  add("polyline", { class: "finished", points: line("finished") });
  return svg;
}

function overview() {
  every(2000, async (mine) => {
    const c = await api("/v1/cluster");
    if (mine !== generation) return;
    document.getElementById("peer").textContent = "served by " + c.self;
    const q = c.queue || {};
    const runsBy = c.runs || {};
    const running = c.peers.reduce((n, p) => n + (p.status === "up" ? p.running : 0), 0);
    const offered = c.peers.reduce((n, p) => n + (p.status === "up" ? p.slots : 0), 0);
    const peers = c.peers.map((p) => h("tr", {},
      td(p.id + (p.id === c.leader ? " (leader)" : "")),
      td(p.role || "voter"),
      td(status(p.status)),
      td([h("span", { class: "bar" }, h("i", { style: `width:${p.slots ? Math.min(100, (100 * p.running) / p.slots) : 0}%` })), `${p.running} / ${p.slots}`]),
      td(p.drain ? "draining (" + p.drain + ")" : p.stopping ? "stopping" : "-"),
      td(p.http, "muted")));
    const waiting = Object.entries(q.waiting_for || {}).map(([why, n]) => h("tr", {}, td(n, "num"), td(why, "wrap")));
    const tenants = Object.entries(q.tenants || {}).map(([t, e]) => h("tr", {},
      td(t), td(e.queued, "num"), td(e.running, "num"), td(secs(e.oldest_age_s), "num"), td(e.cap ?? "-", "num")));
    const suspended = ((q.suspended || {}).runs || []).map((r) => h("tr", {},
      td(h("a", { href: "#/run/" + r.id }, r.id)), td(status(r.status)), td(r.tenant), td(r.agent), td(r.waiting_for, "wrap")));
    const series = (c.throughput || {}).series || [];
    const lastMin = series.slice(-6).reduce((n, p) => n + p.finished, 0);
    view.replaceChildren(
      kv([
        ["leader", c.leader || "none"], ["term", c.term],
        ["queue depth", q.depth ?? 0], ["oldest queued", secs(q.oldest_age_s || 0)],
        ["running", runsBy.running ?? running], ["slots used / offered", `${running} / ${offered}`],
        ["waiting", runsBy.waiting ?? 0], ["paused", runsBy.paused ?? 0],
        ["finished, last min", lastMin], ["placement", c.placement],
      ]),
      h("h2", {}, "Peers"),
      table(["peer", "role", "status", "slots used / offered", "drain", "http"], peers),
      h("div", { class: "row" },
        h("section", {},
          h("h2", {}, "Throughput (runs per ", String((c.throughput || {}).bucket_s || 10), " s, last 5 min)",
            h("span", { class: "legend muted" }, h("i", { style: "background:#8a8f94" }), "submitted",
              h("i", { style: "background:#0b5cad" }), "finished")),
          chart(series)),
        h("section", {},
          h("h2", {}, "Why queued runs wait"),
          table(["runs", "reason"], waiting, ["runs"]),
          h("h2", {}, "Tenants with active runs"),
          table(["tenant", "queued", "running", "oldest queued", "cap"], tenants, ["queued", "running", "oldest queued", "cap"]))),
      h("h2", {}, "Waiting and paused runs (no slot held; not queue depth)"),
      table(["run", "status", "tenant", "agent", "waiting for"], suspended));
  });
}

// --- runs -------------------------------------------------------------------

function runs(_parts, query) {
  const statusSel = h("select", { name: "status" },
    ["", "queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled", "timed_out"].map((s) =>
      h("option", { value: s, selected: query.get("status") === s ? "selected" : null }, s || "any")));
  const tenant = h("input", { name: "tenant", value: query.get("tenant") || "", placeholder: "any", size: 12 });
  const agent = h("input", { name: "agent", value: query.get("agent") || "", placeholder: "any", size: 12 });
  const offset = parseInt(query.get("offset") || "0", 10) || 0;
  const go = (newOffset) => {
    const q = new URLSearchParams();
    if (statusSel.value) q.set("status", statusSel.value);
    if (tenant.value.trim()) q.set("tenant", tenant.value.trim());
    if (agent.value.trim()) q.set("agent", agent.value.trim());
    if (newOffset) q.set("offset", String(newOffset));
    location.hash = "#/runs" + (q.toString() ? "?" + q : "");
  };
  const form = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); go(0); } },
    h("label", {}, "status", statusSel), h("label", {}, "tenant", tenant), h("label", {}, "agent", agent),
    h("button", { type: "submit" }, "filter"));
  const body = h("div", {});
  view.replaceChildren(form, body);
  every(3000, async (mine) => {
    const q = new URLSearchParams(query);
    q.set("limit", String(PAGE + 1));
    q.set("offset", String(offset));
    const data = await api("/v1/runs?" + q);
    if (mine !== generation) return;
    const list = data.runs.slice(0, PAGE);
    const more = data.runs.length > PAGE;
    const rows = list.map((r) => h("tr", {},
      td(h("a", { href: "#/run/" + r.id }, r.id)), td(r.agent), td(r.tenant), td(status(r.status)),
      td(r.owner || "-"), td(r.epoch, "num"), td(r.attempts, "num"), td(ago(r.submitted_at)), td(duration(r), "num")));
    body.replaceChildren(
      table(["run", "agent", "tenant", "status", "owner", "epoch", "attempts", "submitted", "duration"], rows, ["epoch", "attempts", "duration"]),
      h("div", {},
        button("previous", () => go(Math.max(0, offset - PAGE))),
        " ", h("span", { class: "muted" }, list.length ? `runs ${offset + 1}-${offset + list.length}` : "no runs"), " ",
        button("next", () => go(offset + PAGE))));
    body.querySelectorAll("button")[0].disabled = offset === 0;
    body.querySelectorAll("button")[1].disabled = !more;
  });
}

// --- run detail ---------------------------------------------------------------

function runDetail(parts) {
  const id = decodeURIComponent(parts[0] || "");
  const head = h("div", {});
  const history = h("div", {});
  const outcome = h("div", {});
  const events = h("tbody", {});
  const liveness = h("span", { class: "muted" }, "connecting...");
  const signal = signalForm(id);
  view.replaceChildren(
    head,
    signal,
    h("div", { class: "row" },
      h("section", {}, h("h2", {}, "Owners (epoch history, from storage)"), history),
      h("section", {}, h("h2", {}, "Events ", liveness),
        h("div", { id: "events" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "seq"), h("th", {}, "at"), h("th", {}, "kind"), h("th", { class: "num" }, "epoch"), h("th", {}, "data"))), events)))),
    outcome);
  followEvents(id, events, liveness);
  every(1000, async (mine) => {
    const [run, steps] = await Promise.all([api("/v1/runs/" + encodeURIComponent(id)), api("/v1/runs/" + encodeURIComponent(id) + "/steps")]);
    if (mine !== generation) return;
    const actions = [];
    if (!TERMINAL.has(run.status) && !run.cancel_requested) {
      actions.push(button("cancel", () => act(id, "cancel")));
    }
    if (RETRYABLE.has(run.status)) actions.push(button("retry", () => act(id, "retry")));
    // What the API allows: pause a queued, waiting or running run (a running
    // one stops at its next step boundary); resume a paused one, or withdraw
    // a pause its owner has not acted on yet.
    if (PAUSABLE.has(run.status) && !run.pause_requested && !run.cancel_requested) {
      actions.push(button("pause", () => act(id, "pause")));
    }
    if (run.status === "paused" || (run.status === "running" && run.pause_requested)) {
      actions.push(button("resume", () => act(id, "resume")));
    }
    signal.hidden = TERMINAL.has(run.status);
    const state = run.pause_requested ? [" ", h("span", { class: "muted" }, "(pausing at the next step)")] : [];
    head.replaceChildren(
      h("h2", {}, "Run ", id, " ", status(run.status), ...state, " ", ...actions),
      kv([["agent", run.agent], ["tenant", run.tenant], ["owner", run.owner || "-"], ["epoch", run.epoch],
          ["attempts", run.attempts], ["submitted", clock(run.submitted_at)], ["started", clock(run.started_at)],
          ["finished", clock(run.finished_at)], ["last attempt", duration(run)], ["priority", run.priority],
          ["waiting for", run.waiting_for || "-"]]));
    history.replaceChildren(
      table(["epoch", "peer", "steps", "seq"], steps.owners.map((o) => h("tr", {},
        td(o.epoch, "num"), td(o.peer), td(o.steps, "num"), td(o.first_seq === o.last_seq ? o.first_seq : `${o.first_seq}-${o.last_seq}`))), ["epoch", "steps"]),
      h("h2", {}, "Step journal"),
      table(["seq", "name", "epoch", "peer", "checkpointed", "took"], steps.steps.map((s) => h("tr", {},
        td(s.seq, "num"), td(s.name), td(s.epoch, "num"), td(s.peer), td(clock(s.at)), td(secs(s.took_s), "num"))), ["seq", "epoch", "took"]));
    const parts = [];
    if (run.error) parts.push(h("h2", {}, "Error"), h("pre", { class: "bad" }, run.error));
    if (run.result !== null && run.result !== undefined) parts.push(h("h2", {}, "Result"), h("pre", {}, JSON.stringify(run.result, null, 2)));
    outcome.replaceChildren(...parts);
  });
}

// Built once per page, outside the refreshed header, so that what the
// operator types survives the refresh.
function signalForm(id) {
  const name = h("input", { name: "signal-name", placeholder: "name", size: 16, required: "required" });
  const data = h("input", { name: "signal-data", placeholder: "JSON data, e.g. {\"ok\": true}", size: 40 });
  const note = h("span", { class: "muted", id: "signal-note" });
  const send = async (e) => {
    e.preventDefault();
    let value = null;
    try {
      value = data.value.trim() ? JSON.parse(data.value) : null;
    } catch (err) {
      note.className = "error";
      note.textContent = "data is not valid JSON: " + err.message;
      return;
    }
    try {
      const sent = await api(`/v1/runs/${encodeURIComponent(id)}/signals/${encodeURIComponent(name.value.trim())}`,
        { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ data: value }) });
      note.className = "muted";
      note.textContent = `signal ${sent.name} sent (seq ${sent.seq}${sent.duplicate ? ", a duplicate" : ""})`;
    } catch (err) {
      if (err instanceof Unauthorized) return;
      note.className = "error";
      note.textContent = "signal failed: " + err.message;
    }
  };
  return h("form", { class: "filters", id: "signal-form", hidden: "hidden", onsubmit: send },
    h("label", {}, "signal", name), h("label", {}, "data", data),
    h("button", { type: "submit" }, "send signal"), note);
}

async function act(id, what) {
  try {
    await api(`/v1/runs/${encodeURIComponent(id)}/${what}`, { method: "POST" });
  } catch (err) {
    if (!(err instanceof Unauthorized)) alert(what + " failed: " + err.message);
  }
}

// EventSource cannot send an Authorization header, so the stream is read with
// fetch(); a broken stream resumes from the last event id.
async function followEvents(id, tbody, liveness) {
  const controller = new AbortController();
  stream = controller;
  let last = 0;
  while (!controller.signal.aborted) {
    try {
      const resp = await fetch(`/v1/runs/${encodeURIComponent(id)}/events`, {
        headers: { ...headers(), Accept: "text/event-stream", ...(last ? { "Last-Event-ID": String(last) } : {}) },
        signal: controller.signal,
      });
      if (resp.status === 401) { askToken("The token was refused: enter it again."); return; }
      if (!resp.ok) throw new Error(resp.status + " " + resp.statusText);
      liveness.className = "live";
      liveness.textContent = "live";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = parseFrame(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!frame) continue;
          if (frame.event === "end") {
            liveness.className = "muted";
            liveness.textContent = "ended";
            return;
          }
          if (frame.id) last = frame.id;
          const e = frame.data && typeof frame.data === "object" ? frame.data : {};
          tbody.append(h("tr", {}, td(e.seq ?? frame.id ?? "", "num"), td(clock(e.at)), td(e.kind ?? frame.event),
            td(e.epoch ?? "-", "num"), td(JSON.stringify(e.data ?? frame.data), "wrap")));
        }
      }
    } catch (err) {
      if (controller.signal.aborted) return;
      liveness.className = "bad";
      liveness.textContent = "reconnecting (" + err.message + ")";
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function parseFrame(text) {
  const frame = { event: "message", data: null, id: null };
  let seen = false;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") { frame.event = value; seen = true; }
    else if (field === "id") frame.id = parseInt(value, 10);
    else if (field === "data") { try { frame.data = JSON.parse(value); } catch { frame.data = value; } seen = true; }
  }
  return seen ? frame : null;
}

// --- diagnostics --------------------------------------------------------------

function diagnostics() {
  every(1000, async (mine) => {
    const d = await api("/v1/diagnostics");
    if (mine !== generation) return;
    document.getElementById("peer").textContent = "served by " + d.peer;
    const rows = d.checks.map((c) => h("tr", { "data-check": c.name, "data-status": c.status },
      td(pill(c.status), "narrow"), td(c.name, "narrow"), td(c.detail, "wrap")));
    view.replaceChildren(
      h("h2", {}, "Diagnostics of ", d.peer, ": ", h("span", { id: "overall", class: "pill " + d.status }, d.status)),
      table(["status", "check", "detail"], rows),
      ...(d.notes || []).map((n) => h("p", { class: "muted" }, n)),
      h("p", { class: "muted" }, "refreshed " + new Date().toLocaleTimeString([], { hour12: false })));
  });
}

window.addEventListener("hashchange", route);
showAuth();
route();

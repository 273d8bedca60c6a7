// The colima-e2b dashboard: sandboxes with their live usage, their processes, a terminal
// on each (xterm.js over WS /sandboxes/{id}/terminal), templates and their build logs.
// Every call carries the API key the page was given (kept for this tab only); nothing
// the server returns is ever inserted as HTML.
"use strict";

const KEY_STORE = "colima-e2b.key";
const REFRESH_MS = 2000;

let key = sessionStorage.getItem(KEY_STORE) || "";
let selected = null; // the sandbox shown in the detail pane
let term = null; // { terminal, fit, socket, id }
let refreshing = false;

// A key handed over in the fragment (`/ui#key=...`, never sent to the server) is taken
// and removed from the address bar.
(function keyFromFragment() {
  const m = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  if (m) {
    key = decodeURIComponent(m[1]);
    sessionStorage.setItem(KEY_STORE, key);
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

function status(message, isError = false) {
  const s = $("#status");
  s.textContent = message || "";
  s.classList.toggle("error", isError);
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (key) headers["Authorization"] = "Bearer " + key;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  const text = await resp.text();
  let body = text;
  try { body = text ? JSON.parse(text) : null; } catch (_) { /* NDJSON or text */ }
  if (!resp.ok) {
    const message = (body && body.message) || resp.statusText;
    throw new ApiError(resp.status, body && body.code, message);
  }
  return body;
}

function failed(e) {
  if (e instanceof ApiError && e.status === 401) {
    status("The server wants its API key: paste what `colima-e2b env` prints as E2B_API_KEY.", true);
    $("#key").focus();
  } else {
    status(e.message || String(e), true);
  }
}

function span(iso, future) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "-";
  const s = Math.max(0, Math.round((future ? t - Date.now() : Date.now() - t) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d";
}

function mib(bytes) {
  return (bytes / 1048576).toFixed(bytes < 10485760 ? 1 : 0);
}

function usage(used, total) {
  if (used == null || !total) return "-";
  const pct = Math.min(100, (100 * used) / total);
  const bar = el("span", { class: "bar" }, el("span"));
  bar.firstChild.style.width = pct.toFixed(0) + "%";
  return el("span", {}, bar, `${mib(used)} / ${mib(total)} MiB`);
}

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const sandboxes = await api("/sandboxes");
    let metrics = {};
    const running = sandboxes.filter((s) => s.state === "running").map((s) => s.sandbox_id);
    if (running.length) {
      try {
        const m = await api("/e2b/sandboxes/metrics?sandbox_ids=" + running.slice(0, 100).join(","));
        metrics = (m && m.sandboxes) || {};
      } catch (_) { /* the E2B layer may be off: usage shows "-" */ }
    }
    renderSandboxes(sandboxes, metrics);
    if (selected) await refreshProcesses();
    status("");
  } catch (e) {
    failed(e);
  } finally {
    refreshing = false;
  }
}

function renderSandboxes(sandboxes, metrics) {
  const body = $("#sandboxes tbody");
  body.replaceChildren();
  $("#count").textContent = `(${sandboxes.length})`;
  $("#no-sandboxes").hidden = sandboxes.length > 0;
  for (const s of sandboxes) {
    const m = metrics[s.sandbox_id] || {};
    const cpu = m.cpuUsedPct != null ? `${m.cpuUsedPct.toFixed(1)}% of ${m.cpuCount}` : "-";
    const row = el("tr", { dataset: { sandboxId: s.sandbox_id } },
      el("td", {}, el("code", {}, s.sandbox_id)),
      el("td", {}, s.template_id),
      el("td", { class: "state" }, s.state),
      el("td", {}, span(s.started_at, false)),
      el("td", {}, span(s.end_at, true)),
      el("td", { class: "cpu" }, cpu),
      el("td", { class: "memory" }, usage(m.memUsed, m.memTotal)),
      el("td", { class: "disk" }, usage(m.diskUsed, m.diskTotal)),
      el("td", {},
        el("button", { type: "button", class: "open", onclick: () => select(s.sandbox_id) }, "Open"),
        " ",
        el("button", { type: "button", class: "danger kill", onclick: () => kill(s.sandbox_id) }, "Kill")));
    if (s.sandbox_id === selected) row.classList.add("selected");
    body.append(row);
  }
  if (selected && !sandboxes.some((s) => s.sandbox_id === selected)) {
    closeDetail();
    status(`Sandbox ${selected} is gone.`);
  }
}

async function kill(id) {
  if (!confirm(`Kill sandbox ${id}? Its files and processes are lost.`)) return;
  try {
    await api(`/sandboxes/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (id === selected) closeDetail();
    await refresh();
  } catch (e) {
    failed(e);
  }
}

function select(id) {
  if (selected !== id) closeDetail();
  selected = id;
  $("#detail").hidden = false;
  $("#detail-id").textContent = id;
  refresh();
}

function closeDetail() {
  closeTerminal();
  selected = null;
  $("#detail").hidden = true;
  $("#processes tbody").replaceChildren();
}

async function refreshProcesses() {
  const id = selected;
  try {
    const list = await api(`/sandboxes/${encodeURIComponent(id)}/commands`);
    if (id !== selected) return;
    const body = $("#processes tbody");
    body.replaceChildren();
    for (const p of list) {
      body.append(el("tr", { dataset: { pid: p.pid } },
        el("td", {}, p.pid),
        el("td", { class: "wrap" }, [p.cmd, ...(p.args || [])].join(" ")),
        el("td", {}, p.tag || ""),
        el("td", {}, el("button", { type: "button", class: "danger", onclick: () => killProcess(id, p.pid) }, "Kill"))));
    }
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) failed(e);
  }
}

async function killProcess(id, pid) {
  try {
    await api(`/sandboxes/${encodeURIComponent(id)}/commands/${pid}`, { method: "DELETE" });
    await refreshProcesses();
  } catch (e) {
    failed(e);
  }
}

// The key as a WebSocket subprotocol: a browser cannot set headers on an upgrade.
function keyProtocol() {
  const bytes = new TextEncoder().encode(key);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return "bearer." + btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function openTerminal() {
  const id = selected;
  if (!id) return;
  closeTerminal();
  const box = $("#terminal");
  const note = $("#terminal-status");
  if (typeof Terminal === "undefined") {
    note.textContent = "This build has no xterm.js: run deploy/ui-assets.sh and rebuild the server.";
    return;
  }
  const terminal = new Terminal({ cursorBlink: true, fontSize: 13, convertEol: false });
  const fit = new FitAddon.FitAddon();
  terminal.loadAddon(fit);
  terminal.open(box);
  fit.fit();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/sandboxes/${encodeURIComponent(id)}/terminal?cols=${terminal.cols}&rows=${terminal.rows}`;
  const socket = new WebSocket(url, key ? ["colima-e2b", keyProtocol()] : ["colima-e2b"]);
  socket.binaryType = "arraybuffer";
  term = { terminal, fit, socket, id };
  note.textContent = "Connecting…";
  const encoder = new TextEncoder();
  socket.onopen = () => { note.textContent = "Connected."; terminal.focus(); };
  socket.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      terminal.write(new Uint8Array(ev.data));
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "exit") {
      terminal.write(`\r\n[the shell exited with ${msg.exit_code}]\r\n`);
      note.textContent = "The shell exited.";
    } else if (msg.type === "error") {
      terminal.write(`\r\n\x1b[31m${msg.message}\x1b[0m\r\n`);
    }
  };
  socket.onclose = (ev) => {
    if (term && term.socket === socket) note.textContent = `Disconnected${ev.reason ? ": " + ev.reason : ""}.`;
  };
  socket.onerror = () => { note.textContent = "The terminal could not connect (is the key right?)."; };
  terminal.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
  terminal.onResize(({ cols, rows }) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols, rows }));
  });
}

function closeTerminal() {
  if (!term) return;
  const { terminal, socket } = term;
  term = null;
  socket.close();
  terminal.dispose();
  $("#terminal").replaceChildren();
  $("#terminal-status").textContent = "";
}

async function refreshTemplates() {
  try {
    const list = await api("/templates");
    const body = $("#templates tbody");
    body.replaceChildren();
    for (const t of list) {
      body.append(el("tr", { dataset: { template: t.name }, onclick: () => showTemplate(t.name) },
        el("td", {}, t.name),
        el("td", {}, t.source),
        el("td", {}, t.status || ""),
        el("td", {}, (t.tags || []).join(", ")),
        el("td", { class: "wrap" }, t.image || "")));
    }
  } catch (e) {
    failed(e);
  }
}

async function showTemplate(name) {
  try {
    const t = await api(`/templates/${encodeURIComponent(name)}`);
    $("#template-detail").hidden = false;
    $("#template-name").textContent = name;
    $("#build-log").hidden = true;
    const body = $("#builds tbody");
    body.replaceChildren();
    const builds = t.builds || [];
    if (!builds.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No builds (a template from the configuration).")));
    for (const b of builds) {
      body.append(el("tr", { dataset: { build: b.build_id }, onclick: () => showLog(name, b.build_id) },
        el("td", {}, el("code", {}, b.build_id)),
        el("td", {}, b.status),
        el("td", {}, b.created_at),
        el("td", {}, b.seconds != null ? b.seconds.toFixed(1) : ""),
        el("td", { class: "wrap" }, b.error || "")));
    }
  } catch (e) {
    failed(e);
  }
}

async function showLog(name, build) {
  try {
    const text = await api(`/templates/${encodeURIComponent(name)}/builds/${encodeURIComponent(build)}/logs`);
    const lines = (typeof text === "string" ? text : JSON.stringify(text)).split("\n").filter(Boolean).map((l) => {
      try {
        const e = JSON.parse(l);
        return `${e.timestamp || ""} ${e.step ? "#" + e.step + " " : ""}${e.message || ""}`;
      } catch (_) {
        return l;
      }
    });
    const pre = $("#build-log");
    pre.textContent = lines.join("\n");
    pre.hidden = false;
  } catch (e) {
    failed(e);
  }
}

async function serverInfo() {
  try {
    const h = await api("/health");
    $("#server").textContent = `${h.backend || ""} ${h.version ? "v" + h.version : ""}`.trim();
  } catch (_) { /* shown by the next refresh */ }
}

function showKeyState() {
  $("#forget").hidden = !key;
  $("#key").placeholder = key ? "key set (paste another to change)" : "colima-e2b env prints it";
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("#key").value.trim();
  $("#key").value = "";
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  showKeyState();
  refresh();
  refreshTemplates();
});
$("#forget").addEventListener("click", () => {
  key = "";
  sessionStorage.removeItem(KEY_STORE);
  closeDetail();
  showKeyState();
  refresh();
});
$("#open-terminal").addEventListener("click", openTerminal);
$("#close-detail").addEventListener("click", closeDetail);
window.addEventListener("resize", () => { if (term) term.fit.fit(); });

showKeyState();
serverInfo();
refresh();
refreshTemplates();
setInterval(refresh, REFRESH_MS);
setInterval(refreshTemplates, 5 * REFRESH_MS);

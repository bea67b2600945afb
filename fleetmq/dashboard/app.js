// fleetmq dashboard: plain JavaScript, served by the manager, talking to its REST API.
// Node data is only ever set as text (textContent, title, value): never parsed as HTML.
"use strict";

const API = "/api/v1/fleet";
const PAGE_SIZE = 50;
const KEY_STORAGE = "fleetmq.key";
const REFRESH_EVERY_MS = 1000;      // counts and the page shown, at most once a second
const PRESENCE_EVERY_MS = 5000;     // /readyz and the store's gauge
const STREAM_SILENCE_MS = 45000;    // the stream sends a comment every 15 s: 3 missed, reconnect
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 15000;
const STATUSES = ["online", "degraded", "offline"];

const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  filters: { q: "", status: "", node_type: "", location: "" },
  pages: [null],            // the `after` of each page read so far; the last is shown
  rows: new Map(),          // node id -> its table row, for the page shown
  nodeShown: null,          // the id of the node page shown, or null
  olderEvents: null,        // the node page's `next` (events before it), or null
  lastEventId: null,        // the watch stream's position: `<store id>.<event id>`
  refreshTimer: null,
  refreshDue: false,
  streamAbort: null,
  keyPrompt: null,          // the pending key prompt (one at a time)
  metricsRefusedTo: null,   // the key /metrics refused (none: "" before one is given)
};

// --- the API ------------------------------------------------------------------------------

class AuthNeeded extends Error {}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function api(path, { method = "GET", body, retry = true } = {}) {
  const init = { method, headers: { Accept: "application/json", ...authHeaders() },
                 cache: "no-store" };
  if (body !== undefined) {
    init.body = body;
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.status === 401 && retry) {
    await askForKey(state.key ? "The key was refused (revoked or expired?): give another." : "");
    return api(path, { method, body, retry: false });
  }
  let json = null;
  try {
    json = await response.json();
  } catch {
    json = null;
  }
  return { status: response.status, json };
}

function query(params) {
  const pairs = Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined);
  return pairs.length ? "?" + new URLSearchParams(pairs).toString() : "";
}

function problem(reply) {
  const j = reply.json;
  return j && typeof j.message === "string" ? `${j.error}: ${j.message}` : `HTTP ${reply.status}`;
}

// --- the key (auth on) ------------------------------------------------------------------------

function askForKey(message) {
  if (state.keyPrompt) return state.keyPrompt;
  const dialog = $("key-dialog");
  const error = $("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("key-input").value = "";
  state.keyPrompt = new Promise((resolve) => {
    const form = $("key-form");
    const submit = async (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      const probe = await fetch(`${API}/nodes?limit=1`, {
        headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
      if (probe.status === 401 || probe.status === 403) {
        error.hidden = false;
        error.textContent = probe.status === 401
          ? "This key is not valid here (unknown, revoked or expired)."
          : "This key may not read the fleet: use a key of role read.";
        return;
      }
      form.removeEventListener("submit", submit);
      state.key = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      dialog.close();
      state.keyPrompt = null;
      $("forget-key").hidden = false;
      describeKey();
      presence();  // the store's gauge, which /metrics may now show this key
      resolve();
    };
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", (event) => event.preventDefault());  // no data without it
    dialog.showModal();
  });
  return state.keyPrompt;
}

// A key stronger than read works, but anyone at this screen could then change the fleet: say so.
// Probes that change nothing: the key list (admin only) and an empty heartbeat (400 for a key
// that may send heartbeats, 403 for one that may not).
async function describeKey() {
  if (!state.key) return;
  const headers = authHeaders();
  let role = "read";
  const keys = await fetch("/api/v1/keys", { headers, cache: "no-store" });
  if (keys.status === 200) {
    role = "admin";
  } else {
    const write = await fetch(`${API}/heartbeat`, {
      method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: "{}" });
    if (write.status === 400) role = "write";
  }
  $("key-role").textContent = `key: ${role}`;
  if (role !== "read") {
    showBanner(`This is a key of role ${role}: a read key is enough for the dashboard, and ` +
               "with this one anyone at this screen could change the fleet.");
  }
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = "";
  location.reload();
}

// --- banner ---------------------------------------------------------------------------------

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

// --- counts ---------------------------------------------------------------------------------

async function loadSummary() {
  const reply = await api(`${API}/summary`);
  if (reply.status !== 200 || !reply.json) {
    showBanner(`Cannot read the fleet's summary: ${problem(reply)}`);
    return null;
  }
  const summary = reply.json;
  $("count-total").textContent = formatCount(summary.total);
  for (const status of STATUSES) {
    $(`count-${status}`).textContent = formatCount((summary.by_status || {})[status] || 0);
  }
  renderTypes(summary.by_type || {});
  return summary;
}

let typesShown = "";

function renderTypes(byType) {
  const shown = JSON.stringify([byType, state.filters.node_type]);
  if (shown === typesShown) return;  // unchanged: leave an open select alone
  typesShown = shown;
  const box = $("types");
  const select = $("type");
  const types = Object.keys(byType).sort();
  box.replaceChildren(...types.map((type) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.type = type;
    button.setAttribute("aria-pressed", String(state.filters.node_type.toLowerCase() === type.toLowerCase()));
    button.append(document.createTextNode(type));
    const n = document.createElement("span");
    n.className = "n";
    n.textContent = formatCount(byType[type]);
    button.append(n);
    button.addEventListener("click", () => {
      const same = state.filters.node_type.toLowerCase() === type.toLowerCase();
      setFilter("node_type", same ? "" : type);
    });
    return button;
  }));
  const chosen = state.filters.node_type;
  const options = [new Option("any", "")];
  for (const type of types) options.push(new Option(type, type));
  if (chosen && !types.some((t) => t.toLowerCase() === chosen.toLowerCase())) {
    options.push(new Option(chosen, chosen));
  }
  select.replaceChildren(...options);
  select.value = chosen;
}

function formatCount(n) {
  return typeof n === "number" ? n.toLocaleString("en") : "–";
}

// --- the node table -------------------------------------------------------------------------

function setFilter(name, value) {
  state.filters[name] = value;
  syncFilterControls();
  state.pages = [null];
  loadPage();
}

function syncFilterControls() {
  // The text boxes (q, location) are only ever typed in: left alone, so that a change made
  // elsewhere while their debounce waits does not put back what was there before.
  $("status").value = state.filters.status;
  $("type").value = state.filters.node_type;
  for (const card of document.querySelectorAll(".card")) {
    card.setAttribute("aria-pressed", String(card.dataset.status === state.filters.status));
  }
  for (const button of document.querySelectorAll("#types button")) {
    const on = button.dataset.type.toLowerCase() === state.filters.node_type.toLowerCase();
    button.setAttribute("aria-pressed", String(on && state.filters.node_type !== ""));
  }
}

let pageRequest = 0;

async function loadPage() {
  const mine = ++pageRequest;
  const after = state.pages[state.pages.length - 1];
  const params = { limit: PAGE_SIZE, after, ...state.filters };
  if (params.q && !/^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/.test(params.q)) {
    renderRows([], 0, null, "No node id starts with that (ids use letters, digits and ._:-).");
    return;
  }
  const reply = await api(`${API}/nodes${query(params)}`);
  if (mine !== pageRequest) return;  // a newer request is on its way
  if (reply.status !== 200 || !reply.json) {
    renderRows([], 0, null, `Cannot list the nodes: ${problem(reply)}`);
    return;
  }
  const { nodes, total, next } = reply.json;
  renderRows(nodes, total, next, nodes.length ? "" : "No node matches.");
}

function renderRows(nodes, total, next, emptyText) {
  const body = $("nodes").tBodies[0];
  state.rows = new Map();
  body.replaceChildren(...nodes.map((node) => {
    const row = nodeRow(node);
    state.rows.set(node.id, row);
    return row;
  }));
  const empty = $("empty");
  empty.textContent = emptyText;
  empty.hidden = !emptyText;
  const first = (state.pages.length - 1) * PAGE_SIZE;
  $("page-info").textContent = nodes.length
    ? `${formatCount(first + 1)}–${formatCount(first + nodes.length)} of ${formatCount(total)}`
    : "";
  $("prev-page").disabled = state.pages.length <= 1;
  $("first-page").disabled = state.pages.length <= 1;
  $("next-page").disabled = !next;
  $("next-page").dataset.after = next || "";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  td.title = text;
  if (className) td.className = className;
  return td;
}

function statusBadge(status) {
  const span = document.createElement("span");
  span.className = `status ${STATUSES.includes(status) ? status : "deleted"}`;
  span.textContent = status;
  return span;
}

function nodeRow(node) {
  const row = document.createElement("tr");
  row.dataset.id = node.id;
  const status = document.createElement("td");
  status.className = "status-cell";
  status.append(statusBadge(node.status));
  const seen = cell(ago(node.last_seen), "seen");
  seen.dataset.at = node.last_seen || "";
  seen.title = node.last_seen || "";
  row.append(cell(node.id, "id"), cell(node.name ?? ""), cell(node.type ?? ""), status,
             cell(node.status_reason ?? "", "reason"), seen, cell(node.location ?? "", "location"));
  row.addEventListener("click", () => { location.hash = `#/node/${encodeURIComponent(node.id)}`; });
  return row;
}

// --- time -----------------------------------------------------------------------------------

function ago(timestamp) {
  if (!timestamp) return "";
  const then = Date.parse(timestamp);
  if (Number.isNaN(then)) return timestamp;
  const s = Math.max(0, Math.round((Date.now() - then) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function refreshTimes() {
  for (const td of document.querySelectorAll("td.seen")) td.textContent = ago(td.dataset.at);
}

function duration(seconds) {
  if (typeof seconds !== "number") return "";
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${seconds % 60}s`;
}

// --- the node page --------------------------------------------------------------------------

async function showNode(id) {
  state.nodeShown = id;
  $("fleet-view").hidden = true;
  $("node-view").hidden = false;
  $("node-title").textContent = id;
  await Promise.all([loadNode(id), loadEvents(id, null)]);
}

async function loadNode(id) {
  const reply = await api(`${API}/nodes/${encodeURIComponent(id)}`);
  if (state.nodeShown !== id) return;
  const gone = reply.status === 404;
  $("node-gone").hidden = !gone;
  const node = reply.status === 200 ? reply.json : null;
  $("node-status").replaceChildren(...(node ? [statusBadge(node.status)] : []));
  $("node-title").textContent = node && node.name && node.name !== id ? `${node.name} (${id})` : id;
  fill($("node-fields"), node ? [
    ["ID", node.id], ["Name", node.name], ["Type", node.type],
    ["Status", node.status], ["Reason", node.status_reason], ["Since", node.status_since],
    ["Last seen", node.last_seen ? `${node.last_seen} (${ago(node.last_seen)})` : ""],
    ["Registered", node.registered_at], ["Location", node.location ?? ""],
    ["Capabilities", (node.capabilities || []).join(", ")],
    ["Heartbeat interval", `${node.heartbeat_interval_seconds} s`],
  ] : []);
  fill($("node-telemetry"), node ? [
    ["Uptime", node.uptime_seconds == null ? "–" : duration(node.uptime_seconds)],
    ["Free memory", node.free_memory_kb == null ? "–" : `${formatCount(node.free_memory_kb)} KB`],
    ["Sensors active", node.sensors_active == null ? "–" : String(node.sensors_active)],
  ] : []);
  const metadata = node ? Object.entries(node.metadata || {}) : [];
  fill($("node-metadata"), metadata.length
    ? metadata.map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)])
    : [["", node ? "none" : ""]]);
  if (!node && !gone) showBanner(`Cannot read node ${id}: ${problem(reply)}`);
}

function fill(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v ?? "";
    return [dt, dd];
  }));
}

async function loadEvents(id, before) {
  const reply = await api(`${API}/nodes/${encodeURIComponent(id)}/events${query({ limit: 50, before })}`);
  if (state.nodeShown !== id) return;
  const list = $("node-history");
  if (!before) list.replaceChildren();
  if (reply.status !== 200 || !reply.json) {
    if (reply.status !== 404) showBanner(`Cannot read the history of ${id}: ${problem(reply)}`);
    $("older-events").hidden = true;
    return;
  }
  list.append(...reply.json.events.map(eventItem));
  state.olderEvents = reply.json.next;
  $("older-events").hidden = !reply.json.next;
}

function eventItem(event) {
  const li = document.createElement("li");
  li.dataset.eventId = String(event.id);
  li.className = STATUSES.includes(event.to) ? event.to : "deleted";
  const at = document.createElement("span");
  at.className = "at";
  at.textContent = event.at;
  const what = document.createElement("span");
  what.textContent = `${event.from ?? "new"} → ${event.to}`;
  const why = document.createElement("span");
  why.className = "muted";
  why.textContent = ` (${event.reason})`;
  li.append(at, what, why);
  if (event.location) {
    const where = document.createElement("span");
    where.className = "muted";
    where.textContent = ` at ${event.location}`;
    li.append(where);
  }
  return li;
}

function showFleet() {
  state.nodeShown = null;
  $("node-view").hidden = true;
  $("fleet-view").hidden = false;
}

function route() {
  const match = /^#\/node\/(.+)$/.exec(location.hash);
  if (match) {
    let id;
    try {
      id = decodeURIComponent(match[1]);
    } catch {
      id = match[1];
    }
    showNode(id);
  } else {
    showFleet();
    loadPage();
  }
}

// --- live: the watch stream, read with fetch() (EventSource cannot send Authorization) -------

function setPill(id, stateName, text) {
  const pill = $(id);
  pill.dataset.state = stateName;
  pill.textContent = text;
  pill.title = text;
}

async function watch() {
  let wait = RECONNECT_MIN_MS;
  for (;;) {
    const abort = new AbortController();
    state.streamAbort = abort;
    let silence = null;
    const quiet = () => {
      clearTimeout(silence);
      silence = setTimeout(() => abort.abort(), STREAM_SILENCE_MS);
    };
    try {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      quiet();
      const response = await fetch(`${API}/watch`, { headers, signal: abort.signal, cache: "no-store" });
      if (response.status === 401) {
        clearTimeout(silence);
        await askForKey("The key was refused (revoked or expired?): give another.");
        continue;
      }
      if (!response.ok || !response.body) throw new Error(`the stream answered ${response.status}`);
      setPill("stream", "ok", "live");
      wait = RECONNECT_MIN_MS;
      const ended = await readEvents(response.body, quiet);
      clearTimeout(silence);
      if (ended === "reset") {
        // Our position is gone (pruned, another store): read everything again, then watch
        // from the summary's position.
        setPill("stream", "warn", "reloading …");
        state.lastEventId = null;
        await reloadAll();
        continue;
      }
      if (ended === "overflow") continue;  // too far behind: resume from the last event seen
      setPill("stream", "warn", "reconnecting …");  // the manager closed it (a restart?)
    } catch (error) {
      setPill("stream", "down", `reconnecting … (${error.message || error})`);
    } finally {
      clearTimeout(silence);
    }
    await sleep(wait);
    wait = Math.min(wait * 2, RECONNECT_MAX_MS);
  }
}

async function readEvents(body, quiet) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    quiet();
    buffer += decoder.decode(value, { stream: true });
    // A CR at the end may be half of a CRLF split across two reads: keep it for the next.
    const held = buffer.endsWith("\r") ? 1 : 0;
    const lines = buffer.slice(0, buffer.length - held).split(/\r\n|\r|\n/);
    buffer = lines.pop() + (held ? "\r" : "");
    for (const line of lines) {
      if (line === "") {
        if (event.data.length || event.type !== "message") {
          const ended = dispatch(event);
          if (ended) {
            reader.cancel().catch(() => {});
            return ended;
          }
        }
        event = { type: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;  // the keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event.type = value;
      else if (field === "data") event.data.push(value);
      else if (field === "id") event.id = value;
    }
  }
}

function dispatch(event) {
  if (event.type === "transition") {
    if (event.id) state.lastEventId = event.id;
    let data;
    try {
      data = JSON.parse(event.data.join("\n"));
    } catch {
      return null;
    }
    applyEvent(data);
  } else if (event.type === "reset" || event.type === "overflow") {
    return event.type;
  }
  return null;
}

function applyEvent(event) {
  const row = state.rows.get(event.node_id);
  if (row) {
    const badge = row.querySelector(".status-cell");
    badge.replaceChildren(statusBadge(event.to));
    const reason = row.querySelector("td.reason");
    reason.textContent = event.reason;
    reason.title = event.reason;
    if (event.last_seen) {
      const seen = row.querySelector("td.seen");
      seen.dataset.at = event.last_seen;
      seen.title = event.last_seen;
      seen.textContent = ago(event.last_seen);
    }
    row.classList.remove("flash");
    void row.offsetWidth;  // restart the animation
    row.classList.add("flash");
  }
  if (state.nodeShown === event.node_id) {
    loadNode(event.node_id);
    const list = $("node-history");
    const shown = [...list.children].some((li) => li.dataset.eventId === String(event.id));
    if (!shown) list.prepend(eventItem(event));  // the history read may already hold it
  }
  scheduleRefresh();
}

function scheduleRefresh() {
  state.refreshDue = true;
  if (state.refreshTimer) return;
  const run = async () => {
    if (!state.refreshDue) {
      state.refreshTimer = null;
      return;
    }
    state.refreshDue = false;
    try {
      await refresh();
    } finally {
      state.refreshTimer = setTimeout(run, REFRESH_EVERY_MS);
    }
  };
  state.refreshTimer = setTimeout(run, 0);
}

async function refresh() {
  if (state.nodeShown !== null) return loadSummary();
  await Promise.all([loadSummary(), loadPage()]);
}

async function reloadAll() {
  const summary = await loadSummary();
  if (summary && summary.event_id) state.lastEventId = summary.event_id;
  route();
}

// --- presence: the manager's readiness and the store's health -------------------------------

async function presence() {
  try {
    const ready = await fetch("/readyz", { cache: "no-store" });
    const body = await ready.json().catch(() => ({}));
    if (ready.status === 200) {
      setPill("manager", "ok", `manager ${body.status || "ready"}`);
    } else if (body.status === "standby") {
      setPill("manager", "warn", `standby manager: the active one is ${body.active || "elsewhere"}`);
    } else {
      setPill("manager", "warn", `manager not ready: ${body.message || body.status || ready.status}`);
    }
  } catch {
    setPill("manager", "down", "manager unreachable");
    setPill("store", "unknown", "store ?");
    return;
  }
  if (state.metricsRefusedTo === state.key) return;  // asked already: not with this key
  try {
    const metrics = await fetch("/metrics", { headers: authHeaders(), cache: "no-store" });
    if (metrics.status !== 200) {
      state.metricsRefusedTo = state.key;
      $("store").hidden = true;  // the key may not read metrics: say nothing rather than guess
      return;
    }
    const text = await metrics.text();
    const available = /^fleetmq_store_available (\S+)$/m.exec(text);
    const backlog = /^fleetmq_store_backlog (\S+)$/m.exec(text);
    $("store").hidden = false;
    if (!available) setPill("store", "unknown", "store ?");
    else if (Number(available[1]) === 1) {
      const behind = backlog && Number(backlog[1]) > 0 ? ` (${formatCount(Number(backlog[1]))} to write)` : "";
      setPill("store", "ok", `store ok${behind}`);
    } else setPill("store", "down", "store unavailable: changes wait in memory");
  } catch {
    setPill("store", "unknown", "store ?");
  }
}

// --- start ----------------------------------------------------------------------------------

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

function bind() {
  const typed = debounce(() => setFilter("q", $("q").value.trim()), 200);
  $("q").addEventListener("input", typed);
  $("status").addEventListener("change", () => setFilter("status", $("status").value));
  $("type").addEventListener("change", () => setFilter("node_type", $("type").value));
  $("location").addEventListener("input", debounce(() => setFilter("location", $("location").value.trim()), 300));
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  for (const card of document.querySelectorAll(".card")) {
    card.addEventListener("click", () => setFilter("status", card.dataset.status));
  }
  $("next-page").addEventListener("click", () => {
    const after = $("next-page").dataset.after;
    if (!after) return;
    state.pages.push(after);
    loadPage();
  });
  $("prev-page").addEventListener("click", () => {
    if (state.pages.length > 1) state.pages.pop();
    loadPage();
  });
  $("first-page").addEventListener("click", () => {
    state.pages = [null];
    loadPage();
  });
  $("older-events").addEventListener("click", () => {
    if (state.nodeShown !== null && state.olderEvents) loadEvents(state.nodeShown, state.olderEvents);
  });
  $("forget-key").addEventListener("click", forgetKey);
  window.addEventListener("hashchange", route);
}

async function start() {
  bind();
  $("forget-key").hidden = !state.key;
  presence();
  setInterval(presence, PRESENCE_EVERY_MS);
  setInterval(refreshTimes, 5000);
  await reloadAll();   // list then watch: the summary's event_id is where the stream starts
  describeKey();
  watch();
}

start();

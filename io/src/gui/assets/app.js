// Talon's GUI: one page, hash routes, JSON from /api/ on the same origin (docs/gui.md).
// Every piece of data reaches the page as text (textContent, attribute values): nothing an agent
// or a user sent is ever parsed as HTML.
"use strict";

const state = { user: null, role: null, csrf: null, live: null };
const ROLES = ["reader", "investigator", "administrator"];
const can = (need) => state.role && ROLES.indexOf(state.role) >= ROLES.indexOf(need);

// ---- DOM helpers -------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const main = () => document.getElementById("main");
function show(...nodes) {
  stopLive();
  main().replaceChildren(...nodes);
}
function flash(text, info) {
  const f = document.getElementById("flash");
  f.textContent = text;
  f.className = info ? "info" : "";
  f.hidden = !text;
  if (text) setTimeout(() => { if (f.textContent === text) f.hidden = true; }, info ? 4000 : 10000);
}
function stopLive() {
  if (state.live) { state.live.close(); state.live = null; }
}

const fmtTime = (ms) => (ms ? new Date(Number(ms)).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "—");
function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - Number(ms)) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
function bytes(n) {
  n = Number(n || 0);
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
// Calls fn at most once per `ms`, the last call always made (after the pause).
function throttle(fn, ms) {
  let last = 0, timer = null;
  return () => {
    const wait = last + ms - Date.now();
    if (wait <= 0) { last = Date.now(); fn(); return; }
    if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}
const stateCell = (s) => el("span", { class: "state-" + s }, s);
const link = (href, text) => el("a", { href }, text);
const enc = encodeURIComponent;

// ---- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") {
    opts.headers["X-CSRF-Token"] = state.csrf || "";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body || {});
  }
  const r = await fetch("/api/" + path, opts);
  let data = {};
  try { data = await r.json(); } catch (_) { /* empty body */ }
  if (r.status === 401 && path !== "login") {
    state.user = null;
    renderLogin("Your session ended: log in again.");
    throw new ApiError(401, data.error || "log in first");
  }
  if (!r.ok) throw new ApiError(r.status, data.error || r.statusText);
  return data;
}

// Runs an action, showing its error.
async function attempt(fn) {
  try { return await fn(); } catch (e) {
    if (e.status !== 401) flash(e.message);
    return undefined;
  }
}

// ---- routing -----------------------------------------------------------------------------------

function route() {
  flash("");
  if (!state.user) return renderLogin();
  const [path, qs] = location.hash.replace(/^#\/?/, "").split("?");
  const q = new URLSearchParams(qs || "");
  const p = path.split("/").map(decodeURIComponent);
  document.querySelectorAll("[data-nav]").forEach((a) =>
    a.classList.toggle("active", a.dataset.nav === (p[0] === "client" || p[0] === "flow" ? "clients" : p[0] === "hunt" ? "hunts" : p[0])));
  switch (p[0]) {
    case "": case "clients": return renderClients(q);
    case "client": return renderClient(p[1]);
    case "flow": return renderFlow(p[1], p[2]);
    case "hunts": return p[1] === "new" ? renderNewHunt() : renderHunts(q);
    case "hunt": return renderHunt(p[1]);
    case "cluster": return renderCluster();
    case "audit": return renderAudit(q);
    case "users": return renderUsers();
    default: return show(el("p", {}, "No page here. ", link("#/clients", "Clients")));
  }
}

function setUser(who) {
  state.user = who.user; state.role = who.role; state.csrf = who.csrf;
  document.getElementById("nav").hidden = false;
  document.getElementById("nav-audit").hidden = !can("administrator");
  document.getElementById("nav-users").hidden = !can("administrator");
  document.getElementById("who").replaceChildren(
    el("span", { id: "who-name" }, who.user), " (", who.role, ")",
    el("button", { id: "logout", onclick: logout }, "Log out"));
}

async function logout() {
  await attempt(() => api("POST", "logout"));
  state.user = null;
  location.hash = "#/clients";
  renderLogin();
}

function renderLogin(message) {
  stopLive();
  document.getElementById("nav").hidden = true;
  document.getElementById("who").replaceChildren();
  const err = el("p", { class: "error", id: "login-error" }, message || "");
  const user = el("input", { id: "login-user", name: "user", autocomplete: "username", required: true });
  const pass = el("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const form = el("form", { class: "card login", id: "login-form" },
    el("h1", {}, "Log in to Talon"),
    el("label", { for: "login-user" }, "User"), user,
    el("label", { for: "login-password" }, "Password"), pass,
    el("p", {}, el("button", { class: "primary", type: "submit", id: "login-submit" }, "Log in")),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    try {
      setUser(await api("POST", "login", { user: user.value, password: pass.value }));
      route();
    } catch (e) { err.textContent = e.message; }
  });
  main().replaceChildren(form);
  user.focus();
}

// ---- tables ------------------------------------------------------------------------------------

function table(headers, rows, opts) {
  opts = opts || {};
  const head = el("tr", {}, headers.map((h) => {
    const name = typeof h === "string" ? h : h.label;
    const th = el("th", { class: (h.num ? "num " : "") + (h.sort ? "sortable" : "") }, name);
    if (h.sort) th.addEventListener("click", h.sort);
    return th;
  }));
  const body = rows.length
    ? rows.map((r) => el("tr", {}, r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c)))))
    : [el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, opts.empty || "Nothing here."))];
  return el("table", { id: opts.id }, el("thead", {}, head), el("tbody", {}, body));
}
const num = (v) => el("td", { class: "num" }, String(v));
const mono = (v) => el("td", { class: "mono" }, v);

function pager(offset, count, limit, more, go, total) {
  const from = count ? offset + 1 : 0;
  return el("div", { class: "pager" },
    el("button", { disabled: offset === 0, onclick: () => go(Math.max(0, offset - limit)) }, "‹ Previous"),
    el("span", { class: "muted" }, `${from}–${offset + count}` + (total !== undefined ? ` of ${total}` : "")),
    el("button", { disabled: !more, onclick: () => go(offset + limit), class: "next" }, "Next ›"));
}

// ---- clients -----------------------------------------------------------------------------------

async function renderClients(q) {
  const query = q.get("q") || "all";
  const offset = Number(q.get("offset") || 0);
  const sort = q.get("sort") || "";
  const desc = q.get("desc") === "1";
  const limit = 50;
  const go = (o, qq, s, d) => {
    location.hash = `#/clients?q=${enc(qq === undefined ? query : qq)}&offset=${o}&sort=${enc(s === undefined ? sort : s)}&desc=${(d === undefined ? desc : d) ? 1 : 0}`;
  };
  // A column header sorts on the server (click again: reversed).
  const col = (label, key) => ({
    label: label + (sort === key ? (desc ? " ▼" : " ▲") : ""),
    sort: () => go(0, undefined, key, sort === key ? !desc : false),
  });
  const search = el("input", { type: "search", id: "client-search", value: query, placeholder: "all | host:web | label:prod | ip:10.1. | C.1a2b | name" });
  const form = el("form", { class: "toolbar" }, search, el("button", { type: "submit", class: "primary" }, "Search"),
    el("span", { class: "muted" }, "all, host:NAME, label:LABEL, ip:PREFIX, a client id, or a host-name prefix"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); go(0, search.value.trim() || "all"); });
  show(el("h1", {}, "Clients"), form, el("p", { class: "muted" }, "Searching…"));
  const r = await attempt(() => api("GET", `clients?q=${enc(query)}&offset=${offset}&limit=${limit}&sort=${enc(sort)}&desc=${desc ? 1 : 0}`));
  if (!r) return;
  const picked = new Set();
  const boxes = [];
  const rows = r.clients.map((c) => {
    const box = el("input", { type: "checkbox", class: "pick", "data-client": c.client_id });
    box.addEventListener("change", () => (box.checked ? picked.add(c.client_id) : picked.delete(c.client_id)));
    boxes.push(box);
    return [box, el("td", { class: "mono" }, link(`#/client/${enc(c.client_id)}`, c.client_id)),
      el("td", { class: "hostname" }, c.hostname), c.os,
      el("td", {}, c.labels.map((l) => el("span", { class: "label" }, l))),
      el("td", {}, el("span", { class: "dot" + (c.connected ? " on" : "") }), c.connected ? "online" : "offline"),
      el("td", { title: fmtTime(c.last_seen_ms) }, ago(c.last_seen_ms)), mono(c.last_ip), c.node];
  });
  const all = el("input", { type: "checkbox", title: "all on this page" });
  all.addEventListener("change", () => boxes.forEach((b) => { b.checked = all.checked; b.dispatchEvent(new Event("change")); }));
  const label = el("input", { type: "text", id: "bulk-label", placeholder: "label" });
  const bulk = async (remove) => {
    if (!picked.size) return flash("Choose clients first (the boxes on the left).");
    const done = await attempt(() => api("POST", "labels", { clients: [...picked], label: label.value, remove }));
    if (done) { route(); flash(`${remove ? "Removed" : "Added"} label "${label.value}" on ${done.clients.length} clients.`, true); }
  };
  const tools = can("investigator")
    ? el("div", { class: "toolbar" }, "Label the chosen clients:", label,
      el("button", { id: "bulk-add", onclick: () => bulk(false) }, "Add"),
      el("button", { id: "bulk-remove", onclick: () => bulk(true) }, "Remove"),
      can("administrator") ? null : el("span", { class: "muted" }, "(more than one client at once: administrators)"))
    : null;
  show(el("h1", {}, "Clients"), form, tools,
    table([{ label: all }, col("Client", "id"), col("Host", "hostname"), col("OS", "os"), "Labels", col("State", "connected"),
      col("Last seen", "last_seen"), col("Last IP", "last_ip"), col("Frontend", "node")],
    rows, { id: "clients", empty: "No client matches." }),
    pager(offset, r.clients.length, limit, r.truncated, (o) => go(o), r.total));
}

// ---- one client --------------------------------------------------------------------------------

async function renderClient(id) {
  show(el("h1", {}, "Client ", id), el("p", { class: "muted" }, "Loading…"));
  const c = await attempt(() => api("GET", `clients/${enc(id)}`));
  if (!c) return;
  const facts = el("dl", { class: "facts card", id: "client-facts" },
    el("dt", {}, "Host"), el("dd", { class: "hostname" }, c.hostname),
    el("dt", {}, "FQDN"), el("dd", {}, c.fqdn || "—"),
    el("dt", {}, "OS"), el("dd", {}, c.os),
    el("dt", {}, "Addresses"), el("dd", { class: "mono" }, (c.ips || []).join("  ") || "—"),
    el("dt", {}, "Enrolled"), el("dd", {}, fmtTime(c.first_seen_ms)),
    el("dt", {}, "State"), el("dd", {}, el("span", { class: "dot" + (c.connected ? " on" : "") }), c.connected ? "online" : "offline"),
    el("dt", {}, "Last seen"), el("dd", {}, fmtTime(c.last_seen_ms), " (", ago(c.last_seen_ms), ")"),
    el("dt", {}, "Last IP"), el("dd", { class: "mono" }, c.last_ip),
    el("dt", {}, "Frontend"), el("dd", {}, c.node),
    el("dt", {}, "Labels"), el("dd", {}, c.labels.length ? c.labels.map((l) => el("span", { class: "label" }, l)) : el("span", { class: "muted" }, "none")));
  const flowsBox = el("div", {});
  const page = async (offset) => {
    const r = await attempt(() => api("GET", `clients/${enc(id)}/flows?offset=${offset}&limit=20`));
    if (!r) return;
    flowsBox.replaceChildren(
      table(["Flow", "Artifact", "State", { label: "Rows", num: 1 }, { label: "Uploaded", num: 1 }, "Created", "Finished", "Hunt"],
        r.flows.map((f) => [el("td", { class: "mono" }, link(`#/flow/${enc(id)}/${enc(f.flow_id)}`, f.flow_id)), f.artifact, stateCell(f.state),
          num(f.rows), num(bytes(f.uploaded_bytes)), fmtTime(f.created_ms), fmtTime(f.finished_ms),
          f.hunt_id ? el("td", { class: "mono" }, link(`#/hunt/${enc(f.hunt_id)}`, f.hunt_id)) : ""]),
        { id: "flows", empty: "No flows yet." }),
      pager(offset, r.flows.length, 20, offset + r.flows.length < r.total, page, r.total));
  };
  show(el("h1", {}, "Client ", el("span", { class: "mono" }, id)), facts,
    can("investigator") ? await collectForm(id) : null,
    el("h2", {}, "Flows (newest first)"), flowsBox);
  page(0);
}

// A form for an artifact's parameters, typed; returns {node, values()}.
function paramsForm(artifact) {
  const inputs = {};
  const rows = artifact.params.map((p) => {
    let input;
    if (p.kind === "bool") {
      input = el("input", { type: "checkbox", name: p.name });
      input.checked = p.default === "true";
    } else if (p.kind === "int") {
      input = el("input", { type: "number", name: p.name, value: p.default, min: p.min, max: p.max, step: 1 });
    } else if (p.kind === "sql") {
      input = el("textarea", { name: p.name, rows: 3, cols: 60 }, p.default);
    } else {
      input = el("input", { type: "text", name: p.name, value: p.default, size: 50 });
    }
    inputs[p.name] = { input, p };
    return [el("label", { for: "param-" + p.name }, p.name, " (", p.kind, ")"),
      Object.assign(input, { id: "param-" + p.name }), el("div", { class: "help" }, p.description)];
  });
  const values = () => {
    const v = {};
    for (const [name, { input, p }] of Object.entries(inputs)) {
      const given = p.kind === "bool" ? String(input.checked) : input.value;
      if (given !== p.default) v[name] = given;
    }
    return v;
  };
  return { node: rows.flat(), values };
}

async function artifactPicker(onPick) {
  const r = await api("GET", "artifacts");
  const list = r.artifacts.filter((a) => !a.event);
  const select = el("select", { id: "artifact" }, el("option", { value: "" }, "— choose an artifact —"),
    list.map((a) => el("option", { value: a.name }, a.name)));
  select.addEventListener("change", () => onPick(list.find((a) => a.name === select.value)));
  return select;
}

async function collectForm(clientId) {
  const paramsBox = el("div", { class: "form" });
  const desc = el("p", { class: "muted" });
  const err = el("p", { class: "error", id: "collect-error" });
  let current = null, form = null;
  const select = await attempt(() => artifactPicker((a) => {
    current = a; form = a ? paramsForm(a) : null;
    desc.textContent = a ? a.description : "";
    paramsBox.replaceChildren(...(form ? form.node : []));
  }));
  if (!select) return null;
  const go = el("button", { class: "primary", id: "collect" }, "Collect");
  go.addEventListener("click", async () => {
    err.textContent = "";
    if (!current) { err.textContent = "Choose an artifact."; return; }
    try {
      const f = await api("POST", "collect", { client_id: clientId, artifact: current.name, params: form.values() });
      location.hash = `#/flow/${enc(clientId)}/${enc(f.flow_id)}`;
    } catch (e) { err.textContent = e.message; }
  });
  return el("div", { class: "card" }, el("h2", {}, "Collect"), el("div", { class: "toolbar" }, select, go), desc, paramsBox, err);
}

// ---- a flow ------------------------------------------------------------------------------------

function resultsView(base, id) {
  // base: "flows/C/F" or "hunts/H"; paged, sorted and filtered on the server.
  const box = el("div", { id });
  const st = { offset: 0, limit: 50, sort: "", desc: false, column: "", filter: "" };
  const filter = el("input", { type: "search", placeholder: "filter rows", class: "filter" });
  const column = el("select", { class: "filter-column" }, el("option", { value: "" }, "any column"));
  const tools = el("form", { class: "toolbar" }, "Results:", column, filter, el("button", { type: "submit" }, "Filter"),
    el("a", { href: `/api/${base}/results.csv`, download: "", class: "download-csv" }, "Download CSV"),
    el("a", { href: `/api/${base}/results.json`, download: "", class: "download-json" }, "Download JSON"));
  tools.addEventListener("submit", (ev) => { ev.preventDefault(); st.filter = filter.value; st.column = column.value; st.offset = 0; load(); });
  const tableBox = el("div", {});
  const load = async () => {
    const qs = `offset=${st.offset}&limit=${st.limit}&sort=${enc(st.sort)}&desc=${st.desc ? 1 : 0}&column=${enc(st.column)}&filter=${enc(st.filter)}`;
    const r = await attempt(() => api("GET", `${base}/results?${qs}`));
    if (!r) return;
    if (column.options.length === 1) r.columns.forEach((c) => column.append(el("option", { value: c }, c)));
    const hunt = base.startsWith("hunts/");
    const heads = (hunt ? ["Client"] : []).concat(r.columns.map((c) => ({
      label: c + (st.sort === c ? (st.desc ? " ▼" : " ▲") : ""),
      sort: () => { st.desc = st.sort === c ? !st.desc : false; st.sort = c; st.offset = 0; load(); },
    })));
    const rows = r.rows.map((x) => (hunt ? [el("td", { class: "mono" }, link(`#/flow/${enc(x.client_id)}/${enc(x.flow_id)}`, x.client_id))] : [])
      .concat(r.columns.map((c) => {
        const v = x.row[c];
        return v === undefined || v === null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
      })));
    tableBox.replaceChildren(table(heads, rows, { id: id + "-table", empty: st.filter ? "No row matches." : "No rows." }),
      pager(st.offset, r.rows.length, st.limit, st.offset + r.rows.length < r.total, (o) => { st.offset = o; load(); }, r.total));
  };
  box.append(tools, tableBox);
  return { node: box, load };
}

async function renderFlow(clientId, flowId) {
  show(el("h1", {}, "Flow ", flowId), el("p", { class: "muted" }, "Loading…"));
  const f = await attempt(() => api("GET", `flows/${enc(clientId)}/${enc(flowId)}`));
  if (!f) return;
  const base = `flows/${enc(clientId)}/${enc(flowId)}`;
  const summary = el("dl", { class: "facts card", id: "flow-summary" });
  const results = resultsView(base, "results");
  const uploadsBox = el("div", { id: "uploads" });
  const cancel = el("button", { class: "danger", id: "cancel" }, "Cancel");
  cancel.addEventListener("click", async () => {
    const r = await attempt(() => api("POST", `${base}/cancel`, { reason: "cancelled in the GUI by " + state.user }));
    if (r) flash(r.before_start ? "Cancelled before it started." : "Its client was told to stop it.", true);
  });
  const paint = (f) => {
    summary.replaceChildren(
      el("dt", {}, "Client"), el("dd", { class: "mono" }, link(`#/client/${enc(clientId)}`, clientId)),
      el("dt", {}, "Artifact"), el("dd", {}, f.artifact),
      el("dt", {}, "State"), el("dd", { id: "flow-state" }, stateCell(f.state)),
      el("dt", {}, "Rows"), el("dd", { id: "flow-rows" }, String(f.rows)),
      el("dt", {}, "Uploaded"), el("dd", {}, bytes(f.uploaded_bytes)),
      el("dt", {}, "Created"), el("dd", {}, fmtTime(f.created_ms)),
      el("dt", {}, "Finished"), el("dd", {}, f.finished_ms ? fmtTime(f.finished_ms) + ` (${((f.finished_ms - f.created_ms) / 1000).toFixed(1)} s)` : "—"),
      el("dt", {}, "Parameters"), el("dd", { class: "mono" }, Object.entries(f.params || {}).filter(([k]) => k !== "_artifact").map(([k, v]) => `${k}=${v}`).join("  ") || "—"),
      f.hunt_id ? [el("dt", {}, "Hunt"), el("dd", { class: "mono" }, link(`#/hunt/${enc(f.hunt_id)}`, f.hunt_id))] : [],
      f.error ? [el("dt", {}, "Error"), el("dd", { class: "error", id: "flow-error" }, f.error)] : []);
    cancel.hidden = f.state !== "running" || !can("investigator");
  };
  const paintUploads = (list) => uploadsBox.replaceChildren(list.length
    ? table(["File", { label: "Size", num: 1 }, "SHA-256", ""], list.map((u) => [el("td", { class: "mono" }, u.name), num(bytes(u.size)), mono(u.sha256),
      u.error ? el("td", { class: "error" }, u.error) : el("td", {}, el("a", { href: `/api/${base}/uploads/${u.upload_id}`, download: "", class: "upload-download" }, "Download"))]), { id: "uploads-table" })
    : el("p", { class: "muted" }, "No uploads."));
  // A finished flow's uploads are reassembled on the volume just after it completes: until they
  // are listed, ask again each second (for a minute).
  const awaitUploads = async (f, tries) => {
    if (f.state === "running" || !f.uploaded_bytes || f.uploads.length || tries <= 0) return;
    uploadsBox.replaceChildren(el("p", { class: "muted" }, `Reassembling ${bytes(f.uploaded_bytes)} of uploads…`));
    await new Promise((ok) => setTimeout(ok, 1000));
    if (!document.body.contains(uploadsBox)) return;
    const g = await attempt(() => api("GET", base));
    if (!g) return;
    paintUploads(g.uploads);
    awaitUploads(g, tries - 1);
  };
  paint(f);
  paintUploads(f.uploads);
  awaitUploads(f, 60);
  show(el("h1", {}, "Flow ", el("span", { class: "mono" }, flowId)), el("div", { class: "toolbar" }, cancel), summary,
    el("h2", {}, "Uploads"), uploadsBox, el("h2", {}, "Results"), results.node);
  results.load();
  if (f.state === "running") {
    const es = new EventSource(`/api/${base}/watch`);
    state.live = es;
    es.onmessage = (m) => paint(JSON.parse(m.data));
    es.addEventListener("end", async () => {
      stopLive();
      const g = await attempt(() => api("GET", base));
      if (g) { paint(g); paintUploads(g.uploads); results.load(); awaitUploads(g, 60); }
    });
    es.addEventListener("error", () => stopLive());
  }
}

// ---- hunts -------------------------------------------------------------------------------------

function huntRow(h) {
  const s = h.stats;
  return [el("td", { class: "mono" }, link(`#/hunt/${enc(h.hunt_id)}`, h.hunt_id)), stateCell(h.state), h.artifact, h.description,
    fmtTime(h.created_ms), fmtTime(h.expires_ms), num(s.scheduled), num(s.completed), num(s.errors), num(s.rows), num(bytes(s.uploaded_bytes)), h.creator];
}
const HUNT_HEADS = ["Hunt", "State", "Artifact", "Description", "Created", "Expires", { label: "Scheduled", num: 1 },
  { label: "Completed", num: 1 }, { label: "Errors", num: 1 }, { label: "Rows", num: 1 }, { label: "Uploaded", num: 1 }, "Creator"];

async function renderHunts(q) {
  const offset = Number(q.get("offset") || 0);
  show(el("h1", {}, "Hunts"), el("p", { class: "muted" }, "Loading…"));
  const r = await attempt(() => api("GET", `hunts?offset=${offset}&limit=20`));
  if (!r) return;
  show(el("h1", {}, "Hunts"),
    can("investigator") ? el("div", { class: "toolbar" }, el("a", { href: "#/hunts/new", id: "new-hunt" }, el("button", { class: "primary" }, "New hunt"))) : null,
    table(HUNT_HEADS, r.hunts.map(huntRow), { id: "hunts", empty: "No hunts yet." }),
    pager(offset, r.hunts.length, 20, offset + r.hunts.length < r.total, (o) => { location.hash = `#/hunts?offset=${o}`; }, r.total));
}

const splitList = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);

async function renderNewHunt() {
  const paramsBox = el("div", { class: "form" });
  const err = el("p", { class: "error", id: "hunt-error" });
  const estimate = el("p", { id: "estimate", class: "muted" }, "");
  let current = null, form = null;
  const include = el("input", { type: "text", id: "include-labels", placeholder: "labels, comma-separated" });
  const exclude = el("input", { type: "text", id: "exclude-labels", placeholder: "labels, comma-separated" });
  const os = el("select", { id: "os" }, ["", "linux", "windows", "darwin"].map((o) => el("option", { value: o }, o || "any")));
  const expires = el("input", { type: "text", id: "expires", value: "7d", placeholder: "e.g. 90m, 2h, 7d" });
  const limit = el("input", { type: "number", id: "client-limit", min: 0, value: 0 });
  const description = el("input", { type: "text", id: "description", size: 50 });
  const sel = { include_labels: () => splitList(include.value), exclude_labels: () => splitList(exclude.value) };
  const estimateNow = async () => {
    estimate.textContent = "Counting matching clients…";
    const r = await attempt(() => api("POST", "hunts/estimate", { include_labels: sel.include_labels(), exclude_labels: sel.exclude_labels(), os: os.value }));
    if (r) estimate.textContent = `${r.clients} enrolled clients match now (${r.connected} online).`;
  };
  [include, exclude, os].forEach((i) => i.addEventListener("change", estimateNow));
  const select = await attempt(() => artifactPicker((a) => {
    current = a; form = a ? paramsForm(a) : null;
    paramsBox.replaceChildren(...(form ? form.node : []));
  }));
  if (!select) return;
  const create = el("button", { class: "primary", id: "create-hunt" }, "Create and start");
  create.addEventListener("click", async () => {
    err.textContent = "";
    if (!current) { err.textContent = "Choose an artifact."; return; }
    try {
      const h = await api("POST", "hunts", {
        artifact: current.name, params: form.values(), include_labels: sel.include_labels(), exclude_labels: sel.exclude_labels(),
        os: os.value, expires: expires.value, client_limit: limit.value, description: description.value,
      });
      location.hash = `#/hunt/${enc(h.hunt_id)}`;
    } catch (e) { err.textContent = e.message; }
  });
  show(el("h1", {}, "New hunt"),
    el("div", { class: "card" },
      el("div", { class: "form" },
        el("label", { for: "artifact" }, "Artifact"), select,
        el("label", { for: "include-labels" }, "Only clients with every label"), include,
        el("label", { for: "exclude-labels" }, "Leave out clients with any label"), exclude,
        el("label", { for: "os" }, "OS"), os,
        el("label", { for: "expires" }, "Expires in"), expires,
        el("label", { for: "client-limit" }, "At most this many clients (0: all)"), limit,
        el("label", { for: "description" }, "Description"), description),
      el("h2", {}, "Parameters"), paramsBox, estimate, el("div", { class: "toolbar" }, create), err));
  estimateNow();
}

async function renderHunt(id) {
  show(el("h1", {}, "Hunt ", id), el("p", { class: "muted" }, "Loading…"));
  const h = await attempt(() => api("GET", `hunts/${enc(id)}`));
  if (!h) return;
  const base = `hunts/${enc(id)}`;
  const summary = el("div", { class: "card" });
  const results = resultsView(base, "results");
  const stop = el("button", { class: "danger", id: "stop-hunt" }, "Stop");
  stop.addEventListener("click", async () => {
    const g = await attempt(() => api("POST", `${base}/stop`));
    if (g) { paint(g); flash("Hunt stopped: no more clients are scheduled.", true); }
  });
  const paint = (h) => {
    const s = h.stats;
    const done = s.completed + s.errors;
    const pct = s.scheduled ? Math.round((100 * done) / s.scheduled) : 0;
    summary.replaceChildren(
      el("dl", { class: "facts" },
        el("dt", {}, "State"), el("dd", { id: "hunt-state" }, stateCell(h.state)),
        el("dt", {}, "Artifact"), el("dd", {}, h.artifact),
        el("dt", {}, "Description"), el("dd", {}, h.description || "—"),
        el("dt", {}, "Creator"), el("dd", {}, h.creator || "—"),
        el("dt", {}, "Created"), el("dd", {}, fmtTime(h.created_ms)),
        el("dt", {}, "Expires"), el("dd", {}, fmtTime(h.expires_ms)),
        el("dt", {}, "Clients"), el("dd", {}, [h.include_labels.length ? "labels " + h.include_labels.join(", ") : "all",
          h.exclude_labels.length ? "; not " + h.exclude_labels.join(", ") : "", h.os ? "; os " + h.os : "",
          h.client_limit ? "; at most " + h.client_limit : ""].join("")),
        el("dt", {}, "Progress"), el("dd", {}, el("div", { class: "progress" }, el("div", { style: `width:${pct}%` }))),
        el("dt", {}, "Scheduled"), el("dd", { id: "hunt-scheduled" }, String(s.scheduled)),
        el("dt", {}, "Completed"), el("dd", { id: "hunt-completed" }, String(s.completed)),
        el("dt", {}, "Errors"), el("dd", { id: "hunt-errors" }, String(s.errors)),
        el("dt", {}, "Rows"), el("dd", { id: "hunt-rows" }, String(s.rows)),
        el("dt", {}, "Uploaded"), el("dd", {}, bytes(s.uploaded_bytes))));
    stop.hidden = h.state !== "running" || !can("investigator");
  };
  // Its clients and their flows, in the order they were scheduled.
  const clientsBox = el("div", {});
  let clientsOffset = 0;
  const loadClients = async () => {
    const r = await attempt(() => api("GET", `${base}/flows?offset=${clientsOffset}&limit=20`));
    if (!r) return;
    clientsBox.replaceChildren(
      table(["Client", "Flow", "State", { label: "Rows", num: 1 }, { label: "Uploaded", num: 1 }, "Finished", "Error"],
        r.flows.map((f) => [el("td", { class: "mono" }, link(`#/client/${enc(f.client_id)}`, f.client_id)),
          el("td", { class: "mono" }, link(`#/flow/${enc(f.client_id)}/${enc(f.flow_id)}`, f.flow_id)), stateCell(f.state),
          num(f.rows), num(bytes(f.uploaded_bytes)), fmtTime(f.finished_ms), el("td", { class: "error" }, f.error)]),
        { id: "hunt-clients", empty: "No client scheduled yet." }),
      pager(clientsOffset, r.flows.length, 20, clientsOffset + r.flows.length < r.total, (o) => { clientsOffset = o; loadClients(); }, r.total));
  };
  paint(h);
  show(el("h1", {}, "Hunt ", el("span", { class: "mono" }, id)), el("div", { class: "toolbar" }, stop), summary,
    el("h2", {}, "Clients"), clientsBox, el("h2", {}, "Results"), results.node);
  results.load();
  loadClients();
  if (h.state === "running") {
    const es = new EventSource(`/api/${base}/watch`);
    state.live = es;
    const refresh = throttle(() => { results.load(); loadClients(); }, 2000);
    es.onmessage = (m) => {
      const g = JSON.parse(m.data);
      paint(g);
      // New rows: refresh the first page of results at most every 2 s.
      const moved = g.stats.rows !== h.stats.rows || g.stats.completed !== h.stats.completed || g.stats.scheduled !== h.stats.scheduled;
      if (moved) { h.stats = g.stats; refresh(); }
    };
    es.addEventListener("end", () => { stopLive(); results.load(); loadClients(); });
    es.addEventListener("error", () => stopLive());
  }
}

// ---- cluster and audit -------------------------------------------------------------------------

// A minion's events the master has not made durable, and the age of the oldest ("—" when unknown:
// not connected, or a minion too old to say).
function backlog(m) {
  if (!m || m.backlog_events === null || m.backlog_events === undefined) return "—";
  if (!m.backlog_events) return "none";
  return `${m.backlog_events} events, oldest ${Math.round(Number(m.lag_ms) / 1000)} s`;
}

async function renderCluster() {
  show(el("h1", {}, "Cluster"), el("p", { class: "muted" }, "Loading…"));
  const c = await attempt(() => api("GET", "cluster"));
  if (!c) return;
  const byNode = Object.fromEntries(c.nodes.map((n) => [n.node, n]));
  const minions = new Map(c.minions.map((m) => [m.node, m]));
  const names = [c.master, ...new Set([...minions.keys(), ...c.nodes.map((n) => n.node)].filter((n) => n && n !== c.master))];
  const rows = names.map((n) => {
    const m = minions.get(n);
    const counts = byNode[n] || { clients: 0, connected: 0 };
    return [n, n === c.master ? "master" : "minion",
      n === c.master ? "—" : m ? (m.connected ? "connected" : "disconnected") : "never heard from",
      num(counts.connected), num(counts.clients), m ? num(`epoch ${m.epoch}, ${m.applied} applied`) : num("—"),
      num(backlog(m))];
  });
  const volume = c.volume_failures.length
    ? table(["Store", "Error", "Since"], c.volume_failures.map((f) => [f.store, el("td", { class: "error" }, f.error), fmtTime(f.since_ms)]), { id: "volume" })
    : el("p", { id: "volume", class: "state-completed" }, "Healthy: the master's writes to the shared volume succeed.");
  show(el("h1", {}, "Cluster"),
    table(["Node", "Role", "Replication", { label: "Clients online", num: 1 }, { label: "Clients enrolled", num: 1 }, { label: "Replication applied", num: 1 }, { label: "Backlog", num: 1 }], rows, { id: "nodes" }),
    el("h2", {}, "Shared volume"), volume);
}

async function renderAudit(q) {
  const offset = Number(q.get("offset") || 0);
  if (!can("administrator")) return show(el("h1", {}, "Audit log"), el("p", { class: "error" }, "Only administrators read the audit log."));
  const r = await attempt(() => api("GET", `audit?offset=${offset}&limit=50`));
  if (!r) return;
  show(el("h1", {}, "Audit log"),
    table(["Time", "User", "Action", "Target", "Detail"], r.entries.map((e) => [fmtTime(e.time_ms), e.user, e.action, mono(e.target), e.detail]), { id: "audit" }),
    pager(offset, r.entries.length, 50, offset + r.entries.length < r.total, (o) => { location.hash = `#/audit?offset=${o}`; }, r.total));
}

async function renderUsers() {
  if (!can("administrator")) return show(el("h1", {}, "Users"), el("p", { class: "error" }, "Only administrators manage users."));
  const r = await attempt(() => api("GET", "users"));
  if (!r) return;
  const err = el("p", { class: "error", id: "user-error" });
  const roleSelect = (id, value) => {
    const s = el("select", { id }, ROLES.map((x) => el("option", { value: x }, x)));
    s.value = value;
    return s;
  };
  const change = async (body, done) => {
    err.textContent = "";
    try { await api("POST", "users", body); flash(done, true); renderUsers(); } catch (e) { err.textContent = e.message; }
  };
  const rows = r.users.map((u) => {
    const role = roleSelect("role-" + u.name, u.role);
    const pass = el("input", { type: "password", placeholder: "new password", autocomplete: "new-password", class: "new-password" });
    return [el("td", { class: "user-name" }, u.name), el("td", {}, role), fmtTime(u.created_ms), fmtTime(u.changed_ms),
      el("td", {}, pass,
        el("button", { onclick: () => change({ name: u.name, role: role.value, password: pass.value }, `Changed ${u.name}; their sessions end.`) }, "Save"),
        " ",
        el("button", { class: "danger remove-user", onclick: () => change({ name: u.name, remove: true }, `Removed ${u.name}.`) }, "Remove"))];
  });
  const name = el("input", { type: "text", id: "new-user-name", placeholder: "name" });
  const role = roleSelect("new-user-role", "reader");
  const pass = el("input", { type: "password", id: "new-user-password", placeholder: "password (8 or more)", autocomplete: "new-password" });
  const add = el("form", { class: "toolbar card" }, "Add a user:", name, role, pass, el("button", { class: "primary", type: "submit", id: "add-user" }, "Add"));
  add.addEventListener("submit", (ev) => { ev.preventDefault(); change({ name: name.value, role: role.value, password: pass.value }, `Added ${name.value}.`); });
  show(el("h1", {}, "Users"), add, err,
    table(["Name", "Role", "Added", "Changed", ""], rows, { id: "users", empty: "No users." }),
    el("p", { class: "muted" }, "Changes are audited; a changed or removed user's sessions end within seconds. The command line does the same: talon --config server.config.yaml user add|list|passwd|remove."));
}

// ---- start -------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  try {
    const r = await fetch("/api/session", { credentials: "same-origin" });
    if (r.ok) setUser(await r.json());
  } catch (_) { /* not logged in */ }
  route();
});

// End-to-end tests of Talon's GUI in Debian's Chromium (playwright-core drives it). Started by
// io/tests/gui_browser.rs against a real master, a minion, a real agent and virtual clients; it
// passes in the environment:
//   TALON_GUI_URL       https://127.0.0.1:PORT
//   TALON_USERS         JSON {name: password} for ada (administrator), ivan (investigator), rita (reader)
//   TALON_REAL_CLIENT   the real agent's client id
//   TALON_EVIDENCE      a file on the real agent's host, and TALON_EVIDENCE_SHA256 its hash
//   TALON_HOSTILE       the virtual clients' host-name prefix (markup that must stay text)
//   TALON_SHOTS         where screenshots go
//   TALON_CHROMIUM      the browser (default /usr/bin/chromium)
import { chromium, request as pwRequest } from "playwright-core";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, mkdirSync } from "node:fs";

const URL = process.env.TALON_GUI_URL;
const USERS = JSON.parse(process.env.TALON_USERS);
const REAL = process.env.TALON_REAL_CLIENT;
const EVIDENCE = process.env.TALON_EVIDENCE;
const EVIDENCE_SHA = process.env.TALON_EVIDENCE_SHA256;
const HOSTILE = process.env.TALON_HOSTILE;
const SHOTS = process.env.TALON_SHOTS;
mkdirSync(SHOTS, { recursive: true });

const step = (name) => console.log(`-- ${name}`);
// On failure: a screenshot of the page that was being driven, and its text.
let current = null;
process.on("uncaughtException", async (e) => {
  console.error(e);
  if (current) {
    await current.screenshot({ path: `${SHOTS}/failure.png`, fullPage: true }).catch(() => {});
    console.error("page text at the failure:\n" + (await current.textContent("body").catch(() => "")));
  }
  process.exit(1);
});
const sha256 = (buf) => createHash("sha256").update(buf).digest("hex");

const browser = await chromium.launch({
  executablePath: process.env.TALON_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});

async function session(user) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, acceptDownloads: true, viewport: { width: 1360, height: 860 } });
  const page = await context.newPage();
  current = page;
  page.setDefaultTimeout(30_000);
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("dialog", (d) => { problems.push("a dialog opened: " + d.message()); d.dismiss(); });
  await page.goto(URL + "/");
  await page.fill("#login-user", user);
  await page.fill("#login-password", USERS[user]);
  await page.click("#login-submit");
  await page.waitForSelector("#who-name");
  assert.equal(await page.textContent("#who-name"), user);
  return { context, page, problems };
}

// A call from inside the page, with its session cookie (and, for changes, its CSRF token).
async function inPage(page, method, path, body, csrf = true) {
  return page.evaluate(async ([method, path, body, csrf]) => {
    const who = await (await fetch("/api/session")).json();
    const headers = { "Content-Type": "application/json" };
    if (csrf) headers["X-CSRF-Token"] = who.csrf;
    const r = await fetch("/api/" + path, { method, headers, body: method === "GET" ? undefined : JSON.stringify(body || {}) });
    return { status: r.status, body: await r.json().catch(() => ({})) };
  }, [method, path, body, csrf]);
}

async function download(page, click) {
  const [d] = await Promise.all([page.waitForEvent("download"), click()]);
  const path = await d.path();
  return { name: d.suggestedFilename(), data: readFileSync(path) };
}

// ---- security without a browser ---------------------------------------------------------------
step("no page data and no change without a session");
{
  const r = await pwRequest.newContext({ ignoreHTTPSErrors: true });
  for (const [m, p] of [["GET", "clients"], ["GET", "hunts"], ["GET", "audit"], ["GET", `flows/${REAL}/F.1/results.csv`]]) {
    const res = await r.fetch(`${URL}/api/${p}`, { method: m });
    assert.equal(res.status(), 401, `${m} ${p} without a session`);
  }
  const res = await r.post(`${URL}/api/hunts`, { data: { artifact: "Generic.Client.Info" } });
  assert.equal(res.status(), 401, "creating a hunt without a session");

  step("a change needs the session's CSRF token, from this origin");
  const login = await r.post(`${URL}/api/login`, { data: { user: "ivan", password: USERS.ivan } });
  assert.equal(login.status(), 200);
  const cookie = login.headers()["set-cookie"];
  for (const flag of ["Secure", "HttpOnly", "SameSite=Strict", "Max-Age="]) assert.ok(cookie.includes(flag), `cookie ${cookie} lacks ${flag}`);
  const { csrf } = await login.json();
  const collect = { client_id: REAL, artifact: "Generic.Client.Info" };
  let c = await r.post(`${URL}/api/collect`, { data: collect });
  assert.equal(c.status(), 403, "no CSRF token");
  c = await r.post(`${URL}/api/collect`, { data: collect, headers: { "X-CSRF-Token": "0".repeat(64) } });
  assert.equal(c.status(), 403, "a wrong CSRF token");
  c = await r.post(`${URL}/api/collect`, { data: collect, headers: { "X-CSRF-Token": csrf, Origin: "https://evil.example" } });
  assert.equal(c.status(), 403, "another site's Origin");
  c = await r.post(`${URL}/api/collect`, { data: collect, headers: { "X-CSRF-Token": csrf } });
  assert.equal(c.status(), 200, "with the token: " + (await c.text()));

  step("the bounds answer with a clear refusal");
  const h = { "X-CSRF-Token": csrf };
  let b = await r.post(`${URL}/api/collect`, { headers: h, data: { client_id: REAL, artifact: "Generic.Client.Info", params: { pad: "x".repeat(70_000) } } });
  assert.equal(b.status(), 413, "a body over 64 KiB");
  b = await r.fetch(`${URL}/api/collect`, { method: "POST", headers: { ...h, "Content-Type": "text/plain" }, data: "{}" });
  assert.equal(b.status(), 415, "not JSON");
  b = await r.post(`${URL}/api/labels`, { headers: h, data: { clients: Array.from({ length: 1001 }, (_, i) => `C.${i}`), label: "x" } });
  assert.equal(b.status(), 400, "more than 1,000 clients at once");
  assert.match((await b.json()).error, /at most 1000/);
  b = await r.get(`${URL}/api/hunts/H.1/results?limit=1001`);
  assert.equal(b.status(), 400, "a page over 1,000 rows");
  assert.match((await b.json()).error, /limit=1001/);
  b = await r.get(`${URL}/api/clients?limit=20000`);
  assert.equal(b.status(), 400, "a search page over 10,000");
  b = await r.get(`${URL}/api/clients?sort=shoe_size`);
  assert.equal(b.status(), 400);
  assert.match((await b.json()).error, /shoe_size/);
  b = await r.get(`${URL}/api/no/such/call`);
  assert.equal(b.status(), 404);

  step("repeated wrong passwords lock the name out");
  let last = 0;
  for (let i = 0; i < 6; i++) last = (await r.post(`${URL}/api/login`, { data: { user: "mallory", password: "wrong-password" } })).status();
  assert.equal(last, 429);
  await r.dispose();
}

// ---- an administrator ------------------------------------------------------------------------
step("ada logs in and searches");
const ada = await session("ada");
let page = ada.page;
await page.waitForSelector("#clients tbody tr .pick");
await page.screenshot({ path: `${SHOTS}/clients.png` });
await page.fill("#client-search", "host:" + HOSTILE.slice(0, 8));
await page.press("#client-search", "Enter");
await page.waitForFunction(() => location.hash.includes("host%3A"));
await page.waitForSelector("#clients tbody tr .pick");
const hosts = await page.$$eval("#clients td.hostname", (tds) => tds.map((t) => t.textContent));
assert.ok(hosts.length >= 5, `hostile-named clients found: ${hosts.length}`);
assert.ok(hosts.every((h) => h.startsWith(HOSTILE)), "host names shown as text, markup and all: " + hosts[0]);
assert.equal(await page.evaluate(() => window.pwned), undefined, "agent-supplied markup ran");
assert.equal(await page.$$eval("#clients script, #clients img", (x) => x.length), 0, "agent-supplied markup became elements");

step("ada sorts the clients by host name on the server, both ways");
const hostsNow = () => page.$$eval("#clients td.hostname", (tds) => tds.map((t) => t.textContent));
const byHost = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
await page.click("#clients th >> text=Host");
await page.waitForFunction(() => location.hash.includes("sort=hostname&desc=0"));
await page.waitForSelector("#clients th >> text=Host ▲");
let order = await hostsNow();
assert.deepEqual(order, [...order].sort(byHost), "ascending");
await page.click("#clients th >> text=Host ▲");
await page.waitForSelector("#clients th >> text=Host ▼");
order = await hostsNow();
assert.deepEqual(order, [...order].sort(byHost).reverse(), "descending");
assert.ok((await page.textContent(".pager")).includes(`of ${order.length}`), "the pager shows the total");

step("ada labels three clients at once");
const boxes = await page.$$("#clients .pick");
const picked = [];
for (const b of boxes.slice(0, 3)) { await b.check(); picked.push(await b.getAttribute("data-client")); }
await page.fill("#bulk-label", "gui-bulk");
await page.click("#bulk-add");
await page.waitForSelector("#flash.info");
let r = await inPage(page, "GET", "clients?q=label:gui-bulk");
assert.deepEqual(r.body.clients.map((c) => c.client_id).sort(), picked.sort());

step("ada collects a file from the real agent and reads the results");
await page.goto(`${URL}/#/client/${REAL}`);
await page.waitForSelector("#client-facts");
assert.ok((await page.textContent("#client-facts")).includes("FQDN"), "host facts");
await page.selectOption("#artifact", "Generic.Forensic.FileFinder");
await page.fill("#param-glob", EVIDENCE);
await page.check("#param-upload");
await page.click("#collect");
await page.waitForFunction(() => location.hash.startsWith("#/flow/"));
await page.waitForSelector("#flow-state .state-completed", { timeout: 60_000 });
await page.waitForSelector("#uploads-table");
const shown = await page.textContent("#uploads-table");
assert.ok(shown.includes(EVIDENCE_SHA), "the upload's SHA-256 is shown");
const up = await download(page, () => page.click("#uploads-table .upload-download"));
assert.equal(sha256(up.data), EVIDENCE_SHA, "the downloaded upload is the file");
await page.waitForSelector("#results-table tbody tr");
const csv = await download(page, () => page.click("#results .download-csv"));
const lines = csv.data.toString().trim().split("\n");
assert.ok(lines[0].startsWith("client_id,flow_id,"), lines[0]);
assert.equal(lines.length, 2, "one row and the header");
assert.ok(lines[1].includes(EVIDENCE_SHA), lines[1]);
await page.screenshot({ path: `${SHOTS}/flow.png`, fullPage: true });
const jsonl = await download(page, () => page.click("#results .download-json"));
assert.equal(JSON.parse(jsonl.data.toString().trim()).sha256, EVIDENCE_SHA);

step("a parameter the server refuses is explained on the form");
await page.goto(`${URL}/#/client/${REAL}`);
await page.waitForSelector("#artifact");
await page.selectOption("#artifact", "Generic.Test.Rows");
await page.fill("#param-count", "-5");
await page.click("#collect");
await page.waitForFunction(() => document.querySelector("#collect-error").textContent.includes("count"));

step("ada creates a hunt from the form and watches it finish");
await page.goto(`${URL}/#/hunts/new`);
await page.waitForSelector("#artifact");
await page.selectOption("#artifact", "Generic.Client.Info");
await page.fill("#include-labels", "gui-bulk");
await page.dispatchEvent("#include-labels", "change");
await page.waitForFunction(() => document.querySelector("#estimate").textContent.startsWith("3 enrolled"));
await page.fill("#description", "from the browser test");
await page.click("#create-hunt");
await page.waitForFunction(() => location.hash.startsWith("#/hunt/"));
const huntId = decodeURIComponent(page.url().split("#/hunt/")[1]);
// Live: the page is not reloaded; the figures arrive over server-sent events.
await page.evaluate(() => { window.notReloaded = true; });
await page.waitForFunction(() => document.querySelector("#hunt-completed")?.textContent === "3", null, { timeout: 60_000 });
assert.equal(await page.evaluate(() => window.notReloaded), true, "the page was reloaded");
await page.waitForFunction(() => document.querySelectorAll("#results-table tbody tr").length === 3);
await page.waitForFunction(() => document.querySelectorAll("#hunt-clients tbody .state-completed").length === 3);
await page.screenshot({ path: `${SHOTS}/hunt.png`, fullPage: true });
const hcsv = await download(page, () => page.click("#results .download-csv"));
assert.equal(hcsv.data.toString().trim().split("\n").length, 4, "three rows and the header");

step("ada stops a hunt");
r = await inPage(page, "POST", "hunts", { artifact: "Generic.Client.Info", include_labels: ["no-such-label"], description: "to stop" });
assert.equal(r.status, 200, JSON.stringify(r.body));
await page.goto(`${URL}/#/hunt/${r.body.hunt_id}`);
await page.click("#stop-hunt");
await page.waitForSelector("#hunt-state .state-stopped");
await page.goto(`${URL}/#/hunts`);
await page.waitForSelector("#hunts tbody tr");
const listed = await page.textContent("#hunts");
assert.ok(listed.includes(huntId) && listed.includes("from the browser test") && listed.includes("ada"), "the hunt list");
await page.screenshot({ path: `${SHOTS}/hunts.png` });

step("ada adds a user in the GUI, changes its role and removes it");
await page.goto(`${URL}/#/users`);
await page.waitForSelector("#users tbody tr");
await page.fill("#new-user-name", "tom");
await page.selectOption("#new-user-role", "reader");
await page.fill("#new-user-password", "short");
await page.click("#add-user");
await page.waitForFunction(() => document.querySelector("#user-error").textContent.includes("at least 8"));
await page.fill("#new-user-password", "tom-password-1");
await page.click("#add-user");
await page.waitForFunction(() => [...document.querySelectorAll("#users .user-name")].some((t) => t.textContent === "tom"));
await page.screenshot({ path: `${SHOTS}/users.png` });
await page.selectOption("#role-tom", "investigator");
await page.click("#users tr:has(td.user-name:text-is('tom')) button:text-is('Save')");
await page.waitForSelector("#flash.info");
r = await inPage(page, "GET", "users");
assert.equal(r.body.users.find((u) => u.name === "tom").role, "investigator");
await page.click("#users tr:has(td.user-name:text-is('tom')) .remove-user");
await page.waitForFunction(() => ![...document.querySelectorAll("#users .user-name")].some((t) => t.textContent === "tom"));

step("ada reads the cluster and the audit log");
await page.goto(`${URL}/#/cluster`);
await page.waitForSelector("#nodes tbody tr");
assert.equal(await page.$$eval("#nodes tbody tr", (t) => t.length), 2, "the master and the minion");
// The minion's row: connected, and its backlog as of its last message (events not yet durable on
// the master, or none).
const minionRow = await page.$$eval("#nodes tbody tr", (rows) => rows.map((r) => [...r.cells].map((c) => c.textContent)).find((c) => c[1] === "minion"));
assert.equal(minionRow[2], "connected", `minion row ${minionRow}`);
assert.match(minionRow[6], /^(none|\d+ events, oldest \d+ s)$/, `minion row ${minionRow}`);
await page.screenshot({ path: `${SHOTS}/cluster.png` });
await page.goto(`${URL}/#/audit`);
await page.waitForSelector("#audit tbody tr");
const audit = await page.textContent("#audit");
for (const seen of ["hunt-create", "label-add", "collect", "user-add", "user-change", "user-remove", "ada", "ivan"]) assert.ok(audit.includes(seen), `the audit log shows ${seen}`);
await page.screenshot({ path: `${SHOTS}/audit.png` });
assert.deepEqual(ada.problems, []);

step("logging out ends the session");
await page.click("#logout");
await page.waitForSelector("#login-form");
assert.equal((await inPage(page, "GET", "session", null, false)).status, 401);
await ada.context.close();

// ---- an investigator and a reader --------------------------------------------------------------
step("ivan may label one client, not many");
const ivan = await session("ivan");
r = await inPage(ivan.page, "POST", "labels", { clients: picked.slice(0, 2), label: "x" });
assert.equal(r.status, 403);
assert.match(r.body.error, /administrator/);
r = await inPage(ivan.page, "POST", "labels", { clients: picked.slice(0, 1), label: "one" });
assert.equal(r.status, 200, JSON.stringify(r.body));
await ivan.context.close();

step("rita reads but cannot collect, hunt, stop, label or read the audit log");
const rita = await session("rita");
page = rita.page;
await page.goto(`${URL}/#/client/${REAL}`);
await page.waitForSelector("#flows tbody tr");
assert.equal(await page.$("#collect"), null, "a reader sees no collect form");
await page.goto(`${URL}/#/hunts`);
await page.waitForSelector("#hunts tbody tr");
assert.equal(await page.$("#new-hunt"), null, "a reader sees no New hunt");
assert.equal(await page.isHidden("#nav-audit"), true);
for (const [m, p, b] of [["POST", "collect", { client_id: REAL, artifact: "Generic.Client.Info" }],
  ["POST", "hunts", { artifact: "Generic.Client.Info" }], ["POST", `hunts/${huntId}/stop`, {}],
  ["POST", "labels", { clients: [REAL], label: "r" }], ["GET", "audit", null], ["GET", "users", null],
  ["POST", "users", { name: "rita", role: "administrator" }]]) {
  r = await inPage(page, m, p, b);
  assert.equal(r.status, 403, `${m} ${p} as a reader: ${JSON.stringify(r.body)}`);
}
r = await inPage(page, "GET", `hunts/${huntId}/results?limit=10`);
assert.equal(r.status, 200);
assert.equal(r.body.total, 3);
// Pages of one row (each reads only the flow its row is in) make up the same rows in the same
// order; a sorted page (which reads every row) holds the same rows.
const one = [];
for (let o = 0; o < 4; o++) {
  const p = await inPage(page, "GET", `hunts/${huntId}/results?limit=1&offset=${o}`);
  assert.equal(p.body.total, 3);
  one.push(...p.body.rows);
}
assert.deepEqual(one, r.body.rows);
const sorted = await inPage(page, "GET", `hunts/${huntId}/results?limit=10&sort=${r.body.columns[0]}`);
const key = (rows) => rows.map((x) => JSON.stringify(x)).sort();
assert.deepEqual(key(sorted.body.rows), key(r.body.rows));
assert.deepEqual(rita.problems, []);
await rita.context.close();

await browser.close();
console.log("gui browser tests: all passed");

// The queen-tw dashboard: pages over the public HTTP API, chosen by the URL's hash
// (#/, #/queues/<name>, #/groups, #/dlq[/<queue>], #/traces[/<name>]), refreshed every 5 s
// unless paused. Every API call carries the token typed in the header (kept in
// sessionStorage) as "Authorization: Bearer"; a call that fails puts its method, path, status
// and error text in the banner instead of leaving the page blank.

import { compact, lineChart } from "./charts.js";

const TOKEN_KEY = "queen-tw.token";
const REFRESH_MS = 5000;
const SHOWN_ROWS = 200; // per table, until "Show all" is pressed (then for the session)
let showAllRows = false;
const LISTED = 100; // rows per page of the lists the API pages (dead letters, traces)
const listOffsets = new Map(); // such a list (by key) -> the offset of the page shown
const CALL_TIMEOUT_MS = 15000; // a call that hangs is reported, not waited for forever

// -- the API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(method, path, status, message) {
    super(message);
    this.method = method;
    this.path = path;
    this.status = status;
  }

  describe() {
    const status = this.status ? `HTTP ${this.status}` : "no answer";
    return `${this.method} ${this.path}: ${status}: ${this.message}`;
  }
}

function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// The JSON body of a successful call; anything else throws an ApiError.
async function api(path, method = "GET") {
  const headers = { Accept: "application/json" };
  const token = storedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let answer;
  try {
    answer = await fetch(path, { method, headers, cache: "no-store",
      signal: AbortSignal.timeout(CALL_TIMEOUT_MS) });
  } catch (error) {
    throw new ApiError(method, path, 0, `the server cannot be reached (${error.message})`);
  }
  const text = await answer.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!answer.ok) {
    const said = body && typeof body.error === "string" ? body.error
      : (text.slice(0, 200) || answer.statusText || "failed");
    throw new ApiError(method, path, answer.status, said);
  }
  return body;
}

// One page render's calls: a failure is remembered for the banner and read as null, so each
// section can show what it has and "no data yet" for the rest.
class Loader {
  constructor() {
    this.failures = [];
  }

  async get(path) {
    try {
      return await api(path);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      this.failures.push(error);
      return null;
    }
  }

  all(paths) {
    return Promise.all(paths.map((path) => this.get(path)));
  }
}

const enc = encodeURIComponent;

// -- building the DOM (text only: names and payloads never become markup) --------------

function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else if (name === "onchange") node.addEventListener("change", value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function noData(text = "no data yet") {
  return h("p", { class: "muted empty" }, text);
}

function section(title, ...content) {
  return h("section", {}, h("h2", {}, title), ...content);
}

function number(value) {
  return Number.isFinite(value) ? value.toLocaleString() : "–";
}

function when(value) {
  if (!value) return "–";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

function bytes(value) {
  if (!Number.isFinite(value)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${size.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function seconds(value) {
  if (!Number.isFinite(value)) return "–";
  if (value < 120) return `${Math.round(value)} s`;
  if (value < 7200) return `${Math.round(value / 60)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

// A listing's payload cell: the start of its text, or a note where the server left the
// payload out of a page that held too many bytes (dataOmitted).
function dataCell(row, value) {
  return row.dataOmitted ? h("em", {}, "too large to list") : h("code", {}, preview(value));
}

function preview(value, length = 120) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  if (text === undefined) return "";
  return text.length > length ? `${text.slice(0, length)}…` : text;
}

// A table of `rows`; each column is [heading, row => cell content]. `rowAttributes` gives
// each <tr> its attributes (tests find rows by them).
function table(columns, rows, rowAttributes = () => ({})) {
  if (!rows || !rows.length) return noData("none");
  const shown = showAllRows ? rows : rows.slice(0, SHOWN_ROWS);
  return h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, columns.map(([heading]) => h("th", {}, heading)))),
    h("tbody", {}, shown.map((row) => h("tr", rowAttributes(row),
      columns.map(([, cell]) => h("td", {}, cell(row))))))),
  rows.length > shown.length ? h("p", { class: "muted" },
    `${shown.length} of ${rows.length} shown `,
    h("button", { type: "button", class: "show-all", onclick: () => {
      showAllRows = true;
      refresh();
    } }, `Show all ${rows.length}`)) : null);
}

function listOffset(key) {
  return listOffsets.get(key) || 0;
}

// Where a list the API pages (limit LISTED, offset) stands, with buttons to the pages
// before and after, so that no row is out of reach; nothing when one page holds it all.
function pager(key, total, shownCount) {
  const offset = listOffset(key);
  if (!Number.isFinite(total) || (offset === 0 && total <= shownCount)) return null;
  const go = (to) => {
    listOffsets.set(key, Math.max(0, to));
    refresh();
  };
  const span = shownCount ? `${number(offset + 1)}–${number(offset + shownCount)}` : "none";
  return h("p", { class: "muted pager", "data-pager": key }, `${span} of ${number(total)} `,
    offset > 0 ? h("button", { type: "button", class: "page-before",
      onclick: () => go(offset - LISTED) }, `Previous ${LISTED}`) : null,
    offset + shownCount < total ? h("button", { type: "button", class: "page-after",
      onclick: () => go(offset + LISTED) }, `Next ${LISTED}`) : null);
}

function card(label, value, testid, state = "") {
  return h("div", { class: `card ${state}`, "data-testid": testid },
    h("span", { class: "label" }, label), h("span", { class: "value" }, value));
}

function queueLink(name) {
  return h("a", { href: `#/queues/${enc(name)}`, "data-queue-link": name }, name);
}

// -- pages ------------------------------------------------------------------------------

async function overviewPage(load) {
  const [status, overview, queues, buffers, metrics, letters] = await load.all([
    "/api/v1/status", "/api/v1/resources/overview", "/api/v1/resources/queues",
    "/api/v1/status/buffers", "/metrics", "/api/v1/dlq?limit=1"]);
  const points = status && Array.isArray(status.throughput) ? status.throughput : [];
  const sum = (key) => points.reduce((total, point) => total + (Number(point[key]) || 0), 0);
  // the statistics' counts when the status route has none
  const messages = (status && status.messages) || (overview && overview.messages) || {};
  const workers = status && Array.isArray(status.workers) ? status.workers : null;
  // what the Dead letters page lists (dead timers included); the status route counts
  // the messages' only
  const dlq = letters ? Number(letters.total)
    : status && status.deadLetterQueue ? status.deadLetterQueue.total : messages.deadLetter;
  const latest = points.length ? points[points.length - 1] : null;
  const ingested = latest ? latest.ingestedPerSecond
    : overview && overview.throughput && overview.throughput.ingestedPerSecond;

  const cards = h("div", { class: "cards" },
    card("Pushed (range)", status ? number(sum("pushMessages")) : "no data yet",
      "throughput-pushed"),
    card("Popped (range)", status ? number(sum("popMessages")) : "no data yet",
      "throughput-popped"),
    card("Ingested / s", Number.isFinite(ingested) ? compact(ingested) : "–", "ingested-rate"),
    card("Messages", number(messages.total), "messages-total"),
    card("Pending", number(messages.pending), "messages-pending"),
    card("Processing", number(messages.processing), "messages-processing"),
    card("Dead letters", number(dlq), "dlq-size", dlq > 0 ? "warn" : ""),
    card("Workers", workers ? `${workers.filter((w) => w.alive).length} / ${workers.length}`
      : "–", "workers-alive"),
    card("Database", buffers ? (buffers.dbHealthy ? "healthy" : "DOWN") : "–", "db-health",
      buffers && !buffers.dbHealthy ? "bad" : ""),
    card("File buffer", buffers ? `${number(buffers.pending)} pending, ${number(buffers.failed)} failed`
      : "–", "file-buffer", buffers && (buffers.failed > 0 || buffers.pending > 0) ? "warn" : ""),
    card("Uptime", metrics ? seconds(Number(metrics.uptime)) : "–", "uptime"),
    card("Requests / s", metrics && metrics.requests ? compact(Number(metrics.requests.rate) || 0)
      : "–", "request-rate"));

  const times = points.map((point) => new Date(point.timestamp));
  const charts = h("div", { class: "charts" },
    lineChart({ title: "Throughput", unit: "messages per bucket", times, series: [
      { label: "pushed", values: points.map((p) => Number(p.pushMessages)) },
      { label: "popped", values: points.map((p) => Number(p.popMessages)) },
      { label: "acked", values: points.map((p) => Number(p.ackSuccess)) },
      { label: "failed acks", values: points.map((p) => Number(p.ackFailed)) },
    ] }),
    lineChart({ title: "Latency", unit: "ms, average", times, series: ["push", "pop", "ack"]
      .map((op) => ({ label: op, values: points.map((p) => Number((p.latencyMs || {})[op])) })),
    }));

  const activity = new Map(((status && status.queues) || []).map((row) => [row.name, row]));
  const queueRows = queues && Array.isArray(queues.queues) ? queues.queues : null;
  const queueTable = queueRows ? table([
    ["Queue", (q) => queueLink(q.name)],
    ["Partitions", (q) => number(q.partitions)],
    ["Depth", (q) => number((q.messages || {}).total)],
    ["Pending", (q) => number((q.messages || {}).pending)],
    ["Processing", (q) => number((q.messages || {}).processing)],
    ["Pushed (range)", (q) => number((activity.get(q.name) || {}).pushMessages)],
    ["Popped (range)", (q) => number((activity.get(q.name) || {}).popMessages)],
    ["Pop lag avg", (q) => {
      const lag = (activity.get(q.name) || {}).popLagMs;
      return lag ? `${compact(Number(lag.avg) || 0)} ms` : "–";
    }],
  ], queueRows, (q) => ({ "data-queue": q.name })) : noData();

  const workerTable = workers ? table([
    ["Worker", (w) => `${w.hostname || "?"} / ${w.workerId || "?"}`],
    ["PID", (w) => w.pid ?? "–"],
    ["Alive", (w) => (w.alive ? "yes" : "no")],
    ["Last seen", (w) => when(w.lastSeen)],
    ["Loop lag avg / max", (w) => {
      const lag = w.eventLoopLagMs || {};
      return `${compact(Number(lag.avg) || 0)} / ${compact(Number(lag.max) || 0)} ms`;
    }],
    ["RSS", (w) => bytes(Number(w.rssBytes))],
    ["CPU", (w) => (Number.isFinite(w.cpuPercent) ? `${w.cpuPercent.toFixed(1)} %` : "–")],
    ["DB pool idle / size", (w) => `${w.dbPoolIdle ?? "–"} / ${w.dbPoolSize ?? "–"}`],
    ["Buffer pending / failed", (w) => `${w.bufferPending ?? "–"} / ${w.bufferFailed ?? "–"}`],
    ["DB", (w) => (w.dbHealthy ? "healthy" : "DOWN")],
  ], workers, (w) => ({ "data-worker": w.workerId })) : noData();

  const range = status && status.timeRange ? h("p", { class: "muted", "data-testid": "range" },
    `From ${when(status.timeRange.from)} to ${when(status.timeRange.to)}`
    + (status.bucketMinutes ? `, ${status.bucketMinutes}-minute buckets` : "")) : null;
  return [cards, range, charts, section("Queues", queueTable),
    section("Workers", workerTable)];
}

async function queuePage(load, name) {
  const [queue, detail, recent, groups] = await load.all([
    `/api/v1/resources/queues/${enc(name)}`, `/api/v1/status/queues/${enc(name)}`,
    // (not /api/v1/messages: its default window is the last hour, and a wider one had it
    // work out the status of every message in it; this route reads the newest 50 of any age)
    `/api/v1/status/queues/${enc(name)}/messages?limit=50`, "/api/v1/consumer-groups"]);
  const totals = (queue && queue.totals) || (detail && detail.totals) || {};
  const head = h("div", { class: "cards" },
    card("Depth", number(totals.total), "queue-total"),
    card("Pending", number(totals.pending), "queue-pending"),
    card("Processing", number(totals.processing), "queue-processing"),
    card("Completed", number(totals.completed), "queue-completed"),
    card("Dead letters", number(totals.deadLetter), "queue-dlq"));

  const cursors = new Map(((detail && detail.partitions) || []).map((p) => [p.name, p]));
  const partitions = (queue && queue.partitions) || (detail && detail.partitions) || null;
  const partitionTable = partitions ? table([
    ["Partition", (p) => p.name],
    ["Depth", (p) => number((p.stats || p.messages || {}).total)],
    ["Pending", (p) => number((p.stats || p.messages || {}).pending)],
    ["Processing", (p) => number((p.stats || p.messages || {}).processing)],
    ["Consumed", (p) => number(((cursors.get(p.name) || {}).cursor || {}).totalConsumed)],
    ["Last activity", (p) => when(((cursors.get(p.name) || {}).cursor || {}).lastActivity)],
    ["Newest message", (p) => when(p.newestMessage)],
  ], partitions, (p) => ({ "data-partition": p.name })) : noData();

  const groupRows = Array.isArray(groups) ? groups.filter((g) => g.queueName === name) : null;
  const groupTable = groupRows ? table([
    ["Group", (g) => g.name],
    ["State", (g) => g.state],
    ["Members", (g) => number(g.members)],
    ["Partitions with lag", (g) => number(g.partitionsWithLag)],
    ["Max time lag", (g) => seconds(Number(g.maxTimeLag))],
  ], groupRows, (g) => ({ "data-group": g.name })) : noData();

  const lagRows = [];
  for (const partition of (detail && detail.partitions) || []) {
    for (const group of partition.consumerGroups || []) {
      lagRows.push({ partition: partition.name, ...group });
    }
  }
  const lagTable = detail ? table([
    ["Group", (r) => r.name],
    ["Partition", (r) => r.partition],
    ["Offset lag", (r) => number(r.offsetLag)],
    ["Time lag", (r) => seconds(Number(r.timeLagSeconds))],
  ], lagRows, (r) => ({ "data-lag-group": r.name, "data-lag-partition": r.partition }))
    : noData();

  const messages = recent && Array.isArray(recent.messages) ? recent.messages : null;
  const messageTable = messages ? table([
    ["Created", (m) => when(m.createdAt)],
    ["Partition", (m) => m.partition],
    ["Transaction", (m) => m.transactionId],
    ["Status", (m) => m.status],
    ["Trace", (m) => m.traceId || ""],
  ], messages, (m) => ({ "data-message": m.transactionId })) : noData();

  const options = queue && queue.options ? h("details", {}, h("summary", {}, "Options"),
    h("pre", {}, JSON.stringify(queue.options, null, 2))) : null;
  return [h("h1", {}, `Queue ${name}`), head, options,
    section("Partitions", partitionTable), section("Consumer groups", groupTable),
    section("Lag by partition", lagTable),
    section("Recent messages", messageTable)];
}

async function groupsPage(load) {
  const [groups, lagging] = await load.all([
    "/api/v1/consumer-groups", "/api/v1/consumer-groups/lagging?minLagSeconds=60"]);
  const groupTable = Array.isArray(groups) ? table([
    ["Group", (g) => g.name],
    ["Queue", (g) => queueLink(g.queueName)],
    ["State", (g) => g.state],
    ["Members", (g) => number(g.members)],
    ["Partitions with lag", (g) => number(g.partitionsWithLag)],
    ["Max time lag", (g) => seconds(Number(g.maxTimeLag))],
    ["Subscription", (g) => g.subscriptionMode || "–"],
  ], groups, (g) => ({ "data-group": g.name, "data-queue": g.queueName })) : noData();
  const lagTable = Array.isArray(lagging) ? table([
    ["Group", (r) => r.consumer_group],
    ["Queue", (r) => queueLink(r.queue_name)],
    ["Partition", (r) => r.partition_name],
    ["Offset lag", (r) => number(r.offset_lag)],
    ["Time lag", (r) => seconds(Number(r.time_lag_seconds))],
    ["Oldest unconsumed", (r) => when(r.oldest_unconsumed_at)],
  ], lagging) : noData();
  return [h("h1", {}, "Consumer groups"), section("Groups", groupTable),
    section("Lagging more than a minute", lagTable)];
}

async function retry(message) {
  try {
    const answer = await api(`/api/v1/messages/${enc(message.partitionId)}/`
      + `${enc(message.transactionId)}/retry`, "POST");
    notify(`Message ${message.transactionId} queued again as ${answer.transactionId}`);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    refusal = { error, at: Date.now() };
    showBanner([error]);
    return;
  }
  await refresh();
}

async function dlqPage(load, queueName) {
  const key = `dlq:${queueName || ""}`;
  const path = `/api/v1/dlq?${queueName ? `queue=${enc(queueName)}&` : ""}limit=${LISTED}`
    + `&offset=${listOffset(key)}`;
  const [letters, queues] = await load.all([path, "/api/v1/resources/queues"]);
  const names = queues && Array.isArray(queues.queues) ? queues.queues.map((q) => q.name) : [];
  const picker = h("label", { class: "picker" }, "Queue ",
    h("select", { id: "dlq-queue", onchange: (event) => {
      const chosen = event.target.value;
      location.hash = chosen ? `#/dlq/${enc(chosen)}` : "#/dlq";
    } }, h("option", { value: "" }, "all queues"),
    names.map((n) => h("option", { value: n, selected: n === queueName }, n))));
  const rows = letters && Array.isArray(letters.messages) ? letters.messages : null;
  const list = rows ? table([
    ["Failed", (m) => when(m.failedAt)],
    ["Queue", (m) => queueLink(m.queue)],
    ["Partition", (m) => m.partition],
    ["Transaction", (m) => m.transactionId],
    ["Group", (m) => m.consumerGroup],
    ["Error", (m) => m.errorMessage || ""],
    ["Retries", (m) => number(m.retryCount)],
    ["Data", (m) => dataCell(m, m.data)],
    // (a dead timer whose partition is gone has no partitionId, and nothing to retry into)
    ["", (m) => (m.partitionId ? h("button", { type: "button", class: "retry",
      "data-retry": m.transactionId, onclick: (event) => {
        event.target.disabled = true;
        retry(m);
      } }, "Retry") : h("span", { class: "muted" }, "partition gone"))],
  ], rows, (m) => ({ "data-dlq-message": m.transactionId })) : noData();
  const total = letters ? h("p", { "data-testid": "dlq-total" },
    `${number(letters.total)} dead letter${letters.total === 1 ? "" : "s"}`) : null;
  return [h("h1", {}, "Dead letters"), picker, total, list,
    rows ? pager(key, Number(letters.total), rows.length) : null];
}

async function tracesPage(load, traceName) {
  const eventsKey = `trace:${traceName || ""}`;
  const [names, traces] = await load.all([
    `/api/v1/traces/names?limit=${LISTED}&offset=${listOffset("trace-names")}`,
    ...(traceName ? [`/api/v1/traces/by-name/${enc(traceName)}?limit=${LISTED}`
      + `&offset=${listOffset(eventsKey)}`] : [])]);
  const nameRows = names && Array.isArray(names.trace_names) ? names.trace_names : null;
  const nameTable = nameRows ? table([
    ["Trace name", (t) => h("a", { href: `#/traces/${enc(t.trace_name)}` }, t.trace_name)],
    ["Events", (t) => number(t.trace_count)],
    ["Messages", (t) => number(t.message_count)],
    ["Last seen", (t) => when(t.last_seen)],
  ], nameRows, (t) => ({ "data-trace-name": t.trace_name })) : noData();
  const content = [h("h1", {}, "Traces"), section("Trace names", nameTable,
    nameRows ? pager("trace-names", Number(names.total), nameRows.length) : null)];
  if (traceName) {
    const rows = traces && Array.isArray(traces.traces) ? traces.traces : null;
    content.push(section(`Events named ${traceName}`, rows ? table([
      ["Time", (t) => when(t.created_at)],
      ["Queue", (t) => t.queue_name ? queueLink(t.queue_name) : "–"],
      ["Partition", (t) => t.partition_name || "–"],
      ["Transaction", (t) => t.transaction_id || "–"],
      ["Group", (t) => t.consumer_group || "–"],
      ["Event", (t) => t.event_type],
      ["Data", (t) => dataCell(t, t.data)],
    ], rows, (t) => ({ "data-trace-event": t.id })) : noData(),
    rows ? pager(eventsKey, Number(traces.total), rows.length) : null));
  }
  return content;
}

// -- routing, refresh, banner ------------------------------------------------------------

// A hand-typed hash may hold a "%" that is no escape: the part is then taken as written.
function decodedPart(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodedPart);
  const [page, argument] = parts;
  if (page === "queues" && argument) return ["queue", (load) => queuePage(load, argument)];
  if (page === "groups") return ["groups", groupsPage];
  if (page === "dlq") return ["dlq", (load) => dlqPage(load, argument)];
  if (page === "traces") return ["traces", (load) => tracesPage(load, argument)];
  return ["overview", overviewPage];
}

function showBanner(failures) {
  const banner = document.getElementById("banner");
  banner.replaceChildren();
  if (!failures.length) {
    banner.hidden = true;
    return;
  }
  banner.append(h("strong", {}, "The API answered with an error"),
    h("ul", {}, failures.map((failure) => h("li", { "data-status": failure.status },
      failure.describe()))));
  if (failures.some((failure) => failure.status === 401 || failure.status === 403)) {
    banner.append(h("p", {}, "Enter a token with the right role in the Token field."));
  }
  banner.hidden = false;
}

let noticeTimer = null;

function notify(text) {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { notice.hidden = true; }, 8000);
}

let generation = 0;
let timer = null;
let rendering = 0; // refreshes under way
// The last refused action (a retry): shown with every refresh for REFUSAL_SHOWN_MS, so the
// next auto-refresh does not hide it before anyone could read it.
let refusal = null;
const REFUSAL_SHOWN_MS = 30000;

async function refresh() {
  const mine = ++generation;
  document.body.dataset.started = String(mine);
  const [page, render] = route();
  const load = new Loader();
  let content;
  rendering += 1;
  try {
    content = await render(load);
  } catch (error) {
    // a bug in a page: say so where the page would be, never a blank screen
    content = [h("p", { class: "bad" }, `This page failed to render: ${error.message}`)];
    console.warn(error);
  } finally {
    rendering -= 1;
  }
  if (mine !== generation) return; // a newer refresh (or navigation) has started
  document.getElementById("view").replaceChildren(...content.filter(Boolean));
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  const recent = refusal && Date.now() - refusal.at < REFUSAL_SHOWN_MS ? [refusal.error] : [];
  showBanner([...load.failures, ...recent]);
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.loaded = String(mine);
}

// An auto-refresh never overtakes a refresh still waiting for the API: when calls take longer
// than REFRESH_MS (PostgreSQL hangs), overtaking each one would finish none, and the page
// would go on showing the last data as current, with no banner; waited for, the calls end
// at CALL_TIMEOUT_MS and their failures are shown.
function autoRefresh() {
  if (!rendering) refresh();
}

function schedule() {
  clearInterval(timer);
  timer = null;
  if (document.getElementById("auto-refresh").checked) {
    timer = setInterval(autoRefresh, REFRESH_MS);
  }
}

function showTokenState() {
  document.getElementById("token-state").textContent = storedToken() ? "token set" : "no token";
}

function start() {
  const field = document.getElementById("token");
  field.value = storedToken();
  showTokenState();
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = field.value.trim();
    // A header value must be printable ASCII: fetch() refuses anything else before sending,
    // and every call would then read as "the server cannot be reached".
    if (!/^[\x21-\x7e]*$/.test(token)) {
      document.getElementById("token-state").textContent =
        "not a token: printable ASCII without spaces only (not stored)";
      return;
    }
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    refresh();
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    field.value = "";
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    refresh();
  });
  document.getElementById("auto-refresh").addEventListener("change", schedule);
  document.getElementById("refresh-now").addEventListener("click", () => refresh());
  window.addEventListener("hashchange", () => refresh());
  schedule();
  refresh();
}

start();

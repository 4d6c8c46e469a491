// The mqmq dashboard: polls /stats every second and shows what it says.
// Rates are the difference of two successive samples of a counter over the
// server's time between them.  Data from the server (queue names, error
// text) only ever goes into the page as textContent.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 3000;       // a request still unanswered by then has failed
const WINDOW_S = 300;          // the charts show the last five minutes
const MIN_SPAN_S = 60;         // ... or since the page opened, but at least this

const RATES = [
  {key: "puts", title: "Puts", count: (s) => s.commands.put},
  {key: "deliveries", title: "Deliveries", count: (s) => s.events.deliveries},
  {key: "acks", title: "Acks", count: (s) => s.commands.ack},
  {key: "errors", title: "Errors", count: (s) => sum(Object.values(s.errors))},
];

const numbers = new Intl.NumberFormat("en-US");
const byId = (id) => document.getElementById(id);

const opened = Date.now();
let previous = null;           // the last sample: {stats, at}
let lastGood = null;           // when the last sample arrived (ms)
const history = [];            // {at: ms, puts: rate, ...}

function sum(values) {
  return values.reduce((total, value) => total + value, 0);
}

function set(id, text) {
  byId(id).textContent = text;
}

function count(value) {
  return value == null ? "–" : numbers.format(value);
}

function rate(value) {
  if (value == null) return "–";
  return value >= 100 ? numbers.format(Math.round(value)) : String(Math.round(value * 10) / 10);
}

function bytes(value) {
  if (value == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return (unit ? value.toFixed(1) : String(value)) + " " + units[unit];
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const pair = (big, bigUnit, small, smallUnit) => big + bigUnit + (small ? ` ${small}${smallUnit}` : "");
  if (s >= 86400) return pair(Math.floor(s / 86400), "d", Math.floor(s / 3600) % 24, "h");
  if (s >= 3600) return pair(Math.floor(s / 3600), "h", Math.floor(s / 60) % 60, "m");
  if (s >= 60) return pair(Math.floor(s / 60), "m", s % 60, "s");
  return s + "s";
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString("en-GB");
}

// --- the rate cards -------------------------------------------------------

function makeRateCards() {
  const template = byId("rate-card");
  for (const {key, title} of RATES) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.id = "rate-" + key;
    card.classList.add(key);
    card.querySelector("h2").textContent = title;
    for (const [part, name] of [["now", "rate"], ["total", "total"], ["peak", "peak"], ["extra", "extra"]]) {
      card.querySelector("." + part).id = key + "-" + name;
    }
    byId("rates").append(card);
  }
}

// A line over the last WINDOW_S seconds (or since the page opened, but at
// least MIN_SPAN_S), broken where samples are missing.
function drawChart(key, now) {
  const card = byId("rate-" + key);
  const span = 1000 * Math.min(WINDOW_S, Math.max(MIN_SPAN_S, (now - opened) / 1000));
  const start = now - span;
  const points = history.filter((sample) => sample.at >= start);
  const peak = Math.max(0, ...points.map((sample) => sample[key]));
  const top = niceCeiling(peak);
  let line = "", area = "", last = null, runStart = null;
  for (const sample of points) {
    const x = (300 * (sample.at - start) / span).toFixed(1);
    const y = (100 - 96 * sample[key] / top).toFixed(1);
    if (last === null || sample.at - last.at > 2.5 * POLL_MS) {
      if (runStart !== null) area += `L${last.x},100L${runStart},100Z`;
      line += `M${x},${y}`;
      area += `M${x},100L${x},${y}`;
      runStart = x;
    } else {
      line += `L${x},${y}`;
      area += `L${x},${y}`;
    }
    last = {at: sample.at, x};
  }
  if (runStart !== null) area += `L${last.x},100L${runStart},100Z`;
  card.querySelector(".line").setAttribute("d", line);
  card.querySelector(".area").setAttribute("d", area);
  card.querySelector(".peak").textContent = "peak " + rate(peak) + "/s";
  card.querySelector(".since").textContent = duration(span / 1000) + " ago";
}

// 1, 2 or 5 times a power of ten, at least 1: a chart's top.
function niceCeiling(value) {
  if (value <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((step) => step * power).find((top) => top >= value);
}

// --- one sample -----------------------------------------------------------

function show(stats, at) {
  const rates = {};
  // Another process (a restart) when the start time moved, or a count went down.
  const started = (s) => s.time - s.uptime_seconds;
  const restarted = previous && (Math.abs(started(stats) - started(previous.stats)) > 1
    || RATES.some(({count: read}) => read(stats) < read(previous.stats)));
  const elapsed = previous ? stats.time - previous.stats.time : 0;
  for (const {key, count: read} of RATES) {
    const value = read(stats);
    rates[key] = previous && !restarted && elapsed > 0
      ? Math.max(0, value - read(previous.stats)) / elapsed
      : null;
    set(key + "-total", count(value));
    set(key + "-rate", rate(rates[key]));
  }
  if (rates.puts != null) {
    history.push({at, ...rates});
    while (history.length && history[0].at < at - WINDOW_S * 1000) history.shift();
  }
  previous = {stats, at};
  for (const {key} of RATES) drawChart(key, at);

  const failing = Object.entries(stats.errors).filter(([, n]) => n > 0)
    .map(([type, n]) => `${type} ${numbers.format(n)}`);
  const extra = byId("errors-extra");
  extra.textContent = failing.join(", ");
  extra.title = extra.textContent;

  set("uptime", duration(stats.uptime_seconds));
  set("process-uptime", duration(stats.uptime_seconds));
  set("connections-current", count(stats.connections.current));
  set("connections-total", count(stats.connections.total));
  set("connections-refused", count(stats.connections.refused));
  set("waiting", count(stats.waiting));
  set("messages-ready", count(stats.messages.ready));
  set("messages-reserved", count(stats.messages.reserved));
  set("messages-buried", count(stats.messages.buried));
  set("messages-bytes", bytes(stats.messages.bytes));
  set("memory", bytes(stats.memory && stats.memory.resident_bytes));
  set("bytes-in", bytes(stats.bytes.in));
  set("bytes-out", bytes(stats.bytes.out));
  showStore(stats.store);
  showQueues(stats.queues);
}

function showStore(store) {
  set("store-kind", store.kind);
  set("store-durable", store.durable ? "yes" : "no");
  set("store-commits", count(store.commits));
  const health = byId("store-health");
  health.textContent = store.healthy ? "healthy" : "failing";
  health.className = "badge " + (store.healthy ? "good" : "bad");
  const failure = byId("store-failure");
  failure.hidden = store.healthy;
  failure.textContent = store.failure || "";
  const when = store.last_error_time ? ` (${clock(store.last_error_time * 1000)})` : "";
  set("store-last-error", store.last_error ? store.last_error + when : "none");
}

function showQueues(queues) {
  const rows = queues.largest.map((queue) => {
    const row = document.createElement("tr");
    for (const value of [queue.name, queue.ready, queue.reserved, queue.buried, queue.waiting]) {
      const cell = document.createElement("td");
      cell.textContent = typeof value === "number" ? count(value) : value;
      row.append(cell);
    }
    return row;
  });
  byId("queues").replaceChildren(...rows);
  byId("no-queues").hidden = rows.length > 0;
  set("queue-count", rows.length < queues.count
    ? `${rows.length} of ${count(queues.count)}`
    : `${count(queues.count)} in all`);
}

// --- connected or not -----------------------------------------------------

function connected(at) {
  lastGood = at;
  document.body.dataset.state = "connected";
  set("status", "Live");
  byId("banner").hidden = true;
  set("updated", "updated " + clock(at));
}

function disconnected(error) {
  document.body.dataset.state = "disconnected";
  set("status", "Disconnected");
  for (const {key} of RATES) set(key + "-rate", "–");  // unknown now; the totals stay, greyed
  const since = lastGood ? `; last data ${duration((Date.now() - lastGood) / 1000)} ago` : "";
  const banner = byId("banner");
  banner.hidden = false;
  banner.textContent = `Cannot reach the server (${error.message})${since}. Retrying every second…`;
}

async function poll() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch("stats", {cache: "no-store", signal: abort.signal});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const stats = await response.json();
    const at = Date.now();
    show(stats, at);
    connected(at);
  } catch (error) {
    disconnected(error.name === "AbortError" ? new Error("no answer") : error);
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

makeRateCards();
poll();

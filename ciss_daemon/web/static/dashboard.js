// The ciss dashboard: charts from the page's JSON, the running job refreshed every second from
// /api/live, the rest of the page re-rendered by the server when the catalog changes, operator actions.
// Every value from the server goes into the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const charts = [];
const liveLoss = { labels: [], values: [], job: null };
let revision = null;

function $(id) { return document.getElementById(id); }

function text(id, value) {
  const node = $(id);
  if (node) node.textContent = value === null || value === undefined ? "-" : String(value);
}

function lineChart(canvas, labels, series, yLabel, yMax) {
  return new Chart(canvas, {
    type: "line",
    data: {
      labels: labels,
      datasets: Object.entries(series).map(([name, values], i) => ({
        label: name, data: values, borderColor: COLOURS[i % COLOURS.length],
        backgroundColor: COLOURS[i % COLOURS.length], spanGaps: false, pointRadius: labels.length > 60 ? 0 : 2,
      })),
    },
    options: {
      animation: false, maintainAspectRatio: false,
      scales: { y: { title: { display: true, text: yLabel }, min: 0, max: yMax } },
    },
  });
}

// Viridis, as `ciss report` draws its heat map: dark purple at IoU 0, yellow at 100.
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function viridis(value) {
  const x = Math.min(Math.max(value, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const t = x - i;
  const [r, g, b] = VIRIDIS[i].map((c, k) => Math.round(c + t * (VIRIDIS[i + 1][k] - c)));
  return `rgb(${r}, ${g}, ${b})`;
}

function cells(steps, classes, values) {
  // values: one row per class, one column per step; unscored (null) cells are left out
  const out = [];
  values.forEach((row, y) => row.forEach((v, x) => {
    if (v !== null) out.push({ x: steps[x], y: classes[y], v: v });
  }));
  return out;
}

function heatmap(canvas, data) {
  const steps = data.steps;
  const classes = data.heatmap.classes;
  return new Chart(canvas, {
    type: "matrix",
    data: {
      datasets: [{
        label: "IoU (%)",
        data: cells(steps, classes, data.heatmap.values),
        backgroundColor: (ctx) => viridis(ctx.raw ? ctx.raw.v : 0),
        width: ({ chart }) => ((chart.chartArea || {}).width || 0) / Math.max(steps.length, 1) - 1,
        height: ({ chart }) => ((chart.chartArea || {}).height || 0) / Math.max(classes.length, 1) - 1,
      }],
    },
    options: {
      animation: false, maintainAspectRatio: false,
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: { label: (ctx) => `${ctx.raw.y}, ${ctx.raw.x}: IoU ${(100 * ctx.raw.v).toFixed(1)}` } },
      },
      scales: {
        x: { type: "category", labels: steps, offset: true, grid: { display: false } },
        y: { type: "category", labels: classes, offset: true, reverse: false, grid: { display: false } },
      },
    },
  });
}

function percent(values) { return values.map((v) => (v === null || v === undefined ? null : 100 * v)); }

function drawCharts() {
  while (charts.length) charts.pop().destroy();
  const source = $("chart-data");
  if (!source || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const m = data.miou;
  charts.push(lineChart($("chart-miou"), data.steps, {
    "mIoU all": percent(m.miou_all), "mIoU old": percent(m.miou_old),
    "mIoU new": percent(m.miou_new), "hIoU": percent(m.hiou),
  }, "IoU (%)", 100));
  charts.push(heatmap($("chart-heatmap"), data));
  charts.push(lineChart($("chart-loss"), data.loss.labels, data.loss.terms, "loss"));
  const live = $("chart-live-loss");
  if (live) {
    liveLoss.chart = lineChart(live, liveLoss.labels, { "total loss": liveLoss.values }, "loss");
    charts.push(liveLoss.chart);
  }
  document.body.dataset.charts = String(charts.length);
  document.body.dataset.chartsDrawnAt = String(performance.now());  // read by the page-load benchmark
}

function showRunning(r) {
  $("running-job").hidden = !r;
  $("running-none").hidden = !!r;
  if (!r) return;
  text("running-step", r.step);
  text("running-batch", r.batch);
  text("running-attempt", `${r.attempts}/${r.max_attempts}`);
  text("running-phase", r.phase);
  text("running-iteration", r.iteration);
  text("running-total", r.total);
  text("running-epoch", r.epoch);
  text("running-epochs", r.epochs);
  text("running-speed", r.images_per_second);
  text("running-eta", r.eta);
  $("running-progress").value = r.fraction || 0;
  const table = $("running-losses");
  const names = Object.keys(r.losses || {});
  const head = document.createElement("tr");
  const row = document.createElement("tr");
  for (const name of names) {
    const th = document.createElement("th");
    th.textContent = name;
    head.appendChild(th);
    const td = document.createElement("td");
    const v = r.losses[name];
    td.textContent = v === null || v === undefined ? "-" : v.toFixed(4);
    row.appendChild(td);
  }
  table.replaceChildren(head, row);
  if (liveLoss.job !== r.job) { liveLoss.job = r.job; liveLoss.labels.length = 0; liveLoss.values.length = 0; }
  const total = (r.losses || {}).total;
  const last = liveLoss.labels[liveLoss.labels.length - 1];
  if (r.iteration !== null && r.iteration !== undefined && total !== undefined && r.iteration !== last) {
    liveLoss.labels.push(r.iteration);
    liveLoss.values.push(total);
    if (liveLoss.chart) liveLoss.chart.update();
  }
  $("chart-live-loss").parentElement.hidden = liveLoss.labels.length < 2;  // a curve needs two points
}

async function rerender() {
  // The server renders the page (escaped); only <main> is swapped, so the token field keeps its value.
  const response = await fetch(location.pathname + location.search, { cache: "no-store" });
  if (!response.ok) return;
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.getElementById("dashboard");
  if (!fresh) return;
  const token = $("token") ? $("token").value : "";
  const message = $("action-result") ? $("action-result").textContent : "";
  $("dashboard").replaceWith(document.adoptNode(fresh));
  if ($("token")) $("token").value = token;
  if ($("action-result")) $("action-result").textContent = message;
  revision = fresh.dataset.revision;
  bind();
  drawCharts();
}

async function poll() {
  try {
    const response = await fetch("/api/live", { cache: "no-store" });
    if (response.ok) {
      const live = await response.json();
      const daemon = $("daemon");
      daemon.className = live.daemon ? "up" : "down";
      if (!live.daemon) daemon.textContent = "daemon not running";
      showRunning(live.running);
      if (live.revision !== revision) await rerender();
    }
  } catch (error) {
    text("daemon", "dashboard unreachable");
  }
  setTimeout(poll, POLL_MS);
}

async function act(button) {
  const action = button.dataset.action;
  const target = button.dataset.target;
  const token = $("token").value;
  sessionStorage.setItem("ciss-token", token);
  text("action-result", `${action} ${target}: waiting for the daemon...`);
  const response = await fetch(`/api/actions/${encodeURIComponent(action)}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Authorization": `Bearer ${token}` },
    body: JSON.stringify({ target: target }),
  });
  let answer = { message: `HTTP ${response.status}` };
  try { answer = await response.json(); } catch (error) { /* keep the status line */ }
  const result = $("action-result");
  result.textContent = answer.message;
  result.className = response.ok ? "ok" : "refused";
  if (response.ok) await rerender();
}

function bind() {
  for (const button of document.querySelectorAll("button.action")) {
    button.addEventListener("click", () => act(button));
  }
  const token = $("token");
  if (token && !token.value) token.value = sessionStorage.getItem("ciss-token") || "";
}

document.addEventListener("DOMContentLoaded", () => {
  revision = $("dashboard").dataset.revision;
  bind();
  drawCharts();
  setTimeout(poll, POLL_MS);
});

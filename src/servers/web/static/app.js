// The daqif status page: one EventSource on /events, no polling. Plain JS, no library.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const HISTORY_S = 300;
const state = { active: new Map(), finished: [], rates: [], links: {}, streamUp: false };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function human(value, unit = "") {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const prefixes = ["", "k", "M", "G", "T", "P"];
  let i = 0;
  while (Math.abs(value) >= 1000 && i < prefixes.length - 1) { value /= 1000; i += 1; }
  return `${value.toFixed(value >= 100 || i === 0 ? 0 : 1)} ${prefixes[i]}${unit}`.trim();
}

// -- banners: what the page is waiting for ---------------------------------------------------------

function renderBanners() {
  const box = $("banners");
  box.replaceChildren();
  const waiting = [];
  if (!state.streamUp) waiting.push("Lost the connection to the status page server; reconnecting…");
  else {
    for (const [name, link] of Object.entries(state.links)) if (!link.up) waiting.push(link.message);
  }
  for (const text of waiting) box.append(el("div", { class: "banner", "data-waiting": "1" }, text));
}

// -- DAQs ------------------------------------------------------------------------------------------

function daqRow(daq) {
  const row = el("tr", { "data-daq-id": daq.id, "data-substate": daq.substate });
  row.append(el("td", { class: "path" }, daq.id));
  const sub = el("td");
  sub.append(el("span", { class: `badge ${daq.substate}${daq.error ? " error" : ""}` }, daq.substate));
  row.append(sub);
  const alerts = el("td");
  for (const alert of daq.alerts) {
    alerts.append(el("span", { class: `alert ${alert.severity}`, title: alert.description }, `${alert.severity} ${alert.id}`));
  }
  row.append(alerts, el("td", { class: "muted" }, daq.message), el("td", { class: "path" }, daq.result || "–"));
  return row;
}

function renderDaqs() {
  const active = [...state.active.values()].sort((a, b) => a.timestamp - b.timestamp);
  $("active").replaceChildren(...active.map(daqRow));
  $("active-none").hidden = active.length > 0;
  $("active-count").textContent = active.length ? `${active.length}` : "";
  $("finished").replaceChildren(...state.finished.map(daqRow));
  $("finished-none").hidden = state.finished.length > 0;
}

function onDaq(daq) {
  if (daq.final) {
    state.active.delete(daq.id);
    if (!state.finished.some((d) => d.id === daq.id)) state.finished.unshift(daq);
    state.finished = state.finished.slice(0, 20);
  } else {
    state.active.set(daq.id, daq);
  }
  renderDaqs();
}

function onDaqs(all) {
  state.active = new Map(all.active.map((d) => [d.id, d]));
  state.finished = all.finished;
  renderDaqs();
}

// -- writer ----------------------------------------------------------------------------------------

function onWriter(writer) {
  if (!writer) return;
  const badge = $("writer-state");
  badge.textContent = writer.state;
  badge.className = `badge ${writer.state}`;
  $("writer-card").dataset.state = writer.state;
  $("acq-state").textContent = writer.acquisition === "UNDEFINED" ? "none yet" : writer.acquisition;
  $("acq-file").textContent = writer.output_file || "–";
  $("acq-count").textContent = writer.n_images ? `${writer.n_written} of ${writer.n_images}` : "–";
  $("acq-bar").style.width = writer.n_images ? `${(100 * writer.n_written) / writer.n_images}%` : "0";
  $("acq-message").textContent = writer.message || "–";
}

// -- throughput plot (SVG) ---------------------------------------------------------------------------

function renderRates() {
  // Two panels on one time axis: frames/s above, bytes/s below, each scaled to its own peak.
  const svg = $("rate-plot");
  const [w, left, right] = [420, 46, 16];
  svg.replaceChildren();
  const now = Date.now() / 1000;
  const points = state.rates.filter((p) => p.t >= now - HISTORY_S);
  // The time axis spans the history there is, from one minute up to five.
  const span = Math.min(HISTORY_S, Math.max(60, points.length ? now - points[0].t : 0));
  const x = (t) => left + ((t - (now - span)) / span) * (w - left - right);
  for (let i = 5; i >= 0; i -= 1) {
    const ago = (span * i) / 5;
    const text = i === 0 ? "now" : ago >= 60 ? `-${(ago / 60).toFixed(1)}m` : `-${ago.toFixed(0)}s`;
    svg.append(el("svg:text", { x: x(now - ago), y: 166, "text-anchor": "middle" }, text));
  }
  for (const [key, color, unit, top, bottom] of [["fps", "#1f6feb", "", 6, 74], ["bps", "#8250df", "B", 82, 150]]) {
    const peak = Math.max(1, ...points.map((p) => p[key])) * 1.15;
    const y = (v) => bottom - (v / peak) * (bottom - top);
    svg.append(el("svg:line", { x1: left, y1: bottom, x2: w - right, y2: bottom, stroke: "#d0d7de" }));
    const label = el("svg:text", { x: left - 4, y: top + 8, "text-anchor": "end" }, human(peak, unit));
    label.setAttribute("style", `fill:${color}`);
    svg.append(label, el("svg:text", { x: left - 4, y: bottom, "text-anchor": "end" }, "0"));
    const path = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
    if (path) svg.append(el("svg:path", { d: path, fill: "none", stroke: color, "stroke-width": 1.6 }));
  }
  const last = points[points.length - 1];
  $("fps-now").textContent = last ? human(last.fps) : "–";
  $("bps-now").textContent = last ? human(last.bps, "B") : "–";
}

// -- storage gauge (SVG) -----------------------------------------------------------------------------

function arc(fraction) {
  const angle = Math.PI * (1 - fraction);
  const [cx, cy, r] = [100, 100, 80];
  return `M20,100 A${r},${r} 0 0 1 ${(cx + r * Math.cos(angle)).toFixed(2)},${(cy - r * Math.sin(angle)).toFixed(2)}`;
}

function onStorage(storage) {
  if (!storage) return;
  const used = storage.capacity ? 1 - storage.available / storage.capacity : 0;
  const color = used > 0.9 ? "#cf222e" : used > 0.75 ? "#9a6700" : "#1a7f37";
  const svg = $("storage-gauge");
  svg.replaceChildren(
    el("svg:path", { d: arc(1), fill: "none", stroke: "#eaeef2", "stroke-width": 18 }),
    el("svg:path", { d: arc(Math.min(1, Math.max(0.001, used))), fill: "none", stroke: color, "stroke-width": 18 }),
    el("svg:text", { x: 100, y: 92, "text-anchor": "middle", style: "font-size:22px;fill:#1f2328" }, `${(100 * used).toFixed(1)}%`),
    el("svg:text", { x: 100, y: 112, "text-anchor": "middle" }, `used of ${human(storage.capacity, "B")}`),
  );
  svg.dataset.used = used.toFixed(4);
  $("storage-available").textContent = human(storage.available, "B");
  $("storage-path").textContent = storage.path;
}

// -- live preview -------------------------------------------------------------------------------------

function showPreview(shown) {
  $("preview").hidden = !shown;
  $("preview-none").hidden = shown;
}

function onPreview(url) {
  // `url`: the writer's /daq/live (MJPEG), or null when the page was started without --writer-preview.
  const img = $("preview");
  if (!url) {
    img.removeAttribute("src");
    showPreview(false);
    return;
  }
  if (img.dataset.url === url) return; // already streaming: a new snapshot must not restart it
  img.dataset.url = url;
  img.onload = () => showPreview(true);
  img.onerror = () => {
    // No live stream (yet): the writer runs without --live-stream, or is restarting. Try again.
    showPreview(false);
    setTimeout(() => {
      if (img.dataset.url === url) img.src = `${url}?retry=${Date.now()}`;
    }, 5000);
  };
  img.src = url;
}

// -- the stream --------------------------------------------------------------------------------------

function onSnapshot(snapshot) {
  onDaqs(snapshot);
  onWriter(snapshot.writer);
  state.rates = snapshot.rates;
  renderRates();
  onStorage(snapshot.storage);
  onPreview(snapshot.preview);
  state.links = snapshot.links;
  renderBanners();
}

function connect() {
  const events = new EventSource("/events");
  const on = (kind, handler) => events.addEventListener(kind, (e) => handler(JSON.parse(e.data)));
  on("snapshot", onSnapshot);
  on("daq", onDaq);
  on("daqs", onDaqs);
  on("writer", onWriter);
  on("storage", onStorage);
  on("rate", (point) => {
    state.rates.push(point);
    state.rates = state.rates.filter((p) => p.t >= point.t - HISTORY_S);
    renderRates();
  });
  on("link", (change) => { Object.assign(state.links, change); renderBanners(); });
  events.onopen = () => { state.streamUp = true; renderBanners(); };
  events.onerror = () => { state.streamUp = false; renderBanners(); };  // EventSource reconnects itself
}

setInterval(() => { $("clock").textContent = new Date().toISOString().slice(0, 19).replace("T", " ") + " UTC"; }, 1000);
renderRates();
connect();

// The fleet page (served by edge-collector, [web]): no library, no external resource but the operator's tiles.
// Data: GET /api/fleet, /api/gateway?id=, /api/rejections (JSON, same origin, the session cookie).
"use strict";

const REFRESH_MS = 10000;
const STATES = ["offline", "stale", "errors", "backlog", "online"];
const STATE_TEXT = {online: "online", backlog: "backlog", errors: "device errors", stale: "not heard", offline: "offline"};
const SVG = "http://www.w3.org/2000/svg";
let fleet = null;
let sortKey = "state";
let sortDesc = false;
let timer = null;

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.setAttribute("class", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

async function api(path) {
  const response = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (response.status === 401) { window.location.assign("/"); throw new Error("signed out"); }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

function showError(error) {
  const node = document.getElementById("error");
  node.hidden = !error;
  node.textContent = error ? String(error.message || error) : "";
}

// -- formatting -----------------------------------------------------------------------------------------------

function ago(ns) {
  if (ns === null || ns === undefined) return "never";
  const s = Math.max(0, (Date.now() * 1e6 - ns) / 1e9);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}
function when(ns) { return ns ? new Date(ns / 1e6).toISOString().replace("T", " ").slice(0, 19) + " UTC" : ""; }
function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
function value(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(7)));
  if (v === null || v === undefined) return "";
  return String(v);
}
function badge(state) { return el("span", {class: `badge state-${state}`, text: STATE_TEXT[state] || state}); }
function gatewayLink(id) { return el("a", {href: `#/gateway/${encodeURIComponent(id)}`, text: id}); }

// -- the map (Web Mercator: the operator's tiles, or a plain grid of degrees) ----------------------------------

function project(lat, lon, zoom) {
  const size = 256 * 2 ** zoom;
  const sin = Math.sin(lat * Math.PI / 180);
  return [(lon + 180) / 360 * size, (0.5 - Math.log((1 + sin) / (1 - sin)) / (4 * Math.PI)) * size];
}

function niceStep(span) {
  const raw = span / 6;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

function drawMap(gateways, settings) {
  const svg = document.getElementById("map");
  const W = 960, H = 480, PAD = 60;
  svg.replaceChildren();
  const located = gateways.filter(g => g.location);
  const missing = gateways.filter(g => !g.location).map(g => g.id);
  document.getElementById("map-note").textContent = missing.length
    ? `Without a location (no configured position, no GPS fix): ${missing.join(", ")}` : "";
  if (!located.length) {
    svg.append(el("svg:text", {x: W / 2, y: H / 2, "text-anchor": "middle", text: "No gateway has a location yet"}));
    return;
  }
  const maxZoom = settings.tiles ? settings.tiles_max_zoom : 18;
  let zoom = maxZoom;
  for (; zoom > 1; zoom--) {
    const xs = located.map(g => project(g.location.lat, g.location.lon, zoom));
    const w = Math.max(...xs.map(p => p[0])) - Math.min(...xs.map(p => p[0]));
    const h = Math.max(...xs.map(p => p[1])) - Math.min(...xs.map(p => p[1]));
    if (w <= W - 2 * PAD && h <= H - 2 * PAD) break;
  }
  if (located.length === 1) zoom = Math.min(zoom, 15);
  const pts = located.map(g => project(g.location.lat, g.location.lon, zoom));
  const cx = (Math.max(...pts.map(p => p[0])) + Math.min(...pts.map(p => p[0]))) / 2;
  const cy = (Math.max(...pts.map(p => p[1])) + Math.min(...pts.map(p => p[1]))) / 2;
  const ox = cx - W / 2, oy = cy - H / 2;  // world pixel at the top left corner
  const unproject = (x, y) => {
    const size = 256 * 2 ** zoom;
    const lon = (x / size) * 360 - 180;
    const lat = Math.atan(Math.sinh(Math.PI * (1 - 2 * y / size))) * 180 / Math.PI;
    return [lat, lon];
  };
  if (settings.tiles) {
    const tiles = el("svg:g", {class: "tiles"});
    const n = 2 ** zoom;
    for (let tx = Math.floor(ox / 256); tx <= Math.floor((ox + W) / 256); tx++) {
      for (let ty = Math.floor(oy / 256); ty <= Math.floor((oy + H) / 256); ty++) {
        if (ty < 0 || ty >= n) continue;
        const x = ((tx % n) + n) % n;
        const href = settings.tiles.replace("{z}", zoom).replace("{x}", x).replace("{y}", ty);
        tiles.append(el("svg:image", {href, x: tx * 256 - ox, y: ty * 256 - oy, width: 256, height: 256}));
      }
    }
    svg.append(tiles);
    if (settings.attribution) {
      svg.append(el("svg:text", {class: "attribution", x: W - 4, y: H - 4, "text-anchor": "end", text: settings.attribution}));
    }
  } else {
    const grid = el("svg:g", {class: "grid"});
    const [north, west] = unproject(ox, oy), [south, east] = unproject(ox + W, oy + H);
    const latStep = niceStep(north - south), lonStep = niceStep(east - west);
    const digits = Math.max(0, -Math.floor(Math.log10(Math.min(latStep, lonStep))));
    for (let lat = Math.ceil(south / latStep) * latStep; lat <= north; lat += latStep) {
      const y = project(lat, 0, zoom)[1] - oy;
      grid.append(el("svg:line", {x1: 0, x2: W, y1: y, y2: y}),
                  el("svg:text", {x: 4, y: y - 3, text: `${lat.toFixed(digits)}°`}));
    }
    for (let lon = Math.ceil(west / lonStep) * lonStep; lon <= east; lon += lonStep) {
      const x = project(0, lon, zoom)[0] - ox;
      grid.append(el("svg:line", {x1: x, x2: x, y1: 0, y2: H}),
                  el("svg:text", {x: x + 3, y: H - 4, text: `${lon.toFixed(digits)}°`}));
    }
    svg.append(grid);
  }
  // worst states drawn last, on top
  const order = [...located].sort((a, b) => STATES.indexOf(b.state) - STATES.indexOf(a.state));
  for (const g of order) {
    const [x, y] = project(g.location.lat, g.location.lon, zoom);
    const marker = el("svg:g", {class: `gw state-${g.state}`, "data-gateway": g.id, "data-state": g.state,
                                onclick: () => { window.location.hash = `#/gateway/${encodeURIComponent(g.id)}`; }},
      el("svg:title", {text: `${g.id}: ${STATE_TEXT[g.state]}`}),
      el("svg:circle", {cx: x - ox, cy: y - oy, r: 9, class: `state-${g.state}`}),
      el("svg:text", {x: x - ox + 12, y: y - oy + 4, text: g.id}));
    svg.append(marker);
  }
}

// -- the fleet table ------------------------------------------------------------------------------------------

function sortValue(g, key) {
  if (key === "state") return STATES.indexOf(g.state);
  if (key === "errors") return g.failing_devices.length;
  return g[key];
}

function drawTable(gateways) {
  const rows = [...gateways].sort((a, b) => {
    const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
    const missing = (x === null || x === undefined) - (y === null || y === undefined);
    if (missing) return missing;  // unknown values last, whatever the direction
    const order = x < y ? -1 : x > y ? 1 : a.id.localeCompare(b.id);
    return sortDesc ? -order : order;
  });
  const body = document.querySelector("#fleet-table tbody");
  body.replaceChildren(...rows.map(g => el("tr", {"data-gateway": g.id},
    el("td", {}, gatewayLink(g.id)),
    el("td", {}, badge(g.state)),
    el("td", {title: when(g.last_seen_ns), text: ago(g.last_seen_ns)}),
    el("td", {class: "num", text: value(g.backlog_messages)}),
    el("td", {class: "num", text: duration(g.backlog_age_s)}),
    el("td", {class: "num", title: g.failing_devices.join(", "), text: String(g.failing_devices.length)}),
    el("td", {class: "num", text: g.config_version === null ? "" : value(g.config_version)}))));
  for (const th of document.querySelectorAll("#fleet-table th")) {
    th.classList.toggle("sorted-asc", th.dataset.key === sortKey && !sortDesc);
    th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDesc);
  }
}

function drawSummary(summary) {
  const box = document.getElementById("summary");
  box.replaceChildren(...STATES.filter(s => summary[s]).map(s =>
    el("span", {}, el("span", {class: `dot state-${s}`}), ` ${summary[s]} ${STATE_TEXT[s]}`)));
}

async function loadRejections() {
  const doc = await api("/api/rejections");
  const rows = [...Object.entries(doc.rejected).map(([r, n]) => [r, n, "messages"]),
                ...Object.entries(doc.declined).map(([r, n]) => [r, n, "readings"])].sort((a, b) => b[1] - a[1]);
  document.querySelector("#rejections-table tbody").replaceChildren(...(rows.length ? rows.map(([reason, n, what]) =>
    el("tr", {"data-reason": reason}, el("td", {text: reason}), el("td", {class: "num", text: `${n} ${what}`})))
    : [el("tr", {}, el("td", {colspan: 2, class: "note", text: "none"}))]));
  document.querySelector("#quarantine-table tbody").replaceChildren(...(doc.quarantine.length ? doc.quarantine.map(q =>
    el("tr", {"data-reason": q.reason},
      el("td", {text: q.reason}), el("td", {}, gatewayLink(q.gateway)), el("td", {class: "num", text: String(q.entries)}),
      el("td", {title: when(q.newest_ns), text: ago(q.newest_ns)}), el("td", {text: q.detail})))
    : [el("tr", {}, el("td", {colspan: 5, class: "note", text: doc.quarantine_enabled ? "empty" : "not kept ([quarantine] max_entries = 0)"}))]));
}

async function loadFleet() {
  fleet = await api("/api/fleet");
  drawSummary(fleet.summary);
  drawMap(fleet.gateways, fleet.settings);
  drawTable(fleet.gateways);
  await loadRejections();
  document.getElementById("updated").textContent = `updated ${when(fleet.generated_ns)}`;
}

// -- a gateway's page -----------------------------------------------------------------------------------------

function chart(points, unit) {
  const W = 600, H = 220, L = 56, B = 22, T = 8, R = 8;
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img"});
  if (!points.length) return svg;
  const t0 = Date.now() - 3600e3, t1 = Date.now();
  let lo = Math.min(...points.map(p => p[1])), hi = Math.max(...points.map(p => p[1]));
  if (lo === hi) { lo -= 1; hi += 1; }
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  svg.append(el("svg:line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}),
             el("svg:line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}),
             el("svg:text", {x: L - 4, y: T + 10, "text-anchor": "end", text: value(hi)}),
             el("svg:text", {x: L - 4, y: H - B, "text-anchor": "end", text: value(lo)}),
             el("svg:text", {x: L, y: H - 6, text: "-60 min"}),
             el("svg:text", {x: W - R, y: H - 6, "text-anchor": "end", text: `now${unit ? " (" + unit + ")" : ""}`}),
             el("svg:polyline", {points: points.map(p => `${x(p[0] / 1e6).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}));
  if (points.length <= 90) {  // a few points: each one visible (a single one draws no line)
    for (const p of points) svg.append(el("svg:circle", {cx: x(p[0] / 1e6).toFixed(1), cy: y(p[1]).toFixed(1), r: 2.5}));
  }
  return svg;
}

function deviceCard(device) {
  const card = el("div", {class: "panel", "data-device": device.id});
  card.append(el("h2", {}, `${device.id} `, device.failing ? badge("errors") : null));
  const measurements = Object.entries(device.measurements);
  if (!measurements.length) {
    card.append(el("p", {class: "note", text: "No readings in the last hour" + (device.last_error ? `: ${device.last_error}` : ".")}));
    return card;
  }
  for (const [measurement, block] of measurements) {
    const rows = Object.entries(block.fields).map(([field, v]) => el("tr", {"data-field": field},
      el("td", {text: field}), el("td", {class: "num", "data-value": String(v), text: value(v)}),
      el("td", {class: "unit", text: block.units[field] || ""})));
    const table = el("table", {class: "values", "data-measurement": measurement},
      el("thead", {}, el("tr", {}, el("th", {text: `${measurement}${block.model ? " · " + block.model : ""}`}),
                          el("th", {title: when(block.time_ns), text: ago(block.time_ns)}), el("th", {text: "unit"}))),
      el("tbody", {}, ...rows));
    const fields = Object.keys(block.series);
    const preferred = ["power_total", "power", "temperature", "voltage_l1", "energy_import"].find(f => fields.includes(f));
    const select = el("select", {"aria-label": "field"}, ...fields.map(f => el("option", {value: f, text: f})));
    if (preferred) select.value = preferred;
    const holder = el("div", {class: "chart"});
    const redraw = () => holder.replaceChildren(chart(block.series[select.value] || [], block.units[select.value] || ""));
    select.addEventListener("change", redraw);
    redraw();
    card.append(el("div", {class: "device"}, table,
      el("div", {}, el("h3", {}, "last hour, per-minute mean: ", select), holder)));
  }
  return card;
}

async function loadGateway(id) {
  const doc = await api(`/api/gateway?id=${encodeURIComponent(id)}`);
  document.getElementById("gateway-title").replaceChildren(`${id} `, badge(doc.state));
  const h = doc.health || {};
  const facts = [
    ["last heartbeat", h.time ? `${ago(h.time)} (${when(h.time)})` : "none"],
    ["backlog", h.backlog_messages === undefined ? "" : `${value(h.backlog_messages)} messages, ${value(h.backlog_readings)} readings`],
    ["oldest unacknowledged", duration(h.backlog_age_s)],
    ["readings dropped", value(h.dropped_readings)],
    ["messages re-sent", value(h.resent_messages)],
    ["agent running since", h.since_ns ? when(h.since_ns) : ""],
    ["agent version", doc.version || ""],
    ["configuration version", doc.config_version === null || doc.config_version === undefined ? "" : value(doc.config_version)],
    ["location", doc.location ? `${doc.location.lat.toFixed(5)}, ${doc.location.lon.toFixed(5)} (${doc.location.source})` : "unknown"],
  ];
  document.getElementById("gateway-facts").replaceChildren(...facts.map(([k, v]) =>
    el("div", {}, el("dt", {text: k}), el("dd", {text: v || "–"}))));
  document.querySelector("#devices-table tbody").replaceChildren(...doc.devices.map(d => el("tr", {"data-device": d.id},
    el("td", {text: d.id}), el("td", {}, badge(d.failing ? "errors" : "online")),
    el("td", {class: "num", text: value(d.polls)}), el("td", {class: "num", text: value(d.errors)}),
    el("td", {text: d.last_error}))));
  document.getElementById("device-cards").replaceChildren(...doc.devices.map(deviceCard));
  document.getElementById("updated").textContent = `updated ${when(doc.generated_ns)}`;
}

// -- routing --------------------------------------------------------------------------------------------------

async function route() {
  clearTimeout(timer);
  const match = window.location.hash.match(/^#\/gateway\/(.+)$/);
  document.getElementById("fleet-view").hidden = Boolean(match);
  document.getElementById("gateway-view").hidden = !match;
  try {
    if (match) await loadGateway(decodeURIComponent(match[1]));
    else await loadFleet();
    showError(null);
    document.body.dataset.loaded = match ? "gateway" : "fleet";
  } catch (error) {
    showError(error);
  }
  timer = setTimeout(route, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const th of document.querySelectorAll("#fleet-table th")) {
    th.addEventListener("click", () => {
      sortDesc = sortKey === th.dataset.key ? !sortDesc : false;
      sortKey = th.dataset.key;
      if (fleet) drawTable(fleet.gateways);
    });
  }
  window.addEventListener("hashchange", route);
  route();
});

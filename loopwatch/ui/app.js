// loopwatch's live page. Plain JS, no dependency, no build step. Every URL is relative to the
// page, so it works at the side port's "/" and at "<metrics mount>/ui". Every name that comes
// from the app (route templates, paths, function names) goes into the DOM as text only
// (textContent, createElementNS): never through innerHTML.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// A name from the app, on one line: cut with an ellipsis by the stylesheet when too long, the
// whole of it in its title (the server sends names escaped and at most 200 characters long).
function named(tag, text, cls) {
  return el(tag, { class: "cut" + (cls ? " " + cls : ""), text, title: text });
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function titled(node, text) {
  node.append(svg("title", {}, text));
  return node;
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

function where(culprit) {
  // "path:line in function" -> "function (path:line)"
  if (!culprit) return "";
  const i = culprit.lastIndexOf(" in ");
  return i < 0 ? culprit : culprit.slice(i + 4) + " (" + culprit.slice(0, i) + ")";
}

function routeLabel(method, route) {
  if (!route) return "a request not routed yet";
  return method && method !== "-" ? method + " " + route : route;
}

// ---- polling ---------------------------------------------------------------------------

const health = { lastOk: performance.now(), failing: false };

function poll(url, everyMs, onData, parse) {
  let busy = false;
  const run = async () => {
    if (busy) return; // one request at a time: a frozen server gets no pile-up
    busy = true;
    try {
      const response = await fetch(typeof url === "function" ? url() : url, { cache: "no-store" });
      if (!response.ok) throw new Error(response.status + " " + response.statusText);
      const data = parse === "text" ? await response.text() : await response.json();
      health.lastOk = performance.now();
      health.failing = false;
      onData(data);
    } catch (err) {
      health.failing = true;
    } finally {
      busy = false;
    }
  };
  run();
  return setInterval(run, everyMs);
}

// ---- state -------------------------------------------------------------------------------

let state = null;
let stateAt = 0;

function onState(data) {
  state = data;
  stateAt = performance.now();
  const note = $("where");
  if (!data.side_port && note.hidden) {
    note.hidden = false;
    note.textContent =
      "This page is served by the app's own event loop, so it cannot update while the loop " +
      "is frozen: it shows a freeze only once it is over. The side port (metrics_port=, or " +
      "LOOPWATCH_METRICS_PORT) serves the same page at / from its own thread, live during a freeze.";
  }
  if (data.stalls_seen !== stallsSeen[0] || data.last_stall !== stallsSeen[1]) {
    stallsSeen = [data.stalls_seen, data.last_stall];
    refreshStalls();
  }
  if (data.profile && !profileStarted) startProfile();
  if (!data.profile) $("profile-note").textContent = data.code === false
    ? "This mount serves no code locations (app_endpoints='summary'): no loop profile, " +
      "culprits or stacks. The side port serves them."
    : "This version of loopwatch does not serve the loop profile (/profile) yet.";
  drawState();
}

function drawState() {
  const box = $("state"), word = $("state-word"), detail = $("state-detail");
  const silent = (performance.now() - health.lastOk) / 1000;
  if (state === null || silent > 2) {
    box.className = "state stale";
    word.textContent = state === null ? "CONNECTING" : "NOT ANSWERING";
    detail.replaceChildren(
      state === null
        ? "waiting for the first answer"
        : "for " + silent.toFixed(0) + " s" +
          (state.side_port
            ? ": the process is stuck (a C call holding the GIL, SIGSTOP) or gone"
            : ": the app's event loop is probably frozen (this page is served by it; the side port is live)")
    );
    return;
  }
  const facts = [];
  facts.push(state.loops + (state.loops === 1 ? " event loop" : " event loops") + " watched");
  if (state.threshold !== null) facts.push("threshold " + seconds(state.threshold));
  facts.push(state.in_flight + " request(s) in flight");
  if (state.multiprocess) facts.push(state.workers + (state.workers === 1 ? " worker" : " workers"));
  facts.push((state.multiprocess ? "served by pid " : "pid ") + state.pid);
  facts.push(state.side_port ? "side port: live during a freeze" : "served by the app's loop");
  $("state-facts").textContent = facts.join(" · ");
  const b = state.blocked;
  if (b) {
    const age = b.seconds + (performance.now() - stateAt) / 1000;
    box.className = "state blocked";
    word.textContent = "BLOCKED";
    const parts = ["for " + age.toFixed(1) + " s by ", named("code", routeLabel(b.method, b.route))];
    if (b.culprit) parts.push(" at ", named("code", where(b.culprit)));
    if (state.workers > 1) parts.push(" in pid " + b.pid);
    detail.replaceChildren(...parts);
  } else if (state.loops === 0) {
    box.className = "state waiting";
    word.textContent = "NO LOOP";
    detail.replaceChildren("no event loop is watched yet: the middleware starts with the app's first request or lifespan");
  } else {
    box.className = "state ok";
    word.textContent = "RESPONSIVE";
    detail.replaceChildren(
      state.loops === 1 ? "the event loop answers its heartbeat" : "every event loop answers its heartbeat");
  }
  drawLoops();
}

function drawLoops() {
  // one row per loop (every worker's in multiprocess mode); the ages tick between polls
  const since = (performance.now() - stateAt) / 1000;
  const rows = (state.event_loops || []).map((r) => {
    const b = r.blocked;
    const pid = String(r.pid) + (r.pid === state.pid && state.workers > 1 ? " (serves this page)" : "");
    let word = b ? "BLOCKED" : "RESPONSIVE";
    if (r.age > 2) word += " (as of " + r.age.toFixed(0) + " s ago)";
    const tr = el("tr", { class: b ? "blocked" : "ok", "data-pid": String(r.pid) },
      el("td", { class: "num", text: pid }),
      el("td", { class: "word", text: word }),
      el("td", { class: "num", text: b ? (b.seconds + since).toFixed(1) + " s" : "" }),
      el("td", { class: "route", text: b ? routeLabel(b.method, b.route) : "" }),
      el("td", { class: "culprit", text: b ? where(b.culprit) : "" }),
      el("td", { class: "num", text: String(r.in_flight) }),
    );
    return tr;
  });
  $("loops").tBodies[0].replaceChildren(...rows);
}

// ---- timeline ----------------------------------------------------------------------------

const points = [];
const stallMarks = new Map();
let lastPoint = 0;
let serverOffset = 0; // server wall clock minus browser wall clock, seconds

function onTimeline(data) {
  serverOffset = data.time - Date.now() / 1000;
  for (const p of data.points) if (p[0] > lastPoint) points.push(p);
  if (points.length) lastPoint = points[points.length - 1][0];
  const keep = data.time - data.keep;
  while (points.length && points[0][0] < keep) points.shift();
  for (const s of data.stalls) stallMarks.set(s.started_at + "|" + s.method + "|" + s.route, s);
  for (const [k, s] of stallMarks) if (s.started_at + s.duration < keep) stallMarks.delete(k);
  drawTimeline();
}

function drawTimeline() {
  const chart = $("timeline");
  const W = chart.clientWidth || 900, H = 190;
  const L = 52, R = 44, T = 8, B = 22;
  const pw = W - L - R, ph = H - T - B;
  const span = Number($("span").value);
  const now = Date.now() / 1000 + serverOffset;
  const x = (t) => L + ((t - (now - span)) / span) * pw;
  const lagY = (v) => T + ph - (Math.min(4, Math.max(0, Math.log10(Math.max(v, 1e-3)) + 3)) / 4) * ph;
  const utilY = (u) => T + ph - u * ph;
  const parts = [];
  for (const [v, label] of [[1e-3, "1 ms"], [1e-2, "10 ms"], [0.1, "100 ms"], [1, "1 s"], [10, "10 s"]]) {
    parts.push(svg("line", { class: "grid", x1: L, x2: L + pw, y1: lagY(v), y2: lagY(v) }));
    parts.push(svg("text", { x: L - 6, y: lagY(v) + 4, "text-anchor": "end" }, label));
  }
  for (const u of [0, 0.5, 1]) {
    parts.push(svg("text", { x: L + pw + 6, y: utilY(u) + 4 }, Math.round(u * 100) + "%"));
  }
  const step = span <= 60 ? 10 : 60;
  for (let ago = 0; ago <= span; ago += step) {
    const label = ago === 0 ? "now" : "-" + (step === 60 ? ago / 60 + " min" : ago + " s");
    parts.push(svg("text", { x: x(now - ago), y: H - 6, "text-anchor": "middle" }, label));
  }
  if (state && state.threshold) {
    const y = lagY(state.threshold);
    parts.push(titled(svg("line", { class: "threshold", x1: L, x2: L + pw, y1: y, y2: y }),
      "stall threshold " + seconds(state.threshold)));
  }
  const shown = points.filter((p) => p[0] >= now - span - 1);
  const util = shown.filter((p) => p[3] !== null);
  if (util.length > 1) {
    let d = "M" + x(util[0][0]).toFixed(1) + "," + utilY(0);
    for (const p of util) d += "L" + x(p[0]).toFixed(1) + "," + utilY(p[3]).toFixed(1);
    d += "L" + x(util[util.length - 1][0]).toFixed(1) + "," + utilY(0) + "Z";
    parts.push(svg("path", { class: "util-area", d }));
  }
  if (shown.length > 1) {
    const line = (i) => "M" + shown.map((p) => x(p[0]).toFixed(1) + "," + lagY(p[i]).toFixed(1)).join("L");
    parts.push(svg("path", { class: "peak-line", d: line(2) }));
    parts.push(svg("path", { class: "lag-line", d: line(1) }));
  }
  const mark = (t0, dur, cls, text) => {
    const x0 = Math.max(L, x(t0)), x1 = Math.min(L + pw, x(t0 + dur));
    if (x1 < L || x0 > L + pw) return;
    parts.push(titled(svg("rect", { class: cls, x: x0, y: T, width: Math.max(2, x1 - x0), height: ph }), text));
  };
  for (const s of stallMarks.values()) {
    mark(s.started_at, s.duration, "stall-mark",
      "stall " + seconds(s.duration) + " (" + s.kind + ") by " + routeLabel(s.method, s.route) +
      (s.culprit ? "\nat " + where(s.culprit) : ""));
  }
  if (state && state.blocked) {
    const age = state.blocked.seconds + (performance.now() - stateAt) / 1000;
    mark(now - age, age, "stall-mark live",
      "stall in progress, " + seconds(age) + " so far, by " +
      routeLabel(state.blocked.method, state.blocked.route) +
      (state.blocked.culprit ? "\nat " + where(state.blocked.culprit) : ""));
  }
  chart.replaceChildren(...parts);
}

// ---- routes ------------------------------------------------------------------------------

let routeRows = [];
const sorting = { key: "blocked_seconds", dir: -1 };

function kindOf(kinds) {
  const names = Object.keys(kinds || {}).sort((a, b) => kinds[b] - kinds[a]);
  return names.join(" + ");
}

function sortValue(row, key) {
  if (key === "route") return routeLabel(row.method, row.route);
  if (key === "kind") return kindOf(row.kinds);
  if (key === "culprit") return row.culprit || "";
  return row[key] === null || row[key] === undefined ? -1 : row[key];
}

function onRoutes(data) {
  routeRows = data.routes;
  drawRoutes();
}

function drawRoutes() {
  const rows = routeRows.slice();
  const { key, dir } = sorting;
  rows.sort((a, b) => {
    const va = sortValue(a, key), vb = sortValue(b, key);
    const c = typeof va === "string" ? va.localeCompare(vb) : va - vb;
    return c * dir || routeLabel(a.method, a.route).localeCompare(routeLabel(b.method, b.route));
  });
  const maxShare = Math.max(0, ...rows.map((r) => r.loop_share || 0));
  const body = rows.map((r) => {
    const share = el("td", { class: "num" });
    if (r.loop_share !== null) {
      const bar = el("span", { class: "share" });
      bar.style.width = (maxShare > 0 ? Math.round((r.loop_share / maxShare) * 60) : 0) + "px";
      share.append(bar, (r.loop_share * 100).toFixed(1) + "%");
    }
    const kind = kindOf(r.kinds);
    const tr = el("tr", { class: r.blocking_now !== null ? "blocking" : "" },
      el("td", { class: "route" }, named("span", routeLabel(r.method, r.route))),
      el("td", { class: "num", text: String(r.requests) }),
      el("td", { class: "num", text: String(r.stalls) }),
      el("td", { class: "num", text: r.blocked_seconds ? r.blocked_seconds.toFixed(2) : "0" }),
      share,
      el("td", { class: "num", text: seconds(r.worst) }),
      el("td", { class: kind ? "kind-" + kind.split(" ")[0] : "", text: kind }),
      el("td", { class: "culprit", text: where(r.culprit) }),
    );
    return tr;
  });
  $("routes").tBodies[0].replaceChildren(...body);
  $("routes-empty").hidden = rows.length > 0;
  for (const th of $("routes").tHead.rows[0].cells) {
    if (th.dataset.key === key) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

function setupSorting() {
  for (const th of $("routes").tHead.rows[0].cells) {
    th.addEventListener("click", () => {
      if (sorting.key === th.dataset.key) sorting.dir = -sorting.dir;
      else {
        sorting.key = th.dataset.key;
        sorting.dir = th.dataset.type === "text" ? 1 : -1; // names A-Z, figures biggest first
      }
      drawRoutes();
    });
  }
}

// ---- recent stalls -----------------------------------------------------------------------

let stallsSeen = [null, null];
const openStalls = new Set();
let stallsShown = 10;
let lastStalls = [];

async function refreshStalls() {
  try {
    const response = await fetch("ui/stalls.json", { cache: "no-store" });
    if (!response.ok) return;
    drawStalls((await response.json()).stalls);
  } catch (err) {
    // the next state poll retries
  }
}

async function loadStack(s, pre) {
  if (state && state.code === false) {
    pre.textContent = "(stacks are not served on this mount; the side port serves them)";
    return;
  }
  try {
    const response = await fetch("ui/stalls.json?stack=" + s.started_at, { cache: "no-store" });
    const found = response.ok ? (await response.json()).stalls : [];
    pre.textContent = found.length ? found[0].stack || "(no stack sampled)" : "(no longer in the ring of recent stalls)";
  } catch (err) {
    pre.textContent = "(not answering)";
  }
}

function drawStalls(stalls) {
  lastStalls = stalls;
  for (const s of stalls) stallMarks.set(s.started_at + "|" + s.method + "|" + s.route, s);
  const items = stalls.slice(0, stallsShown).map((s) => {
    const id = s.started_at + "|" + s.method + "|" + s.route;
    const when = new Date(s.started_at * 1000).toLocaleTimeString();
    const summary = el("summary", {},
      el("span", { class: "dur", text: seconds(s.duration) }), " ",
      named("code", routeLabel(s.method, s.route)),
      " (" + s.kind + ")", ...(s.culprit ? [" at ", named("code", where(s.culprit))] : []),
      (s.gc_seconds >= 0.001
        ? " · garbage collection " + seconds(s.gc_seconds) + " (generation " + s.gc_generation + ")"
        : ""),
      " · " + when + " · " + s.requests_in_flight + " request(s) held up",
    );
    const pre = el("pre", { text: "loading the stack\u2026" });
    const details = el("details", {}, summary, pre);
    details.open = openStalls.has(id);
    if (details.open) loadStack(s, pre);
    details.addEventListener("toggle", () => {
      if (details.open) { openStalls.add(id); loadStack(s, pre); } else openStalls.delete(id);
    });
    return el("li", {}, details);
  });
  if (stalls.length > stallsShown) {
    const more = el("button", { type: "button", id: "stalls-more", text: "show " + (stalls.length - stallsShown) + " more" });
    more.addEventListener("click", () => { stallsShown = stalls.length; drawStalls(lastStalls); });
    items.push(el("li", {}, more));
  }
  $("stalls").replaceChildren(...items);
  $("stalls-empty").hidden = items.length > 0;
}

// ---- flame graph ---------------------------------------------------------------------------

let profileStarted = false;
let stacks = [];
let zoomPath = [];

function parseCollapsed(text) {
  const out = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    const i = line.lastIndexOf(" ");
    if (i <= 0) continue;
    const count = Number(line.slice(i + 1));
    if (!(count > 0)) continue;
    out.push({ frames: line.slice(0, i).split(";"), count });
  }
  return out;
}

function buildTree(entries, route) {
  const root = { name: route || "all routes", value: 0, children: new Map(), depth: 0 };
  for (const { frames, count } of entries) {
    if (route && frames[0] !== route) continue;
    root.value += count;
    let node = root;
    for (const name of route ? frames.slice(1) : frames) {
      let child = node.children.get(name);
      if (!child) {
        child = { name, value: 0, children: new Map(), depth: node.depth + 1, parent: node };
        node.children.set(name, child);
      }
      child.value += count;
      node = child;
    }
  }
  return root;
}

function hue(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return h;
}

function frameColor(node) {
  if (node.depth === 0) return "#b9c4cf";
  if (node.name.startsWith("<")) return "#c9c9c9";
  const h = hue(node.name);
  return "hsl(" + (10 + (h % 45)) + ",85%," + (55 + ((h >> 8) % 15)) + "%)";
}

function onProfile(text) {
  stacks = parseCollapsed(text);
  const select = $("profile-route");
  const routes = [...new Set(stacks.map((s) => s.frames[0]))].sort();
  const chosen = select.value;
  const options = [el("option", { value: "", text: "all routes" })];
  for (const r of routes) {
    const option = el("option", { text: r });
    option.value = r;
    options.push(option);
  }
  select.replaceChildren(...options);
  select.value = routes.includes(chosen) ? chosen : "";
  drawFlame();
}

function drawFlame() {
  const chart = $("flame");
  const root = buildTree(stacks, $("profile-route").value);
  if (root.value === 0) {
    chart.setAttribute("height", 24);
    chart.replaceChildren(svg("text", { x: 4, y: 16 }, "No loop time sampled in this window yet."));
    return;
  }
  let zoom = root;
  for (const name of zoomPath) {
    const next = zoom.children.get(name);
    if (!next) break;
    zoom = next;
  }
  const W = chart.clientWidth || 900, rowH = 17;
  const search = $("profile-search").value.trim().toLowerCase();
  const laid = [];
  let maxDepth = 0;
  // the zoomed frame's ancestors span the whole width; its subtree scales to it
  for (let a = zoom; a; a = a.parent) laid.push([a, 0, W]);
  const walk = (node, x0, width) => {
    let x = x0;
    const kids = [...node.children.values()].sort((a, b) => a.name.localeCompare(b.name));
    for (const child of kids) {
      const w = (child.value / node.value) * width;
      if (w >= 0.5) {
        laid.push([child, x, w]);
        maxDepth = Math.max(maxDepth, child.depth);
        walk(child, x, w);
      }
      x += w;
    }
  };
  walk(zoom, 0, W);
  maxDepth = Math.max(maxDepth, zoom.depth);
  const H = (maxDepth + 1) * rowH + 2;
  chart.setAttribute("height", H);
  const nodes = laid.map(([node, x, w]) => {
    const y = H - (node.depth + 1) * rowH;
    const g = svg("g", { class: "frame" });
    if (search) g.classList.add(node.name.toLowerCase().includes(search) ? "match" : "dim");
    const pct = ((node.value / root.value) * 100).toFixed(1);
    g.append(svg("rect", { x: x.toFixed(1), y, width: Math.max(0.5, w - 0.5).toFixed(1), height: rowH - 1, fill: frameColor(node) }));
    const fits = Math.floor((w - 6) / 6.7);
    if (fits >= 3) {
      const label = node.name.length <= fits ? node.name : node.name.slice(0, fits - 1) + "\u2026";
      g.append(svg("text", { x: (x + 3).toFixed(1), y: y + rowH - 5 }, label));
    }
    titled(g, node.name + "\n" + node.value + " ms of loop time, " + pct + "%");
    g.addEventListener("click", () => {
      const path = [];
      for (let a = node; a.parent; a = a.parent) path.unshift(a.name);
      zoomPath = path;
      drawFlame();
    });
    return g;
  });
  chart.replaceChildren(...nodes);
}

function profileUrl() {
  return "profile?seconds=" + encodeURIComponent($("profile-seconds").value);
}

function startProfile() {
  profileStarted = true;
  poll(profileUrl, 5000, onProfile, "text");
}

function setupProfileControls() {
  const refetch = async () => {
    if (!profileStarted) return;
    try {
      const response = await fetch(profileUrl(), { cache: "no-store" });
      if (response.ok) onProfile(await response.text());
    } catch (err) {
      // the next poll retries
    }
  };
  const redraw = () => { zoomPath = []; drawFlame(); };
  $("profile-seconds").addEventListener("change", refetch);
  $("profile-route").addEventListener("change", redraw);
  $("profile-search").addEventListener("input", drawFlame);
  $("profile-reset").addEventListener("click", redraw);
}

// ---- start -------------------------------------------------------------------------------

function start() {
  setupSorting();
  setupProfileControls();
  $("span").addEventListener("change", drawTimeline);
  poll("ui/state.json", 400, onState);
  poll(() => "ui/timeline.json?since=" + lastPoint, 1000, onTimeline);
  poll("ui/routes.json", 1000, onRoutes);
  // the blocked counter and the staleness check tick between polls
  setInterval(() => { drawState(); if (state && state.blocked) drawTimeline(); }, 200);
  window.addEventListener("resize", () => { drawTimeline(); if (stacks.length) drawFlame(); });
}

start();

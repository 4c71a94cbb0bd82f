// colo view: the page. Plain JavaScript and SVG, no library. It reads the event stream of the running pair
// (Server-Sent Events from /events: the same events `--trace-file` records, docs/decisions.md "One event stream")
// and draws from them alone: the page holds every event of the run, so any epoch can be drawn again later.
"use strict";

const LIFELINES = ["client", "gateway", "primary", "secondary"];
// Lifelines: the secondary's phase labels go to its right, before the times at the right edge; the primary's to its
// left (the primary-secondary gap is the checkpoint messages' own).
const LANE_X = { client: 62, gateway: 235, primary: 480, secondary: 725 };
const WIDTH = 920, CHAR = 6.6, PHASE_CHAR = 5.5;  // the diagram's width; a monospace character at 11 px, 9 px
const ROW = 22, TOP = 58, MAX_ARROWS = 22;
const COLORS = { dirty: "#f59e0b", inflight: "#2563eb", sent: "#93c5fd", staged: "#a855f7", applied: "#16a34a",
                 own: "#dc2626", copied: "#0d9488" };
const TRIGGER_COLORS = { timer: "#2563eb", mismatch: "#dc2626", timeout: "#f59e0b", manual: "#7c3aed" };
const FADE = 6.0;  // seconds a lit page takes to fade to its pale tint
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";

const page = {
  run: 0, events: [], sends: new Map(), status: {}, state: {},
  checkpoints: [], outputs: new Map(), compare: new Map(), failover: [], failoverAt: 0, served: false,
  waiting: new Map(), live: true, replay: null, clientOut: new Map(),
};

// -- a scene: what the diagram and the grids show (live, or an epoch being replayed) -------------------------------
function newScene() {
  return { arrows: [], phases: [], proto: { primary: "", secondary: "" }, node: {}, busy: null, released: null,
           highlight: null,
           pages: { primary: new Map(), secondary: new Map() }, npages: 0, now: 0, epochPages: new Map() };
}
let scene = newScene();

function lane(role) {
  if (role === "spare") return "secondary";
  return LANE_X[role] !== undefined ? role : null;
}

function fieldsText(fields) {
  if (!fields) return "";
  return Object.entries(fields).map(([k, v]) => {
    if (v && typeof v === "object" && "len" in v && "text" in v) {
      v = v.len <= 40 ? `"${v.text}"` : `<${v.len} B>`;
    } else if (v && typeof v === "object") {
      v = JSON.stringify(v);
      if (v.length > 40) v = v.slice(0, 37) + "...";
    }
    return `${k}=${v}`;
  }).join(" ");
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8) + "." + String(Math.floor((t % 1) * 1e6)).padStart(6, "0").slice(0, 3);
}

// Apply one event to a scene (the diagram, the grids, the protocol states): live and replay share this.
function applyToScene(sc, ev) {
  sc.now = ev.t;
  const k = ev.kind;
  if (k === "send" && ev.link !== "control" && ev.msg !== "step") {  // step: the view's own plumbing
    const from = lane(ev.role);
    const to = lane(ev.to);
    if (from && to && from !== to) {
      const r = sc.released;  // in step mode: the message the last Step let go
      const stepped = !!(r && r.node === ev.node && r.msg === ev.msg);
      if (stepped) sc.released = null;
      sc.arrows.push({ from, to, msg: ev.msg, t: ev.t, flow: ev.flow, epoch: ev.fields && ev.fields.epoch, stepped,
                       label: `${ev.msg} ${fieldsText(ev.fields)}`, cls: ev.link === "gateway" ? "gwlink" : "" });
    }
    if (ev.link === "replication" && ev.state) sc.proto[lane(ev.role)] = ev.state;
    const e = ev.fields && ev.fields.epoch;
    if (ev.msg === "vmstate-send") markEpoch(sc, "primary", e, "inflight", ev.t);
    if (ev.msg === "checkpoint-request") { sc.phases = sc.phases.filter((p) => p.epoch === e); sc.busy = null; }
  } else if (k === "recv" && ev.link !== "control") {
    const a = sc.arrows.find((x) => x.flow === ev.flow);
    const to = lane(ev.role);
    if (a && to && to !== a.from) a.to = to;  // the receiver's role now (a promoted node, a spare)
    if (ev.link === "replication" && ev.state) sc.proto[lane(ev.role)] = ev.state;
    const s = page.sends.get(ev.flow);
    const e = s && s.fields && s.fields.epoch;
    if (ev.msg === "vmstate-received") markEpoch(sc, "primary", e, "sent", ev.t);
  } else if (k === "client") {
    const d = ev.dir;
    if (d === "in" || d === "out" || d === "open" || d === "close") {
      const text = ev.data ? `"${ev.data.text}"` : "";
      const toClient = d === "out" || (d === "close" && ev.reason && ev.reason.startsWith("the guest"));
      sc.arrows.push({ from: toClient ? "gateway" : "client", to: toClient ? "client" : "gateway", t: ev.t,
                       msg: `client-${d}`, label: `conn ${ev.conn} ${d} ${text}${ev.seq ? " (output " + ev.seq + ")" : ""}`,
                       cls: "client" });
    }
  } else if (k === "phase") {
    sc.phases.push({ name: ev.phase, start: ev.start, end: ev.end, epoch: ev.epoch, side: ev.side });
  } else if (k === "checkpoint") {  // the primary's phases, exact: they replace the ones told as they ended
    sc.phases = sc.phases.filter((p) => p.side === "secondary" && p.epoch === ev.epoch).concat(
      ev.phases.map(([name, start, end]) => ({ name, start, end, epoch: ev.epoch, side: "primary" })));
  } else if (k === "pages") {
    sc.npages = ev.npages || sc.npages;
    const grid = ev.side === "primary" ? "primary" : "secondary";
    const what = ev.what === "dirty" ? "dirty" : ev.what;
    for (const [a, b] of ev.runs) for (let p = a; p <= b; p++) sc.pages[grid].set(p, { what, t: ev.t, epoch: ev.epoch });
    if (ev.side === "primary" && ev.what === "dirty") sc.epochPages.set(ev.epoch, ev.runs);
  } else if (k === "state") {
    sc.node[lane(ev.role) || ev.role] = ev.now;
  } else if (k === "gate" && ev.state === "released") {
    sc.released = { node: ev.node, msg: ev.msg };
  }
  if (sc.arrows.length > 200) sc.arrows.splice(0, sc.arrows.length - 200);
}

function markEpoch(sc, grid, epoch, what, t) {
  const runs = sc.epochPages.get(epoch);
  if (!runs) return;
  for (const [a, b] of runs) for (let p = a; p <= b; p++) sc.pages[grid].set(p, { what, t, epoch });
}

// -- the sequence diagram -------------------------------------------------------------------------------------------
function svg(tag, attrs, text) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawDiagram() {
  const root = $("seq");
  root.replaceChildren();
  const arrows = scene.arrows.slice(-MAX_ARROWS);
  const pending = page.live ? [...page.waiting.values()] : [];
  const rows = arrows.length + pending.length;
  const height = Math.max(560, TOP + 20 + (rows + 1) * ROW);
  root.setAttribute("height", height + 14);
  root.setAttribute("width", WIDTH);
  for (const role of LIFELINES) {
    const x = LANE_X[role];
    root.append(svg("line", { class: "life", x1: x, y1: TOP - 8, x2: x, y2: height - 6 }));
    const g = svg("g", { class: "head", id: `head-${role}` });
    g.append(svg("rect", { x: x - 62, y: 4, width: 124, height: 44, rx: 4 }));
    g.append(svg("text", { class: "role", x, y: 19, "text-anchor": "middle" }, role));
    const st = role === "primary" || role === "secondary"
      ? [scene.proto[role] || "", scene.node[role] || ""] : role === "gateway" ? [page.status.gateway
        ? page.status.gateway.service_state : "", ""] : ["", ""];
    g.append(svg("text", { class: "state", x, y: 32, "text-anchor": "middle", id: `proto-${role}` }, st[0]));
    const line = st[1] || "";  // what fits the 124 px box at 10 px; the whole of it on hover
    g.append(svg("text", { class: "state", x, y: 43, "text-anchor": "middle" },
                 line.length > 19 ? line.slice(0, 18) + "\u2026" : line));
    if (line.length > 19) g.append(svg("title", {}, line));
    root.append(g);
  }
  const t0 = arrows.length ? arrows[0].t : scene.now;
  const yOf = (t) => {  // a time on the rows' scale (rows are in order, not to scale)
    if (!arrows.length) return TOP + ROW;
    if (t <= arrows[0].t) return TOP + ROW * 0.5;
    for (let i = 1; i < arrows.length; i++) {
      if (t <= arrows[i].t) {
        const a = arrows[i - 1], b = arrows[i];
        const f = b.t > a.t ? (t - a.t) / (b.t - a.t) : 1;
        return TOP + ROW * (i + f);
      }
    }
    return TOP + ROW * (arrows.length + 0.5);
  };
  // the pause: each side's phases of the checkpoint, on its lifeline
  const labels = [];
  scene.phases.forEach((p, i) => {
    const px = LANE_X[p.side === "secondary" ? "secondary" : "primary"];
    const y1 = yOf(p.start), y2 = Math.max(yOf(p.end), y1 + 3);
    const g = svg("g", { class: "phase", "data-phase": p.name, "data-side": p.side || "primary" });
    g.append(svg("rect", { x: px - 6, y: y1, width: 12, height: y2 - y1, style: i % 2 ? "fill:#fcd34d" : "" }));
    if (y2 - y1 >= 11) {  // on a white ground: a message's label may run under it
      const text = `${p.name} ${((p.end - p.start) * 1e3).toFixed(2)} ms`, w = text.length * PHASE_CHAR + 4;
      const left = p.side !== "secondary", ym = (y1 + y2) / 2;
      const label = svg("g", { class: "phase" });  // drawn after the messages, so on top of their labels
      label.append(svg("rect", { class: "ground", x: left ? px - 9 - w : px + 7, y: ym - 6, width: w, height: 11 }));
      label.append(svg("text", { x: left ? px - 11 : px + 9, y: ym + 3, "text-anchor": left ? "end" : "start" }, text));
      labels.push(label);
    }
    g.append(svg("title", {}, `epoch ${p.epoch}: ${p.name} ${((p.end - p.start) * 1e3).toFixed(3)} ms`));
    root.append(g);
  });
  // The phases again in words, a side at a time, wrapped to the diagram's width (step mode's pauses are long).
  const ms = (p) => `${p.name} ${((p.end - p.start) * 1e3).toFixed(2)}`;
  const prim = scene.phases.filter((p) => p.side !== "secondary");
  const sec = scene.phases.filter((p) => p.side === "secondary");
  const notes = [];
  if (prim.length) {
    const total = prim[prim.length - 1].end - prim[0].start;
    notes.push(...wrapWords(`checkpoint ${prim[0].epoch} on the primary, ${(total * 1e3).toFixed(2)} ms in all:`,
                            prim.map(ms), " ms"));
  }
  if (sec.length) notes.push(...wrapWords("on the secondary:", sec.map(ms), " ms"));
  notes.forEach((line, i) => root.append(svg("text", { class: "note", x: 10, y: height - 10 + 16 * i }, line)));
  root.setAttribute("height", height + 14 + 16 * Math.max(0, notes.length - 1));
  // The highlighted message: the one the last Step let go (step mode), the newest (live), the one being replayed.
  let hi = arrows[arrows.length - 1];
  if (!page.live) hi = scene.highlight;
  else if ($("chk-step").checked) hi = [...arrows].reverse().find((a) => a.stepped) || null;
  arrows.forEach((a, i) => {
    const current = a === hi;
    drawArrow(root, a, TOP + ROW * (i + 1), current ? "current" : i < arrows.length - 6 ? "old" : "",
              i === 0 ? clock(a.t) : `+${((a.t - t0) * 1e3).toFixed(3)} ms`);
  });
  pending.forEach((w, j) => {
    const from = lane(w.role), to = lane(w.to);
    if (!from || !to) return;
    drawArrow(root, { from, to, msg: w.msg, label: `waiting: ${w.msg} ${fieldsText(w.fields)}`, cls: "" },
              TOP + ROW * (arrows.length + j + 1), "pending", "press Step");
  });
  root.append(...labels);
}

// "head item · item · item end" in lines of the diagram's width (11 px italic monospace: 7 px a character, to spare).
function wrapWords(head, items, end) {
  const room = Math.floor((WIDTH - 20) / 7), lines = [];
  let line = head;
  items.forEach((item, i) => {
    const piece = (i ? " · " : " ") + item + (i === items.length - 1 ? end : "");
    if (line.length + piece.length > room && line.length) {
      lines.push(line);
      line = "  " + piece.replace(/^( · | )/, "");
    } else {
      line += piece;
    }
  });
  lines.push(line);
  return lines;
}

function drawArrow(root, a, y, extra, when) {
  const x1 = LANE_X[a.from], x2 = LANE_X[a.to];
  const g = svg("g", { class: `arrow ${a.cls || ""} ${extra}`.trim(), "data-msg": a.msg, "data-t": a.t || "" });
  g.append(svg("line", { x1, y1: y, x2: x2 + (x2 > x1 ? -6 : 6), y2: y }));
  const dir = x2 > x1 ? 1 : -1;
  g.append(svg("path", { d: `M${x2},${y} l${-8 * dir},-4 l0,8 z`, fill: extra === "pending" ? "#b45309" : "#374151" }));
  const mid = (x1 + x2) / 2;
  const room = Math.max(8, Math.floor(Math.abs(x2 - x1) / CHAR) - 1);
  const label = a.label.length > room ? a.label.slice(0, room - 3) + "..." : a.label;
  g.append(svg("text", { x: mid, y: y - 4, "text-anchor": "middle" }, label));
  g.append(svg("text", { x: WIDTH - 4, y: y + 3, "text-anchor": "end", class: "when" }, when));
  g.append(svg("title", {}, `${a.label}\n${when}`));
  root.append(g);
}

// -- the RAM grids --------------------------------------------------------------------------------------------------
function gridGeometry(canvas) {
  const n = scene.npages || 4096;
  const cols = Math.ceil(Math.sqrt(n));
  const cell = Math.max(1, Math.floor(canvas.width / cols));
  return { n, cols, cell };
}

function drawGrid(name) {
  const canvas = $(`ram-${name}`);
  const ctx = canvas.getContext("2d");
  const { n, cols, cell } = gridGeometry(canvas);
  const rows = Math.ceil(n / cols);
  if (canvas.height !== rows * cell) canvas.height = rows * cell;
  ctx.fillStyle = "#e5e7eb";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const now = page.live ? eventNow() : scene.now;
  for (const [p, st] of scene.pages[name]) {
    const age = page.live ? now - st.t : Math.max(0, now - st.t) * 4;
    const alpha = Math.max(0.45, 1 - age / FADE);
    ctx.globalAlpha = alpha;
    ctx.fillStyle = COLORS[st.what] || "#6b7280";
    ctx.fillRect((p % cols) * cell, Math.floor(p / cols) * cell, Math.max(1, cell - (cell > 2 ? 1 : 0)),
                 Math.max(1, cell - (cell > 2 ? 1 : 0)));
  }
  ctx.globalAlpha = 1;
}

// "Now" on the events' clock (the pair's host stamps them; the browser may be elsewhere): the latest event's time
// plus what the browser's clock says has passed since it came.
let latest = { t: 0, at: 0 };
function eventNow() { return latest.t + (Date.now() / 1000 - latest.at); }

function hoverGrid(name, ev) {
  const canvas = $(`ram-${name}`);
  const { n, cols, cell } = gridGeometry(canvas);
  const r = canvas.getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) / cell), y = Math.floor((ev.clientY - r.top) / cell);
  const p = y * cols + x;
  const tip = $("tip");
  if (x < 0 || x >= cols || p < 0 || p >= n) { tip.hidden = true; return; }
  const lo = p * 4096, hi = lo + 4095;
  const st = scene.pages[name].get(p);
  tip.textContent = `${name} page ${p}: 0x${lo.toString(16).padStart(8, "0")}-0x${hi.toString(16).padStart(8, "0")}` +
    (st ? `, ${st.what} (epoch ${st.epoch})` : "");
  tip.style.left = `${ev.clientX + 12}px`;
  tip.style.top = `${ev.clientY + 12}px`;
  tip.hidden = false;
}

// -- panels ---------------------------------------------------------------------------------------------------------
function onOutput(ev) {
  if (ev.conn === undefined) return;
  const list = page.outputs.get(ev.conn) || [];
  const key = ev.seq !== undefined ? ev.seq : `c${page.events.length}`;
  let item = list.find((x) => x.key === key);
  if (!item) { item = { key, seq: ev.seq, text: ev.data ? ev.data.text : "" }; list.push(item); }
  item.state = ev.action;
  item.epoch = ev.epoch;
  item.t = ev.t;
  if (list.length > 12) list.splice(0, list.length - 12);
  page.outputs.set(ev.conn, list);
  drawOutputs();
}

function drawOutputs() {
  const box = $("outputs");
  box.replaceChildren();
  if (!page.outputs.size) { box.innerHTML = '<p class="empty">no output yet</p>'; return; }
  for (const [conn, list] of page.outputs) {
    const div = document.createElement("div");
    div.className = "conn";
    div.append(document.createTextNode(`connection ${conn}`));
    for (const o of list) {
      const s = document.createElement("span");
      s.className = `out ${o.state}`;
      s.dataset.seq = o.seq;
      const cover = o.state === "held" ? `waits for checkpoint ${o.epoch}` :
        o.state === "released" ? (o.epoch !== undefined && o.epoch !== null ? `released at commit ${o.epoch}` : "released") :
        "dropped";
      s.textContent = `${o.seq !== undefined ? "#" + o.seq : ""} "${o.text}" ${cover}`;
      div.append(s);
    }
    box.append(div);
  }
}

function onCompare(ev) {
  $("compare-box").hidden = false;
  page.compare.set(ev.conn, ev);
  const box = $("compare");
  box.replaceChildren();
  for (const [conn, c] of page.compare) {
    const div = document.createElement("div");
    div.className = "stream";
    if (c.released === null || c.released === undefined) {
      div.textContent = `connection ${conn}: finished`;
      box.append(div);
      continue;
    }
    const p = (c.primary && c.primary.text) || "", s = (c.secondary && c.secondary.text) || "";
    div.innerHTML = "";
    const seen = (page.clientOut.get(conn) || "").slice(-32);  // the end of the released prefix
    const line = (name, text) => {
      const row = document.createElement("div");
      const rel = document.createElement("span");
      rel.className = "rel";
      rel.textContent = `${name.padEnd(9)} ${c.released} B released ...${seen}`;
      row.append(rel, document.createTextNode(" | "));
      if (c.diverged && text.length) {
        const d = document.createElement("span");
        d.className = "diff";
        d.textContent = text[0];
        row.append(d, document.createTextNode(text.slice(1)));
      } else row.append(document.createTextNode(text || "(nothing held)"));
      return row;
    };
    div.append(document.createTextNode(`connection ${conn}` + (c.diverged ? `: differ at byte ${c.differs_at}` :
                                                                ": equal so far")));
    div.append(line("primary", p), line("secondary", s));
    box.append(div);
  }
}

// Witness decisions the failover panel lists; the first of FAILURES opens a failover, the rest follow it.
const FAILURES = new Set(["silent", "lost", "promote", "unprotected", "failover-request", "down"]);
const FAILOVER_EVENTS = { silent: "heartbeat timeout: silent", lost: "lost", fenced: "fenced", promote: "promote",
  promoted: "promoted", takeover: "released / dropped / replayed", protect: "re-protection: copy to",
  protected: "protected again", unprotected: "unprotected", down: "service down", "failover-request": "failover asked" };

function onFailoverStep(ev, text, level, opens) {
  const open = page.failover.length && ev.t - page.failoverAt < 30;
  if (!open && !opens) return;  // the first protection, or a copy long after: not part of a failover
  if (!open) page.failover = [];
  if (!page.failover.length) page.failoverAt = ev.t;
  page.failover.push({ t: ev.t, text, level });
  const ol = $("failover");
  ol.replaceChildren();
  for (const s of page.failover) {
    const li = document.createElement("li");
    li.className = s.level || "";
    const dt = document.createElement("span");
    dt.className = "dt";
    dt.textContent = `+${((s.t - page.failoverAt) * 1e3).toFixed(1)} ms`;
    li.append(dt, document.createTextNode(s.text));
    ol.append(li);
  }
  ol.scrollTop = ol.scrollHeight;
}

function witnessText(ev) {
  const skip = new Set(["t", "role", "node", "pid", "kind", "event", "level", "i", "t_local"]);
  const rest = Object.entries(ev).filter(([k]) => !skip.has(k)).map(([k, v]) =>
    `${k}=${Array.isArray(v) ? "[" + v.join(",") + "]" : typeof v === "object" && v ? JSON.stringify(v) : v}`);
  return `${FAILOVER_EVENTS[ev.event] || ev.event}: ${rest.join(" ")}`;
}

function onCheckpoint(ev) {
  page.checkpoints.push(ev);
  drawTimeline();
  $("export-mermaid").href = `/api/export?format=mermaid&epoch=${ev.epoch}`;
}

function drawTimeline() {
  const root = $("timeline");
  root.replaceChildren();
  const w = 9, max = Math.floor((root.clientWidth || 1200) / w) - 2;
  const shown = page.checkpoints.slice(-max);
  // A bar's height is the checkpoint's pause (the guest stopped); its title also gives the whole checkpoint,
  // request to vmstate-loaded (pipelined, the guest runs for most of it), and when its output could go.
  const span = (c) => (c.end - c.start) * 1e3;
  const top = Math.max(1, ...shown.map((c) => c.pause_ms));
  shown.forEach((c, i) => {
    const h = Math.max(3, 70 * Math.log1p(c.pause_ms) / Math.log1p(top));
    const r = svg("rect", { class: "bar", x: 4 + i * w, y: 80 - h, width: w - 2, height: h,
                             fill: TRIGGER_COLORS[c.trigger] || "#6b7280", "data-epoch": c.epoch,
                             "data-trigger": c.trigger, "data-pause": c.pause_ms,
                             "data-span": span(c).toFixed(3) });
    if (page.replay && page.replay.epoch === c.epoch) r.classList.add("selected");
    r.append(svg("title", {}, `checkpoint ${c.epoch} (${c.trigger}, ${c.mode || "strict"}): ` +
                                `${span(c).toFixed(1)} ms in all, the guest stopped ${c.pause_ms} ms, output ` +
                                `sendable after ${c.commit_ms ?? "?"} ms, ` +
                                `${c.dirty_pages} dirty pages, ${c.bytes_wire} bytes`));
    r.addEventListener("click", () => replayEpoch(c.epoch));
    root.append(r);
  });
  root.append(svg("text", { x: 4, y: 89 }, shown.length ? `epochs ${shown[0].epoch}-${shown[shown.length - 1].epoch}` : "no checkpoint yet"));
}

function drawHeader() {
  const st = page.status, g = st.gateway || {}, v = st.view || page.state;
  const svc = $("service");
  svc.textContent = g.service_state || "starting";
  svc.className = `pill ${g.service_state || ""}`;
  $("mode-info").textContent = `${v.mode || page.state.mode} mode, interval ${v.interval_ms || page.state.interval_ms} ms, ` +
    `generation ${g.generation ?? "-"}, ${g.failovers ?? 0} failovers`;
  const n = st.nodes || {};
  const desc = (r) => n[r] && n[r].connected ? `${r} ${n[r].id} (pid ${n[r].pid}, epoch ${n[r].epoch ?? "-"})` : `no ${r}`;
  $("nodes-info").textContent = `${desc("primary")}; ${desc("secondary")}`;
  $("guest").textContent = page.state.guest || "";
  $("btn-kill-primary").disabled = !(n.primary && n.primary.connected);
  $("btn-kill-secondary").disabled = !(n.secondary && n.secondary.connected);
}

function drawStep() {
  const on = $("chk-step").checked, slow = Number($("rng-slow").value);
  $("step-banner").hidden = !(on || slow);
  $("step-title").textContent = on ? "Step mode" : `Slow motion (${slow} ms per message)`;
  const w = [...page.waiting.values()].sort((a, b) => a.t - b.t)[0];
  const next = $("next-message");
  next.dataset.msg = w ? w.msg : "";
  next.textContent = w ? `next: ${w.role} → ${w.to}: ${w.msg} ${fieldsText(w.fields)}` : (on ? "waiting for the next checkpoint" : "");
  $("btn-step").disabled = !(on && w);
}

// -- the stream -----------------------------------------------------------------------------------------------------
function handle(ev) {
  page.events.push(ev);
  if (ev.kind === "send") page.sends.set(ev.flow, ev);
  if (ev.t >= latest.t) latest = { t: ev.t, at: Date.now() / 1000 };
  if (page.live) applyToScene(scene, ev);
  if (ev.kind === "gate") {
    const key = `${ev.node}/${ev.msg}`;
    if (ev.state === "waiting") page.waiting.set(key, ev); else page.waiting.delete(key);
    drawStep();
  } else if (ev.kind === "checkpoint") onCheckpoint(ev);
  else if (ev.kind === "client" && ev.dir === "out" && ev.data) {
    page.clientOut.set(ev.conn, ((page.clientOut.get(ev.conn) || "") + ev.data.text).slice(-400));
  }
  else if (ev.kind === "witness") {
    if (ev.event === "output") onOutput(ev);
    else if (ev.event === "compare") onCompare(ev);
    else if (FAILOVER_EVENTS[ev.event]) {  // a gateway that starts before its primary is "down" first: not a failover
      onFailoverStep(ev, witnessText(ev), ev.level, FAILURES.has(ev.event) && page.served);
    }
    if (ev.event === "active") page.served = true;
    if (ev.event === "lost" || ev.event === "fenced") dropWaiting(ev.who);
  } else if (ev.kind === "failover") {
    const rest = Object.entries(ev).filter(([k]) => !["t", "role", "node", "pid", "kind", "step", "i"].includes(k))
      .map(([k, v]) => `${k}=${v}`).join(" ");
    onFailoverStep(ev, `${ev.role} ${ev.node}: ${ev.step} ${rest}`, "", ev.step === "primary-lost");
  }
  scheduleDraw();
}

function dropWaiting(node) {
  for (const [k, w] of page.waiting) if (w.node === node) page.waiting.delete(k);
  drawStep();
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; if (page.live) drawDiagram(); });
}

function connect() {
  const es = new EventSource(`/events?from=${page.events.length}`);
  es.addEventListener("run", (m) => {
    const st = JSON.parse(m.data);
    if (page.run && st.run !== page.run) { location.reload(); return; }
    page.run = st.run;
    page.state = st;
    syncControls(st);
    drawHeader();
  });
  es.addEventListener("reset", () => location.reload());
  es.onmessage = (m) => handle(JSON.parse(m.data));
  es.onerror = () => { es.close(); setTimeout(connect, 1000); };
}

function syncControls(st) {
  $("chk-step").checked = !!st.step;
  $("rng-slow").value = st.delay_ms || 0;
  $("slow-value").textContent = st.delay_ms ? `${st.delay_ms} ms` : "off";
  $("sel-mode").value = st.mode;
  drawStep();
}

async function pollState() {
  try {
    const r = await fetch("/api/state");
    const st = await r.json();
    page.state = st;
    page.status = st.status || {};
    drawHeader();
  } catch (e) { /* the server is restarting */ }
  setTimeout(pollState, 700);
}

async function post(path, body) {
  const out = $("control-result");
  try {
    const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body || {}) });
    const res = await r.json();
    out.textContent = res.ok ? (res.message || "") : res.error;
    out.className = res.ok ? "" : "error";
    return res;
  } catch (e) {
    out.textContent = String(e);
    out.className = "error";
    return { ok: false, error: String(e) };
  }
}

// -- replaying one epoch from the recorded events --------------------------------------------------------------------
function epochWindow(epoch) {
  const done = new Map(page.checkpoints.map((c) => [c.epoch, c]));
  const cur = done.get(epoch);
  const prev = done.get(epoch - 1);
  const lo = prev ? prev.end : cur.start - 0.5;
  let hi = cur.end + 0.003;
  for (const e of page.events) {
    if (e.kind === "witness" && e.event === "output" && e.action === "released" && e.epoch === epoch) hi = Math.max(hi, e.t + 0.001);
  }
  return page.events.filter((e) => e.t >= lo && e.t <= hi || (e.kind === "pages" && e.epoch === epoch));
}

function replayEpoch(epoch) {
  const evs = epochWindow(epoch).sort((a, b) => a.t - b.t);
  page.live = false;
  page.replay = { epoch, evs, i: 0 };
  scene = newScene();
  scene.npages = (page.events.find((e) => e.kind === "pages") || {}).npages || 4096;
  $("replay-banner").hidden = false;
  $("replay-title").textContent = `checkpoint ${epoch}`;
  $("seq-note").textContent = `replay: the run and checkpoint of epoch ${epoch}`;
  drawTimeline();
  stepReplay();
}

function stepReplay() {
  const r = page.replay;
  if (!r) return;
  if (r.i >= r.evs.length) { drawDiagram(); return; }
  const ev = r.evs[r.i++];
  const before = scene.arrows.length;
  applyToScene(scene, ev);
  const drew = scene.arrows.length !== before;
  if (drew) scene.highlight = scene.arrows[scene.arrows.length - 1];
  drawDiagram();
  drawGrid("primary");
  drawGrid("secondary");
  r.timer = setTimeout(stepReplay, drew ? 350 : 40);
}

function backToLive() {
  if (page.replay && page.replay.timer) clearTimeout(page.replay.timer);
  page.replay = null;
  page.live = true;
  scene = newScene();
  for (const ev of page.events.slice(-3000)) applyToScene(scene, ev);
  $("replay-banner").hidden = true;
  $("seq-note").textContent = "live: the latest messages, newest at the bottom";
  drawTimeline();
  drawDiagram();
}

// -- wiring ---------------------------------------------------------------------------------------------------------
function wire() {
  $("btn-kill-primary").onclick = () => post("/api/kill", { role: "primary" });
  $("btn-kill-secondary").onclick = () => post("/api/kill", { role: "secondary" });
  $("btn-checkpoint").onclick = () => post("/api/checkpoint");
  $("chk-step").onchange = (e) => { post("/api/step", { on: e.target.checked }); drawStep(); };
  $("btn-step").onclick = () => { $("btn-step").disabled = true; post("/api/step/once"); };
  document.addEventListener("keydown", (e) => {  // S or the right arrow: Step, as the button (not while typing)
    if (e.target.closest && e.target.closest("input, select, textarea")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if ((e.key === "s" || e.key === "S" || e.key === "ArrowRight") && !$("btn-step").disabled) {
      e.preventDefault();
      $("btn-step").click();
    }
  });
  $("rng-slow").onchange = (e) => {
    const v = Number(e.target.value);
    $("slow-value").textContent = v ? `${v} ms` : "off";
    post("/api/step", { delay_ms: v });
    drawStep();
  };
  $("btn-mode").onclick = () => post("/api/mode", { mode: $("sel-mode").value });
  $("btn-live").onclick = backToLive;
  $("redis-form").onsubmit = async (e) => {
    e.preventDefault();
    const cmd = $("redis-cmd").value.trim();
    if (!cmd) return;
    const li = document.createElement("li");
    const reply = document.createElement("span");
    reply.className = "reply waiting";
    reply.textContent = "(waiting for the reply: it is released when a checkpoint covers it)";
    li.append(document.createTextNode(`> ${cmd}  `), reply);
    $("redis-log").append(li);
    const res = await post("/api/redis", { command: cmd });
    reply.className = res.ok ? "reply" : "reply error";
    reply.textContent = res.ok ? res.reply : res.error;
    li.scrollIntoView({ block: "nearest" });
  };
  for (const name of ["primary", "secondary"]) {
    const c = $(`ram-${name}`);
    c.addEventListener("mousemove", (e) => hoverGrid(name, e));
    c.addEventListener("mouseleave", () => { $("tip").hidden = true; });
  }
  setInterval(() => { if (page.live) { drawGrid("primary"); drawGrid("secondary"); } }, 150);
}

wire();
connect();
pollState();
drawDiagram();
drawTimeline();

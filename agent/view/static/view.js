// Micrography live view: draws what the server sends over /ws and sends operator actions back.
// Plain canvas drawing, no library: the page must work next to an instrument with no internet.
"use strict";

const view = {
  info: null, survey: null, surveyImage: null, steps: [], tile: null, tileImage: null, tileColumns: null,
  maps: null, state: {}, latencies: [], drawn: [], waiting: [], frame: 0, socket: null, drag: null,
};
window.view = view; // for tests and for the curious at the console

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");

// Viridis anchors (matplotlib), interpolated linearly.
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
function colour(t) {
  if (t === null || !isFinite(t)) return "rgba(0,0,0,0)";
  t = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// Colour limits at the 2nd and 98th percentiles: one hot tile must not wash out the rest.
function limits(values) {
  const v = values.filter((x) => x !== null && isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const at = (q) => v[Math.min(v.length - 1, Math.max(0, Math.round(q * (v.length - 1))))];
  let lo = at(0.02), hi = at(0.98);
  if (hi <= lo) { lo = v[0]; hi = v[v.length - 1] + (v[v.length - 1] === v[0] ? 1 : 0); }
  return [lo, hi];
}

function colourBar(canvas, lim, label) {
  const g = canvas.getContext("2d"), w = canvas.width;
  g.clearRect(0, 0, w, canvas.height);
  g.font = "12px system-ui"; g.fillStyle = "#1d2330";
  if (!lim) { g.fillText(label + ": nothing to show yet", 4, 16); return; }
  for (let x = 0; x < w - 8; x++) { g.fillStyle = colour(x / (w - 9)); g.fillRect(4 + x, 2, 1, 12); }
  g.fillStyle = "#1d2330";
  g.fillText(fmt(lim[0]), 4, 28);
  const hi = fmt(lim[1]); g.fillText(hi, w - 4 - g.measureText(hi).width, 28);
  const t = label + " (clipped at 2nd-98th percentile)";
  g.fillText(t, (w - g.measureText(t).width) / 2, 42);
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  return Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : v.toPrecision(digits);
}

// Stage nm -> survey canvas pixels (rows along y, as in the images).
function stageTransform(canvas) {
  const [x0, x1, y0, y1] = view.info.stage_nm;
  const s = Math.min(canvas.width / (x1 - x0), canvas.height / (y1 - y0));
  return { s, x: (x) => (x - x0) * s, y: (y) => (y - y0) * s,
    nmX: (px) => x0 + px / s, nmY: (py) => y0 + py / s };
}
view.toCanvas = (x, y) => { const t = stageTransform($("survey")); return [t.x(x), t.y(y)]; };

function drawSurvey() {
  const canvas = $("survey"), g = canvas.getContext("2d");
  g.fillStyle = "#111"; g.fillRect(0, 0, canvas.width, canvas.height);
  if (!view.info) return;
  const t = stageTransform(canvas);
  const [x0, x1, y0, y1] = view.info.stage_nm;
  if (view.surveyImage) {
    const [sx0, sx1, sy0, sy1] = view.survey.extent_nm;
    g.globalAlpha = 0.85;
    g.drawImage(view.surveyImage, t.x(sx0), t.y(sy0), (sx1 - sx0) * t.s, (sy1 - sy0) * t.s);
    g.globalAlpha = 1;
  } else {
    g.fillStyle = "#aab1c2"; g.font = "14px system-ui"; g.fillText("survey not taken yet", 12, 24);
  }
  const scored = view.steps.filter((s) => s.kind !== "survey");
  const lim = limits(scored.map((s) => s.score));
  // Path between tile centres, in scan order.
  g.strokeStyle = "rgba(255,255,255,0.6)"; g.lineWidth = 1; g.beginPath();
  scored.forEach((s, k) => {
    const [a, b, c, d] = s.extent_nm, cx = t.x((a + b) / 2), cy = t.y((c + d) / 2);
    k ? g.lineTo(cx, cy) : g.moveTo(cx, cy);
  });
  g.stroke();
  g.font = "bold 11px system-ui"; g.textAlign = "center"; g.textBaseline = "middle";
  for (const s of scored) {
    const [a, b, c, d] = s.extent_nm;
    const w = Math.max((b - a) * t.s, 3), h = Math.max((d - c) * t.s, 3);
    g.fillStyle = lim && s.score !== null ? colour((s.score - lim[0]) / (lim[1] - lim[0])) : "#888";
    g.globalAlpha = 0.8; g.fillRect(t.x(a), t.y(c), w, h); g.globalAlpha = 1;
    g.strokeStyle = s.kind === "start" ? "#fff" : "#222"; g.strokeRect(t.x(a), t.y(c), w, h);
    if (w > 9) {
      g.fillStyle = "#000"; g.fillText(String(s.index), t.x(a) + w / 2 + 0.6, t.y(c) + h / 2 + 0.6);
      g.fillStyle = "#fff"; g.fillText(String(s.index), t.x(a) + w / 2, t.y(c) + h / 2);
    }
  }
  g.textAlign = "start"; g.textBaseline = "alphabetic";
  // Domain-wall segments found in tiles, drawn at their length.
  g.strokeStyle = "#ff3df5"; g.lineWidth = 2.5;
  for (const s of scored) {
    if (!s.wall) continue;
    const [px, py] = s.wall.point_nm, [dx, dy] = s.wall.direction, L = s.wall.half_length_nm;
    g.beginPath(); g.moveTo(t.x(px - dx * L), t.y(py - dy * L)); g.lineTo(t.x(px + dx * L), t.y(py + dy * L)); g.stroke();
  }
  g.lineWidth = 1;
  for (const m of view.state.marks || []) drawMark(g, t, m.kind, m.region_nm, false);
  if (view.drag && view.drag.to) {
    const [a, b] = [view.drag.from, view.drag.to];
    drawMark(g, t, view.drag.kind, [Math.min(a[0], b[0]), Math.max(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[1], b[1])], true);
  }
  // Scale bar.
  const nm = niceLength((x1 - x0) / 5);
  g.fillStyle = "#fff"; g.fillRect(12, canvas.height - 18, nm * t.s, 4);
  g.font = "12px system-ui"; g.fillText(`${nm} nm`, 12, canvas.height - 24);
  colourBar($("survey-bar"), lim, "tile interest (RMS z)");
}

function drawMark(g, t, kind, r, preview) {
  g.save();
  g.setLineDash(preview ? [4, 3] : []);
  g.lineWidth = 2;
  g.strokeStyle = kind === "skip" ? "#ff5050" : "#50ff7a";
  g.fillStyle = kind === "skip" ? "rgba(255,80,80,0.18)" : "rgba(80,255,122,0.15)";
  g.fillRect(t.x(r[0]), t.y(r[2]), (r[1] - r[0]) * t.s, (r[3] - r[2]) * t.s);
  g.strokeRect(t.x(r[0]), t.y(r[2]), (r[1] - r[0]) * t.s, (r[3] - r[2]) * t.s);
  g.fillStyle = g.strokeStyle; g.font = "bold 12px system-ui";
  g.fillText(kind === "skip" ? "skip" : "look here", t.x(r[0]) + 3, t.y(r[2]) + 13);
  g.restore();
}

function niceLength(x) {
  const p = Math.pow(10, Math.floor(Math.log10(x))), m = x / p;
  return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
}

function drawTile() {
  const canvas = $("tile"), g = canvas.getContext("2d");
  g.fillStyle = "#111"; g.fillRect(0, 0, canvas.width, canvas.height);
  const tile = view.tile;
  if (!tile || !view.tileImage) {
    g.fillStyle = "#aab1c2"; g.font = "14px system-ui"; g.fillText("no high-resolution tile yet", 12, 24); return;
  }
  const [rows, cols] = tile.shape, s = Math.min(canvas.width / cols, canvas.height / rows);
  g.imageSmoothingEnabled = false;
  g.drawImage(view.tileImage, 0, 0, cols * s, rows * s);
  const c = view.tileColumns;
  let counts = [0, 0, 0], abnormal = 0;
  if (c) {
    // One path per site and one for the rings: a fill per column would cost the browser
    // (and so, on a shared computer, the session) many times more.
    const colours = ["#e8505b", "#2f8fe8", "#9aa1b2"], radius = [2.2, 2.2, 1.2];
    for (let site = 0; site < 3; site++) {
      g.beginPath();
      for (let k = 0; k < c.count; k++) {
        if (c.site[k] !== site) continue;
        counts[site]++;
        const x = (c.xy[2 * k] + 0.5) * s, y = (c.xy[2 * k + 1] + 0.5) * s;
        g.moveTo(x + radius[site], y); g.arc(x, y, radius[site], 0, 2 * Math.PI);
      }
      g.fillStyle = colours[site]; g.fill();
    }
    g.beginPath();
    for (let k = 0; k < c.count; k++) {
      if (!c.abnormal[k]) continue;
      abnormal++;
      const x = (c.xy[2 * k] + 0.5) * s, y = (c.xy[2 * k + 1] + 0.5) * s;
      g.moveTo(x + 5, y); g.arc(x, y, 5, 0, 2 * Math.PI);
    }
    g.strokeStyle = "#ffd400"; g.lineWidth = 1.5; g.stroke(); g.lineWidth = 1;
  }
  const nm = niceLength(cols * tile.view_pixel_nm / 5);
  g.fillStyle = "#fff"; g.fillRect(12, canvas.height - 18, nm / tile.view_pixel_nm * s, 4);
  g.font = "12px system-ui"; g.fillText(nm < 1 ? `${(nm * 10).toFixed(0)} Å` : `${nm} nm`, 12, canvas.height - 24);
  const [a, b, cc, d] = tile.extent_nm;
  $("tile-title").textContent = `Newest tile: step ${tile.index} at x ${((a + b) / 2).toFixed(1)} nm, y ${((cc + d) / 2).toFixed(1)} nm — ` +
    (c ? `${counts[0]} A, ${counts[1]} B, ${counts[2]} O columns, ${abnormal} abnormal` : "no columns found");
}

function drawMap(id, values, label) {
  const canvas = $(id), g = canvas.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, canvas.width, canvas.height);
  if (!values || !view.info) {
    g.fillStyle = "#7a8194"; g.font = "13px system-ui";
    g.fillText(view.info && view.info.source === "journal" ? "shown live only (not journaled)" : "no surrogate decision yet", 10, 22);
    colourBar($(id + "-bar"), null, label); return;
  }
  const [rows, cols] = view.maps.grid_shape, lim = limits(values);
  const s = Math.min(canvas.width / cols, canvas.height / rows);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = values[r * cols + c];
    g.fillStyle = lim ? colour((v - lim[0]) / (lim[1] - lim[0])) : "#ccc";
    g.fillRect(c * s, r * s, Math.ceil(s), Math.ceil(s));
  }
  // Tiles taken, as outlines on the candidate grid.
  const [gx0, gx1, gy0, gy1] = view.info.grid_extent_nm, fx = cols * s / (gx1 - gx0), fy = rows * s / (gy1 - gy0);
  g.strokeStyle = "rgba(255,255,255,0.9)"; g.lineWidth = 1;
  for (const st of view.steps) {
    if (st.kind === "survey") continue;
    const [a, b, c, d] = st.extent_nm; g.strokeRect((a - gx0) * fx, (c - gy0) * fy, (b - a) * fx, (d - c) * fy);
  }
  colourBar($(id + "-bar"), lim, label);
}

function drawChart(id, xs, ys, xlabel, ylabel, empty) {
  const canvas = $(id), g = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  g.clearRect(0, 0, W, H); g.font = "12px system-ui"; g.fillStyle = "#1d2330";
  const pts = xs.map((x, k) => [x, ys[k]]).filter(([x, y]) => x !== null && y !== null && isFinite(x) && isFinite(y));
  if (!pts.length) { g.fillStyle = "#7a8194"; g.fillText(empty, 50, H / 2); return; }
  const L = 56, R = 10, T = 10, B = 40;
  const xmin = Math.min(...pts.map((p) => p[0]), 0), xmax = Math.max(...pts.map((p) => p[0]), xmin + 1e-9);
  const ymin = Math.min(...pts.map((p) => p[1]), 0), ymax = Math.max(...pts.map((p) => p[1]), ymin + 1e-9);
  const X = (x) => L + (x - xmin) / (xmax - xmin) * (W - L - R), Y = (y) => H - B - (y - ymin) / (ymax - ymin) * (H - T - B);
  g.strokeStyle = "#9aa1b2"; g.beginPath(); g.moveTo(L, T); g.lineTo(L, H - B); g.lineTo(W - R, H - B); g.stroke();
  g.fillText(fmt(ymax), 4, T + 8); g.fillText(fmt(ymin), 4, H - B);
  g.fillText(fmt(xmin), L, H - B + 14); const xm = fmt(xmax); g.fillText(xm, W - R - g.measureText(xm).width, H - B + 14);
  g.fillText(xlabel, (W - g.measureText(xlabel).width) / 2, H - 6);
  // Centred on the axis, so a long label stays clear of the tick values at its ends.
  g.save(); g.translate(14, T + (H - T - B) / 2); g.rotate(-Math.PI / 2); g.textAlign = "center";
  g.fillText(ylabel, 0, 0); g.restore();
  g.strokeStyle = "#2f6fe8"; g.lineWidth = 2; g.beginPath();
  pts.forEach(([x, y], k) => (k ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y)))); g.stroke(); g.lineWidth = 1;
}

function drawCharts() {
  const tiles = view.steps.filter((s) => s.kind !== "survey"), n = tiles.map((_, k) => k + 1);
  drawChart("chart-time", tiles.map((s) => s.instrument_time_s), n, "instrument time (s)", "tiles", "no tile yet");
  drawChart("chart-dose", n, tiles.map((s) => s.mean_dose_e_per_a2), "tiles", "mean dose (e⁻/Å²)", "no tile yet");
  const total = view.info && view.info.features_total;
  drawChart("chart-found", n, tiles.map((s) => s.discovered), "tiles",
    total ? `features imaged (of ${total})` : "features imaged", "no ground truth: a real specimen");
}

function drawTimings() {
  const tiles = view.steps.filter((s) => s.kind !== "survey"), body = $("timings").querySelector("tbody");
  body.innerHTML = "";
  if (!tiles.length) return;
  const newest = tiles[tiles.length - 1].timings;
  for (const stage of Object.keys(newest)) {
    const vals = tiles.map((s) => s.timings[stage]).filter((v) => v !== undefined).sort((a, b) => a - b);
    const median = vals[Math.floor((vals.length - 1) / 2)];
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${stage}</td><td>${newest[stage].toFixed(3)}</td><td>${median.toFixed(3)}</td>`;
    body.appendChild(tr);
  }
  const dead = view.state.dead_time_fraction;
  $("dead-time").textContent = dead === null || dead === undefined ? "" :
    `instrument dead time: ${(100 * dead).toFixed(1)} % of waiting plus scanning (look-ahead ${view.info.lookahead_tiles} tile)`;
}

function drawState() {
  const st = view.state, b = st.budget || {};
  const phase = st.phase || "connecting";
  $("phase").textContent = phase; $("phase").className = "pill " + phase;
  $("tile-count").textContent = String(b.tiles ?? view.steps.filter((s) => s.kind !== "survey").length);
  const parts = [];
  if (b.max_tiles) parts.push(`of ${b.max_tiles}`);
  if (b.instrument_time_s !== undefined) parts.push(`${fmt(b.instrument_time_s)}${b.max_time_s ? " / " + fmt(b.max_time_s) : ""} s instrument time`);
  if (b.mean_dose_e_per_a2 !== undefined) parts.push(`${fmt(b.mean_dose_e_per_a2)}${b.max_mean_dose_e_per_a2 ? " / " + fmt(b.max_mean_dose_e_per_a2) : ""} e⁻/Å² mean dose`);
  $("budget-line").textContent = parts.join(" · ");
  if (document.activeElement !== $("dwell") && b.dwell_us) $("dwell").placeholder = b.dwell_us;
  if (document.activeElement !== $("max-tiles") && b.max_tiles) $("max-tiles").placeholder = b.max_tiles;
  const live = view.info && view.info.controllable && !["finished", "stopped"].includes(phase);
  for (const id of ["pause", "resume", "stop", "clear-marks", "set-dwell", "set-max-tiles"]) $(id).disabled = !live;
  $("pause").disabled = !live || phase === "paused"; $("resume").disabled = !live || phase !== "paused";
  const log = $("log"); log.innerHTML = "";
  for (const e of (st.log || []).slice().reverse()) {
    const li = document.createElement("li");
    li.textContent = `${e.t ? new Date(e.t * 1000).toLocaleTimeString() : ""} ${e.what} (${e.source})`;
    log.appendChild(li);
  }
  if (st.stop_reason && ["finished", "stopped"].includes(phase)) message(`session ended: ${st.stop_reason}`);
}

function floats(text) { return text ? Array.from(new Float32Array(bytesOf(text).buffer)) : null; }

function redraw() { drawSurvey(); drawTile(); drawCharts(); drawTimings(); drawState();
  const unit = (view.maps && view.maps.unit) || "RMS z";
  drawMap("mean", view.maps && floats(view.maps.surrogate_mean), `predicted tile interest (${unit})`);
  drawMap("sd", view.maps && floats(view.maps.surrogate_sd), `std of tile interest (${unit})`); }

function bytesOf(text) { const raw = atob(text), out = new Uint8Array(raw.length); for (let k = 0; k < raw.length; k++) out[k] = raw.charCodeAt(k); return out; }

// Raw 8-bit grey levels (sent instead of PNGs: cheaper for the session) -> an off-screen canvas.
function greyCanvas(text, [rows, cols]) {
  const grey = bytesOf(text), canvas = document.createElement("canvas");
  canvas.width = cols; canvas.height = rows;
  const g = canvas.getContext("2d"), img = g.createImageData(cols, rows);
  for (let k = 0; k < grey.length; k++) { img.data[4 * k] = img.data[4 * k + 1] = img.data[4 * k + 2] = grey[k]; img.data[4 * k + 3] = 255; }
  g.putImageData(img, 0, 0);
  return canvas;
}

function unpackColumns(c) {
  if (!c) return null;
  const xy = new Float32Array(bytesOf(c.xy).buffer);
  return { count: c.count, xy, site: bytesOf(c.site), abnormal: bytesOf(c.abnormal) };
}

function setTile(tile) { view.tile = tile; view.tileImage = greyCanvas(tile.grey, tile.shape); view.tileColumns = unpackColumns(tile.columns); }
function setSurvey(survey) { view.survey = survey; view.surveyImage = greyCanvas(survey.grey, survey.shape); }

function onMessage(event) {
  const m = JSON.parse(event.data), now = Date.now() / 1000;
  if (m.type === "hello") {
    Object.assign(view, { info: m.info, survey: m.survey, steps: m.steps, tile: m.tile, maps: m.maps, state: m.state });
    $("session-line").textContent = `session ${m.info.session_id || "?"} · ${m.info.policy} policy · seed ${m.info.seed}` +
      (m.info.source === "journal" ? ` · journal ${m.info.journal} (read-only)` : "");
    if (m.survey) setSurvey(m.survey);
    if (m.tile) setTile(m.tile);
  } else if (m.type === "survey") {
    setSurvey(m.survey);
  } else if (m.type === "step") {
    view.steps.push(m.step); view.state = m.state; if (m.maps) view.maps = m.maps;
    if (m.tile) setTile(m.tile);
    const lag = now - m.step.journaled_unix_s; view.latencies.push(lag);
    $("latency").textContent = `drawn ${lag.toFixed(2)} s after journaling`;
  } else if (m.type === "state") {
    view.state = m.state;
  } else if (m.type === "ack") { message(`accepted: ${m.accepted}`); return; }
  else if (m.type === "error") { message(m.error, true); return; }
  if (m.type === "step") view.waiting.push(m.step.journaled_unix_s);
  // Messages that arrive together are drawn once, at the browser's next frame.
  if (!view.frame) view.frame = requestAnimationFrame(() => {
    view.frame = 0;
    redraw();
    const drawn = Date.now() / 1000;  // seconds from journaling to the page drawn, per step
    for (const t of view.waiting) view.drawn.push(drawn - t);
    view.waiting = [];
  });
}

function message(text, error = false) { const el = $("message"); el.textContent = text; el.className = error ? "light error" : "light"; }

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : "");
  const socket = new WebSocket(url);
  view.socket = socket;
  socket.onmessage = onMessage;
  socket.onopen = () => message("connected");
  socket.onclose = () => {
    if (["finished", "stopped"].includes(view.state.phase)) {
      message(`session ended (${view.state.stop_reason || "done"}); the page keeps its last picture`);
      return;  // the session's process has stopped serving: nothing to reconnect to
    }
    message("connection lost: retrying", true); setTimeout(connect, 1000);
  };
}

function send(action) {
  if (!view.socket || view.socket.readyState !== WebSocket.OPEN) { message("not connected", true); return; }
  view.socket.send(JSON.stringify({ type: "control", ...action }));
}
view.send = send;

$("pause").onclick = () => send({ action: "pause" });
$("resume").onclick = () => send({ action: "resume" });
$("stop").onclick = () => send({ action: "stop" });
$("clear-marks").onclick = () => send({ action: "clear_marks" });
$("set-dwell").onclick = () => send({ action: "set", setting: "dwell_us", value: parseFloat($("dwell").value) });
$("set-max-tiles").onclick = () => send({ action: "set", setting: "budget.max_tiles", value: parseFloat($("max-tiles").value) });

const surveyCanvas = $("survey");
function stageAt(event) {
  const rect = surveyCanvas.getBoundingClientRect(), t = stageTransform(surveyCanvas);
  const px = (event.clientX - rect.left) * surveyCanvas.width / rect.width, py = (event.clientY - rect.top) * surveyCanvas.height / rect.height;
  return [t.nmX(px), t.nmY(py)];
}
surveyCanvas.addEventListener("mousedown", (e) => {
  const kind = document.querySelector("input[name=mark]:checked").value;
  if (!kind || !view.info) return;
  view.drag = { kind, from: stageAt(e), to: null };
});
surveyCanvas.addEventListener("mousemove", (e) => { if (view.drag) { view.drag.to = stageAt(e); drawSurvey(); } });
window.addEventListener("mouseup", (e) => {
  const d = view.drag; view.drag = null;
  if (!d) return;
  const to = stageAt(e), [a, b] = [d.from, to];
  const region = [Math.min(a[0], b[0]), Math.max(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[1], b[1])];
  if (region[1] - region[0] < 0.05 || region[3] - region[2] < 0.05) { drawSurvey(); return; }
  send({ action: d.kind, region_nm: region.map((v) => Math.round(v * 100) / 100) });
  drawSurvey();
});

connect();
redraw();

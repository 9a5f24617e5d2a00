// The Locus viewer: wiring of the page. Everything shown comes from the service's public API:
// GET /model, GET /examples, POST /classify (and POST /decode for files a browser cannot read).

import { ApiError, apiFetch, classify, getJSON, setKey } from "./api.js";
import { CHANNELS, buildLayer, readChannel } from "./channels.js";
import { CLASS_COLOURS, cellColour, setClassNames } from "./classes.js";
import { cellsCSV, kaggleCSV, saveBlob } from "./downloads.js";
import { renderCell } from "./panel.js";
import { FieldView } from "./view.js";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

const state = {
  model: null,
  files: { red: null, green: null, blue: null, yellow: null },
  answer: null,
  asked: null, // the query of the current answer
  answerFiles: null, // the files of the current answer
  layerFiles: null, // the files the layers were built from
  layers: null,
  busy: false,
  sort: { key: "cells", dir: -1 },
  highlightClass: null,
  selected: null,
  timings: {},
};

const view = new FieldView($("#field"));

/** For tests and the curious: the view, the current answer and how long things took. */
window.locusViewer = {
  view,
  get answer() {
    return state.answer;
  },
  get timings() {
    return state.timings;
  },
  /** Page coordinates (CSS px) of an image point (row, col), for clicking a cell. */
  pagePoint(row, col) {
    const r = view.canvas.getBoundingClientRect();
    const p = view.imageToClient(row, col);
    return { x: r.left + p.x, y: r.top + p.y };
  },
};

function setState(s) {
  document.body.dataset.state = s;
}

// ---------------------------------------------------------------- connection and key

async function connect() {
  try {
    state.model = await getJSON("/model");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      askKey();
      return;
    }
    $("#model-info").textContent = `service not ready: ${err.message}`;
    setTimeout(connect, 2000);
    return;
  }
  const m = state.model;
  setClassNames(m.classes);
  $("#model-info").textContent = `${m.name} ${m.version} · ${m.architecture} · ${m.segmenter} · ${m.provider.replace("ExecutionProvider", "")}`;
  $("#attributions").disabled = !m.attributions;
  if (!m.attributions) $("#attributions").parentElement.title = "this model folder has no gradient model (grad.onnx)";
  loadExamples();
  setState("idle");
}

function askKey(message = "") {
  $("#key-button").hidden = false;
  $("#key-error").hidden = !message;
  $("#key-error").textContent = message;
  const dialog = $("#key-dialog");
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
  setState("key");
}

$("#key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  setKey($("#key-input").value.trim());
  try {
    await getJSON("/model");
  } catch (err) {
    setKey("");
    askKey(err.message);
    return;
  }
  $("#key-dialog").close();
  connect();
});
$("#key-button").addEventListener("click", () => askKey());

async function loadExamples() {
  try {
    const examples = await getJSON("/examples");
    const select = $("#example");
    select.replaceChildren(new Option("—", ""));
    for (const ex of examples) {
      const o = new Option(ex.title, ex.id);
      o.dataset.files = JSON.stringify(ex.files);
      select.append(o);
    }
  } catch {
    $("#example").disabled = true;
  }
}

// ---------------------------------------------------------------- choosing files

function channelOf(name) {
  const base = name.toLowerCase().replace(/\.[a-z0-9.]+$/, "");
  const m = base.match(/(red|green|blue|yellow)(?!.*(red|green|blue|yellow))/);
  return m ? m[1] : null;
}

function fieldIdOf(name) {
  return name.replace(/\.[A-Za-z0-9.]+$/, "").replace(/[_\-. ]?(red|green|blue|yellow)$/i, "") || "field";
}

function setFile(channel, file) {
  state.files[channel] = file;
  const slot = $(`.slot[data-channel="${channel}"]`);
  slot.classList.toggle("filled", !!file);
  slot.classList.remove("bad");
  $('[data-role="file"]', slot).textContent = file ? file.name : slot.dataset.hint;
  if (file && $("#image-id").dataset.auto !== "no") $("#image-id").value = fieldIdOf(file.name);
}

function assignFiles(list) {
  const rest = [];
  for (const f of list) {
    const c = channelOf(f.name);
    if (c) setFile(c, f);
    else rest.push(f);
  }
  for (const f of rest) {
    const free = CHANNELS.find((c) => !state.files[c]);
    if (free) setFile(free, f);
  }
  $("#example").value = "";
}

for (const slot of $$(".slot")) {
  slot.dataset.hint = $('[data-role="file"]', slot).textContent;
  const input = $("input", slot);
  input.addEventListener("change", () => {
    if (input.files.length === 1) setFile(slot.dataset.channel, input.files[0]);
    else assignFiles(input.files);
    $("#example").value = "";
  });
}
$("#pick-all").addEventListener("click", () => $("#multi").click());
$("#multi").addEventListener("change", () => assignFiles($("#multi").files));
$("#image-id").addEventListener("input", () => ($("#image-id").dataset.auto = "no"));

const drop = $("#drop");
for (const target of [drop, $(".stage")]) {
  target.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  target.addEventListener("dragleave", () => drop.classList.remove("over"));
  target.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) assignFiles(e.dataTransfer.files);
  });
}

$("#example").addEventListener("change", async () => {
  const option = $("#example").selectedOptions[0];
  if (!option || !option.value) return;
  const names = JSON.parse(option.dataset.files);
  try {
    const blobs = await Promise.all(CHANNELS.map((c) => apiFetch(`/examples/${encodeURIComponent(names[c])}`).then((r) => r.blob())));
    CHANNELS.forEach((c, k) => setFile(c, new File([blobs[k]], names[c], { type: blobs[k].type })));
    $("#image-id").value = option.value;
    $("#example").value = option.value;
    run();
  } catch (err) {
    showError(err);
  }
});

$("#own-threshold").addEventListener("change", () => ($("#threshold").disabled = !$("#own-threshold").checked));

// ---------------------------------------------------------------- running

function query(extra = {}) {
  const q = { include_scores: $("#include-scores").checked, image_id: $("#image-id").value.trim() || "field" };
  if ($("#own-threshold").checked) q.threshold = $("#threshold").value;
  if ($("#attributions").checked) q.attributions = true;
  if ($("#ig-steps").value) q.ig_steps = $("#ig-steps").value;
  return { ...q, ...extra };
}

function progress(fraction, text) {
  $("#progress").hidden = fraction === null;
  if (fraction === null) return;
  const bar = $("#progress-bar");
  bar.classList.toggle("indeterminate", fraction < 0);
  bar.style.width = fraction < 0 ? "" : `${Math.round(100 * fraction)}%`;
  $("#progress-text").textContent = text;
}

function showError(err) {
  const box = $("#error");
  if (!err) {
    box.hidden = true;
    box.replaceChildren();
    for (const s of $$(".slot")) s.classList.remove("bad");
    return;
  }
  const field = err.field || null;
  const parts = [];
  const strong = document.createElement("b");
  strong.textContent = err.status ? `${err.status} ${err.code || ""}`.trim() : "error";
  parts.push(strong, document.createElement("br"));
  const msg = document.createElement("span");
  msg.dataset.role = "message";
  msg.textContent = err.message;
  parts.push(msg);
  if (err.requestId) {
    const rid = document.createElement("span");
    rid.className = "muted small";
    rid.textContent = ` (request ${err.requestId})`;
    parts.push(rid);
  }
  box.replaceChildren(...parts);
  box.dataset.field = field || "";
  box.hidden = false;
  if (field && CHANNELS.includes(field)) $(`.slot[data-channel="${field}"]`).classList.add("bad");
  setState("error");
}

function sameFiles(a, b) {
  return !!a && !!b && CHANNELS.every((c) => a[c] === b[c]);
}

async function run(extra = {}) {
  if (state.busy) return;
  showError(null);
  const missing = CHANNELS.filter((c) => !state.files[c]);
  if (missing.length) {
    showError(
      new ApiError(0, {
        code: "missing_channel",
        message: `${missing[0]}: missing; choose the ${missing.join(", ")} channel file${missing.length > 1 ? "s" : ""}`,
        field: missing[0],
      }),
    );
    return;
  }
  state.busy = true;
  $("#run").disabled = true;
  setState("running");
  const files = { ...state.files };
  const q = query(extra);
  const t0 = performance.now();
  const reuse = sameFiles(files, state.layerFiles);
  // the page reads the files and builds its layers while the service works
  const decoding = reuse
    ? Promise.resolve(null)
    : Promise.all(CHANNELS.map((c) => readChannel(files[c], c))).then((chs) => ({
        chs,
        layers: CHANNELS.map((c, k) => buildLayer(c, chs[k])),
        readyAt: performance.now(),
      }));
  decoding.catch(() => {});
  let tick = null;
  try {
    const answer = await classify(files, q, (phase, f) => {
      if (phase === "upload") progress(0.4 * f, `uploading ${Math.round(100 * f)} %`);
      else if (!tick) {
        const t1 = performance.now();
        const say = () =>
          progress(-1, `${q.attributions ? "segmenting, classifying and explaining" : "segmenting and classifying"}… ${((performance.now() - t1) / 1000).toFixed(1)} s`);
        say();
        tick = setInterval(say, 100);
      }
    });
    clearInterval(tick);
    const tApi = performance.now();
    progress(0.9, "drawing…");
    const decoded = await decoding;
    const tLayers = performance.now();
    if (decoded) {
      const [h, w] = [decoded.chs[0].height, decoded.chs[0].width];
      if (h !== answer.image.height || w !== answer.image.width) {
        throw new ApiError(0, { message: `the page read a ${w}×${h} image, the service a ${answer.image.width}×${answer.image.height} one` });
      }
      state.layers = decoded.layers;
      state.layerFiles = files;
    }
    const keepSelection = reuse && state.answer ? state.selected : null;
    state.answer = answer;
    state.asked = q;
    state.answerFiles = files;
    if (decoded) view.setField(answer.image.width, answer.image.height, state.layers);
    view.setCells(answer.cells, cellColour);
    $("#field").dataset.cellsDrawn = String(view.stats.drawnCells);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const tDrawn = performance.now();
    state.timings = {
      api_ms: tApi - t0,
      layers_ready_ms: decoded ? decoded.readyAt - t0 : 0, // files read and layers built (during the API call)
      layers_wait_ms: tLayers - tApi,
      cells_and_draw_ms: tDrawn - tLayers,
      total_ms: tDrawn - t0,
      server_ms: answer.timings_ms ? answer.timings_ms.total : null,
      via: state.layers.map((l) => l.via),
    };
    showAnswer(keepSelection);
    progress(null);
    setState("done");
  } catch (err) {
    clearInterval(tick);
    progress(null);
    if (err instanceof ApiError && err.status === 401) askKey(err.message);
    showError(err);
  } finally {
    state.busy = false;
    $("#run").disabled = false;
  }
}

$("#run-form").addEventListener("submit", (e) => {
  e.preventDefault();
  run();
});

// ---------------------------------------------------------------- showing an answer

function showAnswer(keepSelection) {
  const a = state.answer;
  $("#empty").hidden = true;
  $("#toolbar").hidden = false;
  $("#channels").hidden = false;
  $("#summary-card").hidden = false;
  $("#downloads").hidden = false;
  buildChannelRows();
  state.highlightClass = null;
  view.setHighlight([]);
  renderSummary();
  updateStatus();
  if (keepSelection !== null && view.byId.has(keepSelection)) selectCell(keepSelection);
  else {
    state.selected = null;
    view.select(null);
    $("#cell").replaceChildren(hint("Click a cell to see its labels, all 19 scores, the crop the model saw and its maps."));
  }
  void a;
}

function hint(text) {
  const p = document.createElement("p");
  p.className = "muted";
  p.textContent = text;
  return p;
}

function updateStatus() {
  const a = state.answer;
  if (!a) return;
  const t = state.timings;
  const zoom = Math.round(100 * view.scale / (window.devicePixelRatio || 1));
  $("#status").textContent =
    `${a.image.width}×${a.image.height} · ${a.cell_count} cells · ${a.model.name} ${a.model.version} · ` +
    `answered in ${(t.api_ms / 1000).toFixed(2)} s (server ${((t.server_ms || 0) / 1000).toFixed(2)} s), ` +
    `drawn ${Math.round(t.total_ms - t.api_ms)} ms later · zoom ${zoom} %`;
}
view.on("view", () => updateStatus());

function buildChannelRows() {
  const rows = $("#channels .channel-rows");
  if (rows.children.length) return;
  CHANNELS.forEach((c, k) => {
    const row = document.createElement("div");
    row.className = "channel-row";
    row.dataset.channel = c;
    row.innerHTML =
      `<label class="check"><input type="checkbox" checked data-role="toggle" aria-label="show ${c}">` +
      `<span class="swatch ${c}"></span>${c}</label>` +
      `<input type="range" min="0" max="4" step="0.05" value="1" data-role="gain" aria-label="${c} brightness">` +
      `<output>1.00×</output>`;
    const toggle = $('[data-role="toggle"]', row);
    const gain = $('[data-role="gain"]', row);
    const update = () => {
      $("output", row).textContent = `${Number(gain.value).toFixed(2)}×`;
      row.classList.toggle("off", !toggle.checked);
      view.setChannel(k, toggle.checked, Number(gain.value));
      refreshCellSoon();
    };
    toggle.addEventListener("change", update);
    gain.addEventListener("input", update);
    rows.append(row);
  });
}

let refreshTimer = null;
function refreshCellSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => state.selected !== null && selectCell(state.selected), 150);
}

function renderSummary() {
  const body = $("#summary tbody");
  const rows = [...state.answer.summary];
  const { key, dir } = state.sort;
  rows.sort((x, y) => (x[key] < y[key] ? -dir : x[key] > y[key] ? dir : 0));
  body.replaceChildren();
  for (const s of rows) {
    const tr = document.createElement("tr");
    tr.dataset.class = String(s.class_id);
    tr.tabIndex = 0;
    tr.classList.toggle("active", state.highlightClass === s.class_id);
    tr.innerHTML =
      `<td><span class="swatch"></span><span class="cls"></span></td>` +
      `<td class="num">${s.cells}</td><td class="num">${s.max_confidence.toFixed(3)}</td>`;
    $(".swatch", tr).style.setProperty("--c", CLASS_COLOURS[s.class_id]);
    $(".cls", tr).textContent = s.name;
    const pick = () => highlightClass(s.class_id);
    tr.addEventListener("click", pick);
    tr.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && pick());
    body.append(tr);
  }
  for (const th of $$("#summary th")) {
    th.setAttribute("aria-sort", th.dataset.sort === key ? (dir > 0 ? "ascending" : "descending") : "none");
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td colspan="3" class="muted">no class called in this field</td>`;
    body.append(tr);
  }
}

for (const th of $$("#summary th")) {
  th.addEventListener("click", () => {
    const key = th.dataset.sort;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : key === "name" ? 1 : -1 };
    renderSummary();
  });
}

function highlightClass(classId) {
  state.highlightClass = state.highlightClass === classId ? null : classId;
  const ids =
    state.highlightClass === null
      ? []
      : state.answer.cells.filter((c) => c.labels.some((l) => l.class_id === classId)).map((c) => c.id);
  view.setHighlight(ids, state.highlightClass === null ? "#fff" : CLASS_COLOURS[classId]);
  $("#field").dataset.highlighted = ids.join(",");
  renderSummary();
}

// ---------------------------------------------------------------- a cell

function selectCell(id, center = false) {
  state.selected = id;
  view.select(id, { center });
  if (id === null) return;
  const cell = state.answer.cells.find((c) => c.id === id);
  const withMaps = state.answer.cells.filter((c) => Array.isArray(c.attributions)).length;
  renderCell($("#cell"), {
    cell,
    answer: state.answer,
    model: state.model,
    view,
    explain: state.model && state.model.attributions ? () => explain() : null,
    explaining: state.busy,
    askedAttributions: !!(state.asked && state.asked.attributions),
    igLimit: withMaps || null,
  });
}

async function explain() {
  if (!state.answerFiles) return;
  state.files = { ...state.answerFiles };
  $("#attributions").checked = true;
  await run({ attributions: true });
}

view.on("select", (id) => {
  if (id === null) {
    state.selected = null;
    $("#cell").replaceChildren(hint("Click a cell to see its labels, all 19 scores, the crop the model saw and its maps."));
    return;
  }
  selectCell(id);
});

const tooltip = $("#tooltip");
view.on("hover", ({ id, x, y }) => {
  if (!id || !state.answer) {
    tooltip.hidden = true;
    return;
  }
  const cell = view.byId.get(id).cell;
  const top = cell.labels.map((l) => `${l.name} ${l.confidence.toFixed(2)}`).join(", ") || "no class called";
  tooltip.textContent = `cell ${id} · ${top}`;
  tooltip.hidden = false;
  const wrap = tooltip.parentElement.getBoundingClientRect();
  const left = x + 14 + tooltip.offsetWidth > wrap.width ? x - tooltip.offsetWidth - 10 : x + 14;
  const topPx = y + 14 + tooltip.offsetHeight > wrap.height ? y - tooltip.offsetHeight - 10 : y + 14;
  tooltip.style.left = `${Math.max(0, left)}px`;
  tooltip.style.top = `${Math.max(0, topPx)}px`;
});

// ---------------------------------------------------------------- view controls

$("#toolbar").addEventListener("click", (e) => {
  const z = e.target.dataset && e.target.dataset.zoom;
  if (z === "in") view.zoom(1.5);
  if (z === "out") view.zoom(1 / 1.5);
  if (z === "fit") view.fit();
  if (z === "one") view.zoom((window.devicePixelRatio || 1) / view.scale);
});
$("#show-outlines").addEventListener("change", (e) => {
  view.showOutlines = e.target.checked;
  view.requestDraw();
});
$("#show-ids").addEventListener("change", (e) => {
  view.showIds = e.target.checked;
  view.requestDraw();
});
document.addEventListener("keydown", (e) => {
  if (!state.answer || e.target.closest("input, select, textarea, dialog")) return;
  if (e.key === "+" || e.key === "=") view.zoom(1.5);
  else if (e.key === "-") view.zoom(1 / 1.5);
  else if (e.key === "0") view.fit();
  else if (e.key === "1") view.zoom((window.devicePixelRatio || 1) / view.scale);
  else if (e.key === "Escape") {
    view.select(null);
    state.selected = null;
  }
});

// ---------------------------------------------------------------- downloads

async function download(kind) {
  const a = state.answer;
  const id = (state.asked && state.asked.image_id) || "field";
  if (kind === "json") saveBlob(new Blob([JSON.stringify(a, null, 2)], { type: "application/json" }), `${id}.json`);
  if (kind === "csv") saveBlob(new Blob([cellsCSV(a)], { type: "text/csv" }), `${id}_cells.csv`);
  if (kind === "png") {
    const canvas = view.renderFull();
    const blob = canvas.convertToBlob
      ? await canvas.convertToBlob({ type: "image/png" })
      : await new Promise((r) => canvas.toBlob(r, "image/png"));
    saveBlob(blob, `${id}_overlay.png`);
  }
  if (kind === "kaggle") {
    const button = $('[data-download="kaggle"]');
    button.disabled = true;
    const q = { output: "kaggle", image_id: id };
    if (state.asked.threshold !== undefined) q.threshold = state.asked.threshold;
    progress(-1, "asking the service for the Kaggle row…");
    try {
      const row = await classify(state.answerFiles, q);
      saveBlob(new Blob([kaggleCSV(row)], { type: "text/csv" }), `${id}_kaggle.csv`);
    } catch (err) {
      showError(err);
    } finally {
      progress(null);
      button.disabled = false;
    }
  }
}
for (const b of $$("[data-download]")) b.addEventListener("click", () => download(b.dataset.download));

setState("connecting");
connect();

// The cell panel: labels, the 19 scores as bars, the crop the model saw, integrated-gradient maps.

import { CLASS_COLOURS, CLASS_NAMES } from "./classes.js";
import { makeCanvas } from "./channels.js";
import { decodeSignedMap } from "./png.js";

const MAP_SIDE = 140; // displayed size of a crop or a map, CSS px

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmt(x, digits = 3) {
  return Number(x).toFixed(digits);
}

export function thresholdsOf(answer, model) {
  if (typeof answer.threshold === "number") return new Array(CLASS_NAMES.length).fill(answer.threshold);
  if (!model || !model.thresholds) return null;
  // labels averaged over n views are called with the model's set for n views, where it has one
  const views = model.view_thresholds && answer.tta > 1 ? model.view_thresholds[String(answer.tta)] : null;
  return views || model.thresholds;
}

/** Copy an (offscreen) canvas into a visible <canvas> of the given CSS size. */
function show(src, cssSide, smooth = false) {
  const c = el("canvas", { className: "crop" });
  c.width = src.width;
  c.height = src.height;
  c.style.width = `${cssSide}px`;
  c.style.height = `${cssSide}px`;
  c.style.imageRendering = smooth ? "auto" : "pixelated";
  c.getContext("2d").drawImage(src, 0, 0);
  return c;
}

/**
 * Fill the panel for one cell.
 * @param {HTMLElement} root
 * @param {{cell: object, answer: object, model: object, view: import("./view.js").FieldView,
 *   explain: (() => void) | null, explaining: boolean, askedAttributions: boolean, igLimit: number | null}} o
 */
export function renderCell(root, o) {
  const { cell, answer, model, view } = o;
  root.replaceChildren();
  root.dataset.cellId = String(cell.id);
  const b = cell.bbox;
  root.append(
    el(
      "div",
      { class: "cell-head" },
      el("h2", {}, `Cell ${cell.id}`),
      el(
        "p",
        { class: "muted" },
        `${cell.area.toLocaleString()} px · rows ${b.row0}–${b.row1} · cols ${b.col0}–${b.col1}` +
          (cell.touches_border ? " · cut by the border" : ""),
      ),
    ),
  );
  const chips = el("div", { class: "chips", "data-role": "labels" });
  if (!cell.labels.length) chips.append(el("span", { class: "chip none" }, "no class above its threshold"));
  for (const l of cell.labels) {
    chips.append(
      el(
        "span",
        { class: "chip", style: `--c:${CLASS_COLOURS[l.class_id]}`, "data-class": String(l.class_id) },
        el("span", { class: "label-name" }, l.name),
        el("b", {}, fmt(l.confidence, 2)),
      ),
    );
  }
  root.append(chips);

  // what the model saw, and (on request) why: the crop and its integrated-gradient maps side by side
  const gallery = el("div", { class: "gallery" });
  root.append(gallery);
  const rule = model && model.crop ? { ...model.crop, size: model.crop.size || model.input.shape[1] } : null;
  let crop = null;
  if (rule && view.layers.length) {
    crop = view.cellCrop(cell.id, rule);
    gallery.append(
      el(
        "figure",
        { class: "crop-figure", "data-role": "crop" },
        show(crop.input, MAP_SIDE),
        el(
          "figcaption",
          {},
          el("b", {}, "Model input"),
          el(
            "span",
            { class: "muted small" },
            ` ${rule.size}² px from a ${crop.side} px window` + (rule.mask_other_cells ? ", other cells blanked" : ""),
          ),
        ),
      ),
    );
  }
  const note = el("div", { class: "ig-note" });
  root.append(note);
  if (Array.isArray(cell.attributions) && cell.attributions.length) {
    gallery.dataset.role = "attributions";
    for (const a of cell.attributions) {
      const fig = el("figure", { class: "ig", "data-class": String(a.class_id) });
      gallery.append(fig);
      drawAttribution(fig, a, cell, view, crop).catch((err) => fig.append(el("p", { class: "error" }, err.message)));
    }
    note.append(
      el(
        "p",
        { class: "muted small" },
        "Integrated gradients per label: hot pixels raise the score, blue ones lower it (over the cell, scaled per map).",
      ),
    );
  } else if (Array.isArray(cell.attributions) || o.askedAttributions) {
    note.append(
      el(
        "p",
        { class: "muted small" },
        o.igLimit
          ? `No integrated-gradient maps for this cell: the service explains the first ${o.igLimit} cells of a field (LOCUS_IG_MAX_CELLS).`
          : "No integrated-gradient maps for this cell.",
      ),
    );
  } else if (model && !model.attributions) {
    note.append(el("p", { class: "muted small" }, "This model folder has no gradient model (grad.onnx): no maps."));
  } else if (o.explain) {
    const button = el("button", { type: "button", class: "secondary", "data-role": "explain" }, "Why? Integrated-gradient maps");
    button.disabled = o.explaining;
    button.addEventListener("click", () => o.explain());
    note.append(
      button,
      el("p", { class: "muted small" }, "Runs the field again with attributions=true (about a second per cell and label on a CPU)."),
    );
  }

  // the 19 scores
  root.append(el("h3", {}, "Scores"));
  if (Array.isArray(cell.scores)) {
    const thr = thresholdsOf(answer, model);
    const called = new Set(cell.labels.map((l) => l.class_id));
    const bars = el("div", { class: "bars", "data-role": "scores" });
    cell.scores.forEach((s, k) => {
      const row = el(
        "div",
        { class: `bar-row${called.has(k) ? " called" : ""}`, "data-class": String(k), title: `${CLASS_NAMES[k]}: ${s}` },
        el("span", { class: "bar-name" }, CLASS_NAMES[k]),
        el(
          "span",
          { class: "track" },
          el("span", { class: "fill", style: `width:${(100 * s).toFixed(2)}%;--c:${CLASS_COLOURS[k]}` }),
          thr ? el("span", { class: "tick", style: `left:${(100 * thr[k]).toFixed(2)}%`, title: `threshold ${thr[k]}` }) : null,
        ),
        el("span", { class: "bar-value" }, fmt(s, 3)),
      );
      bars.append(row);
    });
    root.append(bars);
    if (thr) root.append(el("p", { class: "muted small" }, "Ticks: each class's decision threshold."));
  } else {
    root.append(el("p", { class: "muted" }, "Run with “all 19 scores” on to see every class."));
  }
}

function heatColour(v) {
  // v in [-1, 1]: hot (dark red -> yellow -> white) for positive, blue for negative; as locus overlay
  if (v > 0) {
    const r = Math.max(0.35, Math.min(1, 3 * v));
    const g = Math.min(1, Math.max(0, 3 * v - 1));
    const b = Math.min(1, Math.max(0, 3 * v - 2));
    return [r, g, b];
  }
  const n = -v;
  return [0, 0.4 * n, 0.4 + 0.6 * n];
}

async function drawAttribution(fig, a, cell, view, crop) {
  const map = await decodeSignedMap(a.map);
  const entry = view.byId.get(cell.id);
  const mask = entry ? entry.mask : null;
  // scale: 99th percentile of |value| over the cell's pixels
  const mags = [];
  for (let i = 0; i < map.values.length; i++) if (!mask || mask.data[i]) mags.push(Math.abs(map.values[i]));
  mags.sort((x, y) => x - y);
  const peak = mags.length ? mags[Math.min(mags.length - 1, Math.floor(0.99 * mags.length))] || 1 : 1;
  const heat = makeCanvas(map.w, map.h);
  const hctx = heat.getContext("2d");
  const img = hctx.createImageData(map.w, map.h);
  for (let i = 0; i < map.values.length; i++) {
    if (mask && !mask.data[i]) continue;
    const v = Math.max(-1, Math.min(1, map.values[i] / peak));
    const [r, g, b] = heatColour(v);
    img.data[4 * i] = 255 * r;
    img.data[4 * i + 1] = 255 * g;
    img.data[4 * i + 2] = 255 * b;
    img.data[4 * i + 3] = 255 * Math.min(0.9, 0.15 + Math.abs(v));
  }
  hctx.putImageData(img, 0, 0);
  // the window (as the model saw it), dimmed to gray, with the heat over the cell's box
  const side = crop ? crop.side : Math.max(map.w, map.h);
  const out = makeCanvas(side, side);
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, side, side);
  if (crop) {
    ctx.filter = "grayscale(1) brightness(0.55)";
    ctx.drawImage(crop.window, 0, 0);
    ctx.filter = "none";
  }
  const x = crop ? a.bbox.col0 - crop.wc0 : 0;
  const y = crop ? a.bbox.row0 - crop.wr0 : 0;
  ctx.drawImage(heat, x, y);
  const totals = Object.entries(a.channel_totals)
    .map(([c, v]) => `${c[0].toUpperCase()} ${v >= 0 ? "+" : ""}${v.toFixed(2)}`)
    .join(" ");
  fig.append(
    show(out, MAP_SIDE, true),
    el(
      "figcaption",
      {},
      el("b", { style: `color:${CLASS_COLOURS[a.class_id]}` }, a.name),
      el(
        "span",
        { class: "muted small", title: `Attribution summed per input channel: ${totals}` },
        ` ${fmt(a.score, 2)} vs ${fmt(a.baseline_score, 2)} at baseline · completeness ${(100 * a.completeness_error).toFixed(1)} %`,
      ),
    ),
  );
}

// The field view: composite of the channel layers, cell outlines and ids, zoom and pan, picking.
//
// Screen = image * scale + offset. Zoomed out, the preview layers are drawn (at most
// PREVIEW_SIDE px); zoomed in, only the visible part of the full-resolution layers. Outlines
// are vector paths in image coordinates stroked at a constant screen width.

import { makeCanvas } from "./channels.js";
import { addSegments, decodeInBox, outlineSegments } from "./rle.js";

const MIN_SCALE_FACTOR = 0.5; // of the fit scale
const MAX_SCALE = 32; // screen px per image px

export class FieldView {
  /** @param {HTMLCanvasElement} canvas */
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.width = 0;
    this.height = 0;
    this.layers = [];
    this.visible = [true, true, true, true];
    this.gain = [1, 1, 1, 1];
    this.cells = [];
    this.byId = new Map();
    this.labelMap = null;
    this.paths = new Map(); // colour -> Path2D
    this.highlight = new Set();
    this.highlightColour = "#ffffff";
    this.selected = null;
    this.hovered = null;
    this.showOutlines = true;
    this.showIds = true;
    this.scale = 1;
    this.ox = 0;
    this.oy = 0;
    this.listeners = { select: [], hover: [], view: [] };
    this.stats = { drawnCells: 0, frames: 0, lastFrameMs: 0, source: "none" };
    this._comp = { preview: null, full: null }; // the channels composited with the current settings
    this._compTimer = null;
    this._outlineRaster = null; // all outlines at preview resolution, for zoomed-out frames
    this._queued = false;
    this._bindEvents();
    new ResizeObserver(() => this._resize()).observe(canvas.parentElement);
    this._resize();
  }

  on(event, fn) {
    this.listeners[event].push(fn);
  }

  _emit(event, value) {
    for (const fn of this.listeners[event]) fn(value);
  }

  get dpr() {
    return window.devicePixelRatio || 1;
  }

  _resize() {
    const box = this.canvas.parentElement.getBoundingClientRect();
    const w = Math.max(1, Math.round(box.width * this.dpr));
    const h = Math.max(1, Math.round(box.height * this.dpr));
    if (w === this.canvas.width && h === this.canvas.height) return;
    const first = this.canvas.width <= 1;
    this.canvas.width = w;
    this.canvas.height = h;
    if (first || !this._userMoved) this.fit();
    this.requestDraw();
  }

  /** Show a new field: its size and coloured layers (see channels.buildLayer). */
  setField(width, height, layers) {
    this.width = width;
    this.height = height;
    this.layers = layers;
    this._comp = { preview: null, full: null };
    this._outlineRaster = null;
    this.cells = [];
    this.byId.clear();
    this.paths.clear();
    this.labelMap = null;
    this.highlight.clear();
    this.selected = null;
    this.hovered = null;
    this._userMoved = false;
    this.fit();
  }

  /**
   * Decode the cells' masks (COCO RLE) into outlines and a label map for picking.
   * @param {object[]} cells the API's cells
   * @param {(cell: object) => string} colourOf outline colour of a cell
   */
  setCells(cells, colourOf) {
    const W = this.width;
    const H = this.height;
    const Label = cells.length < 65535 ? Uint16Array : Uint32Array;
    this.labelMap = new Label(W * H);
    this.cells = [];
    this.byId.clear();
    this.paths.clear();
    for (const cell of cells) {
      if (!cell.mask) continue;
      const mask = decodeInBox(cell.mask, cell.bbox);
      const segments = outlineSegments(mask);
      const colour = colourOf(cell);
      const entry = { cell, mask, segments, colour, fill: null, path: null };
      const { data, w, h, row0, col0 } = mask;
      for (let r = 0; r < h; r++) {
        const base = (row0 + r) * W + col0;
        for (let c = 0; c < w; c++) if (data[r * w + c]) this.labelMap[base + c] = cell.id;
      }
      if (!this.paths.has(colour)) this.paths.set(colour, new Path2D());
      addSegments(this.paths.get(colour), segments);
      this.cells.push(entry);
      this.byId.set(cell.id, entry);
    }
    this.stats.drawnCells = this.cells.filter((e) => e.segments.length > 0).length;
    this._outlineRaster = null;
    this.requestDraw();
    // composite the full resolution once the first frame is up, so the first zoom does not wait for it
    setTimeout(() => this.layers.length && this._composite("full"), 250);
  }

  setChannel(k, visible, gain) {
    this.visible[k] = visible;
    this.gain[k] = gain;
    this.requestDraw();
  }

  _compKey() {
    return this.visible.map((v, k) => (v ? this.gain[k] : 0)).join(",");
  }

  /** Add the visible layers (with their gains) of one resolution into a 2-D context, 'lighter' blending. */
  _drawLayers(ctx, level, sx, sy, sw, sh, dx, dy, dw, dh) {
    ctx.globalCompositeOperation = "lighter";
    this.layers.forEach((layer, k) => {
      if (!this.visible[k]) return;
      let g = this.gain[k];
      while (g > 0) {
        ctx.globalAlpha = Math.min(1, g);
        ctx.drawImage(layer[level], sx, sy, sw, sh, dx, dy, dw, dh);
        g -= 1;
      }
    });
    ctx.globalAlpha = 1;
    ctx.globalCompositeOperation = "source-over";
  }

  /**
   * The channels composited at one resolution for the current toggles and gains, or null while the
   * full-resolution one is being rebuilt (a brightness drag rebuilds it once the slider rests).
   */
  _composite(level) {
    const key = this._compKey();
    const cached = this._comp[level];
    if (cached && cached.key === key) return cached.canvas;
    if (level === "full" && cached) {
      clearTimeout(this._compTimer);
      this._compTimer = setTimeout(() => {
        this._compTimer = null;
        this._buildComposite("full");
        this.requestDraw();
      }, 150);
      return null;
    }
    return this._buildComposite(level);
  }

  _buildComposite(level) {
    const src = this.layers[0][level];
    const canvas = this._comp[level] ? this._comp[level].canvas : makeCanvas(src.width, src.height);
    const ctx = canvas.getContext("2d");
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    this._drawLayers(ctx, level, 0, 0, src.width, src.height, 0, 0, src.width, src.height);
    this._comp[level] = { canvas, key: this._compKey() };
    return canvas;
  }

  /** Every outline stroked once at preview resolution: one image to draw when zoomed out. */
  _outlines(lineWidth) {
    const pw = this.layers[0].preview.width;
    const ph = this.layers[0].preview.height;
    const key = `${lineWidth}`;
    if (this._outlineRaster && this._outlineRaster.key === key) return this._outlineRaster.canvas;
    const canvas = makeCanvas(pw, ph);
    const ctx = canvas.getContext("2d");
    const f = pw / this.width;
    ctx.setTransform(f, 0, 0, f, 0, 0);
    ctx.lineCap = "square";
    ctx.strokeStyle = "rgba(0,0,0,0.65)";
    ctx.lineWidth = (lineWidth * 2.2) / f;
    for (const path of this.paths.values()) ctx.stroke(path);
    ctx.lineWidth = lineWidth / f;
    for (const [colour, path] of this.paths) {
      ctx.strokeStyle = colour;
      ctx.stroke(path);
    }
    this._outlineRaster = { canvas, key };
    return canvas;
  }

  setHighlight(ids, colour = "#ffffff") {
    this.highlight = new Set(ids);
    this.highlightColour = colour;
    for (const e of this.cells) e.fill = null;
    this.requestDraw();
  }

  select(id, { center = false } = {}) {
    this.selected = id;
    if (center && id !== null && this.byId.has(id)) {
      const [r, c] = this.byId.get(id).cell.centroid;
      this.ox = this.canvas.width / 2 - c * this.scale;
      this.oy = this.canvas.height / 2 - r * this.scale;
    }
    this.requestDraw();
  }

  fitScale() {
    if (!this.width) return 1;
    return Math.min(this.canvas.width / this.width, this.canvas.height / this.height);
  }

  fit() {
    const s = this.fitScale();
    this.scale = s;
    this.ox = (this.canvas.width - this.width * s) / 2;
    this.oy = (this.canvas.height - this.height * s) / 2;
    this._userMoved = false;
    this.requestDraw();
  }

  /** Zoom by a factor around a point in canvas pixels. */
  zoom(factor, px = this.canvas.width / 2, py = this.canvas.height / 2) {
    const s = Math.min(MAX_SCALE, Math.max(this.fitScale() * MIN_SCALE_FACTOR, this.scale * factor));
    const ix = (px - this.ox) / this.scale;
    const iy = (py - this.oy) / this.scale;
    this.scale = s;
    this.ox = px - ix * s;
    this.oy = py - iy * s;
    this._userMoved = true;
    this.requestDraw();
  }

  /** Image (row, col) -> CSS pixels relative to the canvas. */
  imageToClient(row, col) {
    return { x: (col * this.scale + this.ox) / this.dpr, y: (row * this.scale + this.oy) / this.dpr };
  }

  /** CSS pixels relative to the canvas -> image (row, col). */
  clientToImage(x, y) {
    return { row: (y * this.dpr - this.oy) / this.scale, col: (x * this.dpr - this.ox) / this.scale };
  }

  cellAt(x, y) {
    if (!this.labelMap) return null;
    const { row, col } = this.clientToImage(x, y);
    const r = Math.floor(row);
    const c = Math.floor(col);
    if (r < 0 || c < 0 || r >= this.height || c >= this.width) return null;
    return this.labelMap[r * this.width + c] || null;
  }

  _bindEvents() {
    const cv = this.canvas;
    let drag = null;
    cv.addEventListener("pointerdown", (e) => {
      cv.setPointerCapture(e.pointerId);
      drag = { x: e.offsetX, y: e.offsetY, ox: this.ox, oy: this.oy, moved: false };
    });
    cv.addEventListener("pointermove", (e) => {
      if (drag) {
        const dx = (e.offsetX - drag.x) * this.dpr;
        const dy = (e.offsetY - drag.y) * this.dpr;
        if (Math.abs(dx) + Math.abs(dy) > 4 * this.dpr) drag.moved = true;
        if (drag.moved) {
          this.ox = drag.ox + dx;
          this.oy = drag.oy + dy;
          this._userMoved = true;
          cv.classList.add("dragging");
          this.requestDraw();
        }
        return;
      }
      const id = this.cellAt(e.offsetX, e.offsetY);
      if (id !== this.hovered) {
        this.hovered = id;
        this.requestDraw();
      }
      this._emit("hover", { id, x: e.offsetX, y: e.offsetY });
    });
    cv.addEventListener("pointerup", (e) => {
      cv.classList.remove("dragging");
      if (drag && !drag.moved) {
        const id = this.cellAt(e.offsetX, e.offsetY);
        this.select(id);
        this._emit("select", id);
      }
      drag = null;
    });
    cv.addEventListener("pointerleave", () => {
      if (this.hovered !== null) {
        this.hovered = null;
        this.requestDraw();
      }
      this._emit("hover", { id: null });
    });
    cv.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        const delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
        this.zoom(Math.exp(-delta * 0.0015), e.offsetX * this.dpr, e.offsetY * this.dpr);
      },
      { passive: false },
    );
    cv.addEventListener("dblclick", (e) => this.zoom(2, e.offsetX * this.dpr, e.offsetY * this.dpr));
  }

  /** True once the picture on screen is final: no frame queued and no composite waiting to be rebuilt. */
  idle() {
    return !this._queued && !this._compTimer;
  }

  requestDraw() {
    if (this._queued) return;
    this._queued = true;
    requestAnimationFrame(() => {
      this._queued = false;
      this.draw();
    });
  }

  draw() {
    const t0 = performance.now();
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#07090c";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.width) return;
    this.render(ctx, {
      scale: this.scale,
      ox: this.ox,
      oy: this.oy,
      viewW: this.canvas.width,
      viewH: this.canvas.height,
      lineWidth: 1.6 * this.dpr,
      font: 11 * this.dpr,
    });
    this.stats.frames += 1;
    this.stats.lastFrameMs = performance.now() - t0;
    this._emit("view", this.scale);
  }

  /**
   * Draw the field into a 2-D context: layers, highlights, outlines, ids.
   * @param {CanvasRenderingContext2D} ctx
   * @param {{scale: number, ox: number, oy: number, viewW: number, viewH: number, lineWidth: number,
   *   font: number, full?: boolean}} o
   */
  render(ctx, o) {
    const { scale, ox, oy } = o;
    // the visible part of the image, clamped
    const x0 = Math.max(0, Math.floor(-ox / scale));
    const y0 = Math.max(0, Math.floor(-oy / scale));
    const x1 = Math.min(this.width, Math.ceil((o.viewW - ox) / scale));
    const y1 = Math.min(this.height, Math.ceil((o.viewH - oy) / scale));
    if (x1 <= x0 || y1 <= y0) return;
    ctx.save();
    ctx.setTransform(scale, 0, 0, scale, ox, oy);
    const previewF = this.layers.length ? this.layers[0].preview.width / this.width : 1;
    const usePreview = !o.full && this.layers.length && scale <= previewF * 1.01;
    const level = usePreview ? "preview" : "full";
    ctx.imageSmoothingEnabled = scale < 2;
    ctx.imageSmoothingQuality = "medium";
    if (this.layers.length) {
      const f = usePreview ? previewF : 1;
      const comp = this._composite(level);
      this.stats.source = comp ? `${level} composite` : `${level} layers`;
      if (comp) ctx.drawImage(comp, x0 * f, y0 * f, (x1 - x0) * f, (y1 - y0) * f, x0, y0, x1 - x0, y1 - y0);
      else this._drawLayers(ctx, level, x0 * f, y0 * f, (x1 - x0) * f, (y1 - y0) * f, x0, y0, x1 - x0, y1 - y0);
    }
    if (this.highlight.size) {
      ctx.imageSmoothingEnabled = false;
      ctx.globalAlpha = 0.33;
      for (const id of this.highlight) {
        const e = this.byId.get(id);
        if (!e) continue;
        if (!e.fill) e.fill = this._fillCanvas(e.mask, this.highlightColour);
        ctx.drawImage(e.fill, e.mask.col0, e.mask.row0);
      }
      ctx.globalAlpha = 1;
    }
    if (this.showOutlines) {
      ctx.lineCap = "square";
      if (usePreview) {
        ctx.imageSmoothingEnabled = true;
        const raster = this._outlines(o.lineWidth);
        ctx.drawImage(raster, 0, 0, raster.width, raster.height, 0, 0, this.width, this.height);
      } else {
        ctx.strokeStyle = "rgba(0,0,0,0.65)";
        ctx.lineWidth = (o.lineWidth * 2.2) / scale;
        for (const path of this.paths.values()) ctx.stroke(path);
        ctx.lineWidth = o.lineWidth / scale;
        for (const [colour, path] of this.paths) {
          ctx.strokeStyle = colour;
          ctx.stroke(path);
        }
      }
      for (const [id, colour] of [
        [this.hovered, "rgba(255,255,255,0.7)"],
        [this.selected, "#ffffff"],
      ]) {
        const e = id !== null ? this.byId.get(id) : null;
        if (!e) continue;
        if (!e.path) {
          e.path = new Path2D();
          addSegments(e.path, e.segments);
        }
        ctx.strokeStyle = colour;
        ctx.lineWidth = (o.lineWidth * (id === this.selected ? 2.2 : 1.6)) / scale;
        ctx.stroke(e.path);
      }
    }
    ctx.restore();
    if (this.showIds && this.cells.length) {
      ctx.save();
      ctx.font = `600 ${o.font}px ui-sans-serif, system-ui, sans-serif`;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.lineWidth = Math.max(2, o.font / 4);
      ctx.strokeStyle = "rgba(0,0,0,0.8)";
      for (const e of this.cells) {
        const [r, c] = e.cell.centroid;
        const x = c * scale + ox;
        const y = r * scale + oy;
        if (x < -20 || y < -20 || x > o.viewW + 20 || y > o.viewH + 20) continue;
        const text = String(e.cell.id);
        ctx.strokeText(text, x, y);
        ctx.fillStyle = e.cell.id === this.selected ? "#ffffff" : e.colour;
        ctx.fillText(text, x, y);
      }
      ctx.restore();
    }
  }

  _fillCanvas(mask, colour) {
    const canvas = makeCanvas(Math.max(1, mask.w), Math.max(1, mask.h));
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(canvas.width, canvas.height);
    const probe = makeCanvas(1, 1).getContext("2d");
    probe.fillStyle = colour;
    probe.fillRect(0, 0, 1, 1);
    const [r, g, b] = probe.getImageData(0, 0, 1, 1).data;
    for (let i = 0; i < mask.data.length; i++) {
      if (!mask.data[i]) continue;
      img.data[4 * i] = r;
      img.data[4 * i + 1] = g;
      img.data[4 * i + 2] = b;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }

  /**
   * The whole field at full resolution (or scaled to maxSide), with outlines and ids, as a canvas.
   * @param {number} maxSide
   */
  renderFull(maxSide = 4096) {
    const f = Math.min(1, maxSide / Math.max(this.width, this.height));
    const w = Math.round(this.width * f);
    const h = Math.round(this.height * f);
    const canvas = makeCanvas(w, h);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000000";
    ctx.fillRect(0, 0, w, h);
    const side = Math.max(w, h);
    this.render(ctx, {
      scale: f,
      ox: 0,
      oy: 0,
      viewW: w,
      viewH: h,
      lineWidth: Math.max(1.5, side / 700),
      font: Math.max(12, Math.round(side / 90)),
      full: true,
    });
    return canvas;
  }

  /**
   * What the model saw of a cell: the crop rule's square window around its box, other cells' pixels
   * zeroed, resized to the model's input size (see locus.service.crop).
   * @param {number} id
   * @param {{size: number, padding: number, mask_other_cells: boolean, min_side: number}} rule
   * @returns {{input: OffscreenCanvas, window: OffscreenCanvas, wr0: number, wc0: number, side: number}}
   */
  cellCrop(id, rule) {
    const e = this.byId.get(id);
    const { row0, col0, row1, col1 } = e.cell.bbox;
    let side = Math.max(row1 - row0, col1 - col0);
    side = Math.max(roundHalfEven(side * (1 + 2 * rule.padding)), rule.min_side);
    const wr0 = Math.floor((row0 + row1) / 2 - side / 2);
    const wc0 = Math.floor((col0 + col1) / 2 - side / 2);
    const win = makeCanvas(side, side);
    const ctx = win.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, side, side);
    const sx0 = Math.max(0, wc0);
    const sy0 = Math.max(0, wr0);
    const sx1 = Math.min(this.width, wc0 + side);
    const sy1 = Math.min(this.height, wr0 + side);
    if (sx1 > sx0 && sy1 > sy0) {
      this._drawLayers(ctx, "full", sx0, sy0, sx1 - sx0, sy1 - sy0, sx0 - wc0, sy0 - wr0, sx1 - sx0, sy1 - sy0);
    }
    if (rule.mask_other_cells && sx1 > sx0 && sy1 > sy0) {
      const img = ctx.getImageData(0, 0, side, side);
      const px = new Uint32Array(img.data.buffer);
      for (let y = sy0; y < sy1; y++) {
        const base = y * this.width;
        const o = (y - wr0) * side - wc0;
        for (let x = sx0; x < sx1; x++) {
          const lab = this.labelMap[base + x];
          if (lab !== 0 && lab !== id) px[o + x] = 0xff000000;
        }
      }
      ctx.putImageData(img, 0, 0);
    }
    const input = makeCanvas(rule.size, rule.size);
    const ictx = input.getContext("2d");
    ictx.imageSmoothingQuality = "high";
    ictx.drawImage(win, 0, 0, rule.size, rule.size);
    return { input, window: win, wr0, wc0, side };
  }
}

/** Python's round(): halves go to the even neighbour. */
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (Math.abs(d - 0.5) < 1e-9) return f % 2 === 0 ? f : f + 1;
  return Math.round(x);
}

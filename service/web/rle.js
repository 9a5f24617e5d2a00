// COCO compressed RLE (the "counts" string of pycocotools) -> cell masks, and masks -> outlines.
//
// A mask of an H x W image is a list of run lengths over its pixels in column-major order
// (down the first column, then the next), alternating 0-runs and 1-runs, starting with 0s.
// The string form packs each count in 5-bit groups with a continuation bit (+48 to be
// printable) and, from the third count on, stores the difference to the count two back.

/**
 * Decode a COCO compressed RLE string into its run lengths.
 * @param {string} s the "counts" string
 * @returns {number[]} run lengths, 0-run first
 */
export function decodeCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= s.length) throw new Error("RLE counts string ends inside a number");
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k); // arithmetic, not <<: shifts in JS wrap at 32 bits
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k); // sign-extend
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/**
 * Decode a whole mask into a row-major array (for tests and small images).
 * @param {{size: number[], counts: string}} rle
 * @returns {Uint8Array} H * W values 0/1, row-major
 */
export function decodeFull(rle) {
  const [h, w] = rle.size;
  const out = new Uint8Array(h * w);
  let p = 0;
  let v = 0;
  for (const n of decodeCounts(rle.counts)) {
    if (v) {
      for (let i = p; i < p + n; i++) {
        const col = Math.floor(i / h);
        out[(i - col * h) * w + col] = 1;
      }
    }
    p += n;
    v ^= 1;
  }
  if (p !== h * w) throw new Error(`RLE covers ${p} pixels, the image has ${h * w}`);
  return out;
}

/**
 * Decode a mask into a row-major array covering only its bounding box.
 * Runs are written a column segment at a time, so the cost follows the runs, not the image.
 * @param {{size: number[], counts: string}} rle
 * @param {{row0: number, col0: number, row1: number, col1: number}} box end-exclusive
 * @returns {{row0: number, col0: number, h: number, w: number, data: Uint8Array, area: number}}
 */
export function decodeInBox(rle, box) {
  const H = rle.size[0];
  const h = box.row1 - box.row0;
  const w = box.col1 - box.col0;
  const data = new Uint8Array(Math.max(0, h * w));
  let p = 0;
  let v = 0;
  let area = 0;
  for (const n of decodeCounts(rle.counts)) {
    if (v && n > 0) {
      let i = p;
      const end = p + n;
      while (i < end) {
        const col = Math.floor(i / H);
        const row = i - col * H;
        const stop = Math.min(end, (col + 1) * H); // this column's part of the run
        const c = col - box.col0;
        if (c >= 0 && c < w) {
          for (let r = Math.max(row, box.row0); r < Math.min(row + stop - i, box.row1); r++) {
            data[(r - box.row0) * w + c] = 1;
            area += 1;
          }
        }
        i = stop;
      }
    }
    p += n;
    v ^= 1;
  }
  return { row0: box.row0, col0: box.col0, h, w, data, area };
}

/**
 * Outline of a box-local mask as pixel-edge segments, merged into straight runs.
 * Each segment is [x0, y0, x1, y1] in image coordinates (x = column, y = row; pixel (r, c)
 * spans [c, c+1] x [r, r+1]).
 * @param {{row0: number, col0: number, h: number, w: number, data: Uint8Array}} m
 * @returns {Float32Array} 4 numbers per segment
 */
export function outlineSegments(m) {
  const { h, w, data, row0, col0 } = m;
  const seg = [];
  // Horizontal edges: between row r-1 and r, for r in 0..h; a run of columns where they differ.
  for (let r = 0; r <= h; r++) {
    const above = (r - 1) * w;
    const here = r * w;
    let start = -1;
    for (let c = 0; c <= w; c++) {
      const a = r > 0 && c < w ? data[above + c] : 0;
      const b = r < h && c < w ? data[here + c] : 0;
      const edge = a !== b;
      if (edge && start < 0) start = c;
      else if (!edge && start >= 0) {
        seg.push(col0 + start, row0 + r, col0 + c, row0 + r);
        start = -1;
      }
    }
  }
  // Vertical edges: between column c-1 and c; runs of rows, followed row by row (row-major memory order).
  const open = new Int32Array(w + 1).fill(-1);
  for (let r = 0; r <= h; r++) {
    const here = r * w;
    for (let c = 0; c <= w; c++) {
      const a = r < h && c > 0 ? data[here + c - 1] : 0;
      const b = r < h && c < w ? data[here + c] : 0;
      const edge = a !== b;
      if (edge && open[c] < 0) open[c] = r;
      else if (!edge && open[c] >= 0) {
        seg.push(col0 + c, row0 + open[c], col0 + c, row0 + r);
        open[c] = -1;
      }
    }
  }
  return Float32Array.from(seg);
}

/**
 * Add outline segments to a Path2D.
 * @param {Path2D} path
 * @param {Float32Array} seg from outlineSegments
 */
export function addSegments(path, seg) {
  for (let i = 0; i < seg.length; i += 4) {
    path.moveTo(seg[i], seg[i + 1]);
    path.lineTo(seg[i + 2], seg[i + 3]);
  }
}

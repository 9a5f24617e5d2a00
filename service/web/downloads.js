// Downloads built in the page: the per-cell table as CSV, and saving any Blob as a file.

import { CLASS_NAMES } from "./classes.js";

function csvField(v) {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** Rows -> CSV text (RFC 4180 quoting, \n line ends). */
export function toCSV(header, rows) {
  return [header, ...rows].map((r) => r.map(csvField).join(",")).join("\n") + "\n";
}

/**
 * The per-cell table of an answer: one row per cell; the 19 scores when the answer has them.
 * @param {object} answer the /classify JSON
 * @returns {string} CSV
 */
export function cellsCSV(answer) {
  const withScores = answer.cells.some((c) => Array.isArray(c.scores));
  const header = [
    "cell_id",
    "row0",
    "col0",
    "row1",
    "col1",
    "area",
    "centroid_row",
    "centroid_col",
    "touches_border",
    "top_label",
    "top_confidence",
    "labels",
  ];
  if (withScores) header.push(...CLASS_NAMES.map((n) => `score_${n}`));
  const rows = answer.cells.map((c) => {
    const top = c.labels[0];
    const row = [
      c.id,
      c.bbox.row0,
      c.bbox.col0,
      c.bbox.row1,
      c.bbox.col1,
      c.area,
      c.centroid[0],
      c.centroid[1],
      c.touches_border,
      top ? top.name : "",
      top ? top.confidence : "",
      c.labels.map((l) => l.name).join("|"),
    ];
    if (withScores) row.push(...(c.scores || new Array(CLASS_NAMES.length).fill("")));
    return row;
  });
  return toCSV(header, rows);
}

/** The Kaggle answer (output=kaggle) as a submission CSV with its header. */
export function kaggleCSV(row) {
  return toCSV(["ID", "ImageWidth", "ImageHeight", "PredictionString"], [
    [row.ID, row.ImageWidth, row.ImageHeight, row.PredictionString],
  ]);
}

/** Offer a Blob as a download. */
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// One colour for each of the 19 classes of the HPA single-cell task (bright, to read over a dark field).

// The class names come from the service (GET /model: "classes", i.e. locus.service.classes), never a copy here;
// app.js sets them once /model has answered, before anything is drawn. Importers see the update (live binding).
export let CLASS_NAMES = [];

export function setClassNames(names) {
  CLASS_NAMES = names;
}

export const CLASS_COLOURS = [
  "#5c9dff", // nucleoplasm
  "#8ecbff", // nuclear membrane
  "#ff9f1c", // nucleoli
  "#ffd166", // nucleoli fibrillar center
  "#c77dff", // nuclear speckles
  "#ff70a6", // nuclear bodies
  "#f9f871", // endoplasmic reticulum
  "#ff5d5d", // golgi apparatus
  "#7bf1a8", // intermediate filaments
  "#ff8fab", // actin filaments
  "#3bf4fb", // microtubules
  "#e0aaff", // mitotic spindle
  "#fb5607", // centrosome
  "#00f5d4", // plasma membrane
  "#b5e48c", // mitochondria
  "#f15bb5", // aggresome
  "#4cc9f0", // cytosol
  "#fee440", // vesicles
  "#a0a8b4", // negative
];

/** Colour of a cell: its top label's, grey when nothing is called. */
export function cellColour(cell) {
  return cell.labels && cell.labels.length ? CLASS_COLOURS[cell.labels[0].class_id] : "#9aa3ad";
}

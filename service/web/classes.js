// The 19 classes of the HPA single-cell task and one colour each (bright, to read over a dark field).

export const CLASS_NAMES = [
  "Nucleoplasm",
  "Nuclear membrane",
  "Nucleoli",
  "Nucleoli fibrillar center",
  "Nuclear speckles",
  "Nuclear bodies",
  "Endoplasmic reticulum",
  "Golgi apparatus",
  "Intermediate filaments",
  "Actin filaments",
  "Microtubules",
  "Mitotic spindle",
  "Centrosome",
  "Plasma membrane",
  "Mitochondria",
  "Aggresome",
  "Cytosol",
  "Vesicles and punctate cytosolic patterns",
  "Negative",
];

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

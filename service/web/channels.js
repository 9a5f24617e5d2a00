// Channel files -> arrays -> coloured layers the view composites.
//
// JPEG and 8-bit colour PNG are decoded by the browser (createImageBitmap); grayscale and
// 16-bit PNG by png.js (exact samples); TIFF and anything else the browser cannot read by
// the service itself (POST /decode answers a grayscale PNG, read by png.js).

import { decodeRemote } from "./api.js";
import { decodePNG, pngHeader, pngSupported, toSingleChannel } from "./png.js";

export const CHANNELS = ["red", "green", "blue", "yellow"];

/** How each channel is coloured: red, green, blue, yellow = red + green (as the HPA website). */
const TINT = {
  red: (v) => 0xff000000 | v,
  green: (v) => 0xff000000 | (v << 8),
  blue: (v) => 0xff000000 | (v << 16),
  yellow: (v) => 0xff000000 | (v << 8) | v,
};

/** Longest side of the preview layers drawn when zoomed out. */
export const PREVIEW_SIDE = 1024;

export function makeCanvas(w, h) {
  if (typeof OffscreenCanvas !== "undefined") return new OffscreenCanvas(w, h);
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  return c;
}

function isJPEG(b) {
  return b[0] === 0xff && b[1] === 0xd8;
}

async function viaBitmap(file) {
  const bmp = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const { width, height } = bmp;
  const canvas = makeCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  bmp.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const data = new Uint8Array(width * height);
  for (let i = 0, j = 0; i < data.length; i++, j += 4) {
    const r = rgba[j];
    const g = rgba[j + 1];
    const b = rgba[j + 2];
    data[i] = r > g ? (r > b ? r : b) : g > b ? g : b; // tinted HPA files: max over colours
  }
  return { width, height, data, bits: 8 };
}

async function viaPNG(bytes) {
  const png = await decodePNG(bytes);
  return { width: png.width, height: png.height, data: toSingleChannel(png), bits: png.bitDepth };
}

/**
 * Read one channel file into samples.
 * @param {File|Blob} file
 * @param {string} channel red, green, blue or yellow (names the channel in errors)
 * @returns {Promise<{width: number, height: number, data: Uint8Array|Uint16Array, bits: number, via: string}>}
 */
export async function readChannel(file, channel) {
  const head = new Uint8Array(await file.slice(0, 64).arrayBuffer());
  const png = pngHeader(head);
  if (png && pngSupported(png) && (png.bitDepth === 16 || png.colorType === 0)) {
    try {
      return { ...(await viaPNG(new Uint8Array(await file.arrayBuffer()))), via: "page" };
    } catch {
      // fall through to the service's decoder, which names the problem
    }
  } else if (png || isJPEG(head)) {
    try {
      return { ...(await viaBitmap(file)), via: "browser" };
    } catch {
      // fall through
    }
  }
  return { ...(await viaPNG(await decodeRemote(file, channel))), via: "service" };
}

function stretch(ch) {
  const { data, bits } = ch;
  const levels = bits === 16 ? 65536 : 256;
  const hist = new Uint32Array(levels);
  const step = Math.max(1, Math.floor(Math.sqrt(data.length / 250000)));
  let n = 0;
  for (let i = 0; i < data.length; i += step) {
    hist[data[i]] += 1;
    n += 1;
  }
  const at = (q) => {
    const target = q * (n - 1);
    let acc = 0;
    for (let v = 0; v < levels; v++) {
      acc += hist[v];
      if (acc > target) return v;
    }
    return levels - 1;
  };
  const unit = bits === 16 ? 257 : 1;
  const lo = at(0.01);
  const hi = Math.max(at(0.995), lo + 40 * unit); // a channel of noise only stays dark
  const lut = new Uint8Array(levels);
  for (let v = 0; v < levels; v++) lut[v] = Math.max(0, Math.min(255, Math.round(((v - lo) / (hi - lo)) * 255)));
  return { lo, hi, lut };
}

/**
 * A coloured layer of one channel: full resolution and a preview.
 * @returns {{channel: string, full: OffscreenCanvas, preview: OffscreenCanvas, lo: number, hi: number, via: string}}
 */
export function buildLayer(channel, ch) {
  const { width, height, data } = ch;
  const { lo, hi, lut } = stretch(ch);
  const full = makeCanvas(width, height);
  const ctx = full.getContext("2d");
  const img = ctx.createImageData(width, height);
  const px = new Uint32Array(img.data.buffer);
  const tint = TINT[channel];
  const colour = new Uint32Array(256);
  for (let v = 0; v < 256; v++) colour[v] = tint(v) >>> 0;
  for (let i = 0; i < data.length; i++) px[i] = colour[lut[data[i]]];
  ctx.putImageData(img, 0, 0);
  const f = Math.min(1, PREVIEW_SIDE / Math.max(width, height));
  const preview = makeCanvas(Math.max(1, Math.round(width * f)), Math.max(1, Math.round(height * f)));
  const pctx = preview.getContext("2d");
  pctx.imageSmoothingQuality = "high";
  pctx.drawImage(full, 0, 0, preview.width, preview.height);
  return { channel, full, preview, lo, hi, via: ch.via, bits: ch.bits };
}

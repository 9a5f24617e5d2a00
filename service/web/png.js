// A small PNG decoder for what canvases cannot give exactly: 16-bit samples.
//
// Canvases hand back 8 bits per component, so a 16-bit channel image (and the
// "png16-signed" attribution maps of the API) would lose precision. This reads
// non-interlaced PNGs of colour type 0 (gray), 2 (RGB), 4 (gray + alpha) and
// 6 (RGBA) at 8 or 16 bits, with the browser's own inflate (DecompressionStream).

const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const CHANNELS = { 0: 1, 2: 3, 4: 2, 6: 4 };

/**
 * Read a PNG header without decoding pixels.
 * @param {Uint8Array} bytes
 * @returns {{width: number, height: number, bitDepth: number, colorType: number, interlace: number} | null}
 */
export function pngHeader(bytes) {
  if (bytes.length < 33 || SIGNATURE.some((v, i) => bytes[i] !== v)) return null;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    width: dv.getUint32(16),
    height: dv.getUint32(20),
    bitDepth: bytes[24],
    colorType: bytes[25],
    interlace: bytes[28],
  };
}

/** Whether decodePNG reads this header. */
export function pngSupported(header) {
  return !!header && header.interlace === 0 && (header.bitDepth === 8 || header.bitDepth === 16) &&
    header.colorType in CHANNELS;
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function paeth(a, b, c) {
  const p = a + b - c;
  const pa = Math.abs(p - a);
  const pb = Math.abs(p - b);
  const pc = Math.abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

function unfilter(raw, height, stride, bpp) {
  const out = new Uint8Array(height * stride);
  let q = 0;
  for (let y = 0; y < height; y++) {
    const type = raw[q++];
    const o = y * stride;
    const u = o - stride;
    switch (type) {
      case 0:
        out.set(raw.subarray(q, q + stride), o);
        break;
      case 1:
        for (let i = 0; i < stride; i++) out[o + i] = (raw[q + i] + (i >= bpp ? out[o + i - bpp] : 0)) & 255;
        break;
      case 2:
        for (let i = 0; i < stride; i++) out[o + i] = (raw[q + i] + (y > 0 ? out[u + i] : 0)) & 255;
        break;
      case 3:
        for (let i = 0; i < stride; i++) {
          const left = i >= bpp ? out[o + i - bpp] : 0;
          const up = y > 0 ? out[u + i] : 0;
          out[o + i] = (raw[q + i] + ((left + up) >> 1)) & 255;
        }
        break;
      case 4:
        for (let i = 0; i < stride; i++) {
          const left = i >= bpp ? out[o + i - bpp] : 0;
          const up = y > 0 ? out[u + i] : 0;
          const ul = y > 0 && i >= bpp ? out[u + i - bpp] : 0;
          out[o + i] = (raw[q + i] + paeth(left, up, ul)) & 255;
        }
        break;
      default:
        throw new Error(`PNG row ${y} has unknown filter type ${type}`);
    }
    q += stride;
  }
  return out;
}

/**
 * Decode a PNG.
 * @param {Uint8Array} bytes the file
 * @returns {Promise<{width: number, height: number, bitDepth: number, channels: number,
 *   data: Uint8Array | Uint16Array}>} samples row-major, interleaved
 */
export async function decodePNG(bytes) {
  const head = pngHeader(bytes);
  if (!head) throw new Error("not a PNG file");
  if (!pngSupported(head)) {
    throw new Error(`PNG colour type ${head.colorType} at ${head.bitDepth} bits (interlace ${head.interlace}) is not read here`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const parts = [];
  let total = 0;
  let p = 8;
  while (p + 8 <= bytes.length) {
    const len = dv.getUint32(p);
    const type = String.fromCharCode(bytes[p + 4], bytes[p + 5], bytes[p + 6], bytes[p + 7]);
    if (type === "IDAT") {
      parts.push(bytes.subarray(p + 8, p + 8 + len));
      total += len;
    }
    if (type === "IEND") break;
    p += 12 + len;
  }
  const idat = new Uint8Array(total);
  let o = 0;
  for (const part of parts) {
    idat.set(part, o);
    o += part.length;
  }
  const channels = CHANNELS[head.colorType];
  const bytesPerSample = head.bitDepth / 8;
  const bpp = channels * bytesPerSample;
  const stride = head.width * bpp;
  const raw = await inflate(idat);
  if (raw.length < head.height * (stride + 1)) throw new Error("PNG data is truncated");
  const px = unfilter(raw, head.height, stride, bpp);
  let data = px;
  if (head.bitDepth === 16) {
    data = new Uint16Array(px.length / 2);
    for (let i = 0, j = 0; i < data.length; i++, j += 2) data[i] = (px[j] << 8) | px[j + 1];
  }
  return { width: head.width, height: head.height, bitDepth: head.bitDepth, channels, data };
}

/**
 * One channel from a decoded PNG: gray as is, colour by the maximum over its colour components
 * (the service's rule for tinted HPA images); alpha is ignored.
 * @returns {Uint8Array | Uint16Array} width * height samples
 */
export function toSingleChannel(png) {
  const { channels, data } = png;
  if (channels === 1) return data;
  const n = png.width * png.height;
  const out = new data.constructor(n);
  const colours = channels >= 3 ? 3 : 1;
  for (let i = 0, j = 0; i < n; i++, j += channels) {
    let v = data[j];
    for (let k = 1; k < colours; k++) if (data[j + k] > v) v = data[j + k];
    out[i] = v;
  }
  return out;
}

/** Base64 -> bytes. */
export function fromBase64(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/**
 * Decode an attribution map of the API ("png16-signed": pixel = round(value / scale) + 32768).
 * @param {{encoding: string, shape: number[], scale: number, data: string}} map
 * @returns {Promise<{h: number, w: number, values: Float32Array}>}
 */
export async function decodeSignedMap(map) {
  if (map.encoding !== "png16-signed") throw new Error(`unknown map encoding ${map.encoding}`);
  const png = await decodePNG(fromBase64(map.data));
  if (png.bitDepth !== 16 || png.channels !== 1 || png.height !== map.shape[0] || png.width !== map.shape[1]) {
    throw new Error("the map is not a 16-bit gray PNG of the declared shape");
  }
  const values = new Float32Array(png.data.length);
  for (let i = 0; i < values.length; i++) values[i] = (png.data[i] - 32768) * map.scale;
  return { h: png.height, w: png.width, values };
}

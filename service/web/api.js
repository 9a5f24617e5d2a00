// Calls to the Locus API from the page: same origin, the key (when the service has keys) as a
// Bearer header on every call, and the API's JSON errors turned into ApiError.

const KEY_SLOT = "locus.apiKey";

export class ApiError extends Error {
  /**
   * @param {number} status HTTP status (0: no answer)
   * @param {{code?: string, message?: string, field?: string|null}} error the API's error body
   * @param {string|null} requestId
   */
  constructor(status, error, requestId = null) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.field = error.field || null;
    this.requestId = requestId;
  }
}

/** The key this tab uses (kept for the session only, never in the URL). */
export function getKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = body && body.error ? body.error : { message: `${response.status} ${response.statusText}` };
  return new ApiError(response.status, error, (body && body.request_id) || response.headers.get("x-request-id"));
}

/**
 * fetch() a path of this service with the key; resolves to the Response, rejects with ApiError.
 * @param {string} path
 * @param {RequestInit} init
 */
export async function apiFetch(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path) {
  return (await apiFetch(path)).json();
}

/**
 * POST the four channels to /classify with upload progress.
 * @param {Record<string, Blob>} files red, green, blue, yellow
 * @param {Record<string, string|number|boolean>} query options
 * @param {(phase: string, fraction: number) => void} onProgress "upload" (0-1) then "server"
 * @returns {Promise<object>} the JSON answer
 */
export function classify(files, query, onProgress = () => {}) {
  const form = new FormData();
  for (const c of ["red", "green", "blue", "yellow"]) form.append(c, files[c], files[c].name || `${c}`);
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== null && v !== undefined && v !== "") qs.set(k, String(v));
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/classify?${qs}`);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.responseType = "text";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress("upload", e.loaded / e.total);
    };
    xhr.upload.onload = () => onProgress("server", 0);
    xhr.onerror = () => reject(new ApiError(0, { code: "network", message: "the service did not answer (network error)" }));
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      if (xhr.status >= 200 && xhr.status < 300 && body) resolve(body);
      else {
        const error = body && body.error ? body.error : { message: `${xhr.status} ${xhr.statusText}` };
        reject(new ApiError(xhr.status, error, (body && body.request_id) || xhr.getResponseHeader("x-request-id")));
      }
    };
    xhr.send(form);
  });
}

/**
 * Decode one channel file with the service (POST /decode): for formats the browser cannot read.
 * @returns {Promise<Uint8Array>} a grayscale PNG
 */
export async function decodeRemote(file, channel) {
  const form = new FormData();
  form.append("image", file, file.name || channel);
  const r = await apiFetch(`/decode?channel=${encodeURIComponent(channel)}`, { method: "POST", body: form });
  return new Uint8Array(await r.arrayBuffer());
}

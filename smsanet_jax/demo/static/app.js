// The smsanet-jax demo page. Plain JavaScript, no build step; it talks only to its own server.
//
// The page keeps the hints as `colorize --hints` reads them ({x, y, a, b, radius}: x column and
// y row in the photo's pixels, raw Lab ab from the server), plus each one's swatch colour. After
// each edit it asks the server for the colorization (debounced; one request in flight at a time,
// the latest edit wins).
"use strict";

const DEBOUNCE_MS = 200;
const $ = (id) => document.getElementById(id);

const state = {
  file: null, // The File uploaded (kept to upload again if the server dropped the photo).
  name: "", // Its name, for the downloads.
  photo: null, // The server's id of the photo.
  width: 0,
  height: 0,
  hints: [], // [{x, y, a, b, radius, color}]
  selected: -1,
  resultUrl: null, // Object URL of the PNG shown.
  downloadUrl: null, // The server's URL of the same colorization as the file `colorize` writes.
  limits: null,
};
// An edit schedules an update; colour lookups (sRGB -> ab, on the server) hold it back until done.
const update = { timer: null, running: false, again: false, lookups: 0 };
const abCache = new Map();

// --- Server ----------------------------------------------------------------------------------

class ServerError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ServerError("cannot reach the demo server (is it still running?)", 0);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error || message;
    } catch (e) {
      // Not our JSON (e.g. uvicorn's own 503 text): keep the status line.
    }
    throw new ServerError(message, response.status);
  }
  return response;
}

function post(path, body) {
  return request(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function postJson(path, body) {
  return (await post(path, body)).json();
}

async function abOf(color) {
  if (!abCache.has(color)) {
    const { ab } = await postJson("/api/ab", { colors: [color] });
    abCache.set(color, ab[0]);
  }
  return abCache.get(color);
}

// --- Status and errors ---------------------------------------------------------------------------

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status").textContent = text;
  $("download-png").disabled = kind !== "ready" || !state.downloadUrl;
}

function showError(error) {
  $("error-text").textContent = error.message || String(error);
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// --- Photo -----------------------------------------------------------------------------------

async function uploadPhoto(file) {
  if (state.limits && file.size > state.limits.max_upload_bytes) {
    throw new ServerError(
      `file too large: the limit is ${state.limits.max_upload_bytes / 1e6} MB (start the demo with a larger --max-upload-mb)`,
      413,
    );
  }
  const response = await request("/api/photos", {
    method: "POST",
    headers: { "Content-Type": "application/octet-stream" },
    body: file,
  });
  const info = await response.json();
  state.photo = info.photo;
  return info;
}

async function openPhoto(file) {
  clearError();
  setStatus("working", `uploading ${file.name}…`);
  try {
    const info = await uploadPhoto(file);
    const fresh = { file, name: file.name, width: info.width, height: info.height, hints: [], selected: -1 };
    Object.assign(state, fresh, { downloadUrl: null });
    const gray = URL.createObjectURL(await (await request(`/api/photos/${info.photo}/gray.png`)).blob());
    $("gray").src = gray;
    $("before").src = gray;
    $("drop").hidden = true;
    $("workspace").hidden = false;
    $("tools").hidden = false;
    renderHints();
    scheduleUpdate(0);
  } catch (e) {
    setStatus(state.photo ? "ready" : "idle", state.photo ? "ready" : "No photo yet");
    showError(e);
  }
}

// --- Colorization ------------------------------------------------------------------------------

// The hints as `colorize --hints` reads them (a hint whose colour is still being looked up waits).
function hintsJson() {
  return state.hints.filter((h) => Number.isFinite(h.a)).map(({ x, y, a, b, radius }) => ({ x, y, a, b, radius }));
}

function scheduleUpdate(delay = DEBOUNCE_MS) {
  clearTimeout(update.timer);
  setStatus("working", "colorizing…");
  update.timer = setTimeout(runUpdate, delay);
}

async function runUpdate() {
  update.timer = null;
  if (update.running) {
    update.again = true;
    return;
  }
  update.running = true;
  update.again = false;
  const hints = hintsJson();
  try {
    let response;
    try {
      response = await post("/api/colorize", { photo: state.photo, hints });
    } catch (e) {
      if (e.status !== 404 || !state.file) throw e;
      await uploadPhoto(state.file); // The server dropped it for newer photos: send it again.
      response = await post("/api/colorize", { photo: state.photo, hints });
    }
    state.downloadUrl = `/api/photos/${state.photo}/results/${response.headers.get("X-Result")}.png`;
    showResult(await response.blob(), hints);
    if (!update.again) clearError();
  } catch (e) {
    showError(e);
  }
  update.running = false;
  if (update.again) runUpdate();
  else if (update.timer === null && update.lookups === 0) {
    setStatus(state.resultUrl ? "ready" : "error", state.resultUrl ? "up to date" : "failed");
  }
}

// The image shown, and (for scripts driving the page) the hints it was made with.
function showResult(blob, hints) {
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  $("result").src = state.resultUrl;
  $("result").dataset.hints = JSON.stringify(hints);
}

// --- Hints -------------------------------------------------------------------------------------

function pixelAt(event) {
  const box = $("gray").getBoundingClientRect();
  const clamp = (v, n) => Math.min(n - 1, Math.max(0, Math.floor(v)));
  return {
    x: clamp(((event.clientX - box.left) / box.width) * state.width, state.width),
    y: clamp(((event.clientY - box.top) / box.height) * state.height, state.height),
  };
}

function renderHints() {
  const markers = $("markers");
  const list = $("hint-list");
  markers.replaceChildren();
  list.replaceChildren();
  state.hints.forEach((hint, i) => {
    const marker = document.createElement("div");
    marker.className = "marker" + (i === state.selected ? " selected" : "");
    marker.dataset.index = String(i);
    marker.style.left = `${((hint.x + 0.5) / state.width) * 100}%`;
    marker.style.top = `${((hint.y + 0.5) / state.height) * 100}%`;
    // The square the hint fills: (2r+1) cells of the 256-cell grid, in each direction.
    marker.style.width = `${((2 * hint.radius + 1) / 256) * 100}%`;
    marker.style.height = `${((2 * hint.radius + 1) / 256) * 100}%`;
    marker.style.background = hint.color;
    marker.title = `(${hint.x}, ${hint.y}) a ${hint.a} b ${hint.b} radius ${hint.radius}`;
    markers.append(marker);

    const item = document.createElement("li");
    item.className = i === state.selected ? "selected" : "";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = hint.color;
    item.append(swatch, `(${hint.x}, ${hint.y}) r ${hint.radius}`);
    item.addEventListener("click", () => select(i));
    list.append(item);
  });
  $("delete").disabled = state.selected < 0;
}

function select(index) {
  state.selected = index;
  const hint = state.hints[index];
  if (hint) {
    $("color").value = hint.color;
    $("radius").value = String(hint.radius);
  }
  renderHints();
}

function addHint(event) {
  const hint = { ...pixelAt(event), radius: readRadius() };
  state.hints.push(hint);
  select(state.hints.length - 1);
  setColour(hint, $("color").value);
}

// The hint takes the colour at once; its ab follows from the server (the latest colour wins).
async function setColour(hint, color) {
  hint.color = color;
  renderHints();
  update.lookups += 1;
  setStatus("working", "colorizing…");
  try {
    const [a, b] = await abOf(color);
    if (hint.color === color) Object.assign(hint, { a, b });
  } catch (e) {
    showError(e);
  }
  update.lookups -= 1;
  scheduleUpdate();
}

function readRadius() {
  const radius = Math.round(Number($("radius").value));
  return Number.isFinite(radius) ? Math.min(16, Math.max(0, radius)) : 1;
}

function deleteSelected() {
  if (state.selected < 0) return;
  state.hints.splice(state.selected, 1);
  state.selected = -1;
  renderHints();
  scheduleUpdate();
}

// A pointer press on a marker drags it; on the photo elsewhere it adds a hint.
function onPointerDown(event) {
  if (event.button !== 0) return;
  const target = event.target.closest(".marker");
  if (!target) {
    addHint(event);
    return;
  }
  event.preventDefault();
  const index = Number(target.dataset.index);
  select(index);
  const marker = $("markers").children[index];
  marker.classList.add("dragging");
  marker.setPointerCapture(event.pointerId);
  let moved = false;
  marker.addEventListener("pointermove", (move) => {
    const { x, y } = pixelAt(move);
    const hint = state.hints[index];
    if (x === hint.x && y === hint.y) return;
    Object.assign(hint, { x, y });
    marker.style.left = `${((x + 0.5) / state.width) * 100}%`;
    marker.style.top = `${((y + 0.5) / state.height) * 100}%`;
    moved = true;
  });
  marker.addEventListener(
    "pointerup",
    () => {
      marker.classList.remove("dragging");
      renderHints();
      if (moved) scheduleUpdate();
    },
    { once: true },
  );
}

// --- Files -------------------------------------------------------------------------------------

function download(url, name) {
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
}

function stem() {
  return state.name.replace(/\.[^.]*$/, "") || "photo";
}

// The file `colorize` writes: the colorization shown, encoded as colorize encodes it.
function downloadPng() {
  if (state.downloadUrl) download(state.downloadUrl, `${stem()}.png`);
}

function downloadHints() {
  const blob = new Blob([JSON.stringify(hintsJson(), null, 1) + "\n"], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  download(url, `${stem()}.hints.json`);
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// A hints file is a list of points, or {image name: points}: this photo's entry (or the only one).
function pointsFor(content) {
  if (Array.isArray(content)) return content;
  if (content && typeof content === "object") {
    const names = Object.keys(content);
    if (state.name in content) return content[state.name];
    if (names.length === 1) return content[names[0]];
    throw new ServerError(`the hints file has no entry for ${state.name} (it has ${names.join(", ")})`, 400);
  }
  throw new ServerError("a hints file is a list of points or {image name: points}", 400);
}

async function loadHints(file) {
  clearError();
  try {
    let content;
    try {
      content = JSON.parse(await file.text());
    } catch (e) {
      throw new ServerError(`${file.name}: not valid JSON (${e.message})`, 400);
    }
    const checked = await postJson("/api/hints", { photo: state.photo, hints: pointsFor(content) });
    state.hints = checked.hints.map((hint, i) => ({ ...hint, color: checked.colors[i] }));
    state.selected = -1;
    renderHints();
    scheduleUpdate(0);
  } catch (e) {
    showError(e);
  }
}

// --- Wiring ------------------------------------------------------------------------------------

function onFiles(files) {
  if (files && files.length) openPhoto(files[0]);
}

function wire() {
  for (const id of ["file", "file2"]) {
    $(id).addEventListener("change", (e) => {
      onFiles(e.target.files);
      e.target.value = "";
    });
  }
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    onFiles(e.dataTransfer.files);
  });
  $("stage").addEventListener("pointerdown", onPointerDown);
  $("color").addEventListener("input", () => {
    const hint = state.hints[state.selected];
    if (hint) setColour(hint, $("color").value);
  });
  $("radius").addEventListener("change", () => {
    $("radius").value = String(readRadius());
    const hint = state.hints[state.selected];
    if (!hint) return;
    hint.radius = readRadius();
    renderHints();
    scheduleUpdate();
  });
  $("delete").addEventListener("click", deleteSelected);
  document.addEventListener("keydown", (e) => {
    if ((e.key === "Delete" || e.key === "Backspace") && e.target === document.body) deleteSelected();
  });
  $("clear").addEventListener("click", () => {
    state.hints = [];
    state.selected = -1;
    renderHints();
    scheduleUpdate();
  });
  $("split").addEventListener("input", showSplit);
  $("download-png").addEventListener("click", downloadPng);
  $("download-hints").addEventListener("click", downloadHints);
  $("load-hints").addEventListener("change", (e) => {
    if (e.target.files.length) loadHints(e.target.files[0]);
    e.target.value = "";
  });
  $("error-close").addEventListener("click", clearError);
  showSplit();
}

// The divider: "before" (gray) to its left, "after" (colour) to its right.
function showSplit() {
  const at = Number($("split").value);
  $("result").style.clipPath = `inset(0 0 0 ${at}%)`;
  $("divider").style.left = `${at}%`;
}

async function loadInfo() {
  try {
    state.limits = await (await request("/api/info")).json();
    $("model").textContent = `model: ${state.limits.model}`;
  } catch (e) {
    showError(e);
  }
}

wire();
loadInfo();

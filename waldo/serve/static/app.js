// Waldo's search page: plain ES module, no build step, no third-party code.
// Flow: pick/drop/paste a photo -> show it at once -> POST /search -> grid of thumbnails.
// The ranking toggle re-queries with each reranker the server offers (GET /stats: its names,
// descriptions and score kinds come from the server's reranker registry; none is named here), and
// a click on a result opens the pair side by side with the verifier's inlier lines. The index's
// default reranker (/stats default_reranker: chosen on validation when its training stored one)
// is preselected and marked.

const STAGES = [["extract", "Extract"], ["search", "Search"], ["rerank", "Rerank"]];

const $ = (id) => document.getElementById(id);
const state = {
  config: null,        // GET /stats: rerankers, reranker_info, default_reranker, limits, images
  file: null,          // the query photo (File or Blob)
  fileUrl: null,       // object URL of it, for the preview and the pair view
  mode: "none",        // the ranking shown; starts at the server's default_reranker
  cache: new Map(),    // "mode|k" -> search response, for the current file
  inflight: null,      // AbortController of the running search
};

// ----------------------------------------------------------------------------- start
init();

async function init() {
  wireInputs();
  try {
    const response = await fetch("/stats");
    state.config = await response.json();
  } catch (error) {
    $("index-info").textContent = "server unreachable";
    return;
  }
  const { images, model, rerankers, limits, default_reranker: preset } = state.config;
  if (rerankers.includes(preset)) state.mode = preset;
  for (const option of [...$("k-select").options]) { // offer only what the server allows
    if (Number(option.value) > limits.max_k) option.remove();
  }
  if (!$("k-select").options.length) $("k-select").add(new Option(String(limits.max_k)));
  $("index-info").textContent = `${images.toLocaleString()} images · ${model.backbone} · ${model.dim}-d`;
  renderModes(rerankers);
}

function wireInputs() {
  $("file-input").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) setQuery(file);
    event.target.value = ""; // choosing the same file again still fires "change"
  });
  const zone = $("dropzone");
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  // A drop anywhere on the page is a query; without this the browser would navigate to the file.
  window.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) setQuery(file); else showStatus("Drop an image file (JPEG, PNG, WebP…).", "error");
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setQuery(item.getAsFile());
  });
  $("k-select").addEventListener("change", () => search());
  $("pair-dialog").addEventListener("click", (event) => {
    if (event.target === $("pair-dialog")) $("pair-dialog").close(); // click on the backdrop
  });
}

function renderModes(rerankers) {
  const group = $("mode-toggle");
  group.replaceChildren();
  for (const mode of rerankers) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.mode = mode;
    button.setAttribute("role", "radio");
    button.textContent = modeName(mode);
    button.title = state.config.reranker_info[mode]?.description || "the global ranking alone";
    if (isValidatedDefault(mode)) {
      button.dataset.default = "true";
      button.title = `${DEFAULT_NOTE} · ${button.title}`;
      button.append(Object.assign(document.createElement("small"), { className: "default-mark", textContent: DEFAULT_NOTE }));
    }
    button.addEventListener("click", () => { state.mode = mode; updateModes(); search(); });
    group.append(button);
  }
  updateModes();
}

const DEFAULT_NOTE = "default (chosen on validation)";

// Whether ``mode`` is the index's default as its reranker's training chose it on validation
// (not merely the fallback to the global ranking).
function isValidatedDefault(mode) {
  const { default_reranker: preset, default_reranker_source: source } = state.config;
  return mode === preset && source === "validation";
}

function modeName(mode) {
  return mode === "none" ? "Global only" : mode;
}

// What a reranker's scores are, as the server's registry declares it ("inliers": counts, negative
// when the image was not verified); undefined for the global ranking.
function scoreKind(mode) {
  return state.config.reranker_info[mode]?.score;
}

function updateModes() {
  for (const button of $("mode-toggle").children) {
    button.setAttribute("aria-checked", String(button.dataset.mode === state.mode));
  }
}

// ----------------------------------------------------------------------------- query
function setQuery(file) {
  const limit = state.config?.limits.max_upload_bytes;
  if (limit && file.size > limit) {
    showStatus(`That file is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(limit / 1048576).toFixed(0)} MB.`, "error");
    return;
  }
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.file = file;
  state.fileUrl = URL.createObjectURL(file);
  state.cache.clear();
  const preview = $("query-preview");
  preview.src = state.fileUrl; // shown at once, before the server answers
  preview.hidden = false;
  $("dropzone").classList.add("has-image");
  search();
}

async function search() {
  if (!state.file) return;
  const k = Number($("k-select").value);
  const key = `${state.mode}|${k}`;
  if (state.cache.has(key)) { render(state.cache.get(key)); return; }
  state.inflight?.abort();
  const controller = new AbortController();
  state.inflight = controller;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "pasted.png");
  showStatus(`Searching (${modeName(state.mode)})…`, "busy");
  $("results").classList.add("stale");
  const started = performance.now();
  try {
    const response = await fetch(`/search?k=${k}&rerank=${encodeURIComponent(state.mode)}`,
      { method: "POST", body: form, signal: controller.signal });
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
    body.roundTripMs = performance.now() - started;
    state.cache.set(key, body);
    render(body);
  } catch (error) {
    if (error.name === "AbortError") return;
    $("results").classList.remove("stale");
    showStatus(error.message, "error");
  } finally {
    if (state.inflight === controller) state.inflight = null;
  }
}

// ----------------------------------------------------------------------------- results
function render(body) {
  const reranked = body.rerank !== "none";
  $("results-title").textContent = `Top ${body.results.length}`;
  // Verification says per hit what it found (`verified`, `inliers`); other rankings leave them null.
  const verifying = body.results.some((r) => r.verified !== null && r.verified !== undefined);
  const verified = verifying ? body.results.filter((r) => r.verified).length : null;
  $("results-note").textContent = reranked
    ? `Reranked with ${modeName(body.rerank)}${isValidatedDefault(body.rerank) ? ", the default" : ""}` +
      `${verified === null ? "" : ` (${verified} verified)`}; ` +
      (body.note ? `${body.note}; ` : "") +
      "badges show the move from the global ranking."
    : "Ranked by global-descriptor similarity. Click a result to compare.";
  // Bars show the global similarity (a cosine, comparable across modes); the number is the
  // score that ordered this list.
  const top = Math.max(...body.results.map((r) => r.global_score), 1e-9);
  const cards = body.results.map((result) => card(result, body.rerank, top));
  const grid = $("results");
  grid.replaceChildren(...cards);
  grid.dataset.rerank = body.rerank; // which ranking the grid shows (read by the browser test)
  grid.classList.remove("stale");
  renderTimings(body.timings, body.roundTripMs);
  showStatus(body.results.length ? "" : "The index is empty.", body.results.length ? "" : "error");
}

// The score in the words of the ranking that produced it (its kind comes from /stats).
function scoreText(result, mode) {
  const kind = scoreKind(mode);
  if (!kind) return result.score.toFixed(3);
  if (result.verified !== null && result.verified !== undefined) {
    // "verified" is the server's claim (same object); inliers alone are weaker evidence.
    if (result.verified) return `verified, ${result.inliers} inliers`;
    return result.inliers ? `${result.inliers} inliers, not verified` : "no geometric match";
  }
  if (kind === "inliers") return result.score >= 0 ? `${Math.round(result.score)} inliers` : "unverified";
  return `${kind} ${result.score.toFixed(2)}`;
}

function card(result, mode, topGlobal) {
  const reranked = mode !== "none";
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = result.id;
  node.dataset.rank = result.rank;
  node.dataset.identity = result.identity;
  node.dataset.label = result.label;
  const img = node.querySelector("img");
  img.src = `/thumbnails/${result.id}`;
  img.alt = result.label;
  node.querySelector(".rank-badge").textContent = `#${result.rank}`;
  node.querySelector(".label").textContent = result.label || "(no label)";
  node.querySelector(".label").title = `identity ${result.identity} · id ${result.id}`;
  node.querySelector(".score-value").textContent = scoreText(result, mode);
  node.querySelector(".score").title = `global similarity ${result.global_score.toFixed(3)}`;
  const share = Math.max(0.04, Math.min(1, result.global_score / topGlobal));
  node.querySelector(".score-bar i").style.width = `${(share * 100).toFixed(1)}%`;
  if (reranked) {
    const move = node.querySelector(".move");
    const delta = result.rank_before_rerank - result.rank;
    move.hidden = false;
    move.className = `move ${delta > 0 ? "up" : delta < 0 ? "down" : "same"}`;
    move.textContent = delta > 0 ? `▲${delta}` : delta < 0 ? `▼${-delta}` : "=";
    move.title = `global rank #${result.rank_before_rerank}`;
    if (delta !== 0) move.append(Object.assign(document.createElement("small"), { textContent: ` was #${result.rank_before_rerank}` }));
  }
  node.querySelector("button").addEventListener("click", () => openPair(result));
  return node;
}

function renderTimings(timings, roundTripMs) {
  const box = $("timings");
  box.hidden = false;
  const stages = STAGES.map(([key, name]) => [key, name, (timings[key] || 0) + (key === "extract" ? timings.decode || 0 : 0)]);
  const sum = stages.reduce((acc, [, , ms]) => acc + ms, 0) || 1;
  $("timing-bar").replaceChildren(...stages.map(([key, name, ms]) => {
    const part = document.createElement("span");
    part.className = `stage-${key}`;
    part.style.flexGrow = String(ms / sum);
    part.title = `${name}: ${ms.toFixed(1)} ms`;
    return part;
  }));
  const rows = stages.map(([key, name, ms]) => [name, `${ms.toFixed(1)} ms`, key]);
  rows.push(["Server", `${(timings.total || 0).toFixed(0)} ms`, "total"]);
  if (roundTripMs) rows.push(["Round trip", `${roundTripMs.toFixed(0)} ms`, "trip"]);
  $("timing-legend").replaceChildren(...rows.flatMap(([name, value, key]) => {
    const term = Object.assign(document.createElement("dt"), { textContent: name, className: `stage-${key}` });
    const detail = Object.assign(document.createElement("dd"), { textContent: value });
    detail.dataset.stage = key;
    return [term, detail];
  }));
}

function showStatus(message, kind = "") {
  const status = $("status");
  status.textContent = message;
  status.className = `status ${kind}`;
}

// ----------------------------------------------------------------------------- pair view
async function openPair(result) {
  const dialog = $("pair-dialog");
  $("pair-title").textContent = `#${result.rank} · ${result.label}`;
  $("pair-note").textContent = "Verifying…";
  $("pair-note").className = "pair-note";
  const facts = [["score", result.score.toFixed(4)], ["global score", result.global_score.toFixed(4)],
    ["global rank", `#${result.rank_before_rerank}`], ["identity", result.identity], ["id", result.id],
    ["file", result.path.split("/").slice(-2).join("/")]];
  $("pair-facts").replaceChildren(...facts.map(([k, v]) => {
    const group = document.createElement("div"); // <dl> allows one <div> per term/detail pair
    group.append(Object.assign(document.createElement("dt"), { textContent: k }),
      Object.assign(document.createElement("dd"), { textContent: String(v) }));
    return group;
  }));
  dialog.showModal();
  let query, stored;
  try {
    // A stored format the browser cannot show (TIFF, PPM) falls back to its JPEG thumbnail;
    // the lines are scaled to whatever size is shown.
    [query, stored] = await Promise.all([loadImage(state.fileUrl),
      loadImage(`/images/${result.id}`).catch(() => loadImage(`/thumbnails/${result.id}`))]);
  } catch (error) {
    $("pair-note").textContent = error.message;
    return;
  }
  drawPair(query, stored, null);
  try {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "pasted.png");
    const response = await fetch(`/match/${result.id}`, { method: "POST", body: form });
    const match = await response.json();
    if (!response.ok) throw new Error(match.detail || `HTTP ${response.status}`);
    if (match.available) {
      drawPair(query, stored, match);
      $("pair-note").textContent = `Geometric verification: ${match.message}.`;
      $("pair-note").className = `pair-note ${match.verified ? "verified" : ""}`;
    } else {
      $("pair-note").textContent = match.message || "No geometric verification for this pair.";
    }
  } catch (error) {
    $("pair-note").textContent = `Could not verify: ${error.message}`;
  }
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`cannot load ${url}`));
    image.src = url;
  });
}

// Both images side by side at one height; inlier lines join matching points across them.
function drawPair(query, stored, match) {
  const canvas = $("pair-canvas");
  const stage = canvas.parentElement;
  const gap = 16;
  const height = Math.min(420, window.innerHeight * 0.55);
  const scaleQ = height / query.naturalHeight;
  const scaleS = height / stored.naturalHeight;
  const width = query.naturalWidth * scaleQ + gap + stored.naturalWidth * scaleS;
  const fit = Math.min(1, (stage.clientWidth || width) / width); // shrink to the dialog's width
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * fit * ratio);
  canvas.height = Math.round(height * fit * ratio);
  canvas.style.width = `${width * fit}px`;
  canvas.style.height = `${height * fit}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio * fit, 0, 0, ratio * fit, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const offset = query.naturalWidth * scaleQ + gap;
  ctx.drawImage(query, 0, 0, query.naturalWidth * scaleQ, height);
  ctx.drawImage(stored, offset, 0, stored.naturalWidth * scaleS, height);
  if (!match) return;
  // Lines are in each image's own pixels as the server saw it; rescale if sizes differ.
  const [qw, qh] = match.query_size.length ? match.query_size : [query.naturalWidth, query.naturalHeight];
  const [sw, sh] = match.image_size.length ? match.image_size : [stored.naturalWidth, stored.naturalHeight];
  if (match.outline.length === 4) { // where the query's keypoints land under the fitted model
    ctx.save();
    ctx.beginPath();
    ctx.rect(offset, 0, stored.naturalWidth * scaleS, height); // keep the outline on its image
    ctx.clip();
    ctx.strokeStyle = "rgba(255, 210, 0, 0.95)";
    ctx.lineWidth = 2.5;
    ctx.beginPath();
    match.outline.forEach(([x, y], i) => {
      const px = offset + x * (stored.naturalWidth / sw) * scaleS, py = y * (stored.naturalHeight / sh) * scaleS;
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.closePath(); ctx.stroke();
    ctx.restore();
  }
  ctx.lineWidth = 1.5;
  match.lines.forEach(([xq, yq, xs, ys], i) => {
    // Verified matches get distinct bright hues; unverified ones stay grey (noise, not evidence).
    ctx.strokeStyle = match.verified ? `hsla(${(i * 47) % 360}, 90%, 55%, 0.85)` : "rgba(200, 200, 210, 0.6)";
    ctx.fillStyle = ctx.strokeStyle;
    const ax = xq * (query.naturalWidth / qw) * scaleQ, ay = yq * (query.naturalHeight / qh) * scaleQ;
    const bx = offset + xs * (stored.naturalWidth / sw) * scaleS, by = ys * (stored.naturalHeight / sh) * scaleS;
    ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
    for (const [x, y] of [[ax, ay], [bx, by]]) { ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill(); }
  });
}

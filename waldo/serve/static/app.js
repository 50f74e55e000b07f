// Waldo's search page: plain ES module, no build step, no third-party code.
// Flow: pick/drop/paste a photo -> show it at once -> POST /search -> grid of thumbnails.
// The ranking toggle re-queries with each reranker the server offers (GET /stats: their titles,
// descriptions and score kinds come from the server's reranker registry; none is named here), and
// a click on a result opens the pair side by side with the verifier's inlier lines. The index's
// default reranker (/stats default_reranker: chosen on validation when its training stored one)
// is preselected and marked, and every new photo starts on it again.

const STAGES = [["extract", "Extract"], ["search", "Search"], ["rerank", "Rerank"]];

// Score kinds (/stats score_kinds) the page scales or words differently; any other kind is
// treated like a similarity (higher is better, shown relative to the top of the list).
const KIND_INLIERS = "inliers";
const KIND_RRT_PROBABILITY = "RRT probability";
const KIND_GEOMETRY_BONUS = "similarity + geometry bonus";
const KIND_LOCAL_MATCH = "similarity + matched cells"; // the pair view draws its matched cells
const MIN_BAR = 0.04; // the shortest bar, so that a hit with nothing to show still shows a bar
const GLOBAL_ONLY = "none"; // the API's rerank value for the global ranking alone (not a reranker)

const $ = (id) => document.getElementById(id);
const state = {
  config: null,        // GET /stats: rerankers, reranker_info, score_kinds, default_reranker, limits, images
  file: null,          // the query photo (File or Blob)
  fileUrl: null,       // object URL of it, for the preview and the pair view
  mode: GLOBAL_ONLY,   // the ranking shown; each new photo starts at the server's default_reranker
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
  const { images, model, rerankers, limits } = state.config;
  state.mode = defaultMode();
  for (const option of [...$("k-select").options]) { // offer only what the server allows
    if (Number(option.value) > limits.max_k) option.remove();
  }
  if (!$("k-select").options.length) $("k-select").add(new Option(String(limits.max_k)));
  $("index-info").textContent = `${images.toLocaleString()} images · ${model.backbone} · ${model.dim}-d`;
  $("intro").textContent = "Finds other photos of the very object in your photo (the same product, book or " +
    `building, not merely look-alikes) among the ${images.toLocaleString()} indexed images.`;
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
    if (file) setQuery(file); else rejectFile("Drop an image file (JPEG, PNG, WebP…).");
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setQuery(item.getAsFile());
  });
  // The preview appears only once the browser has decoded the photo: a file it cannot show
  // (TIFF, PPM, or not an image at all) gets a note instead of a broken-image icon.
  const preview = $("query-preview");
  preview.addEventListener("load", () => {
    if (preview.src !== state.fileUrl) return; // a previous photo, replaced meanwhile
    preview.hidden = false;
    zone.classList.add("has-image");
  });
  preview.addEventListener("error", () => {
    if (!preview.getAttribute("src") || preview.src !== state.fileUrl) return;
    hidePreview();
    showDropzoneNote(`${state.file?.name || "This file"}: no preview, the browser cannot show it.`);
  });
  $("k-select").addEventListener("change", () => search());
  $("pair-dialog").addEventListener("click", (event) => {
    if (event.target === $("pair-dialog")) $("pair-dialog").close(); // click on the backdrop
  });
}

// ----------------------------------------------------------------------------- ranking modes
function renderModes(rerankers) {
  const group = $("mode-toggle");
  group.replaceChildren();
  for (const mode of rerankers) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.mode = mode;
    button.setAttribute("role", "radio");
    button.textContent = modeTitle(mode);
    button.title = modeDescription(mode);
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

// The ranking a new photo starts on: the index's default when the server offers it.
function defaultMode() {
  const { rerankers = [], default_reranker: preset } = state.config || {};
  return rerankers.includes(preset) ? preset : (rerankers[0] ?? state.mode);
}

// Whether ``mode`` is the index's default as its reranker's training chose it on validation
// (not merely the fallback to the global ranking).
function isValidatedDefault(mode) {
  const { default_reranker: preset, default_reranker_source: source } = state.config || {};
  return mode === preset && source === "validation";
}

// The short name people see ("Geometric", "RRT + global"), from the server's registry.
function modeTitle(mode) {
  return state.config?.reranker_info?.[mode]?.title || mode;
}

// The registry's description as a sentence: it is written as a clause ("matches keypoints…").
function modeDescription(mode) {
  return asSentence(state.config?.reranker_info?.[mode]?.description || "");
}

function asSentence(text) {
  const trimmed = text.trim();
  if (!trimmed) return "";
  const capital = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function updateModes() {
  for (const button of $("mode-toggle").children) {
    button.setAttribute("aria-checked", String(button.dataset.mode === state.mode));
  }
  // Visible on the page, not only as a tooltip: what the chosen ranking does.
  const explanation = $("mode-explanation");
  const description = modeDescription(state.mode);
  explanation.replaceChildren();
  if (description) {
    explanation.append(Object.assign(document.createElement("strong"), { textContent: modeTitle(state.mode) }),
      `: ${description}`);
  }
  explanation.hidden = !description;
}

// ----------------------------------------------------------------------------- query
function setQuery(file) {
  const limit = state.config?.limits.max_upload_bytes;
  if (limit && file.size > limit) {
    rejectFile(`That file is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(limit / 1048576).toFixed(0)} MB.`);
    return;
  }
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.file = file;
  state.fileUrl = URL.createObjectURL(file);
  state.cache.clear();
  // The ranking chosen for the previous photo does not carry over: each photo starts on the
  // index's default (a click on another mode still re-ranks this photo, cached as before).
  state.mode = defaultMode();
  updateModes();
  clearDropzoneMessages();
  hidePreview();
  $("query-preview").src = state.fileUrl; // decoded at once, shown on "load" before the server answers
  // The old results belong to another photo: remove them rather than leave them beside this one.
  clearResults("Searching…");
  search();
}

// A new file the page will not search (too large, not an image): the previous photo and its
// results go too, so nothing on the page seems to belong to the rejected file.
function rejectFile(message) {
  state.inflight?.abort();
  state.inflight = null;
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.file = null;
  state.fileUrl = null;
  state.cache.clear();
  hidePreview();
  clearDropzoneMessages();
  clearResults("No results: choose another photo.");
  showError(message);
}

async function search() {
  if (!state.file) return;
  const k = Number($("k-select").value);
  const key = `${state.mode}|${k}`;
  state.inflight?.abort(); // a slower answer for another mode must not replace this one
  state.inflight = null;
  if (state.cache.has(key)) { render(state.cache.get(key)); return; }
  const controller = new AbortController();
  state.inflight = controller;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "pasted.png");
  showStatus(`Searching (${modeTitle(state.mode)})…`, "busy");
  $("dropzone-error").hidden = true;
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
    // Results, note and timings of an earlier search would read as this one's: clear them.
    clearResults("No results: the search failed (the reason is shown with your photo).");
    showError(`Could not search this photo: ${error.message}`);
  } finally {
    if (state.inflight === controller) state.inflight = null;
  }
}

// ----------------------------------------------------------------------------- drop zone
function hidePreview() {
  const preview = $("query-preview");
  preview.hidden = true;
  preview.removeAttribute("src"); // no "error" event, unlike src = ""
  $("dropzone").classList.remove("has-image");
}

function showDropzoneNote(message) {
  $("dropzone-note").textContent = message;
  $("dropzone-note").hidden = false;
}

function clearDropzoneMessages() {
  for (const id of ["dropzone-note", "dropzone-error"]) {
    $(id).textContent = "";
    $(id).hidden = true;
  }
}

// An error about the query shows where the photo is (an alert, read out by screen readers); the
// status line only points there.
function showError(message) {
  $("dropzone-error").textContent = message;
  $("dropzone-error").hidden = false;
  $("dropzone").classList.add("failed");
  showStatus("Not searched: see the message in the photo box.", "error");
}

// ----------------------------------------------------------------------------- results
function clearResults(note) {
  const grid = $("results");
  grid.replaceChildren();
  grid.classList.remove("stale");
  delete grid.dataset.rerank;
  $("results-title").textContent = "Results";
  $("results-note").textContent = note;
  $("score-legend").hidden = true;
  $("timings").hidden = true;
  $("dropzone").classList.remove("failed");
  showStatus("");
}

function render(body) {
  const kind = body.score_kind || state.config?.reranker_info?.[body.rerank]?.score || "similarity";
  $("results-title").textContent = `Top ${body.results.length}`;
  $("results-note").textContent = resultsNote(body, kind);
  const meaning = state.config?.score_kinds?.[kind];
  $("score-legend").textContent = `Bars and numbers: ${kind}${meaning ? ` (${meaning})` : ""}.`;
  $("score-legend").hidden = !body.results.length;
  const shares = barShares(body.results.map((r) => r.score), kind);
  const cards = body.results.map((result, i) => card(result, body, kind, shares[i]));
  const grid = $("results");
  grid.replaceChildren(...cards);
  grid.dataset.rerank = body.rerank; // which ranking the grid shows (read by the browser test)
  grid.classList.remove("stale");
  $("dropzone").classList.remove("failed");
  $("dropzone-error").hidden = true;
  renderTimings(body.timings, body.roundTripMs);
  showStatus(body.results.length ? "" : "The index is empty.", body.results.length ? "" : "error");
}

// One line on what ordered the list, and what verification found (with a reason when nothing).
function resultsNote(body, kind) {
  if (body.rerank === GLOBAL_ONLY && !body.note) {
    return "Ranked by overall similarity of the photos. Click a result to compare it with yours.";
  }
  const parts = [`Reranked with ${modeTitle(body.rerank)}${isValidatedDefault(body.rerank) ? ", the default" : ""}`];
  const verifying = body.results.some((r) => r.verified !== null && r.verified !== undefined);
  if (verifying) {
    const verified = body.results.filter((r) => r.verified).length;
    const matched = body.results.filter((r) => hasGeometricMatch(r, kind)).length;
    let found = `${verified} verified`;
    if (!verified) found = `${matched} with a geometric match, none strong enough to call verified`;
    else if (matched > verified) found += `, ${matched - verified} more with a weaker geometric match`;
    parts.push(matched ? found : (body.note ? "" : "no geometric match — order unchanged"));
  }
  // The server's note says why (e.g. "no geometric match: global order kept").
  if (body.note) parts.push(body.note.replace(": ", " — "));
  return `${parts.filter(Boolean).join("; ")}. Badges show each photo's move from the global ranking.`;
}

// Whether verification found geometric evidence for ``result`` (enough inliers to move it), as
// the score kind reveals it; "verified" is the stricter claim that it is the same object.
function hasGeometricMatch(result, kind) {
  if (result.verified) return true;
  if (kind === KIND_INLIERS) return result.score > 0; // 0: no match, kept in the prior order
  if (kind === KIND_GEOMETRY_BONUS) return result.score > result.global_score + 1e-6; // got the bonus
  return false;
}

// Each bar's length in [MIN_BAR, 1] from the score that ordered the list, so that bars shrink
// with rank: probabilities as they are, inlier counts relative to the most inliers, any other
// kind (similarities) relative to the top score, measured from 0 or from the lowest score if
// that is negative.
function barShares(scores, kind) {
  if (!scores.length) return [];
  let shares;
  if (kind === KIND_RRT_PROBABILITY) {
    shares = scores;
  } else if (kind === KIND_INLIERS) {
    const most = Math.max(...scores);
    shares = scores.map((s) => (most > 0 ? s / most : 0));
  } else {
    const top = Math.max(...scores);
    const floor = Math.min(0, ...scores);
    shares = scores.map((s) => (top > floor ? (s - floor) / (top - floor) : 1));
  }
  return shares.map((s) => Math.max(MIN_BAR, Math.min(1, s)));
}

// The score that ordered the list, with its unit ("similarity 0.812", "37 inliers").
function scoreWithUnit(score, kind) {
  if (kind === KIND_INLIERS) return score > 0 ? `${Math.round(score)} inliers` : "0 inliers (no geometric match)";
  if (kind === KIND_RRT_PROBABILITY) return `${kind} ${score.toFixed(2)}`;
  return `${kind} ${score.toFixed(3)}`;
}

// The same, short enough for a card (the legend above the grid names the kind).
function scoreOnCard(score, kind) {
  if (kind === KIND_INLIERS) return score > 0 ? `${Math.round(score)} inliers` : "no match";
  return score.toFixed(kind === KIND_RRT_PROBABILITY ? 2 : 3);
}

// What geometric verification found for one hit; "" where it did not run.
function verificationText(result, kind) {
  if (result.verified === null || result.verified === undefined) return "";
  if (result.verified) return `✓ verified · ${result.inliers} inliers`;
  if (hasGeometricMatch(result, kind)) return `${result.inliers} inliers · not verified`;
  return result.inliers ? `no geometric match (${result.inliers} inliers, too few)` : "no geometric match";
}

// The label, and the identity only where it says something the label does not.
function labelTooltip(result) {
  const label = result.label || "(no label)";
  return result.identity && result.identity !== result.label ? `${label} (identity ${result.identity})` : label;
}

function card(result, body, kind, share) {
  const reranked = body.rerank !== GLOBAL_ONLY;
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = result.id;
  node.dataset.rank = result.rank;
  node.dataset.identity = result.identity;
  node.dataset.label = result.label;
  const img = node.querySelector("img");
  img.addEventListener("error", () => { img.hidden = true; }, { once: true }); // grey tile, no broken icon
  img.src = `/thumbnails/${result.id}`;
  img.alt = result.label;
  node.querySelector(".card-button").title = labelTooltip(result);
  node.querySelector(".rank-badge").textContent = `#${result.rank}`;
  node.querySelector(".label").textContent = result.label || "(no label)";
  const check = node.querySelector(".check");
  check.textContent = verificationText(result, kind);
  check.hidden = !check.textContent;
  check.classList.toggle("verified", Boolean(result.verified));
  node.querySelector(".score-value").textContent = scoreOnCard(result.score, kind);
  node.querySelector(".score").title = `${scoreWithUnit(result.score, kind)} (ordered this list)` +
    ` · global similarity ${result.global_score.toFixed(3)}`;
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
  node.querySelector("button").addEventListener("click", () => openPair(result, kind));
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
async function openPair(result, kind) {
  const dialog = $("pair-dialog");
  $("pair-title").textContent = `#${result.rank} · ${result.label}`;
  const cells = kind === KIND_LOCAL_MATCH; // show what ranked it: local-match's cells, else the verifier's inliers
  $("pair-note").textContent = cells ? "Matching cells…" : "Verifying…";
  $("pair-note").className = "pair-note";
  // Every number says what it is: the score that ranked this hit with its unit, then the rest.
  const facts = [
    ["label", labelTooltip(result)],
    ["ranked by", scoreWithUnit(result.score, kind)],
    ["rank", result.rank_before_rerank === result.rank ? `#${result.rank}` : `#${result.rank} (global rank #${result.rank_before_rerank})`],
    ["global similarity", result.global_score.toFixed(3)],
  ];
  const verification = verificationText(result, kind);
  if (verification) facts.push(["geometric verification", verification]);
  if (result.rrt_score !== null && result.rrt_score !== undefined) {
    facts.push(["RRT probability", `${result.rrt_score.toFixed(2)} that both show the same object`]);
  }
  facts.push(["file", result.path.split("/").slice(-2).join("/")]);
  $("pair-facts").replaceChildren(...facts.map(([k, v]) => {
    const group = document.createElement("div"); // <dl> allows one <div> per term/detail pair
    group.append(Object.assign(document.createElement("dt"), { textContent: k }),
      Object.assign(document.createElement("dd"), { textContent: String(v) }));
    return group;
  }));
  dialog.showModal();
  // A stored format the browser cannot show (TIFF, PPM) falls back to its JPEG thumbnail; a
  // query it cannot show is drawn as a grey box. The lines are scaled to whatever is shown.
  const [query, stored] = await Promise.all([loadImage(state.fileUrl).catch(() => null),
    loadImage(`/images/${result.id}`).catch(() => loadImage(`/thumbnails/${result.id}`)).catch(() => null)]);
  if (!stored) {
    $("pair-note").textContent = "Could not load the indexed image.";
    return;
  }
  drawPair(query, stored, null);
  try {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "pasted.png");
    const response = await fetch(`/match/${result.id}${cells ? "?method=cells" : ""}`, { method: "POST", body: form });
    const match = await response.json();
    if (!response.ok) throw new Error(match.detail || `HTTP ${response.status}`);
    if (match.available) {
      drawPair(query, stored, match);
      $("pair-note").textContent = `${cells ? "Local match" : "Geometric verification"}: ${match.message}.`;
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

// Both images side by side at one height; inlier lines join matching points across them. A
// query the browser cannot decode (``null``) is a grey square, without lines on it.
function drawPair(query, stored, match) {
  const canvas = $("pair-canvas");
  const stage = canvas.parentElement;
  const gap = 16;
  const height = Math.min(420, window.innerHeight * 0.55);
  const [queryWidth, queryHeight] = query ? [query.naturalWidth, query.naturalHeight] : [1, 1];
  const scaleQ = height / queryHeight;
  const scaleS = height / stored.naturalHeight;
  const width = queryWidth * scaleQ + gap + stored.naturalWidth * scaleS;
  const fit = Math.min(1, (stage.clientWidth || width) / width); // shrink to the dialog's width
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * fit * ratio);
  canvas.height = Math.round(height * fit * ratio);
  canvas.style.width = `${width * fit}px`;
  canvas.style.height = `${height * fit}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio * fit, 0, 0, ratio * fit, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const offset = queryWidth * scaleQ + gap;
  if (query) {
    ctx.drawImage(query, 0, 0, queryWidth * scaleQ, height);
  } else {
    ctx.fillStyle = "rgba(128, 128, 140, 0.35)";
    ctx.fillRect(0, 0, queryWidth * scaleQ, height);
    ctx.fillStyle = "rgba(90, 90, 100, 1)";
    ctx.font = "14px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("your photo: no preview", (queryWidth * scaleQ) / 2, height / 2);
  }
  ctx.drawImage(stored, offset, 0, stored.naturalWidth * scaleS, height);
  if (!match) return;
  // Lines are in each image's own pixels as the server saw it; rescale if sizes differ.
  const [qw, qh] = match.query_size.length ? match.query_size : [queryWidth, queryHeight];
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
  if (!query) return; // nowhere to anchor the query's end of each line
  ctx.lineWidth = 1.5;
  match.lines.forEach(([xq, yq, xs, ys], i) => {
    // Verified matches get distinct bright hues; unverified ones stay grey (noise, not evidence).
    // Matched cells are the evidence local-match weighed: coloured like verified inliers.
    const evidence = match.verified || match.method === "cells";
    ctx.strokeStyle = evidence ? `hsla(${(i * 47) % 360}, 90%, 55%, 0.85)` : "rgba(200, 200, 210, 0.6)";
    ctx.fillStyle = ctx.strokeStyle;
    const ax = xq * (queryWidth / qw) * scaleQ, ay = yq * (queryHeight / qh) * scaleQ;
    const bx = offset + xs * (stored.naturalWidth / sw) * scaleS, by = ys * (stored.naturalHeight / sh) * scaleS;
    ctx.beginPath(); ctx.moveTo(ax, ay); ctx.lineTo(bx, by); ctx.stroke();
    for (const [x, y] of [[ax, ay], [bx, by]]) { ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill(); }
  });
}

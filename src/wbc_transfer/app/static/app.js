// wbc-transfer app: the page's behaviour (plain JavaScript, no build step). Server: app/server.py.
"use strict";

const $ = (id) => document.getElementById(id);
const body = document.body;
const LIMITS = {images: Number(body.dataset.maxImages), mb: Number(body.dataset.maxUploadMb)};
// row keys shown in their own places; any other key (e.g. `set`) is shown as an extra field
const KNOWN = new Set(["index", "path", "predicted", "confidence", "review", "note", "error",
  "explanation"]);
const POLL_MS = 150;

const state = {chosen: [], batch: null, rows: [], classes: [], corrections: {}, threshold: 0,
  cards: [], open: null, order: "index"};

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function say(text, isError = true) {
  $("message").textContent = text || "";
  $("message").classList.toggle("error", Boolean(text) && isError);
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

async function errorText(response) {
  try {
    const data = await response.json();
    return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// ---------------------------------------------------------------- models and the model card

async function loadModels() {
  const response = await fetch("/api/models");
  const data = await response.json();
  const select = $("model");
  for (const choice of data.choices) {
    const option = el("option", null, choice.label);
    option.value = choice.uri;
    select.append(option);
  }
  select.value = data.default;
  select.addEventListener("change", loadCard);
  await loadCard();
}

async function loadCard() {
  const uri = $("model").value;
  const box = $("card");
  box.replaceChildren(el("span", "hint", "reading the registry…"));
  const response = await fetch(`/api/card?uri=${encodeURIComponent(uri)}`);
  if (!response.ok) {
    box.replaceChildren(el("span", "error", await errorText(response)));
    return;
  }
  const card = await response.json();
  renderCard(card);
  setThreshold(card.review_threshold ?? 0);
}

function renderCard(card) {
  const box = $("card");
  const head = el("p", "card-head");
  head.append(el("strong", null, card.name ? `${card.name} version ${card.version}` : card.uri));
  if (card.aliases && card.aliases.length) head.append(` · aliases: ${card.aliases.join(", ")}`);
  if (card.run_name) head.append(` · run ${card.run_name}`);
  const parts = [head];
  if (card.description) parts.push(el("p", "hint", card.description));
  const trained = Object.entries(card.trained_on || {});
  if (trained.length || (card.datasets || []).length) {
    const list = el("dl", "trained-on");
    for (const [key, value] of trained) {
      list.append(el("dt", null, key.replaceAll("_", " ")), el("dd", null, value));
    }
    if ((card.datasets || []).length) {
      list.append(el("dt", null, "datasets"), el("dd", null, card.datasets.join(", ")));
    }
    parts.push(list);
  }
  if ((card.figures || []).length) {
    const table = el("table", "figures");
    const header = el("tr");
    for (const h of ["set", "kind", "cells", "accuracy [95% CI]", "macro-F1 [95% CI]"]) {
      header.append(el("th", null, h));
    }
    table.append(header);
    for (const f of card.figures) {
      const row = el("tr");
      const ci = (v, c) => `${fmt(v)}${c ? ` [${fmt(c[0])}, ${fmt(c[1])}]` : ""}`;
      row.append(el("td", null, f.set), el("td", null, f.kind),
        el("td", null, f.n_cells === null ? "–" : Math.round(f.n_cells)),
        el("td", null, ci(f.accuracy, f.accuracy_ci)), el("td", null, ci(f.f1_macro, f.f1_macro_ci)));
      table.append(row);
    }
    parts.push(table, el("p", "hint", "Figures as the evaluate stage logged them in the "
      + "model's run; intervals resample cells (cluster bootstrap)."));
  } else if (card.name) {
    parts.push(el("p", "hint", "No evaluation figures in this model's run."));
  }
  box.replaceChildren(...parts);
}

// ---------------------------------------------------------------- choosing and uploading files

function choose(entries) {
  state.chosen = entries;
  const bytes = entries.reduce((s, e) => s + e.file.size, 0);
  $("chosen").textContent = entries.length
    ? `${entries.length} file(s), ${(bytes / 2 ** 20).toFixed(1)} MiB` : "or drop files here";
  $("classify").disabled = entries.length === 0;
  say("");
}

function fromInput(input) {
  return Array.from(input.files, (file) => ({file, path: file.webkitRelativePath || file.name}));
}

async function fromDrop(items) {  // files and folders dropped on the page
  const out = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((ok, fail) => entry.file(ok, fail));
      out.push({file, path: prefix ? `${prefix}/${file.name}` : file.name});
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      let batch;
      do {
        batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        for (const child of batch) await walk(child, prefix ? `${prefix}/${entry.name}` : entry.name);
      } while (batch.length);
    }
  }
  for (const item of items) {
    const entry = item.webkitGetAsEntry && item.webkitGetAsEntry();
    if (entry) await walk(entry, "");
  }
  return out;
}

function classify() {
  const entries = state.chosen;
  const bytes = entries.reduce((s, e) => s + e.file.size, 0);
  if (bytes > LIMITS.mb * 2 ** 20) {
    say(`upload too large: ${(bytes / 2 ** 20).toFixed(1)} MiB, the limit is ${LIMITS.mb} MiB`);
    return;
  }
  const images = entries.filter((e) => !e.path.toLowerCase().endsWith(".zip")).length;
  if (images > LIMITS.images) {
    say(`too many images: ${images}, the limit is ${LIMITS.images} per upload; upload them in parts`);
    return;
  }
  const form = new FormData();
  form.append("model", $("model").value);
  form.append("review_below", String(state.threshold));
  for (const e of entries) {
    form.append("files", e.file, e.file.name);
    form.append("paths", e.path);
  }
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/batches");
  xhr.responseType = "json";
  $("classify").disabled = true;
  progress(0, 1, "uploading…");
  xhr.upload.onprogress = (ev) => {
    if (ev.lengthComputable) progress(ev.loaded, ev.total, `uploading ${Math.round(100 * ev.loaded / ev.total)} %`);
  };
  xhr.onload = () => {
    $("classify").disabled = false;
    if (xhr.status !== 201) {
      const detail = xhr.response && xhr.response.detail;
      say(typeof detail === "string" ? detail : `upload failed: ${xhr.status}`);
      $("progress-box").hidden = true;
      return;
    }
    start(xhr.response);
  };
  xhr.onerror = () => {
    $("classify").disabled = false;
    say("upload failed: the app did not answer (is it still running? too large an upload?)");
  };
  xhr.send(form);
}

function progress(done, total, text) {
  $("progress-box").hidden = false;
  $("progress").max = Math.max(total, 1);
  $("progress").value = done;
  $("progress-text").textContent = text;
}

// ---------------------------------------------------------------- a batch: rows as they come

function start(summary) {
  state.batch = summary;
  state.rows = [];
  state.cards = [];
  state.corrections = {};
  state.classes = summary.classes;
  $("grid").replaceChildren();
  const filter = $("filter-class");
  filter.replaceChildren(el("option", null, "all"));
  filter.firstChild.value = "";
  for (const c of [...state.classes, "error"]) {
    const option = el("option", null, c === "error" ? "errors" : c);
    option.value = c;
    filter.append(option);
  }
  const correct = $("correct");
  correct.replaceChildren(el("option", null, "(not labelled)"));
  correct.firstChild.value = "";
  for (const c of state.classes) {
    const option = el("option", null, c);
    option.value = c;
    correct.append(option);
  }
  $("results").hidden = false;
  const skipped = summary.skipped ? ` (${summary.skipped} non-image or hidden file(s) skipped)` : "";
  say(`${summary.total} image(s) to classify${skipped}`, false);
  poll();
}

async function poll() {
  const id = state.batch.id;
  const response = await fetch(`/api/batches/${id}?since=${state.rows.length}`);
  if (!response.ok || !state.batch || state.batch.id !== id) return;
  const data = await response.json();
  for (const row of data.rows) addRow(row);
  progress(data.done, data.total, `${data.done} / ${data.total} classified`
    + (data.seconds ? ` in ${data.seconds.toFixed(1)} s` : ""));
  if (data.rows.length) view();
  if (data.state === "done" || data.state === "failed") {
    if (data.state === "failed") say(`classification stopped: ${data.error}`);
    else say(data.skipped ? `${data.skipped} non-image or hidden file(s) skipped` : "", false);
    $("progress-text").textContent += data.state === "done" ? " · done" : " · failed";
    body.dataset.batchState = data.state;
    return;
  }
  setTimeout(poll, POLL_MS);
}

function addRow(row) {
  state.rows.push(row);
  const card = el("div", row.error ? "card error" : "card");
  card.dataset.index = row.index;
  const name = row.path.split("/").pop();
  if (row.error) {
    card.append(el("div", "thumb missing", "✕"), el("div", "name", name), el("div", "error-text", row.error));
  } else {
    const img = el("img", "thumb");
    img.loading = "lazy";
    img.decoding = "async";
    img.width = img.height = 96;
    img.alt = name;
    img.src = `/api/batches/${state.batch.id}/thumbs/${row.index}.jpeg`;
    card.append(img, el("div", "name", name), el("div", "cls", row.predicted),
      el("div", "conf", fmt(row.confidence, 2)), el("span", "badge review", "review"),
      el("span", "badge corrected", ""));
    for (const [key, value] of Object.entries(row)) {
      if (!KNOWN.has(key) && !key.startsWith("p_") && value !== null && value !== "") {
        card.append(el("div", `extra extra-${key}`, `${key}: ${value}`));
      }
    }
    if (row.note) card.append(el("div", "extra note", row.note));
    card.addEventListener("click", () => openDetail(row.index));
  }
  card.title = row.path;
  state.cards.push(card);
  $("grid").append(card);
  flag(row.index);
}

function needsReview(row) {  // the rule of serving.Classifier: confidence below the threshold
  return !row.error && row.confidence < state.threshold;
}

function flag(index) {
  const row = state.rows[index];
  const card = state.cards[index];
  if (row.error) return;
  card.classList.toggle("needs-review", needsReview(row));
  const label = state.corrections[index] || "";
  card.classList.toggle("labelled", Boolean(label));
  card.classList.toggle("changed", Boolean(label) && label !== row.predicted);
  card.querySelector(".badge.corrected").textContent = label ? `→ ${label}` : "";
}

function setThreshold(value) {
  state.threshold = Number(value);
  $("threshold").value = state.threshold;
  $("threshold-value").textContent = state.threshold.toFixed(2);
  state.rows.forEach((_, i) => flag(i));
  view();
}

function view() {  // filter, sort, counts, download links
  const cls = $("filter-class").value;
  const reviewOnly = $("filter-review").checked;
  const shown = (row) => (!cls || (cls === "error" ? Boolean(row.error) : row.predicted === cls && !row.error))
    && (!reviewOnly || needsReview(row));
  const order = $("sort").value;
  const rows = [...state.rows];
  const conf = (r) => (r.error ? Infinity : r.confidence);
  if (order === "confidence-asc") rows.sort((a, b) => conf(a) - conf(b) || a.index - b.index);
  if (order === "confidence-desc") rows.sort((a, b) => (b.error ? -Infinity : b.confidence) - (a.error ? -Infinity : a.confidence) || a.index - b.index);
  if (order === "class") rows.sort((a, b) => String(a.predicted || "~").localeCompare(String(b.predicted || "~")) || a.index - b.index);
  if (order !== state.order || order !== "index") {
    $("grid").append(...rows.map((r) => state.cards[r.index]));  // moves the nodes, no rebuild
    state.order = order;
  }
  let visible = 0;
  for (const row of rows) {
    const on = shown(row);
    state.cards[row.index].hidden = !on;
    visible += on;
  }
  const review = state.rows.filter(needsReview).length;
  const errors = state.rows.filter((r) => r.error).length;
  const labelled = Object.keys(state.corrections).length;
  $("counts").textContent = `${visible} shown · ${review} need review · ${errors} error(s) · ${labelled} labelled`;
  if (state.batch) {
    $("download-csv").href = `/api/batches/${state.batch.id}/predictions.csv?review_below=${state.threshold}`;
    $("download-zip").href = `/api/batches/${state.batch.id}/labelled.zip`;
  }
}

// ---------------------------------------------------------------- one cell: Grad-CAM and correction

function openDetail(index) {
  const row = state.rows[index];
  state.open = index;
  $("detail-name").textContent = row.path;
  $("detail-image").src = `/api/batches/${state.batch.id}/thumbs/${index}.jpeg`;
  $("cam-caption").textContent = "computing Grad-CAM…";
  const cam = $("cam");
  cam.removeAttribute("src");
  cam.onload = () => { $("cam-caption").textContent = `Grad-CAM of ${row.predicted}`; };
  cam.onerror = () => { $("cam-caption").textContent = "no Grad-CAM for this image"; };
  cam.src = `/api/batches/${state.batch.id}/cams/${index}.png`;
  const table = $("detail-probs");
  table.replaceChildren();
  for (const c of state.classes) {
    const tr = el("tr", c === row.predicted ? "top" : null);
    tr.append(el("th", null, c), el("td", null, fmt(row[`p_${c}`])));
    table.append(tr);
  }
  const extra = Object.entries(row).filter(([k, v]) => !KNOWN.has(k) && !k.startsWith("p_") && v !== null && v !== "")
    .map(([k, v]) => `${k}: ${v}`);
  if (row.note) extra.push(`note: ${row.note}`);
  extra.push(needsReview(row) ? `needs review (confidence below ${state.threshold.toFixed(2)})` : "");
  $("detail-extra").textContent = extra.filter(Boolean).join(" · ");
  $("correct").value = state.corrections[index] || "";
  $("detail").showModal();
}

async function setLabel(label) {
  const index = state.open;
  const response = await fetch(`/api/batches/${state.batch.id}/rows/${index}/label`, {
    method: "PUT", headers: {"Content-Type": "application/json"}, body: JSON.stringify({label}),
  });
  if (!response.ok) {
    say(await errorText(response));
    return;
  }
  const answer = await response.json();
  if (answer.corrected_label) state.corrections[index] = answer.corrected_label;
  else delete state.corrections[index];
  $("correct").value = answer.corrected_label;
  flag(index);
  view();
}

// ---------------------------------------------------------------- wiring

$("files").addEventListener("change", (ev) => choose(fromInput(ev.target)));
$("folder").addEventListener("change", (ev) => choose(fromInput(ev.target)));
$("classify").addEventListener("click", classify);
$("threshold").addEventListener("input", (ev) => setThreshold(ev.target.value));
for (const id of ["filter-class", "filter-review", "sort"]) $(id).addEventListener("change", view);
$("correct").addEventListener("change", (ev) => setLabel(ev.target.value || null));
$("confirm").addEventListener("click", () => setLabel(state.rows[state.open].predicted));
$("download-zip").addEventListener("click", (ev) => {
  if (!Object.keys(state.corrections).length) {
    ev.preventDefault();
    say("no labels yet: confirm or correct cells first (a labelled folder holds only labels a person gave)");
  }
});
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  choose(await fromDrop(Array.from(ev.dataTransfer.items)));
});
loadModels().catch((e) => say(`cannot read the model list: ${e}`));

// The earlyexit demo page: upload an image, show the answer, its top classes and every exit's
// confidence.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { numExits: null, fallback: null };

function setText(id, text) { $(id).textContent = text; }

function percent(x) { return (100 * x).toFixed(1) + "%"; }

async function loadModel() {
  try {
    const res = await fetch("/v1/model");
    if (!res.ok) throw new Error((await res.json()).detail || res.statusText);
    const m = await res.json();
    state.numExits = m.num_exits;
    state.fallback = m.fallback;
    // A --full-model server answers with the plain single graph: no exits, no thresholds.
    setText("model-line", m.mode === "full_model"
      ? `${m.name} ${m.version} · plain model ${m.served_graph.file} (no exits) · ` +
        `${m.num_classes} classes`
      : `${m.name} ${m.version} · ${m.num_exits} exits · ${m.num_classes} classes · ` +
        `thresholds ${m.thresholds.map((t) => t.toFixed(3)).join(", ")}`);
  } catch (err) {
    setText("model-line", `model not ready: ${err.message}; retrying…`);
    setTimeout(loadModel, 1000);
  }
}

function renderExits(answer) {
  const box = $("exits");
  box.replaceChildren();
  for (const e of answer.exits || []) {
    const row = document.createElement("div");
    row.className = "exit-row" + (answer.exit === e.exit ? " taken" : "");
    row.dataset.exit = String(e.exit);
    const name = document.createElement("span");
    name.className = "exit-name";
    name.textContent = `exit ${e.exit}`;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = percent(e.confidence);
    const tick = document.createElement("div");
    tick.className = "tick";
    tick.style.left = percent(Math.min(e.threshold, 1));
    tick.title = `threshold ${e.threshold}`;
    bar.append(fill, tick);
    const value = document.createElement("span");
    value.className = "exit-value";
    value.textContent = `${e.label} ${percent(e.confidence)}`;
    row.append(name, bar, value);
    box.append(row);
  }
  $("exits-section").hidden = !(answer.exits && answer.exits.length);
}

function renderTopClasses(answer) {
  const list = $("top-classes");
  list.replaceChildren();
  for (const c of answer.top_k || []) {
    const item = document.createElement("li");
    item.dataset.classIndex = String(c.class_index);
    const label = document.createElement("span");
    label.className = "top-label";
    label.textContent = c.label;
    const value = document.createElement("span");
    value.className = "top-value";
    value.textContent = percent(c.confidence);
    item.append(label, value);
    list.append(item);
  }
  $("top-section").hidden = !(answer.top_k && answer.top_k.length);
}

// Every field an answer fills; a failed upload must not leave any of them showing the previous
// image's answer as if it were this file's.
function clearAnswer() {
  for (const id of ["label", "exit", "confidence", "latency"]) setText(id, "—");
  renderTopClasses({});
  renderExits({});
}

// Uploads in flight: only the newest may write to the page, so a slow earlier answer cannot
// overwrite a later one (or a later error).
let latestUpload = 0;

async function classify(file) {
  const upload = ++latestUpload;
  const result = $("result");
  result.dataset.state = "loading";
  $("error").hidden = true;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const body = new FormData();
  body.append("file", file);
  try {
    const res = await fetch("/classify?full=true&top_k=3", { method: "POST", body });
    // A proxy's error page is not JSON; its status line is then the clearest message.
    const answer = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(answer.detail || `${res.status} ${res.statusText}`);
    if (upload !== latestUpload) return;
    setText("label", answer.label);
    // With fallback "plain" the plain model answered: the chain stopped at its last enabled exit.
    setText("exit", answer.exit === "fallback"
      ? (state.fallback === "plain"
        ? "fallback (no exit was sure; the plain model answered)"
        : `fallback (no exit was sure; ${answer.num_exits} exits ran)`)
      : answer.exit === "full"
        ? "full (the plain model answers every image)"
        : `${answer.exit} of ${answer.num_exits}`);
    setText("confidence", percent(answer.confidence));
    setText("latency", `${answer.latency_ms.toFixed(1)} ms`);
    renderTopClasses(answer);
    renderExits(answer);
    result.dataset.state = "done";
  } catch (err) {
    if (upload !== latestUpload) return;
    clearAnswer();
    $("error").textContent = `Could not classify: ${err.message}`;
    $("error").hidden = false;
    result.dataset.state = "error";
  }
}

function setupDrop() {
  const zone = $("drop-zone");
  const input = $("file-input");
  input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
  zone.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (ev) => { ev.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (ev) => { ev.preventDefault(); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (ev) => {
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) classify(file);
  });
  // Dropping anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
}

setupDrop();
loadModel();

// The compressor web console: jobs, submit, a job's live progress, plots and downloads.
// Plain browser JavaScript, no build step; it uses only the public REST API (/v1/...).
"use strict";

// The pipeline's stages, in order: read from the server (`GET /v1/config`), never listed here.
let STAGES = [];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const KEY_STORAGE = "compressor.apiKey";

// -- small helpers ------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "style") node.setAttribute("style", value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  if (n === undefined || n === null) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// `x` to `digits` significant digits, without trailing zeros or an exponent below 1e6.
function sig(x, digits = 4) {
  if (typeof x !== "number" || !isFinite(x)) return "—";
  if (x === 0) return "0";
  if (Math.abs(x) >= 1e6 || Math.abs(x) < 1e-4) return x.toExponential(Math.max(0, digits - 1)).replace(/\.?0+e/, "e");
  return String(Number(x.toPrecision(digits)));
}

// Axis labels that differ wherever the values do: the fewest significant digits (at least 2).
function distinct(values) {
  for (let digits = 2; digits < 10; digits += 1) {
    const labels = values.map((v) => sig(v, digits));
    const differ = values.every((v, i) => i === 0 || v === values[i - 1] || labels[i] !== labels[i - 1]);
    if (differ) return labels;
  }
  return values.map((v) => String(v));
}

// A count in the unit of the largest of the values shown with it: "188 K → 74.6 K", never
// "1.88e+5 → 74570".
function count(v, shownWith = [v]) {
  if (typeof v !== "number") return "—";
  const top = Math.max(...shownWith.filter((x) => typeof x === "number").map(Math.abs), 0);
  const [scale, unit] = top >= 1e9 ? [1e9, " G"] : top >= 1e6 ? [1e6, " M"] : top >= 1e4 ? [1e3, " K"] : [1, ""];
  return `${scale === 1 ? Math.round(v) : sig(v / scale, 3)}${unit}`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function seconds(s) {
  if (typeof s !== "number") return "";
  return s < 60 ? `${s.toFixed(s < 10 ? 2 : 1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function progressBar(fraction) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  return el("div", { class: "bar", role: "progressbar", "aria-valuenow": pct,
                     "aria-valuemin": 0, "aria-valuemax": 100, title: `${pct}%` },
            el("span", { style: `width: ${pct}%` }));
}

function setBar(bar, fraction) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  bar.setAttribute("aria-valuenow", pct);
  bar.title = `${pct}%`;
  bar.firstChild.style.width = `${pct}%`;
}

function statusBadge(status) {
  return el("span", { class: `status ${status}`, "data-status": status }, status);
}

function errorBox(text, attrs) {
  return el("div", { class: "error-box", role: "alert", ...(attrs || {}) }, text);
}

// -- the API ------------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code || "http_" + status;
    this.details = error.details || [];
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options, headers: { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) },
  });
  if (response.status === 204) return null;
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function describe(error) {
  if (error instanceof ApiError) return `${error.status} ${error.code}: ${error.message}`;
  return String(error && error.message ? error.message : error);
}

// Merge a `change` event (the job's id and the fields that changed) into the job it follows.
function applyChange(job, change) {
  const { loss_curve_added: added, ...fields } = change;
  const next = { ...job, ...fields };
  if (added) next.loss_curve = [...(job.loss_curve || []), ...added];
  return next;
}

// Follow GET /v1/jobs/{id}/events (server-sent events) with fetch, which, unlike EventSource,
// can send the Authorization header. The first event (`job`) is the whole job, each later one
// (`change`) what changed: calls onJob(job) with the job as it is now, until the stream ends.
async function followJob(jobId, onJob, signal, onDeleted) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, {
    headers: { Accept: "text/event-stream", ...authHeaders() }, signal,
  });
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let job = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      if (event === "job") onJob(job = JSON.parse(data.join("\n")));
      else if (event === "change" && job) onJob(job = applyChange(job, JSON.parse(data.join("\n"))));
      else if (event === "deleted" && onDeleted) onDeleted();
    }
  }
}

// -- page state and routing ------------------------------------------------------------------

let page = new AbortController();  // aborted when the view changes: stops streams and timers

function onAbort(fn) { page.signal.addEventListener("abort", fn); }

function every(ms, fn) {
  const timer = setInterval(fn, ms);
  onAbort(() => clearInterval(timer));
}

function route() {
  page.abort();
  page = new AbortController();
  const hash = location.hash || "#/jobs";
  const view = document.getElementById("view");
  view.replaceChildren();
  const match = hash.match(/^#\/jobs\/([0-9a-zA-Z]+)$/);
  const name = match ? "job" : hash === "#/submit" ? "submit" : "jobs";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.nav === (name === "job" ? "jobs" : name));
  }
  if (match) return jobView(view, match[1]);
  if (name === "submit") return submitView(view);
  return jobsView(view);
}

// -- the API key ------------------------------------------------------------------------------

function setupKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const show = () => { state.textContent = apiKey() ? "key set for this tab" : "no key"; };
  input.value = apiKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value.trim()) sessionStorage.setItem(KEY_STORAGE, input.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
    show();
    route();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    input.value = "";
    show();
    route();
  });
  show();
}

// -- jobs list --------------------------------------------------------------------------------

async function cancelJob(job, after) {
  if (!confirm(`Cancel job ${job.id}? A running job stops within seconds.`)) return;
  try { await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }); after(); }
  catch (error) { alert(describe(error)); }
}

async function deleteJob(job, after) {
  if (!confirm(`Delete job ${job.id} and all its files? This cannot be undone.`)) return;
  try { await api(`/v1/jobs/${job.id}`, { method: "DELETE" }); after(); }
  catch (error) { alert(describe(error)); }
}

function jobsView(view) {
  const filter = el("select", { id: "status-filter", "aria-label": "status" },
    el("option", { value: "" }, "every status"),
    STATUSES.map((s) => el("option", { value: s }, s)));
  filter.value = new URLSearchParams(location.search).get("status") || sessionStorage.getItem("compressor.filter") || "";
  const body = el("tbody");
  const more = el("button", { type: "button", hidden: true }, "Older jobs");
  const message = el("div");
  const table = el("table", { id: "jobs" },
    el("thead", {}, el("tr", {}, ["submitted", "job", "model", "method and size", "status", "result", ""]
      .map((h) => el("th", {}, h)))), body);
  view.append(
    el("h1", {}, "Jobs"),
    el("div", { class: "toolbar" }, el("label", { for: "status-filter" }, "Show"), filter,
      el("button", { type: "button", onclick: () => load(null) }, "Refresh"),
      el("a", { href: "#/submit" }, el("button", { type: "button", class: "primary" }, "Submit a job"))),
    message, el("div", { class: "card" }, el("div", { class: "scroll" }, table), more));
  let cursor = null;
  const streams = new Map();  // job id -> AbortController of its event stream

  function row(job) {
    const actions = el("td", {});
    if (!FINISHED.has(job.status)) {
      actions.append(el("button", { type: "button", class: "cancel",
        onclick: () => cancelJob(job, () => load(null)) }, "Cancel"), " ");
    }
    actions.append(el("button", { type: "button", class: "danger delete",
      onclick: () => deleteJob(job, () => load(null)) }, "Delete"));
    const running = job.status === "running";
    return el("tr", { "data-job": job.id },
      el("td", {}, when(job.created_at)),
      el("td", {}, el("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id.slice(0, 12))),
      el("td", { class: "model", title: job.model_name || "" }, job.model_name || "—"),
      el("td", { class: "how", title: sizing(job.config) }, `${methodName(job.config)} · ${shortSizing(job.config)}`),
      el("td", {}, statusBadge(job.status), job.attempts > 1 ? el("div", { class: "muted" }, `attempt ${job.attempts}`) : null),
      el("td", { class: "result" }, running
        ? el("div", { class: "running" }, el("span", { class: "muted" }, job.stage || "starting"), progressBar(job.progress))
        : resultSummary(job)),
      actions);
  }

  function follow(job) {
    if (FINISHED.has(job.status) || streams.has(job.id) || streams.size >= 20) return;
    const controller = new AbortController();
    streams.set(job.id, controller);
    onAbort(() => controller.abort());
    followJob(job.id, (update) => {
      const old = body.querySelector(`tr[data-job="${update.id}"]`);
      if (!old) return;
      if (filter.value && update.status !== filter.value) old.remove();
      else old.replaceWith(row(update));
    }, controller.signal).catch(() => {}).finally(() => streams.delete(job.id));
  }

  let generation = 0;  // a newer load (filter change, refresh) makes older answers stale
  async function load(from) {
    const mine = ++generation;
    message.replaceChildren();
    if (!from) {
      for (const controller of streams.values()) controller.abort();
      streams.clear();
      body.replaceChildren();
    }
    const params = new URLSearchParams({ limit: "25" });
    if (filter.value) params.set("status", filter.value);
    if (from) params.set("cursor", from);
    try {
      const pageOfJobs = await api(`/v1/jobs?${params}`);
      if (mine !== generation || page.signal.aborted) return;
      for (const job of pageOfJobs.data) { body.append(row(job)); follow(job); }
      if (!body.children.length) {
        body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" },
          filter.value ? `No ${filter.value} jobs.` : "No jobs yet: submit one.")));
      }
      cursor = pageOfJobs.next_cursor;
      more.hidden = !cursor;
    } catch (error) {
      if (mine === generation) message.append(errorBox(describe(error)));
    }
  }
  filter.addEventListener("change", () => {
    sessionStorage.setItem("compressor.filter", filter.value);
    load(null);
  });
  more.addEventListener("click", () => load(cursor));
  load(null);
}

// -- submit -----------------------------------------------------------------------------------

function schemaNode(schema, node) {
  while (node && node.$ref) node = schema.$defs[node.$ref.split("/").pop()];
  if (node && node.oneOf && node.discriminator) {  // the method: its name picks its options
    const { propertyName, mapping } = node.discriminator;
    return { description: node.description, properties: { [propertyName]: { enum: Object.keys(mapping), description: node.description } } };
  }
  if (node && node.anyOf) {
    const concrete = node.anyOf.find((n) => n.$ref || (n.type && n.type !== "null"));
    return { ...schemaNode(schema, concrete), description: node.description || (concrete || {}).description, nullable: true };
  }
  return node || {};
}

function fieldSchema(schema, path) {
  let node = schema;
  for (const key of path) {
    node = schemaNode(schema, node);
    node = (node.properties || {})[key];
  }
  return schemaNode(schema, node);
}

function leafFields(value, path = []) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return Object.entries(value).flatMap(([k, v]) => leafFields(v, [...path, k]));
  }
  return [{ path, value }];
}

function fieldInput(id, spec, value) {
  const choices = spec.enum || (spec.const !== undefined ? [spec.const] : null);
  if (typeof value === "boolean") {
    const select = el("select", { id }, el("option", { value: "true" }, "true"), el("option", { value: "false" }, "false"));
    select.value = String(value);
    return select;
  }
  if (choices && choices.length > 1) {
    const select = el("select", { id }, choices.map((c) => el("option", { value: String(c) }, String(c))));
    select.value = String(value);
    return select;
  }
  if (Array.isArray(value) || (value && typeof value === "object")) {
    return el("textarea", { id, rows: 2, cols: 40, spellcheck: "false" }, JSON.stringify(value));
  }
  return el("input", { id, type: "text", value: value === null ? "" : String(value), spellcheck: "false" });
}

function readField(input, original) {
  const text = input.value.trim();
  if (typeof original === "boolean") return input.value === "true";
  if (Array.isArray(original) || (original && typeof original === "object")) {
    try { return JSON.parse(text); } catch (_) { throw new Error("not valid JSON"); }
  }
  if (typeof original === "number" || original === null) {
    if (text === "") return null;
    const n = Number(text);
    return Number.isNaN(n) ? text : n;  // let the server name what is wrong with the text
  }
  return input.value;
}

function setPath(target, path, value) {
  let node = target;
  for (const key of path.slice(0, -1)) node = node[key] = node[key] || {};
  node[path[path.length - 1]] = value;
}

async function submitView(view) {
  const general = el("div", { id: "submit-error" });
  const fieldsBox = el("div", { id: "config-fields" }, el("p", { class: "muted" }, "Loading the defaults…"));
  const model = el("input", { id: "model-file", type: "file", accept: ".pt2,.zip,.tar,.gz,.tgz", required: true });
  const data = el("input", { id: "data-file", type: "file", accept: ".safetensors,.npz" });
  const bar = progressBar(0);
  bar.id = "upload-progress";
  const uploadState = el("span", { id: "upload-state", class: "muted" });
  const send = el("button", { type: "submit", class: "primary", id: "submit-job" }, "Upload and submit");
  const form = el("form", { id: "submit-form" },
    el("div", { class: "card" }, el("h2", {}, "Files"),
      el("div", { class: "field", "data-field": "model" }, el("label", { for: "model-file" }, "model"), model,
        el("div", { class: "hint" }, "a torch.export program saved with torch.export.save (.pt2), or a Hugging Face model folder packed as .zip or .tar.gz")),
      el("div", { class: "field", "data-field": "data" }, el("label", { for: "data-file" }, "data (optional)"), data,
        el("div", { class: "hint" }, ".safetensors or .npz, tensors named after the program's inputs"))),
    el("div", { class: "card" }, el("h2", {}, "Configuration"),
      el("p", { class: "muted" }, "Every field shows its default; only the fields you touch are sent. With none of the sizes (ratio, overrides, method size, export form or quantize) the job runs in target mode: the smallest model that keeps the target's floors."), fieldsBox),
    general,
    el("div", { class: "toolbar" }, send, el("div", { style: "width: 260px" }, bar), uploadState));
  view.append(el("h1", {}, "Submit a job"), form);

  let described;
  try { described = await api("/v1/config"); }
  catch (error) { fieldsBox.replaceChildren(errorBox(describe(error))); return; }
  const leaves = leafFields(described.defaults);
  const inputs = new Map();
  fieldsBox.replaceChildren(...leaves.map(({ path, value }) => {
    const name = path.join(".");
    const spec = fieldSchema(described.schema, path);
    const input = fieldInput(`cfg-${name}`, spec, value);
    const box = el("div", { class: "field", "data-field": name },
      el("label", { for: input.id }, name), input,
      el("div", { class: "hint" }, `default ${JSON.stringify(value)}${spec.description ? " · " + spec.description : ""}`));
    input.addEventListener("input", () => box.classList.toggle("changed", true));
    inputs.set(name, { input, path, value, box });
    return box;
  }));

  function clearErrors() {
    general.replaceChildren();
    for (const box of form.querySelectorAll(".field")) {
      box.classList.remove("invalid");
      box.querySelectorAll(".field-error").forEach((n) => n.remove());
    }
  }

  function markField(field, message) {
    const name = field.replace(/^config\./, "");
    const boxes = [...form.querySelectorAll(".field[data-field]")];
    const box = form.querySelector(`.field[data-field="${CSS.escape(name)}"]`)
      || boxes.find((b) => name.startsWith(b.dataset.field + "."))
      || boxes.find((b) => b.dataset.field.startsWith(name + "."));  // "method" -> method.name
    if (!box) return false;
    box.classList.add("invalid");
    box.append(el("div", { class: "field-error", role: "alert" }, message));
    return true;
  }

  // The config the fields say (only the changed ones); null after marking a field that is not JSON.
  function readConfig() {
    const config = {};
    let bad = false;
    for (const [name, { input, path, value, box }] of inputs) {
      let parsed;
      try { parsed = readField(input, value); }
      catch (error) { markField(name, error.message); bad = true; continue; }
      // A touched field is sent even at its default: `ratio` 0.5 typed asks for ratio mode.
      if (JSON.stringify(parsed) !== JSON.stringify(value) || box.classList.contains("changed")) setPath(config, path, parsed);
    }
    return bad ? null : config;
  }

  // Ask the server to judge the config (no upload): mark each refused field; true if it passed.
  let checking = 0;
  async function checkConfig(config) {
    const mine = ++checking;
    try {
      await api("/v1/config/validate", { method: "POST", body: JSON.stringify(config), headers: { "Content-Type": "application/json" } });
      return true;
    } catch (error) {
      if (mine !== checking) return false;
      if (!(error instanceof ApiError) || !error.details.length) { general.append(errorBox(describe(error), { id: "config-refused" })); return false; }
      for (const detail of error.details) if (!markField(detail.field, detail.message)) general.append(errorBox(`${detail.field}: ${detail.message}`));
      return false;
    }
  }

  let pending = null;  // checks the fields a moment after the typing stops
  form.addEventListener("input", (event) => {
    if (!event.target.id.startsWith("cfg-")) return;
    clearTimeout(pending);
    pending = setTimeout(() => {
      clearErrors();
      const config = readConfig();
      if (config) checkConfig(config);
    }, 400);
  });
  onAbort(() => clearTimeout(pending));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearTimeout(pending);
    clearErrors();
    const config = readConfig();
    let bad = config === null;
    if (!model.files.length) { markField("model", "choose the model file"); bad = true; }
    if (config && !(await checkConfig(config))) bad = true;
    if (bad) { general.append(errorBox("Fix the marked fields: nothing was uploaded.", { id: "submit-refused" })); return; }
    const formData = new FormData();
    formData.append("config", JSON.stringify(config));
    formData.append("model", model.files[0]);
    if (data.files.length) formData.append("data", data.files[0]);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      setBar(bar, e.loaded / e.total);
      uploadState.textContent = `uploading ${bytes(e.loaded)} of ${bytes(e.total)}`;
    });
    xhr.addEventListener("load", () => {
      send.disabled = false;
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
      if (xhr.status === 202 && body) {
        uploadState.textContent = "submitted";
        location.hash = `#/jobs/${body.id}`;
        return;
      }
      const error = new ApiError(xhr.status, body);
      uploadState.textContent = "refused";
      for (const detail of error.details) markField(detail.field, detail.message);
      general.append(errorBox(describe(error), { id: "submit-refused" }));
    });
    xhr.addEventListener("error", () => {
      send.disabled = false;
      uploadState.textContent = "";
      general.append(errorBox("The upload failed: the server could not be reached."));
    });
    send.disabled = true;
    uploadState.textContent = "uploading…";
    xhr.send(formData);
  });
}

// -- one job ----------------------------------------------------------------------------------

// Each stage's box: how long it took and when it started, both from the server (the job's
// stage_times on the store's clock; report.stage_seconds once it succeeded).
function timeline(job) {
  const took = (job.report && job.report.stage_seconds) || {};
  const started = job.stage_times || {};
  const current = STAGES.indexOf(job.stage);
  return el("div", { class: "timeline", id: "timeline" }, STAGES.map((stage, i) => {
    const at = started[stage] ? Date.parse(started[stage]) : null;
    const later = STAGES.slice(i + 1).map((s) => started[s]).find(Boolean) || job.finished_at;
    let state = "";
    let detail = "";
    if (typeof took[stage] === "number") { state = "done"; detail = seconds(took[stage]); }
    else if (job.status === "running" && i === current) {
      state = "current";
      detail = at ? `running for ${seconds(Math.max(0, Date.now() - at) / 1000)}` : "running";
    } else if (i < current || job.status === "succeeded") {
      state = "done";
      detail = at && later ? seconds((Date.parse(later) - at) / 1000) : "done";
    } else if (job.status !== "running" && i === current) { state = "current"; detail = job.status; }
    return el("div", { class: state, "data-stage": stage, "data-started": started[stage] },
      el("b", {}, stage), el("span", {}, detail || "—"),
      at ? el("span", { class: "at" }, `from ${new Date(at).toLocaleTimeString()}`) : null);
  }));
}

function lossSeries(job) {
  const train = new Map((job.loss_curve || []).map(([step, loss]) => [step, loss]));
  const held = new Map();
  const history = (job.report && job.report.finetune && job.report.finetune.history) || [];
  for (const entry of history) {
    if (typeof entry.held_out === "number") held.set(entry.step, entry.held_out);
    if (!train.size || !train.has(entry.step)) {
      if (typeof entry.loss === "number" && isFinite(entry.loss) && !(job.loss_curve || []).length) train.set(entry.step, entry.loss);
    }
  }
  const steps = [...new Set([...train.keys(), ...held.keys()])].sort((a, b) => a - b);
  return [steps, steps.map((s) => train.has(s) ? train.get(s) : null), steps.map((s) => held.has(s) ? held.get(s) : null)];
}

function lossChart(box) {
  let plot = null;
  return (job) => {
    const data = lossSeries(job);
    if (!data[0].length) {
      if (!plot) box.replaceChildren(el("p", { class: "muted", id: "loss-empty" },
        job.status === "queued" || (job.status === "running" && STAGES.indexOf(job.stage) < STAGES.indexOf("finetuning"))
          ? "The loss curve appears when fine-tuning starts." : "No fine-tuning loss recorded."));
      return;
    }
    box.dataset.points = String(data[0].length);
    if (plot) { plot.setData(data); return; }
    box.replaceChildren();
    const fit = new ResizeObserver(() => {
      const width = Math.max(240, box.clientWidth);
      if (plot && Math.abs(plot.width - width) > 2) plot.setSize({ width, height: 260 });
    });
    fit.observe(box);
    onAbort(() => fit.disconnect());
    plot = new uPlot({
      width: Math.max(240, box.clientWidth || 600), height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "distillation loss", size: 64, values: (u, splits) => {
        const labels = distinct(splits);
        box.dataset.yLabels = JSON.stringify(labels);  // what the canvas shows, for a reader's tools
        return labels;
      } }],
      series: [{ label: "step" },
        { label: "train", stroke: "#3056d3", width: 2, spanGaps: true, value: (u, v) => sig(v, 4) },
        { label: "held-out", stroke: "#d9480f", width: 2, spanGaps: true, points: { show: true, size: 6 }, value: (u, v) => sig(v, 4) }],
    }, data, box);
  };
}

// A dotted name that wraps only at its dots: model.encoder.layer.0.<wbr>attention.<wbr>self.<wbr>query
function dotted(name) {
  return String(name).split(/(?<=\.)/).flatMap((part, i) => i ? [el("wbr"), part] : [part]);
}

function hbars(rows, format, legend) {
  const max = Math.max(1e-12, ...rows.flatMap((r) => r.values.filter((v) => typeof v === "number")));
  return el("div", {},
    legend ? el("div", { class: "legend" }, legend.map(([name, cls]) =>
      el("span", {}, el("i", { class: cls, style: `background: ${cls === "a" ? "#98a2b3" : "#3056d3"}` }), name))) : null,
    el("div", { class: "hbars" }, rows.flatMap((r) => [
      el("span", { class: "mono label", title: r.label + (r.detail ? ` (${r.detail})` : "") }, dotted(r.label),
        r.detail ? el("small", { class: "muted" }, ` ${r.detail}`) : null),
      el("div", { class: "pair" }, r.values.map((v, i) => el("div", { class: "track", style: r.values.length > 1 ? "height: 8px; margin: 1px 0" : "" },
        el("span", { class: r.values.length > 1 ? (i ? "b" : "a") : "b", style: `width: ${typeof v === "number" ? Math.max(0.5, 100 * v / max) : 0}%` })))),
      el("span", { class: "mono figures" }, r.values.map((v) => format(v, r.values)).join(" → ")),
    ])));
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children.flat()) if (child) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// The figure each output kind is judged by in target mode, and whether higher is better. A
// causal language model's next-token logits are judged by their perplexity over the original's.
const JUDGED = { logits: ["top1_agreement", true], embedding: ["cosine", true], regression: ["relative_l2", false] };

function judged(fidelity) {
  for (const [output, figures] of Object.entries(fidelity || {})) {
    if (typeof figures.perplexity === "number" && figures.original_perplexity) {
      return { output, figure: "perplexity_ratio", higher: false, value: figures.perplexity / figures.original_perplexity };
    }
    const rule = JUDGED[figures.kind];
    if (rule) return { output, figure: rule[0], higher: rule[1], value: figures[rule[0]] };
  }
  return null;
}

function sizing(config) {
  const target = config.target;
  if (!target) return `ratio ${config.ratio}, export ${(config.export || {}).form}`;
  const floors = Object.entries(JUDGED).map(([kind, [figure, higher]]) => `${kind} ${figure} ${higher ? "≥" : "≤"} ${target[figure]}`);
  if (typeof target.perplexity_ratio === "number") floors.push(`next-token logits perplexity_ratio ≤ ${target.perplexity_ratio}`);
  const goal = target.objective === "latency" ? `fastest at batch ${target.latency_batch}` : "smallest";
  return `target: ${goal} with ${floors.join(", ")}`;
}

function methodName(config) {
  return (config.method && config.method.name) || config.method || "—";
}

function shortSizing(config) {
  if (!config.target) return `ratio ${config.ratio}`;
  return `target, ${config.target.objective || "size"}`;
}

// What a finished job came to, in one line: size ×, speed ×, the judged fidelity; or its error.
function resultSummary(job) {
  if (job.status === "queued") return el("span", { class: "muted" }, "waiting for a worker");
  if (job.error && job.status !== "succeeded") {
    const text = `${job.error.code}: ${job.error.message}`;
    return el("div", { class: "job-error", title: text }, text);
  }
  const report = job.report || {};
  const outcome = report.outcome || {};
  const parts = [];
  const ratio = outcome.size_ratio;
  if (typeof ratio === "number") parts.push(ratio > 1 ? `${ratio.toFixed(2)}× smaller` : `${(1 / ratio).toFixed(2)}× larger`);
  const speed = outcome.speedup && outcome.speedup.ratio;
  if (typeof speed === "number") {
    parts.push(outcome.speedup.within_noise ? `as fast (${speed.toFixed(2)}×, within timing noise)`
      : speed >= 1 ? `${speed.toFixed(2)}× faster` : `${(1 / speed).toFixed(2)}× slower`);
  }
  const fidelity = report.fidelity || {};
  const score = judged(fidelity.artifact || fidelity.final);
  if (score) parts.push(`${score.figure.replace("_", " ")} ${sig(score.value, 4)}`);
  const lm = score && (fidelity.artifact || fidelity.final)[score.output];
  if (lm && typeof lm.perplexity === "number") parts.push(`perplexity ${sig(lm.original_perplexity, 4)} → ${sig(lm.perplexity, 4)}`);
  return el("span", { class: "summary" }, parts.join(" · ") || "—");
}

function outcomeCard(report) {
  const outcome = report.outcome || {};
  const warnings = report.warnings || [];
  // what the job's time budget (max_minutes) cut to fit
  const budget = report.budget || {};
  const cuts = budget.cut || [];
  // the target search's candidates the machine lacked the memory to score
  const notScored = (report.target || {}).not_scored || [];
  if (!outcome.headline && !warnings.length && !cuts.length && !notScored.length) return null;
  return el("div", { class: "card", id: "outcome" }, el("h2", {}, "Outcome"),
    outcome.headline ? el("p", { id: "outcome-headline" }, outcome.headline) : null,
    warnings.map((w) => errorBox(`Warning: ${w}`, { class: "warning" })),
    cuts.length ? el("p", { class: "muted", id: "budget-cut" }, `Cut to fit max_minutes ${budget.max_minutes}: ${cuts.join("; ")}.`) : null,
    notScored.length ? el("p", { class: "muted", id: "not-scored" }, `Not scored for lack of memory: ${notScored.join("; ")}.`) : null);
}

// A target-mode candidate's color in the frontier plot, by what it stacks on its compact form.
const CANDIDATE_FILLS = { float: "#3056d3", int8: "#e07b00", int4: "#1f9d55", share_values: "#8e44ad" };

function frontierCard(report) {
  const search = report.target;
  if (!search || !search.candidates || !search.candidates.length) return null;
  const points = search.candidates.map((c) => ({ ...c, score: judged(c.fidelity) })).filter((c) => c.score);
  // onnxruntime's quantizations of the original: what a user could pick instead
  const baselines = [["baseline", "int8", "frontier-baseline", "#98a2b3"], ["baseline_int4", "int4", "frontier-baseline-int4", "#5b6474"]]
    .map(([key, quantize, id, fill]) => ({ quantize, id, fill, bytes: (report[key] || {}).onnx_bytes, score: report[key] && report[key].fidelity ? judged(report[key].fidelity) : null }))
    .filter((b) => b.bytes && b.score);
  if (!points.length) return null;
  const { figure, higher } = points[0].score;
  const floor = search.floors[figure];
  const all = points.map((p) => ({ x: p.bytes, y: p.score.value }));
  for (const b of baselines) all.push({ x: b.bytes, y: b.score.value });
  const xs = all.map((p) => Math.log10(p.x)), ys = all.map((p) => p.y).concat([floor]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) + 1e-9], [y0, y1] = [Math.min(...ys), Math.max(...ys) + 1e-9];
  const W = 560, H = 260, L = 64, B = 34;
  const px = (x) => L + (Math.log10(x) - x0) / (x1 - x0) * (W - L - 16);
  const py = (y) => 12 + (1 - (y - y0) / (y1 - y0)) * (H - B - 12);
  const chosen = search.chosen;
  // int8 of the original is scored unsmoothed too under the latency objective
  const form = (c) => c.method === "share_values" ? "shared values" : (c.quantize || "float") + (c.unsmoothed ? " unsmoothed" : "");
  const marks = points.map((p) => svg("circle", {
    cx: px(p.bytes), cy: py(p.score.value), r: p.kept_fraction === chosen.kept_fraction && form(p) === form(chosen) ? 7 : 4,
    fill: CANDIDATE_FILLS[p.method === "share_values" ? p.method : p.quantize || "float"] || "#e07b00", stroke: p.meets_floor ? "#111" : "none", "data-candidate": `${p.kept_fraction}-${form(p).replace(" ", "-")}`,
  }, svg("title", {}, `kept ${p.kept_fraction} ${form(p)}: ${bytes(p.bytes)}, ${figure} ${sig(p.score.value, 4)}`)));
  for (const b of baselines) {
    marks.push(svg("rect", { x: px(b.bytes) - 5, y: py(b.score.value) - 5, width: 10, height: 10, fill: b.fill, id: b.id },
      svg("title", {}, `onnxruntime ${b.quantize} of the original: ${bytes(b.bytes)}, ${figure} ${sig(b.score.value, 4)}`)));
  }
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", id: "frontier", role: "img" },
    svg("line", { x1: L, x2: W - 8, y1: py(floor), y2: py(floor), stroke: "#c00", "stroke-dasharray": "4 3" }),
    svg("text", { x: L + 4, y: py(floor) - 4, "font-size": 11, fill: "#c00" }, `floor ${figure} ${higher ? "≥" : "≤"} ${floor}`),
    svg("line", { x1: L, x2: L, y1: 8, y2: H - B, stroke: "#999" }), svg("line", { x1: L, x2: W - 8, y1: H - B, y2: H - B, stroke: "#999" }),
    svg("text", { x: L, y: H - 8, "font-size": 11 }, bytes(10 ** x0)), svg("text", { x: W - 90, y: H - 8, "font-size": 11 }, bytes(10 ** x1)),
    svg("text", { x: 4, y: py(y1) + 4, "font-size": 11 }, distinct([y0, y1])[1]), svg("text", { x: 4, y: py(y0), "font-size": 11 }, distinct([y0, y1])[0]),
    marks);
  const rows = search.candidates.map((c) => el("tr", {}, el("td", {}, String(c.kept_fraction)), el("td", {}, form(c)),
    el("td", {}, bytes(c.bytes) + (c.bytes_estimated ? " (est.)" : "")), el("td", {}, sig((judged(c.fidelity) || {}).value, 4)),
    el("td", {}, c.meets_floor ? "meets" : "misses")));
  return el("div", { class: "card", id: "plot-frontier" }, el("h2", {}, "Target search: size against fidelity"),
    el("p", { class: "muted" }, `Every candidate as initialized (blue: float, orange: int8, green: int4, purple: shared values, ringed: meets the floor, large: chosen); gray squares: onnxruntime int8 (light) and int4 (dark) of the original. ${search.objective} objective.`),
    plot, el("table", { id: "candidates" }, el("thead", {}, el("tr", {}, ["kept", "form", "ONNX size", figure, "floor"].map((h) => el("th", {}, h)))), el("tbody", {}, rows)));
}

function resultCards(report) {
  const cards = [outcomeCard(report), frontierCard(report)].filter(Boolean);
  const layers = (report.plan && report.plan.layers) || [];
  if (layers.length) {
    cards.push(el("div", { class: "card", id: "plot-layers" }, el("h2", {}, "Kept size per layer"),
      el("p", { class: "muted" }, "Fraction of each compressed layer's weights that remains."),
      hbars(layers.map((l) => ({ label: l.name,
        detail: l.method === "dense" || l.size === null || l.size === undefined || !l.size_field ? l.method : `${l.method} ${l.size_field} ${l.size}`,
        values: [l.weights_before ? l.weights_after / l.weights_before : null] })), (v) => sig(v, 3))));
    // not measured for a model shipped as initialized when the time budget was spent
    if (layers.some((l) => typeof l.relative_output_error === "number")) {
      cards.push(el("div", { class: "card", id: "plot-errors" }, el("h2", {}, "Output error per layer"),
        el("p", { class: "muted" }, "Relative error of each layer's output against the original's, on held-out inputs."),
        hbars(layers.map((l) => ({ label: l.name, values: [l.relative_output_error] })), (v) => sig(v, 3))));
    }
  }
  const fidelity = report.fidelity || {};
  if (fidelity.initialization && fidelity.final) {
    const rows = [];
    const perplexity = [];
    for (const [output, metrics] of Object.entries(fidelity.final)) {
      const initial = fidelity.initialization[output] || {};
      for (const [metric, value] of Object.entries(metrics)) {
        // The output's kind is in the row names' detail; perplexity has its own scale, below.
        if (typeof value !== "number" || PERPLEXITY_FIGURES.has(metric)) continue;
        rows.push({ label: `${output} ${metric.replaceAll("_", " ")}`, detail: metrics.kind, values: [initial[metric], value] });
      }
      if (typeof metrics.perplexity === "number") perplexity.push(...perplexityRows(output, metrics, initial, (fidelity.artifact || {})[output]));
    }
    cards.push(el("div", { class: "card", id: "plot-fidelity" }, el("h2", {}, "Fidelity: initialization → after fine-tuning"),
      el("p", { class: "muted" }, "Against the original on the held-out split (cosine, top-1 and next-token agreement: higher is better; relative L2 and KL divergence: lower)."),
      hbars(rows, (v) => sig(v, 4), [["at initialization", "a"], ["final", "b"]]),
      perplexity.length ? el("div", { id: "plot-perplexity" },
        el("p", { class: "muted" }, "Held-out perplexity of the real next tokens, padding excluded (lower is better)."),
        hbars(perplexity, (v) => sig(v, 4), null)) : null));
  }
  const size = [];
  if (report.onnx_bytes) size.push({ label: "ONNX file", values: [report.onnx_bytes.original, report.onnx_bytes.artifact], fmt: bytes });
  if (report.parameters) size.push({ label: "parameters", values: [report.parameters.before, report.parameters.factorized_form ?? report.parameters.after], fmt: count });
  const latency = report.latency || {};
  if (latency.original && latency.compressed) {
    for (const key of Object.keys(latency.compressed)) {
      size.push({ label: `latency ${key.replace(/_ms$/, "").replace("_", " ")}`,
        values: [latency.original[key], latency.compressed[key]], fmt: (v) => typeof v === "number" ? `${sig(v, 3)} ms` : "—" });
    }
  }
  if (size.length) {
    cards.push(el("div", { class: "card", id: "plot-size" }, el("h2", {}, "Size and speed: original → compressed"),
      el("p", { class: "muted" }, `${latency.runtime || "onnxruntime"}; parameters after: the compact (factorized) form.`),
      size.map((r) => hbars([r], r.fmt, null)),
      el("div", { class: "legend", style: "margin-top: 8px" }, el("span", {}, el("i", { style: "background:#98a2b3" }), "original"),
        el("span", {}, el("i", { style: "background:#3056d3" }), "compressed"))));
  }
  return cards;
}

// A language model's figures that are not fractions: drawn on a scale of their own.
const PERPLEXITY_FIGURES = new Set(["perplexity", "original_perplexity", "next_tokens"]);

// Perplexity of the original, of the compressed model (initialization → final) and of the file.
function perplexityRows(output, final, initial, artifact) {
  const rows = [{ label: `${output} original`, values: [final.original_perplexity] },
    { label: `${output} compressed`, detail: "init → tuned", values: [initial.perplexity, final.perplexity] }];
  if (artifact && typeof artifact.perplexity === "number") rows.push({ label: `${output} artifact`, detail: "onnxruntime", values: [artifact.perplexity] });
  return rows;
}

async function sha256Hex(blob) {
  if (!(window.crypto && crypto.subtle)) return null;
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function downloadButtons(job) {
  return el("div", { class: "downloads", id: "downloads" }, job.artifacts.map((artifact) => {
    const state = el("span", { class: "verify" });
    const button = el("button", { type: "button", "data-artifact": artifact.name, onclick: async () => {
      state.textContent = " downloading…";
      state.className = "verify";
      try {
        const response = await fetch(artifact.url, { headers: authHeaders() });
        if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
        const blob = await response.blob();
        const digest = await sha256Hex(blob);
        if (digest === null) state.textContent = " saved (this browser cannot check sha256 here)";
        else if (digest === artifact.sha256) { state.textContent = " saved, sha256 verified"; state.className = "verify ok"; }
        else { state.textContent = ` sha256 mismatch: got ${digest}`; state.className = "verify bad"; }
        const url = URL.createObjectURL(blob);
        const link = el("a", { href: url, download: artifact.name, style: "display:none" });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } catch (error) {
        state.textContent = " " + describe(error);
        state.className = "verify bad";
      }
    } }, `Download ${artifact.name} (${bytes(artifact.size)})`);
    return el("div", {}, button, state, el("div", { class: "mono muted" }, `sha256 ${artifact.sha256}`));
  }));
}

async function loadStages() {
  if (!STAGES.length) STAGES = (await api("/v1/config")).stages;
}

async function jobView(view, jobId) {
  let job;
  try { await loadStages(); job = await api(`/v1/jobs/${jobId}`); }
  catch (error) {
    view.append(el("h1", {}, "Job ", el("span", { class: "mono" }, jobId)),
      errorBox(describe(error), { id: "job-error" }), el("a", { href: "#/jobs" }, "Back to the jobs"));
    return;
  }
  const head = el("div", { class: "card", id: "job-head" });
  const timelineBox = el("div", { class: "card" }, el("h2", {}, "Stages"), el("div"));
  const lossBox = el("div", { id: "loss-chart" });
  const drawLoss = lossChart(lossBox);
  const failure = el("div", { id: "job-failure" });
  const results = el("div", { class: "grid", id: "results" });
  const files = el("div", { class: "card" }, el("h2", {}, "Downloads"), el("div"));
  const logText = el("pre", { class: "log", id: "job-log" }, "");
  view.append(el("h1", {}, "Job ", el("span", { class: "mono" }, jobId)), head, failure, timelineBox,
    el("div", { class: "card" }, el("h2", {}, "Fine-tuning loss"), lossBox), results, files,
    el("div", { class: "card" }, el("h2", {}, "job.log"), logText));

  let shownResults = false;
  function render(current) {
    job = current;
    const actions = [];
    if (!FINISHED.has(job.status)) actions.push(el("button", { type: "button", class: "cancel", onclick: () => cancelJob(job, () => {}) }, "Cancel"));
    actions.push(el("button", { type: "button", class: "danger delete", onclick: () => deleteJob(job, () => { location.hash = "#/jobs"; }) }, "Delete"));
    head.replaceChildren(...[
      el("div", { class: "toolbar" }, statusBadge(job.status),
        el("span", {}, job.status === "running" && job.stage ? `stage ${job.stage}` : ""), el("div", { class: "head-bar" }, progressBar(job.progress)),
        el("span", { class: "muted" }, `${Math.round(job.progress * 100)}%`), ...actions),
      el("div", { class: "muted" }, `submitted ${when(job.created_at)} · started ${when(job.started_at)} · finished ${when(job.finished_at)} · attempt ${job.attempts}`),
      job.retry_reason ? el("div", { class: "muted" }, `re-queued: ${job.retry_reason}`) : null,
      job.resumed ? el("div", { class: "muted", id: "resumed" }, job.resumed) : null,
      el("div", { class: "muted mono" }, `${job.model_name ? job.model_name + ": " : ""}method ${methodName(job.config)}, ${sizing(job.config)}, ${((job.config.finetune || {}).steps)} fine-tuning steps`),
    ].filter(Boolean));
    timelineBox.lastChild.replaceWith(timeline(job));
    drawLoss(job);
    failure.replaceChildren(job.error && job.status !== "succeeded"
      ? errorBox(`${job.status === "cancelled" ? "Cancelled" : "Failed"} (${job.error.code}): ${job.error.message}`, { id: "failure-message" }) : "");
    if (job.report && !shownResults) { results.replaceChildren(...resultCards(job.report)); shownResults = true; }
    files.lastChild.replaceWith(job.artifacts.length ? downloadButtons(job)
      : el("p", { class: "muted" }, FINISHED.has(job.status) ? "This job left no files." : "The files appear when the job succeeds."));
  }

  async function readLog() {
    try {
      const response = await fetch(`/v1/jobs/${jobId}/artifacts/job.log`, { headers: authHeaders(), signal: page.signal });
      if (response.ok) {
        const text = await response.text();
        const atBottom = logText.scrollTop + logText.clientHeight >= logText.scrollHeight - 4;
        logText.textContent = text || (job.status === "queued" ? "(the log starts when the job does)" : "(no lines yet)");
        if (atBottom) logText.scrollTop = logText.scrollHeight;
      } else if (response.status === 404) {
        logText.textContent = job.status === "queued" ? "(the log starts when the job does)" : "(no log)";
      }
    } catch (_) { /* the page changed, or the server blinked: the next round tries again */ }
  }

  render(job);
  readLog();
  if (FINISHED.has(job.status)) return;
  every(2000, () => { if (!FINISHED.has(job.status)) readLog(); timelineBox.lastChild.replaceWith(timeline(job)); });
  followJob(jobId, (update) => {
    const wasFinished = FINISHED.has(job.status);
    render(update);
    if (FINISHED.has(update.status) && !wasFinished) readLog();
  }, page.signal, () => { head.replaceChildren(errorBox("This job was deleted.")); }).catch((error) => {
    if (error.name !== "AbortError") failure.replaceChildren(errorBox(`Lost the event stream: ${describe(error)}`));
  });
}

// -- start ------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
setupKeyForm();
route();

// diffusekit web UI: a client of the same /sdapi/v1 API that other tools use (no build step, no framework).
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "txt2img";
let lastSeed = null;
let busy = false;

// ------------------------------------------------------------------ HTTP helpers
async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { detail: text }; }
  if (!resp.ok) {
    let msg = (data && (data.errors || data.detail)) || resp.statusText;
    if (Array.isArray(msg)) msg = msg.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n");
    const retry = resp.headers.get("Retry-After");
    throw new Error(`${resp.status}: ${msg}${retry ? ` (retry in ${retry} s)` : ""}`);
  }
  return data;
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1]);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function showError(el, err) {
  el.textContent = err ? String(err.message || err) : "";
  el.hidden = !err;
}

function fillSelect(sel, items, current) {
  sel.innerHTML = "";
  for (const [value, label] of items) {
    const o = document.createElement("option");
    o.value = value; o.textContent = label;
    if (value === current) o.selected = true;
    sel.appendChild(o);
  }
}

// ------------------------------------------------------------------ start-up: fill the dropdowns from the API
async function loadLists() {
  const [samplers, schedulers, models, options, info] = await Promise.all([
    api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/sd-models"),
    api("/sdapi/v1/options"), api("/diffusekit/v1/info"),
  ]);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "DPM++ 2M");
  fillSelect($("scheduler"), schedulers.map((s) => [s.label, s.label]), "Automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  liveAvailable(models);
  const box = $("compare-samplers");
  box.innerHTML = "";
  samplers.forEach((s, i) => {
    const l = document.createElement("label");
    l.innerHTML = `<input type="checkbox" value="${s.name}" ${i < 4 ? "checked" : ""}> ${s.name}`;
    box.appendChild(l);
  });
  applyModelInfo(info);
  $("status").textContent = info.model ? `${info.model} · ${info.device}` : "no model selected";
}

// the model's native size and the sampling settings its card recommends (the server's defaults too)
function applyModelInfo(info) {
  if (info.native_size) { $("width").value = info.native_size; $("height").value = info.native_size; }
  const d = info.defaults;
  if (!d) return;
  if ([...$("sampler").options].some((o) => o.value === d.sampler_name)) $("sampler").value = d.sampler_name;
  if ([...$("scheduler").options].some((o) => o.value === d.scheduler)) $("scheduler").value = d.scheduler;
  $("steps").value = d.steps;
  $("cfg_scale").value = d.cfg_scale;
}

$("model").addEventListener("change", async () => {
  $("status").textContent = "loading model…";
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    const info = await api("/diffusekit/v1/info");
    applyModelInfo(info);
    $("status").textContent = `${info.model} · ${info.device}`;
  } catch (e) { $("status").textContent = String(e.message || e); }
});

// ------------------------------------------------------------------ tabs
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => {
    document.querySelectorAll("#tabs button").forEach((x) => x.classList.toggle("active", x === b));
    const tab = b.dataset.tab;
    $("panel-generate").hidden = !(tab === "txt2img" || tab === "img2img");
    $("panel-compare").hidden = tab !== "compare";
    $("panel-pnginfo").hidden = tab !== "pnginfo";
    $("panel-workflow").hidden = tab !== "workflow";
    if (tab === "txt2img" || tab === "img2img") mode = tab;
    document.body.classList.toggle("mode-img2img", mode === "img2img");
  });
}

// ------------------------------------------------------------------ seed buttons
$("seed-dice").addEventListener("click", () => { $("seed").value = -1; });
$("seed-reuse").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });

$("init_image").addEventListener("change", () => {
  const f = $("init_image").files[0];
  $("init_thumb").hidden = !f;
  if (f) $("init_thumb").src = URL.createObjectURL(f);
});

// ------------------------------------------------------------------ progress polling
let pollTimer = null;
function startPolling() {
  $("progress").hidden = false;
  $("progress-fill").style.width = "0%";
  $("progress-text").textContent = "queued…";
  $("preview").removeAttribute("src");
  const tick = async () => {
    try {
      const p = await api("/sdapi/v1/progress?skip_current_image=false");
      if (busy) {
        $("progress-fill").style.width = `${Math.round(p.progress * 100)}%`;
        const s = p.state;
        const text = s.job_count ? `${Math.round(p.progress * 100)}% · ${p.textinfo || ""}` +
          (s.job_count > 1 ? ` · batch ${s.job_no + 1}/${s.job_count}` : "") +
          (p.eta_relative > 0 ? ` · eta ${p.eta_relative.toFixed(1)} s` : "") : "waiting in the queue…";
        $("progress-text").textContent = text;
        if (p.current_image) $("preview").src = "data:image/png;base64," + p.current_image;
      }
    } catch (e) { /* progress is best effort */ }
    if (busy) pollTimer = setTimeout(tick, 300);
  };
  tick();
}
function stopPolling() {
  clearTimeout(pollTimer);
  $("progress-fill").style.width = "100%";
  $("progress").hidden = true;
}

// ------------------------------------------------------------------ generate
function requestBody() {
  const num = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler").value, scheduler: $("scheduler").value,
    steps: num("steps"), cfg_scale: num("cfg_scale"), seed: num("seed"),
    width: num("width"), height: num("height"), batch_size: num("batch_size"), n_iter: num("n_iter"),
    save_process: true,
  };
}

function addToGallery(b64, seed, infotext) {
  const fig = document.createElement("figure");
  fig.className = "result";
  fig.dataset.seed = String(seed);
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = `seed ${seed}`;
  img.title = "click to reuse this seed";
  img.addEventListener("click", () => { $("seed").value = seed; });
  const cap = document.createElement("figcaption");
  const s = document.createElement("div");
  s.className = "seed-label";
  s.textContent = `Seed: ${seed}`;
  const pre = document.createElement("pre");
  pre.className = "infotext";
  pre.textContent = infotext;
  const link = document.createElement("a");
  link.href = img.src; link.download = `diffusekit-${seed}.png`; link.textContent = "download";
  cap.append(s, pre, link);
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

$("gen-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (busy) return;
  showError($("error"), null);
  const body = requestBody();
  let path = "/sdapi/v1/txt2img";
  try {
    if (mode === "img2img") {
      const f = $("init_image").files[0];
      if (!f) throw new Error("choose an init image for img2img");
      body.init_images = [await fileToBase64(f)];
      body.denoising_strength = Number($("denoising_strength").value);
      const m = $("mask_image").files[0];
      if (m) { body.mask = await fileToBase64(m); body.inpaint_full_res = false; }
      path = "/sdapi/v1/img2img";
    }
  } catch (e) { showError($("error"), e); return; }
  busy = true;
  $("generate").disabled = true;
  startPolling();
  try {
    const res = await api(path, body);
    const info = JSON.parse(res.info);
    res.images.forEach((b64, i) => addToGallery(b64, info.all_seeds[i], info.infotexts[i]));
    lastSeed = info.all_seeds[info.all_seeds.length - 1];
    if (info.unsupported_fields && info.unsupported_fields.length)
      showError($("error"), `not applied: ${info.unsupported_fields.join(", ")}`);
    if (info.interrupted) $("status").textContent = "interrupted: showing what was made";
    if (info.video_available) {
      const t = Date.now();
      $("video").src = `/diffusekit/v1/video?format=mp4&t=${t}`;
      $("video-mp4").href = `/diffusekit/v1/video?format=mp4&t=${t}`;
      $("video-gif").href = `/diffusekit/v1/video?format=gif&t=${t}`;
      $("video-box").hidden = false;
    }
  } catch (e) {
    showError($("error"), e);
  } finally {
    busy = false;
    $("generate").disabled = false;
    stopPolling();
  }
});

// ------------------------------------------------------------------ live preview as you type
// A debounced txt2img on the few-step model (override_settings: the selected model stays selected), at most
// one request in flight: typing while one runs sends the newest prompt once it returns.
const LIVE_MODEL = "shapes-turbo";
let liveTimer = null, liveBusy = false, livePending = false;
function liveAvailable(models) {
  const ok = models.some((m) => m.model_name === LIVE_MODEL);
  $("live").disabled = !ok;
  if (!ok) $("live").parentElement.title = `${LIVE_MODEL} is not on this server`;
}
async function livePreview() {
  if (!$("live").checked || !$("prompt").value.trim()) return;
  if (liveBusy || busy) { livePending = true; return; }
  liveBusy = true; livePending = false;
  const seed = Number($("seed").value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, steps: Number($("live-steps").value),
    sampler_name: "LCM", scheduler: "SGM Uniform", cfg_scale: 1, seed: seed >= 0 ? seed : 1,
    override_settings: { sd_model_checkpoint: LIVE_MODEL }, override_settings_restore_afterwards: true,
  };
  const t0 = performance.now();
  try {
    const res = await api("/sdapi/v1/txt2img", body);
    const info = JSON.parse(res.info);
    $("live-image").src = "data:image/png;base64," + res.images[0];
    $("live-info").textContent = `${Math.round(performance.now() - t0)} ms · ${info.infotexts[0]}`;
    $("live-box").hidden = false;
  } catch (e) {
    $("live-info").textContent = String(e.message || e);
    $("live-box").hidden = false;
  } finally {
    liveBusy = false;
    if (livePending) livePreview();
  }
}
function scheduleLive() {
  clearTimeout(liveTimer);
  liveTimer = setTimeout(livePreview, 250);
}
for (const id of ["prompt", "negative_prompt", "live-steps"]) $(id).addEventListener("input", scheduleLive);
$("live").addEventListener("change", () => { $("live-box").hidden = !$("live").checked; scheduleLive(); });

$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));
$("skip").addEventListener("click", () => api("/sdapi/v1/skip", {}).catch(() => {}));

// ------------------------------------------------------------------ compare samplers
$("compare-run").addEventListener("click", async () => {
  showError($("compare-error"), null);
  const b = requestBody();
  const samplers = [...document.querySelectorAll("#compare-samplers input:checked")].map((x) => x.value);
  const axis = $("compare-y").value;
  // the API takes numbers for the numeric axes (strict types); text that is no number goes as typed, to be named
  const values = $("compare-values").value.split(",").map((v) => v.trim()).filter((v) => v)
    .map((v) => (axis === "scheduler" || v === "" || Number.isNaN(Number(v)) ? v : Number(v)));
  const body = {
    prompt: b.prompt, negative_prompt: b.negative_prompt, seed: b.seed, steps: b.steps, cfg_scale: b.cfg_scale,
    width: b.width, height: b.height, scheduler: b.scheduler, samplers, y_axis: axis, y_values: values,
  };
  $("compare-run").disabled = true;
  busy = true;
  startPolling();
  try {
    const res = await api("/diffusekit/v1/compare", body);
    $("compare-image").src = "data:image/png;base64," + res.image;
    $("compare-image").hidden = false;
    $("compare-info").textContent = `seed ${res.info.seed} · ${res.info.cells_done}/${res.info.cells} cells` +
      (res.info.interrupted ? " (interrupted)" : "");
  } catch (e) {
    showError($("compare-error"), e);
  } finally {
    busy = false;
    $("compare-run").disabled = false;
    stopPolling();
  }
});

// ------------------------------------------------------------------ PNG info
$("pnginfo-file").addEventListener("change", async () => {
  const f = $("pnginfo-file").files[0];
  if (!f) return;
  try {
    const res = await api("/sdapi/v1/png-info", { image: await fileToBase64(f) });
    $("pnginfo-text").textContent = res.info ? `${res.info}\n\n${JSON.stringify(res.parameters, null, 2)}`
                                             : "no generation parameters in this image";
  } catch (e) { $("pnginfo-text").textContent = String(e.message || e); }
});

loadLists().catch((e) => { $("status").textContent = `could not reach the API: ${e.message || e}`; });

// The Workflow tab: a client of the server's ComfyUI API, as ComfyUI's script_examples/websockets_api_example.py
// is: one websocket (/ws?clientId=) for the live messages and previews, POST /prompt, GET /history, GET /view.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const clientId = (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).replace(/-/g, "");
  let ws = null;
  let running = null;          // prompt_id of the prompt this page queued and waits for
  let posting = false;         // a POST /prompt is in flight: keep messages until its prompt_id is known
  let early = [];
  let previewUrl = null;

  function log(text) {
    const li = document.createElement("li");
    li.textContent = text;
    $("wf-log").appendChild(li);
    li.scrollIntoView({ block: "nearest" });
  }

  function showError(text) {
    $("wf-error").textContent = text || "";
    $("wf-error").hidden = !text;
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${proto}://${location.host}/ws?clientId=${clientId}`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { $("wf-socket").textContent = "connected"; };
    ws.onclose = () => { $("wf-socket").textContent = "reconnecting…"; setTimeout(connect, 1000); };
    ws.onmessage = (ev) => (typeof ev.data === "string" ? onMessage(JSON.parse(ev.data)) : onPreview(ev.data));
  }

  // ComfyUI's binary frame: uint32 event (1 = preview image), uint32 image type (1 JPEG, 2 PNG), the image
  function onPreview(buf) {
    const view = new DataView(buf);
    if (buf.byteLength < 8 || view.getUint32(0) !== 1) return;
    const type = view.getUint32(4) === 2 ? "image/png" : "image/jpeg";
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(new Blob([buf.slice(8)], { type }));
    $("wf-preview").src = previewUrl;
  }

  function viewUrl(f) {
    return "/view?" + new URLSearchParams({ filename: f.filename, subfolder: f.subfolder || "", type: f.type }).toString();
  }

  function showOutputs(nodeId, output) {
    for (const f of output.images || []) {
      const fig = document.createElement("figure");
      fig.dataset.node = nodeId;
      const isVideo = /\.(mp4|webm)$/i.test(f.filename);
      const el = document.createElement(isVideo ? "video" : "img");
      if (isVideo) { el.controls = true; el.loop = true; el.muted = true; el.autoplay = true; }
      el.src = viewUrl(f);
      el.alt = f.filename;
      const cap = document.createElement("figcaption");
      const a = document.createElement("a");
      a.href = el.src; a.textContent = f.filename; a.download = f.filename;
      cap.append(`node ${nodeId}: `, a);
      fig.append(el, cap);
      $("wf-outputs").appendChild(fig);
    }
  }

  const nodeType = (id) => {
    try { return JSON.parse($("wf-json").value)[id].class_type; } catch (e) { return ""; }
  };

  function onMessage(m) {
    const d = m.data || {};
    if (m.type === "status") return;
    if (posting) { early.push(m); return; }
    if (!running || d.prompt_id !== running) return;
    switch (m.type) {
      case "execution_start": log("started"); break;
      case "execution_cached": if (d.nodes.length) log(`cached: ${d.nodes.join(", ")}`); break;
      case "executing":
        if (d.node === null) { finished(); break; }
        log(`node ${d.node} ${nodeType(d.node)}`);
        $("wf-progress-text").textContent = `node ${d.node} ${nodeType(d.node)}`;
        break;
      case "progress":
        $("wf-progress-fill").style.width = `${Math.round(100 * d.value / d.max)}%`;
        $("wf-progress-text").textContent = `node ${d.node} ${nodeType(d.node)}: step ${d.value}/${d.max}`;
        break;
      case "executed": showOutputs(d.node, d.output); break;
      case "execution_success": log("execution_success"); break;
      case "execution_interrupted": log("interrupted"); break;
      case "execution_error":
        showError(`node ${d.node_id} (${d.node_type}) failed: ${d.exception_message}`);
        log("execution_error");
        break;
      default: break;
    }
  }

  async function finished() {
    const id = running;
    running = null;
    $("wf-run").disabled = false;
    $("wf-progress-text").textContent = "done";
    if (!$("wf-outputs").children.length) {           // outputs cached from an earlier run: from the history
      const h = await (await fetch(`/history/${id}`)).json();
      for (const [node, out] of Object.entries((h[id] || {}).outputs || {})) showOutputs(node, out);
    }
  }

  // A PNG's tEXt chunk `prompt` (what ComfyUI's SaveImage and ours write): the API-format graph
  function pngPrompt(buf) {
    const bytes = new Uint8Array(buf);
    const view = new DataView(buf);
    let pos = 8;
    while (pos + 8 <= bytes.length) {
      const len = view.getUint32(pos);
      const type = String.fromCharCode(...bytes.slice(pos + 4, pos + 8));
      if (type === "tEXt") {
        const data = bytes.slice(pos + 8, pos + 8 + len);
        const zero = data.indexOf(0);
        const key = new TextDecoder("latin1").decode(data.slice(0, zero));
        if (key === "prompt") return new TextDecoder("latin1").decode(data.slice(zero + 1));
      }
      if (type === "IEND") break;
      pos += 12 + len;
    }
    throw new Error("this PNG carries no `prompt` chunk (no workflow)");
  }

  $("wf-file").addEventListener("change", async () => {
    const f = $("wf-file").files[0];
    if (!f) return;
    showError("");
    try {
      const buf = await f.arrayBuffer();
      const isPng = new Uint8Array(buf.slice(0, 4)).join(",") === "137,80,78,71";
      const text = isPng ? pngPrompt(buf) : new TextDecoder().decode(buf);
      let data = JSON.parse(text);
      if (data && data.prompt && typeof data.prompt === "object") data = data.prompt;     // a /prompt body
      if (data && Array.isArray(data.nodes) && Array.isArray(data.links)) {
        throw new Error("this is ComfyUI's editor format: export the workflow with \"Save (API Format)\"");
      }
      $("wf-json").value = JSON.stringify(data, null, 2);
    } catch (e) { showError(`${f.name}: ${e.message || e}`); }
  });

  $("wf-run").addEventListener("click", async () => {
    showError("");
    let prompt;
    try { prompt = JSON.parse($("wf-json").value); } catch (e) { showError(`not valid JSON: ${e.message}`); return; }
    $("wf-log").innerHTML = "";
    $("wf-outputs").innerHTML = "";
    $("wf-progress").hidden = false;
    $("wf-progress-fill").style.width = "0%";
    $("wf-progress-text").textContent = "queued…";
    $("wf-run").disabled = true;
    posting = true;
    early = [];
    try {
      const resp = await fetch("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt, client_id: clientId }) });
      const body = await resp.json();
      if (!resp.ok) {
        const lines = [`${body.error.message}${body.error.details && !Object.keys(body.node_errors || {}).length ? ": " + body.error.details : ""}`];
        for (const [id, e] of Object.entries(body.node_errors || {})) {
          for (const err of e.errors) lines.push(`node ${id} (${e.class_type}): ${err.message}: ${err.details}`);
        }
        throw new Error(lines.join("\n"));
      }
      running = body.prompt_id;
      posting = false;
      log(`queued ${running}`);
      for (const m of early.splice(0)) onMessage(m);
      for (const [id, e] of Object.entries(body.node_errors || {})) log(`node ${id} (${e.class_type}) skipped: ${e.errors[0].message}`);
    } catch (e) {
      showError(e.message || String(e));
      $("wf-run").disabled = false;
    } finally {
      posting = false;
    }
  });

  $("wf-interrupt").addEventListener("click", () => {
    fetch("/interrupt", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(running ? { prompt_id: running } : {}) });
  });

  connect();
})();

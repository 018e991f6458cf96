"""What a saved PNG carries: ComfyUI's `prompt` and `workflow` text chunks and A1111's `parameters` infotext.

ComfyUI writes json.dumps(prompt) (the API-format graph) as `prompt` and each key of the request's
extra_data.extra_pnginfo as its own chunk (its web UI sends `workflow`, the editor's graph). A client that
sends only the API graph gets a `workflow` built here from it (`ui_workflow`: nodes laid out by depth,
links, widget values in input order), so dropping the PNG into ComfyUI restores an editable graph.
The infotext reads the graph the image came from: the sampler nodes upstream of it, their prompts
(CLIPTextEncode texts), the checkpoint and the Clip skip (CLIPSetLastLayer).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..version import __version__
from ..core import samplers as sampler_registry
from ..core import sigmas as sigma_schedules
from ..pipelines.infotext import format_infotext
from .spec import NODES
from .validate import _id_key

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_SCHEDULE_LABELS = {v: k for k, v in sigma_schedules.DISPLAY_NAMES.items()}
_HASHES: dict[tuple[str, int, int], str] = {}


def _link(node: dict, name: str) -> str | None:
    v = (node.get("inputs") or {}).get(name)
    return str(v[0]) if isinstance(v, list) and len(v) == 2 else None


def _file_hash10(path: Path) -> str | None:
    """A1111's model hash (first 10 hex of the file's sha256), cached by path, size and mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, int(st.st_mtime))
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:10]
    return _HASHES[key]


def _samplers_upstream(prompt: dict, start: str | None) -> list[str]:
    """The sampler nodes an image's latent went through, first sampler first."""
    found, seen, stack = [], set(), [start] if start else []
    while stack:
        n = stack.pop()
        if n is None or n in seen or n not in prompt:
            continue
        seen.add(n)
        node = prompt[n]
        if node.get("class_type") in SAMPLER_NODES:
            found.append(n)
        for name, v in (node.get("inputs") or {}).items():
            if isinstance(v, list) and len(v) == 2 and name in ("samples", "latent_image", "images", "image",
                                                                  "pixels"):
                stack.append(str(v[0]))
    return found[::-1]


def _text(prompt: dict, start: str | None, depth: int = 0) -> str:
    """The prompt text behind a CONDITIONING link (through combine / area / zero-out nodes)."""
    if start is None or start not in prompt or depth > 20:
        return ""
    node = prompt[start]
    if node.get("class_type") == "CLIPTextEncode" and isinstance(node["inputs"].get("text"), str):
        return node["inputs"]["text"]
    if node.get("class_type") == "ConditioningZeroOut":
        return ""
    texts = [_text(prompt, str(v[0]), depth + 1) for v in (node.get("inputs") or {}).values()
             if isinstance(v, list) and len(v) == 2]
    return " AND ".join(t for t in texts if t)


def _upstream_of_class(prompt: dict, start: str | None, link: str, classes: tuple[str, ...]) -> dict | None:
    seen = set()
    while start is not None and start in prompt and start not in seen:
        seen.add(start)
        node = prompt[start]
        if node.get("class_type") in classes:
            return node
        start = _link(node, link)
    return None


def a1111_infotext(prompt: dict, image_node: str, env, size: tuple[int, int]) -> str | None:
    """A1111 infotext for the images of output node `image_node`, or None when no sampler made them."""
    chain = _samplers_upstream(prompt, _link(prompt[image_node], "images"))
    if not chain:
        return None
    first = prompt[chain[0]]
    i = first["inputs"]
    sampler = i.get("sampler_name")
    from .sampling import SAMPLERS
    sid = SAMPLERS.get(sampler, (sampler, {}))[0]
    info = sampler_registry.INFO.get(sid)
    params = {"Steps": i.get("steps"), "Sampler": info.label if info else sampler,
              "Schedule type": _SCHEDULE_LABELS.get(i.get("scheduler"), i.get("scheduler")),
              "CFG scale": i.get("cfg"), "Seed": i.get("seed", i.get("noise_seed")), "Size": f"{size[0]}x{size[1]}"}
    ckpt = _upstream_of_class(prompt, _link(first, "model"), "model", ("CheckpointLoaderSimple",))
    if ckpt is not None and isinstance(ckpt["inputs"].get("ckpt_name"), str):
        name = ckpt["inputs"]["ckpt_name"]
        path = env.checkpoint_files().get(name) if env is not None else None
        params["Model hash"] = _file_hash10(path) if path is not None else None
        params["Model"] = Path(name).stem if name.endswith((".safetensors", ".ckpt")) else name
    if first["class_type"] == "KSampler" and float(i.get("denoise", 1.0)) < 1.0:
        params["Denoising strength"] = i.get("denoise")
    enc = _upstream_of_class(prompt, _link(first, "positive"), "conditioning", ("CLIPTextEncode",))
    layer = _upstream_of_class(prompt, _link(enc, "clip") if enc else None, "clip", ("CLIPSetLastLayer",))
    if layer is not None and isinstance(layer["inputs"].get("stop_at_clip_layer"), int):
        params["Clip skip"] = -layer["inputs"]["stop_at_clip_layer"]
    params["RNG"] = "CPU"
    if len(chain) > 1:                 # the hand-over between samplers (KSamplerAdvanced in sequence)
        parts = []
        for n in chain:
            a = prompt[n]["inputs"]
            span = (f" steps {a.get('start_at_step', 0)}-{min(a.get('end_at_step', a.get('steps')), a.get('steps'))}"
                    if prompt[n]["class_type"] == "KSamplerAdvanced" else "")
            parts.append(f"{a.get('sampler_name')} {a.get('scheduler')}{span}")
        params["Samplers"] = "; ".join(parts)
    params["Version"] = f"diffusekit {__version__}"
    return format_infotext(_text(prompt, _link(first, "positive")), _text(prompt, _link(first, "negative")) or None,
                           params)


# ------------------------------------------------------------------ API graph -> editor graph
def ui_workflow(prompt: dict) -> dict:
    """ComfyUI's editor format (version 0.4) for an API-format graph: one node per entry, one link per
    [node_id, index] input, widget values in input order (a seed widget followed by "fixed")."""
    ids: dict[str, int] = {}
    for k in sorted(prompt, key=_id_key):
        ids[k] = int(k) if str(k).isdigit() else 0
    used = {v for v in ids.values() if v}
    nxt = max(used or {0}) + 1
    for k in ids:
        if ids[k] == 0:
            ids[k], nxt = nxt, nxt + 1
    depth: dict[str, int] = {}

    def level(n: str, trail=()) -> int:
        if n in depth:
            return depth[n]
        ups = [str(v[0]) for v in (prompt[n].get("inputs") or {}).values()
               if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt and str(v[0]) not in trail]
        depth[n] = 1 + max((level(u, trail + (n,)) for u in ups), default=-1)
        return depth[n]

    nodes, links, rows = [], [], {}
    out_links: dict[tuple[str, int], list[int]] = {}
    for order, k in enumerate(sorted(prompt, key=lambda n: (level(n), _id_key(n)))):
        node = prompt[k]
        spec = NODES.get(node.get("class_type"))
        col = level(k)
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets = [], []
        names = list(spec.inputs) if spec else list(node.get("inputs") or {})
        for name in names:
            v = (node.get("inputs") or {}).get(name)
            ispec = spec.inputs[name] if spec else None
            if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt:
                lid = len(links) + 1
                src = prompt[str(v[0])]
                src_spec = NODES.get(src.get("class_type"))
                ltype = src_spec.outputs[v[1]] if src_spec and v[1] < len(src_spec.outputs) else "*"
                links.append([lid, ids[str(v[0])], int(v[1]), ids[k], len(inputs), ltype])
                inputs.append({"name": name, "type": ltype, "link": lid})
                out_links.setdefault((str(v[0]), int(v[1])), []).append(lid)
            elif ispec is None or not ispec.is_link:
                widgets.append(v)
                if ispec is not None and ispec.options.get("control_after_generate"):
                    widgets.append("fixed")
        nodes.append({"id": ids[k], "type": node.get("class_type"), "pos": [40 + 360 * col, 40 + 260 * row],
                      "size": [320, 200], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                      "properties": {"Node name for S&R": node.get("class_type")}, "widgets_values": widgets,
                      "_key": k})
    for n in nodes:
        spec = NODES.get(n["type"])
        k = n.pop("_key")
        for slot, t in enumerate(spec.outputs if spec else ()):
            n["outputs"].append({"name": (spec.output_names or spec.outputs)[slot], "type": t,
                                 "links": out_links.get((k, slot), []), "slot_index": slot})
    return {"last_node_id": max(ids.values(), default=0), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}

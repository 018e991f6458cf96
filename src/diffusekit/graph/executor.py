"""Run a validated API-format workflow: only the nodes its output nodes need, in dependency order, reusing
the outputs of nodes that did not change since the previous run, as ComfyUI does.

A node's cache key is its signature: its class_type, its widget values and the signatures of the nodes
its links come from (plus, for LoadImage / LoadImageMask, the file's content hash: ComfyUI's IS_CHANGED).
A node whose signature was computed in the previous run is not run again; its outputs and UI output
(SaveImage's file list) are reused. The cache keeps the previous run's nodes only (ComfyUI's default).

Events go to `send(event, data)` with ComfyUI's websocket message names and payloads: execution_start,
execution_cached, executing, progress, executed, execution_success, execution_error,
execution_interrupted; `preview(render)` receives step previews as functions returning a PIL image
(rendered only if shown). `RunRecord` is what the history keeps: the UI outputs per node, the status
messages, success or not.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..pipelines.pipeline import Interrupted
from .spec import NODES, NodeResult, NodeSpec
from .validate import _id_key


class InterruptedRun(Exception):
    """The prompt was interrupted (POST /interrupt) between or inside nodes."""


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RunContext:
    """What a node function gets as `ctx`: the environment, the prompt being run and its extra data
    (extra_pnginfo for the PNG `workflow` chunk), progress reporting and the interrupt flag."""

    env: Any
    prompt: dict
    prompt_id: str
    extra_data: dict
    send: Callable[[str, dict], None]
    preview: Callable[[Any], None]
    should_stop: Callable[[], bool]
    node_id: str | None = None

    def progress(self, value: int, total: int, image: Callable[[], Any] | None = None) -> None:
        """ComfyUI's progress message; `image`: a function rendering the step's preview (PIL), called only
        by a client that shows previews."""
        self.send("progress", {"value": int(value), "max": int(total), "prompt_id": self.prompt_id,
                               "node": self.node_id})
        if image is not None:
            self.preview(image)

    def check_interrupt(self) -> None:
        if self.should_stop():
            raise InterruptedRun()


@dataclass
class RunRecord:
    outputs: dict = field(default_factory=dict)          # node_id -> UI output ({"images": [...]})
    messages: list = field(default_factory=list)         # [[event, data], ...] for the history's status
    success: bool = False
    interrupted: bool = False
    executed: list = field(default_factory=list)         # node ids run (not cached)
    cached: list = field(default_factory=list)
    error: dict | None = None

    def status(self) -> dict:
        return {"status_str": "success" if self.success else "error", "completed": self.success,
                "messages": self.messages}


def _format_value(v):
    if v is None or isinstance(v, (int, float, bool, str)):
        return v
    return str(v)[:200]


class GraphExecutor:
    """Runs workflows one after the other (one thread), keeping the previous run's outputs."""

    def __init__(self, env, nodes: dict[str, NodeSpec] | None = None):
        self.env = env
        self.nodes = NODES if nodes is None else nodes
        self._cache: dict[str, tuple[tuple, dict | None]] = {}     # signature -> (outputs, ui)

    def clear_cache(self) -> None:
        self._cache = {}

    # ------------------------------------------------------------------ planning
    def _signature(self, prompt: dict, node_id: str, memo: dict) -> str:
        if node_id in memo:
            return memo[node_id]
        node = prompt[node_id]
        spec = self.nodes[node["class_type"]]
        parts: dict[str, Any] = {}
        for name in sorted(node.get("inputs", {})):
            v = node["inputs"][name]
            if name not in spec.inputs:
                continue                                  # extra keys do not change what a node computes
            if isinstance(v, list) and spec.inputs[name].is_link:
                parts[name] = ["link", self._signature(prompt, str(v[0]), memo), v[1]]
            else:
                parts[name] = v
        changed = getattr(spec.fn, "is_changed", None)
        if changed is not None:
            try:
                parts["__changed__"] = changed(self.env, **{k: node["inputs"].get(k) for k in spec.inputs
                                                            if not spec.inputs[k].is_link})
            except Exception as e:                        # e.g. the file vanished: run it and let it fail
                parts["__changed__"] = f"error {e}"
        text = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
        memo[node_id] = hashlib.sha256(text.encode()).hexdigest()
        return memo[node_id]

    def order(self, prompt: dict, outputs: list[str]) -> list[str]:
        """The nodes the outputs need, dependencies first; outputs in id order, each with its inputs in
        input order (ComfyUI runs the output needing the fewest new nodes first; same set, same values)."""
        seen, order = set(), []

        def visit(n: str):
            if n in seen:
                return
            seen.add(n)
            for v in prompt[n].get("inputs", {}).values():
                if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt:
                    visit(str(v[0]))
            order.append(n)

        for out in sorted(outputs, key=_id_key):
            visit(out)
        return order

    # ------------------------------------------------------------------ running
    def run(self, prompt: dict, prompt_id: str, outputs: list[str], *, extra_data: dict | None = None,
            send: Callable[[str, dict], None] = lambda e, d: None, preview: Callable[[Any], None] = lambda img: None,
            should_stop: Callable[[], bool] = lambda: False) -> RunRecord:
        """Run a workflow that `validate_prompt` accepted (`outputs`: its good outputs)."""
        extra_data = dict(extra_data or {})
        rec = RunRecord()

        def emit(event: str, data: dict, keep: bool = False):
            if keep:
                data = {**data, "timestamp": _now_ms()}
                rec.messages.append([event, data])
            send(event, data)

        ctx = RunContext(self.env, prompt, prompt_id, extra_data, emit, preview, should_stop)
        emit("execution_start", {"prompt_id": prompt_id}, keep=True)
        order = self.order(prompt, outputs)
        memo: dict[str, str] = {}
        pnginfo = json.dumps(extra_data.get("extra_pnginfo"), sort_keys=True, default=str)
        sigs = {}
        for n in order:
            s = self._signature(prompt, n, memo)
            if self.nodes[prompt[n]["class_type"]].output_node:
                s = hashlib.sha256((s + pnginfo).encode()).hexdigest()
            sigs[n] = s
        rec.cached = [n for n in order if sigs[n] in self._cache]
        emit("execution_cached", {"nodes": rec.cached, "prompt_id": prompt_id}, keep=True)
        values: dict[str, tuple] = {}
        new_cache: dict[str, tuple[tuple, dict | None]] = {}
        for n in order:
            if sigs[n] in self._cache:
                values[n], ui = self._cache[sigs[n]]
                new_cache[sigs[n]] = (values[n], ui)
                if ui:
                    rec.outputs[n] = ui
                continue
            spec = self.nodes[prompt[n]["class_type"]]
            kwargs = {}
            try:
                ctx.check_interrupt()
                ctx.node_id = n
                emit("executing", {"node": n, "display_node": n, "prompt_id": prompt_id})
                for name, ispec in spec.inputs.items():
                    if name not in prompt[n].get("inputs", {}):
                        continue
                    v = prompt[n]["inputs"][name]
                    kwargs[name] = values[str(v[0])][v[1]] if isinstance(v, list) and ispec.is_link else v
                result = spec.fn(ctx, **kwargs)
                if isinstance(result, NodeResult):
                    out, ui = tuple(result.outputs), result.ui
                else:
                    out, ui = tuple(result) if result is not None else (), None
                values[n] = out
                new_cache[sigs[n]] = (out, ui)
                rec.executed.append(n)
                if ui:
                    rec.outputs[n] = ui
                    emit("executed", {"node": n, "display_node": n, "output": ui, "prompt_id": prompt_id})
            except (InterruptedRun, Interrupted):
                rec.interrupted = True
                emit("execution_interrupted", {"prompt_id": prompt_id, "node_id": n, "node_type": spec.class_type,
                                               "executed": list(rec.executed)}, keep=True)
                break
            except Exception as e:
                rec.error = {"prompt_id": prompt_id, "node_id": n, "node_type": spec.class_type,
                             "executed": list(rec.executed), "exception_message": str(e),
                             "exception_type": _type_name(e), "traceback": traceback.format_tb(e.__traceback__),
                             "current_inputs": {k: [_format_value(v)] for k, v in kwargs.items()},
                             "current_outputs": {}}
                emit("execution_error", rec.error, keep=True)
                break
        else:
            rec.success = True
            emit("execution_success", {"prompt_id": prompt_id}, keep=True)
        # ComfyUI keeps what this run computed or reused; a failed node's inputs stay cached too
        self._cache = new_cache
        ctx.node_id = None
        return rec


def _type_name(e: BaseException) -> str:
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"

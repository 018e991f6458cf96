"""Check a whole API-format workflow before anything runs, and answer in ComfyUI's error shape.

An API-format workflow ("prompt") maps node ids to {"class_type": ..., "inputs": {name: value | [node_id,
output_index]}}. `validate_prompt` returns a `Validation` whose fields are what ComfyUI's execution
.validate_prompt returns and its POST /prompt sends: `error` = {"type", "message", "details", "extra_info"}
and `node_errors` = {node_id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}}, each error
{"type", "message", "details", "extra_info": {"input_name", "input_config", "received_value", ...}}.

Checked, for every node an output node depends on: the class_type exists; every required input is there;
a link is a [node_id, index] pair naming an existing node and one of its outputs, of the input's type; a
widget value converts to its type (INT, FLOAT, STRING, BOOLEAN; NaN and infinity refused), lies within its
min/max and, for a choice, is one of the choices (the error lists them); no dependency cycle; and the
server's limits (`limits`: an object with max_steps, max_pixels, max_batch_size, max_prompt_chars) where
a node's inputs fix them; at most MAX_NODES nodes. Values are converted in place (the string "20" becomes
the int 20), as ComfyUI does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .spec import NODES, Input, NodeSpec

MAX_NODES = 500     # deeper graphs would also run past Python's recursion limit in the walks below
CHOICES_SHOWN = 64   # longer choice lists are left out of the message (ComfyUI: 20; ours name every sampler)


@dataclass
class Validation:
    ok: bool
    error: dict | None = None
    outputs: list[str] = field(default_factory=list)      # the output nodes that will run
    node_errors: dict = field(default_factory=dict)


def _error(type_: str, message: str, details: str = "", **extra) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


def _prompt_error(type_: str, message: str, details: str = "") -> Validation:
    return Validation(False, _error(type_, message, details), [], {})


def _convert(value: Any, kind: str):
    """A widget value as its type, or raise ValueError / TypeError saying why not."""
    if isinstance(value, (list, dict)) or value is None:
        raise TypeError(f"expected a {kind} value, got {type(value).__name__}")
    if kind == "INT":
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if kind == "FLOAT":
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{value!r} is not a finite number")
        return v
    if kind == "BOOLEAN":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{value!r} is not true or false")
    return str(value)


def _check_widget(name: str, spec: Input, inputs: dict, env) -> dict | None:
    value = inputs[name]
    config = spec.describe(env)
    if spec.type == "COMBO":
        choices = spec.choice_list(env)
        if not isinstance(value, str) or value not in choices:
            shown = str(choices) if len(choices) <= CHOICES_SHOWN else f"(list of length {len(choices)})"
            return _error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {shown}",
                          input_name=name, input_config=config if len(choices) <= CHOICES_SHOWN else None,
                          received_value=value)
        return None
    try:
        value = _convert(value, spec.type)
    except (TypeError, ValueError, OverflowError) as e:
        return _error("invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
                      f"{name}, {inputs[name]!r}, {e}", input_name=name, input_config=config,
                      received_value=inputs[name], exception_message=str(e))
    inputs[name] = value
    lo, hi = spec.options.get("min"), spec.options.get("max")
    if lo is not None and value < lo:
        return _error("value_smaller_than_min", f"Value {value} smaller than min of {lo}", name,
                      input_name=name, input_config=config, received_value=value)
    if hi is not None and value > hi:
        return _error("value_bigger_than_max", f"Value {value} bigger than max of {hi}", name,
                      input_name=name, input_config=config, received_value=value)
    return None


def _check_link(name: str, spec: Input, value: list, prompt: dict, nodes: dict) -> dict | None:
    config = spec.describe(None) if spec.type != "COMBO" else None
    if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
        return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                      name, input_name=name, input_config=config, received_value=value)
    source = str(value[0])
    if source not in prompt:
        return _error("bad_linked_input", f"Linked node {source!r} does not exist",
                      f"{name}: node {source!r} is not in the workflow "
                      f"(nodes: {', '.join(sorted(prompt, key=_id_key))})",
                      input_name=name, input_config=config, received_value=value, linked_node=value)
    src_spec = nodes.get(prompt[source].get("class_type")) if isinstance(prompt[source], dict) else None
    if src_spec is None:
        return None                           # the source node's own error is reported on it
    if not 0 <= value[1] < len(src_spec.outputs):
        return _error("bad_linked_input", f"Linked node {source!r} has no output {value[1]}",
                      f"{name}: {src_spec.class_type} has outputs 0..{len(src_spec.outputs) - 1} "
                      f"({', '.join(src_spec.outputs) or 'none'})", input_name=name, input_config=config,
                      received_value=value, linked_node=value)
    received = src_spec.outputs[value[1]]
    if spec.is_link and received != spec.type or not spec.is_link:
        return _error("return_type_mismatch", "Return type mismatch between linked nodes",
                      f"{name}, received_type({received}) mismatch input_type({spec.type})", input_name=name,
                      input_config=config, received_type=received, linked_node=value)
    return None


def _limit_errors(spec: NodeSpec, inputs: dict, limits) -> list[dict]:
    """Server limits that a node's own widget values already decide."""
    if limits is None:
        return []
    out = []

    def over(name, value, limit, what):
        out.append(_error("value_bigger_than_max", f"Value {value} bigger than the server limit {what}={limit}",
                          name, input_name=name, received_value=value))

    steps = inputs.get("steps")
    if spec.class_type in ("KSampler", "KSamplerAdvanced") and isinstance(steps, int) and steps > limits.max_steps:
        over("steps", steps, limits.max_steps, "max_steps")
    w, h = inputs.get("width"), inputs.get("height")
    sized = spec.class_type in ("EmptyLatentImage", "LatentUpscale", "ImageScale")
    if sized and isinstance(w, int) and isinstance(h, int):
        if w * h > limits.max_pixels:
            over("width", f"{w}x{h}", limits.max_pixels, "max_pixels")
    text = inputs.get("text")
    max_chars = getattr(limits, "max_prompt_chars", None)
    if spec.class_type == "CLIPTextEncode" and isinstance(text, str) and max_chars and len(text) > max_chars:
        over("text", f"{len(text)} characters", max_chars, "max_prompt_chars")
    b = inputs.get("batch_size")
    if spec.class_type == "EmptyLatentImage" and isinstance(b, int) and b > limits.max_batch_size:
        over("batch_size", b, limits.max_batch_size, "max_batch_size")
    return out


def _node_errors(node_id: str, prompt: dict, nodes: dict, env, limits) -> list[dict]:
    node = prompt[node_id]
    spec = nodes[node["class_type"]]
    inputs = node.setdefault("inputs", {})
    if not isinstance(inputs, dict):
        return [_error("invalid_prompt", "inputs must be an object {name: value}", f"Node ID '#{node_id}'")]
    errors = []
    for name, ispec in spec.inputs.items():
        if name not in inputs:
            if ispec.optional:
                continue
            errors.append(_error("required_input_missing", "Required input is missing", name, input_name=name))
            continue
        value = inputs[name]
        if isinstance(value, list):
            e = _check_link(name, ispec, value, prompt, nodes)
        elif ispec.is_link:
            e = _error("required_input_missing", "Required input is missing",
                       f"{name}: a {ispec.type} input must be linked to another node's output ([node_id, index]), "
                       f"got {value!r}", input_name=name, received_value=value)
        else:
            e = _check_widget(name, ispec, inputs, env)
        if e is not None:
            errors.append(e)
    if not errors:
        errors += _limit_errors(spec, inputs, limits)
    return errors


def _id_key(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def _upstream(prompt: dict, node_id: str) -> list[str]:
    inputs = prompt[node_id].get("inputs") or {}
    if not isinstance(inputs, dict):
        return []
    return [str(v[0]) for v in inputs.values() if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt]


def find_cycle(prompt: dict, start: str) -> list[str] | None:
    """A dependency cycle reachable from `start` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1 on the current path, 2 done
    path: list[str] = []

    def visit(n: str):
        state[n] = 1
        path.append(n)
        for m in _upstream(prompt, n):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    return visit(start)


def validate_prompt(prompt: Any, env=None, *, nodes: dict[str, NodeSpec] | None = None, limits=None) -> Validation:
    """Validate an API-format workflow as ComfyUI does (module docstring). Mutates `prompt`: widget values
    are converted to their types."""
    nodes = NODES if nodes is None else nodes
    if not isinstance(prompt, dict) or not prompt:
        return _prompt_error("invalid_prompt", "The prompt must be a non-empty JSON object {node_id: node}",
                             f"got {type(prompt).__name__}")
    if len(prompt) > MAX_NODES:
        return _prompt_error("invalid_prompt", f"The workflow has {len(prompt)} nodes; at most {MAX_NODES} are accepted")
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _prompt_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                 f"Node ID '#{node_id}'")
        if not isinstance(node["class_type"], str) or node["class_type"] not in nodes:
            return _prompt_error("invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                                 f"Node ID '#{node_id}'; known node types: {', '.join(sorted(nodes))}")
        if nodes[node["class_type"]].output_node:
            outputs.append(str(node_id))
    if not outputs:
        return _prompt_error("prompt_no_outputs", "Prompt has no outputs",
                             "add an output node: " + ", ".join(k for k, s in sorted(nodes.items()) if s.output_node))
    outputs.sort(key=_id_key)
    node_errors: dict[str, dict] = {}
    good, checked = [], {}
    for out in outputs:
        cycle = find_cycle(prompt, out)
        if cycle:
            e = _error("dependency_cycle", "Dependency cycle detected", " -> ".join(cycle), nodes=cycle)
            node_errors.setdefault(cycle[0], {"errors": [e], "dependent_outputs": [],
                                              "class_type": prompt[cycle[0]]["class_type"]})
            node_errors[cycle[0]]["dependent_outputs"].append(out)
            continue
        ok, stack, seen = True, [out], set()
        while stack:                                    # every node this output depends on
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n not in checked:
                checked[n] = _node_errors(n, prompt, nodes, env, limits)
            if checked[n]:
                ok = False
                entry = node_errors.setdefault(n, {"errors": checked[n], "dependent_outputs": [],
                                                   "class_type": prompt[n]["class_type"]})
                entry["dependent_outputs"].append(out)
            stack += _upstream(prompt, n)
        if ok:
            good.append(out)
    if not good:
        lines = [f"{e['message']}: {e['details']}" for v in node_errors.values() for e in v["errors"]]
        return Validation(False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                        "\n".join(lines)), [], node_errors)
    return Validation(True, None, good, node_errors)

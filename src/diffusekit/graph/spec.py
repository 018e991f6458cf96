"""What a node is: its inputs (ComfyUI's names, types and defaults), its outputs, and the function that runs it.

A node type is a `NodeSpec`; `register` adds one to the `NODES` registry under its ComfyUI class_type. The
description a client reads from GET /object_info is derived from the spec (`object_info`), in ComfyUI's
format: {"input": {"required": {name: [type, options]}, "optional": ..., "hidden": ...}, "input_order",
"output", "output_is_list", "output_name", "name", "display_name", "description", "python_module",
"category", "output_node"}. A combo (choice) input's type is the list of its choices, as ComfyUI sends it;
choices that depend on the server (checkpoint files, LoRAs, uploaded images) are computed from the
`Environment` each time they are asked for.

A node function is `fn(ctx, **inputs)`: `ctx` is the `executor.RunContext` of the running prompt (folders,
model cache, progress, interrupt), the inputs arrive by their ComfyUI names with linked values already
computed. It returns a tuple with one value per output, or a `NodeResult` carrying UI output too
(SaveImage's {"images": [{filename, subfolder, type}]}).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# the value types that travel along links (ComfyUI's names); widget types are INT, FLOAT, STRING, BOOLEAN, combos
LINK_TYPES = ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
MAX_RESOLUTION = 16384          # ComfyUI's nodes.MAX_RESOLUTION
MAX_SEED = 0xFFFFFFFFFFFFFFFF   # ComfyUI's seed widgets accept any unsigned 64-bit value


@dataclass(frozen=True)
class Input:
    """One input. `type` is a link type, a widget type, or "COMBO" with `choices` (a list, or a function of
    the Environment returning one). `options` are ComfyUI's widget options (default, min, max, step, ...)."""

    type: str
    options: dict = field(default_factory=dict)
    choices: Sequence[str] | Callable[[Any], Sequence[str]] | None = None
    optional: bool = False

    def choice_list(self, env) -> list[str]:
        c = self.choices(env) if callable(self.choices) else self.choices
        return list(c or [])

    @property
    def is_link(self) -> bool:
        return self.type not in WIDGET_TYPES and self.type != "COMBO"

    def describe(self, env) -> list:
        """[type or choice list, options] as /object_info shows it."""
        head = self.choice_list(env) if self.type == "COMBO" else self.type
        return [head, dict(self.options)] if self.options else [head]


def Int(default: int, min: int = 0, max: int = MAX_RESOLUTION, step: int | None = None, **opts) -> Input:
    o = {"default": default, "min": min, "max": max, **({"step": step} if step is not None else {}), **opts}
    return Input("INT", o)


def Float(default: float, min: float, max: float, step: float = 0.01, **opts) -> Input:
    return Input("FLOAT", {"default": default, "min": min, "max": max, "step": step, **opts})


def String(default: str | None = None, **opts) -> Input:
    return Input("STRING", ({"default": default} if default is not None else {}) | opts)


def Combo(choices, **opts) -> Input:
    return Input("COMBO", dict(opts), choices=choices)


def Link(type_: str, **opts) -> Input:
    if type_ not in LINK_TYPES:
        raise ValueError(f"unknown link type {type_!r}; valid: {', '.join(LINK_TYPES)}")
    return Input(type_, dict(opts))


@dataclass
class NodeResult:
    """A node's outputs plus what it shows in the UI (`ui`, e.g. {"images": [...]}: the history's outputs)."""

    outputs: tuple = ()
    ui: dict | None = None


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    fn: Callable
    inputs: dict[str, Input]
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    category: str = "sd"
    display_name: str | None = None
    description: str = ""
    hidden: dict[str, str] = field(default_factory=dict)   # ComfyUI's hidden inputs (PROMPT, EXTRA_PNGINFO)

    def required(self) -> dict[str, Input]:
        return {k: v for k, v in self.inputs.items() if not v.optional}

    def object_info(self, env) -> dict:
        req = {k: v.describe(env) for k, v in self.inputs.items() if not v.optional}
        opt = {k: v.describe(env) for k, v in self.inputs.items() if v.optional}
        inputs: dict[str, dict] = {"required": req}
        if opt:
            inputs["optional"] = opt
        if self.hidden:
            inputs["hidden"] = dict(self.hidden)
        return {
            "input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(self.outputs), "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs), "name": self.class_type,
            "display_name": self.display_name or self.class_type, "description": self.description,
            "python_module": "nodes", "category": self.category, "output_node": self.output_node,
        }


NODES: dict[str, NodeSpec] = {}


def register(class_type: str, *, inputs: dict[str, Input], outputs: Sequence[str] = (), output_node: bool = False,
             category: str = "sd", display_name: str | None = None, output_names: Sequence[str] | None = None,
             hidden: dict[str, str] | None = None):
    """Decorator: `@register("KSampler", inputs={...}, outputs=("LATENT",))` above `def fn(ctx, **inputs)`;
    the function's docstring becomes the node's description."""
    def add(fn: Callable) -> Callable:
        if class_type in NODES:
            raise ValueError(f"node {class_type!r} is registered twice")
        for t in outputs:
            if t not in LINK_TYPES:
                raise ValueError(f"{class_type}: output type {t!r} is not one of {LINK_TYPES}")
        NODES[class_type] = NodeSpec(class_type, fn, dict(inputs), tuple(outputs),
                                     tuple(output_names) if output_names else None, output_node, category,
                                     display_name, " ".join((fn.__doc__ or "").split()), dict(hidden or {}))
        return fn
    return add

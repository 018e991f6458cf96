"""ComfyUI-compatible workflow graphs: API-format JSON in, the core nodes' outputs out.

A layer between `pipelines` and `interfaces`: it uses pipelines, models, core and media and knows nothing
of HTTP. `validate_prompt` checks a whole graph first (ComfyUI's node_errors shape), `GraphExecutor` runs
what the output nodes need, in dependency order, reusing unchanged nodes' outputs between runs.

    from diffusekit.graph import Environment, GraphExecutor, validate_prompt
    env = Environment(output_dir="out/comfy")
    check = validate_prompt(prompt, env)               # check.ok, check.error, check.node_errors
    record = GraphExecutor(env).run(prompt, "my-id", check.outputs)
    record.outputs                                     # {"9": {"images": [{"filename", "subfolder", "type"}]}}
"""
from . import nodes  # noqa: F401  (registers the core nodes)
from .environment import Environment, PathRefused
from .executor import GraphExecutor, RunContext, RunRecord
from .spec import NODES, NodeSpec
from .validate import Validation, validate_prompt

__all__ = ["Environment", "GraphExecutor", "NODES", "NodeSpec", "PathRefused", "RunContext", "RunRecord",
           "Validation", "object_info", "validate_prompt"]


def object_info(env, class_type: str | None = None) -> dict:
    """GET /object_info (or /object_info/{class_type}): every node described as ComfyUI does."""
    if class_type is not None:
        return {class_type: NODES[class_type].object_info(env)} if class_type in NODES else {}
    return {name: spec.object_info(env) for name, spec in NODES.items()}

"""Weight layouts of CLIP text encoders: transformers' config.json -> `CLIPTextConfig`, and the
rename tables between the transformers layout (diffusers folders) and our two modules.

Every function checks the keys and shapes it receives against the module it feeds and raises a
ValueError that names the missing, unexpected or mis-shaped keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keys import module_shapes
from .clip import ACTIVATIONS, CLIPTextConfig, CLIPTextModel, OpenCLIPTextModel

_HF_PREFIX = "text_model."

# transformers suffix (inside text_model.encoder.layers.N.) -> open_clip suffix (inside
# transformer.resblocks.N.); q/k/v are handled apart because open_clip stacks them
_LAYER_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_TOP_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def clip_config_from_hf(config: Mapping, *, with_projection: bool | None = None) -> CLIPTextConfig:
    """`CLIPTextConfig` from a transformers config.json dict: a `CLIPTextConfig` dict (diffusers
    `text_encoder*/config.json`) or a full `CLIPConfig` dict (its `text_config` is used).
    `with_projection=None` keeps a text projection iff `architectures` names
    CLIPTextModelWithProjection (transformers writes a projection_dim into every CLIP config)."""
    if "text_config" in config:
        config = {**config["text_config"], "architectures": config.get("architectures", [])}
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"not a CLIP text config: it lacks {missing}")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; valid: {sorted(ACTIVATIONS)}")
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    return CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408),
        width=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"],
        max_positions=config.get("max_position_embeddings", 77),
        act=act,
        projection_dim=config.get("projection_dim", config["hidden_size"]) if with_projection else None,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
    )


def expected_shapes(module_cls: type, config: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `module_cls(config)`'s state dict, built on the meta device (no memory)."""
    return module_shapes(lambda: module_cls(config))


def check_state_dict(sd: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """ValueError naming missing, unexpected and mis-shaped keys of `sd` against `shapes`."""
    missing = sorted(set(shapes) - set(sd))
    unexpected = sorted(set(sd) - set(shapes))
    wrong = sorted(f"{k}: {tuple(sd[k].shape)} != {shapes[k]}"
                   for k in set(sd) & set(shapes) if tuple(sd[k].shape) != shapes[k])
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def clip_state_dict_from_hf(sd: Mapping[str, torch.Tensor], config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """A transformers text-encoder state dict in `CLIPTextModel`'s keys: adds the `text_model.`
    prefix that transformers >= 5 leaves out when it saves a plain CLIPTextModel, drops the
    position-id buffer that older saves carry, and checks keys and shapes."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(_HF_PREFIX) and key != "text_projection.weight":
            key = _HF_PREFIX + key
        if key in CLIPTextModel.ignored_keys:
            continue
        out[key] = value
    check_state_dict(out, expected_shapes(CLIPTextModel, config), "transformers CLIP text state dict")
    return out


def openclip_state_dict_from_hf(sd: Mapping[str, torch.Tensor], config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModel(WithProjection)` weights (e.g. a diffusers `text_encoder_2`) in
    `OpenCLIPTextModel`'s keys: q/k/v weights and biases stacked into `attn.in_proj_*` (in that
    order, as torch's MultiheadAttention expects), `text_projection.weight` (P, W) transposed into
    the (W, P) matrix open_clip multiplies from the right, the rest renamed by table."""
    sd = clip_state_dict_from_hf(sd, config)
    out = {new: sd[old] for old, new in _TOP_RENAMES.items()}
    for i in range(config.layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)  # (3W, W) / (3W,)
        for old, new in _LAYER_RENAMES.items():
            out[dst + new] = sd[src + old]
    if config.projection_dim is not None:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()  # (W, P)
    check_state_dict(out, expected_shapes(OpenCLIPTextModel, config), "converted open_clip state dict")
    return out

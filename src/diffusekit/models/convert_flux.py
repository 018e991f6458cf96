"""diffusers `FluxTransformer2DModel` layout <-> Flux single-file keys (BFL's, ComfyUI's `model.diffusion_model.*`).

A table from every `Flux` key to the diffusers key(s) it is made of, with one of three operations,
checked key by key and shape by shape against the model the config builds (nanoGPT's `from_pretrained`
pattern): `copy`; `cat` (our fused tensor = diffusers' pieces concatenated along the output axis: a
double block's `img_attn.qkv` = `to_q`, `to_k`, `to_v`, its `txt_attn.qkv` = `add_q_proj`, `add_k_proj`,
`add_v_proj`, a single block's `linear1` = `to_q`, `to_k`, `to_v`, `proj_mlp`); `swap` (diffusers'
`AdaLayerNormContinuous` orders the final modulation (scale, shift), BFL (shift, scale)). Facts from
diffusers 0.42 `FluxTransformer2DModel` and `convert_flux_to_diffusers.py`. `flux_config_from_shapes`
reads a single file's config from its key shapes (ComfyUI `model_detection`'s rules).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .convert_mmdit import from_table, to_table
from .flux import DEV, Flux, FluxConfig
from .keys import module_shapes

__all__ = ["flux_config_from_diffusers", "flux_config_from_shapes", "flux_key_table", "flux_state_dict_from_diffusers",
           "flux_state_dict_to_diffusers", "flux_config_to_diffusers"]

_KNOWN = {"patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
          "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"}

Table = dict[str, tuple[str, tuple[str, ...]]]


def flux_config_from_diffusers(config: Mapping) -> FluxConfig:
    """`FluxConfig` equivalent to a diffusers `transformer/config.json` dict; ValueError if none is."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN)
    if unknown:
        raise ValueError(f"unknown FluxTransformer2DModel config keys {unknown}; known: {sorted(_KNOWN)}")
    if int(config.get("patch_size", 1)) != 1:
        raise ValueError(f"patch_size={config['patch_size']}: diffusers' Flux packs 2x2 latent patches in the "
                         "pipeline and its transformer has patch_size=1; other values are not a Flux model")
    heads = int(config.get("num_attention_heads", 24))
    in_ch = int(config.get("in_channels", 64))
    out = config.get("out_channels")
    return FluxConfig(
        in_channels=in_ch, out_channels=None if out in (None, in_ch) else int(out),
        vec_in_dim=int(config.get("pooled_projection_dim", 768)),
        context_in_dim=int(config.get("joint_attention_dim", 4096)),
        hidden_size=heads * int(config.get("attention_head_dim", 128)), num_heads=heads,
        depth=int(config.get("num_layers", 19)), depth_single_blocks=int(config.get("num_single_layers", 38)),
        axes_dim=tuple(int(a) for a in config.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(config.get("guidance_embeds", False)))


def flux_config_to_diffusers(cfg: FluxConfig) -> dict:
    """The `FluxTransformer2DModel(**kwargs)` of a config (mlp_ratio 4, qkv biases, theta 10000: diffusers' fixed ones)."""
    if cfg.mlp_ratio != 4.0 or not cfg.qkv_bias or cfg.theta != 10000:
        raise ValueError(f"diffusers' Flux has mlp_ratio 4, qkv biases and theta 10000; got {cfg.mlp_ratio}, "
                         f"{cfg.qkv_bias}, {cfg.theta}")
    return dict(patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
                num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
                num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
                pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
                axes_dims_rope=tuple(cfg.axes_dim))


def flux_key_table(cfg: FluxConfig) -> Table:
    """{Flux key: (operation, diffusers keys)} for every parameter of `Flux(cfg)`."""
    t: Table = {}

    def both(ours: str, theirs: str | tuple[str, ...], op: str = "copy"):
        theirs = (theirs,) if isinstance(theirs, str) else theirs
        for p in ("weight", "bias"):
            t[f"{ours}.{p}"] = (op, tuple(f"{k}.{p}" for k in theirs))

    both("img_in", "x_embedder")
    both("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if cfg.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for ours, theirs in embedders:
        both(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        both(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    for i in range(cfg.depth):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for s, norm1, q, k, v, out, nq, nk, ff in (
                ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
                ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q",
                 "norm_added_k", "ff_context")):
            both(f"{o}.{s}_mod.lin", f"{d}.{norm1}.linear")
            both(f"{o}.{s}_attn.qkv", tuple(f"{d}.attn.{n}" for n in (q, k, v)), "cat")
            t[f"{o}.{s}_attn.norm.query_norm.scale"] = ("copy", (f"{d}.attn.{nq}.weight",))
            t[f"{o}.{s}_attn.norm.key_norm.scale"] = ("copy", (f"{d}.attn.{nk}.weight",))
            both(f"{o}.{s}_attn.proj", f"{d}.attn.{out}")
            both(f"{o}.{s}_mlp.0", f"{d}.{ff}.net.0.proj")
            both(f"{o}.{s}_mlp.2", f"{d}.{ff}.net.2")
    for i in range(cfg.depth_single_blocks):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        both(f"{o}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), "cat")
        both(f"{o}.linear2", f"{d}.proj_out")
        t[f"{o}.norm.query_norm.scale"] = ("copy", (f"{d}.attn.norm_q.weight",))
        t[f"{o}.norm.key_norm.scale"] = ("copy", (f"{d}.attn.norm_k.weight",))
        both(f"{o}.modulation.lin", f"{d}.norm.linear")
    both("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    both("final_layer.linear", "proj_out")
    return t


def _shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    return module_shapes(lambda: Flux(cfg))


def flux_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """diffusers `FluxTransformer2DModel.state_dict()` -> `Flux(cfg)` keys; ValueError naming any unknown or
    missing key or a wrong shape."""
    return from_table(sd, flux_key_table(cfg), _shapes(cfg), "diffusers Flux transformer")


def flux_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """`Flux(cfg)` state dict -> diffusers `FluxTransformer2DModel` keys (the inverse of the above)."""
    return to_table(sd, flux_key_table(cfg), _shapes(cfg), "Flux",   # q, k, v (, the MLP input of linear1)
                    lambda dsts: [cfg.mlp_hidden if ".proj_mlp." in d else cfg.hidden_size for d in dsts])


def flux_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "model.diffusion_model.") -> FluxConfig:
    """The `FluxConfig` of a single-file Flux from its key names and shapes: width and input features from
    `img_in`, the head width from the QK-norm gain (so the head count), block counts, MLP ratio, the
    pooled / context widths, guidance-distilled iff `guidance_in` exists. The RoPE split is not stored:
    Flux's (16, 56, 56) for 128-wide heads, the same proportions (d/8, 7d/16, 7d/16) otherwise."""
    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in shapes:
            raise ValueError(f"not a Flux model: {prefix + key} is missing")
        return tuple(shapes[prefix + key])

    hidden, in_ch = shape("img_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale" if prefix + "double_blocks.0.img_mod.lin.weight"
                 in shapes else "single_blocks.0.norm.query_norm.scale")[0]

    def count(kind: str) -> int:
        ids = {int(k[len(prefix):].split(".")[1]) for k in shapes if k.startswith(f"{prefix}{kind}.")}
        return max(ids) + 1 if ids else 0

    depth, single = count("double_blocks"), count("single_blocks")
    mlp = (shape("double_blocks.0.img_mlp.0.weight")[0] if depth else
           shape("single_blocks.0.linear1.weight")[0] - 3 * hidden)
    a0 = head // 8 // 2 * 2
    axes = DEV.axes_dim if head == sum(DEV.axes_dim) else (a0, (head - a0) // 2, (head - a0) // 2)
    out = shape("final_layer.linear.weight")[0]
    return FluxConfig(in_channels=in_ch, out_channels=None if out == in_ch else out,
                      vec_in_dim=shape("vector_in.in_layer.weight")[1], context_in_dim=shape("txt_in.weight")[1],
                      hidden_size=hidden, mlp_ratio=mlp / hidden, num_heads=hidden // head, depth=depth,
                      depth_single_blocks=single, axes_dim=axes,
                      qkv_bias=(prefix + "double_blocks.0.img_attn.qkv.bias") in shapes or depth == 0,
                      guidance_embed=(prefix + "guidance_in.in_layer.weight") in shapes)

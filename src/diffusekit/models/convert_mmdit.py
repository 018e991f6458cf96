"""diffusers `SD3Transformer2DModel` layout <-> MMDiT single-file keys (`model.diffusion_model.*`).

A table from every `MMDiT` key to the diffusers key(s) it is made of, with one of three
operations, checked key by key and shape by shape against the model the config builds (nanoGPT's
`from_pretrained` pattern): `copy`; `qkv` (our fused `attn.qkv` = the concatenation of diffusers'
`to_q`, `to_k`, `to_v`, or `add_q_proj`, `add_k_proj`, `add_v_proj` for the text stream); `swap`
(diffusers' `AdaLayerNormContinuous` orders its modulation (scale, shift), sd3-ref (shift, scale):
the final layer and the last block's pre-only context stream). Facts from diffusers 0.42
`SD3Transformer2DModel`, `JointTransformerBlock` and `convert_sd3_transformer_checkpoint_to_diffusers`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keys import key_list, module_shapes
from .mmdit import MMDiT, MMDiTConfig

__all__ = ["mmdit_config_from_diffusers", "mmdit_config_from_shapes", "mmdit_key_table", "mmdit_state_dict_from_diffusers",
           "mmdit_state_dict_to_diffusers"]

_QK_NORM = {None: None, "rms_norm": "rms"}
_KNOWN = {"sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
          "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
          "pos_embed_max_size", "dual_attention_layers", "qk_norm"}


def mmdit_config_from_diffusers(config: Mapping) -> MMDiTConfig:
    """`MMDiTConfig` equivalent to a diffusers `transformer/config.json` dict; ValueError if none is."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN)
    if unknown:
        raise ValueError(f"unknown SD3Transformer2DModel config keys {unknown}; known: {sorted(_KNOWN)}")
    heads = int(config.get("num_attention_heads", 18))
    hidden = heads * int(config.get("attention_head_dim", 64))
    caption = int(config.get("caption_projection_dim", 1152))
    if caption != hidden:
        raise ValueError(f"caption_projection_dim={caption} must equal num_attention_heads * attention_head_dim "
                         f"= {hidden} (the text stream has the model width in every SD3 model)")
    qk = config.get("qk_norm")
    if qk not in _QK_NORM:
        raise ValueError(f"qk_norm={qk!r} is not supported; valid: {sorted(map(str, _QK_NORM))}")
    in_ch = int(config.get("in_channels", 16))
    return MMDiTConfig(
        in_channels=in_ch, out_channels=int(config.get("out_channels") or in_ch),
        patch_size=int(config.get("patch_size", 2)), depth=int(config.get("num_layers", 18)),
        hidden_size=hidden, num_heads=heads, pos_embed_max_size=int(config.get("pos_embed_max_size", 96)),
        sample_size=int(config.get("sample_size", 128)), context_dim=int(config.get("joint_attention_dim", 4096)),
        adm_in_channels=int(config.get("pooled_projection_dim", 2048)), qk_norm=_QK_NORM[qk],
        x_block_self_attn_layers=tuple(int(i) for i in config.get("dual_attention_layers", ())))


def _attention(ours: str, theirs: str, q: str, k: str, v: str, out: str | None, norm_q: str, norm_k: str,
               cfg: MMDiTConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    table = {f"{ours}.qkv.{p}": ("qkv", tuple(f"{theirs}.{n}.{p}" for n in (q, k, v))) for p in ("weight", "bias")}
    if out is not None:
        table |= {f"{ours}.proj.{p}": ("copy", (f"{theirs}.{out}.{p}",)) for p in ("weight", "bias")}
    if cfg.qk_norm:
        table[f"{ours}.ln_q.weight"] = ("copy", (f"{theirs}.{norm_q}.weight",))
        table[f"{ours}.ln_k.weight"] = ("copy", (f"{theirs}.{norm_k}.weight",))
    return table


def mmdit_key_table(cfg: MMDiTConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{MMDiT key: (operation, diffusers keys)} for every parameter of `MMDiT(cfg)`."""
    t: dict[str, tuple[str, tuple[str, ...]]] = {"pos_embed": ("copy", ("pos_embed.pos_embed",))}

    def both(ours: str, theirs: str, op: str = "copy"):
        for p in ("weight", "bias"):
            t[f"{ours}.{p}"] = (op, (f"{theirs}.{p}",))

    both("x_embedder.proj", "pos_embed.proj")
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        both(f"{ours}.mlp.0", f"time_text_embed.{theirs}.linear_1")
        both(f"{ours}.mlp.2", f"time_text_embed.{theirs}.linear_2")
    both("context_embedder", "context_embedder")
    for i in range(cfg.depth):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == cfg.depth - 1
        t |= _attention(f"{o}.x_block.attn", f"{d}.attn", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", cfg)
        t |= _attention(f"{o}.context_block.attn", f"{d}.attn", "add_q_proj", "add_k_proj", "add_v_proj",
                        None if last else "to_add_out", "norm_added_q", "norm_added_k", cfg)
        if i in cfg.x_block_self_attn_layers:
            t |= _attention(f"{o}.x_block.attn2", f"{d}.attn2", "to_q", "to_k", "to_v", "to_out.0",
                            "norm_q", "norm_k", cfg)
        both(f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
        both(f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear", "swap" if last else "copy")
        both(f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
        both(f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2")
        if not last:
            both(f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
            both(f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2")
    both("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    both("final_layer.linear", "proj_out")
    return t


def _expected_shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    return module_shapes(lambda: MMDiT(cfg))


def _check_keys(sd: Mapping[str, torch.Tensor], want: set[str], what: str) -> None:
    unknown, missing = [k for k in sd if k not in want], [k for k in want if k not in sd]
    if unknown or missing:
        raise ValueError(f"{what} state dict does not match the config: "
                         f"unknown keys [{key_list(unknown, 8)}]; missing keys [{key_list(missing, 8)}]")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along dim 0: (scale, shift) <-> (shift, scale) of a 2-chunk modulation."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def from_table(sd: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, tuple[str, ...]]],
               shapes: Mapping[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
    """Apply a {our key: (op, their keys)} table to their state dict: "copy", "swap" (halves exchanged), or
    "qkv" / "cat" (their pieces concatenated along dim 0); ValueError naming unknown or missing keys (`what`
    says whose) and wrong shapes. Shared by the SD3 and Flux conversions."""
    _check_keys(sd, {k for _, srcs in table.values() for k in srcs}, what)
    out = {}
    for key, (op, srcs) in table.items():
        parts = [sd[s] for s in srcs]
        if len(parts) > 1 and len({p.dtype for p in parts}) > 1:
            raise ValueError(f"{what} keys {', '.join(srcs)} have different dtypes; {key} fuses them")
        t = torch.cat(parts, dim=0) if op in ("qkv", "cat") else (_swap_halves(parts[0]) if op == "swap" else parts[0])
        if tuple(t.shape) != tuple(shapes[key]):
            raise ValueError(f"{what} key(s) {', '.join(srcs)} give shape {tuple(t.shape)}; {key} needs "
                             f"{tuple(shapes[key])}")
        out[key] = t
    return out


def to_table(sd: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, tuple[str, ...]]],
             shapes: Mapping[str, tuple[int, ...]], what: str, sizes) -> dict[str, torch.Tensor]:
    """The inverse of `from_table`: our state dict -> their keys; `sizes(their keys)` gives the dim-0 split of a
    fused tensor."""
    _check_keys(sd, set(table), what)
    out = {}
    for key, (op, dsts) in table.items():
        t = sd[key]
        if tuple(t.shape) != tuple(shapes[key]):
            raise ValueError(f"{key} has shape {tuple(t.shape)}; the config needs {tuple(shapes[key])}")
        if op in ("qkv", "cat"):
            out |= dict(zip(dsts, t.split(sizes(dsts), dim=0)))
        else:
            out[dsts[0]] = _swap_halves(t) if op == "swap" else t
    return out


def mmdit_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """diffusers `SD3Transformer2DModel.state_dict()` -> `MMDiT(cfg)` keys; ValueError naming any
    unknown or missing key or a wrong shape."""
    return from_table(sd, mmdit_key_table(cfg), _expected_shapes(cfg), "diffusers SD3 transformer")


def mmdit_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """`MMDiT(cfg)` state dict -> diffusers `SD3Transformer2DModel` keys (the inverse of the above)."""
    return to_table(sd, mmdit_key_table(cfg), _expected_shapes(cfg), "MMDiT",
                    lambda dsts: [cfg.hidden_size] * len(dsts))


def mmdit_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "model.diffusion_model.",
                             head_dim: int = 64) -> MMDiTConfig:
    """The `MMDiTConfig` of a single-file MMDiT from its key names and shapes (ComfyUI `model_detection`'s
    rules): depth = number of joint blocks, width and patch from `x_embedder.proj`, the positional grid
    from `pos_embed`, qk-norm from `ln_q`, MMDiT-X blocks from `x_block.attn2`. The head count is not
    stored; every released SD3 / SD3.5 model has 64-wide heads (`head_dim`)."""
    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in shapes:
            raise ValueError(f"not an SD3 MMDiT: {prefix + key} is missing")
        return tuple(shapes[prefix + key])

    out_c, in_c, patch, _ = shape("x_embedder.proj.weight")
    blocks = {int(k[len(prefix):].split(".")[1]) for k in shapes if k.startswith(prefix + "joint_blocks.")}
    grid = round(shape("pos_embed")[1] ** 0.5)
    y_key = prefix + "y_embedder.mlp.0.weight"
    final = shape("final_layer.linear.weight")[0]
    return MMDiTConfig(
        in_channels=in_c, out_channels=final // (patch * patch), patch_size=patch, depth=max(blocks) + 1,
        hidden_size=out_c, num_heads=max(1, out_c // head_dim), pos_embed_max_size=grid,
        context_dim=shape("context_embedder.weight")[1],
        adm_in_channels=tuple(shapes[y_key])[1] if y_key in shapes else None,
        qk_norm="rms" if prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None,
        x_block_self_attn_layers=tuple(sorted(i for i in blocks
                                              if f"{prefix}joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)))

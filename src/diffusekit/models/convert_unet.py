"""Rename table between the diffusers `UNet2DConditionModel` layout and LDM checkpoint keys.

`UNetModel` uses the original single-file (LDM / SGM) key names; a diffusers folder
(`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`) is read through a prefix
table, in the manner of nanoGPT's `from_pretrained`: every key is renamed by the longest
matching prefix, every shape is checked against the model the config builds, and unknown or
missing keys are an error that names them. Facts about the diffusers layout are from
diffusers' `UNet2DConditionModel` and its `convert_original_stable_diffusion_to_diffusers`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keys import key_list, module_shapes
from .unet import UNetConfig, UNetModel

__all__ = [
    "unet_config_from_diffusers",
    "unet_key_table",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
]

# ResBlock sub-layers: LDM name -> diffusers ResnetBlock2D name.
_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)

# diffusers config entries this model does not implement, with the value it needs.
_REQUIRED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "class_embed_type": None,
}


def _per_level(value, levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{name}={value} has {len(value)} entries; expected one per level ({levels})")
        return list(value)
    return [value] * levels


def unet_config_from_diffusers(config: Mapping) -> UNetConfig:
    """`UNetConfig` equivalent to a diffusers `unet/config.json` dict; ValueError if none is."""
    for key, want in _REQUIRED.items():
        if key in config and config[key] != want:
            raise ValueError(f"diffusers UNet config {key}={config[key]!r} is not supported "
                             f"(this UNet implements {key}={want!r} only)")
    only_cross = config.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise ValueError("only_cross_attention=True is not supported")

    block_out = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels, mc = len(block_out), block_out[0]
    if any(c % mc for c in block_out):
        raise ValueError(f"block_out_channels={block_out} must be multiples of the first entry")
    channel_mult = tuple(c // mc for c in block_out)

    layers = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    if len(set(layers)) != 1:
        raise ValueError(f"layers_per_block={layers}: only one count for every level is supported")
    nrb = layers[0]

    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    valid_down, valid_up = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    for types, valid in ((down, valid_down), (up, valid_up)):
        if len(types) != levels or any(t not in valid for t in types):
            raise ValueError(f"block types {types}: need {levels} entries from {valid}")

    tlpb = config.get("transformer_layers_per_block", 1)
    tlpb_levels = _per_level(tlpb, levels, "transformer_layers_per_block")
    if any(isinstance(d, (list, tuple)) for d in tlpb_levels):
        raise ValueError("per-layer transformer_layers_per_block (nested lists) is not supported")
    depth = tuple(d if t == "CrossAttnDownBlock2D" else 0 for d, t in zip(tlpb_levels, down))

    reverse = config.get("reverse_transformer_layers_per_block")
    out_depths = []
    for i, t in enumerate(up):  # up block i is level (levels - 1 - i)
        per_layer = reverse[i] if reverse is not None else [tlpb_levels[levels - 1 - i]] * (nrb + 1)
        per_layer = _per_level(per_layer, nrb + 1, f"reverse_transformer_layers_per_block[{i}]")
        out_depths += [d if t == "CrossAttnUpBlock2D" else 0 for d in per_layer]
    default_out = tuple(d for d in reversed(depth) for _ in range(nrb + 1))
    depth_output = None if tuple(out_depths) == default_out else tuple(out_depths)

    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise ValueError(f"mid_block_type={mid_type!r}; valid: 'UNetMidBlock2DCrossAttn', 'UNetMidBlock2D'")
    depth_middle = tlpb_levels[-1] if mid_type == "UNetMidBlock2DCrossAttn" else 0

    # diffusers' `attention_head_dim` is the number of heads (a historic misnomer) unless
    # `num_attention_heads` is given; the head width is channels // heads.
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8),
                       levels, "attention_head_dim")
    used = [lv for lv in range(levels)
            if depth[lv] or any(out_depths[(levels - 1 - lv) * (nrb + 1):(levels - lv) * (nrb + 1)])]
    used += [levels - 1] if depth_middle else []
    used_heads = {heads[lv] for lv in used} or {heads[0]}
    used_widths = {block_out[lv] // heads[lv] for lv in used} or {block_out[0] // heads[0]}
    if len(used_heads) == 1:
        num_heads, num_head_channels = used_heads.pop(), -1
    elif len(used_widths) == 1:
        num_heads, num_head_channels = 8, used_widths.pop()
    else:
        raise ValueError(f"attention heads {heads} over channels {block_out}: need either one head "
                         "count or one head width at every attention level")

    ctx = config.get("cross_attention_dim", 1280)
    ctx_levels = set(_per_level(ctx, levels, "cross_attention_dim"))
    if len(ctx_levels) != 1:
        raise ValueError(f"cross_attention_dim={ctx}: one context width for every level is supported")

    num_classes, adm = None, None
    addition = config.get("addition_embed_type")
    if addition == "text_time":
        num_classes, adm = "sequential", config["projection_class_embeddings_input_dim"]
    elif addition is not None:
        raise ValueError(f"addition_embed_type={addition!r}; valid: None, 'text_time' (SDXL)")
    if config.get("num_class_embeds") is not None:
        if num_classes is not None:
            raise ValueError("num_class_embeds together with addition_embed_type is not supported")
        num_classes = int(config["num_class_embeds"])

    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        model_channels=mc, channel_mult=channel_mult, num_res_blocks=nrb,
        transformer_depth=depth, transformer_depth_middle=depth_middle,
        transformer_depth_output=depth_output, num_heads=num_heads,
        num_head_channels=num_head_channels, context_dim=ctx_levels.pop(),
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        adm_in_channels=adm, num_classes=num_classes,
        norm_num_groups=config.get("norm_num_groups", 32), dropout=config.get("dropout", 0.0),
        upcast_attention=bool(config.get("upcast_attention", False)))


def _prefix_table(config: UNetConfig) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) pairs covering every parameter of `UNetModel(config)`."""
    n, levels = config.num_res_blocks, len(config.channel_mult)
    table = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    if config.num_classes == "sequential":
        table += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    elif config.num_classes is not None:
        table += [("label_emb.", "class_embedding.")]

    def resnet(ldm: str, dif: str):
        table.extend((ldm + a, dif + b) for a, b in _RESNET)

    for level in range(levels):
        for j in range(n):
            idx = 1 + level * (n + 1) + j
            resnet(f"input_blocks.{idx}.0.", f"down_blocks.{level}.resnets.{j}.")
            if config.transformer_depth[level]:
                table.append((f"input_blocks.{idx}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level != levels - 1:
            table.append((f"input_blocks.{(level + 1) * (n + 1)}.0.op.",
                          f"down_blocks.{level}.downsamplers.0.conv."))

    resnet("middle_block.0.", "mid_block.resnets.0.")
    if config.transformer_depth_middle:
        table.append(("middle_block.1.", "mid_block.attentions.0."))
    resnet(f"middle_block.{2 if config.transformer_depth_middle else 1}.", "mid_block.resnets.1.")

    out_depths = config.output_depths()
    for i in range(levels):  # diffusers up block i = LDM level (levels - 1 - i)
        for j in range(n + 1):
            idx = i * (n + 1) + j
            resnet(f"output_blocks.{idx}.0.", f"up_blocks.{i}.resnets.{j}.")
            if out_depths[idx]:
                table.append((f"output_blocks.{idx}.1.", f"up_blocks.{i}.attentions.{j}."))
            if i != levels - 1 and j == n:
                table.append((f"output_blocks.{idx}.{2 if out_depths[idx] else 1}.conv.",
                              f"up_blocks.{i}.upsamplers.0.conv."))
    return table


def _expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    return module_shapes(lambda: UNetModel(config))


def unet_key_table(config: UNetConfig) -> dict[str, str]:
    """{LDM key: diffusers key} for every parameter of `UNetModel(config)`."""
    table = sorted(_prefix_table(config), key=lambda p: -len(p[0]))  # longest prefix wins
    keys = {}
    for key in _expected_shapes(config):
        ldm, dif = next(((a, b) for a, b in table if key.startswith(a)), (None, None))
        if ldm is None:
            raise AssertionError(f"no rename rule for {key}")  # a bug in _prefix_table
        keys[key] = dif + key[len(ldm):]
    return keys


def _rename(sd: Mapping[str, torch.Tensor], mapping: dict[str, str],
            shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, torch.Tensor]:
    unknown = [k for k in sd if k not in mapping]
    missing = [k for k in mapping if k not in sd]
    if unknown or missing:
        raise ValueError(f"{source} state dict does not match the config: "
                         f"unknown keys [{key_list(unknown, 8)}]; missing keys [{key_list(missing, 8)}]")
    out = {}
    for src, dst in mapping.items():
        t, want = sd[src], shapes[dst]
        if t.shape != want:
            # A 1x1 conv (o, i, 1, 1) and a linear (o, i) projection hold the same matrix:
            # converted SD 2 checkpoints carry either form.
            if (dst.endswith(("proj_in.weight", "proj_out.weight")) and t.shape[:2] == want[:2]
                    and t.numel() == want.numel()):
                t = t.reshape(want)
            else:
                raise ValueError(f"{source} key {src} has shape {tuple(t.shape)}; "
                                 f"{dst} needs {tuple(want)}")
        out[dst] = t
    return out


def unet_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DConditionModel.state_dict()` -> `UNetModel(config)` keys (LDM names)."""
    to_ldm = {dif: ldm for ldm, dif in unet_key_table(config).items()}
    shapes = _expected_shapes(config)
    return _rename(sd, to_ldm, shapes, "diffusers")


def unet_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """`UNetModel(config)` state dict (LDM names) -> diffusers `UNet2DConditionModel` keys."""
    to_dif = unet_key_table(config)
    shapes = {to_dif[k]: s for k, s in _expected_shapes(config).items()}
    return _rename(sd, to_dif, shapes, "LDM")

"""diffusers `AutoencoderKL` folder layout -> diffusekit / LDM VAE.

A config translation and a key rename table (nanoGPT's `from_pretrained` pattern): every
diffusers key is renamed to the LDM key `AutoencoderKL` uses, attention projections that
diffusers stores as linear weights (C, C) become 1x1 conv weights (C, C, 1, 1), and the
result is checked key by key and shape by shape against the model the config describes.
Facts used (diffusers 0.42 `AutoencoderKL`): `up_blocks[k]` is LDM `decoder.up[n-1-k]`;
`conv_shortcut` is LDM `nin_shortcut`; `conv_norm_out` is `norm_out`; the mid attention is
`attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (older saves: `query,key,value,proj_attn`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .keys import module_shapes
from .vae import AutoencoderKL, VAEConfig

__all__ = ["vae_config_from_diffusers", "vae_state_dict_from_diffusers"]

# diffusers config keys that describe how a pipeline uses the VAE, not its network.
_PIPELINE_KEYS = {"scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size"}
_ARCH_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "use_quant_conv",
    "use_post_quant_conv", "mid_block_add_attention",
}  # fmt: skip


def vae_config_from_diffusers(config_dict: Mapping[str, Any]) -> VAEConfig:
    """A diffusers `AutoencoderKL` config.json (as a dict) -> VAEConfig.

    Keys missing from the dict take diffusers' own defaults. The pipeline-level keys
    (scaling_factor, shift_factor, latents_mean/std, force_upcast, sample_size) and private
    `_...` keys are ignored here; any other unknown key is a ValueError naming it.
    """
    unknown = sorted(k for k in config_dict if not k.startswith("_") and k not in _ARCH_KEYS | _PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"unknown diffusers AutoencoderKL config keys {unknown}; known: {sorted(_ARCH_KEYS)}")
    c = dict(config_dict)
    block_out = [int(b) for b in c.get("block_out_channels", (64,))]
    n = len(block_out)
    down = list(c.get("down_block_types", ["DownEncoderBlock2D"] * n))
    up = list(c.get("up_block_types", ["UpDecoderBlock2D"] * n))
    if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
        raise ValueError(
            f"only DownEncoderBlock2D / UpDecoderBlock2D, one per entry of block_out_channels={block_out}, "
            f"are supported; got down_block_types={down}, up_block_types={up}"
        )
    if c.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn={c['act_fn']!r} is not supported; the LDM VAE uses 'silu'")
    ch = block_out[0]
    if any(b % ch for b in block_out):
        raise ValueError(f"block_out_channels={block_out} must all be multiples of the first entry {ch}")
    latent = int(c.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(c.get("in_channels", 3)),
        out_channels=int(c.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(b // ch for b in block_out),
        num_res_blocks=int(c.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        double_z=True,
        mid_attention=bool(c.get("mid_block_add_attention", True)),
        use_quant_conv=bool(c.get("use_quant_conv", True)),
        use_post_quant_conv=bool(c.get("use_post_quant_conv", True)),
        norm_groups=int(c.get("norm_num_groups", 32)),
    )


_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN_PARTS = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",  # pre-0.14 diffusers saves
}  # fmt: skip
_P = r"(weight|bias)$"
_RULES: list[tuple[re.Pattern, Any]] = [
    (re.compile(rf"^(encoder|decoder)\.(conv_in|conv_out)\.{_P}"), lambda m, n: f"{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(rf"^(encoder|decoder)\.conv_norm_out\.{_P}"), lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
    (re.compile(rf"^(quant_conv|post_quant_conv)\.{_P}"), lambda m, n: f"{m[1]}.{m[2]}"),
    (
        re.compile(rf"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}"),
        lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}" if m[3] in _RESNET_PARTS else None,
    ),
    (
        re.compile(rf"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}"),
        lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
    ),
    (
        re.compile(rf"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}"),
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}"
        if m[3] in _RESNET_PARTS
        else None,
    ),
    (
        re.compile(rf"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}"),
        lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}",
    ),
    (
        re.compile(rf"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.{_P}"),
        lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_PARTS[m[3]]}.{m[4]}" if m[3] in _RESNET_PARTS else None,
    ),
    (
        re.compile(rf"^(encoder|decoder)\.mid_block\.attentions\.0\.([\w.]+?)\.{_P}"),
        lambda m, n: f"{m[1]}.mid.attn_1.{_ATTN_PARTS[m[2]]}.{m[3]}" if m[2] in _ATTN_PARTS else None,
    ),
]


def _ldm_key(key: str, num_levels: int) -> str | None:
    for pattern, rename in _RULES:
        m = pattern.match(key)
        if m:
            return rename(m, num_levels)
    return None


def vae_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM keys of `AutoencoderKL(config)`.

    Linear attention weights (C, C) are reshaped to 1x1 conv weights (C, C, 1, 1) (a view,
    no copy). Keys that match no rule or no parameter of the model, keys missing for the
    model, two diffusers keys naming one LDM key, and shape mismatches raise ValueError
    naming them. The result loads with `model.load_state_dict(result, strict=True)`.
    """
    expected = module_shapes(lambda: AutoencoderKL(config))
    n = len(config.ch_mult)
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unknown: list[str] = []
    bad_shape: list[str] = []
    for key, value in sd.items():
        new = _ldm_key(key, n)
        if new is None or new not in expected:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"diffusers keys {source[new]!r} and {key!r} both map to LDM key {new!r}")
        want = expected[new]
        if ".attn_1." in new and len(want) == 4 and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        if tuple(value.shape) != want:
            bad_shape.append(f"{key} -> {new}: got {tuple(value.shape)}, expected {want}")
            continue
        out[new] = value
        source[new] = key
    missing = sorted(set(expected) - set(out) - {_ldm_key(k.split(" -> ")[0], n) for k in bad_shape})
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys not understood for this config: {sorted(unknown)}")
    if bad_shape:
        problems.append("shape mismatches:\n    " + "\n    ".join(bad_shape))
    if missing:
        problems.append(f"the state dict lacks {len(missing)} keys (LDM names): {missing}")
    if problems:
        raise ValueError(f"cannot convert the diffusers VAE state dict for {config}:\n  " + "\n  ".join(problems))
    return out

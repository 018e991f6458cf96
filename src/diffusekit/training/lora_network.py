"""Trainable LoRA (Hu et al. 2021) and LoCon layers on a frozen model, saved as kohya-ss sd-scripts
writes them, so that A1111, ComfyUI, diffusers (`load_lora_weights`) and `models.lora` load the file.

Each adapted layer `base` (nn.Linear or nn.Conv2d) gets a forward hook that adds

    multiplier * (alpha / rank) * up(down(x))                                  (Hu et al. eq. 3)

with `down` a bias-free copy of the base layer's geometry at `rank` output channels (a conv keeps its
kernel, stride and padding: LoCon) and `up` a 1x1 / linear map rank -> out, zero-initialised so that
training starts at the base model (kohya `LoRAModule`, peft `LoraLayer`: down kaiming-uniform with
a = sqrt(5), up zeros). The hook computes on the activations, never on a merged weight, so the frozen
weight's gradient is never formed; module names stay the checkpoint keys.

Which layers (kohya networks/lora.py `LoRANetwork`): "attn" = to_q/to_k/to_v/to_out.0 of every
attention, "proj" = proj_in/proj_out of the spatial transformers, "ff" = the feed-forward net (kohya's
default adapts all three: every Linear / 1x1 conv inside a Transformer2DModel); "conv" = every layer of
the ResBlocks, down- and upsamplers (kohya `conv_dim`: 3x3 convs at `conv_rank`, the time-embedding
linear and 1x1 shortcuts at `rank`); "te" = q/k/v/out projections and MLP of every text encoder layer.
Names: `lora_unet_` + the module's diffusers path for SD 1/2 and our custom models, its LDM path for
SDXL (kohya's SDXL UNet uses the LDM names); `lora_te_` (one encoder) or `lora_te1_` / `lora_te2_`.
open_clip encoders (SD 2, SDXL's bigG) stack q/k/v in one `in_proj_weight` with no module per
projection: their out_proj and MLP are adapted, q/k/v are not (a documented limitation).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save, save_file
from torch import nn

from ..models.convert_unet import unet_key_table
from ..models.lora import LoRATargets

__all__ = ["LORA_TARGETS", "LoRAModule", "LoRANetwork", "kohya_layer_names", "save_kohya_lora"]

LORA_TARGETS = ("attn", "proj", "ff", "conv", "te")
_UNET_KIND = (  # (target, pattern over the LDM module path)
    ("attn", re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")),
    ("proj", re.compile(r"\.(proj_in|proj_out)$")),
    ("ff", re.compile(r"\.ff\.net\.(0\.proj|2)$")),
    ("conv", re.compile(r"(\.in_layers\.2|\.out_layers\.3|\.emb_layers\.1|\.skip_connection|\.0\.op|\.conv)$")),
)


class LoRAModule(nn.Module):
    """down (rank, in[, kh, kw]) then up (out, rank[, 1, 1]), times alpha / rank; see the module docstring."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, on_tokens: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank={rank}; must be >= 1")
        self.file_shape = None    # a 1x1 conv applied to (B, N, C) tokens: linear here, 4-D in the file
        if on_tokens:
            self.lora_down = nn.Linear(base.in_channels, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_channels, bias=False)
            self.file_shape = ((rank, base.in_channels, 1, 1), (base.out_channels, rank, 1, 1))
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts nn.Linear / nn.Conv2d, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * (self.multiplier * self.scale)


def _unet_layers(unet: nn.Module, targets: set[str], ldm_names: bool) -> list[tuple[str, str, nn.Module, str]]:
    to_diffusers = unet_key_table(unet.config)                          # LDM key -> diffusers key
    out = []
    for path, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        kind = next((k for k, pat in _UNET_KIND if pat.search("." + path)), None)
        if kind is None or kind not in targets:
            continue
        if kind == "conv" and ".transformer_blocks." in path:   # a transformer's own layers are never "conv"
            continue
        name = path if ldm_names else to_diffusers[f"{path}.weight"][: -len(".weight")]
        out.append(("lora_unet_" + name.replace(".", "_"), f"unet.{path}", m, kind))
    return out


def _te_layers(parts) -> list[tuple[str, str, nn.Module, str]]:
    """The text encoders' adaptable modules, named as `models.lora.LoRATargets` names them."""
    targets = LoRATargets.of(parts)
    by_param = {}
    for name, (param, rows) in targets.lookup.items():
        if name.startswith("lora_te") and rows is None:
            by_param[param] = name
    out = []
    for i, enc in enumerate(parts.text_encoders):
        for path, m in enc.named_modules():
            name = by_param.get(f"te{i}.{path}.weight")
            if name is not None and isinstance(m, nn.Linear) and not path.endswith("text_projection"):
                out.append((name, f"te{i}.{path}", m, "te"))
    return out


def kohya_layer_names(parts, targets=("attn", "proj", "ff")) -> list[str]:
    """The kohya module names LoRANetwork would create on `parts` for `targets` (sorted)."""
    return sorted(n for n, *_ in _select(parts, targets))


def _select(parts, targets) -> list[tuple[str, str, nn.Module, str]]:
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid: {', '.join(LORA_TARGETS)}")
    ldm_names = parts.family.name == "sdxl"
    layers = _unet_layers(parts.unet, set(targets), ldm_names)
    if "te" in targets:
        layers += _te_layers(parts)
    if not layers:
        raise ValueError(f"the targets {list(targets)} select no layer of this {parts.family.name} model")
    return layers


class LoRANetwork(nn.Module):
    """LoRA modules on `parts` (a ModelParts: .unet, .text_encoders, .family); `attach()` hooks them
    into the frozen model, `detach()` removes the hooks. state_dict keys are the kohya file's:
    `<kohya name>.lora_down.weight` / `.lora_up.weight` (`alpha` is added by `kohya_state_dict`)."""

    def __init__(self, parts, *, rank: int = 4, alpha: float = 4.0, targets=("attn", "proj", "ff"),
                 conv_rank: int = 0, conv_alpha: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.layers = nn.ModuleDict()
        self._bases: dict[str, nn.Module] = {}
        self._paths: dict[str, str] = {}
        self._token_parents: dict[str, nn.Module] = {}   # name -> SpatialTransformer applying it to tokens
        self.rank, self.alpha = rank, float(alpha)
        self.conv_rank, self.conv_alpha = conv_rank or rank, float(conv_alpha or alpha)
        state = torch.get_rng_state()
        if generator is not None:                     # kaiming init draws from the global RNG
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        try:
            for name, path, base, kind in _select(parts, targets):
                three_by_three = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
                r, a = (self.conv_rank, self.conv_alpha) if three_by_three else (rank, alpha)
                parent = _token_parent(parts, path, base)
                self.layers[name] = LoRAModule(base, r, a, on_tokens=parent is not None)
                self._bases[name], self._paths[name] = base, path
                if parent is not None:
                    self._token_parents[name] = parent
        finally:
            torch.set_rng_state(state)
        self._handles: list = []

    def attach(self) -> "LoRANetwork":
        if self._handles:
            return self
        patched: dict[int, tuple[nn.Module, dict]] = {}
        for name, base in self._bases.items():
            lora = self.layers[name]
            if name in self._token_parents:
                parent = self._token_parents[name]
                patched.setdefault(id(parent), (parent, {}))[1][id(base)] = lora
                continue
            self._handles.append(base.register_forward_hook(lambda m, inp, out, lora=lora: out + lora(inp[0]).to(out.dtype)))
        for parent, by_layer in patched.values():
            original = type(parent)._project

            def project(layer, h, parent=parent, by_layer=by_layer, original=original):
                out = original(parent, layer, h)
                lora = by_layer.get(id(layer))
                return out if lora is None else out + lora(h).to(out.dtype)

            parent._project = project                   # an instance attribute: `del` restores the method
            self._handles.append(_Unpatch(parent))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_multiplier(self, value: float) -> None:
        for m in self.layers.values():
            m.multiplier = float(value)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """{`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`} as kohya saves them."""
        sd = {}
        for name, m in self.layers.items():
            down, up = m.lora_down.weight.detach(), m.lora_up.weight.detach()
            if m.file_shape is not None:
                down, up = down.reshape(m.file_shape[0]), up.reshape(m.file_shape[1])
            sd[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        return sd


class _Unpatch:
    def __init__(self, parent: nn.Module):
        self.parent = parent

    def remove(self) -> None:
        self.parent.__dict__.pop("_project", None)


def _token_parent(parts, path: str, base: nn.Module) -> nn.Module | None:
    """The SpatialTransformer that applies the 1x1-conv `base` (SD 1's proj_in / proj_out) to (B, N, C)
    tokens through its `_project` (reading the weight, never calling the module), else None."""
    if not (isinstance(base, nn.Conv2d) and path.startswith("unet.") and path.endswith((".proj_in", ".proj_out"))):
        return None
    parent = parts.unet.get_submodule(path[len("unet."):].rsplit(".", 1)[0])
    return parent if hasattr(type(parent), "_project") else None


def _data_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """kohya `precalculate_safetensors_hashes` / A1111 `addnet_hash`: sha256 of the tensor data only
    (after the 8-byte length and the JSON header), so it does not depend on the metadata."""
    import hashlib
    raw = save(dict(tensors))
    n = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[8 + n:]).hexdigest()


def save_kohya_lora(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, object]) -> Path:
    """Write a kohya-format LoRA file with `ss_*` metadata (values JSON-encoded when not strings) and
    `sshs_model_hash` (the hash A1111 shows as "Lora hashes"), atomically."""
    import os
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA file is written as .safetensors; got {path}")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["sshs_model_hash"] = _data_hash(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_file(dict(tensors), str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)                          # safetensors creates 0600; a LoRA file is meant to be shared
    os.replace(tmp, path)
    return path

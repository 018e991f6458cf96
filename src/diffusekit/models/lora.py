"""LoRA: low-rank weight deltas (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"),
read from the files kohya-ss sd-scripts trains and A1111 / ComfyUI load, merged into our modules.

A LoRA adapts a layer with weight W (out, in[, kh, kw]) by

    delta W = multiplier * (alpha / rank) * up @ down                         (Hu et al. eq. 3)

with down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]); alpha / rank is kohya's `scale` (alpha
absent: 1, as A1111's `calc_scale`). A conv ("LoCon") LoRA has a kh x kw `down` convolution and a 1x1
`up`: the product of the flattened matrices (out, in*kh*kw) reshaped to (out, in, kh, kw) is the
composed convolution. LoCon's CP decomposition adds a `lora_mid` (rank, rank, kh, kw) with 1x1 up and
down: delta[i, j] = sum_nm up[i, n] mid[n, m] down[m, j] (A1111 `rebuild_cp_decomposition`). A linear
LoRA on a 1x1 convolution (SD1's proj_in / proj_out) is reshaped to the weight (same numbers).

File layout (kohya sd-scripts networks/lora.py): every key is `<module>.<part>` with part one of
`lora_down.weight`, `lora_up.weight`, `lora_mid.weight`, `alpha`; `<module>` is a prefix plus the
module's path in the diffusers / transformers model with "." replaced by "_":
`lora_unet_` (UNet; SDXL LoRAs from kohya use the LDM module paths instead, e.g.
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), `lora_te_` (the text encoder of SD 1/2),
`lora_te1_` / `lora_te2_` (SDXL's CLIP-L / bigG). The diffusers / PEFT layout
(`unet.<path>.lora_A.weight` = down, `lora_B.weight` = up; `text_encoder.`, `text_encoder_2.`) is read
too. Our modules carry the LDM / open_clip names, so the diffusers paths are translated with the
`convert_unet` table, and transformers' q/k/v projections of an open_clip encoder (SD 2, SDXL bigG)
land in row blocks of its stacked `in_proj_weight`.

Merging (`merged`) replaces each targeted parameter's tensor by W + sum of deltas (computed in float32,
rounded once to W's dtype) and puts the original tensor object back afterwards: nothing is copied,
the restore is bit-exact and repeated generations cannot drift, and memory-mapped weights stay
untouched.

Deliberate differences from A1111: LoRA module names that match no layer of the model are a warning
that names them (A1111 only logs them at debug level), and an error when none matches (a LoRA for
another family); LyCORIS types other than LoCon (LoHa, LoKr, IA3, DoRA, full / norm diffs) are an error
(A1111 applies them); an inpainting UNet's 9-channel conv_in is not zero-padded for a 4-channel LoRA.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .convert_unet import unet_key_table
from .keys import key_list

__all__ = ["LoRA", "LoRAError", "LoRALayer", "LoRATargets", "addnet_hash", "load_lora", "merged"]

_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
          "lora_A.weight": "down", "lora_B.weight": "up"}
# suffixes of other LyCORIS network types (A1111 network_hada / lokr / ia3 / full / norm, DoRA)
_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "on_input", ".diff", "w_norm", "b_norm", "oft_")
# diffusers / PEFT component prefixes -> kohya prefixes (text encoders: see _te_prefixes)
_PEFT_UNET = "unet."


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model; the message says which keys and why."""


@dataclass
class LoRALayer:
    """One adapted layer: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]), optional CP mid
    (rank, rank, kh, kw), alpha (None = rank, i.e. scale 1)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """kohya's alpha / rank (A1111 `calc_scale`)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32: (out, in) for a linear down, (out, in, kh, kw) for a conv."""
        up = self.up.float().flatten(1)                                   # (out, rank)
        if self.mid is not None:                                          # CP: (out, in, kh, kw)
            d = torch.einsum("nmkl,in,mj->ijkl", self.mid.float(), up, self.down.float().flatten(1))
        else:
            d = up @ self.down.float().flatten(1)                         # (out, in*kh*kw)
            if self.down.ndim == 4:
                d = d.reshape(d.shape[0], self.down.shape[1], *self.down.shape[2:])
        return d * self.scale


def _split_key(key: str, te_count: int) -> tuple[str, str] | None:
    """A file key -> (kohya module name, part) or None if it is not a LoRA key we know."""
    if key.startswith(("unet.", "text_encoder.", "text_encoder_2.")):      # diffusers / PEFT layout
        head, _, rest = key.partition(".")
        for part in _PARTS:
            if rest.endswith("." + part):
                path = rest[: -len(part) - 1].replace(".", "_")
                prefix = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_"}.get(
                    head, "lora_te1_" if te_count == 2 else "lora_te_")
                return prefix + path, part
        return None
    module, _, part = key.partition(".")
    return (module, part) if part in _PARTS else None


@dataclass
class LoRA:
    """The layers of one LoRA file, keyed by kohya module name (`lora_unet_...`, `lora_te_...`)."""

    layers: dict[str, LoRALayer]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                        path: Path | None = None, te_count: int = 1) -> "LoRA":
        """Group `<module>.<part>` keys into layers. te_count: text encoders of the target family (2: the
        diffusers `text_encoder.` prefix means SDXL's CLIP-L, `lora_te1_`)."""
        unsupported = [k for k in sd if any(u in k for u in _UNSUPPORTED)]
        if unsupported:
            raise LoRAError(f"{path or 'LoRA'}: keys of a LyCORIS network type other than LoRA / LoCon "
                            f"(LoHa, LoKr, IA3, DoRA, ...), which diffusekit does not apply: {key_list(unsupported)}")
        groups: dict[str, dict[str, torch.Tensor]] = {}
        unknown = []
        for key, value in sd.items():
            split = _split_key(key, te_count)
            if split is None:
                unknown.append(key)
                continue
            groups.setdefault(split[0], {})[_PARTS[split[1]]] = value
        if unknown:
            raise LoRAError(f"{path or 'LoRA'}: keys that are not `<module>.lora_down.weight / lora_up.weight / "
                            f"lora_mid.weight / alpha` (kohya) nor diffusers `lora_A / lora_B`: {key_list(unknown)}")
        incomplete = [m for m, g in groups.items() if "up" not in g or "down" not in g]
        if incomplete:
            raise LoRAError(f"{path or 'LoRA'}: modules without both lora_up and lora_down: {key_list(incomplete)}")
        layers = {}
        for m, g in groups.items():
            down, up = g["down"], g["up"]
            if up.shape[1] != down.shape[0]:
                raise LoRAError(f"{m}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} disagree on the rank")
            alpha = float(g["alpha"]) if "alpha" in g else None
            layers[m] = LoRALayer(m, down, up, g.get("mid"), alpha)
        if not layers:
            raise LoRAError(f"{path or 'LoRA'}: no LoRA layers in the file")
        return cls(layers, dict(metadata or {}), path)

    def deltas(self, targets: "LoRATargets", *, te: float = 1.0, unet: float = 1.0) -> dict[str, torch.Tensor]:
        """{parameter name in `targets`: float32 delta of that parameter's full shape}, with the text
        encoder layers scaled by `te` and the UNet layers by `unet` (A1111's two multipliers).
        Unmatched layers: a warning naming them; none matched: LoRAError."""
        out: dict[str, torch.Tensor] = {}
        unmatched = []
        for name, layer in self.layers.items():
            target = targets.lookup.get(name)
            if target is None:
                unmatched.append(name)
                continue
            param, rows = target
            mult = unet if name.startswith("lora_unet_") else te
            if mult == 0:
                continue
            weight = targets.params[param]
            shape = weight.shape if rows is None else (rows.stop - rows.start, *weight.shape[1:])
            d = layer.delta()
            if d.numel() != torch.Size(shape).numel():
                raise LoRAError(f"{name}: the LoRA gives a delta of shape {tuple(d.shape)} but {param}"
                                f"{'' if rows is None else f' rows {rows.start}:{rows.stop}'} has shape {tuple(shape)}")
            d = d.reshape(shape).to(weight.device) * mult
            if rows is not None:
                d = torch.nn.functional.pad(d, (0, 0, rows.start, weight.shape[0] - rows.stop))
            out[param] = out[param] + d if param in out else d
        if len(unmatched) == len(self.layers):
            raise LoRAError(f"{self.path or 'LoRA'}: none of its {len(self.layers)} layers is a layer of this model "
                            f"(a LoRA for another model family?): {key_list(unmatched)}")
        if unmatched:
            warnings.warn(f"{self.path or 'LoRA'}: {len(unmatched)} of {len(self.layers)} layers match no layer "
                          f"of this model and are skipped: {key_list(unmatched)}", stacklevel=2)
        return out

    @cached_property
    def hash(self) -> str | None:
        """A1111's LoRA hash: the file's `sshs_model_hash` metadata, else `addnet_hash` of the file."""
        if self.metadata.get("sshs_model_hash"):
            return self.metadata["sshs_model_hash"]
        return None if self.path is None else addnet_hash(self.path)


def addnet_hash(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensor data (everything after the 8-byte length and the JSON
    header), so editing the metadata keeps the hash: kohya sd-scripts `addnet_hash_safetensors`,
    which A1111 uses for LoRAs (its "Lora hashes" infotext shows the first 12 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_lora(path: str | os.PathLike, te_count: int = 1) -> LoRA:
    """Read a kohya / A1111 (or diffusers / PEFT) LoRA `.safetensors` file."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: only .safetensors LoRA files are read (got {path.suffix or 'no extension'!r})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a broken file
        raise LoRAError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    return LoRA.from_state_dict(sd, metadata, path, te_count)


# ------------------------------------------------------------------------------ our modules
def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


@dataclass
class LoRATargets:
    """The adaptable parameters of a model (`parts.unet`, `parts.text_encoders`), by kohya module name.

    params: {"unet.<key>" / "te<i>.<key>": parameter}; lookup: {kohya module name: (param name, rows)},
    rows a slice of the parameter's first axis (open_clip's stacked q/k/v) or None."""

    params: dict[str, nn.Parameter]
    lookup: dict[str, tuple[str, slice | None]]

    @classmethod
    def of(cls, parts) -> "LoRATargets":
        params: dict[str, nn.Parameter] = {}
        lookup: dict[str, tuple[str, slice | None]] = {}

        def add(kohya: str, param: str, p: nn.Parameter, rows: slice | None = None):
            if kohya in lookup and lookup[kohya] != (param, rows):
                raise AssertionError(f"two layers named {kohya}")  # a bug in the name tables
            params[param] = p
            lookup[kohya] = (param, rows)

        unet = parts.unet
        to_diffusers = unet_key_table(unet.config)                        # LDM key -> diffusers key
        for path, m in unet.named_modules():
            if _linear_like(m):
                param = f"unet.{path}.weight"
                add("lora_unet_" + path.replace(".", "_"), param, m.weight)   # LDM path (kohya SDXL)
                dif = to_diffusers[f"{path}.weight"][: -len(".weight")]
                add("lora_unet_" + dif.replace(".", "_"), param, m.weight)    # diffusers path (kohya SD 1/2)

        encoders = list(parts.text_encoders)
        prefixes = ["lora_te_"] if len(encoders) == 1 else [f"lora_te{i + 1}_" for i in range(len(encoders))]
        for i, (enc, prefix) in enumerate(zip(encoders, prefixes)):
            if hasattr(enc, "text_model"):                                # transformers layout
                for path, m in enc.named_modules():
                    if _linear_like(m):
                        add(prefix + path.replace(".", "_"), f"te{i}.{path}.weight", m.weight)
                continue
            width = enc.config.width                                      # open_clip layout
            for j, block in enumerate(enc.transformer.resblocks):
                hf = f"{prefix}text_model_encoder_layers_{j}_"
                own = f"te{i}.transformer.resblocks.{j}."
                for n, qkv in enumerate("qkv"):
                    add(f"{hf}self_attn_{qkv}_proj", own + "attn.in_proj_weight", block.attn.in_proj_weight,
                        slice(n * width, (n + 1) * width))
                add(hf + "self_attn_out_proj", own + "attn.out_proj.weight", block.attn.out_proj.weight)
                add(hf + "mlp_fc1", own + "mlp.c_fc.weight", block.mlp.c_fc.weight)
                add(hf + "mlp_fc2", own + "mlp.c_proj.weight", block.mlp.c_proj.weight)
        return cls(params, lookup)


@contextmanager
def merged(targets: LoRATargets, loras: Sequence[tuple[LoRA, float, float]]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every parameter a LoRA touches holds W + sum of multiplier * delta; on exit
    (also on an exception) each parameter gets its original tensor object back, bit for bit.
    loras: (LoRA, te multiplier, unet multiplier). Yields the summed deltas (for inspection)."""
    total: dict[str, torch.Tensor] = {}
    for lora, te, unet in loras:
        for name, d in lora.deltas(targets, te=te, unet=unet).items():
            total[name] = total[name] + d if name in total else d
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, d in total.items():
                p = targets.params[name]
                originals[name] = p.data
                p.data = (p.data.float() + d).to(p.dtype)                 # one rounding to W's dtype
        yield total
    finally:
        for name, t in originals.items():
            targets.params[name].data = t

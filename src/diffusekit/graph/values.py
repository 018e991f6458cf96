"""The values that travel along a workflow's links, with ComfyUI's meanings.

    MODEL        ModelRef: a loaded Pipeline's UNet (+ LoRAs to merge while it samples)
    CLIP         ClipRef: its text encoders, the last layer to read (CLIPSetLastLayer), LoRAs
    VAE          VaeRef: its VAE
    CONDITIONING [[context (1, 77k, C), {"pooled_output": (1, P) | None, "area": ..., "strength": ...}], ...]
    LATENT       {"samples": (B, C, h, w) VAE latents *without* the latent scale, "noise_mask": (B|1, 1, H, W),
                  "batch_index": [...]} plus diffusekit's "diffusekit_process" (the steps of the samplers
                  that made it, for the denoising video) and "diffusekit_factor" (pixels per latent cell)
    IMAGE        (B, H, W, 3) float in [0, 1]     MASK  (B, H, W) float in [0, 1] (1 = repaint)

LoRAs follow ComfyUI's LoraLoader: a loader returns a new reference carrying the LoRA; the weights are
merged only while a sampler (MODEL) or a text encoder (CLIP) runs, then restored bit for bit
(`models.lora.merged`), so the cached model stays clean for the next workflow.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..models.lora import LoRA, LoRATargets, merged

_TARGETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def lora_targets(pipe) -> LoRATargets:
    """The LoRA-targetable parameters of a pipeline's model, found once per pipeline."""
    if pipe not in _TARGETS:
        _TARGETS[pipe] = LoRATargets.of(pipe.parts)
    return _TARGETS[pipe]


def _merging(pipe, loras: list[tuple[LoRA, float, float]]):
    """The LoRAs (LoRA, te, unet multipliers) merged into the pipeline's weights for a `with` block."""
    return merged(lora_targets(pipe), loras) if loras else contextlib.nullcontext()


@dataclass(frozen=True)
class ModelRef:
    pipe: object
    name: str
    loras: tuple[tuple[str, LoRA, float], ...] = ()      # (file name, LoRA, strength_model)

    def applied(self):
        return _merging(self.pipe, [(lora, 0.0, w) for _, lora, w in self.loras])


@dataclass(frozen=True)
class ClipRef:
    pipe: object
    clip_skip: int = 1                                    # stop_at_clip_layer -N = A1111's Clip skip N
    loras: tuple[tuple[str, LoRA, float], ...] = ()      # (file name, LoRA, strength_clip)

    def applied(self):
        return _merging(self.pipe, [(lora, w, 0.0) for _, lora, w in self.loras])


@dataclass(frozen=True)
class VaeRef:
    pipe: object


# ------------------------------------------------------------------ IMAGE <-> PIL / pipeline tensors
def image_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, H, W, 3) in [0, 1] -> PIL RGB images (ComfyUI SaveImage's clip(255 x) to uint8)."""
    arr = (images.detach().float().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a[..., :3]) for a in arr]


def pil_to_image(img: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_to_signed(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1], what the pipeline's VAE takes."""
    return images[..., :3].permute(0, 3, 1, 2).float() * 2.0 - 1.0


def signed_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) in [0, 1]."""
    return ((x.float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).cpu()

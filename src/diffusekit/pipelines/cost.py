"""What a generation will cost, known before it runs: its work in pixel-steps and its peak memory,
estimated from the model's shape. A server bounds requests by these (every field within its own limit
still multiplies up: 2048 x 2048 x batch 8 x 150 steps), instead of finding out by running out of memory.

The memory estimate counts the activations that are alive together at the peak, in the model's compute
dtype, on top of the weights:
- MMDiT (SD3, `mmdit_activation_bytes`): the working set of one joint block over image + text tokens.
- UNet (one guided call: cond and uncond batched, 2 x batch): the skip connections of every level that
  the down path stores for the up path, plus the working set of the widest block (GroupNorm, conv and,
  with attention at that level, the q/k/v/out projections and the 8x-wide GEGLU feed-forward).
  Attention runs through `scaled_dot_product_attention`, whose fused kernels (flash / memory-efficient,
  on CPUs too) never hold the tokens x tokens matrix, so nothing here is quadratic.
- VAE decoder (float32 in the worst case: a half-precision VAE that overflows is decoded again in float32),
  on `DECODE_PIXELS_PER_CALL` pixels' worth of images at a time: at full resolution the upsampled input of
  level 0 (2 x its channels) and three tensors of level 0's width.
Calibration (`bench/memory_calibration.py`: peak RSS growth of one forward, SD 1.5-sized random-weight modules, float32, this project's
CPU, 2026-12-02): the VAE decoder grows by 3.46 kB per output pixel between 256^2 and 512^2 (the formula:
3.58 kB); the UNet by 13.4 k floats per latent position per sample between 32^2 and 64^2 latents, which
the working-set constants below are fitted to (skips 1,740 + 36 x 320 = 13,260).
"""
from __future__ import annotations

import os

from ..models.families import ModelFamily
from .params import GenerationParams

UNET_WORK_TENSORS = 12       # live tensors of a ResBlock level, in units of the level's width (fitted, see above)
UNET_ATTN_WORK_TENSORS = 36  # a level with transformer blocks: q, k, v, out, residuals, the 8x GEGLU projection


def output_size(p: GenerationParams, width: int, height: int) -> tuple[int, int]:
    """The largest image the request works on: the hires-fix output when enable_hr, else width x height."""
    if p.enable_hr:
        return int(width * p.hr_scale), int(height * p.hr_scale)
    return width, height


def pixel_steps(p: GenerationParams, width: int | None = None, height: int | None = None) -> int:
    """Work of a request: width x height x steps x images (batch_size x n_iter), plus the hires pass at its
    size and step count. Steps as asked: img2img runs denoising_strength of them, so this is an upper bound."""
    width, height = width or p.width, height or p.height
    images = p.batch_size * p.n_iter
    work = width * height * p.steps * images
    if p.enable_hr:
        hw, hh = output_size(p, width, height)
        work += hw * hh * (p.hr_second_pass_steps or p.steps) * images
    return work


def unet_activation_bytes(family: ModelFamily, width: int, height: int, batch: int, dtype_bytes: int) -> int:
    """Peak activations of one guided UNet call on `batch` images of width x height pixels."""
    u, f = family.unet, family.latent_factor
    tokens = (width // f) * (height // f)                         # latent positions at level 0
    skips = work = 0
    for level, mult in enumerate(u.channel_mult):
        hw, ch = tokens / 4 ** level, u.model_channels * mult
        skips += (u.num_res_blocks + 1) * ch * hw
        tensors = UNET_ATTN_WORK_TENSORS if u.transformer_depth[level] else UNET_WORK_TENSORS
        work = max(work, tensors * ch * hw)
    return int(2 * batch * (skips + work) * dtype_bytes)


MMDIT_WORK_TENSORS = 14      # a joint block per token: q, k, v, out, residuals, the 4x MLP and its GELU (not fitted)
MMDIT_TEXT_TOKENS = 77 + 256  # SD3's joint context: CLIP + T5 (longer prompts add 77-token CLIP chunks)


def mmdit_activation_bytes(family: ModelFamily, width: int, height: int, batch: int, dtype_bytes: int) -> int:
    """Peak activations of one guided MMDiT call (SD3; Flux alike, over its T5 tokens): the widest block's
    working set over image patches plus text tokens; a transformer keeps no skip connections, and SDPA holds
    no tokens x tokens matrix."""
    u, f = family.unet, family.latent_factor * family.unet.patch_size
    text = family.text_encoders[-1].max_length if family.is_flux else MMDIT_TEXT_TOKENS
    tokens = (width // f) * (height // f) + text
    return int(2 * batch * MMDIT_WORK_TENSORS * u.hidden_size * tokens * dtype_bytes)


def vae_decode_bytes(family: ModelFamily, width: int, height: int, images: int) -> int:
    """Peak activations of decoding `images` images of width x height at once, in float32."""
    if family.vae is None:
        return 0
    widths = [family.vae.ch * m for m in family.vae.ch_mult]
    up_in = widths[1] if len(widths) > 1 else widths[0]
    return int(images * width * height * (2 * up_in + 3 * widths[0]) * 4)


def estimate_memory(family: ModelFamily, p: GenerationParams, *, width: int, height: int, dtype_bytes: int = 4,
                    weight_bytes: int = 0, decode_pixels_per_call: int = 1024 * 1024) -> dict[str, int]:
    """{"weights", "unet", "vae", "peak"} in bytes for `p` at its (resolved) width x height; peak = weights +
    the larger of the UNet's and the VAE's activations (they do not run at the same time)."""
    w, h = output_size(p, width, height)
    network = mmdit_activation_bytes if family.is_transformer else unet_activation_bytes
    unet = network(family, w, h, p.batch_size, dtype_bytes)
    per_call = min(p.batch_size, max(1, decode_pixels_per_call // (w * h)))
    vae = vae_decode_bytes(family, w, h, per_call)
    return {"weights": int(weight_bytes), "unet": unet, "vae": vae, "peak": int(weight_bytes) + max(unet, vae)}


def device_memory_bytes(device) -> int | None:
    """Total memory of `device`: the GPU's for CUDA, the machine's RAM otherwise (None if unknown)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None

"""Latents and sampling: EmptyLatentImage, VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeTiled, VAEEncodeForInpaint,
SetLatentNoiseMask,
LatentUpscale, LatentUpscaleBy, KSampler, KSamplerAdvanced (ComfyUI nodes.py names and defaults).

Every sampler step is recorded in the LATENT it returns ("diffusekit_process": the step's x0 estimate and
noisy latent, batch row 0.. kept on the CPU), so a SaveDenoisingVideo node downstream can show the whole
denoising, across several samplers in sequence (the seeds' two-samplers workflow)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..sampling import SCHEDULERS, ksample, sampler_names
from ..spec import MAX_RESOLUTION, MAX_SEED, Combo, Float, Int, Link, register
from ..values import image_to_signed, signed_to_image
from .resize import upscale

LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")


def _factor(latent: dict) -> int:
    return int(latent.get("diffusekit_factor", 8))


@register("EmptyLatentImage", category="latent", display_name="Empty Latent Image",
          inputs={"width": Int(512, 16, MAX_RESOLUTION, 8), "height": Int(512, 16, MAX_RESOLUTION, 8),
                  "batch_size": Int(1, 1, 4096)}, outputs=("LATENT",))
def empty_latent_image(ctx, width, height, batch_size):
    """A batch of all-zero latents for the sampler to fill (4 channels at 1/8 size; a model with another
    latent shape gets its own at sampling time, from the pixel size kept here)."""
    return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8), "diffusekit_size": (width, height)},)


@register("VAEDecode", category="latent", display_name="VAE Decode",
          inputs={"samples": Link("LATENT"), "vae": Link("VAE")}, outputs=("IMAGE",))
def vae_decode(ctx, samples, vae):
    """Decodes latents into images."""
    pipe = vae.pipe
    z = samples["samples"].float()
    if z.shape[1] != pipe.latent_channels:
        raise ValueError(f"the latent has {z.shape[1]} channels; this VAE decodes {pipe.latent_channels}")
    return (signed_to_image(pipe.decode(z.to(pipe.device) * pipe.scale)),)


@register("VAEDecodeTiled", category="_for_testing", display_name="VAE Decode (Tiled)",
          inputs={"samples": Link("LATENT"), "vae": Link("VAE"), "tile_size": Int(512, 64, 4096, 32),
                  "overlap": Int(64, 0, 4096, 32), "temporal_size": Int(64, 8, 4096, 4),
                  "temporal_overlap": Int(8, 4, 4096, 4)}, outputs=("IMAGE",))
def vae_decode_tiled(ctx, samples, vae, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
    """Decodes latents in overlapping tiles of `tile_size` pixels, blended across `overlap` (ComfyUI: the overlap
    is cut to a quarter of the tile if larger), so the VAE's memory stays that of one tile at any image size.
    temporal_size / temporal_overlap are for video VAEs, which this project has none of: accepted, unused."""
    pipe = vae.pipe
    z = samples["samples"].float()
    if z.shape[1] != pipe.latent_channels:
        raise ValueError(f"the latent has {z.shape[1]} channels; this VAE decodes {pipe.latent_channels}")
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    f = pipe.factor
    tile, lap = max(1, tile_size // f), overlap // f
    lap = min(lap, tile - 1)
    z = z.to(pipe.device) * pipe.scale
    if pipe.vae is None:   # a pixel-space model: nothing to tile
        return (signed_to_image(pipe.decode(z)),)
    return (signed_to_image(pipe._decode(z, tile=(tile, lap))),)


@register("VAEEncodeTiled", category="_for_testing", display_name="VAE Encode (Tiled)",
          inputs={"pixels": Link("IMAGE"), "vae": Link("VAE"), "tile_size": Int(512, 64, 4096, 64),
                  "overlap": Int(64, 0, 4096, 32), "temporal_size": Int(64, 8, 4096, 4),
                  "temporal_overlap": Int(8, 4, 4096, 4)}, outputs=("LATENT",))
def vae_encode_tiled(ctx, pixels, vae, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
    """Encodes images in overlapping tiles of `tile_size` pixels (the posterior mean, blended across `overlap`).
    temporal_size / temporal_overlap: video VAEs only, unused."""
    pipe = vae.pipe
    pixels, _ = _crop_to_factor(pixels, pipe.factor)
    if pipe.vae is None:
        return ({"samples": _encode(pipe, pixels), "diffusekit_factor": pipe.factor},)
    f = pipe.factor
    tile = max(f, tile_size // f * f)
    lap = min(overlap // f * f, tile - f)
    z = pipe.encode(image_to_signed(pixels).to(pipe.device), tile=(tile, lap)) / pipe.scale
    return ({"samples": z.cpu(), "diffusekit_factor": f},)


def _crop_to_factor(pixels: torch.Tensor, f: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """ComfyUI crops images whose sides are not multiples of the VAE factor, centred."""
    h, w = pixels.shape[1] // f * f, pixels.shape[2] // f * f
    dy, dx = (pixels.shape[1] % f) // 2, (pixels.shape[2] % f) // 2
    return pixels[:, dy:dy + h, dx:dx + w], (dy, dx)


def _encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    return (pipe.encode(image_to_signed(pixels).to(pipe.device)) / pipe.scale).cpu()


@register("VAEEncode", category="latent", display_name="VAE Encode",
          inputs={"pixels": Link("IMAGE"), "vae": Link("VAE")}, outputs=("LATENT",))
def vae_encode(ctx, pixels, vae):
    """Encodes images into latents (the posterior mean)."""
    pipe = vae.pipe
    pixels, _ = _crop_to_factor(pixels, pipe.factor)
    return ({"samples": _encode(pipe, pixels), "diffusekit_factor": pipe.factor},)


@register("VAEEncodeForInpaint", category="latent/inpaint", display_name="VAE Encode (for Inpainting)",
          inputs={"pixels": Link("IMAGE"), "vae": Link("VAE"), "mask": Link("MASK"),
                  "grow_mask_by": Int(6, 0, 64, 1)}, outputs=("LATENT",))
def vae_encode_for_inpaint(ctx, pixels, vae, mask, grow_mask_by):
    """Encodes the image with the masked area set to grey and keeps the mask (grown by a few pixels) as
    the latent's noise mask, so only that area is generated."""
    pipe = vae.pipe
    f = pipe.factor
    m = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                      size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels, (dy, dx) = _crop_to_factor(pixels.clone(), f)
    h, w = pixels.shape[1], pixels.shape[2]
    m = m[:, :, dy:dy + h, dx:dx + w]
    if grow_mask_by == 0:
        grown = m
    else:
        kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
        grown = torch.clamp(F.conv2d(m.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)), 0, 1)
    keep = (1.0 - m.round()).squeeze(1)[..., None]                     # (B, H, W, 1)
    pixels = (pixels - 0.5) * keep + 0.5
    return ({"samples": _encode(pipe, pixels), "noise_mask": grown[:, :, :h, :w].round(), "diffusekit_factor": f},)


@register("SetLatentNoiseMask", category="latent/inpaint", display_name="Set Latent Noise Mask",
          inputs={"samples": Link("LATENT"), "mask": Link("MASK")}, outputs=("LATENT",))
def set_latent_noise_mask(ctx, samples, mask):
    """Only the masked area (1) is denoised; the rest keeps the input latent."""
    return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()},)


@register("LatentUpscale", category="latent", display_name="Upscale Latent",
          inputs={"samples": Link("LATENT"), "upscale_method": Combo(LATENT_UPSCALE_METHODS),
                  "width": Int(512, 0, MAX_RESOLUTION, 8), "height": Int(512, 0, MAX_RESOLUTION, 8),
                  "crop": Combo(CROP_METHODS)}, outputs=("LATENT",))
def latent_upscale(ctx, samples, upscale_method, width, height, crop):
    """Resizes latents to a pixel size (0 keeps the aspect ratio from the other side)."""
    if width == 0 and height == 0:
        return (samples,)
    z, f = samples["samples"], _factor(samples)
    if width == 0:
        height = max(64, height)
        width = max(64, round(z.shape[3] * height / z.shape[2]))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(z.shape[2] * width / z.shape[3]))
    else:
        width, height = max(64, width), max(64, height)
    _check_pixels(ctx, width, height, samples)
    out = {**samples, "samples": upscale(z, width // f, height // f, upscale_method, crop)}
    return (out,)


@register("LatentUpscaleBy", category="latent", display_name="Upscale Latent By",
          inputs={"samples": Link("LATENT"), "upscale_method": Combo(LATENT_UPSCALE_METHODS),
                  "scale_by": Float(1.5, 0.01, 8.0)}, outputs=("LATENT",))
def latent_upscale_by(ctx, samples, upscale_method, scale_by):
    """Resizes latents by a factor."""
    z, f = samples["samples"], _factor(samples)
    w, h = round(z.shape[3] * scale_by), round(z.shape[2] * scale_by)
    _check_pixels(ctx, w * f, h * f, samples)
    return ({**samples, "samples": upscale(z, max(1, w), max(1, h), upscale_method, "disabled")},)


def _check_pixels(ctx, width: int, height: int, samples: dict) -> None:
    limits = getattr(ctx.env, "limits", None)
    if limits is not None and width * height > limits.max_pixels:
        raise ValueError(f"{width}x{height} is over the server limit max_pixels={limits.max_pixels}")


_SAMPLER_INPUTS = {"sampler_name": Combo(lambda env: sampler_names()), "scheduler": Combo(SCHEDULERS)}


def _record(ctx, pipe, sampler_name: str, scheduler: str):
    """The per-step callback: progress + a lazy preview (the latent->RGB map) to the client, and the step
    kept for the denoising video."""
    kept: list[dict] = []

    def on_step(i, total, denoised, x, sigma):
        d = denoised[:1].detach().float().cpu()
        kept.append({"step": i, "total": total, "sigma": sigma, "sampler": sampler_name, "scheduler": scheduler,
                     "denoised": d, "x": x[:1].detach().float().cpu()})
        ctx.progress(i + 1, total, image=lambda: pipe.preview(d)[0])
    return kept, on_step


def _sample(ctx, model, latent, name, scheduler, **kw):
    kept, on_step = _record(ctx, model.pipe, name, scheduler)
    out = ksample(model, kw.pop("seed"), kw.pop("steps"), kw.pop("cfg"), name, scheduler, kw.pop("positive"),
                  kw.pop("negative"), latent, callback=on_step, should_stop=ctx.should_stop, **kw)
    if kept:
        scale = model.pipe.scale
        for k in kept:                                    # kept in VAE-latent units, like LATENT samples
            k["denoised"], k["x"] = k["denoised"] / scale, k["x"] / scale
        out["diffusekit_process"] = list(latent.get("diffusekit_process", [])) + kept
    return out


@register("KSampler", category="sampling",
          inputs={"model": Link("MODEL"), "seed": Int(0, 0, MAX_SEED, control_after_generate=True),
                  "steps": Int(20, 1, 10000), "cfg": Float(8.0, 0.0, 100.0, 0.1, round=0.01), **_SAMPLER_INPUTS,
                  "positive": Link("CONDITIONING"), "negative": Link("CONDITIONING"),
                  "latent_image": Link("LATENT"), "denoise": Float(1.0, 0.0, 1.0)},
          outputs=("LATENT",))
def ksampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
    """Denoises the latent with the model, guided by the positive and negative conditioning; denoise < 1
    starts part-way (img2img)."""
    return (_sample(ctx, model, latent_image, sampler_name, scheduler, seed=seed, steps=steps, cfg=cfg,
                    positive=positive, negative=negative, denoise=denoise),)


@register("KSamplerAdvanced", category="sampling", display_name="KSampler (Advanced)",
          inputs={"model": Link("MODEL"), "add_noise": Combo(("enable", "disable")),
                  "noise_seed": Int(0, 0, MAX_SEED, control_after_generate=True), "steps": Int(20, 1, 10000),
                  "cfg": Float(8.0, 0.0, 100.0, 0.1, round=0.01), **_SAMPLER_INPUTS,
                  "positive": Link("CONDITIONING"), "negative": Link("CONDITIONING"),
                  "latent_image": Link("LATENT"), "start_at_step": Int(0, 0, 10000),
                  "end_at_step": Int(10000, 0, 10000), "return_with_leftover_noise": Combo(("disable", "enable"))},
          outputs=("LATENT",))
def ksampler_advanced(ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                      latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    """Runs steps start_at_step..end_at_step of a `steps`-step schedule: two in sequence (the first with
    return_with_leftover_noise, the second with add_noise disabled) split one denoising between samplers."""
    return (_sample(ctx, model, latent_image, sampler_name, scheduler, seed=noise_seed, steps=steps, cfg=cfg,
                    positive=positive, negative=negative, disable_noise=add_noise == "disable",
                    start_step=start_at_step, last_step=end_at_step,
                    force_full_denoise=return_with_leftover_noise != "enable"),)


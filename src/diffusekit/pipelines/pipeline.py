"""The generation pipeline: txt2img, img2img, inpainting, hires fix and refiner hand-over.

The only layer that knows Stable Diffusion's specifics: latent scale, 77-token context, eps vs v, the
SDXL `y` vector, A1111's img2img step arithmetic and seeds. Everything else is composed from `core`
(schedules, sigmas, denoisers, guidance, samplers) and `models` (networks and checkpoints).
"""
from __future__ import annotations

import inspect
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..core import samplers as sampler_registry
from ..core import sigmas as sigma_schedules
from ..core.denoisers import EpsDenoiser, VDenoiser
from ..core.guidance import cfg
from ..core.schedules import DiscreteSchedule, betas
from ..models.loading import ModelParts, load_checkpoint
from . import infotext as infotext_mod
from .conditioning import TextConditioner, adm_vector
from .latents import (LATENT_RGB, fit_latent_rgb, initial_noise, latent_mask, pil_to_tensor, prepare_mask,
                      preview, tensor_to_pil)
from .params import GenerationParams, GenerationResult, StepInfo
from .shipped import resolve_model

SCHEDULE_LABELS = {v: k for k, v in sigma_schedules.DISPLAY_NAMES.items()}


class Interrupted(Exception):
    """Raised inside sampling when the caller asked to stop; the pipeline returns what it has."""


def split_sampler_name(name: str, scheduler: str) -> tuple[str, str]:
    """A1111 < 1.9 names carried the schedule ("DPM++ 2M Karras"): split them into sampler + schedule."""
    try:
        return sampler_registry.resolve(name), scheduler
    except ValueError:
        for label, sid in sigma_schedules.DISPLAY_NAMES.items():
            if label != "Automatic" and name.lower().endswith(" " + label.lower()):
                return sampler_registry.resolve(name[: -len(label) - 1]), label
        raise


class UNetAdapter(torch.nn.Module):
    """The LDM UNet as a network `model(x, t, context=, y=, c_concat=)` for the denoiser wrappers:
    concatenates an inpainting model's extra channels and casts to the UNet's dtype."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, y=None, c_concat=None):
        dtype = next(self.unet.parameters()).dtype
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        out = self.unet(x.to(dtype), t.to(x.device, torch.float32),
                        None if context is None else context.to(dtype), None if y is None else y.to(dtype))
        return out.to(x.dtype)


@dataclass
class _Pass:
    """One sampling pass: its sigmas, conditioning schedules and the latent it starts from."""

    name: str
    sigmas: torch.Tensor
    x: torch.Tensor
    steps_total: int


class Pipeline:
    """Generation on one checkpoint. `Pipeline.from_pretrained(name_or_path)` then `.generate(params)`."""

    def __init__(self, parts: ModelParts, *, device: str | torch.device = "cpu"):
        self.parts = parts
        self.family = parts.family
        self.device = torch.device(device)
        self.name = parts.name
        self.unet = parts.unet.to(self.device).eval()
        self.vae = parts.vae.to(self.device).eval() if parts.vae is not None else None
        for enc in parts.text_encoders:
            enc.to(self.device).eval()
        self.text = TextConditioner(self.family, parts.text_encoders, parts.tokenizers) if parts.text_encoders else None
        b = self.family.beta_schedule
        opts = {"beta_start": b.beta_start, "beta_end": b.beta_end} if b.kind != "cosine" else {}
        self.schedule = DiscreteSchedule.from_betas(betas(b.kind, b.num_timesteps, **opts))
        wrapper = VDenoiser if self.family.prediction_type == "v" else EpsDenoiser
        self.denoiser = wrapper(UNetAdapter(self.unet), self.schedule)
        self._rgb = None
        self._refiners: dict[str, Pipeline] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        family: str | None = None) -> "Pipeline":
        """A shipped model name ("shapes"), a single-file checkpoint or a diffusers folder."""
        path = resolve_model(name_or_path)
        return cls(load_checkpoint(path, family=family, dtype=dtype, device="cpu"), device=device)

    @property
    def latent_channels(self) -> int:
        return self.family.vae.z_channels if self.vae is not None else self.family.unet.out_channels

    @property
    def factor(self) -> int:
        return self.family.vae.downsample_factor if self.vae is not None else 1

    @property
    def scale(self) -> float:
        return self.family.latent_scale if self.vae is not None else 1.0

    # ------------------------------------------------------------------ pixels <-> latents
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> model-space latents (VAE mean times the latent scale)."""
        if self.vae is None:
            return images.to(self.device)
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images.to(self.device, dtype)).mode().float() * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> (B, 3, H, W) in [-1, 1]. A non-finite result of a half-precision VAE
        (the fp16 SDXL VAE overflows: black images) is decoded again in float32."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        dtype = next(self.vae.parameters()).dtype
        z = latents / self.scale
        force32 = self.family.vae_force_upcast and dtype == torch.float16
        out = None if force32 else self.vae.decode(z.to(dtype)).float()
        if out is None or not torch.isfinite(out).all():
            self.vae.float()
            try:
                out = self.vae.decode(z.float()).float()
            finally:
                self.vae.to(dtype)
        return out.clamp(-1, 1)

    def preview(self, latents: torch.Tensor):
        """Cheap RGB previews of model-space latents (linear map; no VAE call)."""
        if self.vae is None:
            return tensor_to_pil(latents)
        if self._rgb is None:
            known = LATENT_RGB.get(round(self.scale, 5)) if self.latent_channels == 4 and self.family.name != "custom" else None
            self._rgb = known or fit_latent_rgb(lambda im: self.vae.encode(im.to(self.device, next(self.vae.parameters()).dtype)).mode(),
                                                self.scale, self.factor)
        return preview(latents, *self._rgb)

    # ------------------------------------------------------------------ the public entry
    def generate(self, params: GenerationParams, callback: Callable[[StepInfo], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        params.validate()
        sampler_id, scheduler = split_sampler_name(params.sampler_name, params.scheduler)
        schedule_id = sigma_schedules.resolve(scheduler)
        if schedule_id == "automatic":
            schedule_id = sampler_registry.INFO[sampler_id].default_schedule
        width = params.width or self.family.default_size
        height = params.height or self.family.default_size
        if width % self.factor or height % self.factor:
            raise ValueError(f"width={width}, height={height}: must be multiples of {self.factor} for this model")
        seed = params.resolved_seed(random.Random())
        subseed = params.subseed if params.subseed != -1 else random.SystemRandom().randrange(2**32)
        if params.is_img2img and params.mask is not None and tuple(params.mask.size) != tuple(params.init_images[0].size):
            raise ValueError(f"mask size {params.mask.size} differs from the init image size {params.init_images[0].size}")
        t0 = time.perf_counter()
        images, seeds, subseeds, infotexts, latents_all, process = [], [], [], [], [], []
        interrupted = False
        total = params.batch_size * params.n_iter
        for job in range(params.n_iter):
            job_seeds = [seed + job * params.batch_size + i for i in range(params.batch_size)]
            job_subseeds = [subseed + job * params.batch_size + i for i in range(params.batch_size)]
            try:
                latent, steps_log = self._run_job(params, sampler_id, schedule_id, width, height, job_seeds,
                                                  job_subseeds, callback, should_stop, job, params.n_iter)
            except Interrupted as stop:
                latent, steps_log = stop.args[0], stop.args[1]
                interrupted = True
            pixels = self.decode(latent)
            if params.is_img2img and params.mask is not None:
                pixels = self._overlay_original(pixels, params, width, height)
            for i, img in enumerate(tensor_to_pil(pixels)):
                text = self.infotext(params, sampler_id, schedule_id, job_seeds[i], job_subseeds[i], width, height)
                img.info["parameters"] = text
                images.append(img)
                infotexts.append(text)
            seeds += job_seeds
            subseeds += job_subseeds
            latents_all.append(latent.cpu())
            process += steps_log
            if interrupted:
                break
        info = {"model": self.name, "sampler": sampler_id, "schedule": schedule_id, "seconds": time.perf_counter() - t0,
                "images_requested": total}
        return GenerationResult(images=images, seeds=seeds, subseeds=subseeds, infotexts=infotexts, params=params,
                                latents=torch.cat(latents_all), process=process, interrupted=interrupted, info=info)

    # ------------------------------------------------------------------ one batch
    def _run_job(self, params, sampler_id, schedule_id, width, height, seeds, subseeds, callback, should_stop,
                 job_no, job_count):
        b = len(seeds)
        shape = (b, self.latent_channels, height // self.factor, width // self.factor)
        noise, gens = initial_noise(shape, seeds, subseeds, params.subseed_strength)
        noise = noise.to(self.device)
        steps_log: list[dict] = []
        init_latent = mask = concat = None
        if params.is_img2img:
            imgs = params.init_images
            imgs = (list(imgs) * b)[:b] if len(imgs) < b else list(imgs)[:b]
            pixels = pil_to_tensor(imgs, (width, height)).to(self.device)
            init_latent = self.encode(pixels)
            if params.mask is not None:
                m = prepare_mask(params.mask, (width, height), params.mask_blur, params.inpainting_mask_invert)
                mask = latent_mask(m, shape[2:]).to(self.device)                  # 1 = repaint
                if params.inpainting_fill == 2:
                    init_latent = init_latent * (1 - mask) + noise * mask
                elif params.inpainting_fill == 3:
                    init_latent = init_latent * (1 - mask)
                if self.family.is_inpaint:
                    pm = pil_to_tensor([m.convert("RGB")], (width, height))[:, :1].to(self.device)
                    pm = (pm + 1) / 2
                    masked = self.encode(pixels * (1 - pm.round()))
                    concat = torch.cat([F.interpolate(pm.round(), size=shape[2:]).expand(b, -1, -1, -1), masked], 1)
        if self.family.is_inpaint and concat is None:
            blank = self.encode(torch.zeros(b, 3, height, width, device=self.device))
            concat = torch.cat([torch.ones(b, 1, *shape[2:], device=self.device), blank], 1)

        full = sigma_schedules.get(schedule_id, params.steps, schedule=self.schedule,
                                   sigma_min=self.schedule.sigma_min, sigma_max=self.schedule.sigma_max)
        full = full.to(self.device)
        if init_latent is not None:
            strength = float(params.denoising_strength)
            if strength == 0.0:
                return init_latent, steps_log
            t_enc = int(min(strength, 0.999) * params.steps)                    # A1111's img2img arithmetic
            sig = full[params.steps - t_enc - 1:]
            x = init_latent + noise * sig[0]
        else:
            sig = full
            x = noise * sig[0]
        refiner = self._refiner(params)
        cut = len(sig) - 1
        if refiner is not None:
            cut = max(1, min(len(sig) - 2, round(params.refiner_switch_at * (len(sig) - 1))))
        x = self._sample(params, sampler_id, sig[:cut + 1], x, gens, width, height, init_latent, mask, concat,
                         callback, should_stop, steps_log, "img2img" if init_latent is not None else "txt2img",
                         job_no, job_count)
        if refiner is not None:
            x = refiner._sample(params, sampler_id, sig[cut:], x, gens, width, height, init_latent, mask, None,
                                callback, should_stop, steps_log, "refiner", job_no, job_count)
        if params.enable_hr and not params.is_img2img:
            x = self._hires(params, sampler_id, schedule_id, x, gens, width, height, callback, should_stop,
                            steps_log, job_no, job_count)
        return x, steps_log

    def _hires(self, params, sampler_id, schedule_id, x, gens, width, height, callback, should_stop, log, job_no, job_count):
        """A1111's hires fix: upscale (latent bilinear, or decode-Lanczos-encode) and img2img at a strength."""
        hw, hh = int(width * params.hr_scale) // 8 * 8, int(height * params.hr_scale) // 8 * 8
        if params.hr_upscaler.lower().startswith("latent"):
            x = F.interpolate(x, size=(hh // self.factor, hw // self.factor), mode="bilinear", align_corners=False)
        else:
            imgs = [im.resize((hw, hh), resample=3) for im in tensor_to_pil(self.decode(x))]
            x = self.encode(pil_to_tensor(imgs).to(self.device))
        steps = params.hr_second_pass_steps or params.steps
        strength = params.hr_denoising_strength if params.hr_denoising_strength is not None else params.denoising_strength
        if strength <= 0:
            return x
        full = sigma_schedules.get(schedule_id, steps, schedule=self.schedule,
                                   sigma_min=self.schedule.sigma_min, sigma_max=self.schedule.sigma_max).to(self.device)
        sig = full[steps - int(min(strength, 0.999) * steps) - 1:]
        from ..core.noise import randn
        noise = randn(x.shape, gens, dtype=x.dtype, device=x.device)
        return self._sample(params, sampler_id, sig, x + noise * sig[0], gens, hw, hh, None, None, None,
                            callback, should_stop, log, "hires", job_no, job_count)

    def _refiner(self, params) -> "Pipeline | None":
        if not params.refiner_checkpoint or params.refiner_switch_at is None:
            return None
        key = str(params.refiner_checkpoint)
        if key not in self._refiners:
            self._refiners[key] = Pipeline.from_pretrained(key, device=str(self.device))
        return self._refiners[key]

    def _conditioning(self, params, steps, width, height, b):
        """(cond_at(step), uncond_at(step)) -> dicts of network kwargs for a batch of b."""
        if self.text is None:
            return (lambda s: {}), (lambda s: {})
        cond_s, uncond_s = self.text.pair(params.prompt, params.negative_prompt, steps, params.clip_skip)

        def as_kwargs(c, aesthetic):
            kw = {"context": c.context.expand(b, -1, -1)}
            if self.family.adm_inputs:
                y = adm_vector(self.family, c.pooled, original_size=(height, width), target_size=(height, width),
                               aesthetic_score=aesthetic)
                kw["y"] = y.expand(b, -1)
            return kw

        return (lambda s: as_kwargs(cond_s.at(s), 6.0)), (lambda s: as_kwargs(uncond_s.at(s), 2.5))

    def _sample(self, params, sampler_id, sig, x, gens, width, height, init_latent, mask, concat, callback,
                should_stop, log, pass_name, job_no, job_count):
        b = x.shape[0]
        steps = len(sig) - 1
        cond_at, uncond_at = self._conditioning(params, steps, width, height, b)
        state = {"step": 0, "denoised": x}
        extra = {} if concat is None else {"c_concat": concat}

        def denoiser(xx, sigma, **_):
            c, u = cond_at(state["step"]), uncond_at(state["step"])
            if concat is not None:
                c, u = {**c, **extra}, {**u, **extra}
            if self.text is None:
                out = self.denoiser(xx, sigma, **c)
            else:
                out = cfg(self.denoiser, params.cfg_scale, c, u, rescale=params.cfg_rescale)(xx, sigma)
            if mask is not None and init_latent is not None:      # inpainting: keep the unmasked x0
                out = init_latent * (1 - mask) + out * mask
            return out

        def on_step(d):
            state["step"] = d["i"] + 1
            state["denoised"] = d["denoised"]
            if params.save_process:
                log.append({"job": job_no, "pass": pass_name, "step": d["i"], "sigma": float(d["sigma"]),
                            "x": d["x"].detach().cpu(), "denoised": d["denoised"].detach().cpu()})
            if callback is not None:
                callback(StepInfo(step=d["i"], steps=steps, sigma=float(d["sigma"]), latent=d["x"],
                                  denoised=d["denoised"], preview=lambda den=d["denoised"]: self.preview(den),
                                  job_no=job_no, job_count=job_count, pass_name=pass_name))
            if should_stop is not None and should_stop():
                raise Interrupted(state["denoised"], log)

        fn = sampler_registry.SAMPLERS[sampler_id]
        knobs = _knobs_for(fn, params)
        with torch.no_grad():
            out = fn(denoiser, x, sig.to(x.device), callback=on_step, generator=gens, **knobs)
        if mask is not None and init_latent is not None and float(sig[-1]) == 0.0:
            out = init_latent * (1 - mask) + out * mask
        return out

    def _overlay_original(self, pixels, params, width, height):
        """Paste the original pixels back outside the (blurred) mask, as A1111's inpaint overlay does."""
        m = prepare_mask(params.mask, (width, height), params.mask_blur, params.inpainting_mask_invert)
        m = pil_to_tensor([m.convert("RGB")])[:, :1].to(pixels.device)
        m = (m + 1) / 2
        orig = pil_to_tensor(list(params.init_images)[:1], (width, height)).to(pixels.device)
        return orig * (1 - m) + pixels * m

    # ------------------------------------------------------------------ infotext
    def infotext(self, params, sampler_id, schedule_id, seed, subseed, width, height) -> str:
        info = sampler_registry.INFO[sampler_id]
        d = {
            "Steps": params.steps, "Sampler": info.label,
            "Schedule type": SCHEDULE_LABELS.get(schedule_id, schedule_id),
            "CFG scale": params.cfg_scale, "Seed": seed, "Size": f"{width}x{height}",
            "Model hash": self.parts.hash10, "Model": self.name,
        }
        if params.subseed_strength > 0:
            d["Variation seed"] = subseed
            d["Variation seed strength"] = params.subseed_strength
        if params.is_img2img:
            d["Denoising strength"] = params.denoising_strength
        if params.mask is not None:
            d["Mask blur"] = params.mask_blur
        if params.clip_skip > 1:
            d["Clip skip"] = params.clip_skip
        d["RNG"] = "CPU"
        if params.eta is not None:
            d["Eta"] = params.eta
        if params.cfg_rescale:
            d["CFG rescale"] = params.cfg_rescale
        if params.enable_hr:
            d.update({"Hires upscale": params.hr_scale, "Hires upscaler": params.hr_upscaler,
                      "Hires steps": params.hr_second_pass_steps,
                      "Denoising strength": params.hr_denoising_strength if params.hr_denoising_strength is not None
                      else params.denoising_strength})
        if params.refiner_checkpoint and params.refiner_switch_at is not None:
            d.update({"Refiner": Path(str(params.refiner_checkpoint)).stem, "Refiner switch at": params.refiner_switch_at})
        d["Version"] = f"diffusekit {__version__}"
        return infotext_mod.format_infotext(params.prompt, params.negative_prompt, d)


def _knobs_for(fn, params: GenerationParams) -> dict:
    """The sampler knobs the chosen sampler accepts, from the params that were set."""
    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}
    wanted = {"eta": params.eta, "s_churn": params.s_churn, "s_tmin": params.s_tmin, "s_tmax": params.s_tmax,
              "s_noise": params.s_noise}
    defaults = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
    return {k: v for k, v in wanted.items() if k in accepted and v is not None and v != defaults.get(k)}

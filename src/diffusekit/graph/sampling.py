"""ComfyUI's KSampler on diffusekit's pieces: sigma schedules (`core.sigmas`), samplers (`core.samplers`),
classifier-free guidance (`core.guidance.cfg`), the pipeline's denoiser wrappers and text encoders.

What ComfyUI 0.3 (comfy/samplers.py, comfy/sample.py, comfy/model_sampling.py, comfy/k_diffusion) does,
and this module does the same way:
- noise: one CPU `torch.Generator` seeded with the node's seed draws the whole batch's (B, C, h, w) noise
  in one call (`prepare_noise`; with a latent "batch_index", one draw per index); ancestral samplers draw
  their per-step noise from a fresh CPU generator seeded with seed + 1 (k-diffusion's
  `default_noise_sampler` on a CPU); SDE samplers use torchsde's Brownian tree as ComfyUI builds it
  (`pipelines.sde_noise.comfyui_noise_sampler`: one CPU tree for the batch, seeded with the seed);
- schedule: `calculate_sigmas(scheduler, steps)` over the model's table, with one extra step dropped
  again before the end for dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2; denoise < 1 builds
  int(steps / denoise) steps and keeps the last steps + 1; KSamplerAdvanced cuts the schedule to
  [start_at_step : end_at_step + 1] and sets its end to 0 unless return_with_leftover_noise;
- start: x = latent + noise * sigma_0, or noise * sqrt(1 + sigma_0^2) when sigma_0 is the model's sigma_max
  (ComfyUI's `max_denoise`); the UNet gets the nearest integer timestep (`quantize=True`);
- conditioning: every entry of a CONDITIONING list is evaluated over its area (ConditioningSetArea; the
  area's inner edges feathered over 8 latent cells) and the x0 predictions are averaged with weights
  strength x feather; cond and uncond entries of the same area go through the UNet as one batch;
  cfg 1 skips the negative;
- inpainting (a latent "noise_mask"): outside the mask the latent is re-noised to the current sigma
  before each model call and the prediction replaced by the original latent (KSamplerX0Inpaint).

Differences that remain: the tokenizer splits prompts over 75 tokens A1111's way, the samplers compute
their coefficients in float64 (prompt weights are ComfyUI's: `nodes.loaders.encode_comfy`).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..core import samplers as sampler_registry
from ..core import sigmas as sigma_schedules
from ..core.consistency import ConsistencyDenoiser
from ..core.denoisers import EpsDenoiser, VDenoiser
from ..core.guidance import cfg as cfg_guidance
from ..pipelines.conditioning import adm_vector
from ..pipelines.pipeline import AESTHETIC_SCORE_COND, AESTHETIC_SCORE_UNCOND, Interrupted, UNetAdapter

log = logging.getLogger("diffusekit.graph")

# ComfyUI's sampler names -> (diffusekit sampler id, knobs). ComfyUI's "ddim" is its Euler sampler; the
# *_gpu variants only move the Brownian tree to the GPU (same values on a CPU).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("euler", {}), "euler_ancestral": ("euler_ancestral", {}), "heun": ("heun", {}),
    "dpm_2": ("dpm_2", {}), "dpm_2_ancestral": ("dpm_2_ancestral", {}), "lms": ("lms", {}),
    "dpm_fast": ("dpm_fast", {}), "dpm_adaptive": ("dpm_adaptive", {}),     # read only the schedule's ends
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}), "dpmpp_sde": ("dpmpp_sde", {}),
    "dpmpp_sde_gpu": ("dpmpp_sde", {}), "dpmpp_2m": ("dpmpp_2m", {}), "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {}), "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"solver_type": "heun"}), "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {}), "ddpm": ("ddpm", {}), "lcm": ("lcm", {}),
    "ddim": ("euler", {}), "uni_pc": ("uni_pc", {}), "uni_pc_bh2": ("uni_pc_bh2", {}),
}
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")       # ComfyUI's SCHEDULER_NAMES, in its order
DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
ANCESTRAL_NOISE = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm", "lcm"}
FEATHER = 8          # latent cells over which an area's inner edges fade in (ComfyUI's rr)


def sampler_names() -> list[str]:
    """The ComfyUI sampler names this server runs (ComfyUI's order)."""
    return [n for n in SAMPLERS if SAMPLERS[n][0] in sampler_registry.SAMPLERS]


# ------------------------------------------------------------------ schedule and noise
def calculate_sigmas(pipe, sampler_name: str, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI KSampler.set_steps: the sigmas for `steps` at `denoise` (float32, ends in 0; empty at 0)."""
    def full(n: int) -> torch.Tensor:
        extra = 1 if sampler_name in DISCARD_PENULTIMATE else 0
        opts = {"variant": "comfyui"} if scheduler == "beta" else {}
        s = sigma_schedules.get(scheduler, n + extra, schedule=pipe.schedule, **opts)
        return torch.cat([s[:-2], s[-1:]]) if extra else s

    if denoise is None or denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return full(int(steps / denoise))[-(steps + 1):]


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI comfy.sample.prepare_noise: one CPU generator for the whole batch."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(latent.shape, generator=g, dtype=torch.float32)
    wanted = sorted(set(batch_index))
    draws = {}
    for i in range(wanted[-1] + 1):
        n = torch.randn((1, *latent.shape[1:]), generator=g, dtype=torch.float32)
        if i in wanted:
            draws[i] = n
    return torch.cat([draws[i] for i in batch_index])


def prepare_mask(mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A noise_mask (B|1, 1, H, W) at the latent's size (bilinear), one copy per channel and image."""
    m = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(), size=shape[2:], mode="bilinear")
    m = m.expand(-1, shape[1], -1, -1)
    reps = -(-shape[0] // m.shape[0])
    return m.repeat(reps, 1, 1, 1)[: shape[0]]


# ------------------------------------------------------------------ conditioning lists -> one denoiser
def _feather(area, shape, strength: float) -> torch.Tensor:
    """ComfyUI's mult for an area entry: strength, faded in over FEATHER cells at edges inside the latent."""
    h, w, y, x = area
    H, W = shape[-2], shape[-1]
    hh, ww = max(0, min(h, H - y)), max(0, min(w, W - x))
    m = torch.full((hh, ww), float(strength))
    for t in range(FEATHER):
        f = (t + 1) / FEATHER
        if y != 0 and t < hh:
            m[t] *= f
        if y + h < H and hh - 1 - t >= 0:
            m[hh - 1 - t] *= f
        if x != 0 and t < ww:
            m[:, t] *= f
        if x + w < W and ww - 1 - t >= 0:
            m[:, ww - 1 - t] *= f
    return m


class ConditionedDenoiser:
    """D(x, sigma, branch) over ComfyUI conditioning lists: row r of x uses the list `branches[branch[r]]`
    (0 = positive, 1 = negative), each entry over its area, predictions averaged by weight (module doc).
    Wrapped by `core.guidance.cfg` with {"branch": 0} / {"branch": 1}, so the two halves of every CFG step
    are one call here, and entries sharing an area are one UNet batch."""

    def __init__(self, denoiser, branches: list[list], pipe, factor: int, size: tuple[int, int]):
        self.inner = denoiser
        self.branches = branches
        self.pipe = pipe
        self.factor = factor
        self.size = size                  # (height, width) in pixels, for SDXL's size conditioning

    def __getattr__(self, name):          # sigma_min / sigma_max / ... of the wrapped denoiser
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _area(self, opts: dict, shape) -> tuple[int, int, int, int] | None:
        area = opts.get("area")
        if area is None:
            return None
        h, w, y, x = (int(v) // self.factor for v in area)       # stored in pixels (ConditioningSetArea)
        if (h, w, y, x) == (shape[-2], shape[-1], 0, 0):
            return None
        return (h, w, y, x)

    def _network_kwargs(self, ctx: torch.Tensor, opts: dict, branch: int) -> dict:
        kw = {"context": ctx}
        fam = self.pipe.family
        if fam.adm_inputs:
            pooled = opts.get("pooled_output")
            if pooled is None:
                c = fam.text_encoders[-1].config
                pooled = torch.zeros(1, c.projection_dim or c.width)
            kw["y"] = adm_vector(fam, pooled.to(ctx.device), original_size=self.size, target_size=self.size,
                                 aesthetic_score=AESTHETIC_SCORE_COND if branch == 0 else AESTHETIC_SCORE_UNCOND)
        return kw

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, branch: torch.Tensor, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        out = torch.zeros_like(x)
        count = torch.full_like(x, 1e-37)
        groups: dict = {}
        for k, entries in enumerate(self.branches):
            rows = (branch.reshape(-1).round().long() == k).nonzero().flatten().to(x.device)
            if rows.numel() == 0:
                continue
            for ctx, opts in entries:
                area = self._area(opts, x.shape)
                groups.setdefault(area, []).append((rows, ctx, opts, k))
        for area, jobs in groups.items():
            tokens = math.lcm(*[int(c.shape[1]) for _, c, _, _ in jobs])
            xs, ss, kws, extras, spans = [], [], [], [], []
            for rows, ctx, opts, k in jobs:
                if tokens // ctx.shape[1] > 4:               # ComfyUI does not pad past 4x: run on its own
                    tokens = None
                    break
            for rows, ctx, opts, k in jobs:
                part = x[rows]
                if area is not None:
                    h, w, y, x0 = area
                    part = part[:, :, y:y + h, x0:x0 + w]
                xs.append(part)
                ss.append(sigma[rows])
                c = ctx.to(x.device)
                if tokens is not None and c.shape[1] != tokens:
                    c = c.repeat(1, tokens // c.shape[1], 1)  # repeating the tokens leaves attention unchanged
                kw = self._network_kwargs(c, opts, k)
                kws.append({n: v.expand(len(rows), *v.shape[1:]) for n, v in kw.items()})
                extras.append({n: (v[rows] if area is None else v[rows][:, :, area[2]:area[2] + area[0],
                                                                          area[3]:area[3] + area[1]])
                               for n, v in extra.items() if torch.is_tensor(v)})
                spans.append((rows, opts))
            calls = [list(range(len(xs)))] if tokens is not None else [[i] for i in range(len(xs))]
            for idx in calls:
                pred = self.inner(torch.cat([xs[i] for i in idx]), torch.cat([ss[i] for i in idx]),
                                  **{n: torch.cat([kws[i][n] for i in idx]) for n in kws[idx[0]]},
                                  **{n: torch.cat([extras[i][n] for i in idx]) for n in extras[idx[0]]})
                offset = 0
                for i in idx:
                    rows, opts = spans[i]
                    p = pred[offset:offset + len(rows)]
                    offset += len(rows)
                    if area is None:
                        mult = float(opts.get("strength", 1.0))
                        out[rows] += p * mult
                        count[rows] += mult
                    else:
                        h, w, y, x0 = area
                        m = _feather(area, x.shape, opts.get("strength", 1.0)).to(x)
                        hh, ww = m.shape
                        out[rows, :, y:y + hh, x0:x0 + ww] += p[:, :, :hh, :ww] * m
                        count[rows, :, y:y + hh, x0:x0 + ww] += m
        return out / count


# ------------------------------------------------------------------ KSampler
def comfy_denoiser(pipe):
    """The pipeline's UNet as ComfyUI feeds it: eps or v wrapper over the model's table, integer timesteps."""
    kind = pipe.family.prediction_type
    if kind not in ("eps", "v"):   # a flow (SD3) model would be sampled as eps and silently give noise
        raise ValueError(f"KSampler runs eps and v models; {pipe.name!r} is a {kind!r} model, which workflows "
                         f"do not run yet: use `diffusekit generate` or Pipeline.generate for it")
    wrapper = VDenoiser if kind == "v" else EpsDenoiser
    denoiser = wrapper(UNetAdapter(pipe.unet), pipe.schedule, quantize=True)
    # an LCM file carries its boundary scalings (ComfyUI: the ModelSamplingDiscrete "lcm" node)
    return ConsistencyDenoiser(denoiser) if pipe.family.consistency else denoiser


def _inpaint_concat(pipe, latent_in: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """An inpainting UNet's extra channels: mask (1) + the masked image's latent (ComfyUI concat_cond)."""
    if not pipe.family.is_inpaint:
        return None
    if mask is None:
        return torch.cat([torch.ones_like(latent_in[:, :1]), pipe.encode(
            torch.zeros(latent_in.shape[0], 3, latent_in.shape[2] * pipe.factor, latent_in.shape[3] * pipe.factor))], 1)
    return torch.cat([mask.mean(dim=1, keepdim=True), latent_in], 1)


def ksample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive: list,
            negative: list, latent: dict, *, denoise: float = 1.0, disable_noise: bool = False,
            start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False,
            callback: Callable[[int, int, torch.Tensor, torch.Tensor, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
    """ComfyUI's common_ksampler: returns the new LATENT dict (see the module docstring).
    callback(step, total, x0_estimate, x, sigma) after every step; should_stop() -> True raises `Interrupted`."""
    pipe = model.pipe
    if sampler_name not in SAMPLERS:
        raise ValueError(f"sampler_name={sampler_name!r}; valid: {', '.join(sampler_names())}")
    sampler_id, knobs = SAMPLERS[sampler_name]
    raw = latent["samples"].float().cpu()
    factor = int(latent.get("diffusekit_factor", 8))
    if raw.shape[1] != pipe.latent_channels or factor != pipe.factor:
        if bool((raw == 0).all()):                      # an empty latent made for another latent shape
            size = latent.get("diffusekit_size") or (raw.shape[3] * factor, raw.shape[2] * factor)
            raw = torch.zeros(raw.shape[0], pipe.latent_channels, size[1] // pipe.factor, size[0] // pipe.factor)
        else:
            raise ValueError(f"the latent has {raw.shape[1]} channels at 1/{factor} size but this model samples "
                             f"{pipe.sample_space}: encode the image with this model's VAE")
    latent_in = raw * pipe.scale                          # ComfyUI's process_latent_in
    noise = torch.zeros_like(raw) if disable_noise else prepare_noise(raw, seed, latent.get("batch_index"))
    sigmas = calculate_sigmas(pipe, sampler_name, scheduler, steps, denoise)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return dict(latent)
    if len(sigmas) < 2:
        return dict(latent)
    device = pipe.device
    sigmas = sigmas.to(device)
    latent_in, noise = latent_in.to(device), noise.to(device)
    mask = latent.get("noise_mask")
    mask = prepare_mask(mask.to(device), tuple(latent_in.shape)) if mask is not None else None
    sigma_max = float(pipe.schedule.sigmas[-1].float())
    s0 = float(sigmas[0])
    max_denoise = math.isclose(sigma_max, s0, rel_tol=1e-5) or s0 > sigma_max
    x = latent_in + noise * (math.sqrt(1.0 + s0 * s0) if max_denoise else s0)

    height, width = raw.shape[2] * pipe.factor, raw.shape[3] * pipe.factor
    base = ConditionedDenoiser(comfy_denoiser(pipe), [list(positive), list(negative)], pipe, pipe.factor,
                               (height, width))
    guided = cfg_guidance(base, cfg, {"branch": torch.zeros(1)}, {"branch": torch.ones(1)})
    concat = _inpaint_concat(pipe, latent_in, mask)
    extra = {} if concat is None else {"c_concat": concat}
    total = len(sigmas) - 1

    def denoise_fn(xx, sigma, **_):
        if mask is not None:
            s = torch.as_tensor(sigma, device=xx.device).reshape(-1, 1, 1, 1).to(xx.dtype)
            xx = xx * mask + (latent_in + noise * s) * (1 - mask)
        out = guided(xx, sigma, **extra)
        if mask is not None:
            out = out * mask + latent_in * (1 - mask)
        return out

    def on_step(d):
        if callback is not None:
            callback(d["i"], total, d["denoised"], d["x"], float(d["sigma"]))
        if should_stop is not None and should_stop():
            raise Interrupted(d["denoised"])

    opts = dict(knobs)
    if sampler_id in ANCESTRAL_NOISE:
        # k-diffusion's default_noise_sampler on a CPU: a fresh generator seeded with seed + 1
        opts["generator"] = torch.Generator("cpu").manual_seed(int(seed) + 1)
    elif sampler_id in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        try:
            from ..pipelines.sde_noise import comfyui_noise_sampler
            opts["noise_sampler"] = comfyui_noise_sampler(x, sigmas, int(seed), sampler_id)
        except ImportError:
            log.warning("torchsde is not installed: %s draws diffusekit's own Brownian noise, not ComfyUI's "
                        "(pip install 'diffusekit[sde]')", sampler_name)
            opts["generator"] = torch.Generator("cpu").manual_seed(int(seed))
    with model.applied(), torch.no_grad():
        samples = sampler_registry.SAMPLERS[sampler_id](denoise_fn, x, sigmas, callback=on_step, **opts)
    out = dict(latent)
    out["samples"] = (samples / pipe.scale).cpu()           # process_latent_out
    out["diffusekit_factor"] = pipe.factor
    out.pop("diffusekit_size", None)
    return out

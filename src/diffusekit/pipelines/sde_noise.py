"""Sampler noise as AUTOMATIC1111 and ComfyUI draw it (GenerationParams.sde_noise): the SDE samplers'
Brownian noise, and the churn noise of Euler / Heun / DPM2 (at the end).

The SDE samplers (DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE) take their noise as normalised Brownian
increments z = (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of a path W fixed by a seed. By
default (`sde_noise="diffusekit"`) W comes from our own counter-based virtual Brownian tree
(`diffusekit.core.brownian`), seeded per image: equal in distribution to what A1111 and ComfyUI use,
not equal in values. This module builds their noise source instead and hands it to the sampler through
its `noise_sampler=` argument; the samplers themselves are unchanged.

Both tools use k-diffusion's `BrownianTreeNoiseSampler` (k_diffusion/sampling.py), a wrapper around
`torchsde.BrownianTree` (Li et al. 2020, "Scalable Gradients for Stochastic Differential Equations"):

- time is t = sigma (the identity transform); the tree spans [t0, t1] = [smallest positive sigma of the
  schedule it is given, largest sigma], sorted so that t0 < t1, starting from w0 = zeros;
- given a list of seeds (one per image) it keeps one `torchsde.BrownianTree(t0, w0[0], t1, entropy=seed)`
  of one image's shape per seed and stacks their answers (`BatchedBrownianTree`), so an image's noise
  does not depend on the batch; given one int it keeps one tree over the whole batch tensor;
- a query (sigma, sigma_next) sorts its two times, asks each tree for W(later) - W(earlier) and
  multiplies by -1 when the query ran backwards (sigma > sigma_next, as samplers always ask), then
  divides by sqrt|sigma_next - sigma| computed on the 0-d float32 sigma tensors.
  torchsde draws with `torch.Generator(device).manual_seed(node seed)` on the device of w0 and rounds
  query times to 6 decimals (its tol 1e-6).

Modes and what they reproduce:

"a1111" -- AUTOMATIC1111 v1.6-v1.10 `KDiffusionSampler.create_noise_sampler` (sd_samplers_kdiffusion.py),
  used for every sampler with the `brownian_noise` option (DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE, with any
  schedule) unless the setting `no_dpmpp_sde_batch_determinism` is on: seeds = the batch's image seeds
  `p.all_seeds[p.iteration * batch_size : (p.iteration + 1) * batch_size]` (seed + i; all equal to the
  seed with a variation seed), bounds from the *whole* schedule of the pass (for img2img and the hires
  pass the full schedule of which only the tail is run), trees on the latent's device. One tree set
  serves the whole pass, including the refiner steps (A1111 swaps the model inside one loop).
  Reproduces A1111 whose sampling device is the CPU (`--use-cpu all` or no GPU) together with
  "RNG: CPU" initial noise (what diffusekit draws). On CUDA torchsde draws with CUDA generators: our
  pipeline on CUDA then draws what A1111 on CUDA draws, but A1111 on a GPU cannot be matched from a
  CPU run (nor with `no_dpmpp_sde_batch_determinism`, where k-diffusion seeds one tree randomly).

"comfyui" -- ComfyUI's comfy/k_diffusion/sampling.py samplers `dpmpp_sde`, `dpmpp_2m_sde`,
  `dpmpp_3m_sde`, which build `BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)`:
  one tree for the whole batch seeded with the KSampler's seed (here the batch's first image seed),
  bounds from the sigmas handed to that sampler call (so after a denoise < 1 slice, its own slice; a
  refiner segment gets its own tree), the tree on the CPU whatever the device (so it reproduces on any
  device), answers cast to float32 on the latent's device. The `*_gpu` variants keep the tree on the
  device; on a CPU they draw the same values. In a ComfyUI batch every image shares one tree *and* one
  initial-noise generator, so only batch_size 1 (or the first image of a batch) lines up with a
  diffusekit image, whose initial noise is drawn per image.

DPM++ SDE asks for noise at its intermediate sigma too, and the tools compute their query times in float32
(k-diffusion's t = -log sigma and back): A1111's k-diffusion asks at (exp(-t_i), exp(-(t_i + h/2))) and
(exp(-t_i), exp(-t_i+1)), h = t_i+1 - t_i; ComfyUI (since its half-log-SNR rewrite of the DPM++ samplers,
2025, e.g. 0.3.64) at (sigma_i, exp(-(t_i + h/2))) and (sigma_i, sigma_i+1). torchsde rounds times to 6
decimals, so an ulp matters (at sigma_max exp(-t) = 14.614640 where sigma = 14.614641); `DpmppSdeTimes`
maps our sampler's float64 queries onto the tool's float32 times. The other SDE samplers ask at the
schedule's own sigmas in both tools.

Churn noise (Euler, Heun, DPM2 with s_churn > 0). k-diffusion's sample_euler / heun / dpm_2, which A1111
runs, draw randn_like on every step and use it only on the steps that churn; A1111 routes randn_like to
the image's generator (its CPU RNG). So in "a1111" mode those samplers get a `noise_sampler` drawing from
the per-image generators on every step (a step outside [s_tmin, s_tmax] spends a draw), and a churn window
gives A1111's image. ComfyUI's own sample_euler / heun / dpm_2 draw only on the steps that churn, as our
default does, so "comfyui" and "diffusekit" leave them alone.

What stays different (images then agree to float rounding, not bit for bit): our samplers compute their
step coefficients in float64 where the tools use float32 tensors; equal sigma schedules are assumed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.samplers.common import fresh_noise
from .params import SDE_NOISE_MODES

# the samplers whose default noise source is a Brownian tree (core.samplers.stochastic)
BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"})
# the samplers with Karras churn (s_churn, s_tmin, s_tmax; core.samplers.deterministic)
CHURN_SAMPLERS = frozenset({"euler", "heun", "dpm_2"})

NoiseSampler = Callable[[float, float], torch.Tensor]
_TORCHSDE_DIGITS = 6   # torchsde rounds a tree's ends to -log10(tol) decimals, tol = 1e-6 by default


class TorchsdeMissingError(ImportError, RuntimeError):
    """torchsde is not installed but a mode that needs it was asked for (a RuntimeError too, so the CLI
    prints it as one line)."""


def require_torchsde(mode: str | None = None):
    """The torchsde module, or TorchsdeMissingError saying how to install it."""
    try:
        import torchsde
    except ImportError:
        asked = f"sde_noise={mode!r}" if mode else "sde_noise='a1111' or 'comfyui'"
        raise TorchsdeMissingError(
            f"{asked} draws the SDE samplers' noise with torchsde's Brownian tree (as k-diffusion, A1111 and "
            f"ComfyUI do), which is not installed: pip install torchsde (or pip install 'diffusekit[sde]'), "
            f"or use sde_noise='diffusekit'", name="torchsde") from None
    return torchsde


class DpmppSdeTimes:
    """The times at which A1111's or ComfyUI's DPM++ SDE queries its Brownian tree, for the queries of ours.

    Our sample_dpmpp_sde asks at (sigma_i, sigma_mid) then (sigma_i, sigma_i+1), with sigma_mid computed in
    float64; the tools compute in float32 0-d tensors (module docstring). Called with one of our queries it
    returns the tool's pair (as Python floats holding float32 values); any other query passes unchanged.
    schedule: the sigmas whose consecutive pairs are the steps; convention: "a1111" or "comfyui"; r: the
    intermediate point's fraction of the step in log sigma (1/2, the tools' default and ours).
    """

    def __init__(self, schedule: torch.Tensor, convention: str, *, r: float = 0.5, device=None):
        if convention not in ("a1111", "comfyui"):
            raise ValueError(f"convention={convention!r}: valid are 'a1111' and 'comfyui'")
        sig = schedule.detach().to(device or schedule.device, torch.float32)
        self.steps: dict[float, tuple[float, float, float, float]] = {}   # sigma_i -> (next, start, mid, end)
        for i in range(len(sig) - 1):
            s, s_next = sig[i], sig[i + 1]            # 0-d tensors, as k-diffusion indexes its sigmas
            if not s_next > 0:
                continue                              # the step to 0 draws no noise
            t, t_next = s.log().neg(), s_next.log().neg()
            h = t_next - t
            mid = (t + h * r).neg().exp()
            start, end = (t.neg().exp(), t_next.neg().exp()) if convention == "a1111" else (s, s_next)
            self.steps.setdefault(float(s), (float(s_next), float(start), float(mid), float(end)))

    def __call__(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        step = self.steps.get(float(sigma))
        if step is None:
            return sigma, sigma_next
        s_next, start, mid, end = step
        if sigma_next == s_next:
            return start, end
        if s_next < sigma_next < sigma:               # our intermediate point of this step
            return start, mid
        return sigma, sigma_next


class TorchsdeBrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler over torchsde.BrownianTree: a noise sampler
    `(sigma, sigma_next) -> standard normal tensor shaped like x`, see the module docstring.

    like: the latent (shape, dtype, device); seeds: a list with one seed per batch row (one tree per image)
    or a single int (one tree over the batch); tree_device: where the trees live and draw (None: like's
    device, as A1111; "cpu" for ComfyUI's cpu=True, whose answers are then cast to float32 on like's device);
    times: maps a query (sigma, sigma_next) to the times the tool asks at (DpmppSdeTimes; None = as given).
    """

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seeds: int | Sequence[int], *,
                 tree_device: str | torch.device | None = None,
                 times: Callable[[float, float], tuple[float, float]] | None = None):
        torchsde = require_torchsde()
        self.device = like.device
        self.times = times
        self.cpu_tree = tree_device is not None
        tree_device = like.device if tree_device is None else torch.device(tree_device)
        t0, t1 = self._time(sigma_min), self._time(sigma_max)
        self.sign = 1 if float(t0) < float(t1) else -1                  # k-diffusion's sort: a < b keeps the order
        lo, hi = (t0, t1) if self.sign == 1 else (t1, t0)
        self.per_image = not isinstance(seeds, int)
        if self.per_image:
            seeds = [int(s) for s in seeds]
            if len(seeds) != like.shape[0]:
                raise ValueError(f"{len(seeds)} seeds for a batch of {like.shape[0]}: give one seed per image "
                                 f"or a single int for one tree over the batch")
        else:
            seeds = [int(seeds)]
        shape = like.shape[1:] if self.per_image else like.shape    # (C, h, w) per image, or (B, C, h, w)
        w0 = torch.zeros(shape, dtype=like.dtype, device=tree_device)
        self.trees = [torchsde.BrownianTree(float(lo), w0, float(hi), entropy=s) for s in seeds]
        # the ends as torchsde stores them: a query beyond them is clamped to them (torchsde warns, e.g. at
        # sigma_max = 14.614641189575195 > 14.614641; ComfyUI #4645); clamping here gives the same values quietly
        self.ends = (round(float(lo), _TORCHSDE_DIGITS), round(float(hi), _TORCHSDE_DIGITS))

    def _time(self, sigma: float) -> torch.Tensor:
        """sigma as k-diffusion holds it: a 0-d float32 tensor on the latent's device (t = sigma)."""
        return torch.tensor(float(sigma), dtype=torch.float32, device=self.device)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        if self.times is not None:
            sigma, sigma_next = self.times(sigma, sigma_next)
        t0, t1 = self._time(sigma), self._time(sigma_next)
        a, b, sign = (t0, t1, 1) if float(t0) < float(t1) else (t1, t0, -1)
        lo, hi = self.ends
        ta, tb = min(max(float(a), lo), hi), min(max(float(b), lo), hi)   # torchsde takes float(t) either way
        if self.cpu_tree:
            parts = [tree(ta, tb).to(torch.float32).to(self.device) for tree in self.trees]
        else:
            parts = [tree(ta, tb) for tree in self.trees]
        w = torch.stack(parts) * (self.sign * sign)                 # (B, C, h, w) or (1, B, C, h, w)
        w = w if self.per_image else w[0]
        return w / (t1 - t0).abs().sqrt()


def _bounds(sigmas: torch.Tensor) -> tuple[float, float]:
    """(smallest positive sigma, largest sigma) of a schedule, as float32 values (k-diffusion's
    `sigmas[sigmas > 0].min(), sigmas.max()` on a float32 schedule)."""
    s = sigmas.detach().to("cpu", torch.float32)
    return float(s[s > 0].min()), float(s.max())


def a1111_noise_sampler(x: torch.Tensor, schedule: torch.Tensor, seeds: Sequence[int],
                        sampler_id: str = "dpmpp_2m_sde", *, r: float = 0.5) -> TorchsdeBrownianNoise:
    """A1111's create_noise_sampler: one tree per image seed on x's device, over the pass's whole schedule
    (whose consecutive pairs include every step run). r: DPM++ SDE's intermediate point (its `r` knob)."""
    lo, hi = _bounds(schedule)
    times = DpmppSdeTimes(schedule, "a1111", r=r, device=x.device) if sampler_id == "dpmpp_sde" else None
    return TorchsdeBrownianNoise(x, lo, hi, list(seeds), times=times)


def comfyui_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, seed: int,
                          sampler_id: str = "dpmpp_2m_sde", *, r: float = 0.5) -> TorchsdeBrownianNoise:
    """ComfyUI's dpmpp_*sde: one CPU tree over the batch, seeded with the sampler seed, over the call's sigmas.
    r: DPM++ SDE's intermediate point (its `r` knob)."""
    lo, hi = _bounds(sigmas)
    times = DpmppSdeTimes(sigmas, "comfyui", r=r, device=x.device) if sampler_id == "dpmpp_sde" else None
    return TorchsdeBrownianNoise(x, lo, hi, int(seed), tree_device="cpu", times=times)


def changes_image(mode: str, sampler_id: str, s_churn: float = 0.0) -> bool:
    """Whether `mode` draws other noise than the "diffusekit" default for this sampler (the infotext's
    "SDE noise" field is written only then)."""
    if mode == "diffusekit":
        return False
    return sampler_id in BROWNIAN_SAMPLERS or (mode == "a1111" and sampler_id in CHURN_SAMPLERS and s_churn > 0)


def pass_noise(mode: str, sampler_id: str, x: torch.Tensor, schedule: torch.Tensor,
               seeds: Sequence[int], generators=None, *, r: float = 0.5
               ) -> Callable[[torch.Tensor], NoiseSampler | None]:
    """For one sampling pass (txt2img, img2img or hires, with its refiner hand-over): a function
    `segment_sigmas -> noise_sampler` for each sampler call of the pass; None = the sampler's own noise
    (the "diffusekit" mode, and every sampler whose noise the mode leaves alone).

    x: the pass's starting latent (B, C, h, w); schedule: the pass's whole schedule (A1111 bounds its tree
    by it); seeds: the batch's image seeds (A1111: one tree each; ComfyUI: the first seeds the batch tree);
    generators: the pass's per-image generators (A1111's churn noise continues them); r: DPM++ SDE's r.
    """
    if mode not in SDE_NOISE_MODES:
        raise ValueError(f"sde_noise={mode!r}: valid are {', '.join(repr(m) for m in SDE_NOISE_MODES)}")
    if mode == "a1111" and sampler_id in CHURN_SAMPLERS:
        if generators is None:
            raise ValueError(f"sde_noise='a1111' with {sampler_id!r} draws the churn noise from the pass's "
                             f"per-image generators: pass them as `generators`")
        every_step = fresh_noise(x, generators)      # k-diffusion's randn_like on every step, from A1111's RNG
        return lambda segment: every_step
    if mode == "diffusekit" or sampler_id not in BROWNIAN_SAMPLERS:
        return lambda segment: None
    if mode == "a1111":
        shared = a1111_noise_sampler(x, schedule, seeds, sampler_id, r=r)   # one tree set for the pass, refiner included
        return lambda segment: shared
    return lambda segment: comfyui_noise_sampler(x, segment, seeds[0], sampler_id, r=r)

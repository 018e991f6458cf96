"""Parameterization wrappers: a network `model(x_in, t, **cond)` becomes a denoiser D(x, sigma) -> x0.

Section 5 and Table 1 of Karras et al. 2022 ("Elucidating the Design Space..."):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

with x = x0 + sigma * eps (variance-exploding view) for every wrapper except `FlowDenoiser`, whose
x = (1 - sigma) x0 + sigma eps with sigma in [0, 1] (rectified flow, SD3). The samplers only ever
see D, so they never branch on the prediction type. What a sampler that re-injects noise must know is
the data convention, not the prediction: `noise_form` is "ve" (x = x0 + sigma eps) for every wrapper
but `FlowDenoiser` ("flow"); the registry runs noise-drawing samplers on a flow denoiser in the
equivalent VE variable (`core.samplers.flow`).

A discrete 1000-step model (`schedule` given) is fed c_noise = its fractional timestep, found by
log-sigma interpolation (k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser), or with
`quantize=True` the nearest integer timestep in log sigma (k-diffusion's `quantize` option; what
ComfyUI's ModelSamplingDiscrete.timestep feeds its UNet). Without a
schedule the eps / v / x0 wrappers are continuous with c_noise = log(sigma) / 4 (EDM; k-diffusion's
Denoiser, diffusers' `timestep_type="continuous"`).

`data_range=(lo, hi)` clips the x0 estimate to the range the data lives in: the `clip_denoised` of Ho
et al. 2020's sampler (diffusers' `clip_sample`), for pixel-space models. An eps network's x0 error is
sigma times its eps error, and sigma_max is 157 on the DDPM linear schedule: an unclipped estimate
there is +-15 on data in [-1, 1].
"""
from __future__ import annotations

import math

import torch

from .schedules import DiscreteSchedule, FlowSchedule

# default range of continuous (schedule-less) models: EDM's (Karras et al. 2022, Table 1)
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) float tensor on x's device: a scalar or a 1-element tensor is broadcast."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    if sigma.numel() == 1:
        return sigma.reshape(1).expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},) for a batch of "
                         f"{x.shape[0]}, got {tuple(sigma.shape)}")
    return sigma


def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in x's dtype."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(torch.nn.Module):
    """Base wrapper: subclasses give `scalings(sigma) -> (c_skip, c_out, c_in)` and `c_noise(sigma)`."""

    prediction: str = ""
    noise_form: str = "ve"      # the data convention x = x0 + sigma * eps (see FlowDenoiser for "flow")

    def __init__(self, model, schedule: DiscreteSchedule | None = None, *,
                 sigma_min: float | None = None, sigma_max: float | None = None, quantize: bool = False,
                 data_range: tuple[float, float] | None = None):
        super().__init__()
        if quantize and schedule is None:
            raise ValueError("quantize=True rounds to the nearest training timestep: it needs a discrete schedule")
        self.inner_model = model
        self.schedule = schedule
        self.quantize = bool(quantize)
        self._sigma_min = sigma_min
        self._sigma_max = sigma_max
        if data_range is not None and not data_range[0] < data_range[1]:
            raise ValueError(f"data_range={data_range!r}: must be (low, high) with low < high")
        self.data_range = data_range

    @property
    def sigma_min(self) -> float:
        if self._sigma_min is not None:
            return float(self._sigma_min)
        return self.schedule.sigma_min if self.schedule is not None else EDM_SIGMA_MIN

    @property
    def sigma_max(self) -> float:
        if self._sigma_max is not None:
            return float(self._sigma_max)
        return self.schedule.sigma_max if self.schedule is not None else EDM_SIGMA_MAX

    def scalings(self, sigma: torch.Tensor):
        raise NotImplementedError

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """The network's time input c_noise for sigma."""
        sigma = torch.as_tensor(sigma)
        if self.schedule is not None:
            t = self.schedule.sigma_to_t(sigma)
            # log-linear interpolation makes t - floor(t) the fraction of the log-sigma gap, so rounding it
            # picks the neighbour nearest in log sigma (ties, a measure-zero case, go up)
            return torch.floor(t + 0.5) if self.quantize else t
        return sigma.log() / 4

    def t_to_sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        if self.schedule is not None:
            return self.schedule.t_to_sigma(t)
        return (4 * t).exp()

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """The noisy input at level sigma for this parameterization: latent + sigma * noise."""
        sigma = _expand(_batch_sigma(sigma, noise), noise)
        return sigma * noise if latent is None else latent + sigma * noise

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x)                                   # (B,)
        c_skip, c_out, c_in = (_expand(c, x) for c in self.scalings(sigma))
        out = self.inner_model(x * c_in, self.sigma_to_t(sigma), **cond)
        x0 = c_skip * x + c_out * out
        return x0 if self.data_range is None else x0.clamp(*self.data_range)

    def extra_repr(self) -> str:
        kind = "discrete" if self.schedule is not None else "continuous"
        clip = "" if self.data_range is None else f", data_range={tuple(self.data_range)}"
        return (f"prediction={self.prediction!r}, {kind}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g}{clip}")


class EpsDenoiser(Denoiser):
    """The network predicts the noise eps from x_t = x / sqrt(sigma^2 + 1) (DDPM, SD 1.x/2-base/XL).

    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1).
    """

    prediction = "eps"

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, (sigma ** 2 + 1).rsqrt()


class VDenoiser(Denoiser):
    """The network predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022; SD 2.x 768-v).

    c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1)
    (Karras et al. Table 1 with sigma_data = 1).
    """

    prediction = "v"

    def scalings(self, sigma):
        s2 = sigma ** 2 + 1
        return 1 / s2, -sigma * s2.rsqrt(), s2.rsqrt()


class X0Denoiser(Denoiser):
    """The network predicts x0 directly from x_t = x / sqrt(sigma^2 + 1): c_skip = 0, c_out = 1."""

    prediction = "x0"

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), (sigma ** 2 + 1).rsqrt()


class EDMDenoiser(Denoiser):
    """Karras et al. 2022 preconditioning (Table 1, "Ours"), continuous, c_noise = log(sigma) / 4.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2).
    """

    prediction = "edm"

    def __init__(self, model, sigma_data: float = 0.5, *, sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX):
        super().__init__(model, None, sigma_min=sigma_min, sigma_max=sigma_max)
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        total = sigma ** 2 + sd2
        return sd2 / total, sigma * self.sigma_data * total.rsqrt(), total.rsqrt()


class FlowDenoiser(Denoiser):
    """Rectified flow (SD3, Esser et al. 2024): x = (1 - s) x0 + s eps, the network predicts v = eps - x0.

    D(x, s) = x - s * v: c_skip = 1, c_out = -s, c_in = 1, c_noise = s * multiplier. The sigmas of a
    flow model live in [0, 1] and already carry the time shift (see `flow_sigmas`); txt2img starts from
    pure noise at s = 1 and img2img from `noise_scaling(s, noise, latent)` = (1 - s) latent + s noise.
    """

    prediction = "flow"
    noise_form = "flow"         # x = (1 - sigma) x0 + sigma eps

    def __init__(self, model, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        # the time conversions are the schedule's (sigma_to_t = s * multiplier, t_to_sigma = the shifted
        # table at t), so the wrapper and its schedule never disagree
        super().__init__(model, FlowSchedule(shift, timesteps, multiplier))
        self.shift, self.multiplier = self.schedule.shift, self.schedule.multiplier   # read-only copies

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, torch.ones_like(sigma)

    def noise_scaling(self, sigma, noise, latent=None):
        sigma = _expand(_batch_sigma(sigma, noise), noise)
        return sigma * noise if latent is None else (1 - sigma) * latent + sigma * noise


def flow_sigmas(steps: int, shift: float = 1.0, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The rectified-flow schedule: s_i = shift * u / (1 + (shift - 1) u) at u = 1 - i/steps, i = 0..steps.

    Descending from 1 to 0; equal to ComfyUI's "simple" schedule on a flow model when steps divides
    1000. diffusers' FlowMatchEulerDiscreteScheduler differs: it spaces `steps` points evenly from 1
    down to shift(1/1000), shifts them (again), then appends 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if shift <= 0 or not math.isfinite(shift):
        raise ValueError(f"shift must be a positive number, got {shift}")
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).to(dtype=dtype, device=device)

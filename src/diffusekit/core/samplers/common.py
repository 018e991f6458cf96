"""What every sampler loop shares: the schedule as float64 scalars, the denoiser's (batch,) sigma, the
per-step report, the ancestral split of a step and the default per-step noise.

Imported by deterministic.py, stochastic.py and dpm_solver.py, so each sampler there stays one loop.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import noise as _noise

NoiseSampler = Callable[[float, float], torch.Tensor]   # (sigma, sigma_next) -> standard normal like x


def setup(x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None
          ) -> tuple[dict, list[float], Callable[[float], torch.Tensor]]:
    """(extra_args dict, sigmas as float64 Python floats, function making the denoiser's (B,) sigma tensor).

    Step coefficients are computed from these floats, so they are float64 whatever the latent's dtype; the
    denoiser's sigma is at least float32 even for a half-precision latent.
    """
    values = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    dtype = torch.promote_types(torch.promote_types(x.dtype, sigmas.dtype), torch.float32)

    def batch(s: float) -> torch.Tensor:
        return torch.full((x.shape[0],), s, dtype=dtype, device=x.device)

    return ({} if extra_args is None else extra_args), values, batch


def report(callback, i: int, x: torch.Tensor, sigma: float, sigma_hat: float, denoised: torch.Tensor) -> None:
    """callback(dict(i, x, sigma, sigma_hat, denoised)) with sigma / sigma_hat as Python floats."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step sigma -> sigma_next into a deterministic move to
    sigma_down plus fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    eta = 1 is the DDPM posterior variance sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
    (Ho et al. 2020 in the variance-exploding view; k-diffusion's get_ancestral_step); eta = 0 is
    deterministic.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def fresh_noise(x: torch.Tensor, generator) -> NoiseSampler:
    """Per-call Gaussian noise shaped like x from the per-image generators (`diffusekit.core.noise`)."""
    return lambda sigma, sigma_next: _noise.randn_like(x, generator)


def check_eta(eta: float, s_noise: float) -> None:
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")

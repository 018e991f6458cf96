"""The sampler registry: canonical ids (k-diffusion / ComfyUI) and the display names people know (A1111).

Every sampler has one signature (docs/architecture.md, "The sampling contract"):

    sample_x(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **knobs) -> x

`x` is the starting latent already scaled to sigmas[0] (noise * sigmas[0] for txt2img), `sigmas` a
descending 1-D schedule (normally ending in 0), `denoiser(x, sigma, **extra_args)` returns the x0
estimate, `callback(dict(i, x, sigma, sigma_hat, denoised))` is called once per step, and `generator` is
a CPU torch.Generator or a list with one per image (see `diffusekit.core.noise`). The functions in
`SAMPLERS` validate their inputs first (non-descending sigmas, NaN in the latent, unknown knobs).

Flow models (a denoiser with `noise_form == "flow"`, x = (1 - s) x0 + s eps): ODE samplers run on the
flow sigmas as they are; a sampler that draws noise (a stochastic one, or s_churn / eta > 0) runs in
the equivalent VE variable y = x / (1 - s), sigma = s / (1 - s), where its noise re-injection is exact
(`samplers.flow`). The sampler functions themselves stay VE-only and never look at the denoiser.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .. import sigmas as _sigmas
from . import deterministic, dpm_solver, flow, stochastic


@dataclass(frozen=True)
class SamplerInfo:
    id: str
    label: str                # the A1111 display name
    nfe_per_step: int         # model evaluations per step (first step of multistep methods aside)
    stochastic: bool
    default_schedule: str     # what A1111's "Automatic" schedule picks for it


# (id, A1111 label, model evaluations per step, stochastic, A1111 "Automatic" schedule)
_TABLE = [
    ("euler", "Euler", 1, False, "uniform"),
    ("euler_ancestral", "Euler a", 1, True, "uniform"),
    ("heun", "Heun", 2, False, "uniform"),
    ("dpm_2", "DPM2", 2, False, "karras"),
    ("dpm_2_ancestral", "DPM2 a", 2, True, "karras"),
    ("lms", "LMS", 1, False, "uniform"),
    ("dpmpp_2s_ancestral", "DPM++ 2S a", 2, True, "karras"),
    ("dpmpp_sde", "DPM++ SDE", 2, True, "karras"),
    ("dpmpp_2m", "DPM++ 2M", 1, False, "karras"),
    ("dpmpp_2m_sde", "DPM++ 2M SDE", 1, True, "exponential"),
    ("dpmpp_3m_sde", "DPM++ 3M SDE", 1, True, "exponential"),
    ("dpm_fast", "DPM fast", 1, False, "uniform"),          # len(sigmas) - 1 = the NFE budget
    ("dpm_adaptive", "DPM adaptive", 3, False, "uniform"),  # per attempt; rtol/atol set the work, not steps
    ("ddim", "DDIM", 1, False, "uniform"),
    ("ddpm", "DDPM", 1, True, "uniform"),
    ("uni_pc", "UniPC", 1, False, "uniform"),
    ("uni_pc_bh2", "UniPC BH2", 1, False, "uniform"),
    ("lcm", "LCM", 1, True, "uniform"),
    ("restart", "Restart", 2, True, "karras"),
    ("euler_flow", "Euler (flow)", 1, False, "simple"),
]

_FUNCS: dict[str, Callable] = {**deterministic.SAMPLERS, **stochastic.SAMPLERS, **dpm_solver.SAMPLERS}

INFO: dict[str, SamplerInfo] = {
    sid: SamplerInfo(sid, label, nfe, sto, sched) for sid, label, nfe, sto, sched in _TABLE if sid in _FUNCS
}
DISPLAY_NAMES: dict[str, str] = {info.label: sid for sid, info in INFO.items()}


_NOISE_KNOBS = ("s_churn", "eta")   # knobs that make an ODE sampler inject noise when > 0


def _draws_noise(sid: str, kwargs: dict) -> bool:
    """Whether this call re-injects noise: a stochastic sampler, or an ODE one with churn / eta on."""
    return INFO[sid].stochastic or any(float(kwargs.get(k) or 0) > 0 for k in _NOISE_KNOBS)


def _validated(fn: Callable, sid: str) -> Callable:
    """Check the inputs every sampler shares, so each one stays a plain loop."""
    knobs = {name for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}

    @functools.wraps(fn)
    def run(denoiser, x, sigmas, **kwargs):
        unknown = set(kwargs) - knobs
        if unknown:
            raise TypeError(f"sampler {sid!r} got unknown option(s) {sorted(unknown)}; it accepts {sorted(knobs)}")
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if not torch.isfinite(x).all():
            raise ValueError("the latent x contains NaN or inf: check the initial noise and the model's dtype")
        _sigmas.check_sigmas(sigmas)
        if getattr(denoiser, "noise_form", "ve") == "flow" and _draws_noise(sid, kwargs):
            return flow.sample_in_ve(fn, denoiser, x, sigmas, **kwargs)
        return fn(denoiser, x, sigmas, **kwargs)

    return run


SAMPLERS: dict[str, Callable] = {sid: _validated(_FUNCS[sid], sid) for sid in INFO}


def resolve(name: str) -> str:
    """Canonical sampler id for an id or an A1111 display name (case-insensitive)."""
    if name in SAMPLERS:
        return name
    lowered = {k.lower(): v for k, v in DISPLAY_NAMES.items()} | {k.lower(): k for k in SAMPLERS}
    key = str(name).strip().lower()
    if key in lowered:
        return lowered[key]
    raise ValueError(f"unknown sampler {name!r}; valid ids: {', '.join(SAMPLERS)}; "
                     f"display names: {', '.join(DISPLAY_NAMES)}")


def get(name: str) -> Callable:
    """The validated sampler function for an id or display name."""
    return SAMPLERS[resolve(name)]

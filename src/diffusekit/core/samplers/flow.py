"""Noise-drawing samplers on rectified-flow models, through the exact change of variables to VE data.

A flow model's data are x = (1 - s) x0 + s eps with s in [0, 1] (Liu et al. 2022; Esser et al. 2024,
SD3). Dividing by the signal scale 1 - s,

    y = x / (1 - s) = x0 + sigma eps,    sigma = s / (1 - s)    (and back: s = sigma / (1 + sigma)),

gives exactly the variance-exploding data of the sampling contract: the same x0 and eps, the noise
level sigma, and the denoiser D_ve(y, sigma) = D_flow(y / (1 + sigma), sigma / (1 + sigma)). The map is
deterministic per noise level, so the whole law of the forward process carries over (marginals, the
DDPM posterior between two levels, the reverse-time SDE), and every ancestral or SDE step written for
VE data is right for the flow model when taken on (y, sigma) and mapped back, x = y / (1 + sigma).
`sample_in_ve` does that around any registry sampler; the registry routes a sampler here when the
denoiser says `noise_form == "flow"` and the sampler draws noise.

In the flow variables this is what the rectified-flow forms in use compute:
- DPM++ SDE / 2M SDE / 3M SDE: lambda = -log sigma = log((1 - s) / s), the half log-SNR of ComfyUI's
  `sigma_to_half_log_snr` for CONST (flow) models, with the data term scaled by alpha_t = 1 - s_t
  (ComfyUI comfy/k_diffusion/sampling.py, sample_dpmpp_2m_sde / _3m_sde / _sde): the same steps, to
  rounding (tests/core/test_samplers_flow.py re-derives ComfyUI's 2M SDE step and compares).
- Euler ancestral: ComfyUI's sample_euler_ancestral_RF moves deterministically to s_down, rescales the
  signal by (1 - s_next) / (1 - s_down) and adds noise of std sqrt(s_next^2 - s_down^2 (1 - s_next)^2 /
  (1 - s_down)^2): in y that is the VE ancestral step with sigma_down = s_down / (1 - s_down). It picks
  s_down = s_next (1 + (s_next / s - 1) eta); ours (eta = 1) is the DDPM posterior of the flow chain,
  a different split of the same reverse process.
- LCM: y = D + sigma z  <=>  x = (1 - s) D + s z (ComfyUI's `noise_scaling` for flow models).

The naive alternative, VE steps on the raw flow (x, s), adds noise of the right std but never
rescales the signal: after a step x carries (1 - s_down) x0 at a level labelled s_next > s_down, too
much signal for its noise, and the error compounds (over-saturated, "burnt" SD3 images; ComfyUI's
sample_ddpm still does this on flow models). The tests show the bias on the exact mixture world.

Pure noise, s = 1, is sigma = inf. As ComfyUI does (offset_first_sigma_for_snr: percent_to_sigma(1e-4)),
a first level s >= 1 is moved to shift(1 - FIRST_LEVEL_OFFSET) with the denoiser's time shift (SD3,
shift 3: s = 0.99997, sigma = 3.3e4); the pure-noise latent then stands for the latent at that level,
which differs from it by 3e-5 (x0 - eps).

ODE samplers are not routed here: the flow ODE dx/ds = E[eps - x0 | x] = (x - D_flow(x, s)) / s has
exactly the VE ODE's form, so they integrate it on the flow sigmas as they are (what ComfyUI and
diffusers' FlowMatchEulerDiscreteScheduler do); their steps differ from the VE-variable ones only
beyond first order (first-order steps coincide: both are exact for a constant D).
"""
from __future__ import annotations

import torch

from ..schedules import flow_shift

FIRST_LEVEL_OFFSET = 1e-4


def to_ve_sigma(s):
    """Flow level s in [0, 1) -> VE sigma = s / (1 - s)."""
    return s / (1 - s)


def to_flow_sigma(sigma):
    """VE sigma >= 0 -> flow level s = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


class VEView:
    """A flow denoiser seen as a VE one: D_ve(y, sigma) = D_flow(y / (1 + sigma), sigma / (1 + sigma)).

    Attribute look-ups (sigma_min, prediction, ...) go to the flow denoiser; noise_form is "ve"."""

    noise_form = "ve"

    def __init__(self, flow_denoiser):
        self.flow = flow_denoiser

    def __getattr__(self, name):
        if name == "flow":   # not yet set (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.flow, name)

    def __call__(self, y: torch.Tensor, sigma, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=y.device)                       # (B,)
        scale = (1 + sigma).to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))    # (B, 1, ..., 1)
        return self.flow(y / scale, to_flow_sigma(sigma), **extra)


def ve_sigmas(sigmas: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """A flow schedule (descending in [0, 1]) as VE sigmas; a first level >= 1 becomes shift(1 - 1e-4) first."""
    s = sigmas.detach().to(torch.float64).clone()
    if s[0] >= 1:
        s[0] = flow_shift(1 - FIRST_LEVEL_OFFSET, shift)
        if s.numel() > 1 and s[1] >= s[0]:
            raise ValueError(f"flow sigmas {float(sigmas[0]):.6g}, {float(sigmas[1]):.6g}: the second level must "
                             f"lie below {float(s[0]):.6g} for a sampler that draws noise")
    return to_ve_sigma(s).to(sigmas.dtype if sigmas.is_floating_point() else torch.float32)


def sample_in_ve(fn, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None, noise_sampler=None,
                 **kwargs) -> torch.Tensor:
    """Run sampler `fn` on a flow denoiser in the VE variable (module docstring); in and out in flow terms.

    x is the flow latent at sigmas[0]. The callback sees flow latents and levels (x = y / (1 + sigma),
    s = sigma / (1 + sigma)); a given noise_sampler(sigma, sigma_next) is called with flow levels too.
    """
    sig_ve = ve_sigmas(sigmas, float(getattr(denoiser, "shift", 1.0))).to(sigmas.device)
    first = float(sig_ve[0])
    y = x * (1 + first)                        # x / (1 - s0)

    def as_flow(info: dict) -> dict:
        out = dict(info)
        s = float(info["sigma"])
        out["x"] = info["x"] / (1 + s)
        out["sigma"] = to_flow_sigma(s)
        if "sigma_hat" in info:
            out["sigma_hat"] = to_flow_sigma(float(info["sigma_hat"]))
        return out

    flow_cb = None if callback is None else (lambda info: callback(as_flow(info)))
    if noise_sampler is not None:
        given = noise_sampler
        noise_sampler = lambda a, b: given(to_flow_sigma(float(a)), to_flow_sigma(float(b)))   # noqa: E731
        kwargs["noise_sampler"] = noise_sampler
    out = fn(VEView(denoiser), y, sig_ve, callback=flow_cb, **kwargs)
    return out / (1 + float(sig_ve[-1]))

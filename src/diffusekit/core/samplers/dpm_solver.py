"""DPM-Solver with a fixed budget of model evaluations, and with adaptive steps.

Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
Steps" (arXiv:2206.00927), in the form of k-diffusion's sample_dpm_fast / sample_dpm_adaptive, which
A1111 calls "DPM fast" / "DPM adaptive" and ComfyUI dpm_fast / dpm_adaptive. Signature as in the
sampling contract (`samplers/__init__.py`).

The solver integrates the probability-flow ODE in lambda = -log sigma (the paper's half-log-SNR in the
variance-exploding view, alpha = 1) on the noise prediction eps = (x - D(x, sigma)) / sigma. From lambda
to lambda + h, with sigma' = e^-(lambda + h) and s_k = lambda + r_k h:

    DPM-Solver-1  x' = x - sigma' (e^h - 1) eps                                       (= DDIM)
    DPM-Solver-2  u1 = x - sigma_s1 (e^{r1 h} - 1) eps,
                  x' = x - sigma' (e^h - 1) eps - sigma' / (2 r1) (e^h - 1) (eps(u1) - eps)   (Algorithm 1)
    DPM-Solver-3  u1 as above with r1 = 1/3; r2 = 2/3,
                  u2 = x - sigma_s2 (e^{r2 h} - 1) eps - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps(u1) - eps),
                  x' = x - sigma' (e^h - 1) eps - sigma' / r2 ((e^h - 1) / h - 1) (eps(u2) - eps)    (Algorithm 2)

Both samplers read the schedule only for its ends, as A1111 and ComfyUI call them: they integrate from
sigmas[0] down to the smallest positive sigma and return the latent there, without a final denoise (with
the model's schedule that is its sigma_min, 0.0292 for SD, whose noise the VAE decodes unseen). With
eta > 0 each step solves to sigma_down and adds noise of std sigma_up (k-diffusion's ancestral variant).
"""
from __future__ import annotations

import math

import torch

from .common import ancestral_step, check_eta, fresh_noise, report, setup


def _ends(sig: list[float]) -> tuple[float, float]:
    """(lambda at sigmas[0], lambda at the smallest positive sigma): what k-diffusion's callers pass."""
    return -math.log(sig[0]), -math.log(min(s for s in sig if s > 0))


def _eps_at(denoiser, batch, extra_args):
    """eps(x, lambda) = (x - D(x, sigma)) / sigma at sigma = e^-lambda: one model evaluation."""
    def eps(x, lam):
        sigma = math.exp(-lam)
        return (x - denoiser(x, batch(sigma), **extra_args)) / sigma
    return eps


def _dpm_solver_step(eps_at, x, lam: float, lam_next: float, eps, order: int):
    """(x at lam_next by DPM-Solver-`order`, the embedded lower-order solution) from x at lam with its eps.

    Order 1 returns DPM-Solver-1 twice; order 2 (r1 = 1/2) embeds DPM-Solver-1; order 3 (r1 = 1/3,
    r2 = 2/3) embeds DPM-Solver-2 at r1 = 1/3, which shares its first stage: k-diffusion's pairs for the
    adaptive error estimate. Costs order - 1 model evaluations."""
    h = lam_next - lam
    sigma_next = math.exp(-lam_next)
    first = x - (sigma_next * math.expm1(h)) * eps
    if order == 1:
        return first, first
    r1 = 0.5 if order == 2 else 1 / 3
    s1 = lam + r1 * h
    d1 = eps_at(x - (math.exp(-s1) * math.expm1(r1 * h)) * eps, s1) - eps
    second = first - (sigma_next / (2 * r1) * math.expm1(h)) * d1
    if order == 2:
        return second, first
    r2 = 2 / 3
    s2 = lam + r2 * h
    sigma_s2, e2 = math.exp(-s2), math.expm1(r2 * h)
    u2 = x - (sigma_s2 * e2) * eps - (sigma_s2 * (r2 / r1) * (e2 / (r2 * h) - 1)) * d1
    third = first - (sigma_next / r2 * (math.expm1(h) / h - 1)) * (eps_at(u2, s2) - eps)
    return third, second


def _ancestral_target(lam_next: float, lam_end: float, sigma: float, sigma_next: float, eta: float):
    """(lambda to solve to, std of the noise added after) for a step sigma -> sigma_next: k-diffusion's
    ancestral DPM-Solver solves to sigma_down (never past the end) and fills up to sigma_next with noise."""
    if not eta:
        return lam_next, 0.0
    sigma_down, _ = ancestral_step(sigma, sigma_next, eta)
    lam_down = lam_end if sigma_down == 0 else min(lam_end, -math.log(sigma_down))
    return lam_down, math.sqrt(max(sigma_next ** 2 - math.exp(-2 * lam_down), 0.0))


@torch.no_grad()
def sample_dpm_fast(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                    eta: float = 0.0, s_noise: float = 1.0, noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022, "DPM-Solver-fast" step schedule; k-diffusion sample_dpm_fast): a budget of
    NFE = len(sigmas) - 1 model evaluations spent on M = NFE // 3 + 1 steps uniform in lambda, all
    DPM-Solver-3 except the last: orders (3, ..., 3, 2, 1) when 3 divides NFE, else (3, ..., 3, NFE mod 3).
    Only the ends of `sigmas` are used (module docstring). Order 3 when NFE mod 3 = 2 (the last step is
    then second order), 2 otherwise. eta > 0: ancestral noise from `generator` or `noise_sampler`. One
    callback per step, at the step's start."""
    check_eta(eta, s_noise)
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    lam_start, lam_end = _ends(sig)
    if lam_end <= lam_start:          # a single positive sigma: nothing to integrate (k-diffusion returns x)
        return x
    noise_sampler = fresh_noise(x, generator) if noise_sampler is None else noise_sampler
    eps_at = _eps_at(denoiser, batch, extra_args)
    nfe = len(sig) - 1
    m = nfe // 3 + 1
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    lams = [lam_start + (lam_end - lam_start) * k / m for k in range(m)] + [lam_end]
    for i, order in enumerate(orders):
        sigma, sigma_next = math.exp(-lams[i]), math.exp(-lams[i + 1])
        lam_down, sigma_up = _ancestral_target(lams[i + 1], lam_end, sigma, sigma_next, eta)
        denoised = denoiser(x, batch(sigma), **extra_args)
        report(callback, i, x, sigma, sigma, denoised)
        x, _ = _dpm_solver_step(eps_at, x, lams[i], lam_down, (x - denoised) / sigma, order)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def _propose_step(errs: list[float], error: float, b: tuple[float, float, float], accept_safety: float):
    """k-diffusion's PIDStepSizeController.propose_step: (factor for h, accepted, new error history).

    PID control of the step size (Söderlind 2003, "Digital filters in adaptive time-stepping") on the
    inverse errors of this and the two last accepted steps, with the limiter 1 + atan(f - 1) (Söderlind &
    Wang 2006); a step is accepted when its factor is at least accept_safety."""
    inv = 1 / (error + 1e-8)
    errs = [inv, inv, inv] if not errs else [inv, errs[1], errs[2]]
    factor = 1 + math.atan(errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2] - 1)
    accept = factor >= accept_safety
    return factor, accept, ([errs[0], errs[0], errs[1]] if accept else errs)


@torch.no_grad()
def sample_dpm_adaptive(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                        eta: float = 0.0, s_noise: float = 1.0, noise_sampler=None):
    """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022, the adaptive step size schedule of the
    appendix; k-diffusion sample_dpm_adaptive): each attempt from lambda takes a step h with DPM-Solver-`order` and its embedded
    lower-order solution (order 3: DPM-Solver-2 at r1 = 1/3, sharing the first stage; order 2: DPM-Solver-1),
    so it costs `order` model evaluations. The error is the RMS over the whole batch of
    (x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|)), x_prev the last accepted low-order solution
    (Jolicoeur-Martineau et al. 2021, "Gotta Go Fast When Generating Data with Score-Based Models");
    `_propose_step` accepts or rejects and rescales h (PID coefficients pcoeff, icoeff, dcoeff over the
    order, 1.5 with eta > 0). Starts at h_init and stops at the smallest positive sigma (module docstring).

    `len(sigmas)` does not set the work: rtol / atol do. The step sizes come from the batch's joint error,
    so an image's result depends on the batch it is in (as in k-diffusion, A1111 and ComfyUI). One callback
    per attempt, at its start (a rejected attempt is reported again from the same point)."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    if rtol <= 0 or atol < 0 or h_init == 0 or not 0 < accept_safety <= 1:
        raise ValueError(f"dpm_adaptive needs rtol > 0, atol >= 0, h_init != 0, 0 < accept_safety <= 1; "
                         f"got rtol={rtol}, atol={atol}, h_init={h_init}, accept_safety={accept_safety}")
    check_eta(eta, s_noise)
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    lam, lam_end = _ends(sig)
    noise_sampler = fresh_noise(x, generator) if noise_sampler is None else noise_sampler
    eps_at = _eps_at(denoiser, batch, extra_args)
    pid_order = 1.5 if eta else order
    b = ((pcoeff + icoeff + dcoeff) / pid_order, -(pcoeff + 2 * dcoeff) / pid_order, dcoeff / pid_order)
    h, errs, x_prev, attempt = abs(h_init), [], x, 0
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + h)
        sigma, sigma_next = math.exp(-lam), math.exp(-lam_next)
        lam_down, sigma_up = _ancestral_target(lam_next, lam_end, sigma, sigma_next, eta)
        denoised = denoiser(x, batch(sigma), **extra_args)
        report(callback, attempt, x, sigma, sigma, denoised)
        x_high, x_low = _dpm_solver_step(eps_at, x, lam, lam_down, (x - denoised) / sigma, order)
        scale = (rtol * torch.maximum(x_low.abs(), x_prev.abs())).clamp_min(atol)
        error = float(torch.linalg.norm((x_low - x_high) / scale)) / math.sqrt(x.numel())
        if not math.isfinite(error):
            raise ValueError(f"dpm_adaptive: the error estimate is {error} at sigma={sigma:.6g}: the denoiser "
                             f"returned NaN or inf (check the model's dtype), or atol=0 met an all-zero latent")
        factor, accept, errs = _propose_step(errs, error, b, accept_safety)
        if accept:
            x_prev, lam = x_low, lam_next
            x = x_high + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up) if sigma_up > 0 else x_high
        h *= factor
        attempt += 1
    return x


SAMPLERS = {
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
}

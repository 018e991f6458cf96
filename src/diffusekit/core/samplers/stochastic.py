"""Stochastic samplers: ancestral samplers and SDE solvers of the reverse diffusion.

Each is one loop over `sigmas` with the registry's signature (see `samplers/__init__.py`):

    sample_x(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **knobs) -> x

The data model is x = x0 + sigma * eps and `denoiser(x, sigma)` estimates x0 (k-diffusion's
convention). Step coefficients are computed in float64 Python scalars; the latent keeps its dtype.

Noise. Ancestral samplers (and ddpm, lcm, restart) draw fresh Gaussians per step from
`noise.randn_like(x, generator)`: with one CPU generator per image, a batch equals single runs. The
SDE samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) take their increments from a Brownian tree
seeded per image by `noise.seeds_from_generators`, so a seed also changes little with the step count.
Every sampler accepts `noise_sampler(sigma, sigma_next) -> standard normal like x` to replace its
noise source (e.g. to feed pre-drawn noise).
"""
from __future__ import annotations

import math

import torch

from .. import noise as _noise
from .. import sigmas as _sigmas
from ..brownian import BrownianTreeNoiseSampler
from .common import ancestral_step, check_eta, fresh_noise, report, setup


# --- shared pieces (the rest are in common.py) ---

def _brownian_noise(x: torch.Tensor, sig: list[float], generator) -> BrownianTreeNoiseSampler:
    """A Brownian tree per image over [smallest positive sigma, largest sigma] (SDE samplers)."""
    positive = [s for s in sig if s > 0]
    lo, hi = min(positive), max(positive)
    if lo == hi:   # a single positive sigma: the tree needs an interval, any one containing it works
        lo = hi / 2
    return BrownianTreeNoiseSampler(x, lo, hi, _noise.seeds_from_generators(generator, x.shape[0]))


# --- ancestral samplers ---

@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None):
    """Euler ancestral ("Euler a"): an Euler step of the probability-flow ODE down to sigma_down, then
    fresh noise of std sigma_up (k-diffusion sample_euler_ancestral; Karras et al. 2022's ODE in the
    ancestral split of Ho et al. 2020). With eta = 1 each step is exactly the DDPM posterior step.
    """
    check_eta(eta, s_noise)
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = fresh_noise(x, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = denoised + (s_down / s) * (x - denoised)   # = x + d * (s_down - s), d = (x - denoised) / s
        if s_next > 0:
            x = x + noise_sampler(s, s_next) * (s_noise * s_up)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None):
    """DPM2 ancestral ("DPM2 a"): k-diffusion's sample_dpm_2_ancestral, inspired by DPM-Solver-2 (Lu et al.
    2022) and Algorithm 2 of Karras et al. 2022: a midpoint step from sigma to sigma_down, the midpoint
    at the geometric mean sqrt(sigma * sigma_down), then noise of std sigma_up. The last step
    (sigma_down = 0) is an Euler step.
    """
    check_eta(eta, s_noise)
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = fresh_noise(x, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        d = (x - denoised) / s
        if s_down == 0:
            x = x + d * (s_down - s)
        else:
            s_mid = math.exp(0.5 * (math.log(s) + math.log(s_down)))
            x_mid = x + d * (s_mid - s)
            d_mid = (x_mid - denoiser(x_mid, batch(s_mid), **extra_args)) / s_mid
            x = x + d_mid * (s_down - s)
            x = x + noise_sampler(s, s_next) * (s_noise * s_up)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                              eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None):
    """DPM++(2S) ancestral ("DPM++ 2S a"): the single-step second-order DPM-Solver++ (Lu et al. 2022b,
    Algorithm 1 with r = 1/2, data prediction, in lambda = -log sigma) from sigma to sigma_down, then
    noise of std sigma_up (k-diffusion sample_dpmpp_2s_ancestral). The last step is an Euler step.
    """
    check_eta(eta, s_noise)
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = fresh_noise(x, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        if s_down == 0:
            x = denoised + (s_down / s) * (x - denoised)
        else:
            # lambda = -log sigma; the midpoint in lambda is the geometric mean of the sigmas.
            # The exponential-integrator step x_b = (sigma_b / sigma_a) x_a - expm1(-h) D reads
            # x_b = D + (sigma_b / sigma_a) (x_a - D).
            s_mid = math.sqrt(s * s_down)
            x_mid = denoised + (s_mid / s) * (x - denoised)
            denoised_mid = denoiser(x_mid, batch(s_mid), **extra_args)
            x = denoised_mid + (s_down / s) * (x - denoised_mid)
        if s_next > 0:
            x = x + noise_sampler(s, s_next) * (s_noise * s_up)
    return x


# --- SDE samplers (Brownian tree noise) ---

@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, noise_sampler=None):
    """DPM++ SDE: the stochastic second-order single-step DPM-Solver++ of k-diffusion (sample_dpmpp_sde;
    Lu et al. 2022b's DPM-Solver++(2S) with an ancestral noise split at both stages). Stage 1 goes to
    the intermediate sigma_s = sigma^(1-r) sigma_next^r, stage 2 to sigma_next using
    (1 - 1/(2r)) D + 1/(2r) D_s. Noise: Brownian-tree increments over each stage.
    """
    check_eta(eta, s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"r (the intermediate point's fraction of the step in log sigma) must be in (0, 1], got {r}")
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = _brownian_noise(x, sig, generator)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        if s_next == 0:
            x = denoised   # the Euler step to sigma = 0
            continue
        s_mid = math.exp((1 - r) * math.log(s) + r * math.log(s_next))
        # stage 1: sigma -> s_mid
        s_down, s_up = ancestral_step(s, s_mid, eta)
        x_mid = denoised + (s_down / s) * (x - denoised) + noise_sampler(s, s_mid) * (s_noise * s_up)
        denoised_mid = denoiser(x_mid, batch(s_mid), **extra_args)
        # stage 2: sigma -> sigma_next with the combined data estimate
        s_down, s_up = ancestral_step(s, s_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_mid
        x = denoised_d + (s_down / s) * (x - denoised_d)
        x = x + noise_sampler(s, s_next) * (s_noise * s_up)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint", noise_sampler=None):
    """DPM++ 2M SDE: the second-order multistep SDE-DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++"; k-diffusion
    sample_dpmpp_2m_sde, diffusers algorithm_type="sde-dpmsolver++"). With h = log(sigma / sigma_next):

        x' = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + c * (D - D_prev) / r
             + sigma_next sqrt(1 - e^{-2 eta h}) z,     r = h_prev / h

    c = (1 - e^{-(1+eta)h}) / 2 for solver_type "midpoint", (1 - e^{-(1+eta)h}) / (-(1+eta) h) + 1 for "heun".
    The first step is first order; the step to sigma = 0 returns D. z: Brownian-tree increments.
    """
    check_eta(eta, s_noise)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = _brownian_noise(x, sig, generator)
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        if s_next == 0:
            x = denoised
            h = None
        else:
            h = math.log(s / s_next)
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)                       # 1 - e^{-(1+eta) h}
            x = (s_next / s * math.exp(-eta_h)) * x + one_minus * denoised
            if old_denoised is not None:
                inv_r = h / h_last
                if solver_type == "heun":
                    coef = one_minus / (-h - eta_h) + 1
                else:
                    coef = 0.5 * one_minus
                x = x + (coef * inv_r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(s, s_next) * (s_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None):
    """DPM++ 3M SDE: k-diffusion's third-order multistep extension of SDE-DPM-Solver++ (Lu et al. 2022b;
    sample_dpmpp_3m_sde). With h_eta = (1 + eta) h it adds phi_2 D1 - phi_3 D2 to the first-order step,
    phi_2 = expm1(-h_eta) / h_eta + 1, phi_3 = phi_2 / h_eta - 1/2, D1 / D2 the first / second divided
    differences of the last three data estimates in lambda = -log sigma. Orders 1, 2, 3 on the first
    steps; the step to sigma = 0 returns D. Noise: Brownian-tree increments.
    """
    check_eta(eta, s_noise)
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = _brownian_noise(x, sig, generator)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        if s_next == 0:
            x = denoised
            h = None
        else:
            h = math.log(s / s_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised   # (sigma_next/sigma) e^{-eta h} = e^{-h_eta}
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise_sampler(s, s_next) * (s_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- discrete-chain and consistency samplers ---

@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """Ancestral DDPM (Ho et al. 2020, Algorithm 2) written over sigmas: each step samples the posterior
    q(x_s | x_t, x0 = D) of the discrete chain between consecutive noise levels.

    With abar = 1 / (1 + sigma^2), the chain from sigma_t to sigma_s has alpha = abar_t / abar_s and
    beta = 1 - alpha; in the variance-preserving coordinates x_vp = x / sqrt(1 + sigma^2),

        mean = sqrt(abar_s) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_s) / (1 - abar_t) x_vp_t   (eq. 7)
        var  = beta~ = (1 - abar_s) / (1 - abar_t) beta

    (ComfyUI sample_ddpm; diffusers DDPMScheduler with variance "fixed_small" on the timesteps of
    `sigmas`). Back in x = x0 + sigma eps this is algebraically the Euler-ancestral step with eta = 1
    (mean (s/t)^2 x + (1 - (s/t)^2) D, variance s^2 (t^2 - s^2) / t^2): the test checks the two agree.
    """
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = fresh_noise(x, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        abar_t, abar_s = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        alpha = abar_t / abar_s
        beta = 1 - alpha
        x_vp = x * math.sqrt(abar_t)
        mean = (math.sqrt(abar_s) * beta / (1 - abar_t)) * denoised \
            + (math.sqrt(alpha) * (1 - abar_s) / (1 - abar_t)) * x_vp
        if s_next > 0:
            std = math.sqrt((1 - abar_s) / (1 - abar_t) * beta)
            mean = mean + std * noise_sampler(s, s_next)
        x = mean / math.sqrt(abar_s)   # back to x = x0 + sigma eps (abar_s = 1 at sigma = 0)
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, noise_sampler=None):
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1), as used by
    Latent Consistency Models (Luo et al. 2023): jump to the model's x0 estimate, then re-noise it to the
    next sigma, x = D + sigma_next z (ComfyUI sample_lcm, diffusers LCMScheduler). Exact at any step
    count when D is a consistency function (the ODE's endpoint map); with a posterior-mean denoiser it
    loses variance at every step. An LCM's boundary scalings c_skip / c_out belong to its denoiser.
    """
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = fresh_noise(x, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        x = denoised
        if s_next > 0:
            x = x + s_next * noise_sampler(s, s_next)
    return x


def _restart_plan(sig: list[float], restart_list) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) Heun steps of Restart sampling, A1111/ComfyUI's plan.

    restart_list maps a min_sigma to [restart_steps, restart_times, max_sigma]: after reaching the
    schedule's sigma nearest min_sigma, jump back to the one nearest max_sigma and re-solve down with
    restart_steps - 1 Karras steps, restart_times times. Default (None): for >= 20 steps the schedule
    is rebuilt as Karras with steps - restart_steps * restart_times steps (9 restart steps once, or
    steps // 4 twice from 36 steps) and {0.1: [restart_steps + 1, restart_times, 2]}, so the step count
    stays `steps`; below 20 steps, or for a schedule not ending in 0, no restarts (plain Heun).
    """
    steps = len(sig) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20 and sig[-1] == 0:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            rebuilt = _sigmas.get("karras", steps - restart_steps * restart_times, sigma_min=sig[-2],
                                  sigma_max=sig[0], dtype=torch.float64)
            sig = [float(v) for v in rebuilt]
            restart_list = {0.1: [restart_steps + 1, restart_times, 2.0]}

    def nearest(value: float) -> int:
        # only sigmas > 0 can bound a restart interval (a short schedule may end nearer 0 than min_sigma)
        return min((j for j in range(len(sig)) if sig[j] > 0), key=lambda j: abs(sig[j] - value))

    at_index = {nearest(float(k)): v for k, v in restart_list.items()}
    plan = []
    for i in range(len(sig) - 1):
        plan.append((sig[i], sig[i + 1]))
        if i + 1 in at_index:
            restart_steps, restart_times, restart_max = at_index[i + 1]
            lo_idx, hi_idx = i + 1, nearest(float(restart_max))
            if hi_idx < lo_idx:   # only a jump back up to a larger sigma is a restart
                seg = [float(v) for v in _sigmas.get("karras", int(restart_steps), sigma_min=sig[lo_idx],
                                                     sigma_max=sig[hi_idx], dtype=torch.float64)[:-1]]
                for _ in range(int(restart_times)):
                    plan.extend(zip(seg[:-1], seg[1:]))
    return plan


@torch.no_grad()
def sample_restart(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                   s_noise: float = 1.0, restart_list: dict | None = None, noise_sampler=None):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"):
    Heun (ODE) steps, and in a restart interval [t_min, t_max] repeatedly add forward noise of std
    sqrt(t_max^2 - t_min^2) (s_noise times) and solve the ODE back down. The step plan and its
    defaults follow A1111/ComfyUI's restart sampler (see `_restart_plan`); `restart_list` =
    {min_sigma: [restart_steps, restart_times, max_sigma]}. One callback per Heun step.
    """
    if s_noise < 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    if noise_sampler is None:
        noise_sampler = fresh_noise(x, generator)
    plan = _restart_plan(sig, restart_list)
    last = None
    for step, (s, s_next) in enumerate(plan):
        if last is not None and last < s:   # the restart jump: forward-noise from `last` up to s
            x = x + noise_sampler(last, s) * (s_noise * math.sqrt(s * s - last * last))
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, step, x, s, s, denoised)
        d = (x - denoised) / s
        if s_next == 0:
            x = x + d * (s_next - s)
        else:   # Heun (Karras et al. 2022, Algorithm 1)
            x_2 = x + d * (s_next - s)
            d_2 = (x_2 - denoiser(x_2, batch(s_next), **extra_args)) / s_next
            x = x + (0.5 * (s_next - s)) * (d + d_2)
        last = s_next
    return x


SAMPLERS = {
    "euler_ancestral": sample_euler_ancestral,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "restart": sample_restart,
}

"""Deterministic samplers: solvers of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

Every function has the signature of the sampling contract (docs/architecture.md):

    sample_<id>(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **knobs) -> x

`x` is the latent at sigmas[0], `sigmas` a descending 1-D schedule (normally ending in 0; a nonzero end
stops there, which is how a run is split between two samplers), `denoiser(x, sigma, **extra_args)`
returns the x0 estimate for `sigma` of shape (batch,). `callback(dict(i, x, sigma, sigma_hat, denoised))`
is called once per step with `sigma`/`sigma_hat` as Python floats. The step coefficients are computed in
float64 from the schedule; `x` keeps its dtype and device. Input checks live in the registry
(`diffusekit.core.samplers.SAMPLERS`), so each function here is one loop.

Convergence orders measured on the exact Gaussian-mixture world (tests/core/test_samplers_deterministic.py):
euler, ddim, euler_flow 1.0; heun, dpm_2, dpmpp_2m 2.0; lms (order 4) 3.4; uni_pc / uni_pc_bh2 (order 3,
UniC adds one) 3.9. Every sampler except lms ends with x = D(x, sigma_last) when the schedule ends in 0.
"""
from __future__ import annotations

import math

import torch

from diffusekit.core.noise import randn_like

from .common import report, setup


def _to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4 with sigma(t) = t)."""
    return (x - denoised) / sigma


def _churn(x, sigma: float, sigma_next: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, noise_sampler, generator) -> tuple[torch.Tensor, float]:
    """Stochastic churn of Algorithm 2 (Karras et al. 2022): raise sigma to sigma_hat = sigma (1 + gamma)
    by adding fresh noise of variance sigma_hat^2 - sigma^2. gamma = 0 (the default) is the pure ODE.
    A given `noise_sampler` is called on every step (k-diffusion's stream); otherwise the noise is drawn
    from `generator` where gamma > 0 only."""
    gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
    if noise_sampler is not None:
        eps = noise_sampler(sigma, sigma_next)
    elif gamma > 0.0:
        eps = randn_like(x, generator)
    if gamma <= 0.0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    return x + eps * (s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)), sigma_hat


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, noise_sampler=None):
    """Euler steps with optional churn: Algorithm 2 of Karras et al. 2022, "Elucidating the Design Space
    of Diffusion-Based Generative Models", first-order branch. With s_churn = 0 it is the explicit Euler
    method on the probability-flow ODE (order 1).

    Churn noise: by default drawn from `generator` on the steps that churn only, so without churn (or
    outside [s_tmin, s_tmax]) the generator is not touched. A `noise_sampler(sigma, sigma_next)` given
    instead is called on every step, churning or not, as k-diffusion (and so A1111) calls randn_like:
    that is the stream that reproduces A1111's image with a churn window (pipelines/sde_noise.py)."""
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    steps = len(sig) - 1
    for i in range(steps):
        x, sigma_hat = _churn(x, sig[i], sig[i + 1], steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler,
                              generator)
        denoised = denoiser(x, batch(sigma_hat), **extra_args)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        x = x + _to_d(x, sigma_hat, denoised) * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0, noise_sampler=None):
    """Heun's method with optional churn: Algorithm 2 of Karras et al. 2022 (second-order correction,
    i.e. the explicit trapezoidal rule). The step into sigma = 0 is a plain Euler step, since the
    derivative at sigma = 0 is undefined. Churn knobs and noise as in `sample_euler`. Two model
    evaluations per step; order 2."""
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    steps = len(sig) - 1
    for i in range(steps):
        x, sigma_hat = _churn(x, sig[i], sig[i + 1], steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler,
                              generator)
        denoised = denoiser(x, batch(sigma_hat), **extra_args)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        d = _to_d(x, sigma_hat, denoised)
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        denoised_2 = denoiser(x_2, batch(sig[i + 1]), **extra_args)
        d_2 = _to_d(x_2, sig[i + 1], denoised_2)
        x = x + (d + d_2) * (0.5 * dt)
    return x


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, noise_sampler=None):
    """DPM-Solver-2 in the form of k-diffusion's `sample_dpm_2` (Lu et al. 2022, "DPM-Solver", Algorithm 1
    with r = 1/2, written as a midpoint rule in sigma): an Euler half step to the geometric midpoint
    sigma_mid = sqrt(sigma_hat * sigma_next), then the full step with the midpoint derivative. The step
    into sigma = 0 is Euler. Churn knobs and noise as in `sample_euler`. Two model evaluations per step; order 2."""
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    steps = len(sig) - 1
    for i in range(steps):
        x, sigma_hat = _churn(x, sig[i], sig[i + 1], steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler,
                              generator)
        denoised = denoiser(x, batch(sigma_hat), **extra_args)
        report(callback, i, x, sig[i], sigma_hat, denoised)
        d = _to_d(x, sigma_hat, denoised)
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
            continue
        sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sig[i + 1])))
        x_2 = x + d * (sigma_mid - sigma_hat)
        denoised_2 = denoiser(x_2, batch(sigma_mid), **extra_args)
        x = x + _to_d(x_2, sigma_mid, denoised_2) * (sig[i + 1] - sigma_hat)
    return x


def _lms_coefficient(nodes: list[float], j: int, start: float, end: float) -> float:
    """integral over [start, end] of the Lagrange basis polynomial l_j for `nodes`, in closed form.

    The basis polynomial prod_{k != j} (tau - t_k) / (t_j - t_k) is expanded in u = tau - start (which
    keeps the monomials small) and integrated term by term, so the result is exact up to rounding."""
    poly = [1.0]                                    # coefficients in u, lowest degree first
    for k, t_k in enumerate(nodes):
        if k == j:
            continue
        scale = 1.0 / (nodes[j] - t_k)
        shift = start - t_k                         # tau - t_k = u + shift
        nxt = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):
            nxt[p] += c * shift * scale
            nxt[p + 1] += c * scale
        poly = nxt
    h = end - start
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, order: int = 4):
    """Linear multistep (Adams-Bashforth with variable steps) in sigma, as k-diffusion's `sample_lms`:
    the derivative d(sigma) is interpolated by the Lagrange polynomial through the last `order` values
    and integrated exactly over [sigma_i, sigma_{i+1}]. The first steps use the history available.
    One model evaluation per step."""
    if order < 1:
        raise ValueError(f"lms order must be >= 1, got {order}")
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    ds: list[torch.Tensor] = []                     # newest last; each shaped like x
    for i in range(len(sig) - 1):
        denoised = denoiser(x, batch(sig[i]), **extra_args)
        report(callback, i, x, sig[i], sig[i], denoised)
        ds.append(_to_d(x, sig[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        nodes = [sig[i - k] for k in range(len(ds))]   # newest first: sigma_i, sigma_{i-1}, ...
        for k, d in enumerate(reversed(ds)):
            x = x + d * _lms_coefficient(nodes, k, sig[i], sig[i + 1])
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """DPM-Solver++(2M): Algorithm 2 of Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", in the sigma form of k-diffusion. With lambda = -log sigma and
    h = lambda_next - lambda, x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D', where D' extrapolates
    the two latest x0 estimates: D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_last / h. The first step and
    the step into sigma = 0 are first order (D' = D_i). One model evaluation per step; order 2."""
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    old_denoised = None
    for i in range(len(sig) - 1):
        denoised = denoiser(x, batch(sig[i]), **extra_args)
        report(callback, i, x, sig[i], sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i]) - math.log(sig[i + 1])
            ratio = sig[i + 1] / sig[i]              # = exp(-h)
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (math.log(sig[i - 1]) - math.log(sig[i])) / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * ratio + denoised_d * (1 - ratio)
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in the sigma form.

    Dividing DDIM's update by sqrt(alpha_bar_prev) gives x_next = D + sigma_down * eps_hat + sigma_up * z with
    eps_hat = (x - D) / sigma, sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) and
    sigma_down = sqrt(sigma_next^2 - sigma_up^2). eta = 0 is deterministic and equals the Euler step in
    sigma (Karras et al. 2022, section 3); eta > 0 draws z from `generator` (eta = 1: DDPM-like variance).
    One model evaluation per step; order 1."""
    if eta < 0:
        raise ValueError(f"ddim eta must be >= 0, got {eta}")
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, batch(s), **extra_args)
        report(callback, i, x, s, s, denoised)
        sigma_up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1.0 - (s_next / s) ** 2)))
        sigma_down = math.sqrt(s_next ** 2 - sigma_up ** 2)
        x = denoised + (x - denoised) * (sigma_down / s)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int, variant: str, corrector: bool):
    """Coefficients of UniP-p / UniC-p (Zhao et al. 2023, Algorithms 1-2, data prediction, B(h) form).

    h = lambda_t - lambda_s0 > 0; rks = (lambda_{s_k} - lambda_s0) / h for the older points (negative) and
    the new point (rk = 1, corrector only). Returns (rhos, B_h). The rhos solve R rho = b with
    R_{pj} = rk_j^(p-1) and b_p = p! g_p / B(h), where g_1 = (e^{-h} - 1) / (-h) - 1 and
    g_{p+1} = g_p / (-h) - 1 / (p+1)! (the paper's phi functions, eq. 9 and Appendix). Like the
    reference implementation, UniP-2 and UniC-1 use the simplified rho = 1/2."""
    hh = -h                                         # data prediction integrates exp(-h)
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b, factorial = [], 1.0
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    if corrector:
        if order == 1:
            return [0.5], b_h
        nodes = rks + [1.0]
        size = order
    else:
        if order == 1:
            return [], b_h
        if order == 2:
            return [0.5], b_h
        nodes, size = rks, order - 1
    R = torch.tensor([[r ** p for r in nodes] for p in range(size)], dtype=torch.float64)
    rhos = torch.linalg.solve(R, torch.tensor(b[:size], dtype=torch.float64))
    return rhos.tolist(), b_h


def _uni_pc(denoiser, x, sigmas, extra_args, callback, order: int, lower_order_final: bool, variant: str):
    """The UniPC loop shared by the bh1 and bh2 variants (see `sample_uni_pc`)."""
    if order < 1:
        raise ValueError(f"uni_pc order must be >= 1, got {order}")
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    steps = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]      # lambda = -log sigma (VE form)
    history: list[torch.Tensor] = []                # x0 estimates at sigma_i, sigma_{i-1}, ... (newest first)
    x_last, last_order = None, 0
    for i in range(steps):
        denoised = denoiser(x, batch(sig[i]), **extra_args)
        if x_last is not None:
            # UniC: correct x_i with the x0 estimate just computed there (no extra evaluation).
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, last_order)]
            rhos, b_h = _unipc_coefficients(h, rks, last_order, variant, corrector=True)
            m0 = history[0]
            corr = (denoised - m0) * rhos[-1]
            for k, rho in enumerate(rhos[:-1]):
                corr = corr + (history[k + 1] - m0) * (rho / rks[k])
            x = x_last * math.exp(-h) - m0 * math.expm1(-h) - corr * b_h
        report(callback, i, x, sig[i], sig[i], denoised)
        history = [denoised] + history[: order - 1]
        this_order = min(order, steps - i) if lower_order_final else order
        this_order = min(this_order, len(history))
        x_last, last_order = x, this_order
        if sig[i + 1] == 0:
            x = denoised                            # every exponential step into sigma = 0 gives D
            continue
        # UniP: the predictor of order this_order from x_i to x_{i+1}.
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, this_order)]
        rhos, b_h = _unipc_coefficients(h, rks, this_order, variant, corrector=False)
        m0 = history[0]
        x = x * math.exp(-h) - m0 * math.expm1(-h)
        for k, rho in enumerate(rhos):
            x = x - (history[k + 1] - m0) * (rho / rks[k] * b_h)
    return x


@torch.no_grad()
def sample_uni_pc(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                  order: int = 3, lower_order_final: bool = True):
    """UniPC, B(h) = h variant "bh1": Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework
    for Fast Sampling of Diffusion Models", Algorithms 1-2 (multistep, data prediction), in lambda = -log
    sigma. Each step evaluates the model once at the predicted point, corrects that point with UniC
    (raising its order by one) and predicts the next with UniP of order `order` (warm-up: 1, 2, ...).

    order = 3 is the paper's (and A1111's / ComfyUI's) choice for unconditional or lightly guided sampling;
    use 2 under strong guidance. lower_order_final lowers the order over the last steps (1 on the last),
    as A1111, ComfyUI and diffusers do. The step into sigma = 0 returns the x0 estimate; the final
    sample is not corrected (that would cost an extra model evaluation)."""
    return _uni_pc(denoiser, x, sigmas, extra_args, callback, order, lower_order_final, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                      order: int = 3, lower_order_final: bool = True):
    """UniPC with B(h) = e^h - 1 ("bh2", Zhao et al. 2023, section 3.3), recommended by the paper for
    guided sampling; otherwise identical to `sample_uni_pc`."""
    return _uni_pc(denoiser, x, sigmas, extra_args, callback, order, lower_order_final, "bh2")


@torch.no_grad()
def sample_euler_flow(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """Euler for rectified-flow models (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, SD3).

    For x_t = (1 - t) x0 + t eps with sigma = t in [0, 1] and a flow denoiser D = x - t v (v the predicted
    velocity eps - x0), (x - D) / t = v exactly, so the k-diffusion Euler step x += (t_next - t) (x - D) / t
    is the Euler method on the flow ODE dx/dt = v, the same update as diffusers'
    FlowMatchEulerDiscreteScheduler. `x` starts as pure noise at t = 1 (no sigma_max scaling)."""
    extra_args, sig, batch = setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = denoiser(x, batch(sig[i]), **extra_args)
        report(callback, i, x, sig[i], sig[i], denoised)
        x = x + _to_d(x, sig[i], denoised) * (sig[i + 1] - sig[i])
    return x


SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "euler_flow": sample_euler_flow,
}

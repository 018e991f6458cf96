"""Noise schedules of discrete diffusion models and the forward (noising) process.

A discrete model is trained on T steps with betas beta_0..beta_{T-1} (0-indexed here; the DDPM paper
counts 1..T). With alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s:

    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)          (Ho et al. 2020, eq. 2)
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)          (eq. 4)

and x_{-1} = x_0. In the variance-exploding view of Karras et al. (2022) that the samplers use,
x_t / sqrt(abar_t) = x_0 + sigma_t * eps with sigma_t = sqrt((1 - abar_t) / abar_t).

Everything is computed in float64 (as the original LDM code and ComfyUI do); diffusers accumulates
the cumulative product in float32, which differs by up to ~1e-6 relative.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")

# diffusers' floor for a zero terminal alpha-bar, so that sigma_max stays finite (4096)
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def betas(name: str, timesteps: int = 1000, **opts) -> torch.Tensor:
    """Beta schedule `name` over `timesteps` steps, float64, shape (timesteps,).

    linear:        linspace(beta_start=1e-4, beta_end=0.02)              (Ho et al. 2020, DDPM)
    scaled_linear: linspace(sqrt(beta_start=0.00085), sqrt(beta_end=0.012)) ** 2   (Stable Diffusion)
    cosine:        beta_t = min(1 - abar(t+1)/abar(t), max_beta=0.999),
                   abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2, s = 0.008  (Nichol & Dhariwal 2021, eq. 17)
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    allowed = {"linear": {"beta_start", "beta_end"}, "scaled_linear": {"beta_start", "beta_end"},
               "cosine": {"s", "max_beta"}}
    if name not in allowed:
        raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(BETA_SCHEDULES)}")
    unknown = set(opts) - allowed[name]
    if unknown:
        raise ValueError(f"beta schedule {name!r} got unknown option(s) {sorted(unknown)}; "
                         f"it accepts {sorted(allowed[name])}")
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(opts.get("beta_start", 1e-4), opts.get("beta_end", 0.02), timesteps, dtype=f64)
    if name == "scaled_linear":
        start, end = opts.get("beta_start", 0.00085), opts.get("beta_end", 0.012)
        return torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=f64) ** 2
    s, max_beta = opts.get("s", 0.008), opts.get("max_beta", 0.999)

    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    out = [min(1 - abar((i + 1) / timesteps) / abar(i / timesteps), max_beta) for i in range(timesteps)]
    return torch.tensor(out, dtype=f64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (abar_{T-1} = 0), keeping abar_0.

    Algorithm 1 of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed":
    shift sqrt(abar) so its last value is 0, scale it so its first value is unchanged, and recover
    the betas. The last beta becomes 1. A sigma for abar = 0 is infinite, so `DiscreteSchedule`
    (like diffusers) uses abar = 2**-24 there for its sigma table (sigma_max ~ 4096).
    """
    b = betas.to(torch.float64)
    sqrt_abar = torch.cumprod(1 - b, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class Posterior(NamedTuple):
    """q(x_{t-1} | x_t, x_0) = N(mean, variance I); log_variance is clipped at t = 0 (see below)."""
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor


def _gather(table: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """table[t] for integer steps t ((B,) or scalar), shaped (B, 1, ..., 1) to broadcast with `like`."""
    t = torch.as_tensor(t, device=table.device).long().reshape(-1)
    if (t < 0).any() or (t >= table.shape[0]).any():
        raise ValueError(f"timesteps must lie in [0, {table.shape[0] - 1}], got {t.tolist()}")
    vals = table[t].to(device=like.device, dtype=like.dtype)
    return vals.reshape(-1, *([1] * (like.ndim - 1)))


class DiscreteSchedule:
    """A discrete T-step model's noise levels, from its alphas_cumprod (float64 inside).

    sigmas[t] = sqrt((1 - abar_t) / abar_t) ascends with t. `sigma_to_t` / `t_to_sigma` interpolate
    log sigma linearly between neighbouring integer steps, the algorithm of k-diffusion's
    DiscreteSchedule and diffusers' `_sigma_to_t`; t is clamped to [0, T-1].
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if abar.numel() < 2:
            raise ValueError(f"need at least 2 timesteps, got {abar.numel()}")
        if not (((abar[:-1] > 0) & (abar[:-1] < 1)).all() and 0 <= abar[-1] < 1):
            raise ValueError("alphas_cumprod must lie in (0, 1) (only the last may be 0, for zero terminal SNR)")
        if not (abar[1:] < abar[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = abar                                    # (T,), may end in exactly 0
        self.betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # (T,)
        safe = abar.clone()
        if safe[-1] == 0:  # zero terminal SNR: floor it as diffusers does, or sigma_max is infinite
            safe[-1] = ZERO_SNR_ALPHA_BAR
        self.sigmas = ((1 - safe) / safe).sqrt()                      # (T,) ascending
        self.log_sigmas = self.sigmas.log()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t   (DDPM eq. 7; 0 at t = 0)
        self.posterior_variance = (1 - prev) / (1 - abar) * self.betas
        self._coef_x0 = prev.sqrt() * self.betas / (1 - abar)
        self._coef_xt = (1 - self.betas).sqrt() * (1 - prev) / (1 - abar)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DiscreteSchedule":
        return cls(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0))

    @classmethod
    def from_name(cls, name: str = "scaled_linear", timesteps: int = 1000, *, zero_terminal_snr: bool = False,
                  **opts) -> "DiscreteSchedule":
        """E.g. `DiscreteSchedule.from_name("scaled_linear")`: Stable Diffusion 1.x/2.x/XL's schedule."""
        b = betas(name, timesteps, **opts)
        return cls.from_betas(rescale_zero_terminal_snr(b) if zero_terminal_snr else b)

    def __len__(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def num_timesteps(self) -> int:
        return len(self)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _tables(self, like: torch.Tensor) -> torch.Tensor:
        # float64 everywhere it exists (MPS has none); the result goes back to the caller's dtype
        dtype = torch.float32 if like.device.type == "mps" else torch.float64
        return self.log_sigmas.to(device=like.device, dtype=dtype)

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Fractional timestep of each sigma: log sigma interpolated between neighbouring steps."""
        sigma = torch.as_tensor(sigma)
        out_dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        log_sigmas = self._tables(sigma)
        log_sigma = sigma.to(log_sigmas.dtype).clamp_min(1e-30).log()
        # low = last step whose log sigma <= log_sigma, kept inside [0, T-2] (k-diffusion's cumsum/argmax)
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(self) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape).to(out_dtype)

    def t_to_sigma(self, t) -> torch.Tensor:
        """Sigma at fractional timestep t: exp of log sigma interpolated between floor(t) and ceil(t)."""
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        log_sigmas = self._tables(t)
        tf = t.to(log_sigmas.dtype).clamp(0, len(self) - 1)
        low, high, w = tf.floor().long(), tf.ceil().long(), tf.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().to(out_dtype)

    # --- forward process (Ho et al. 2020) ---

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """One-shot sample of q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 4). t: (B,) ints."""
        abar = _gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_step(self, x_prev: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """One forward step q(x_t | x_{t-1}): sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise (eq. 2).

        Applying it for t = 0, 1, ..., k starting from x0 gives x_k ~ q(x_k | x_0) = q_sample(x0, k).
        """
        beta = _gather(self.betas, t, x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t, *,
                                variance: str = "beta_tilde") -> Posterior:
        """q(x_{t-1} | x_t, x_0) of DDPM eqs. 6-7, with x_{-1} = x_0.

        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t.
        variance: "beta_tilde" (the true posterior variance beta~_t, DDPM's lower bound) or "beta"
        (sigma_t^2 = beta_t, DDPM's upper bound). beta~_0 = 0, so its log is clipped to log beta~_1
        (improved-diffusion's `posterior_log_variance_clipped`).
        """
        if variance not in ("beta_tilde", "beta"):
            raise ValueError(f"unknown variance {variance!r}; valid: 'beta_tilde', 'beta'")
        mean = _gather(self._coef_x0, t, x0) * x0 + _gather(self._coef_xt, t, x_t) * x_t
        if variance == "beta":
            var_table = self.betas
            log_table = self.betas.log()
        else:
            var_table = self.posterior_variance
            log_table = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]).log()
        return Posterior(mean, _gather(var_table, t, x_t), _gather(log_table, t, x_t))


SD3_SHIFT = 3.0   # the time shift SD3 / SD3.5 sample with (ComfyUI ModelSamplingSD3, diffusers' scheduler config)


def flow_shift(sigma, shift: float = 1.0):
    """Time shift of rectified-flow models (SD3, Esser et al. 2024): s' = shift*s / (1 + (shift-1)*s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowSchedule:
    """Noise levels of a discrete rectified-flow model (SD3 style), x = (1 - s) x0 + s eps, s in [0, 1].

    The table holds s_i = shift(i / T) for i = 1..T (ComfyUI's ModelSamplingDiscreteFlow); the model's
    timestep is s * multiplier. It has the interface `sigmas.get` uses for a discrete model, so the
    table-based schedules (simple, normal, beta, ...) work on flow models too.
    """

    def __init__(self, shift: float = 1.0, timesteps: int = 1000, multiplier: float = 1000.0):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift, self.multiplier = float(shift), float(multiplier)
        steps = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        self.sigmas = flow_shift(steps, self.shift)                   # (T,) ascending, ends at 1

    def __len__(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """The network's time input: s * multiplier (the shift is already in s)."""
        return torch.as_tensor(sigma) * self.multiplier

    def t_to_sigma(self, t) -> torch.Tensor:
        """The table at (unshifted) time t: shift(t / multiplier), as ComfyUI's `sigma(timestep)`. Not the
        inverse of `sigma_to_t` unless shift = 1: the table is indexed before the shift, the network after."""
        return flow_shift(torch.as_tensor(t) / self.multiplier, self.shift)

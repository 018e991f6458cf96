"""Exact worlds: data drawn from an isotropic Gaussian mixture, whose ideal denoiser is closed-form.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x = x0 + sigma * eps (the variance-exploding view of
Karras et al. 2022, eq. 1) the noisy marginal is sum_k w_k N(mu_k, (s_k^2 + sigma^2) I), and the
minimum-MSE denoiser D(x, sigma) = E[x0 | x] is

    D(x, sigma) = sum_k r_k(x) * (mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)),
    r_k(x)      = softmax_k( log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I) ).

With it, samplers can be judged without a trained model: the probability-flow ODE
dx/dsigma = (x - D(x, sigma)) / sigma = sigma * sum_k r_k (x - mu_k) / (s_k^2 + sigma^2) is smooth
down to sigma = 0, so `reference_solution` integrates it to near machine precision, and samples of a
stochastic sampler must reproduce the component weights and means.

The same world under the rectified-flow parameterization (Esser et al. 2024), x = (1 - s) x0 + s eps
with s in [0, 1]: given component k, x ~ N((1 - s) mu_k, ((1 - s)^2 s_k^2 + s^2) I), so

    D_flow(x, s) = sum_k r_k(x) * (mu_k + (1 - s) s_k^2 / ((1 - s)^2 s_k^2 + s^2) * (x - (1 - s) mu_k)),

exact down to s = 1 (pure noise: D = the mixture mean) and equal to D(x / (1 - s), s / (1 - s)) below it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    """An isotropic Gaussian mixture over tensors of shape `event_shape`.

    means: (K, *event_shape); stds: (K,); weights: (K,) summing to 1.
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        k = self.means.shape[0]
        if self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError(f"stds and weights must have shape ({k},), got {tuple(self.stds.shape)} "
                             f"and {tuple(self.weights.shape)}")
        if (self.stds <= 0).any():
            raise ValueError("component stds must be > 0 (the ideal denoiser is singular at 0)")
        if not torch.isclose(self.weights.sum(), torch.ones((), dtype=self.weights.dtype)):
            raise ValueError(f"weights must sum to 1, got {float(self.weights.sum()):.6f}")

    @classmethod
    def example(cls, dim: int = 2, dtype=torch.float64) -> "GaussianMixture":
        """Three well-separated, unequal components: the world of the sampler tests and the study."""
        g = torch.Generator().manual_seed(0)
        means = torch.randn(3, dim, generator=g, dtype=dtype) * 2.0
        means[0] += 3.0
        means[1] -= 3.0
        return cls(means=means, stds=torch.tensor([0.3, 0.5, 0.8], dtype=dtype),
                   weights=torch.tensor([0.5, 0.3, 0.2], dtype=dtype))

    @property
    def event_shape(self) -> torch.Size:
        return self.means.shape[1:]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n samples; returns (x0 (n, *event_shape), component index (n,))."""
        comp = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.event_shape), generator=generator, dtype=self.means.dtype)
        std = self.stds[comp].view(n, *([1] * len(self.event_shape)))
        return self.means[comp] + std * noise, comp

    def _responsibilities(self, x: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor | None = None):
        """r (B, K), the per-component total variance v = alpha^2 s_k^2 + sigma^2 (B, K), x (B, 1, D) and
        the scaled means alpha mu_k (B or 1, K, D), for x = alpha x0 + sigma eps (alpha = 1: VE)."""
        b, d = x.shape[0], self.event_shape.numel()
        xf = x.reshape(b, 1, d).to(self.means.dtype)                 # (B, 1, D)
        a = torch.ones(b, dtype=self.means.dtype, device=x.device) if alpha is None else alpha.to(self.means.dtype)
        mu = a.view(b, 1, 1) * self.means.reshape(1, -1, d)          # (B, K, D)
        v = (a.view(b, 1) * self.stds.view(1, -1)) ** 2 + sigma.view(b, 1).to(self.means.dtype) ** 2  # (B, K)
        sq = ((xf - mu) ** 2).sum(-1)                                # (B, K)
        logp = self.weights.log().view(1, -1) - 0.5 * sq / v - 0.5 * d * torch.log(2 * math.pi * v)
        return torch.softmax(logp, dim=1), v, xf, mu

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, **_cond) -> torch.Tensor:
        """The ideal denoiser E[x0 | x0 + sigma * eps = x]; a valid `denoiser(x, sigma)`."""
        sigma = _as_batch(sigma, x)
        r, v, xf, mu = self._responsibilities(x, sigma)
        shrink = (self.stds.view(1, -1) ** 2 / v).unsqueeze(-1)      # (B, K, 1)
        per_comp = mu + shrink * (xf - mu)                           # (B, K, D)
        out = (r.unsqueeze(-1) * per_comp).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def flow_denoise(self, x: torch.Tensor, s: torch.Tensor | float, **_cond) -> torch.Tensor:
        """The ideal rectified-flow denoiser E[x0 | (1 - s) x0 + s eps = x], s in [0, 1] (module docstring)."""
        s = _as_batch(s, x).to(self.means.dtype)
        alpha = 1 - s
        r, v, xf, mu_a = self._responsibilities(x, s, alpha)
        gain = (alpha.view(-1, 1) * self.stds.view(1, -1) ** 2 / v).unsqueeze(-1)   # (B, K, 1)
        per_comp = self.means.reshape(1, *mu_a.shape[1:]) + gain * (xf - mu_a)      # (B, K, D)
        return (r.unsqueeze(-1) * per_comp).sum(1).reshape(x.shape).to(x.dtype)

    def ode_derivative(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """dx/dsigma of the probability-flow ODE, written so that it is exact at sigma = 0."""
        sigma = _as_batch(sigma, x)
        r, v, xf, mu = self._responsibilities(x, sigma)
        s = sigma.view(-1, 1, 1).to(self.means.dtype)
        out = (s * r.unsqueeze(-1) * (xf - mu) / v.unsqueeze(-1)).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def component_of(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of clean samples x (for checking sampled mixture weights)."""
        r, *_ = self._responsibilities(x, torch.zeros(x.shape[0], dtype=self.means.dtype))
        return r.argmax(1)


def _as_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def reference_solution(world: GaussianMixture, x: torch.Tensor, sigma_max: float, sigma_end: float = 0.0,
                       steps: int = 4000) -> torch.Tensor:
    """Integrate the probability-flow ODE from sigma_max to sigma_end with classical RK4 in float64.

    The grid is Karras-spaced (rho = 7), which is dense where the trajectory bends; with 4000 steps the
    global error is below 1e-10 for the example world (the test checks this against scipy's DOP853).
    """
    x = x.to(torch.float64)
    rho = 7.0
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    lo = sigma_end ** (1 / rho)
    grid = (sigma_max ** (1 / rho) + ramp * (lo - sigma_max ** (1 / rho))) ** rho
    grid[-1] = sigma_end
    f = world.ode_derivative
    for s, s_next in zip(grid[:-1], grid[1:]):
        h = s_next - s
        k1 = f(x, s)
        k2 = f(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = f(x + h * k3, s_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x

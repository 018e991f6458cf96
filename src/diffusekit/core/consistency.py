"""Consistency models and Latent Consistency Distillation: the math on tensors.

A consistency function f(x, sigma) maps any point of one probability-flow ODE trajectory to the
trajectory's end (Song et al. 2023, "Consistency Models", Sec. 3). It is parameterised so that the
boundary condition f(x, sigma_min) = x holds exactly:

    f(x, sigma) = c_skip(t) x + c_out(t) D(x, sigma)

with D the network's x0 estimate (any `Denoiser`) and t the model's timestep of sigma. The scalings
are those of Latent Consistency Models (Luo et al. 2023, Sec. 4.2; the released LCM code and
diffusers' LCMScheduler): c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2) with
sigma_data sd = 0.5 and timestep scaling s = 10, so c_skip(0) = 1, c_out(0) = 0 and f is the plain
x0 estimate once t is more than a few steps. c_skip multiplies the variance-exploding x (ComfyUI's
ModelSamplingDiscrete "lcm"); diffusers applies it to the variance-preserving sample, the same thing
at t = 0 and within 1e-5 of it beyond.

Distillation (LCD, Luo et al. 2023, Algorithm 1): on a grid t_0 = 0 < t_1 < ... < t_N = T - 1, draw
n, noise a data latent to sigma_n, take one teacher ODE step (DDIM, with classifier-free guidance of
fixed scale w) to sigma_{n-1}, and regress the student's f(x_n, sigma_n) onto the target network's
f(x_{n-1}, sigma_{n-1}); the target network is an EMA of the student (Song et al. 2023, Algorithm 2).
"""
from __future__ import annotations

import torch

from .denoisers import Denoiser, FlowDenoiser, _batch_sigma, _expand

LCM_SIGMA_DATA, LCM_TIMESTEP_SCALING = 0.5, 10.0


def boundary_scalings(t: torch.Tensor, sigma_data: float = LCM_SIGMA_DATA,
                      timestep_scaling: float = LCM_TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at timestep t (LCM's `scalings_for_boundary_conditions`): 1 and 0 at t = 0."""
    st = timestep_scaling * t
    total = st ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, st * total.rsqrt()


class ConsistencyDenoiser(Denoiser):
    """A consistency model's x0 estimate f(x, sigma) = c_skip(t) x + c_out(t) D(x, sigma), D = `base`.

    The composition is itself a parameterisation: c_skip' = b_skip + b_out c_skip, c_out' = b_out c_out,
    c_in' = c_in, so samplers (LCM's multistep sampler above all) see an ordinary denoiser. `base` must
    be a discrete-schedule VE denoiser (eps, v): the boundary scalings are defined in its timesteps."""

    def __init__(self, base: Denoiser, sigma_data: float = LCM_SIGMA_DATA,
                 timestep_scaling: float = LCM_TIMESTEP_SCALING):
        if base.schedule is None or isinstance(base, FlowDenoiser):
            raise ValueError(f"consistency boundary scalings need a discrete eps / v denoiser over a timestep "
                             f"table; got {type(base).__name__} ({base.extra_repr()})")
        super().__init__(base.inner_model, base.schedule, sigma_min=base._sigma_min, sigma_max=base._sigma_max,
                         quantize=base.quantize, data_range=base.data_range)
        self.__dict__["base"] = base            # shares inner_model; not registered twice
        self.prediction = base.prediction
        self.sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)

    def scalings(self, sigma):
        c_skip, c_out, c_in = self.base.scalings(sigma)
        b_skip, b_out = boundary_scalings(self.sigma_to_t(sigma).to(sigma.dtype), self.sigma_data,
                                          self.timestep_scaling)
        return b_skip + b_out * c_skip, b_out * c_out, c_in

    def extra_repr(self) -> str:
        return f"consistency (LCM boundary, sigma_data={self.sigma_data}), {self.base.extra_repr()}"


def timestep_grid(num_timesteps: int, intervals: int) -> torch.Tensor:
    """The N + 1 distillation timesteps t_n = (T - 1) n / N, n = 0..N (float64). With N a multiple of
    k, the k-step "SGM Uniform" schedule (t = (T - 1)(1 - j / k)) lands on grid points."""
    if intervals < 1:
        raise ValueError(f"intervals={intervals}: need at least 1 (LCM: 50 on SD's 1000 steps)")
    return torch.linspace(0, num_timesteps - 1, intervals + 1, dtype=torch.float64)


def ddim_step(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12, eta = 0) per row, in the VE form:
    x_next = D + (x - D) sigma_next / sigma. Rows may have different sigmas ((B,) tensors); equals one
    step of `samplers.SAMPLERS["ddim"]` on the schedule [sigma, sigma_next]."""
    sigma, sigma_next = _batch_sigma(sigma, x), _batch_sigma(sigma_next, x)
    return denoised + (x - denoised) * _expand(sigma_next / sigma, x)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Mean of sqrt((pred - target)^2 + c^2) - c (the elementwise pseudo-Huber loss of the LCM code;
    Song & Dhariwal 2023 use it per sample): ~ squared error / 2c for small errors, ~ |error| beyond c."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c={c}: must be > 0 (LCM: 0.001)")
    d2 = (pred.float() - target.float()) ** 2
    return (d2 / ((d2 + c * c).sqrt() + c)).mean()   # = sqrt(d^2 + c^2) - c without the cancellation

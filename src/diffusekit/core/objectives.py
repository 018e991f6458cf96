"""Training objectives: what the network sees and what it regresses to, per parameterization.

For a discrete step t with a = sqrt(abar_t), s = sqrt(1 - abar_t) and x_t = a x0 + s eps (DDPM):
    eps  -> eps                      (Ho et al. 2020, L_simple)
    v    -> a eps - s x0             (Salimans & Ho 2022, "Progressive Distillation", sec. 4)
    x0   -> x0
For rectified flow at s in [0, 1]: x = (1 - s) x0 + s eps, target v = eps - x0 (Esser et al. 2024).
The targets are exactly what the matching wrapper in `denoisers` turns back into x0, which the tests
check. Loss weights: min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", eqs. 8-10).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .schedules import DiscreteSchedule

PREDICTIONS = ("eps", "v", "x0", "flow")


class TrainingPair(NamedTuple):
    model_input: torch.Tensor   # (B, ...) the noisy input fed to the network
    timestep: torch.Tensor      # (B,) the network's time input
    target: torch.Tensor        # (B, ...) the regression target


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class TrainingTarget:
    """Network input and regression target for prediction "eps" | "v" | "x0" | "flow".

    eps / v / x0 need the model's `DiscreteSchedule`; call with integer steps `t` (B,) or with VE
    noise levels `sigma` (B,) (then x_t = (x0 + sigma eps) / sqrt(sigma^2 + 1) and the time input is
    the interpolated step). flow takes `sigma` = s in [0, 1]; its time input is s * multiplier.
    """

    def __init__(self, prediction: str = "eps", schedule: DiscreteSchedule | None = None, *,
                 multiplier: float = 1000.0):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if prediction != "flow" and schedule is None:
            raise ValueError(f"prediction {prediction!r} needs the model's DiscreteSchedule")
        self.prediction, self.schedule, self.multiplier = prediction, schedule, float(multiplier)

    def _alpha_bar(self, t, sigma, like):
        """(abar as a (B,) float64 tensor, the network's time input)."""
        if (t is None) == (sigma is None):
            raise ValueError("pass exactly one of t (integer steps) or sigma (noise levels)")
        if t is not None:
            t = torch.as_tensor(t).reshape(-1)
            if t.is_floating_point() or (t < 0).any() or (t >= len(self.schedule)).any():
                raise ValueError(f"t must be integer steps in [0, {len(self.schedule) - 1}], got {t.tolist()}")
            return self.schedule.alphas_cumprod[t.cpu()], t.to(like.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        return 1 / (1 + sigma ** 2), self.schedule.sigma_to_t(sigma).to(device=like.device, dtype=torch.float32)

    def __call__(self, x0: torch.Tensor, noise: torch.Tensor, t=None, *, sigma=None) -> TrainingPair:
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        if self.prediction == "flow":
            if sigma is None or t is not None:
                raise ValueError("flow training takes sigma = s in [0, 1] (not t)")
            s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
            if ((s < 0) | (s > 1)).any():
                raise ValueError(f"flow sigmas must lie in [0, 1], got {s.tolist()}")
            sc = _col(s, x0)
            return TrainingPair((1 - sc) * x0 + sc * noise, (s * self.multiplier).to(x0.device, torch.float32),
                                noise - x0)
        abar, timestep = self._alpha_bar(t, sigma, x0)
        a, s = _col(abar.sqrt(), x0), _col((1 - abar).sqrt(), x0)
        x_t = a * x0 + s * noise
        target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[self.prediction]
        return TrainingPair(x_t, timestep, target)

    def snr(self, t=None, *, sigma=None) -> torch.Tensor:
        """Signal-to-noise ratio: abar / (1 - abar) = 1 / sigma^2 (flow: ((1 - s) / s)^2), float64."""
        if self.prediction == "flow":
            s = torch.as_tensor(sigma, dtype=torch.float64)
            return ((1 - s) / s) ** 2
        abar, _ = self._alpha_bar(t, sigma, torch.empty(0))
        return abar / (1 - abar)

    def sample(self, batch: int, *, generator: torch.Generator | None = None, device=None,
               sampling: str = "uniform", loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
        """Training noise levels: integer steps uniform in [0, T); flow: s uniform in [0, 1), or
        sampling="logit_normal": s = sigmoid(loc + scale * n), n ~ N(0, 1) (Esser et al. 2024, Sec. 3.1,
        eq. 19: density (1 / (scale sqrt(2 pi))) exp(-(logit(s) - loc)^2 / (2 scale^2)) / (s (1 - s));
        SD3 trains with loc 0, scale 1, which puts most steps at mid noise)."""
        if self.prediction == "flow":
            if sampling == "logit_normal":
                n = torch.randn(batch, generator=generator, dtype=torch.float64)
                return torch.sigmoid(loc + scale * n).to(device)
            if sampling != "uniform":
                raise ValueError(f"sampling={sampling!r}; valid: 'uniform', 'logit_normal'")
            return torch.rand(batch, generator=generator, dtype=torch.float64).to(device)
        if sampling != "uniform":
            raise ValueError(f"sampling={sampling!r} applies to flow training; discrete steps are uniform")
        return torch.randint(0, len(self.schedule), (batch,), generator=generator).to(device)


def min_snr_weights(snr: torch.Tensor, gamma: float = 5.0, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma loss weights of Hang et al. 2023 for an MSE on the `prediction` target.

    x0: min(snr, gamma); eps: min(snr, gamma) / snr (1 where snr = 0, the limit);
    v: min(snr, gamma) / (snr + 1).
    """
    snr = torch.as_tensor(snr)
    if prediction == "x0":
        return snr.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    raise ValueError(f"min-SNR weights are defined for 'eps', 'v', 'x0'; got {prediction!r}")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of (per-sample mean squared error) * weight."""
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_sample = per_sample * torch.as_tensor(weights, device=per_sample.device, dtype=per_sample.dtype)
    return per_sample.mean()


def offset_noise(noise: torch.Tensor, strength: float = 0.1, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): noise + strength * n, where n is one
    normal draw per sample and channel, constant over the spatial dims ((B, C, 1, 1) for images).

    Lets the model learn to shift an image's mean brightness. Drawn on the generator's device (CPU
    by default), then moved to noise's device and dtype.
    """
    if noise.ndim < 2:
        raise ValueError(f"noise must be (B, C, ...), got shape {tuple(noise.shape)}")
    gen_device = generator.device if generator is not None else "cpu"
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
    offset = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise + strength * offset.to(device=noise.device, dtype=noise.dtype)

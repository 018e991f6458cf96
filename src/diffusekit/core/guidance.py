"""Classifier-free guidance: wrap a denoiser, return a denoiser.

Ho & Salimans 2022: D_guided = D_uncond + scale * (D_cond - D_uncond), applied here to the x0
predictions (for the eps and v wrappers this is the same as guiding eps / v, since D is affine in the
network output with the same coefficients for both halves). The conditional and unconditional halves
go through the network as ONE batch: x, sigma and every tensor of the cond dicts are concatenated
along dim 0. At scale 1 the unconditional pass is skipped (ComfyUI does the same). The negative
prompt is simply the text of `uncond`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def _stack_conds(conds: Sequence[dict], batch: int) -> dict:
    """Concatenate the i-th value of each cond dict along dim 0 (tensors) or check they agree (others).

    A tensor with batch 1 is expanded to `batch` first (one prompt for several images).
    """
    keys = set(conds[0])
    for i, c in enumerate(conds[1:], 1):
        if set(c) != keys:
            raise ValueError(f"cond dicts must have the same keys: {sorted(keys)} vs {sorted(c)} (dict {i})")
    out = {}
    for k in sorted(keys):
        vals = [c[k] for c in conds]
        if all(torch.is_tensor(v) for v in vals):
            shapes = [tuple(v.shape) for v in vals]
            if len(set(shapes)) != 1:
                raise ValueError(f"cond tensor {k!r} must have the same shape in every branch to be batched, "
                                 f"got {shapes} (pad cond and uncond prompts to the same number of chunks)")
            if vals[0].ndim == 0 or vals[0].shape[0] not in (1, batch):
                raise ValueError(f"cond tensor {k!r} must have batch 1 or {batch} (the latent's) in dim 0, "
                                 f"got shape {shapes[0]}")
            out[k] = torch.cat([v.expand(batch, *v.shape[1:]) for v in vals])
        elif any(torch.is_tensor(v) for v in vals):
            raise ValueError(f"cond {k!r} is a tensor in some branches and not in others")
        else:
            if any(v != vals[0] for v in vals[1:]):
                raise ValueError(f"non-tensor cond {k!r} must be equal in every branch, got {vals}")
            out[k] = vals[0]
    return out


def _repeat_extra(extra: dict, n: int, batch: int) -> dict:
    """Call-time kwargs apply to every branch: tensors with batch B are repeated n times."""
    return {k: torch.cat([v] * n) if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v
            for k, v in extra.items()}


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale, eqs. 15-17 of Lin et al. 2023 ("Common Diffusion Noise Schedules ... are Flawed").

    Per sample: rescaled = guided * std(cond) / std(guided) (std over all non-batch dims), then
    phi * rescaled + (1 - phi) * guided.
    """
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    # a constant guided prediction (std 0) is left as it is rather than turned into NaN
    ratio = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(torch.finfo(guided.dtype).tiny), 1.0)
    rescaled = guided * ratio
    return phi * rescaled + (1 - phi) * guided


class _Guided:
    """A guided denoiser: forwards sigma_min / sigma_max / sigma_to_t / prediction ... to the inner one."""

    def __init__(self, denoiser: Callable):
        self.inner = denoiser

    def __getattr__(self, name):
        if name == "inner":  # not yet set (copy/pickle): do not recurse
            raise AttributeError(name)
        return getattr(self.inner, name)


class CFG(_Guided):
    """D(x, sigma) = D_u + scale * (D_c - D_u), optionally rescaled; one batched network call."""

    def __init__(self, denoiser: Callable, scale: float, cond: dict, uncond: dict, rescale: float = 0.0):
        super().__init__(denoiser)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be in [0, 1], got {rescale}")
        self.scale, self.cond, self.uncond, self.rescale = float(scale), dict(cond), dict(uncond), float(rescale)

    def __call__(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        if self.scale == 1.0:  # D_u + 1 * (D_c - D_u) = D_c: skip the unconditional half
            return self.inner(x, sigma, **_stack_conds([self.cond], x.shape[0]), **extra)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.reshape(1).expand(b) if sigma.numel() == 1 else sigma
        conds = _stack_conds([self.cond, self.uncond], b)
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **conds, **_repeat_extra(extra, 2, b))
        d_cond, d_uncond = out[:b], out[b:]
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        return rescale_guidance(guided, d_cond, self.rescale) if self.rescale > 0 else guided


class Composable(_Guided):
    """A1111 "AND" prompts (Liu et al. 2022, Composable Diffusion): D_u + sum_i w_i scale (D_i - D_u).

    All K conds and the uncond go through the network as one batch of (K + 1) * B.
    """

    def __init__(self, denoiser: Callable, scale: float, conds: Sequence[tuple[dict, float]], uncond: dict):
        super().__init__(denoiser)
        if not conds:
            raise ValueError("composable guidance needs at least one (cond, weight) pair")
        self.scale = float(scale)
        self.conds = [(dict(c), float(w)) for c, w in conds]
        self.uncond = dict(uncond)

    def __call__(self, x: torch.Tensor, sigma, **extra) -> torch.Tensor:
        b, k = x.shape[0], len(self.conds)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.reshape(1).expand(b) if sigma.numel() == 1 else sigma
        stacked = _stack_conds([c for c, _ in self.conds] + [self.uncond], b)
        out = self.inner(torch.cat([x] * (k + 1)), torch.cat([sigma] * (k + 1)), **stacked,
                         **_repeat_extra(extra, k + 1, b))
        d_uncond = out[k * b:]
        guided = d_uncond.clone()
        for i, (_, w) in enumerate(self.conds):
            guided = guided + w * self.scale * (out[i * b:(i + 1) * b] - d_uncond)
        return guided


def cfg(denoiser: Callable, scale: float, cond: dict, uncond: dict, *, rescale: float = 0.0) -> CFG:
    """Classifier-free guidance around `denoiser`; returns a denoiser `(x, sigma, **extra) -> x0`.

    cond / uncond: keyword arguments of the network for each branch (e.g. {"context": (B, 77, 768)});
    their tensors must have equal shapes. rescale: phi of CFG rescale (0 = off, 0.7 typical).
    """
    return CFG(denoiser, scale, cond, uncond, rescale)


def composable(denoiser: Callable, scale: float, conds: Sequence[tuple[dict, float]], uncond: dict) -> Composable:
    """Composable guidance for A1111 "AND" prompts: `conds` is a list of (cond dict, weight)."""
    return Composable(denoiser, scale, conds, uncond)

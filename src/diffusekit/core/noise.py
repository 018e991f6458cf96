"""Seeded noise that does not depend on the device or the batch size.

A1111 and ComfyUI users expect one seed to give one image (A1111 #7773, #9207; ComfyUI #203). The
rule here: every image of a batch owns a CPU `torch.Generator`; noise is drawn on the CPU, row by row,
in float32, then moved to the latent's device and dtype. A batch of four is then bit-identical to four
single runs, and a CUDA run starts from the same numbers as a CPU run.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def generators_for_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn(shape: Sequence[int], generator: Generators = None, *, dtype=torch.float32,
          device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of `shape` (batch first).

    generator: None (torch's global RNG), one generator (drawn in one call, as torch.randn does), or a
    list with one generator per batch row (each row drawn from its own; the batch-invariant mode).
    """
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        out = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    else:
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}: pass one per image")
        out = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32, device="cpu") for g in gens])
    return out.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Noise with the shape, dtype and device of x, drawn as `randn` describes."""
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)


def seeds_from_generators(generator: Generators, batch: int) -> list[int]:
    """Derive one 63-bit seed per image from the generators (for Brownian trees), advancing them."""
    if generator is None or isinstance(generator, torch.Generator):
        draws = torch.randint(0, 2**63 - 1, (batch,), generator=generator)
        return [int(d) for d in draws]
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}: pass one per image")
    return [int(torch.randint(0, 2**63 - 1, (1,), generator=g)) for g in gens]

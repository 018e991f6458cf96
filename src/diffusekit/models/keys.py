"""State-dict key helpers shared by the loaders and converters: the expected keys and shapes of a module
(built on the meta device: no memory, no init cost) and the short key list an error message names."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def module_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of the module `build()` makes, built on the meta device."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def key_list(keys: Iterable[str], limit: int = 5) -> str:
    """The first `limit` of `keys`, sorted, and how many there are in all: "a, b, ... (12 in all)"."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

"""Exponential moving average of weights (Polyak averaging), as LDM's `LitEma` keeps it.

shadow <- d * shadow + (1 - d) * param after every optimizer step, with the warm-up
d_n = min(decay, (1 + n) / (10 + n)) so early, still-random weights fade out fast.
The averaged weights are what the project samples from and ships.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """EMA of the floating-point parameters and buffers of `module` (kept in float32)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay}; must be in (0, 1) (typical: 0.999 - 0.9999)")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.is_floating_point()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        state = module.state_dict()
        keys = [k for k in state if k in self.shadow]
        if keys:   # one fused call: hundreds of per-tensor launches dominate a small model's GPU step
            torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach().float() for k in keys], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into `module` (same architecture)."""
        state = module.state_dict()
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"module lacks EMA entries {missing[:5]}")
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the module's parameters")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}

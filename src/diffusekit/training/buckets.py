"""Aspect-ratio bucketing (NovelAI 2022, "NovelAI Improvements on Stable Diffusion"; kohya-ss
sd-scripts `BucketManager`) with SDXL's size and crop conditioning (Podell et al. 2023, Sec. 2.2).

Buckets are (width, height) pairs, multiples of `step` pixels, of about the training area size x size
and aspect ratio at most `max_ratio`. Each image goes to the bucket whose ratio is nearest its own, is
resized to cover it and centre-cropped; the item keeps `original_size` (h, w), `crop_coords`
(top, left) in the resized image, and `target_size` (h, w): SDXL's conditioning numbers.

`BucketOrder` is the data order of a bucketed dataset: every global batch comes from one bucket (one
tensor shape), and like `trainer.DataOrder` the order is a pure function of (seed, epoch), so resume
and any number of processes see the same batches.
"""
from __future__ import annotations

import math

import torch
from PIL import Image

from .datasets.folder import ImageFolderDataset

__all__ = ["make_buckets", "nearest_bucket", "BucketedFolder", "BucketOrder"]


def make_buckets(size: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) buckets: for each width, the largest height (multiple of `step`) with w * h <= size^2,
    kept when max(w/h, h/w) <= max_ratio; sorted by aspect ratio, the square bucket included."""
    if size % step:
        raise ValueError(f"size={size} must be a multiple of the bucket step {step}")
    area, out = size * size, {(size, size)}
    w = step
    while w <= size * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of nearest log aspect ratio (ties: the larger area)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def resize_cover_crop(img: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers the bucket, centre-crop to it; returns (image, (top, left))."""
    bw, bh = bucket
    w, h = img.size
    s = max(bw / w, bh / h)
    img = img.resize((max(bw, round(w * s)), max(bh, round(h * s))), Image.BICUBIC)
    left, top = (img.size[0] - bw) // 2, (img.size[1] - bh) // 2
    return img.crop((left, top, left + bw, top + bh)), (top, left)


class BucketedFolder:
    """An ImageFolder (captions from metadata.jsonl or .txt files) whose items keep their aspect ratio:
    `ds[i] -> {"image", "caption", "bucket": (w, h), "original_size", "crop_coords", "target_size"}`."""

    def __init__(self, root, size: int, step: int = 64, max_ratio: float = 2.0, length: int | None = None):
        self.folder = ImageFolderDataset(root, size=size, length=length)
        self.buckets = make_buckets(size, step, max_ratio)
        self.item_bucket = []
        for path, _ in self.folder.items:
            with Image.open(path) as im:
                self.item_bucket.append(nearest_bucket(*im.size, self.buckets))

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.folder.items[index]
        bucket = self.item_bucket[index]
        with Image.open(path) as im:
            im = im.convert("RGB")
            original = (im.size[1], im.size[0])
            img, crop = resize_cover_crop(im, bucket)
        return {"image": img, "caption": caption, "path": str(path), "bucket": bucket,
                "original_size": original, "crop_coords": crop, "target_size": (bucket[1], bucket[0])}


class BucketOrder:
    """Global batches of `batch` items from one bucket each. Epoch e: shuffle the items (seeded by
    (seed, e)), group them by bucket in that order, cut each group into batches (a short last batch is
    filled from the group's start, as kohya repeats images), and shuffle the batches."""

    def __init__(self, item_bucket: list, batch: int, seed: int):
        if not item_bucket:
            raise ValueError("the dataset is empty")
        self.item_bucket, self.batch, self.seed = list(item_bucket), batch, seed
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(len(self.item_bucket), generator=g).tolist()
            groups: dict = {}
            for i in perm:
                groups.setdefault(self.item_bucket[i], []).append(i)
            batches = []
            for items in groups.values():
                for lo in range(0, len(items), self.batch):
                    b = items[lo:lo + self.batch]
                    while len(b) < self.batch:
                        b = b + items[: self.batch - len(b)]
                    batches.append(b)
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch, self._batches = epoch, [batches[k] for k in order]
        return self._batches

    def indices(self, start: int, count: int) -> list[int]:
        """The batch of global step start // count (count must be the batch size)."""
        if count != self.batch or start % count:
            raise ValueError(f"BucketOrder serves whole batches of {self.batch}; asked for {count} at {start}")
        n = len(self._epoch_batches(0))   # the same every epoch: sum over buckets of ceil(items / batch)
        epoch, k = divmod(start // count, n)
        return list(self._epoch_batches(epoch)[k])

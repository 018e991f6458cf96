"""`shapes`: procedurally drawn, captioned 64x64 images with ground-truth attributes.

One or two objects (circle, square, triangle, star, diamond) in named colours, sizes and positions on a
coloured background, captioned in several phrasings. Item i of a dataset with seed s is a pure function
of (s, i), so the data is unlimited and reproducible; every image keeps its attributes, so prompt
adherence of a model trained on it can be measured exactly (see `diffusekit.evaluation.shapes_detector`).

About a tenth of the (shape, colour, background) combinations are held out of training
(`is_heldout`), so evaluation prompts test composition, not memory.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Shapes the renderer and the detector know but the dataset never draws: concepts a fine-tune can
# teach the shipped model (evaluation/concept.py). Not in SHAPES, so the dataset is unchanged.
NEW_SHAPES = ("hexagon",)
# Named colours, far apart in RGB so that the detector can name a pixel's colour without doubt.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = ("white", "black", "blue", "green", "yellow", "purple")
SIZES = {"small": 9.0, "large": 17.0}          # circumradius in pixels at 64x64
POSITIONS = {                                   # object centre as a fraction of the canvas
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    caption: str = field(default="", compare=False)


def is_heldout(shape: str, color: str, background: str) -> bool:
    """Deterministic ~10% of (shape, colour, background) combinations never seen in training."""
    h = hashlib.sha256(f"{shape}|{color}|{background}".encode()).digest()
    return h[0] < 26


def _valid_combo(obj_color: str, background: str) -> bool:
    return obj_color != background


def random_scene(rng: random.Random, *, heldout: bool = False, max_objects: int = 2) -> Scene:
    """Draw a scene; heldout=False never returns a held-out combination, heldout=True only those
    (single object) so that evaluation prompts are new to the model."""
    while True:
        background = rng.choice(BACKGROUNDS)
        n = 1 if heldout else rng.choice((1, 1, 2)) if max_objects >= 2 else 1
        positions = [rng.choice(tuple(POSITIONS))] if n == 1 else list(rng.choice(PAIR_LAYOUTS))
        objs = []
        for pos in positions:
            color = rng.choice(tuple(COLORS))
            shape = rng.choice(SHAPES)
            size = rng.choice(tuple(SIZES)) if n == 1 else "small"
            objs.append(ShapeObject(shape, color, size, pos))
        if not all(_valid_combo(o.color, background) for o in objs):
            continue
        held = [is_heldout(o.shape, o.color, background) for o in objs]
        if heldout != any(held) or (heldout and not all(held)):
            continue
        scene = Scene(background, tuple(objs))
        return Scene(background, tuple(objs), caption(scene, rng))


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings, chosen by rng."""
    bg = scene.background
    if len(scene.objects) == 1:
        o = scene.objects[0]
        where = POSITION_PHRASES[o.position]
        forms = (
            f"a {o.size} {o.color} {o.shape} {where}, {bg} background",
            f"{bg} background with a {o.size} {o.color} {o.shape} {where}",
            f"a {o.color} {o.shape} on a {bg} background",
            f"{o.size} {o.color} {o.shape} {where} on {bg}",
        )
        return rng.choice(forms)
    a, b = scene.objects
    forms = (
        f"a {a.color} {a.shape} {POSITION_PHRASES[a.position]} and a {b.color} {b.shape} "
        f"{POSITION_PHRASES[b.position]}, {bg} background",
        f"{bg} background, {a.color} {a.shape} {POSITION_PHRASES[a.position]}, "
        f"{b.color} {b.shape} {POSITION_PHRASES[b.position]}",
    )
    return rng.choice(forms)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the polygonal shapes (y grows downwards); None for the circle."""
    if shape == "square":
        h = r / math.sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":   # apex up, centroid at (cx, cy)
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "star":       # five points, inner radius 0.45 r
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        return pts
    if shape == "hexagon":    # regular, a vertex at the top
        return [(cx + r * math.cos(math.pi / 2 + k * math.pi / 3), cy - r * math.sin(math.pi / 2 + k * math.pi / 3))
                for k in range(6)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES + NEW_SHAPES)}")


def render(scene: Scene, size: int = 64, rng: random.Random | None = None, supersample: int = 4) -> Image.Image:
    """Draw the scene (antialiased by supersampling). rng adds a small jitter of position and size."""
    big = size * supersample
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fx, fy = POSITIONS[o.position]
        r = SIZES[o.size] * size / 64
        if rng is not None:
            fx += rng.uniform(-0.04, 0.04)
            fy += rng.uniform(-0.04, 0.04)
            r *= rng.uniform(0.9, 1.1)
        cx, cy, rs = fx * big, fy * big, r * supersample
        poly = shape_polygon(o.shape, cx, cy, rs)
        if poly is None:
            draw.ellipse([cx - rs, cy - rs, cx + rs, cy + rs], fill=COLORS[o.color])
        else:
            draw.polygon(poly, fill=COLORS[o.color])
    return img.resize((size, size), Image.LANCZOS) if supersample > 1 else img


def _item_rng(seed: int, index: int) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"shapes:{seed}:{index}".encode()).digest()[:8], "little"))


class ShapesDataset:
    """Unlimited, deterministic captioned shapes. `ds[i]` -> dict(image=PIL, caption=str, scene=Scene).

    length: the nominal size (for epochs and samplers); any index is valid. split="heldout" draws only
    single-object scenes whose combination is held out of the "train" split.
    """

    def __init__(self, seed: int = 0, size: int = 64, length: int = 100_000, split: str = "train",
                 max_objects: int = 2):
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}; valid: 'train', 'heldout'")
        if size < 16 or size % 8:
            raise ValueError(f"size={size}: must be a multiple of 8, at least 16")
        self.seed, self.size, self.length, self.split, self.max_objects = seed, size, length, split, max_objects

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        return random_scene(_item_rng(self.seed, index), heldout=self.split == "heldout", max_objects=self.max_objects)

    def __getitem__(self, index: int) -> dict:
        rng = _item_rng(self.seed, index)
        scene = random_scene(rng, heldout=self.split == "heldout", max_objects=self.max_objects)
        return {"image": render(scene, self.size, rng), "caption": scene.caption, "scene": scene}


def to_tensor_array(image: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 array (3, H, W) in [-1, 1], the range the models train on."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0

"""`shapes`: procedurally drawn, captioned 64x64 images with ground-truth attributes.

One or two objects (circle, square, triangle, star, diamond) in named colours, sizes and positions on a
coloured background, captioned in many phrasings. Item i of a dataset with seed s is a pure function
of (s, i), so the data is unlimited and reproducible; every image keeps its attributes, so prompt
adherence of a model trained on it can be measured exactly (see `diffusekit.evaluation.shapes_detector`).

Two things are held out of training, so that evaluation prompts test composition and wording, not memory:
- about a tenth of the (shape, colour, background) combinations (`is_heldout`);
- about a fifth of the caption templates (`HELDOUT_SINGLE_TEMPLATES`, `HELDOUT_PAIR_TEMPLATES`): phrasings
  built from the same words and parts as the training ones, in orders and forms never used in training.

Styles: "robust" (the default) has all 8 colours as backgrounds and the template grammar below;
"legacy" is the first release's data, item for item (6 backgrounds, 4 + 2 phrasings), which the first
`shapes` model was trained on and its card measured.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
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
BACKGROUNDS = tuple(COLORS)                     # every colour is a background (never the object's colour)
LEGACY_BACKGROUNDS = ("white", "black", "blue", "green", "yellow", "purple")   # the first release's six
SIZES = {"small": 9.0, "large": 17.0}          # circumradius in pixels at 64x64
POSITIONS = {                                   # object centre as a fraction of the canvas
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))
STYLES = ("robust", "legacy")
SPLITS = ("train", "heldout", "heldout_pairs")


# ------------------------------------------------------------------------------------ caption templates
# A template is a format string over {A} (an article, "a" or "an" as the next word needs), {bg}, and per
# object {size}, {color}, {shape}, {where} (single) or {color1} {shape1} {where1} / {color2} ... (pairs).
def _single_objects() -> list[str]:
    """The 8 object phrases: article or not x size or not x position or not."""
    out = []
    for art, size, pos in itertools.product((True, False), repeat=3):
        words = (["{A}"] if art else []) + (["{size}"] if size else []) + ["{color}", "{shape}"]
        out.append(" ".join(words) + (" {where}" if pos else ""))
    return out


def _pair_objects() -> list[str]:
    """The 8 two-object phrases: article or not x "and" or a comma x which object comes first."""
    out = []
    for art, joiner, first in itertools.product((True, False), (" and ", ", "), (1, 2)):
        a = "{A} " if art else ""
        o1, o2 = (f"{a}{{color{k}}} {{shape{k}}} {{where{k}}}" for k in ((1, 2) if first == 1 else (2, 1)))
        out.append(o1 + joiner + o2)
    return out


# the background before or after the object(s): 4 + 4 forms
_BG_AFTER = (", {bg} background", " on {A} {bg} background", " on {bg}", ", on {A} {bg} background")
_BG_BEFORE = ("{bg} background, ", "{bg} background with ", "on {A} {bg} background, ", "{A} {bg} background with ")


def _grammar(objects: list[str]) -> tuple[str, ...]:
    return tuple([o + b for b in _BG_AFTER for o in objects] + [b + o for b in _BG_BEFORE for o in objects])


# the first release's phrasings: always training templates (and the "legacy" style's only ones)
LEGACY_SINGLE_TEMPLATES = (
    "{A} {size} {color} {shape} {where}, {bg} background",
    "{bg} background with {A} {size} {color} {shape} {where}",
    "{A} {color} {shape} on {A} {bg} background",
    "{size} {color} {shape} {where} on {bg}",
)
LEGACY_PAIR_TEMPLATES = (
    "{A} {color1} {shape1} {where1} and {A} {color2} {shape2} {where2}, {bg} background",
    "{bg} background, {color1} {shape1} {where1}, {color2} {shape2} {where2}",
)
# the issue's examples of what users type ("on a green background, a large blue triangle", "purple
# background, green square"): always held out, so the evaluation measures them
_FORCED_HELDOUT = ("on {A} {bg} background, {A} {size} {color} {shape}", "{bg} background, {color} {shape}")


def _held_template(t: str) -> bool:
    if t in LEGACY_SINGLE_TEMPLATES or t in LEGACY_PAIR_TEMPLATES:
        return False
    return t in _FORCED_HELDOUT or hashlib.sha256(f"template|{t}".encode()).digest()[0] < 52   # ~20%


SINGLE_TEMPLATES = _grammar(_single_objects())       # 64
PAIR_TEMPLATES = _grammar(_pair_objects())           # 64
HELDOUT_SINGLE_TEMPLATES = tuple(t for t in SINGLE_TEMPLATES if _held_template(t))
HELDOUT_PAIR_TEMPLATES = tuple(t for t in PAIR_TEMPLATES if _held_template(t))
TRAIN_SINGLE_TEMPLATES = tuple(t for t in SINGLE_TEMPLATES if not _held_template(t))
TRAIN_PAIR_TEMPLATES = tuple(t for t in PAIR_TEMPLATES if not _held_template(t))
LEGACY_SHARE = 0.25    # training captions drawn from the first release's phrasings this often (the rest: any train template)


def _with_articles(text: str) -> str:
    """Resolve each {A} marker (written as \x00) to "a" or "an" by the next word's first letter."""
    return re.sub("\x00 (\\w)", lambda m: ("an " if m.group(1) in "aeiou" else "a ") + m.group(1), text)


def fill_template(template: str, scene: "Scene", articles: bool = True) -> str:
    """The caption `template` gives `scene` (one object for a single template, two for a pair one).
    articles=False writes every {A} as "a" (the first release did: "a orange circle")."""
    fields = {"A": "\x00" if articles else "a", "bg": scene.background}
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        fields.update(size=o.size, color=o.color, shape=o.shape, where=POSITION_PHRASES[o.position])
    else:
        for k, o in enumerate(objs, 1):
            fields.update({f"color{k}": o.color, f"shape{k}": o.shape, f"where{k}": POSITION_PHRASES[o.position]})
    return _with_articles(template.format(**fields))


def template_mentions(template: str) -> set[str]:
    """Which optional attributes a template names: a subset of {"size", "position"}."""
    return {name for name, key in (("size", "{size}"), ("position", "{where")) if key in template}


# ------------------------------------------------------------------------------------ scenes
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
    template: str = field(default="", compare=False)   # the caption's template ("" for a hand-made scene)


def is_heldout(shape: str, color: str, background: str) -> bool:
    """Deterministic ~10% of (shape, colour, background) combinations never seen in training."""
    h = hashlib.sha256(f"{shape}|{color}|{background}".encode()).digest()
    return h[0] < 26


def _valid_combo(obj_color: str, background: str) -> bool:
    return obj_color != background


def random_scene(rng: random.Random, *, heldout: bool = False, max_objects: int = 2, style: str = "robust",
                 pairs: bool = False, pair_share: float | None = None) -> Scene:
    """Draw a scene; heldout=False never returns a held-out combination, heldout=True only those, with a
    held-out template (robust style); pairs=True (with heldout) draws two objects instead of one.
    pair_share: the chance of a two-object training scene (None: one in three, the releases' draw).
    style="legacy" is the first release's draw (six backgrounds, its phrasings), rng call for rng call."""
    backgrounds = LEGACY_BACKGROUNDS if style == "legacy" else BACKGROUNDS
    while True:
        background = rng.choice(backgrounds)
        if heldout or max_objects < 2:
            n = 2 if heldout and pairs else 1
        elif pair_share is None:
            n = rng.choice((1, 1, 2))
        else:
            n = 2 if rng.random() < pair_share else 1
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
        template, text = _phrase(scene, rng, style, heldout)
        return Scene(background, tuple(objs), text, template)


def _phrase(scene: Scene, rng: random.Random, style: str, heldout: bool) -> tuple[str, str]:
    """(template, caption) of `scene`: a template of the style's set (held-out ones with heldout), chosen by rng."""
    legacy = style == "legacy"
    template = (_legacy_template if legacy else _robust_template)(scene, rng, heldout)
    return template, fill_template(template, scene, articles=not legacy)


def _legacy_template(scene: Scene, rng: random.Random, heldout: bool) -> str:
    return rng.choice(LEGACY_SINGLE_TEMPLATES if len(scene.objects) == 1 else LEGACY_PAIR_TEMPLATES)


def _robust_template(scene: Scene, rng: random.Random, heldout: bool) -> str:
    single = len(scene.objects) == 1
    if heldout:
        return rng.choice(HELDOUT_SINGLE_TEMPLATES if single else HELDOUT_PAIR_TEMPLATES)
    if rng.random() < LEGACY_SHARE:
        return rng.choice(LEGACY_SINGLE_TEMPLATES if single else LEGACY_PAIR_TEMPLATES)
    return rng.choice(TRAIN_SINGLE_TEMPLATES if single else TRAIN_PAIR_TEMPLATES)


def caption(scene: Scene, rng: random.Random, heldout: bool = False) -> str:
    """One of the training phrasings of `scene` (held-out ones with heldout=True), chosen by rng."""
    return fill_template(_robust_template(scene, rng, heldout), scene)


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
    single-object scenes whose combination is held out of the "train" split, captioned by held-out
    templates (robust style); "heldout_pairs" likewise with two objects (robust style only).
    style: "robust" (8 backgrounds, the template grammar) or "legacy" (the first release's data).
    pair_share: the chance of a two-object scene in the train split (None: one in three).
    """

    def __init__(self, seed: int = 0, size: int = 64, length: int = 100_000, split: str = "train",
                 max_objects: int = 2, style: str = "robust", pair_share: float | None = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; valid: {', '.join(map(repr, SPLITS))}")
        if style not in STYLES:
            raise ValueError(f"style={style!r}; valid: {', '.join(map(repr, STYLES))}")
        if split == "heldout_pairs" and style == "legacy":
            raise ValueError("split='heldout_pairs' exists in the robust style only (the legacy data held out "
                             "single objects)")
        if pair_share is not None and not 0 <= pair_share <= 1:
            raise ValueError(f"pair_share={pair_share}; must be in [0, 1] (or None: one scene in three)")
        if size < 16 or size % 8:
            raise ValueError(f"size={size}: must be a multiple of 8, at least 16")
        self.seed, self.size, self.length, self.split, self.max_objects = seed, size, length, split, max_objects
        self.style, self.pair_share = style, pair_share

    def __len__(self) -> int:
        return self.length

    def _scene(self, rng: random.Random) -> Scene:
        return random_scene(rng, heldout=self.split != "train", max_objects=self.max_objects, style=self.style,
                            pairs=self.split == "heldout_pairs", pair_share=self.pair_share)

    def scene(self, index: int) -> Scene:
        return self._scene(_item_rng(self.seed, index))

    def __getitem__(self, index: int) -> dict:
        rng = _item_rng(self.seed, index)
        scene = self._scene(rng)
        return {"image": render(scene, self.size, rng), "caption": scene.caption, "scene": scene}

    def captions(self, index: int, k: int) -> list[str]:
        """k phrasings of item `index`'s scene: its own caption first, then k - 1 more drawn from the same
        template set (the split's, the style's), deterministic per (seed, index, j). Lets one rendered
        scene (one cached latent) train with many wordings (`data.captions_per_item`)."""
        scene = self.scene(index)
        out = [scene.caption]
        for j in range(1, k):
            rng = random.Random(int.from_bytes(
                hashlib.sha256(f"shapes-caption:{self.seed}:{index}:{j}".encode()).digest()[:8], "little"))
            out.append(_phrase(scene, rng, self.style, self.split != "train")[1])
        return out


def to_tensor_array(image: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 array (3, H, W) in [-1, 1], the range the models train on."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0

"""A concept the shipped `shapes` model cannot draw, for measuring fine-tuning: an orange background.

The shapes world paints objects in eight colours but backgrounds in only six (`BACKGROUNDS` lacks
orange and red), so the base model has seen "orange" as an object colour and never as a background
(asked for one, it paints yellow or white). The exact detector already knows the colour (its palette
is `COLORS`), so the concept is measured without any new detector code: `detect(img).background ==
"orange"`.

- `concept_scene(rng)`: one single-object scene on the new background (the object never orange);
- `write_concept_folder(folder, n)`: n such images with captions in metadata.jsonl (ImageFolder), the
  training set of `configs/finetune_shapes_lora.toml`; `word` writes another word than "orange" for
  the background in the captions (textual inversion trains a new word there);
- `heldout_concept_scenes(n)`: evaluation scenes whose captions are not training captions;
- `concept_scores(images, scenes)`: the fraction showing the new background, and shape+colour.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from ..training.datasets.shapes import COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject, caption, render
from .shapes_detector import detect, score

__all__ = ["CONCEPT_BACKGROUND", "concept_scene", "write_concept_folder", "heldout_concept_scenes", "concept_scores"]

CONCEPT_BACKGROUND = "orange"


def concept_scene(rng: random.Random, word: str = CONCEPT_BACKGROUND) -> tuple[Scene, str]:
    """(scene to render on the orange background, its caption with `word` naming the background)."""
    color = rng.choice([c for c in COLORS if c != CONCEPT_BACKGROUND])
    obj = ShapeObject(rng.choice(SHAPES), color, rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS)))
    scene = Scene(CONCEPT_BACKGROUND, (obj,))
    return scene, caption(replace(scene, background=word), rng)


def write_concept_folder(folder: str | Path, n: int = 200, seed: int = 0, word: str = CONCEPT_BACKGROUND,
                         size: int = 64) -> Path:
    """n captioned 64x64 images of the concept in the ImageFolder layout (PNG + metadata.jsonl)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = random.Random(f"concept:{seed}:{i}")
        scene, text = concept_scene(rng, word)
        render(scene, size, rng).save(folder / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def heldout_concept_scenes(n: int = 100, train_n: int = 200, train_seed: int = 0, seed: int = 1,
                           word: str = CONCEPT_BACKGROUND) -> list[tuple[Scene, str]]:
    """n (scene, caption) pairs whose captions are not among the first `train_n` training captions."""
    seen = {concept_scene(random.Random(f"concept:{train_seed}:{i}"), word)[1] for i in range(train_n)}
    out, i = [], 0
    while len(out) < n:
        scene, text = concept_scene(random.Random(f"concept-eval:{seed}:{i}"), word)
        i += 1
        if text not in seen:
            out.append((scene, text))
    return out


def concept_scores(images, scenes: list[Scene]) -> dict[str, float]:
    """Fractions over the images: `background` (shows the orange background), `shape_color`."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    marks = [score(detect(img), s) for img, s in zip(images, scenes)]
    return {k: sum(m[k] for m in marks) / len(marks) for k in ("background", "shape_color")}

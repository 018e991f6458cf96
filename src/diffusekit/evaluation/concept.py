"""A concept the shipped `shapes` model cannot draw, for measuring fine-tuning: a hexagon.

The shapes world draws five shapes (`SHAPES`); `NEW_SHAPES` adds a regular hexagon that the renderer
and the detector know but the dataset never draws, so the shipped model has never seen one (asked for
"a red hexagon" it draws a circle or a square, with the right colour). The VAE reconstructs hexagons
(mean error < 1/255), so the concept is within reach of the UNet and text encoder alone. (An unseen
background colour is not: the shipped VAE decodes an orange background as yellow, so no UNet-side
fine-tune can draw one.) The exact detector, given `SHAPES + NEW_SHAPES` as candidates, names it.

- `concept_scene(rng, word)`: one hexagon (colour, size, position) on one of the six backgrounds, and
  its caption with `word` naming the shape ("hexagon"; textual inversion trains a new word instead);
- `write_concept_folder(folder, n)`: n such images with captions in metadata.jsonl (ImageFolder), the
  training set of `configs/finetune_shapes_lora.toml`;
- `heldout_concept_scenes(n)`: evaluation scenes whose captions are not training captions;
- `concept_scores(images, scenes)`: detector scores (shape_color = a hexagon of the asked colour).
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from ..training.datasets.shapes import (COLORS, LEGACY_BACKGROUNDS, LEGACY_SINGLE_TEMPLATES, NEW_SHAPES, POSITIONS,
                                        SHAPES, SIZES, Scene, ShapeObject, fill_template, render)
from .shapes_detector import detect, score

__all__ = ["CONCEPT", "ALL_SHAPES", "concept_scene", "write_concept_folder", "heldout_concept_scenes",
           "concept_scores", "evaluate_finetune"]

CONCEPT = "hexagon"
ALL_SHAPES = SHAPES + NEW_SHAPES


# the old vocabulary is scored on the prompt set of the data the base (`shapes`, first release) learnt
# from, as the concept data is: the robust set (main's default since the robust captions) has phrasings
# and backgrounds the base never saw, which would read as a regression the LoRA did not cause
OLD_PROMPTS = "legacy"


def concept_scene(rng: random.Random, word: str = CONCEPT) -> tuple[Scene, str]:
    """(scene with one hexagon to render, its caption with `word` naming the shape)."""
    bg = rng.choice(LEGACY_BACKGROUNDS)     # the first release's backgrounds and phrasings: concept data unchanged
    color = rng.choice([c for c in COLORS if c != bg])
    obj = ShapeObject(CONCEPT, color, rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS)))
    scene = Scene(bg, (obj,))
    template = rng.choice(LEGACY_SINGLE_TEMPLATES)
    return scene, fill_template(template, replace(scene, objects=(replace(obj, shape=word),)), articles=False)


def write_concept_folder(folder: str | Path, n: int = 200, seed: int = 0, word: str = CONCEPT,
                         size: int = 64) -> Path:
    """n captioned images of the concept in the ImageFolder layout (PNG + metadata.jsonl)."""
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
                           word: str = CONCEPT) -> list[tuple[Scene, str]]:
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
    """Fractions over the images of each `score` key, detected among `ALL_SHAPES`: shape_color = one
    hexagon of the prompted colour and nothing else."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    marks = [score(detect(img, shapes=ALL_SHAPES), s) for img, s in zip(images, scenes)]
    return {k: sum(m[k] for m in marks) / len(marks) for k in marks[0]}


def evaluate_finetune(*, lora: str | Path | None = None, embedding: str | Path | None = None, base: str = "shapes",
                      n_concept: int = 50, n_single: int = 60, n_pair: int = 30, word: str = CONCEPT,
                      include_base: bool = True, settings: dict | None = None) -> dict:
    """Detector scores of `base` with a LoRA file (prompt tag `<lora:NAME:1>`) or a textual-inversion file
    (prompts write `word`) and of the plain base: the new concept on held-out prompts, and the old
    vocabulary (`adherence.evaluate_adherence`, hexagon among the detector's candidates, so a circle
    drawn as a hexagon counts as a miss). An embedding cannot change a prompt that does not name it:
    its old-vocabulary images are checked to be bit-identical to the base's on a few prompts and its
    scores are the base's. Returns a JSON-able dict (base numbers only with include_base)."""
    from ..pipelines.pipeline import Pipeline
    from .adherence import adherence_prompts, evaluate_adherence, pipeline_generator
    settings = settings or dict(steps=20, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5.0)
    if lora is not None and embedding is not None:
        raise ValueError("give one of lora= (a .safetensors LoRA) or embedding= (a textual-inversion file), or neither")
    path = Path(lora or embedding) if (lora or embedding) else None
    kw = {} if path is None else {"lora_dir": path.parent} if lora else {"embeddings_dir": path.parent}
    pipe = Pipeline.from_pretrained(base, **kw)
    plain = pipeline_generator(pipe, **settings)
    tag = f" <lora:{path.stem}:1>" if lora else ""
    tuned = lambda prompt, seed: plain(prompt + tag, seed)      # noqa: E731
    out = {"file": str(path) if path else None, "settings": settings, "n_concept": n_concept,
           "n_single": n_single, "n_pair": n_pair}

    def concept(gen, w):
        scenes = heldout_concept_scenes(n_concept, word=w)
        return concept_scores([gen(t, 3000 + i) for i, (_, t) in enumerate(scenes)], [s for s, _ in scenes])

    if include_base:
        out["concept_base"] = concept(plain, CONCEPT)             # the base is asked in plain words
        old = evaluate_adherence(plain, n_single=n_single, n_pair=n_pair, shapes=ALL_SHAPES, prompts=OLD_PROMPTS)
        out["old_base"] = {"single": old.single, "pair": old.pair}
    if path is None:
        return out
    out["concept_tuned"] = concept(tuned, word)
    out["prompts"] = [t for _, t in heldout_concept_scenes(3, word=word)]
    if embedding is not None:
        bare = pipeline_generator(Pipeline.from_pretrained(base), **settings)
        singles, _ = adherence_prompts(3, 0, prompts=OLD_PROMPTS)
        out["old_identical_without_the_word"] = all(
            plain(s.caption, 1000 + i).tobytes() == bare(s.caption, 1000 + i).tobytes() for i, s in enumerate(singles))
        return out
    old = evaluate_adherence(tuned, n_single=n_single, n_pair=n_pair, shapes=ALL_SHAPES, prompts=OLD_PROMPTS)
    out["old_tuned"] = {"single": old.single, "pair": old.pair}
    return out


def main(argv=None) -> None:
    """python -m diffusekit.evaluation.concept data FOLDER [--n 200] [--word W]
    python -m diffusekit.evaluation.concept eval [--lora FILE | --embedding FILE] [--word W] [--no-base] [--json OUT]"""
    import argparse
    import time

    import torch
    ap = argparse.ArgumentParser(description="the hexagon concept: training data and evaluation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("folder")
    d.add_argument("--n", type=int, default=200)
    d.add_argument("--word", default=CONCEPT)
    e = sub.add_parser("eval")
    e.add_argument("--lora")
    e.add_argument("--embedding")
    e.add_argument("--word", default=CONCEPT)
    e.add_argument("--n-concept", type=int, default=50)
    e.add_argument("--n-single", type=int, default=60)
    e.add_argument("--n-pair", type=int, default=30)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--no-base", action="store_true", help="skip the base model's numbers")
    e.add_argument("--json")
    a = ap.parse_args(argv)
    if a.cmd == "data":
        print(write_concept_folder(a.folder, a.n, word=a.word))
        return
    torch.set_num_threads(a.threads)
    t0 = time.time()
    res = evaluate_finetune(lora=a.lora, embedding=a.embedding, word=a.word, n_concept=a.n_concept,
                            n_single=a.n_single, n_pair=a.n_pair, include_base=not a.no_base)
    res["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

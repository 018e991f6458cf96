"""Prompt adherence of a shapes model, measured with the exact detector.

Prompts are the captions of dataset scenes whose attributes are known: single-object scenes of
the held-out split (combinations of shape, colour and background never seen in training, so the
score measures composition, not memory) and two-object scenes of the training split (for the
positions). Each prompt is generated once at its own seed and the image is read back by
`shapes_detector.detect`; `score` says which prompted attributes it shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..training.datasets.shapes import SHAPES, Scene, ShapesDataset
from .shapes_detector import detect, score

__all__ = ["AdherenceReport", "adherence_prompts", "evaluate_adherence", "score_images"]


@dataclass
class AdherenceReport:
    """Fractions in [0, 1] over the prompts of each group, with the counts they come from."""

    single: dict[str, float] = field(default_factory=dict)   # background, shape_color, size, position
    pair: dict[str, float] = field(default_factory=dict)
    n_single: int = 0
    n_pair: int = 0
    settings: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        rows = ["| prompts | n | shape+colour | background | size | position |", "|---|---|---|---|---|---|"]
        for name, res, n in (("held-out single-object", self.single, self.n_single),
                             ("two-object (train split)", self.pair, self.n_pair)):
            if n:
                cells = [f"{100 * res[k]:.1f}%" if k in res else "-" for k in ("shape_color", "background", "size", "position")]
                rows.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def adherence_prompts(n_single: int, n_pair: int, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """The evaluation scenes: n_single held-out single-object scenes, n_pair two-object train scenes."""
    held = ShapesDataset(seed=seed, split="heldout")
    singles = [held.scene(i) for i in range(n_single)]
    train = ShapesDataset(seed=seed + 1, split="train")
    pairs, i = [], 0
    while len(pairs) < n_pair:
        s = train.scene(i)
        if len(s.objects) == 2:
            pairs.append(s)
        i += 1
    return singles, pairs


def score_images(images, scenes: list[Scene], shapes: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """Mean of each `score` key over (image, scene) pairs; size only over single-object scenes.
    shapes: the detector's candidate shapes (`shapes_detector.classify_shape`)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    totals: dict[str, int] = {}
    counts: dict[str, int] = {}
    for img, scene in zip(images, scenes):
        for k, v in score(detect(img, shapes=shapes), scene).items():
            if k == "size" and len(scene.objects) != 1:
                continue
            totals[k] = totals.get(k, 0) + int(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: totals[k] / counts[k] for k in totals}


def evaluate_adherence(generate: Callable[[str, int], object], *, n_single: int = 100, n_pair: int = 50,
                       seed: int = 0, settings: dict | None = None, shapes: tuple[str, ...] = SHAPES) -> AdherenceReport:
    """Score `generate(prompt, seed) -> PIL image` on the evaluation scenes (image seeds 1000 + i).

    For a Pipeline use `pipeline_generator(pipe, steps=20, sampler_name="DPM++ 2M", scheduler="Karras",
    cfg_scale=5)`."""
    singles, pairs = adherence_prompts(n_single, n_pair, seed)
    single_imgs = [generate(s.caption, 1000 + i) for i, s in enumerate(singles)]
    pair_imgs = [generate(s.caption, 2000 + i) for i, s in enumerate(pairs)]
    return AdherenceReport(single=score_images(single_imgs, singles, shapes) if singles else {},
                           pair=score_images(pair_imgs, pairs, shapes) if pairs else {},
                           n_single=n_single, n_pair=n_pair, settings=dict(settings or {}))


def pipeline_generator(pipe, *, size: int = 64, **params) -> Callable[[str, int], object]:
    """generate(prompt, seed) over a `Pipeline` with fixed GenerationParams fields (steps, sampler_name, ...)."""
    from ..pipelines.params import GenerationParams

    def generate(prompt: str, seed: int):
        return pipe.generate(GenerationParams(prompt=prompt, seed=seed, width=size, height=size, **params)).images[0]

    return generate


def main(argv=None) -> None:
    """python -m diffusekit.evaluation.adherence [--model shapes] [--n-single 100] [--n-pair 50]"""
    import argparse
    import time

    import torch

    from ..pipelines.pipeline import Pipeline
    ap = argparse.ArgumentParser(description="prompt adherence of a shapes model (exact detector)")
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n-single", type=int, default=100)
    ap.add_argument("--n-pair", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--scheduler", default="Karras")
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = Pipeline.from_pretrained(a.model)
    settings = dict(steps=a.steps, sampler_name=a.sampler, scheduler=a.scheduler, cfg_scale=a.cfg_scale)
    gen = pipeline_generator(pipe, **settings)
    t0 = time.perf_counter()
    report = evaluate_adherence(gen, n_single=a.n_single, n_pair=a.n_pair, settings=settings)
    per_image = (time.perf_counter() - t0) / (a.n_single + a.n_pair)
    print(f"model {a.model}: {settings}, 64x64; {per_image:.2f} s per image (generation + detection)")
    print(report.to_markdown())


if __name__ == "__main__":
    main()

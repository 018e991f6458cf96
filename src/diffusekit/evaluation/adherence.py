"""Prompt adherence of a shapes model, measured with the exact detector.

Prompts are the captions of dataset scenes whose attributes are known. The "robust" prompts (the
default) are single-object scenes of the held-out split and two-object scenes of the held-out-pairs
split: attribute combinations never seen in training, captioned by held-out templates (phrasings never
used in training), so the score measures composition and wording, not memory. The "legacy" prompts are
the first release's: held-out single objects and two-object training scenes, in its phrasings. Each prompt
is generated once at its own seed and the image is read back by `shapes_detector.detect`; `score` says
which prompted attributes it shows, and size and position count only where the caption names them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..training.datasets.shapes import SHAPES, STYLES, Scene, ShapesDataset, template_mentions
from .shapes_detector import detect, score

__all__ = ["AdherenceReport", "adherence_prompts", "evaluate_adherence", "score_images", "score_by_template"]

_KEYS = ("shape_color", "background", "size", "position")


def _pct(res: dict, k: str) -> str:
    return f"{100 * res[k]:.1f}%" if k in res else "-"


@dataclass
class AdherenceReport:
    """Fractions in [0, 1] over the prompts of each group, with the counts they come from; per_template:
    template -> its own fractions and "n" (robust prompts: the held-out templates)."""

    single: dict[str, float] = field(default_factory=dict)   # background, shape_color, size, position
    pair: dict[str, float] = field(default_factory=dict)
    n_single: int = 0
    n_pair: int = 0
    settings: dict = field(default_factory=dict)
    prompts: str = "robust"
    per_template: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_markdown(self, per_template: bool = False) -> str:
        pair_name = "two-object (held-out)" if self.prompts == "robust" else "two-object (train split)"
        rows = [f"prompts: {self.prompts}", "", "| prompts | n | shape+colour | background | size | position |",
                "|---|---|---|---|---|---|"]
        for name, res, n in (("held-out single-object", self.single, self.n_single),
                             (pair_name, self.pair, self.n_pair)):
            if n:
                rows.append(f"| {name} | {n} | " + " | ".join(_pct(res, k) for k in _KEYS) + " |")
        if per_template and self.per_template:
            rows += ["", "| template | n | shape+colour | background | size | position |", "|---|---|---|---|---|---|"]
            for t, res in self.per_template.items():
                rows.append(f"| `{t}` | {int(res['n'])} | " + " | ".join(_pct(res, k) for k in _KEYS) + " |")
        return "\n".join(rows)


def adherence_prompts(n_single: int, n_pair: int, seed: int = 0,
                      prompts: str = "robust") -> tuple[list[Scene], list[Scene]]:
    """The evaluation scenes. robust: n_single held-out single-object scenes and n_pair held-out
    two-object scenes, both with held-out templates; legacy: the first release's n_single held-out
    single-object scenes and n_pair two-object train scenes (data seed + 1)."""
    if prompts not in STYLES:
        raise ValueError(f"prompts={prompts!r}; valid: {', '.join(map(repr, STYLES))}")
    held = ShapesDataset(seed=seed, split="heldout", style=prompts)
    singles = [held.scene(i) for i in range(n_single)]
    if prompts == "robust":
        pair_ds = ShapesDataset(seed=seed + 1, split="heldout_pairs")
        return singles, [pair_ds.scene(i) for i in range(n_pair)]
    train = ShapesDataset(seed=seed + 1, split="train", style="legacy")
    pairs, i = [], 0
    while len(pairs) < n_pair:
        s = train.scene(i)
        if len(s.objects) == 2:
            pairs.append(s)
        i += 1
    return singles, pairs


def _scores(img, scene: Scene, shapes: tuple[str, ...]) -> dict[str, bool]:
    """`score` restricted to what the caption names: size for single objects whose template names it,
    position where the template names it (a hand-made scene without a template: both)."""
    named = template_mentions(scene.template) if scene.template else {"size", "position"}
    out = score(detect(img, shapes=shapes), scene)
    if "size" not in named or len(scene.objects) != 1:
        out.pop("size")
    if "position" not in named:
        out.pop("position")
    return out


def _means(rows: list[dict[str, bool]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def score_images(images, scenes: list[Scene], shapes: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """Mean of each `score` key over (image, scene) pairs, each key over the scenes whose caption names
    it (see `_scores`). shapes: the detector's candidate shapes (`shapes_detector.classify_shape`)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    return _means([_scores(img, s, shapes) for img, s in zip(images, scenes)])


def score_by_template(images, scenes: list[Scene], shapes: tuple[str, ...] = SHAPES) -> dict[str, dict[str, float]]:
    """`score_images` per caption template (in order of first appearance), each with its count "n"."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    groups: dict[str, list[dict[str, bool]]] = {}
    for img, s in zip(images, scenes):
        groups.setdefault(s.template, []).append(_scores(img, s, shapes))
    return {t: {"n": float(len(rows)), **_means(rows)} for t, rows in groups.items()}


def evaluate_adherence(generate: Callable[[str, int], object], *, n_single: int = 100, n_pair: int = 50,
                       seed: int = 0, settings: dict | None = None, shapes: tuple[str, ...] = SHAPES,
                       prompts: str = "robust") -> AdherenceReport:
    """Score `generate(prompt, seed) -> PIL image` on the evaluation scenes (image seeds 1000 + i for
    single objects, 2000 + i for pairs).

    For a Pipeline use `pipeline_generator(pipe, steps=20, sampler_name="DPM++ 2M", scheduler="Karras",
    cfg_scale=5)`."""
    singles, pairs = adherence_prompts(n_single, n_pair, seed, prompts)
    single_imgs = [generate(s.caption, 1000 + i) for i, s in enumerate(singles)]
    pair_imgs = [generate(s.caption, 2000 + i) for i, s in enumerate(pairs)]
    return AdherenceReport(single=score_images(single_imgs, singles, shapes) if singles else {},
                           pair=score_images(pair_imgs, pairs, shapes) if pairs else {},
                           n_single=n_single, n_pair=n_pair, settings=dict(settings or {}), prompts=prompts,
                           per_template=score_by_template(single_imgs + pair_imgs, singles + pairs, shapes))


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
    ap.add_argument("--prompts", default="robust", choices=STYLES)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = Pipeline.from_pretrained(a.model)
    settings = dict(steps=a.steps, sampler_name=a.sampler, scheduler=a.scheduler, cfg_scale=a.cfg_scale)
    gen = pipeline_generator(pipe, **settings)
    t0 = time.perf_counter()
    report = evaluate_adherence(gen, n_single=a.n_single, n_pair=a.n_pair, settings=settings, prompts=a.prompts)
    per_image = (time.perf_counter() - t0) / (a.n_single + a.n_pair)
    print(f"model {a.model}: {settings}, 64x64; {per_image:.2f} s per image (generation + detection)")
    print(report.to_markdown(per_template=True))


if __name__ == "__main__":
    main()

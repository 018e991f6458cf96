"""`evaluate_model`: the quality bars of issue 5, measured on a model (what `diffusekit eval` prints and
the model cards quote).

shapes: prompt adherence is `adherence.evaluate_adherence` (n held-out single-object prompts, whose
attribute combinations were never trained on, and n_pairs two-object prompts; image seeds 1000 + i and
2000 + i, shifted by `seed`; read back by the exact detector). Its images also give the FID in the shapes
feature space (`features.load_shapes_features`, 64-d), against the dataset's own renders of the same
scenes, next to the floor: the FID between those renders and renders of as many other scenes of the same
kind, i.e. what a perfect model would score at this sample count (FID is biased upwards at small counts:
compare numbers only at equal counts).

digits: n prompts `digit_caption(d)` ("a handwritten digit seven"), digits 0-9 in turn, prompt i at
seed + i; recognised % by the project's digit classifier (`features.load_digits_classifier`); FID in its
64-d feature space against n held-out real digits (class-balanced), with the floor: n training digits
against the same n.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..pipelines import GenerationParams
from ..training.datasets.digits import digit_caption, load_mnist_arrays
from ..training.datasets.shapes import STYLES, ShapesDataset
from . import features as feats
from .adherence import AdherenceReport, evaluate_adherence, pipeline_generator
from .fid import fid

DATASETS = ("shapes", "digits")


def _pipeline(pipe_or_path, device: str = "cpu"):
    if hasattr(pipe_or_path, "generate"):
        return pipe_or_path
    from ..pipelines import Pipeline
    return Pipeline.from_pretrained(pipe_or_path, device=device)


def generate_for_prompts(pipe, prompts: Sequence[str], *, steps: int = 20, sampler: str = "DPM++ 2M",
                         scheduler: str = "Karras", cfg: float = 5.0, seed: int = 0, size: int | None = None,
                         progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """One image per prompt, prompt i at seed + i (so any subset can be regenerated alone)."""
    images = []
    for i, prompt in enumerate(prompts):
        params = GenerationParams(prompt=prompt, steps=steps, sampler_name=sampler, scheduler=scheduler,
                                  cfg_scale=cfg, seed=seed + i, width=size, height=size)
        images.append(pipe.generate(params).images[0])
        if progress is not None:
            progress(i + 1, len(prompts))
    return images


def shapes_eval_items(n: int, n_pairs: int, data_seed: int, start: int = 0,
                      prompts: str = "robust") -> tuple[list[dict], list[dict]]:
    """Dataset items (image, caption, scene) of the adherence prompts (`adherence.adherence_prompts`), so
    the FID compares generated images with the dataset's own renders of the same scenes. `start` skips
    that many of each kind: the FID floor takes the next ones."""
    single = ShapesDataset(seed=data_seed, split="heldout", style=prompts)
    singles = [single[i] for i in range(start, start + n)]
    if prompts == "robust":
        pair_ds = ShapesDataset(seed=data_seed + 1, split="heldout_pairs")
        return singles, [pair_ds[i] for i in range(start, start + n_pairs)]
    pair_ds = ShapesDataset(seed=data_seed + 1, split="train", style="legacy")
    pairs, i, seen = [], 0, 0
    while len(pairs) < n_pairs:
        if len(pair_ds.scene(i).objects) == 2:
            if seen >= start:
                pairs.append(pair_ds[i])
            seen += 1
        i += 1
    return singles, pairs


def _evaluate_shapes(pipe, n, n_pairs, gen_kwargs, data_seed, feature_net, progress, prompts):
    # adherence: adherence.py's prompts, image seeds and scoring; we keep the images for the FID
    seed = gen_kwargs["seed"]
    generate = pipeline_generator(pipe, size=gen_kwargs["size"], steps=gen_kwargs["steps"],
                                  sampler_name=gen_kwargs["sampler"], scheduler=gen_kwargs["scheduler"],
                                  cfg_scale=gen_kwargs["cfg"])
    images: list[Image.Image] = []

    def recording(prompt: str, image_seed: int):
        images.append(generate(prompt, seed + image_seed))
        if progress is not None:
            progress(len(images), n + n_pairs)
        return images[-1]

    report = evaluate_adherence(recording, n_single=n, n_pair=n_pairs, seed=data_seed, prompts=prompts)
    singles, pairs = shapes_eval_items(n, n_pairs, data_seed, prompts=prompts)
    items = singles + pairs
    net = feature_net or feats.load_shapes_features()
    f_gen = feats.extract(net, images)
    f_real = feats.extract(net, [it["image"] for it in items])
    floor_singles, floor_pairs = shapes_eval_items(n, n_pairs, data_seed, start=max(n, n_pairs), prompts=prompts)
    f_other = feats.extract(net, [it["image"] for it in floor_singles + floor_pairs])
    return {
        "single": report.single,
        "pair": report.pair,
        "per_template": report.per_template,
        "fid": fid(f_gen, f_real),
        "fid_floor": fid(f_other, f_real),
        "fid_samples": len(items),
        "feature_space": f"shapes_features ({f_gen.shape[1]}-d)",
        "images": images,
        "prompts": [it["caption"] for it in items],
    }


def _balanced(xs: np.ndarray, ys: np.ndarray, n: int) -> list[Image.Image]:
    """n real digits, classes in turn 0, 1, ..., 9, 0, ..."""
    by_class = [xs[ys == d] for d in range(10)]
    if n > 10 * min(len(c) for c in by_class):
        raise ValueError(f"n={n}: at most {10 * min(len(c) for c in by_class)} class-balanced real digits here")
    return [Image.fromarray(by_class[k % 10][k // 10]) for k in range(n)]


def _evaluate_digits(pipe, n, gen_kwargs, feature_net, progress):
    digits = [k % 10 for k in range(n)]
    images = generate_for_prompts(pipe, [digit_caption(d) for d in digits], progress=progress, **gen_kwargs)
    net = feature_net or feats.load_digits_classifier()
    recognised = feats.classify_digits(net, images) == np.array(digits)
    data = load_mnist_arrays()
    held = _balanced(*feats.mnist_split("heldout", data), n)
    train = _balanced(*feats.mnist_split("train", data), n)
    f_gen, f_held, f_train = (feats.extract(net, imgs) for imgs in (images, held, train))
    return {
        "recognised": float(recognised.mean()),
        "recognised_per_digit": {feats.DIGIT_NAMES[d]: float(recognised[np.array(digits) == d].mean())
                                 for d in sorted(set(digits))},
        "fid": fid(f_gen, f_held),
        "fid_floor": fid(f_train, f_held),
        "fid_samples": n,
        "feature_space": f"digits_classifier ({f_gen.shape[1]}-d)",
        "images": images,
        "prompts": [digit_caption(d) for d in digits],
    }


def evaluate_model(pipe_or_path, dataset: str = "shapes", n: int = 200, steps: int = 20, sampler: str = "DPM++ 2M",
                   scheduler: str = "Karras", cfg: float = 5.0, seed: int = 0, *, n_pairs: int | None = None,
                   size: int | None = None, data_seed: int = 0, feature_net=None, device: str = "cpu",
                   keep_images: bool = False, progress: Callable[[int, int], None] | None = None,
                   prompts: str = "robust") -> dict:
    """Generate for evaluation prompts and measure adherence and FID (see the module docstring).

    pipe_or_path: a `Pipeline`, a shipped name ("shapes"), a checkpoint file or a diffusers folder.
    n: single-object (shapes) or digit prompts; n_pairs: two-object prompts (shapes; default n // 2).
    prompts: shapes only, "robust" (held-out phrasings and combinations, the default) or "legacy" (the
    first release's evaluation prompts; `adherence.adherence_prompts`).
    size: generation side in pixels (None = 64 for shapes, the dataset's size; the model's native size for
    digits); images are resized to the feature net's input. Returns a JSON-able dict: "single"/"pair"
    adherence fractions (shapes) or "recognised" (digits), "fid", "fid_floor", "fid_samples", "per_template" (shapes), the settings,
    "prompts", "seconds" (plus "images" when keep_images).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}; valid: {', '.join(DATASETS)}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n={n!r}: FID needs at least 2 images (the quality bars use hundreds)")
    n_pairs = n // 2 if n_pairs is None else n_pairs
    if prompts not in STYLES:
        raise ValueError(f"prompts={prompts!r}; valid: {', '.join(map(repr, STYLES))}")
    if dataset == "shapes" and (not isinstance(n_pairs, int) or n_pairs < 0):
        raise ValueError(f"n_pairs={n_pairs!r}: must be a non-negative integer")
    if dataset == "digits" and n > 1000:
        raise ValueError(f"n={n}: the digits FID compares with the 1,000 held-out real digits; use n <= 1000")
    if size is None and dataset == "shapes":
        size = 64                                   # the dataset's size (and the feature net's input)
    t0 = time.perf_counter()
    pipe = _pipeline(pipe_or_path, device)
    gen_kwargs = dict(steps=steps, sampler=sampler, scheduler=scheduler, cfg=cfg, seed=seed, size=size)
    if dataset == "shapes":
        result = _evaluate_shapes(pipe, n, n_pairs, gen_kwargs, data_seed, feature_net, progress, prompts)
    else:
        result = _evaluate_digits(pipe, n, gen_kwargs, feature_net, progress)
    images = result.pop("images")
    result.update(dataset=dataset, model=str(getattr(pipe, "name", pipe_or_path)), n=n, steps=steps, sampler=sampler,
                  scheduler=scheduler, cfg=cfg, seed=seed, size=size, data_seed=data_seed,
                  seconds=time.perf_counter() - t0)
    if dataset == "shapes":
        result["n_pairs"] = n_pairs
        result["prompt_set"] = prompts
    if keep_images:
        result["images"] = images
    return result


def format_markdown(result: dict) -> str:
    """The result as the table a model card quotes."""
    r = result
    lines = [f"Evaluated with `diffusekit eval --dataset {r['dataset']} -n {r['n']}"
             + (f" --pairs {r['n_pairs']} --prompts {r.get('prompt_set', 'robust')}" if "n_pairs" in r else "")
             + f" --steps {r['steps']} --sampler \"{r['sampler']}\" --scheduler {r['scheduler']} "
               f"--cfg-scale {r['cfg']:g} --seed {r['seed']}" + (f" --size {r['size']}" if r.get("size") else "")
             + f"` on model {r['model']} ({r['seconds']:.0f} s).", "",
             "| measure | value |", "| --- | --- |"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    if r["dataset"] == "shapes":
        adherence = AdherenceReport(single=r["single"], pair=r["pair"], n_single=r["n"], n_pair=r["n_pairs"],
                                    prompts=r.get("prompt_set", "robust"), per_template=r.get("per_template", {}))
        lines = lines[:2] + [adherence.to_markdown(per_template=True), ""] + lines[2:]
    else:
        lines.append(f"| recognised digit (n={r['n']}) | {pct(r['recognised'])} |")
    lines.append(f"| FID, {r['feature_space']}, {r['fid_samples']} samples | {r['fid']:.3f} |")
    ref = ("the real images of the same prompts" if r["dataset"] == "shapes"
           else f"{r['fid_samples']} held-out real digits")
    lines.append(f"| (reference: {ref}) | |")
    lines.append(f"| FID of other real dataset images, same count, same reference | {r['fid_floor']:.3f} |")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The `diffusekit eval` flags, for the CLI to mount on its subparser."""
    parser.add_argument("--model", default="shapes", help="shipped name, checkpoint file or diffusers folder")
    parser.add_argument("--dataset", default=None, choices=DATASETS,
                        help="evaluation world (default: the model's name when it is a shipped one, else shapes)")
    parser.add_argument("-n", type=int, default=200, help="single-object / digit prompts (default 200)")
    parser.add_argument("--pairs", type=int, default=None, help="two-object prompts for shapes (default n/2)")
    parser.add_argument("--prompts", default="robust", choices=STYLES,
                        help="shapes prompts: robust (held-out phrasings and combinations, default) or legacy "
                             "(the first release's evaluation prompts)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="DPM++ 2M")
    parser.add_argument("--scheduler", default="Karras")
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None,
                        help="generation side in pixels (default: 64 for shapes, native for digits)")
    parser.add_argument("--out", default=None, help="write the result as JSON here (and a .md table beside it)")
    parser.add_argument("--save-images", default=None, help="folder to write the generated images into")


def run_from_args(args, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run `evaluate_model` from parsed `add_arguments` flags; writes --out/--save-images when given."""
    import json

    dataset = args.dataset or (args.model if args.model in DATASETS else "shapes")
    result = evaluate_model(args.model, dataset, n=args.n, n_pairs=args.pairs, steps=args.steps, sampler=args.sampler,
                            scheduler=args.scheduler, cfg=args.cfg_scale, seed=args.seed, size=args.size,
                            keep_images=bool(args.save_images), progress=progress,
                            prompts=getattr(args, "prompts", "robust"))
    images = result.pop("images", None)
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(folder / f"{i:05d}.png", pnginfo=_pnginfo(img))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({k: v for k, v in result.items() if k != "prompts"}, indent=2) + "\n")
        out.with_suffix(".md").write_text(format_markdown(result) + "\n")
    return result


def _pnginfo(img: Image.Image):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in img.info:
        info.add_text("parameters", img.info["parameters"])
    return info


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffusekit.evaluation.evaluate",
                                description="measure a model's quality bars: prompt adherence and FID")
    add_arguments(p)
    res = run_from_args(p.parse_args())
    print(format_markdown(res))

"""The models the project ships: they load by name, compute in float32 on a CPU, and still do their
job — a regression check on the committed weights (a handful of images; the full measurements are in
the model cards, made by `diffusekit eval`)."""
from __future__ import annotations

import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.evaluation import features as feats
from diffusekit.evaluation.shapes_detector import detect, score
from diffusekit.pipelines.shipped import available
from diffusekit.training.datasets.digits import digit_caption
from diffusekit.training.datasets.shapes import ShapesDataset


pytestmark = pytest.mark.usefixtures("one_thread")


def params(prompt: str, seed: int, size: int) -> GenerationParams:
    return GenerationParams(prompt=prompt, steps=20, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5,
                            seed=seed, width=size, height=size)


def test_both_are_shipped_and_load_in_float32_on_cpu():
    assert available() == ["shapes", "digits", "shapes-flow", "shapes-turbo"]
    pipe = Pipeline.from_pretrained("shapes")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert pipe.family.default_size == 64 and pipe.factor == 4
    assert pipe.name == "shapes"          # the infotext's "Model:" names the shipped model, not the file stem
    half = Pipeline.from_pretrained("shapes", dtype=torch.float16)     # asked for: kept
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}
    digits = Pipeline.from_pretrained("digits")
    assert digits.vae is None and digits.family.default_size == 32


def held_out_hits(pipe: Pipeline, make_params, n: int = 6) -> dict:
    """Detector hits on the first n held-out (shape, colour, background) prompts of the first release's
    evaluation (its phrasings and backgrounds, `--prompts legacy`: what shapes and its turbo were trained on),
    prompt i at seed 1000 + i."""
    ds = ShapesDataset(seed=0, split="heldout", style="legacy")
    hits = {"shape_color": 0, "background": 0}
    for i in range(n):
        item = ds[i]
        s = score(detect(pipe.generate(make_params(item["caption"], 1000 + i)).images[0]), item["scene"])
        hits["shape_color"] += s["shape_color"]
        hits["background"] += s["background"]
    return hits


def test_shapes_draws_held_out_prompts():
    """Six held-out legacy prompts, detector-scored; the card's 200 scored 100%."""
    hits = held_out_hits(Pipeline.from_pretrained("shapes"), lambda prompt, seed: params(prompt, seed, 64))
    assert hits["background"] == 6 and hits["shape_color"] >= 5, hits


def test_digits_draws_the_prompted_digit():
    pipe = Pipeline.from_pretrained("digits")
    wanted = [0, 3, 7, 9]
    images = [pipe.generate(params(digit_caption(d), 10 + d, 32)).images[0] for d in wanted]
    got = feats.classify_digits(feats.load_digits_classifier(), images)
    assert (got == wanted).sum() >= 3, got


def colour_speckle(img) -> float:
    """Fraction of pixels whose RGB channels differ by more than 32 of 255: 0 for a grey image."""
    import numpy as np
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return float(((a.max(-1) - a.min(-1)) > 32).mean())


def test_digits_are_grey_without_colour_speckle():
    """The digits model learned grey digits; without clipping its x0 estimate to [-1, 1] (the DDPM
    sampler's clip_denoised), seeds 1 and 3 of 0-7 came out covered in RGB speckle at CFG 5 (68% and
    49% of the pixels over the threshold; 20 of 40 images of digits 0-9 x seeds 0-3)."""
    pipe = Pipeline.from_pretrained("digits")
    speckle = [colour_speckle(pipe.generate(params(digit_caption(7), seed, 32)).images[0]) for seed in range(8)]
    assert max(speckle) < 0.01, [round(s, 3) for s in speckle]


def test_shapes_flow_is_a_flow_mmdit_and_draws_the_background():
    """The shipped SD3-in-miniature: an MMDiT flow model; its card measured background 100% at 8 steps (and
    shape+colour 45%: not at the shapes bars yet), so only the background is checked, on six held-out prompts."""
    pipe = Pipeline.from_pretrained("shapes-flow")
    assert pipe.family.prediction_type == "flow" and pipe.family.is_mmdit and pipe.denoiser.noise_form == "flow"
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    ds = ShapesDataset(seed=0, split="heldout", style="legacy")   # its training data
    hits = 0
    for i in range(6):
        item = ds[i]
        img = pipe.generate(GenerationParams(prompt=item["caption"], steps=8, sampler_name="Euler", scheduler="Simple",
                                             cfg_scale=5, seed=1000 + i, width=64, height=64)).images[0]
        hits += score(detect(img), item["scene"])["background"]
    assert hits >= 5, hits


def test_shapes_turbo_is_a_consistency_model_with_few_step_defaults():
    """shapes-turbo: `shapes` distilled into a consistency model; the card sets LCM, SGM Uniform, <= 4 steps,
    CFG 1 (off)."""
    from diffusekit.core.consistency import ConsistencyDenoiser
    pipe = Pipeline.from_pretrained("shapes-turbo")
    assert pipe.name == "shapes-turbo" and pipe.family.consistency
    assert isinstance(pipe.denoiser, ConsistencyDenoiser)
    d = pipe.defaults
    assert (d["sampler_name"], d["scheduler"], d["cfg_scale"]) == ("LCM", "SGM Uniform", 1.0) and d["steps"] <= 4
    teacher = Pipeline.from_pretrained("shapes")     # the same VAE and text encoder as the teacher
    for a, b in ((pipe.vae, teacher.vae), (pipe.parts.text_encoders[0], teacher.parts.text_encoders[0])):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_shapes_turbo_draws_held_out_prompts_in_one_step():
    """Six held-out prompts at 1 step, CFG 1, detector-scored (the card's measurements, 200 robust prompts:
    89.5% shape+colour, 99% background; a broken consistency wrapper or schedule scores 0-1 here)."""
    hits = held_out_hits(Pipeline.from_pretrained("shapes-turbo"), lambda prompt, seed: GenerationParams(
        prompt=prompt, steps=1, sampler_name="LCM", scheduler="SGM Uniform", cfg_scale=1, seed=seed, width=64, height=64))
    assert hits["background"] >= 5 and hits["shape_color"] >= 4, hits

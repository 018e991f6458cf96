"""The pipeline's A1111 behaviours, one per test: variation seeds, img2img and inpainting inputs (masks,
fills, overlays), hires fix, refiner hand-over, prompt editing across passes, SDXL conditioning, stopping
between batches (pipelines/pipeline.py, conditioning.py, latents.py, params.py). Tiny random-weight models; images compared as
uint8 arrays, latents with the tolerance stated at each assert."""
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusekit import GenerationParams, Pipeline
from diffusekit.models.loading import load_checkpoint
from diffusekit.pipelines.latents import fill_masked, initial_noise, overlay_mask, prepare_mask

_spec = importlib.util.spec_from_file_location("pipelines_conftest", Path(__file__).with_name("conftest.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
save_tiny = _helpers.save_tiny

SMALL = dict(width=32, height=32, steps=4, cfg_scale=5.0)


def arr(img):
    return np.asarray(img, dtype=np.int16)


def noise_image(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def square_mask(size=32, box=(8, 8, 24, 24)):
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


@pytest.fixture(scope="module")
def stub_refiner(tiny_sd1):
    """A second copy of the tiny SD1 model used as a refiner, with latent scale 2x the base's and a denoiser
    stub that records the text context it gets and returns a fixed target (in its own latent space)."""
    ref = Pipeline.from_pretrained(tiny_sd1)
    ref.family = replace(ref.family, latent_scale=2 * ref.family.latent_scale)
    ref.calls = []
    ref.target = torch.tensor([0.5, -1.0, 0.25, 2.0]).reshape(1, 4, 1, 1)   # base-space target, any size

    def stub(x, sigma, context=None, **_):
        ref.calls.append((float(sigma.reshape(-1)[0]), context.detach().clone()))
        return (2.0 * ref.target).expand_as(x).to(x.dtype)                              # r = 2
    ref.denoiser = stub
    return ref


def with_refiner(pipe, ref, key):
    pipe._refiners[key] = ref
    ref.calls.clear()
    return dict(refiner_checkpoint=key, refiner_switch_at=0.5)


# ---------------------------------------------------------------------------------------------- seeds
def test_variation_seed_batch_keeps_the_seed_and_advances_the_subseed(sd1_pipe):
    """A1111: with subseed_strength > 0 all images share `seed`; image i uses subseed + i."""
    p = GenerationParams(prompt="x", seed=10, subseed=50, subseed_strength=0.4, batch_size=2, **SMALL)
    r = sd1_pipe.generate(p)
    assert r.seeds == [10, 10] and r.subseeds == [50, 51]
    single = sd1_pipe.generate(p.copy(batch_size=1, subseed=51))
    # batch 2 vs 1 changes the float32 matmuls (latents within ~1e-4): one uint8 level at most
    assert np.abs(arr(single.images[0]) - arr(r.images[1])).max() <= 1
    assert "Seed: 10," in r.infotexts[1] and "Variation seed: 51" in r.infotexts[1]


# ---------------------------------------------------------------------------------------------- img2img
def test_each_batch_image_gets_its_own_overlay_and_one_init_image_is_encoded_once(sd1_pipe, monkeypatch):
    inits = [noise_image(1), noise_image(2)]
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=3, init_images=inits, mask=square_mask(), mask_blur=0,
                                           denoising_strength=1.0, batch_size=2, **SMALL))
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    for out, src in zip(r.images, inits):          # the second image used to get the first one pasted back
        assert np.abs(arr(out)[outside] - arr(src)[outside]).max() <= 1

    rows = []
    encode = sd1_pipe.encode
    monkeypatch.setattr(sd1_pipe, "encode", lambda images: (rows.append(images.shape[0]), encode(images))[1])
    sd1_pipe.generate(GenerationParams(prompt="x", seed=3, init_images=[inits[0]], denoising_strength=0.5,
                                       batch_size=3, n_iter=2, **SMALL))
    assert rows == [1]                              # was 3 rows per batch, for every batch


def test_rgba_masks_follow_a1111(sd1_pipe):
    """An opaque RGBA mask is read by luminance (it used to repaint everything); a transparent one by alpha."""
    lum = square_mask()
    opaque = lum.convert("RGBA")
    assert np.array_equal(np.asarray(prepare_mask(opaque, (32, 32), 0, False)), np.asarray(lum))
    painted = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    painted.paste((10, 20, 30, 200), (8, 8, 24, 24))
    assert np.array_equal(np.asarray(prepare_mask(painted, (32, 32), 0, False)), np.asarray(lum))
    blurred = prepare_mask(lum, (32, 32), 4, False)
    m = np.asarray(blurred, dtype=np.float32) / 255
    assert torch.allclose(overlay_mask(blurred)[0, 0], torch.from_numpy(np.clip(2 * m, 0, 1)))


def test_inpainting_fill_mode_0_fills_the_hole_from_its_surroundings(sd1_pipe):
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    img.paste((255, 255, 255), (8, 8, 24, 24))
    filled = arr(fill_masked(img, square_mask()))
    assert np.array_equal(filled[:8], arr(img)[:8])                       # outside the mask: unchanged
    # the white hole takes the red around it (8 levels: premultiplied uint8 alpha is coarse where alpha is low)
    assert np.abs(filled[12:20, 12:20] - np.array([200, 30, 30])).max() <= 8
    p = GenerationParams(prompt="x", seed=3, init_images=[img], mask=square_mask(), mask_blur=0,
                         denoising_strength=0.5, **SMALL)
    a, b = sd1_pipe.generate(p.copy(inpainting_fill=0)), sd1_pipe.generate(p.copy(inpainting_fill=1))
    assert np.abs(arr(a.images[0]) - arr(b.images[0])).mean() > 1      # "fill" is no longer "original"


# ---------------------------------------------------------------------------------------------- hires fix
def test_hires_runs_the_requested_steps_from_fresh_seed_noise(sd1_pipe):
    p = GenerationParams(prompt="x", seed=4, sampler_name="Euler", enable_hr=True, hr_scale=2.0,
                         hr_second_pass_steps=3, denoising_strength=0.5, save_process=True, **SMALL)
    r = sd1_pipe.generate(p)
    first = [x for x in r.process if x["pass"] == "txt2img"]
    hires = [x for x in r.process if x["pass"] == "hires"]
    assert len(first) == 4 and len(hires) == 3                  # A1111: exactly hr_second_pass_steps steps
    full = sd1_pipe._sigmas("uniform", 6)                       # int(3 / 0.5) = 6-step schedule, its last 3
    assert [x["sigma"] for x in hires] == pytest.approx(full[3:-1].tolist(), rel=1e-6)
    side = 64 // sd1_pipe.factor
    up = F.interpolate(first[-1]["denoised"], size=(side, side), mode="bilinear")   # Euler ends at x = D
    noise, _ = initial_noise((1, 4, side, side), [4])
    assert torch.allclose(hires[0]["x"], up + noise * hires[0]["sigma"], atol=1e-5)
    assert "Hires steps: 3" in r.infotexts[0]
    assert "Hires steps" not in sd1_pipe.generate(p.copy(hr_second_pass_steps=0, save_process=False)).infotexts[0]


def test_hires_fix_on_an_inpainting_model(tmp_path):
    """The hires pass used to call a 9-channel UNet with 4 channels."""
    pipe = Pipeline.from_pretrained(save_tiny(tmp_path / "inp.safetensors", "sd1-inpaint"))
    r = pipe.generate(GenerationParams(prompt="x", seed=1, enable_hr=True, denoising_strength=0.5,
                                       **{**SMALL, "steps": 2}))
    assert r.images[0].size == (64, 64) and torch.isfinite(r.latents).all()


def test_bad_hires_fields_are_clear_errors(sd1_pipe):
    with pytest.raises(ValueError, match="hr_denoising_strength"):
        sd1_pipe.generate(GenerationParams(prompt="x", enable_hr=True, hr_denoising_strength=2.0, **SMALL))
    with pytest.raises(ValueError, match="hr_second_pass_steps"):
        sd1_pipe.generate(GenerationParams(prompt="x", enable_hr=True, hr_second_pass_steps=-1, **SMALL))


# ---------------------------------------------------------------------------------------------- refiner
def test_refiner_with_another_latent_scale_hands_back_in_base_space(sd1_pipe, stub_refiner):
    ref = stub_refiner
    p = GenerationParams(prompt="x", seed=2, sampler_name="Euler", save_process=True,
                         **with_refiner(sd1_pipe, ref, "stub-scale"), **SMALL)
    r = sd1_pipe.generate(p)
    assert [x["pass"] for x in r.process] == ["txt2img", "txt2img", "refiner", "refiner"]
    # the refiner returns 2 * target in its space = target in the base's (atol: float32 arithmetic)
    target = ref.target.expand_as(r.latents)
    assert torch.allclose(r.latents, target, atol=1e-5)
    assert torch.allclose(r.process[-1]["denoised"], target, atol=1e-5)
    ref.calls.clear()
    stopped = sd1_pipe.generate(p.copy(save_process=False), should_stop=lambda: len(ref.calls) >= 1)
    assert stopped.interrupted and torch.allclose(stopped.latents, target, atol=1e-5)


def test_refiner_continues_the_prompt_editing_step_count(sd1_pipe, stub_refiner):
    """8 uniform steps, switch at 0.5: the refiner takes steps 4..7; `[red:blue:0.5]` switches after step 4."""
    ref = stub_refiner
    sd1_pipe.generate(GenerationParams(prompt="[red:blue:0.5]", seed=2, sampler_name="Euler",
                                       **with_refiner(sd1_pipe, ref, "stub-edit"), **{**SMALL, "steps": 8}))
    red, blue = (ref.text.pair(t, "", 8)[0].at(0).context for t in ("red", "blue"))
    def which(c):                  # encoded alone vs with the other variant: equal up to float32 batching (1e-5)
        return "red" if torch.allclose(c[:1], red, atol=1e-5) else "blue" if torch.allclose(c[:1], blue, atol=1e-5) else "?"
    got = [which(c) for _, c in ref.calls]
    assert got == ["red", "blue", "blue", "blue"]          # restarting the count gave red, red, red, blue


def test_refiner_refines_only_the_hires_pass(sd1_pipe, stub_refiner):
    """A1111's default "Hires fix: which pass to enable refiner for" is the second pass."""
    ref = stub_refiner
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=2, sampler_name="Euler", enable_hr=True,
                                           denoising_strength=1.0, save_process=True,
                                           **with_refiner(sd1_pipe, ref, "stub-hires"), **SMALL))
    passes = [x["pass"] for x in r.process]
    assert passes == ["txt2img"] * 4 + ["hires"] * 2 + ["refiner"] * 2 and r.images[0].size == (64, 64)


# ---------------------------------------------------------------------------------------------- conditioning
def test_conditioning_is_encoded_once_per_call_not_per_batch(sd1_pipe, monkeypatch):
    calls = []
    pair = sd1_pipe.text.pair
    monkeypatch.setattr(sd1_pipe.text, "pair", lambda *a, **k: (calls.append(a), pair(*a, **k))[1])
    sd1_pipe.generate(GenerationParams(prompt="x", seed=1, n_iter=3, **SMALL))
    assert len(calls) == 1


def test_hires_prompt_editing_counts_on_from_the_first_pass(sd1_pipe):
    """A1111 >= 1.8: in the hires pass `[red:blue:0.5]` has already switched."""
    cond, _ = sd1_pipe.text.pair("[red:blue:0.5]", "", 4, hires_steps=4)
    blue, _ = sd1_pipe.text.pair("blue", "", 4)
    assert len(cond.entries) == 1 and torch.allclose(cond.at(0).context, blue.at(0).context, atol=1e-6)


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return Pipeline.from_pretrained(save_tiny(tmp_path_factory.mktemp("xl") / "xl.safetensors", "sdxl"))


def test_emphasis_is_normalised_over_the_prompt_editing_variants(sdxl_pipe):
    """A1111 encodes a prompt's variants as one batch and rescales their emphasis with one mean, so the
    "blue" variant of `[(red:1.5):blue:2]` is the plain "blue" encoding times one factor per encoder (!= 1).
    SDXL: its encoders have no final LayerNorm, whose zero mean on tiny weights would make the rescale 0/0."""
    text = sdxl_pipe.text
    variant = text.schedule("[(red:1.5):blue:2]", 4).at(4).context
    alone = text.schedule("blue", 4).at(0).context
    width_l = sdxl_pipe.family.text_encoders[0].config.width
    for part in (slice(0, width_l), slice(width_l, None)):
        ratio = variant[..., part] / alone[..., part]
        k = ratio.median()
        assert abs(float(k) - 1) > 1e-4 and torch.allclose(variant[..., part], k * alone[..., part], rtol=1e-4, atol=1e-5)


def test_sdxl_empty_negative_prompt_is_zeros(sdxl_pipe):
    _, uncond = sdxl_pipe.text.pair("a red circle", "", 3)
    u = uncond.at(0)
    assert not u.context.any() and not u.pooled.any()
    _, other = sdxl_pipe.text.pair("a red circle", "blurry", 3)
    assert other.at(0).context.abs().sum() > 0


def test_zero_terminal_snr_checkpoints_get_their_schedule(tiny_sd1, sd1_pipe):
    parts = load_checkpoint(tiny_sd1)
    parts = replace(parts, family=replace(parts.family, zero_terminal_snr=True))
    assert Pipeline(parts).schedule.sigma_max > 1000 > sd1_pipe.schedule.sigma_max   # 4096 vs 14.6


# ---------------------------------------------------------------------------------------------- interrupt
def test_a_stop_between_batches_starts_no_new_batch(sd1_pipe):
    asked = []

    def should_stop():                     # true from the first check after batch 1 finished (4 steps)
        asked.append(1)
        return len(asked) > 4
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=1, n_iter=2, **SMALL), should_stop=should_stop)
    assert r.interrupted and len(r.images) == 1 and r.seeds == [1]

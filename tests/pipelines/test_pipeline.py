import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import GenerationParams, Pipeline

SMALL = dict(width=32, height=32, steps=4, cfg_scale=5.0)


def arr(img):
    return np.asarray(img, dtype=np.float32)


def test_txt2img_images_seeds_and_infotext(sd1_pipe):
    r = sd1_pipe.generate(GenerationParams(prompt="a red circle", seed=7, batch_size=2, **SMALL))
    assert len(r.images) == 2 and r.images[0].size == (32, 32)
    assert r.seeds == [7, 8]
    text = r.images[0].info["parameters"]
    assert text.startswith("a red circle") and "Seed: 7" in text and "Sampler: DPM++ 2M" in text
    assert "Schedule type: Karras" in text          # Automatic -> DPM++ 2M's own default
    assert not np.array_equal(arr(r.images[0]), arr(r.images[1]))


def test_same_seed_same_image_and_batch_equals_singles(sd1_pipe):
    p = GenerationParams(prompt="blue square", seed=3, batch_size=3, sampler_name="Euler a", **SMALL)
    batch = sd1_pipe.generate(p)
    for i in range(3):
        single = sd1_pipe.generate(p.copy(seed=3 + i, batch_size=1))
        assert np.array_equal(arr(single.images[0]), arr(batch.images[i])), i


def test_prompt_and_negative_prompt_change_the_image(sd1_pipe):
    base = sd1_pipe.generate(GenerationParams(prompt="a red circle", seed=1, **SMALL)).images[0]
    other = sd1_pipe.generate(GenerationParams(prompt="a green star", seed=1, **SMALL)).images[0]
    neg = sd1_pipe.generate(GenerationParams(prompt="a red circle", negative_prompt="blurry", seed=1, **SMALL)).images[0]
    assert np.abs(arr(base) - arr(other)).mean() > 0.5
    assert np.abs(arr(base) - arr(neg)).mean() > 0.5


def test_img2img_strength(sd1_pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    p = GenerationParams(prompt="x", seed=2, init_images=[init], **SMALL)
    zero = sd1_pipe.generate(p.copy(denoising_strength=0.0)).images[0]
    roundtrip = sd1_pipe.decode(sd1_pipe.encode(torch.from_numpy(arr(init)).permute(2, 0, 1)[None] / 127.5 - 1))
    expect = ((roundtrip[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy()
    assert np.abs(arr(zero) - expect).max() <= 1.0
    dist = [np.abs(arr(sd1_pipe.generate(p.copy(denoising_strength=s)).images[0]) - arr(zero)).mean() for s in (0.3, 0.95)]
    assert dist[0] < dist[1]
    assert "Denoising strength: 0.95" in sd1_pipe.generate(p.copy(denoising_strength=0.95)).infotexts[0]


def test_inpainting_keeps_pixels_outside_the_mask(sd1_pipe):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=2, init_images=[init], mask=mask, mask_blur=0,
                                           denoising_strength=1.0, **SMALL))
    out, src = arr(r.images[0]), arr(init)
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert np.abs(out[outside] - src[outside]).max() <= 1.0
    assert np.abs(out[~outside] - src[~outside]).mean() > 5


def test_variation_seed_endpoints(sd1_pipe):
    p = GenerationParams(prompt="x", seed=10, subseed=99, **SMALL)
    base = arr(sd1_pipe.generate(p).images[0])
    assert np.array_equal(arr(sd1_pipe.generate(p.copy(subseed_strength=0.0)).images[0]), base)
    full = arr(sd1_pipe.generate(p.copy(subseed_strength=1.0)).images[0])
    sub = arr(sd1_pipe.generate(p.copy(seed=99)).images[0])
    assert np.abs(full - sub).max() <= 1.0
    half = sd1_pipe.generate(p.copy(subseed_strength=0.5))
    assert "Variation seed: 99" in half.infotexts[0]


def test_callback_preview_and_interrupt(sd1_pipe):
    seen = []
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=1, **SMALL), callback=seen.append)
    assert [s.step for s in seen] == [0, 1, 2, 3]
    assert seen[0].preview()[0].size == (32 // sd1_pipe.factor, 32 // sd1_pipe.factor)
    calls = []
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=1, **SMALL), callback=calls.append,
                          should_stop=lambda: len(calls) >= 2)
    assert r.interrupted and len(r.images) == 1 and len(calls) == 2


def test_legacy_and_canonical_sampler_names(sd1_pipe):
    a = sd1_pipe.generate(GenerationParams(prompt="x", seed=1, sampler_name="DPM++ 2M Karras", **SMALL))
    b = sd1_pipe.generate(GenerationParams(prompt="x", seed=1, sampler_name="dpmpp_2m", scheduler="karras", **SMALL))
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))


def test_hires_fix_doubles_the_size(sd1_pipe):
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=1, enable_hr=True, hr_scale=2.0, denoising_strength=0.5,
                                           **SMALL))
    assert r.images[0].size == (64, 64) and "Hires upscale: 2.0" in r.infotexts[0]


@pytest.mark.parametrize("bad, match", [
    (dict(width=30), "width"), (dict(denoising_strength=1.5), "denoising_strength"), (dict(steps=0), "steps"),
    (dict(sampler_name="nope"), "nope"), (dict(scheduler="nope"), "nope"), (dict(prompt="x" * 30000), "prompt"),
])
def test_bad_input_is_a_clear_error(sd1_pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        sd1_pipe.generate(GenerationParams(**{**dict(prompt="x", **SMALL), **bad}))


def test_mask_of_wrong_size_and_img2img_without_image(sd1_pipe):
    init = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="mask"):
        sd1_pipe.generate(GenerationParams(prompt="x", init_images=[init], mask=Image.new("L", (16, 16)), **SMALL))
    with pytest.raises(ValueError, match="init_images"):
        sd1_pipe.generate(GenerationParams(prompt="x", mask=Image.new("L", (32, 32)), **SMALL))


def test_long_prompt_is_chunked_not_truncated(sd1_pipe):
    words = ", ".join(f"word{i}" for i in range(120))
    a = sd1_pipe.generate(GenerationParams(prompt=words, seed=1, **SMALL))
    b = sd1_pipe.generate(GenerationParams(prompt=words + ", extra tail words", seed=1, **SMALL))
    assert not np.array_equal(arr(a.images[0]), arr(b.images[0]))   # text past 77 tokens still matters


# ---------------------------------------------------------------------------------------------- batch by batch
def test_iter_batches_equals_generate_and_reports_the_call(sd1_pipe):
    p = GenerationParams(prompt="a red circle", seed=5, batch_size=2, n_iter=3, **SMALL)
    whole = sd1_pipe.generate(p)
    batches = list(sd1_pipe.iter_batches(p))
    assert [b.info["job_no"] for b in batches] == [0, 1, 2]
    assert [s for b in batches for s in b.seeds] == whole.seeds == [5, 6, 7, 8, 9, 10]
    for i, im in enumerate(im for b in batches for im in b.images):
        assert np.array_equal(arr(im), arr(whole.images[i])), i
    assert [t for b in batches for t in b.infotexts] == whole.infotexts
    assert {b.info["seed"] for b in batches} == {whole.info["seed"]} == {5}
    assert len({b.info["subseed"] for b in batches}) == 1           # a random subseed, drawn once per call
    assert whole.info["hashes"] == {} and whole.info["sampler"] == "dpmpp_2m"


def test_a_skipped_batch_does_not_end_the_iteration(sd1_pipe):
    """The server's /skip: the caller keeps asking after a batch that was cut short; the next batch is whole."""
    skip = {"now": True}

    def should_stop():
        return skip["now"]
    p = GenerationParams(prompt="x", seed=1, n_iter=2, **SMALL)
    it = sd1_pipe.iter_batches(p, should_stop=should_stop)
    first = next(it)
    assert first.interrupted and first.seeds == [1]
    skip["now"] = False
    second = next(it)
    assert not second.interrupted and second.seeds == [2]
    single = sd1_pipe.generate(p.copy(seed=2, n_iter=1))
    assert np.array_equal(arr(second.images[0]), arr(single.images[0]))
    assert next(it, None) is None


def test_random_seeds_are_resolved_once_per_call(sd1_pipe):
    r = sd1_pipe.generate(GenerationParams(prompt="x", seed=-1, n_iter=2, **SMALL))
    assert r.info["seed"] >= 0 and r.seeds == [r.info["seed"], r.info["seed"] + 1]

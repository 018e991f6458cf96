"""A pixel-space (VAE-less) checkpoint through the pipeline: the images are the latents, so encode is
the identity, decode a clamp to [-1, 1], and a step preview is the x0 estimate itself. txt2img, img2img,
inpainting, hires fix, previews and denoising-video frames all run on a tiny random 16x16 model.
Tolerances: exact (pixels compared as uint8), except where stated."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import GenerationParams, Pipeline
from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.families import tiny_family
from diffusekit.models.loading import ModelParts, save_checkpoint
from diffusekit.models.tokenizer import find_bundled_bpe
from diffusekit.models.unet import UNetModel
from diffusekit.pipelines.latents import tensor_to_pil

pytestmark = pytest.mark.skipif(find_bundled_bpe() is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz")
SMALL = dict(width=16, height=16, steps=3, cfg_scale=4.0, sampler_name="Euler")


def arr(img):
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def pixel_file(tmp_path_factory):
    base = tiny_family("custom")
    fam = replace(base, vae=None, unet=replace(base.unet, in_channels=3, out_channels=3), latent_scale=1.0,
                  default_size=16)
    torch.manual_seed(0)
    unet, te = UNetModel(fam.unet), CLIPTextModel(fam.text_encoders[0].config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # small random weights everywhere (LDM zero-inits the output conv)
        for m in (unet, te):
            for name, p in m.named_parameters():
                if p.ndim > 1 and "norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return save_checkpoint({"unet": unet, "text_encoders": [te]}, tmp_path_factory.mktemp("pixel") / "px.safetensors",
                           family=fam)


@pytest.fixture(scope="module")
def pipe(pixel_file):
    return Pipeline.from_pretrained(pixel_file)


@pytest.fixture(scope="module")
def init_image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def test_pixel_pipeline_describes_its_space(pipe):
    assert pipe.vae is None and pipe.family.pixel_space
    assert (pipe.latent_channels, pipe.factor, pipe.scale) == (3, 1, 1.0)
    assert pipe.sample_space == "3-channel pixels"
    x = torch.linspace(-1.5, 1.5, 3 * 16 * 16).reshape(1, 3, 16, 16)
    assert torch.equal(pipe.encode(x), x) and torch.equal(pipe.decode(x), x.clamp(-1, 1))


def test_x0_estimates_are_clipped_to_the_pixel_range(pipe, sd1_pipe):
    """Pixel space: the denoiser clips its x0 estimate to [-1, 1] (Ho et al.'s clip_denoised); at CFG 1 the
    sampler's every estimate is then inside. Latent models are not clipped (latents have no fixed range)."""
    assert pipe.denoiser.data_range == (-1.0, 1.0)
    assert sd1_pipe.denoiser.data_range is None
    seen = []
    pipe.generate(GenerationParams(prompt="a red circle", seed=5, **{**SMALL, "cfg_scale": 1.0}),
                  callback=lambda info: seen.append(info.denoised.abs().max().item()))
    assert len(seen) == 3 and max(seen) <= 1.0


def test_txt2img_latents_are_the_images_and_previews_are_them(pipe):
    seen = []
    r = pipe.generate(GenerationParams(prompt="a red circle", seed=5, batch_size=2, save_process=True, **SMALL),
                      callback=lambda info: seen.append((info.denoised.clone(), info.preview())))
    assert [im.size for im in r.images] == [(16, 16)] * 2 and r.latents.shape == (2, 3, 16, 16)
    for got, want in zip(tensor_to_pil(r.latents), r.images):
        assert np.array_equal(arr(got), arr(want))
    assert len(seen) == 3 and len(r.process) == 3
    for den, previews in seen:      # a preview is the x0 estimate as an image: the same as decoding it
        assert [p.size for p in previews] == [(16, 16)] * 2
        for p, d in zip(previews, tensor_to_pil(pipe.decode(den))):
            assert np.array_equal(arr(p), arr(d))
    assert np.abs(arr(r.images[0]) - arr(r.images[1])).mean() > 1.0   # two seeds, two images


def test_denoising_video_frames_preview_equals_decode(pipe):
    from diffusekit.media.process import image_records, process_frames, step_frames
    r = pipe.generate(GenerationParams(prompt="a blue square", seed=2, save_process=True, **SMALL))
    records = image_records(r, 0)
    fast, full = step_frames(pipe, records, (32, 32), "preview"), step_frames(pipe, records, (32, 32), "decode")
    assert len(fast) == 3 and all(np.array_equal(arr(a), arr(b)) for a, b in zip(fast, full))
    frames = process_frames(pipe, r, 0)      # captioned (and enlarged) for the video
    assert len(frames) == 3 and len({f.size for f in frames}) == 1


def test_img2img_starts_from_the_pixels(pipe, init_image):
    p = GenerationParams(prompt="x", seed=3, init_images=[init_image], **SMALL)
    zero = pipe.generate(p.copy(denoising_strength=0.0)).images[0]
    assert np.array_equal(arr(zero), arr(init_image))              # encode = identity, decode = clamp
    dist = [np.abs(arr(pipe.generate(p.copy(denoising_strength=s)).images[0]) - arr(init_image)).mean()
            for s in (0.3, 0.95)]
    assert 0 < dist[0] < dist[1]


def test_inpainting_keeps_the_pixels_outside_the_mask(pipe, init_image):
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    r = pipe.generate(GenerationParams(prompt="x", seed=2, init_images=[init_image], mask=mask, mask_blur=0,
                                       denoising_strength=1.0, **SMALL))
    out, src = arr(r.images[0]), arr(init_image)
    keep = np.ones((16, 16), bool)
    keep[4:12, 4:12] = False
    assert np.array_equal(out[keep], src[keep]) and np.abs(out[~keep] - src[~keep]).mean() > 1.0


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_upscales_the_pixels(pipe, upscaler):
    p = GenerationParams(prompt="x", seed=4, enable_hr=True, hr_scale=2.0, hr_upscaler=upscaler,
                         hr_denoising_strength=0.0, **SMALL)
    base = pipe.generate(p.copy(enable_hr=False))
    big = pipe.generate(p).images[0]
    assert big.size == (32, 32)
    if upscaler == "Lanczos":   # strength 0: the second pass is the resized first image, exactly
        want = base.images[0].resize((32, 32), Image.LANCZOS)
    else:                       # bilinear on the first pass's unclamped pixels, then the clamp of decode
        want = tensor_to_pil(torch.nn.functional.interpolate(base.latents, size=(32, 32), mode="bilinear"))[0]
    assert np.array_equal(arr(big), arr(want))
    assert pipe.generate(p.copy(hr_denoising_strength=0.5)).images[0].size == (32, 32)


def test_parts_and_family_must_agree_and_refiners_share_the_space(pipe, tiny_sd1):
    parts = pipe.parts
    with pytest.raises(ValueError, match="has a VAE config but parts.vae is None"):
        Pipeline(ModelParts(unet=parts.unet, vae=None, text_encoders=parts.text_encoders, tokenizers=parts.tokenizers,
                            family=replace(parts.family, vae=tiny_family("sd1").vae)))
    with pytest.raises(ValueError, match="refiner .* samples 4-channel latents at 1/8 size but this model samples "
                                         "3-channel pixels"):
        pipe.generate(GenerationParams(prompt="x", seed=1, refiner_checkpoint=str(tiny_sd1), refiner_switch_at=0.5,
                                       **SMALL))

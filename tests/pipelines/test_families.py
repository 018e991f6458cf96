"""Every checkpoint family generates, deterministically, on tiny random weights: SD 2.x v-prediction, SDXL
(two text encoders + the `y` vector), SD 1.x inpainting (9 UNet input channels) and the SDXL base ->
refiner hand-over. Images are compared as uint8 arrays (equality for determinism)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import GenerationParams, Pipeline
from diffusekit.core.denoisers import EpsDenoiser, VDenoiser
from diffusekit.pipelines.conditioning import adm_vector

# this folder's conftest.py by path ("import conftest" is ambiguous when several test folders have one)
_spec = importlib.util.spec_from_file_location("pipelines_conftest", Path(__file__).with_name("conftest.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
save_tiny = _helpers.save_tiny

SMALL = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=11)


def arr(img):
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {name: save_tiny(d / f"tiny-{name}.safetensors", name) for name in ("sd2-v", "sdxl", "sd1-inpaint",
                                                                                 "sdxl-refiner")}


@pytest.fixture(scope="module")
def sdxl(files):
    return Pipeline.from_pretrained(files["sdxl"])


def twice(pipe, params):
    a, b = pipe.generate(params), pipe.generate(params)
    assert np.array_equal(arr(a.images[0]), arr(b.images[0])), "same params, same image"
    assert torch.isfinite(a.latents).all()
    return a


def test_sd2_v_prediction(files):
    pipe = Pipeline.from_pretrained(files["sd2-v"])
    assert pipe.family.name == "sd2-v" and pipe.family.prediction_type == "v"
    assert isinstance(pipe.denoiser, VDenoiser)
    assert pipe.family.text_encoders[0].pad_id == 0 and pipe.family.text_encoders[0].layer == -2
    r = twice(pipe, GenerationParams(prompt="a red circle", **SMALL))
    assert r.images[0].size == (32, 32)
    eps = Pipeline.from_pretrained(files["sd2-v"], family="sd2")      # same weights read as eps-prediction
    assert isinstance(eps.denoiser, EpsDenoiser)
    other = eps.generate(GenerationParams(prompt="a red circle", **SMALL))
    assert np.abs(arr(other.images[0]) - arr(r.images[0])).mean() > 1   # the parameterization matters


def test_sdxl_two_encoders_and_size_vector(sdxl):
    pipe = sdxl
    fam = pipe.family
    assert fam.name == "sdxl" and len(pipe.parts.text_encoders) == 2 and fam.latent_scale == 0.13025
    cond, _ = pipe.text.pair("a red circle", "", 3)
    c = cond.at(0)
    assert c.context.shape == (1, 77, 32 + 48) and c.pooled.shape == (1, 24)   # CLIP-L 32 + bigG 48; bigG pooled
    y = adm_vector(fam, c.pooled, original_size=(32, 32))
    assert y.shape == (1, fam.unet.adm_in_channels) == (1, 24 + 6 * 256)
    r = twice(pipe, GenerationParams(prompt="a red circle", **SMALL))
    other = pipe.generate(GenerationParams(prompt="a blue square", **SMALL))
    assert np.abs(arr(other.images[0]) - arr(r.images[0])).mean() > 1


def test_sd1_inpainting_model_txt2img_and_inpaint(files):
    pipe = Pipeline.from_pretrained(files["sd1-inpaint"])
    assert pipe.family.is_inpaint and pipe.unet.input_blocks[0][0].in_channels == 9
    twice(pipe, GenerationParams(prompt="a red circle", **SMALL))
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = twice(pipe, GenerationParams(prompt="a red circle", init_images=[init], mask=mask, mask_blur=0,
                                     denoising_strength=1.0, **SMALL))
    out, src = arr(r.images[0]), arr(init)
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    assert np.abs(out[outside] - src[outside]).max() <= 1       # kept outside the mask
    assert np.abs(out[~outside] - src[~outside]).mean() > 5      # repainted inside


def test_sdxl_base_hands_over_to_the_refiner(sdxl, files):
    pipe = sdxl
    p = GenerationParams(prompt="a red circle", refiner_checkpoint=str(files["sdxl-refiner"]), refiner_switch_at=0.5,
                         save_process=True, **{**SMALL, "steps": 4})
    r = twice(pipe, p)
    assert [x["pass"] for x in r.process] == ["txt2img", "txt2img", "refiner", "refiner"]
    sig = [x["sigma"] for x in r.process]
    assert sig == sorted(sig, reverse=True) and len(set(sig)) == 4   # one schedule, cut in the middle
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in r.infotexts[0]
    base_only = pipe.generate(p.copy(refiner_checkpoint=None, refiner_switch_at=None, save_process=False))
    assert np.abs(arr(base_only.images[0]) - arr(r.images[0])).mean() > 1
    refiner = pipe._refiners[str(files["sdxl-refiner"])]
    assert refiner.family.name == "sdxl-refiner" and refiner.family.adm_inputs[-1] == "aesthetic_score"

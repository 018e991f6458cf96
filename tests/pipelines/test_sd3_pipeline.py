"""SD3 models through Pipeline: CFG and negative prompts, img2img with flow noising, inpainting, infotext."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import GenerationParams
from diffusekit.pipelines.infotext import parse_infotext
from diffusekit.pipelines.latents import initial_noise

_spec = importlib.util.spec_from_file_location("sd1_pipeline_tests", Path(__file__).with_name("test_pipeline.py"))
_sd1_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sd1_tests)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(width=32, height=32, steps=4, cfg_scale=5.0, sampler_name="Euler")


def arr(img):
    return np.asarray(img, dtype=np.float32)


def _init(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _pixels(img):
    return torch.from_numpy(arr(img)).permute(2, 0, 1)[None] / 127.5 - 1


def test_family_and_txt2img(sd3_pipe):
    fam = sd3_pipe.family
    assert fam.name == "sd3" and fam.prediction_type == "flow" and sd3_pipe.latent_channels == 16
    assert type(sd3_pipe.unet).__name__ == "MMDiT" and type(sd3_pipe.denoiser).__name__ == "FlowDenoiser"
    r = sd3_pipe.generate(GenerationParams(prompt="a red circle", seed=7, batch_size=2, **SMALL))
    assert len(r.images) == 2 and r.images[0].size == (32, 32) and r.latents.shape == (2, 16, 4, 4)
    assert not np.array_equal(arr(r.images[0]), arr(r.images[1]))
    info = parse_infotext(r.infotexts[0])
    assert info["Prompt"] == "a red circle" and info["Sampler"] == "Euler" and info["Schedule type"] == "Simple"
    assert info["Model"] == "tiny-sd3" and info["Seed"] == "7" and info["Size-1"] == "32"


def test_conditioning_layout(sd3_pipe):
    """77 CLIP tokens (CLIP-L 32 + CLIP-G 48 wide, zero-padded to 96) + 256 T5 tokens; pooled 32 + 32."""
    cond, uncond = sd3_pipe.text.pair("a red circle", "", 4)
    c = cond.at(0)
    assert c.context.shape == (1, 77 + 256, 96) and c.pooled.shape == (1, 64)
    assert torch.equal(c.context[:, :77, 80:], torch.zeros(1, 77, 16))      # CLIP part padded with zeros
    assert c.context[:, 77:].abs().sum() > 0                                  # T5 part is live
    assert uncond.at(0).context.abs().sum() > 0                               # "" is encoded, not zeroed (SD3)
    long = ", ".join(f"word{i}" for i in range(60))                           # > 75 CLIP tokens: k chunks
    n = sd3_pipe.text.pair(long, "", 4)[0].at(0).context.shape[1] - 256
    assert n % 77 == 0 and n > 77
    weighted = sd3_pipe.text.pair("a (red:1.5) circle", "", 4)[0].at(0)
    assert not torch.allclose(weighted.context[:, 77:], c.context[:, 77:])   # emphasis reaches T5 too


def test_cfg_and_negative_prompt(sd3_pipe):
    p = GenerationParams(prompt="a red circle", seed=1, **SMALL)
    base = arr(sd3_pipe.generate(p).images[0])
    neg = arr(sd3_pipe.generate(p.copy(negative_prompt="blurry")).images[0])
    assert np.abs(base - neg).mean() > 0.5
    one = arr(sd3_pipe.generate(p.copy(cfg_scale=1.0)).images[0])
    one_neg = arr(sd3_pipe.generate(p.copy(cfg_scale=1.0, negative_prompt="blurry")).images[0])
    assert np.array_equal(one, one_neg)          # CFG 1 is the conditional model alone: the negative drops out


def test_latents_carry_sd3_scale_and_shift(sd3_pipe):
    img = _pixels(_init())
    z = sd3_pipe.vae.encode(img).mode()
    torch.testing.assert_close(sd3_pipe.encode(img), (z - 0.0609) * 1.5305)
    torch.testing.assert_close(sd3_pipe.decode(sd3_pipe.encode(img)), sd3_pipe.vae.decode(z).clamp(-1, 1))


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_img2img_uses_flow_noising(sd3_pipe, strength):
    """x = (1 - s) x0 + s noise at the first level of A1111's shortened schedule (t_enc = int(strength steps))."""
    init = _init(1)
    r = sd3_pipe.generate(GenerationParams(prompt="x", seed=2, init_images=[init], denoising_strength=strength,
                                           save_process=True, **SMALL))
    t_enc = int(strength * SMALL["steps"])
    assert len(r.process) == t_enc + 1
    s = r.process[0]["sigma"]
    full = sd3_pipe._sigmas("simple", SMALL["steps"])
    assert s == pytest.approx(float(full[SMALL["steps"] - t_enc - 1]))
    x0 = sd3_pipe.encode(_pixels(init))
    noise, _ = initial_noise(x0.shape, [2])
    torch.testing.assert_close(r.process[0]["x"], (1 - s) * x0 + s * noise)
    assert "Denoising strength" in r.infotexts[0]


def test_img2img_strength_and_inpainting_as_for_sd1(sd3_pipe):
    """The SD 1 pipeline tests of strength 0 / ordering and of the inpainting overlay, on the SD3 model."""
    _sd1_tests.test_img2img_strength(sd3_pipe)
    _sd1_tests.test_inpainting_keeps_pixels_outside_the_mask(sd3_pipe)


def test_noise_drawing_sampler_and_hires_run(sd3_pipe):
    r = sd3_pipe.generate(GenerationParams(prompt="x", seed=4, **{**SMALL, "sampler_name": "Euler a"}))
    assert np.isfinite(r.latents.numpy()).all()
    r = sd3_pipe.generate(GenerationParams(prompt="x", seed=4, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                           denoising_strength=0.5, **SMALL))
    assert r.images[0].size == (48, 48)


def test_errors_teach(sd3_pipe, tiny_sd3):
    with pytest.raises(ValueError, match="multiples of 16"):
        sd3_pipe.generate(GenerationParams(prompt="x", **{**SMALL, "width": 40}))
    with pytest.raises(ValueError, match="rectified-flow model"):
        sd3_pipe.generate(GenerationParams(prompt="x", refiner_checkpoint=str(tiny_sd3), refiner_switch_at=0.5, **SMALL))


def test_small_flow_mmdit_family_with_one_clip(tmp_path):
    """The shapes-flow layout: an MMDiT on 4-channel latents, one CLIP whose first N states are the context and
    whose pooled EOS state is y (`TextEncoderSpec.context_tokens`), no T5; saved and reloaded by its family."""
    from dataclasses import replace

    from diffusekit import Pipeline
    from diffusekit.models import clip, mmdit
    from diffusekit.models.clip import CLIPTextModel
    from diffusekit.models.families import SD_PREFIX_CLIP, ModelFamily, TextEncoderSpec
    from diffusekit.models.loading import save_checkpoint
    from diffusekit.models.mmdit import MMDiT
    from diffusekit.models.vae import AutoencoderKL, VAEConfig

    spec = TextEncoderSpec("clip", clip.TINY, SD_PREFIX_CLIP, pooled=True, context_tokens=8)
    net = replace(mmdit.TINY, in_channels=4, out_channels=4, context_dim=32, adm_in_channels=32, pos_embed_max_size=8)
    fam = ModelFamily("custom", net, VAEConfig.tiny(), (spec,), prediction_type="flow", flow_shift=1.0,
                      latent_scale=0.5, default_size=32)
    torch.manual_seed(0)
    parts = {"unet": MMDiT(net), "vae": AutoencoderKL(fam.vae), "text_encoders": [CLIPTextModel(clip.TINY)]}
    with torch.no_grad():
        for p in parts["unet"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = Pipeline.from_pretrained(save_checkpoint(parts, tmp_path / "flow.safetensors", family=fam))
    assert pipe.family == fam and pipe.denoiser.schedule.shift == 1.0
    c = pipe.text.pair("a red circle", "", 4)[0].at(0)
    assert c.context.shape == (1, 8, 32) and c.pooled.shape == (1, 32)
    r = pipe.generate(GenerationParams(prompt="a red circle", seed=1, **SMALL))
    assert r.images[0].size == (32, 32) and r.latents.shape == (1, 4, 4, 4)

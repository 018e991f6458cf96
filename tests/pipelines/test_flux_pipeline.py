"""Flux.1 through the pipeline: the resolution-dependent shift, distilled guidance without a CFG batch, optional
true CFG, every registry sampler through the flow contract, img2img, stored bf16 weights computed in float32,
text-encoder offload."""
import math

import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.core import samplers as sampler_registry
from diffusekit.core.denoisers import flow_sigmas
from diffusekit.core.guidance import cfg
from diffusekit.models.families import get_family
from diffusekit.pipelines.latents import pil_to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    return Pipeline.from_pretrained(tiny_flux)


def _params(pipe, **kw):
    return GenerationParams(**{**pipe.defaults, "prompt": "a red circle", "seed": 3, "width": 32, "height": 32,
                               "steps": 4, **kw})


def test_shift_follows_diffusers_calculate_shift():
    """diffusers' calculate_shift: mu = m n + b through (256, 0.5) and (4096, 1.15); the time shift is exp(mu)."""
    dev, schnell = get_family("flux-dev"), get_family("flux-schnell")
    m = (1.15 - 0.5) / (4096 - 256)
    for w, h in [(256, 256), (1024, 1024), (768, 1344), (512, 512)]:
        n = (w // 16) * (h // 16)
        assert dev.shift_at(w, h) == pytest.approx(math.exp(m * n + 0.5 - m * 256), rel=1e-12)
        assert schnell.shift_at(w, h) == 1.0
    assert dev.shift_at(256, 256) == pytest.approx(math.exp(0.5)) and dev.shift_at(1024, 1024) == pytest.approx(math.exp(1.15))


def test_sigmas_carry_the_shift_of_the_image_size(pipe):
    for side in (16, 48):
        r = pipe.generate(_params(pipe, width=side, height=side, save_process=True, steps=4))
        got = torch.tensor([d["sigma"] for d in r.process] + [0.0], dtype=torch.float64)
        shift = pipe.family.shift_at(side, side)
        torch.testing.assert_close(got, flow_sigmas(4, shift, dtype=torch.float64), atol=1e-6, rtol=0)
    assert len(pipe._shifted) >= 2                        # one FlowDenoiser per shift, cached


def test_distilled_guidance_is_one_network_call_per_step(pipe):
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs)),
                                               with_kwargs=True)
    try:
        a = pipe.generate(_params(pipe))                               # defaults: CFG 1, guidance 3.5
        n_a, guid = len(calls), calls[0][1]["guidance"]
        b = pipe.generate(_params(pipe, guidance=1.5))
        c = pipe.generate(_params(pipe, negative_prompt="blurry", cfg_scale=3.0))   # true CFG: cond + uncond batch
    finally:
        hook.remove()
    assert n_a == 4 and calls[0][0] == 1 and guid.tolist() == [3.5]
    assert calls[-1][0] == 2 and calls[-1][1]["guidance"].tolist() == [3.5, 3.5]
    assert (a.latents - b.latents).abs().max() > 1e-4 and (a.latents - c.latents).abs().max() > 1e-4
    assert "Distilled CFG Scale: 1.5" in b.infotexts[0] and "Negative prompt: blurry" in c.infotexts[0]


def test_every_registry_sampler_runs_through_the_flow_contract(pipe):
    """Each registry sampler over the pipeline's own guided Flux denoiser (its noise_form "flow") and sigmas."""
    cs, _ = pipe.text.pair("a red circle", "", 3)
    kw = pipe._network_kwargs(cs.at(0), 0.0, 16, 16, 3.5)
    kw["context"] = kw["context"][:, :16]                  # the first 16 T5 states: the contract, not the text, is tested
    guided = cfg(pipe.denoiser_at(16, 16), 1.0, kw, kw)
    assert guided.noise_form == "flow"
    sig = pipe._sigmas("simple", 3, 16, 16)
    x = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    outs = {}
    with torch.no_grad():
        for sid, fn in sampler_registry.SAMPLERS.items():
            outs[sid] = fn(guided, x.clone(), sig, generator=[torch.Generator().manual_seed(1)])
            assert outs[sid].shape == x.shape and torch.isfinite(outs[sid]).all(), sid
    assert (outs["euler"] - outs["dpmpp_2m"]).abs().max() > 0
    r = pipe.generate(_params(pipe, sampler_name="DPM++ 2M SDE", steps=3, width=16, height=16))   # and end to end
    assert torch.isfinite(r.latents).all()


def test_img2img_starts_from_the_flow_noised_image(pipe):
    base = pipe.generate(_params(pipe))
    r = pipe.generate(_params(pipe, init_images=base.images, denoising_strength=0.5, save_process=True))
    x0 = pipe.encode(pil_to_tensor(base.images))
    s = r.process[0]["sigma"]
    noise = r.process[0]["x"] - (1 - s) * x0
    assert 0.3 < s < 0.9 and noise.std() / s == pytest.approx(1.0, abs=0.35)


def test_bf16_file_stays_bf16_and_computes_in_float32(flux_file):
    fam, path = flux_file(torch.bfloat16)
    lean = Pipeline.from_pretrained(path)
    assert lean.unet.img_in.weight.dtype == torch.bfloat16 and lean.unet.compute_dtype == torch.float32
    assert lean.parts.text_encoders[1].shared.weight.dtype == torch.bfloat16
    assert lean.parts.text_encoders[1].compute_dtype == torch.float32
    full = Pipeline.from_pretrained(path, dtype=torch.float32)       # float32 copies of the same rounded weights
    assert full.unet.img_in.weight.dtype == torch.float32
    a, b = lean.generate(_params(lean, steps=2)), full.generate(_params(full, steps=2))
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    off = Pipeline(lean.parts, offload_text_encoders=True)
    assert torch.equal(off.generate(_params(off, steps=2)).latents, a.latents)


def test_schnell_defaults_and_no_guidance(flux_file):
    fam, path = flux_file(None, "flux-schnell")
    p = Pipeline.from_pretrained(path)
    assert p.defaults == {"sampler_name": "Euler", "scheduler": "Simple", "steps": 4, "cfg_scale": 1.0}
    assert p.guidance(GenerationParams(guidance=2.0)) is None
    r = p.generate(_params(p, guidance=7.0))
    assert "Distilled CFG Scale" not in r.infotexts[0]
    with pytest.raises(ValueError, match="guidance"):
        GenerationParams(guidance=-1.0).validate()

"""Broken weights give a clear error, never a black image: non-finite latents or VAE output are detected,
a half-precision VAE that overflows is decoded again in float32, and large batches decode in chunks."""
import pytest
import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.pipelines import pipeline as pipeline_mod
from diffusekit.pipelines.pipeline import NonFiniteOutput

P = dict(prompt="a red circle", steps=2, width=32, height=32, seed=1, sampler_name="Euler")


@pytest.fixture()
def pipe(tiny_sd1):
    return Pipeline.from_pretrained(tiny_sd1)          # a fresh copy: these tests break its weights


def test_nan_unet_weights_are_an_error_not_a_black_image(pipe):
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteOutput, match="non-finite latents.*UNet weights"):
        pipe.generate(GenerationParams(**P))


def test_nan_vae_weights_are_an_error(pipe):
    with torch.no_grad():
        for p in pipe.vae.decoder.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteOutput, match="VAE .* decoded non-finite values"):
        pipe.generate(GenerationParams(**P))


def test_an_overflowing_half_precision_vae_is_decoded_again_in_float32(pipe):
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(3e4)       # activations beyond float16's 65504, fine in float32
    ref = pipe.decode(z)
    pipe.vae.half()
    assert not torch.isfinite(pipe.vae.decode((z / pipe.scale).half())).all()   # what fp16 alone gives
    out = pipe.decode(z)
    assert torch.isfinite(out).all() and next(pipe.vae.parameters()).dtype == torch.float16
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)        # the weights went through float16


def test_large_batches_decode_in_chunks_with_the_same_pixels(pipe, monkeypatch):
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = pipe.decode(z)
    calls = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda x: calls.append(x.shape[0]) or decode(x))
    monkeypatch.setattr(pipeline_mod, "DECODE_PIXELS_PER_CALL", 2 * 32 * 32)   # two 32x32 images per call
    chunked = pipe.decode(z)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)

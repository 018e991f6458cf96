"""`Pipeline(vae_tiling=True)`: images larger than one 512 px tile decode and encode through the VAE's blended
tiles (diffusers' enable_vae_tiling); smaller ones, and the default, take the whole-image pass unchanged."""
from __future__ import annotations

import torch

from diffusekit import GenerationParams, Pipeline
from diffusekit.pipelines import pipeline as pipeline_mod


def _spy(monkeypatch, vae, name):
    calls = []
    real = getattr(vae, name)

    def wrapped(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(vae, name, wrapped)
    return calls


def test_vae_tiling_decodes_and_encodes_large_images_in_tiles(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "VAE_TILE", 8)           # shapes' VAE (factor 4): 32 px tiles, 8 shared
    monkeypatch.setattr(pipeline_mod, "VAE_TILE_OVERLAP", 2)
    plain = Pipeline.from_pretrained("shapes")
    tiled = Pipeline.from_pretrained("shapes", vae_tiling=True)
    params = GenerationParams(prompt="a red circle on a blue background", steps=4, seed=3, width=64, height=64)
    z = plain.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    dec, enc = _spy(monkeypatch, tiled.vae, "tiled_decode"), _spy(monkeypatch, tiled.vae, "tiled_encode")
    a, b = plain.decode(z), tiled.decode(z)
    assert dec == [{"tile": 8, "overlap": 2}]
    assert 0 < (a - b).abs().mean() < 0.1                           # [-1, 1] pixels: a blended, close decode
    za, zb = plain.encode(a), tiled.encode(a)
    assert enc == [{"tile": 32, "overlap": 8}]
    assert 0 < (za - zb).abs().mean() < 0.25 * za.abs().mean()
    small = tiled.encode(a[..., :32, :32])                         # one tile's worth: the whole-image pass
    assert len(enc) == 1 and torch.equal(small, plain.encode(a[..., :32, :32]))
    img = tiled.generate(params).images[0]                         # the whole generation goes through it
    assert img.size == (64, 64) and len(dec) == 2
    assert not plain.vae_tiling and tiled.vae_tiling


def test_cpu_decode_runs_channels_last_and_matches_the_plain_nchw_decode():
    """On CPU `Pipeline.decode` feeds the VAE channels-last latents (oneDNN's faster layout at the decoder's high
    resolutions): the images equal the plain NCHW decode within fp32 summation order (stated: 1e-4 of the [-1, 1]
    range), come back as contiguous NCHW tensors, and the VAE really saw channels-last input."""
    pipe = Pipeline.from_pretrained("shapes")
    z = torch.randn(2, pipe.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        fast = pipe.decode(z)
    finally:
        hook.remove()
    with torch.no_grad():
        plain = pipe.vae.decode((z / pipe.scale + pipe.shift).contiguous()).float().clamp(-1, 1)
    assert seen == [True] and fast.is_contiguous() and fast.shape == plain.shape
    assert (fast - plain).abs().max() < 1e-4

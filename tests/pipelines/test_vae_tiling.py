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

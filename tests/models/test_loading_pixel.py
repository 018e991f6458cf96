"""Pixel-space (VAE-less) checkpoints: a ModelFamily with vae=None survives its JSON description and
a save/load round trip with bit-equal weights and no VAE; mixing a VAE into such a family (or leaving
it out of one that has it) is a CheckpointError that names the mismatch. Tolerances: none (torch.equal)."""

import json
from dataclasses import replace

import pytest
import torch

from diffusekit.models import (CheckpointError, ModelFamily, load_checkpoint, read_family,
                               read_safetensors_header, save_checkpoint, tiny_family)
from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.tokenizer import CLIPTokenizer, find_bundled_bpe
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL, VAEConfig

BPE_GZ = find_bundled_bpe()
needs_bpe = pytest.mark.skipif(BPE_GZ is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz")


def pixel_family() -> ModelFamily:
    """The tiny SD 1 layout without a VAE: its UNet takes and returns RGB images."""
    base = tiny_family("custom")
    return replace(base, vae=None, unet=replace(base.unet, in_channels=3, out_channels=3), latent_scale=1.0,
                   default_size=16)


def pixel_modules(fam: ModelFamily, seed: int = 0) -> dict:
    """UNet and text encoder of `fam` with every parameter drawn N(0, 0.05) (zero-initialised ones too)."""
    torch.manual_seed(seed)
    unet, te = UNetModel(fam.unet), CLIPTextModel(fam.text_encoders[0].config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (*unet.parameters(), *te.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return {"unet": unet, "text_encoders": [te]}


@pytest.fixture(scope="module")
def tok():
    if BPE_GZ is None:
        pytest.skip("needs open_clip's bpe_simple_vocab_16e6.txt.gz")
    return CLIPTokenizer.from_bpe_gz(BPE_GZ)


@pytest.fixture(scope="module")
def pixel_file(tmp_path_factory):
    fam = pixel_family()
    mods = pixel_modules(fam)
    return save_checkpoint(mods, tmp_path_factory.mktemp("pixel") / "pixel.safetensors", family=fam), fam, mods


def test_family_json_round_trip_keeps_vae_none():
    fam = pixel_family()
    data = json.loads(fam.to_json())
    assert data["vae"] is None
    back = ModelFamily.from_dict(data)
    assert back == fam and back.vae is None and back.pixel_space
    assert (back.latent_channels, back.latent_factor, back.is_inpaint) == (3, 1, False)
    # a pixel inpainting UNet: image (3) + mask (1) + masked image (3)
    assert replace(fam, unet=replace(fam.unet, in_channels=7)).is_inpaint
    sd1 = tiny_family("sd1")   # latent families are unchanged by the generalisation
    assert not sd1.pixel_space and (sd1.latent_channels, sd1.latent_factor) == (4, 8)
    assert tiny_family("sd1-inpaint").is_inpaint and not sd1.is_inpaint
    assert ModelFamily.from_dict({k: v for k, v in sd1.to_dict().items() if k != "vae"}).vae == VAEConfig()


@needs_bpe
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_pixel_space_save_load_round_trip(tmp_path, pixel_file, tok, dtype):
    path, fam, mods = pixel_file
    if dtype is not None:
        path = save_checkpoint(mods, tmp_path / "half.safetensors", family=fam, dtype=dtype)
    header, meta = read_safetensors_header(path)
    assert header and not [k for k in header if k.startswith("first_stage_model.")]
    assert json.loads(meta["diffusekit.family"])["vae"] is None
    parts = load_checkpoint(path, tokenizer=tok)
    assert parts.vae is None and parts.family == fam and read_family(path) == fam
    for prefix, want, got in (("model.diffusion_model.", mods["unet"], parts.unet),
                              ("cond_stage_model.transformer.", mods["text_encoders"][0], parts.text_encoders[0])):
        w, g = want.state_dict(), got.state_dict()
        assert w.keys() == g.keys()
        for k in w:
            expect = w[k] if dtype is None else w[k].to(dtype)
            assert g[k].dtype == expect.dtype and torch.equal(g[k], expect), prefix + k
    again = save_checkpoint(parts, tmp_path / "again.safetensors")   # ModelParts with vae=None saves too
    assert read_safetensors_header(again)[0] == header


def test_vae_and_family_must_agree(tmp_path, pixel_file):
    _, fam, mods = pixel_file
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(CheckpointError, match="pixel-space model .*AutoencoderKL VAE was given"):
        save_checkpoint({**mods, "vae": vae}, tmp_path / "a.safetensors", family=fam)
    with_vae = replace(fam, vae=VAEConfig.tiny())
    with pytest.raises(CheckpointError, match="has a VAE .* but vae is None"):
        save_checkpoint({**mods, "vae": None}, tmp_path / "b.safetensors", family=with_vae)
    with pytest.raises(CheckpointError, match=r"lacks \['vae'\]"):
        save_checkpoint(mods, tmp_path / "c.safetensors", family=with_vae)
    save_checkpoint({**mods, "vae": None}, tmp_path / "d.safetensors", family=fam)   # None is as good as absent


def test_loading_with_the_wrong_space_names_the_vae(tmp_path, pixel_file):
    path, fam, mods = pixel_file
    with pytest.raises(CheckpointError, match=r"missing keys .*first_stage_model\..*holds no VAE"):
        load_checkpoint(path, family=replace(fam, vae=VAEConfig.tiny()))
    latent = replace(fam, vae=VAEConfig.tiny(), unet=replace(fam.unet, in_channels=4, out_channels=4))
    latent_mods = pixel_modules(latent) | {"vae": AutoencoderKL(latent.vae)}
    latent_file = save_checkpoint(latent_mods, tmp_path / "latent.safetensors", family=latent)
    with pytest.raises(CheckpointError, match=r"unexpected keys .*first_stage_model\..*pixel-space model"):
        load_checkpoint(latent_file, family=replace(latent, vae=None))


def test_a_pixel_file_without_metadata_says_what_it_is(tmp_path, pixel_file):
    import safetensors.torch
    path, _, _ = pixel_file
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(path), bare)   # the same tensors, no family metadata
    with pytest.raises(CheckpointError, match="pixel-space model: no VAE"):
        load_checkpoint(bare)

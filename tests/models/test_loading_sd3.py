"""SD3 / SD3.5 checkpoints: detection from keys, single files with and without their text encoders,
stand-alone encoder files (fp8 / fp16 stored, upcast), the optional T5, the T5 tokenizer lookup."""
import shutil
from dataclasses import replace

import pytest
import torch

from diffusekit.models import CheckpointError, detect_family, load_checkpoint, read_safetensors_header, save_checkpoint
from diffusekit.models import mmdit
from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.convert_mmdit import mmdit_config_from_shapes
from diffusekit.models.families import SD3_FAMILIES, tiny_family
from diffusekit.models.mmdit import MMDiT
from diffusekit.models.sd3_loading import T5_TOKENIZER_ENV
from diffusekit.models.t5 import T5EncoderModel
from diffusekit.models.tokenizer import find_bundled_bpe
from diffusekit.models.vae import AutoencoderKL
from diffusekit.models.weight_files import write_safetensors

pytestmark = pytest.mark.skipif(find_bundled_bpe() is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz")


def tiny_sd3(name="sd3", seed=0):
    fam = tiny_family(name)
    g = torch.Generator().manual_seed(seed)
    mods = {"unet": MMDiT(fam.unet), "vae": AutoencoderKL(fam.vae),
            "text_encoders": [CLIPTextModel(fam.text_encoders[0].config), CLIPTextModel(fam.text_encoders[1].config),
                              T5EncoderModel(fam.text_encoders[2].config)]}
    with torch.no_grad():
        for m in (mods["unet"], mods["vae"], *mods["text_encoders"]):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return fam, mods


def flat(mods, fam):
    out = {f"model.diffusion_model.{k}": v for k, v in mods["unet"].state_dict().items()}
    out |= {f"first_stage_model.{k}": v for k, v in mods["vae"].state_dict().items()}
    for spec, te in zip(fam.text_encoders, mods["text_encoders"]):
        if te is not None:
            out |= {spec.prefix + k: v for k, v in te.state_dict().items()}
    return out


def shapes_of(path):
    return {k: s for k, (_, s) in read_safetensors_header(path)[0].items()}


@pytest.fixture
def folder(tmp_path, t5_tokenizer_dir):
    shutil.copytree(t5_tokenizer_dir, tmp_path / "tokenizer_3")
    return tmp_path


@pytest.mark.parametrize("name", SD3_FAMILIES)
def test_single_file_with_all_encoders_round_trips(folder, name):
    fam, mods = tiny_sd3(name, seed=SD3_FAMILIES.index(name))
    path = save_checkpoint(mods, folder / f"{name}.safetensors", family=fam)
    assert detect_family(shapes_of(path)) == name
    parts = load_checkpoint(path)
    assert parts.family == fam and parts.family.is_mmdit
    got = flat({"unet": parts.unet, "vae": parts.vae, "text_encoders": parts.text_encoders}, fam)
    want = flat(mods, fam)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [type(t).__name__ for t in parts.tokenizers] == ["CLIPTokenizer", "CLIPTokenizer", "T5Tokenizer"]


@pytest.mark.parametrize("preset, name", [("sd3_medium", "sd3"), ("sd35_large", "sd35-large"),
                                          ("sd35_medium", "sd35-medium")])
def test_released_architectures_detected_from_keys(preset, name):
    """Real-size key layouts (built on the meta device, no weights): family and exact MMDiT config."""
    cfg = mmdit.PRESETS[preset]
    with torch.device("meta"):
        shapes = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in MMDiT(cfg).state_dict().items()}
    shapes["first_stage_model.decoder.conv_out.weight"] = (3, 128, 3, 3)
    assert detect_family(shapes) == name
    assert mmdit_config_from_shapes(shapes) == replace(cfg, sample_size=None)


def test_file_without_encoders_reads_them_from_text_encoders_folder(folder):
    """The SD3.5 release layout: MMDiT + VAE in one file, text_encoders/{clip_l,clip_g,t5xxl_fp8_e4m3fn}.safetensors
    beside it in the transformers key layout; fp8 weights are upcast (bf16 by default, or to `dtype`)."""
    fam, mods = tiny_sd3()
    path = save_checkpoint({**mods, "text_encoders": [None, None, None]},
                           folder / "mmdit-only.safetensors", family=replace(fam, text_encoders=tuple(
                               replace(s, optional=True) for s in fam.text_encoders)))
    assert not any(k.startswith("text_encoders.") for k in shapes_of(path))
    with pytest.raises(CheckpointError, match="no clip_l.*text_encoder_files="):   # the published family
        load_checkpoint(path, family="sd3")                                      # needs its CLIPs
    te = folder / "text_encoders"
    te.mkdir()
    clip_l, clip_g, t5 = mods["text_encoders"]
    write_safetensors(te / "clip_l.safetensors", clip_l.state_dict(), {})
    write_safetensors(te / "clip_g.safetensors", {f"transformer.{k}": v for k, v in clip_g.state_dict().items()}, {})
    t5_sd = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in t5.state_dict().items()}
    write_safetensors(te / "t5xxl_fp8_e4m3fn.safetensors", t5_sd, {}, dtype=torch.float8_e4m3fn)
    small = fam
    parts = load_checkpoint(path, family=small)
    assert parts.text_encoders[2].shared.weight.dtype == torch.bfloat16
    assert torch.equal(parts.text_encoders[2].shared.weight, t5.shared.weight.to(torch.float8_e4m3fn).to(torch.bfloat16))
    assert torch.equal(parts.text_encoders[1].text_projection.weight, clip_g.text_projection.weight)
    up = load_checkpoint(path, family=small, dtype=torch.float32)
    w = up.text_encoders[2].encoder.block[1].layer[1].DenseReluDense.wo.weight
    assert w.dtype == torch.float32 and torch.equal(w, t5.encoder.block[1].layer[1].DenseReluDense.wo.weight
                                                    .to(torch.float8_e4m3fn).float())
    (te / "t5xxl_fp8_e4m3fn.safetensors").unlink()             # no T5 anywhere: optional, so None
    parts = load_checkpoint(path, family=small)
    assert parts.text_encoders[2] is None and parts.tokenizers[2] is None
    other = folder / "elsewhere.safetensors"
    write_safetensors(other, t5.state_dict(), {}, dtype=torch.float16)  # an explicit file wins, fp16 kept as stored
    parts = load_checkpoint(path, family=small, text_encoder_files={"t5xxl": other})
    assert parts.text_encoders[2].shared.weight.dtype == torch.float16


def test_encoder_file_of_the_wrong_model_is_named(folder):
    fam, mods = tiny_sd3()
    path = save_checkpoint(mods | {"text_encoders": [mods["text_encoders"][0], None, mods["text_encoders"][2]]},
                           folder / "no-g.safetensors",
                           family=replace(fam, text_encoders=(fam.text_encoders[0], replace(fam.text_encoders[1], optional=True),
                                                              fam.text_encoders[2])))
    bad = folder / "clip_g.safetensors"
    write_safetensors(bad, mods["text_encoders"][0].state_dict(), {})     # CLIP-L weights where CLIP-G belongs
    with pytest.raises(CheckpointError, match="is not the clip_g text encoder.*wrong shapes"):
        load_checkpoint(path, family=fam)
    with pytest.raises(CheckpointError, match="valid: clip_l, clip_g, t5xxl"):
        load_checkpoint(path, family=fam, text_encoder_files={"clip_big": bad})


def test_t5_tokenizer_lookup(tmp_path, t5_tokenizer_dir, monkeypatch):
    fam, mods = tiny_sd3()
    path = save_checkpoint(mods, tmp_path / "m.safetensors", family=fam)
    monkeypatch.delenv(T5_TOKENIZER_ENV, raising=False)
    with pytest.raises(CheckpointError, match="no T5 tokenizer was found.*t5_tokenizer="):
        load_checkpoint(path)
    assert type(load_checkpoint(path, t5_tokenizer=t5_tokenizer_dir / "tokenizer.json").tokenizers[2]).__name__ == \
        "T5Tokenizer"
    monkeypatch.setenv(T5_TOKENIZER_ENV, str(t5_tokenizer_dir))
    assert load_checkpoint(path).tokenizers[2].eos_id == 1


def test_flux_is_named_not_misread():
    flux_keys = {"model.diffusion_model.img_in.weight": (3072, 64),
                 "model.diffusion_model.double_blocks.0.img_mod.lin.weight": (18432, 3072)}
    assert detect_family(flux_keys) == "flux-schnell"     # Flux, not SD3 (tests/models/test_loading_flux.py)

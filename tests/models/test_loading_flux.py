"""Flux.1 checkpoints: detection (dev vs schnell from guidance_in), ComfyUI single files, BFL's prefix-less
transformer file with ae.safetensors and the encoders beside it, fp8 / bf16 weights kept as stored and
memory-mapped, errors that name what is missing."""
import shutil

import pytest
import torch

from diffusekit.models import CheckpointError, detect_family, load_checkpoint, read_safetensors_header, save_checkpoint
from diffusekit.models.clip import CLIPTextModel
from diffusekit.models.families import FLUX_FAMILIES, tiny_family
from diffusekit.models.flux import Flux
from diffusekit.models.loading import read_family
from diffusekit.models.t5 import T5EncoderModel
from diffusekit.models.tokenizer import find_bundled_bpe
from diffusekit.models.vae import AutoencoderKL
from diffusekit.models.weight_files import write_safetensors

pytestmark = [pytest.mark.skipif(find_bundled_bpe() is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz"),
              pytest.mark.usefixtures("one_thread")]


def tiny_flux(name="flux-dev", seed=0):
    fam = tiny_family(name)
    g = torch.Generator().manual_seed(seed)
    mods = {"unet": Flux(fam.unet), "vae": AutoencoderKL(fam.vae),
            "text_encoders": [CLIPTextModel(fam.text_encoders[0].config), T5EncoderModel(fam.text_encoders[1].config)]}
    with torch.no_grad():
        for m in (mods["unet"], mods["vae"], *mods["text_encoders"]):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return fam, mods


def shapes_of(path):
    return {k: s for k, (_, s) in read_safetensors_header(path)[0].items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].to(dtype or sa[k].dtype), sb[k].to(dtype or sa[k].dtype)), k


@pytest.fixture
def folder(tmp_path, t5_tokenizer_dir):
    shutil.copytree(t5_tokenizer_dir, tmp_path / "tokenizer_2")
    return tmp_path


@pytest.mark.parametrize("name", FLUX_FAMILIES)
def test_comfyui_single_file_round_trips_and_is_detected(folder, name):
    fam, mods = tiny_flux(name)
    path = save_checkpoint(mods, folder / f"{name}.safetensors", family=fam, metadata={})
    shapes = shapes_of(path)
    assert detect_family(shapes) == name
    assert ("model.diffusion_model.guidance_in.in_layer.weight" in shapes) == (name == "flux-dev")
    # without our metadata (a file other tools wrote): the transformer's config comes from the key shapes
    # (the toy VAE and encoders are no published size, so the family is passed for loading)
    bare_meta = folder / "other.safetensors"
    write_safetensors(bare_meta, _flat(mods, fam), {"format": "pt"})
    detected = read_family(bare_meta)
    assert detected.name == name and detected.unet == fam.unet and detected.text_encoders[1].max_length == (
        512 if name == "flux-dev" else 256)
    parts = load_checkpoint(bare_meta, family=fam)
    assert parts.family.name == name
    same_weights(parts.unet, mods["unet"])
    same_weights(parts.text_encoders[1], mods["text_encoders"][1])
    assert parts.tokenizers[1] is not None                 # T5 tokenizer from tokenizer_2/ beside the file


def _flat(mods, fam, net_prefix="model.diffusion_model."):
    out = {net_prefix + k: v for k, v in mods["unet"].state_dict().items()}
    out |= {f"first_stage_model.{k}": v for k, v in mods["vae"].state_dict().items()}
    for spec, te in zip(fam.text_encoders, mods["text_encoders"]):
        out |= {spec.prefix + k: v for k, v in te.state_dict().items()}
    return out


def test_bfl_release_layout_transformer_alone_with_ae_and_text_encoders(folder):
    """flux1-dev.safetensors (keys without prefix, bf16) + ae.safetensors + text_encoders/{clip_l, t5xxl_fp8}."""
    fam, mods = tiny_flux("flux-dev", seed=1)
    write_safetensors(folder / "flux1-dev.safetensors", mods["unet"].state_dict(), {"format": "pt"}, torch.bfloat16)
    with pytest.raises(CheckpointError, match="ae.safetensors"):
        load_checkpoint(folder / "flux1-dev.safetensors", family=fam)
    write_safetensors(folder / "ae.safetensors", mods["vae"].state_dict(), {"format": "pt"})
    (folder / "text_encoders").mkdir()
    with pytest.raises(CheckpointError, match="clip_l"):
        load_checkpoint(folder / "flux1-dev.safetensors", family=fam)
    write_safetensors(folder / "text_encoders" / "clip_l.safetensors", mods["text_encoders"][0].state_dict(), {})
    write_safetensors(folder / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", mods["text_encoders"][1].state_dict(),
                      {}, torch.float8_e4m3fn)
    assert detect_family(shapes_of(folder / "flux1-dev.safetensors")) == "flux-dev"
    assert read_family(folder / "flux1-dev.safetensors").unet == fam.unet
    parts = load_checkpoint(folder / "flux1-dev.safetensors", family=fam)
    assert parts.family.name == "flux-dev"
    assert parts.unet.img_in.weight.dtype == torch.bfloat16          # kept as stored (dtype=None)
    same_weights(parts.unet, mods["unet"], torch.bfloat16)
    same_weights(parts.vae, mods["vae"])
    same_weights(parts.text_encoders[0], mods["text_encoders"][0])
    assert parts.text_encoders[1].shared.weight.dtype == torch.bfloat16   # T5 fp8 -> bf16 (no per-layer upcast there)
    f32 = load_checkpoint(folder / "flux1-dev.safetensors", family=fam, dtype=torch.float32)
    assert f32.unet.img_in.weight.dtype == torch.float32


def test_fp8_transformer_stays_fp8_and_memory_mapped(folder):
    fam, mods = tiny_flux("flux-schnell", seed=2)
    flat = _flat(mods, fam)
    flat = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.") else v for k, v in flat.items()}
    write_safetensors(folder / "flux1-schnell-fp8.safetensors", flat, {"format": "pt"})
    parts = load_checkpoint(folder / "flux1-schnell-fp8.safetensors", family=fam)
    w = parts.unet.single_blocks[0].linear1.weight
    assert w.dtype == torch.float8_e4m3fn and parts.unet.activation_dtype() == torch.bfloat16
    assert parts.vae.decoder.conv_in.weight.dtype == torch.float32
    # zero copy: the parameter is the file's mapped bytes (safetensors keeps an mmap of the file)
    data = (folder / "flux1-schnell-fp8.safetensors").read_bytes()
    raw = w.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    assert raw in data
    x = torch.randn(1, 16, 4, 4)
    ctx, y = torch.randn(1, 3, fam.unet.context_in_dim), torch.randn(1, fam.unet.vec_in_dim)
    with torch.no_grad():
        out = parts.unet(x, torch.tensor([500.0]), ctx, y)
        ref = Flux(fam.unet).eval()
        ref.load_state_dict({k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in mods["unet"].state_dict().items()},
                            assign=True)
        torch.testing.assert_close(out, ref(x, torch.tensor([500.0]), ctx, y))


def test_wrong_shapes_and_families_are_named(folder):
    fam, mods = tiny_flux("flux-dev")
    path = save_checkpoint(mods, folder / "f.safetensors", family=fam)
    with pytest.raises(CheckpointError, match="flux-dev"):
        load_checkpoint(path, family="sd3")
    sd = {k: v for k, v in mods["unet"].state_dict().items() if not k.startswith("single_blocks.1.")}
    write_safetensors(folder / "cut.safetensors", sd, {})
    write_safetensors(folder / "ae.safetensors", mods["vae"].state_dict(), {})
    parts_fam = read_family(folder / "cut.safetensors")
    assert parts_fam.unet.depth_single_blocks == 1          # a smaller Flux reads as what it is

"""Checkpoint loading: every family round-trips through a single-file safetensors (fp32/fp16/
bf16) with bit-equal weights and the right detected family; diffusers folders written by
diffusers/transformers themselves load and match the reference modules; pickles load only
through weights_only; broken files are CheckpointErrors that name the problem.

Tolerances: single-file round trips are exact (torch.equal); diffusers parity in fp32 is
checked to 1e-5 relative to the output's scale (different kernels: conv vs linear, SDPA)."""

import hashlib
import json
import os
import pickle
import random
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffusekit.models import (FAMILIES, FAMILY_NAMES, CheckpointError, ModelFamily, detect_family,
                               get_family, load_checkpoint, predicts_v, read_safetensors_header,
                               save_checkpoint, tiny_family)
from diffusekit.models import loading
from diffusekit.models.clip import CLIPTextModel, OpenCLIPTextModel
from diffusekit.models.families import FLUX_FAMILIES, SD3_FAMILIES
from diffusekit.models.tokenizer import CLIPTokenizer, find_bundled_bpe
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL

BPE_GZ = find_bundled_bpe()
needs_bpe = pytest.mark.skipif(BPE_GZ is None, reason="needs open_clip's bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def tok():
    """One tokenizer for the tests that are not about tokenizers (parsing the BPE file is slow)."""
    if BPE_GZ is None:
        pytest.skip("needs open_clip's bpe_simple_vocab_16e6.txt.gz")
    return CLIPTokenizer.from_bpe_gz(BPE_GZ)


def tiny_modules(family: ModelFamily, seed: int = 0) -> dict:
    """Modules of `family` with every parameter drawn N(0, 0.05) (zero-initialised layers too, so
    a mix-up of any two tensors would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"), loading._SkipInitOnMeta():  # no own init: every value is drawn below
        unet, vae = UNetModel(family.unet), AutoencoderKL(family.vae)
        tes = [(CLIPTextModel if s.kind == "clip" else OpenCLIPTextModel)(s.config) for s in family.text_encoders]
    unet, vae, tes = unet.to_empty(device="cpu"), vae.to_empty(device="cpu"), [t.to_empty(device="cpu") for t in tes]
    with torch.no_grad():
        for m in (unet, vae, *tes):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return {"unet": unet, "vae": vae, "text_encoders": tes}


def flat_state(mods: dict, family: ModelFamily) -> dict[str, torch.Tensor]:
    """The LDM-layout state dict of `mods`, built here independently of save_checkpoint."""
    out = {f"model.diffusion_model.{k}": v for k, v in mods["unet"].state_dict().items()}
    out |= {f"first_stage_model.{k}": v for k, v in mods["vae"].state_dict().items()}
    for spec, te in zip(family.text_encoders, mods["text_encoders"]):
        out |= {spec.prefix + k: v for k, v in te.state_dict().items()}
    return out


def loaded_state(parts) -> dict[str, torch.Tensor]:
    return flat_state({"unet": parts.unet, "vae": parts.vae, "text_encoders": parts.text_encoders}, parts.family)


def shapes_of(path) -> dict:
    return {k: shape for k, (_, shape) in read_safetensors_header(path)[0].items()}


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    fam = tiny_family("sd1")
    mods = tiny_modules(fam)
    path = save_checkpoint(mods, tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors", family=fam)
    return path, fam, mods


# ------------------------------------------------------------------------------ single files
@needs_bpe
@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if n not in SD3_FAMILIES + FLUX_FAMILIES])  # test_loading_sd3.py, test_loading_flux.py
def test_every_family_round_trips_fp32(tmp_path, name, tok):
    fam = tiny_family(name)
    mods = tiny_modules(fam, seed=FAMILY_NAMES.index(name))
    path = save_checkpoint(mods, tmp_path / f"{name}.safetensors", family=fam)
    if name != "custom":  # custom has no key signature of its own (it is an sd1 layout here)
        assert detect_family(shapes_of(path)) == ("sd2-v" if name == "sd2" else name)
    parts = load_checkpoint(path, tokenizer=tok)
    assert parts.family == fam and parts.family.name == name
    want, got = flat_state(mods, fam), loaded_state(parts)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert parts.tokenizers == [tok] * len(fam.text_encoders) and parts.scheduler_config is None
    assert parts.name == name and not parts.unet.training


@needs_bpe
@pytest.mark.parametrize("name,dtype", [("sd1", torch.float16), ("sdxl", torch.float16),
                                        ("sd2", torch.bfloat16), ("sdxl-refiner", torch.bfloat16)])
def test_half_precision_files_round_trip(tmp_path, name, dtype, tok):
    fam = tiny_family(name)
    mods = tiny_modules(fam)
    path = save_checkpoint(mods, tmp_path / "m.safetensors", family=fam, dtype=dtype)
    assert {d for d, _ in read_safetensors_header(path)[0].values()} == {"F16" if dtype == torch.float16 else "BF16"}
    assert path.stat().st_size < sum(t.numel() for t in flat_state(mods, fam).values()) * 2 + 100_000
    got = loaded_state(load_checkpoint(path, tokenizer=tok))
    up = loaded_state(load_checkpoint(path, dtype=torch.float32, tokenizer=tok))  # the converting read path
    for k, v in flat_state(mods, fam).items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
        assert up[k].dtype == torch.float32 and torch.equal(up[k], v.to(dtype).float()), k


@needs_bpe
def test_dtype_casts_while_loading_and_outputs_follow(sd1_file, tok):
    path, fam, mods = sd1_file
    got = loaded_state(load_checkpoint(path, dtype=torch.bfloat16, tokenizer=tok))
    for k, v in flat_state(mods, fam).items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0])
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = mods["unet"].eval()(x, t, ctx)
        out = load_checkpoint(path, tokenizer=tok).unet(x, t, ctx)
    # fp32 load: the same weights (compared bit for bit above) give the same numbers, up to the summation
    # order MKL/oneDNN pick for a weight at another address (memory-mapped vs allocated; ~2e-8 on an AMD EPYC)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@needs_bpe
def test_zero_copy_weights_are_writable_and_leave_the_file_alone(sd1_file, tok):
    path, _, _ = sd1_file
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    parts = load_checkpoint(path, tokenizer=tok)
    w = parts.unet.out[2].bias
    with torch.no_grad():
        w.add_(1.0)  # private copy-on-write pages: the file must not change
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert torch.equal(load_checkpoint(path, tokenizer=tok).unet.out[2].bias + 1.0, w)


@needs_bpe
def test_hash_and_name(sd1_file):
    path, _, _ = sd1_file
    parts = load_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert parts.sha256 == digest and parts.hash10 == digest[:10] and len(parts.hash10) == 10
    assert parts.name == "tiny-sd1" and parts.path == path


def test_saved_file_is_standard_safetensors(sd1_file):
    path, fam, mods = sd1_file
    ref = safetensors.torch.load_file(path)  # the reference reader accepts our writer's output
    want = flat_state(mods, fam)
    assert ref.keys() == want.keys() and all(torch.equal(ref[k], want[k]) for k in want)
    meta = read_safetensors_header(path)[1]
    assert ModelFamily.from_dict(json.loads(meta["diffusekit.family"])) == fam and meta["format"] == "pt"


def test_save_is_atomic(tmp_path, sd1_file):
    path, fam, mods = sd1_file
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old contents")
    bad = dict(mods, unet=torch.nn.Module())  # fine so far ...
    bad["unet"].register_buffer("z", torch.zeros(2, dtype=torch.complex64))  # ... safetensors has no complex
    with pytest.raises(CheckpointError, match="complex64"):
        save_checkpoint(bad, target, family=fam)
    assert target.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["out.safetensors"]
    save_checkpoint(mods, target, family=fam)
    assert os.listdir(tmp_path) == ["out.safetensors"] and target.read_bytes() == path.read_bytes()


def test_save_checks_its_inputs(tmp_path, sd1_file):
    _, fam, mods = sd1_file
    with pytest.raises(CheckpointError, match=".safetensors"):
        save_checkpoint(mods, tmp_path / "m.ckpt", family=fam)
    with pytest.raises(CheckpointError, match="needs family"):
        save_checkpoint(mods, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="OpenCLIPTextModel"):
        save_checkpoint(mods, tmp_path / "m.safetensors", family=tiny_family("sd2"))


@needs_bpe
def test_family_override_keeps_shapes_changes_conventions(tmp_path, tok):
    fam = tiny_family("sd2-v")
    path = save_checkpoint(tiny_modules(fam), tmp_path / "m.safetensors", family=fam)
    assert load_checkpoint(path, tokenizer=tok).family.prediction_type == "v"
    eps = load_checkpoint(path, family="sd2", tokenizer=tok).family
    assert (eps.name, eps.prediction_type, eps.default_size) == ("sd2", "eps", 512)
    assert eps.unet == fam.unet and eps.text_encoders[0].config == fam.text_encoders[0].config
    with pytest.raises(CheckpointError, match="text encoder"):
        load_checkpoint(path, family="sdxl")
    with pytest.raises(CheckpointError, match="unknown model family 'sd4'.*valid: sd1"):
        load_checkpoint(path, family="sd4")


# ------------------------------------------------------------------------------ .ckpt / pickles
@needs_bpe
def test_ckpt_loads_with_weights_only(tmp_path, sd1_file, tok):
    _, fam, mods = sd1_file
    want = flat_state(mods, fam)
    extra = {"betas": torch.ones(1000), "model_ema.decay": torch.tensor(0.999),
             "model_ema.diffusion_modelinput_blocks00weight": torch.ones(3),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    torch.save({"state_dict": {**want, **extra}, "global_step": 470000, "epoch": 6}, tmp_path / "m.ckpt")
    parts = load_checkpoint(tmp_path / "m.ckpt", family=fam, tokenizer=tok)
    assert all(torch.equal(loaded_state(parts)[k], want[k]) for k in want)
    torch.save(want, tmp_path / "flat.pt")  # a bare state dict works too
    assert torch.equal(load_checkpoint(tmp_path / "flat.pt", family=fam, tokenizer=tok).vae.decoder.conv_out.weight,
                       mods["vae"].decoder.conv_out.weight)


class Payload:
    """Unpickling this would touch a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_needing_code_is_refused_and_never_run(tmp_path, sd1_file):
    _, fam, mods = sd1_file
    marker = tmp_path / "pwned"
    torch.save({"state_dict": flat_state(mods, fam), "callback": Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="arbitrary pickled code.*pathlib") as e:
        load_checkpoint(tmp_path / "evil.ckpt", family=fam)
    assert "safetensors" in str(e.value) and not marker.exists()
    (tmp_path / "old.ckpt").write_bytes(pickle.dumps(Payload(str(marker)), protocol=2))  # legacy bare pickle
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "old.ckpt", family=fam)
    assert not marker.exists()


# ------------------------------------------------------------------------------ broken files
def test_truncated_and_garbage_files(tmp_path, sd1_file):
    path, fam, _ = sd1_file
    data = path.read_bytes()
    cases = {
        "trunc.safetensors": (data[: len(data) // 2], "truncated"),
        "head.safetensors": (data[:5], "too short"),
        "garbage.safetensors": (random.Random(1).randbytes(4096), "header|not a safetensors"),
        "badjson.safetensors": ((20).to_bytes(8, "little") + b"{not json at all....}" + b"x" * 64, "not valid JSON"),
        "tail.safetensors": (data + b"\0" * 16, "after the last tensor"),
        "zip.safetensors": (b"PK\x03\x04" + b"\0" * 64, "rename it to .ckpt"),
        "trunc.ckpt": (None, "truncated or corrupt"),
        "garbage.ckpt": (random.Random(2).randbytes(4096), "not a readable PyTorch checkpoint|arbitrary"),
        "model.txt": (b"hello", "unknown checkpoint extension '.txt'"),
    }
    torch.save(flat_state(tiny_modules(fam), fam), tmp_path / "full.ckpt")
    full_ckpt = (tmp_path / "full.ckpt").read_bytes()
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content if content is not None else full_ckpt[: len(full_ckpt) // 2])
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name, family=fam)
    rng = random.Random(0)
    for i in range(20):  # random bytes can fail deep inside the unpickler in many ways
        for suffix in (".ckpt", ".safetensors"):
            (tmp_path / f"rand{i}{suffix}").write_bytes(rng.randbytes(rng.randrange(1, 3000)))
            with pytest.raises(CheckpointError):
                load_checkpoint(tmp_path / f"rand{i}{suffix}", family=fam)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="without model_index.json"):
        load_checkpoint(tmp_path / "folder")


def _write_variant(tmp_path, sd1_file, edit) -> Path:
    path, fam, mods = sd1_file
    sd = dict(flat_state(mods, fam))
    edit(sd)
    out = tmp_path / "variant.safetensors"
    safetensors.torch.save_file(sd, out, metadata={"diffusekit.family": fam.to_json()})
    return out


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, sd1_file):
    def drop(sd):
        del sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.diffusion_model\.input_blocks\.1\.1"
                                              r"\.transformer_blocks\.0\.attn2\.to_k\.weight"):
        load_checkpoint(_write_variant(tmp_path, sd1_file, drop))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): first_stage_model\.extra\.weight, "
                                              r"model\.diffusion_model\.bogus"):
        load_checkpoint(_write_variant(tmp_path, sd1_file, lambda sd: sd.update(
            {"model.diffusion_model.bogus": torch.zeros(1), "first_stage_model.extra.weight": torch.zeros(1)})))
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\): model\.diffusion_model\.out\.2\.bias \[5\] "
                                              r"\(model: \[4\]\)") as e:
        load_checkpoint(_write_variant(tmp_path, sd1_file, lambda sd: sd.update(
            {"model.diffusion_model.out.2.bias": torch.zeros(5)})))
    assert "missing keys" not in str(e.value)  # a mis-shaped key is not also reported missing


def test_many_problems_are_summarised(tmp_path, sd1_file):
    path, _, _ = sd1_file
    sd = safetensors.torch.load_file(path)
    safetensors.torch.save_file(sd, tmp_path / "nometa.safetensors")  # no family metadata: detected sd1
    with pytest.raises(CheckpointError, match=r"wrong shapes \(\d{3}\): .*, \.\.\. \(\d+ in all\).*published sd1"):
        load_checkpoint(tmp_path / "nometa.safetensors")


@needs_bpe
def test_legacy_clip_keys_and_non_weight_entries_are_accepted(tmp_path, sd1_file, tok):
    path, fam, mods = sd1_file

    def legacy(sd):
        for k in [k for k in sd if k.startswith("cond_stage_model.transformer.text_model.")]:
            sd[k.replace("transformer.text_model.", "transformer.")] = sd.pop(k)
        sd["alphas_cumprod"] = torch.ones(1000)
        sd["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    parts = load_checkpoint(_write_variant(tmp_path, sd1_file, legacy), tokenizer=tok)
    assert torch.equal(parts.text_encoders[0].text_model.final_layer_norm.weight,
                       mods["text_encoders"][0].text_model.final_layer_norm.weight)


def test_missing_tokenizer_tells_what_to_install(monkeypatch, sd1_file):
    monkeypatch.setattr(loading, "find_bundled_bpe", lambda: None)
    with pytest.raises(CheckpointError, match="pip install open_clip_torch --no-deps"):
        load_checkpoint(sd1_file[0])


@needs_bpe
def test_tokenizer_argument(tmp_path, sd1_file, bpe_folder):
    ref = _hf_tokenizer(bpe_folder)
    parts = load_checkpoint(sd1_file[0], tokenizer=bpe_folder)
    prompt = "A (red:1.2) circle, masterpiece"
    assert torch.equal(parts.tokenizers[0](prompt), ref(prompt, padding="max_length", max_length=77,
                                                        return_tensors="pt").input_ids)
    assert torch.equal(load_checkpoint(sd1_file[0], tokenizer=BPE_GZ).tokenizers[0](prompt), parts.tokenizers[0](prompt))
    with pytest.raises(CheckpointError, match="vocab.json"):
        load_checkpoint(sd1_file[0], tokenizer=tmp_path)


# ------------------------------------------------------------------------------ detection
def _real_shapes(name: str) -> dict:
    fam = get_family(name)
    shapes = {}
    for _, prefix, module in loading._components(fam):  # meta modules: no memory
        shapes |= {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    return shapes


def test_detect_family_on_real_shapes():
    for name in FAMILIES:
        assert detect_family(_real_shapes(name)) == ("sd2-v" if name == "sd2" else name), name
    pix2pix = _real_shapes("sd1") | {"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}
    with pytest.raises(CheckpointError, match="InstructPix2Pix"):
        detect_family(pix2pix)
    with pytest.raises(CheckpointError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)})
    with pytest.raises(CheckpointError, match="standalone VAE"):
        detect_family({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.bias": (3,)})
    unet_only = {k: v for k, v in _real_shapes("sd1").items() if k.startswith("model.")}
    with pytest.raises(CheckpointError, match="no text encoder"):
        detect_family(unet_only)


def test_family_conventions():
    sd1, sd2v, xl, ref = (get_family(n) for n in ("sd1", "sd2-v", "sdxl", "sdxl-refiner"))
    assert (sd1.latent_scale, sd1.prediction_type, sd1.default_size) == (0.18215, "eps", 512)
    assert (sd2v.prediction_type, sd2v.default_size, get_family("sd2").prediction_type) == ("v", 768, "eps")
    assert (xl.latent_scale, xl.default_size, ref.latent_scale) == (0.13025, 1024, 0.13025)
    spec = sd2v.text_encoders[0]
    assert (spec.kind, spec.layer, spec.final_norm, spec.pad_id) == ("openclip", -2, True, 0)
    l, g = xl.text_encoders
    assert (l.layer, l.final_norm, l.pad_id, l.pooled) == (-2, False, 49407, False)
    assert (g.layer, g.final_norm, g.pad_id, g.pooled) == (-2, False, 0, True)
    assert xl.unet.context_dim == l.config.width + g.config.width == 2048
    assert xl.unet.adm_in_channels == g.config.projection_dim + 6 * xl.size_embed_dim == 2816
    assert ref.unet.adm_in_channels == g.config.projection_dim + 5 * ref.size_embed_dim == 2560
    assert get_family("sd1-inpaint").is_inpaint and not sd1.is_inpaint
    assert sd1.beta_schedule.kind == "scaled_linear" and sd1.beta_schedule.num_timesteps == 1000
    with pytest.raises(CheckpointError, match="custom"):
        get_family("custom")


def test_predicts_v_reads_the_output_at_t999():
    """A1111's rule on a UNet whose output is a constant c (zero weights, out bias c) at the
    input x = 0.5: v iff mean(out - x) = c - 0.5 < -1."""
    unet = UNetModel(tiny_family("sd2").unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        unet.out[2].bias.fill_(-0.4)  # mean(out - x) = -0.9: eps
        assert not predicts_v(unet)
        unet.out[2].bias.fill_(-0.6)  # -1.1: v
        assert predicts_v(unet)


# ------------------------------------------------------------------------------ diffusers folders
@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, clip_vocab_files):
    """vocab.json + merges.txt built from the open_clip gz by OpenAI's recipe (not by our tokenizer)."""
    return clip_vocab_files(tmp_path_factory.mktemp("bpe"))


def _hf_tokenizer(folder, **kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), **kwargs)


def _hf_text(width, act, projection=None, seed=0, layers=3):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                                      num_hidden_layers=layers, vocab_size=49408, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=projection or width)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def _diffusers_parts(kind: str):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    common = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8)
    if kind == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            **common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=80,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=24 + 6 * 256)
    else:
        unet = diffusers.UNet2DConditionModel(
            **common, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
            cross_attention_dim=32, use_linear_projection=kind == "sd2")
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  scaling_factor=0.13025 if kind == "sdxl" else 0.18215)
    with torch.no_grad():  # diffusers zero-inits some outputs: randomise everything
        for m in (unet, vae):
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             prediction_type="v_prediction" if kind == "sd2" else "epsilon")
    return diffusers, unet.eval(), vae.eval(), sched


@needs_bpe
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_folder_sd1_sd2_matches_reference(tmp_path, kind, bpe_folder):
    diffusers, unet, vae, sched = _diffusers_parts(kind)
    tok = _hf_tokenizer(bpe_folder, **({"pad_token": "!"} if kind == "sd2" else {}))  # SD 2 pads with "!" = 0
    text = _hf_text(32, "gelu" if kind == "sd2" else "quick_gelu")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    parts = load_checkpoint(tmp_path / "pipe")
    fam = parts.family
    assert fam.name == ("sd2-v" if kind == "sd2" else "sd1") and parts.scheduler_config["prediction_type"]
    spec = fam.text_encoders[0]
    assert (spec.kind, spec.pad_id) == (("openclip", 0) if kind == "sd2" else ("clip", 49407))
    assert spec.layer == -1 and spec.final_norm  # diffusers reads last_hidden_state for SD 1 and 2
    ids = parts.tokenizers[0]("a red circle on a blue square", pad_id=spec.pad_id)
    assert torch.equal(ids, tok("a red circle on a blue square", padding="max_length", max_length=77,
                                return_tensors="pt").input_ids)
    with torch.no_grad():
        ref_h = text(ids).last_hidden_state
        h = parts.text_encoders[0](ids, layer=spec.layer, final_norm=spec.final_norm, need_pooled=False).hidden
        torch.testing.assert_close(h, ref_h, atol=1e-5 * ref_h.abs().max().item(), rtol=0)
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0])
        ctx = torch.randn(2, 77, 32, generator=g)
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(parts.unet(x, t, ctx), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
        ref_img = vae.decode(x).sample
        torch.testing.assert_close(parts.vae.decode(x), ref_img, atol=1e-5 * ref_img.abs().max().item(), rtol=0)
    assert parts.name == "pipe" and len(parts.hash10) == 10


@needs_bpe
def test_diffusers_folder_sdxl_matches_reference(tmp_path, bpe_folder):
    diffusers, unet, vae, sched = _diffusers_parts("sdxl")
    tok, tok2 = _hf_tokenizer(bpe_folder), _hf_tokenizer(bpe_folder, pad_token="!")
    te1, te2 = _hf_text(32, "quick_gelu"), _hf_text(48, "gelu", projection=24, seed=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                               tokenizer_2=tok2, unet=unet, scheduler=sched)
    pipe.save_pretrained(tmp_path / "xl")
    parts = load_checkpoint(tmp_path / "xl", dtype=torch.float32)
    fam = parts.family
    assert fam.name == "sdxl" and fam.latent_scale == 0.13025 and [s.pad_id for s in fam.text_encoders] == [49407, 0]
    assert isinstance(parts.text_encoders[1], OpenCLIPTextModel)  # converted to the LDM layout
    prompt = "a photo of a cat"
    ids = [t(prompt, pad_id=s.pad_id) for t, s in zip(parts.tokenizers, fam.text_encoders)]
    assert torch.equal(ids[1], tok2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids)
    with torch.no_grad():
        r1 = te1(ids[0], output_hidden_states=True)
        r2 = te2(ids[1], output_hidden_states=True)
        o1 = parts.text_encoders[0](ids[0], layer=-2, final_norm=False, need_pooled=False)
        o2 = parts.text_encoders[1](ids[1], layer=-2, final_norm=False, need_pooled=True)
        torch.testing.assert_close(o1.hidden, r1.hidden_states[-2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o2.hidden, r2.hidden_states[-2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o2.pooled, r2.text_embeds, atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(4)
        x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([321.0])
        ctx = torch.cat([o1.hidden, o2.hidden], dim=-1)  # (1, 77, 80)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        y = torch.cat([o2.pooled, unet.add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=-1)  # (1, 1560)
        ref = unet(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": o2.pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(parts.unet(x, t, ctx, y), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@needs_bpe
def test_diffusers_folder_problems_are_checkpoint_errors(tmp_path, bpe_folder):
    diffusers, unet, vae, sched = _diffusers_parts("sd1")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=_hf_text(32, "quick_gelu"),
                                             tokenizer=_hf_tokenizer(bpe_folder), unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors"
    sd = safetensors.torch.load_file(weights)
    sd.pop("decoder.conv_out.bias")
    safetensors.torch.save_file(sd, weights)
    with pytest.raises(CheckpointError, match="(?s)vae.*conv_out"):
        load_checkpoint(tmp_path / "p")
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        load_checkpoint(tmp_path / "p")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(default_size=7), "default_size=7"),
    (lambda d: d.update(default_size=True), "default_size=True"),
    (lambda d: d.update(default_size="512"), "default_size='512'"),
    (lambda d: d.update(latent_scale=float("nan")), "latent_scale=nan"),
    (lambda d: d.update(latent_scale=0), "latent_scale=0"),
    (lambda d: d["beta_schedule"].update(beta_end=2.0), "beta_end=2.0"),
    (lambda d: d["beta_schedule"].update(num_timesteps=0), "num_timesteps=0"),
    (lambda d: d.update(prediction_type="x0?"), "prediction_type"),
])
def test_model_metadata_is_validated_at_load(tmp_path, sd1_file, edit, message):
    """Metadata read from a file is input too: a stored family with an impossible value fails at load,
    naming it, instead of loading and failing every later request (a native size of 7 px)."""
    path, fam, mods = sd1_file
    stored = fam.to_dict()
    edit(stored)
    out = tmp_path / "meta.safetensors"
    safetensors.torch.save_file(dict(flat_state(mods, fam)), out, metadata={"diffusekit.family": json.dumps(stored)})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(out)

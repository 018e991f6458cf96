"""LoRA files (kohya / A1111 and diffusers / PEFT layouts) merged into our tiny models: closed-form deltas,
bit-exact restore, key translation to the LDM / open_clip names, errors, A1111's hash, diffusers parity."""
import hashlib
import importlib.util
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.models.lora import LoRA, LoRAError, LoRATargets, addnet_hash, load_lora, merged

_spec = importlib.util.spec_from_file_location("_pipelines_conftest", Path(__file__).parents[1] / "pipelines" / "conftest.py")
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)          # the shared `build_tiny_parts` helper of tests/pipelines

# kohya module name -> (our parameter, down shape, up shape, alpha); tiny SD1: 2 levels, 1 res block each,
# so diffusers up_blocks.1.attentions.0 = LDM output_blocks.2.1 and up_blocks.0's upsampler = output_blocks.1.2.
# The parameter names are written out by hand, independently of the code's rename table.
SD1_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (4, 32), (32, 4), 2.0),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (2, 32), (32, 2), None),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
        ("unet.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", (3, 64), (512, 3), 1.5),
    "lora_unet_up_blocks_1_attentions_0_proj_in":                       # 1x1 conv LoRA on a 1x1 conv
        ("unet.output_blocks.2.1.proj_in.weight", (4, 32, 1, 1), (32, 4, 1, 1), 4.0),
    "lora_unet_down_blocks_0_resnets_0_conv1":                          # LoCon: 3x3 down, 1x1 up
        ("unet.input_blocks.1.0.in_layers.2.weight", (4, 32, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_0_upsamplers_0_conv":
        ("unet.output_blocks.1.2.conv.weight", (2, 64, 3, 3), (64, 2, 1, 1), 8.0),
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_v":      # LDM naming (kohya SDXL style)
        ("unet.output_blocks.3.1.transformer_blocks.0.attn1.to_v.weight", (4, 32), (32, 4), 2.0),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        ("te0.text_model.encoder.layers.0.self_attn.q_proj.weight", (4, 32), (32, 4), 1.0),
    "lora_te_text_model_encoder_layers_1_mlp_fc2":
        ("te0.text_model.encoder.layers.1.mlp.fc2.weight", (4, 64), (32, 4), 3.0),
}


def random_lora(layers, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (_, down, up, alpha) in layers.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * scale
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def closed_form(sd, name, alpha, shape):
    """alpha / rank * up @ down, written out per case (linear, or conv via flattened kernels)."""
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return (scale * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))).reshape(shape)


@pytest.fixture(scope="module")
def sd1():
    _, parts = _tiny.build_tiny_parts("sd1")
    parts = SimpleNamespace(**parts)
    return parts, LoRATargets.of(parts)


def snapshot(parts):
    return {f"{n}.{k}": (v.data_ptr(), v.detach().clone()) for n, m in
            (("unet", parts.unet), *((f"te{i}", e) for i, e in enumerate(parts.text_encoders)))
            for k, v in m.state_dict().items()}


def test_merge_matches_closed_form_and_restore_is_bit_exact(sd1, tmp_path):
    parts, targets = sd1
    sd = random_lora(SD1_LAYERS)
    save_file(sd, tmp_path / "x.safetensors")
    lora = load_lora(tmp_path / "x.safetensors")
    assert len(lora.layers) == len(SD1_LAYERS)
    before = snapshot(parts)
    with merged(targets, [(lora, 0.7, 0.7)]):
        now = snapshot(parts)
        for name, (param, _, _, alpha) in SD1_LAYERS.items():
            w0 = before[param][1]
            want = w0 + 0.7 * closed_form(sd, name, alpha, w0.shape)
            torch.testing.assert_close(now[param][1], want, rtol=0, atol=1e-6)   # fp32 rounding only
            assert not torch.equal(now[param][1], w0)
        touched = {p for p, *_ in SD1_LAYERS.values()}
        assert all(torch.equal(now[k][1], v) for k, (_, v) in before.items() if k not in touched)
    after = snapshot(parts)
    for k, (ptr, v) in before.items():        # the original tensor objects are back, bit for bit
        assert after[k][0] == ptr and torch.equal(after[k][1], v), k


def test_restore_after_an_error_and_repeats_do_not_drift(sd1):
    parts, targets = sd1
    lora = LoRA.from_state_dict(random_lora(SD1_LAYERS, seed=3))
    before = snapshot(parts)
    with pytest.raises(RuntimeError, match="boom"):
        with merged(targets, [(lora, 1.0, 1.0)]):
            raise RuntimeError("boom")
    for _ in range(3):
        with merged(targets, [(lora, 1.0, 1.0)]):
            pass
    after = snapshot(parts)
    assert all(torch.equal(after[k][1], v) and after[k][0] == ptr for k, (ptr, v) in before.items())


def test_te_and_unet_multipliers_and_two_loras_add(sd1):
    _, targets = sd1
    a = LoRA.from_state_dict(random_lora(SD1_LAYERS, seed=1))
    b = LoRA.from_state_dict(random_lora(SD1_LAYERS, seed=2))
    da, db = a.deltas(targets), b.deltas(targets)
    only_te = a.deltas(targets, te=0.5, unet=0.0)
    assert set(only_te) == {p for n, (p, *_) in SD1_LAYERS.items() if n.startswith("lora_te")}
    for p, d in only_te.items():
        torch.testing.assert_close(d, 0.5 * da[p])
    with merged(targets, [(a, 1.0, 1.0), (b, 1.0, -2.0)]) as total:
        for p in da:
            want = da[p] + (db[p] if p.startswith("te") else -2.0 * db[p])
            torch.testing.assert_close(total[p], want)


def test_openclip_qkv_land_in_row_blocks_of_in_proj():
    """SD 2's text encoder is open_clip (q, k, v stacked); a transformers-named LoRA goes into the k rows."""
    _, parts = _tiny.build_tiny_parts("sd2")
    parts = SimpleNamespace(**parts)
    targets = LoRATargets.of(parts)
    width = parts.text_encoders[0].config.width
    layers = {"lora_te_text_model_encoder_layers_1_self_attn_k_proj": (None, (2, width), (width, 2), 1.0),
              "lora_te_text_model_encoder_layers_1_mlp_fc1": (None, (2, width), (2 * width, 2), 2.0)}
    sd = random_lora(layers)
    d = LoRA.from_state_dict(sd).deltas(targets)
    qkv = d["te0.transformer.resblocks.1.attn.in_proj_weight"]
    assert qkv.shape == (3 * width, width)
    name = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    torch.testing.assert_close(qkv[width:2 * width], closed_form(sd, name, 1.0, (width, width)))
    assert torch.all(qkv[:width] == 0) and torch.all(qkv[2 * width:] == 0)
    name = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    torch.testing.assert_close(d["te0.transformer.resblocks.1.mlp.c_fc.weight"], closed_form(sd, name, 2.0, (2 * width, width)))


def test_sdxl_te1_te2_prefixes():
    _, parts = _tiny.build_tiny_parts("sdxl")
    targets = LoRATargets.of(SimpleNamespace(**parts))
    assert targets.lookup["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"][0] == \
        "te0.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert targets.lookup["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"] == \
        ("te1.transformer.resblocks.0.attn.in_proj_weight", slice(96, 144))
    # diffusers (down_blocks.1.attentions.0) and LDM (input_blocks.3.1) names reach the same weight
    a = targets.lookup["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"]
    assert a == targets.lookup["lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k"]


def test_peft_layout_gives_the_same_deltas(sd1):
    _, targets = sd1
    layers = {k: v for k, v in SD1_LAYERS.items() if "output_blocks" not in k}
    sd = random_lora(layers)
    diffusers_layout = {}
    for name, (_, _, _, alpha) in layers.items():
        comp, path = ("unet", name[len("lora_unet_"):]) if name.startswith("lora_unet_") else ("text_encoder", name[len("lora_te_"):])
        dotted = (path.replace("down_blocks_0_attentions_0_transformer_blocks_0_", "down_blocks.0.attentions.0.transformer_blocks.0.")
                  .replace("mid_block_attentions_0_transformer_blocks_0_", "mid_block.attentions.0.transformer_blocks.0.")
                  .replace("up_blocks_1_attentions_0_", "up_blocks.1.attentions.0.")
                  .replace("down_blocks_0_resnets_0_", "down_blocks.0.resnets.0.")
                  .replace("up_blocks_0_upsamplers_0_", "up_blocks.0.upsamplers.0.")
                  .replace("text_model_encoder_layers_0_self_attn_", "text_model.encoder.layers.0.self_attn.")
                  .replace("text_model_encoder_layers_1_mlp_", "text_model.encoder.layers.1.mlp."))
        diffusers_layout[f"{comp}.{dotted}.lora_A.weight"] = sd[f"{name}.lora_down.weight"]
        diffusers_layout[f"{comp}.{dotted}.lora_B.weight"] = sd[f"{name}.lora_up.weight"]
        if alpha is not None:
            diffusers_layout[f"{comp}.{dotted}.alpha"] = sd[f"{name}.alpha"]
    want = LoRA.from_state_dict(sd).deltas(targets)
    got = LoRA.from_state_dict(diffusers_layout).deltas(targets)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k])


def test_cp_decomposed_locon(sd1):
    """LoCon with lora_mid: delta[i, j] = sum_nm up[i, n] mid[n, m, :, :] down[m, j] (A1111 rebuild_cp_decomposition)."""
    _, targets = sd1
    g = torch.Generator().manual_seed(5)
    up, mid, down = torch.randn(32, 3, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g), torch.randn(3, 32, 1, 1, generator=g)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    d = LoRA.from_state_dict({f"{name}.lora_up.weight": up, f"{name}.lora_mid.weight": mid,
                              f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.5)}).deltas(targets)
    want = torch.zeros(32, 32, 3, 3)
    for i in range(32):
        for j in range(32):
            want[i, j] = sum(up[i, n, 0, 0] * mid[n, m] * down[m, j, 0, 0] for n in range(3) for m in range(3))
    torch.testing.assert_close(d["unet.input_blocks.1.0.in_layers.2.weight"], want * 1.5 / 3, rtol=1e-5, atol=1e-6)


def test_errors_and_warnings(sd1):
    _, targets = sd1
    good = random_lora({k: v for k, v in SD1_LAYERS.items() if "attn1_to_q" in k})
    with pytest.warns(UserWarning, match=r"1 of 2 layers match no layer.*lora_unet_nowhere"):
        LoRA.from_state_dict({**good, **random_lora({"lora_unet_nowhere": (None, (2, 8), (8, 2), 1.0)})}).deltas(targets)
    with pytest.raises(LoRAError, match="none of its 1 layers"):
        LoRA.from_state_dict(random_lora({"lora_unet_input_blocks_99_1_proj_in": (None, (2, 8), (8, 2), 1.0)})).deltas(targets)
    with pytest.raises(LoRAError, match="LyCORIS"):
        LoRA.from_state_dict({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(LoRAError, match="disagree on the rank"):
        LoRA.from_state_dict({"m.lora_down.weight": torch.zeros(2, 8), "m.lora_up.weight": torch.zeros(8, 3)})
    with pytest.raises(LoRAError, match="without both"):
        LoRA.from_state_dict({"m.lora_down.weight": torch.zeros(2, 8)})
    with pytest.raises(LoRAError, match="not `<module>"):
        LoRA.from_state_dict({**good, "something.else": torch.zeros(1)})
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(LoRAError, match="delta of shape"):
        LoRA.from_state_dict(random_lora({name: (None, (2, 16), (32, 2), 1.0)})).deltas(targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRA.from_state_dict(good).deltas(targets)          # a full match warns nothing


def test_addnet_hash_skips_the_header(tmp_path):
    sd = random_lora({k: v for k, v in list(SD1_LAYERS.items())[:2]})
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, a, metadata={"ss_output_name": "a"})
    save_file(sd, b, metadata={"ss_output_name": "something much longer"})
    raw = a.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert addnet_hash(a) == hashlib.sha256(raw[8 + n:]).hexdigest() == addnet_hash(b)
    assert addnet_hash(a) != hashlib.sha256(raw).hexdigest()
    assert load_lora(a).hash == addnet_hash(a)
    save_file(sd, b, metadata={"sshs_model_hash": "f" * 64})
    assert load_lora(b).hash == "f" * 64                   # A1111 prefers the stored hash


def test_matches_diffusers_peft_lora(sd1, tmp_path):
    """The same kohya file through diffusers' loader (kohya -> PEFT conversion, peft LoRA layers, fused) on the
    diffusers UNet with our weights: outputs agree to 1e-5 (relative to the output scale)."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from diffusekit.models.convert_unet import unet_state_dict_to_diffusers

    parts, targets = sd1
    ours = parts.unet
    ref = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=2, cross_attention_dim=32).eval()
    ref.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), ours.config))
    layers = {k: v for k, v in SD1_LAYERS.items() if k.startswith("lora_unet_") and "output_blocks" not in k}
    save_file(random_lora(layers, seed=7, scale=0.3), tmp_path / "l.safetensors")
    sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "l.safetensors"))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, ref, adapter_name="l")
    ref.fuse_lora(lora_scale=0.8)

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        plain = ours(x, t, ctx)
        with merged(targets, [(load_lora(tmp_path / "l.safetensors"), 1.0, 0.8)]):
            mine = ours(x, t, ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    assert (mine - plain).abs().max() > 1e-2                       # the LoRA does something
    err = (mine - theirs).abs().max() / theirs.abs().max()
    assert err < 1e-5, err

"""CLIP text encoders: parity with transformers' CLIPTextModel / CLIPTextModelWithProjection at toy
size (fp32, tolerance 1e-5), the open_clip layout through the converter, real sizes on the meta
device, and the errors."""

from dataclasses import replace

import pytest
import torch

from diffusekit.models.clip import (
    CLIP_L,
    CLIP_L_SDXL,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    TINY,
    CLIPTextConfig,
    CLIPTextModel,
    OpenCLIPTextModel,
    quick_gelu,
)
from diffusekit.models.convert_clip import (
    clip_config_from_hf,
    clip_state_dict_from_hf,
    openclip_state_dict_from_hf,
)

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _hf_config(act, projection=16, layers=3):
    return transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection)


def _hf_model(act, with_projection):
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(_hf_config(act)).eval()
    with torch.no_grad():  # perturb every weight so LayerNorm gains and biases are exercised too
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


def _ids():
    ids = torch.randint(0, 49406, (3, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 49406
    ids[0, 9:] = 49407  # SD1 style: EOS then EOS padding
    ids[1, 30], ids[1, 31:] = 49407, 0  # OpenCLIP style: EOS then 0 padding
    ids[2, 76] = 49407  # full length
    return ids


def _hf_forward(model, ids):
    out = model(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states, out.last_hidden_state, pooled


def _ours_from_hf(hf, with_projection, layout):
    d = hf.config.to_dict()
    d["architectures"] = ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
    cfg = clip_config_from_hf(d)
    if layout == "hf":
        model = CLIPTextModel(cfg)
        model.load_state_dict(clip_state_dict_from_hf(hf.state_dict(), cfg))
    else:
        model = OpenCLIPTextModel(cfg)
        model.load_state_dict(openclip_state_dict_from_hf(hf.state_dict(), cfg))
    return model.eval()


@pytest.mark.parametrize("layout", ["hf", "openclip"])
@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_parity_with_transformers(act, with_projection, layout):
    hf = _hf_model(act, with_projection)
    ours = _ours_from_hf(hf, with_projection, layout)
    ids = _ids()
    hidden_states, last, pooled = _hf_forward(hf, ids)
    for i in range(3):  # every layer, without the final norm; python-style negative index too
        h, p = ours(ids, layer=i, final_norm=False)
        torch.testing.assert_close(h, hidden_states[i + 1], atol=TOL, rtol=0)
        h_neg, _ = ours(ids, layer=i - 3, final_norm=False, need_pooled=False)
        torch.testing.assert_close(h_neg, h, atol=0, rtol=0)
        torch.testing.assert_close(p, pooled, atol=TOL, rtol=0)  # pooled always from the last layer
    h, p = ours(ids)
    torch.testing.assert_close(h, last, atol=TOL, rtol=0)
    torch.testing.assert_close(p, pooled, atol=TOL, rtol=0)
    assert p.shape == (3, 16 if with_projection else 32)
    # A1111 "Clip skip 2": penultimate layer with the final norm
    h, _ = ours(ids, layer=-2)
    ln = hf.text_model.final_layer_norm if with_projection else hf.final_layer_norm
    torch.testing.assert_close(h, ln(hidden_states[-2]), atol=TOL, rtol=0)


@torch.no_grad()
def test_short_sequences_and_batch_independence():
    model = CLIPTextModel(TINY, generator=torch.Generator().manual_seed(0)).eval()
    ids = _ids()
    h_full, p_full = model(ids)
    h_short, p_short = model(ids[:1, :10])  # BOS, 8 tokens, EOS; no padding
    # causal mask: the prompt's states never see the padding after it
    torch.testing.assert_close(h_short, h_full[:1, :10], atol=TOL, rtol=0)
    torch.testing.assert_close(p_short, p_full[:1], atol=TOL, rtol=0)
    h_one, p_one = model(ids[1:2])
    torch.testing.assert_close(h_one, h_full[1:2], atol=TOL, rtol=0)
    torch.testing.assert_close(p_one, p_full[1:2], atol=TOL, rtol=0)


def test_need_pooled_false_stops_after_the_requested_layer():
    model = OpenCLIPTextModel(replace(TINY, act="gelu", projection_dim=16), generator=torch.Generator().manual_seed(0))
    calls = []
    for i, block in enumerate(model.transformer.resblocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    with torch.no_grad():
        h, p = model(_ids(), layer=0, need_pooled=False)
    assert p is None and calls == [0]
    calls.clear()
    with torch.no_grad():
        h2, p2 = model(_ids(), layer=0)
    assert calls == [0, 1, 2] and p2.shape == (3, 16)
    torch.testing.assert_close(h, h2, atol=0, rtol=0)


def test_real_sizes_on_meta_device():
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIP_L)
        hf_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
        assert _count(clip_l) == _count(hf_l) == 123_060_480
        for cfg in (OPENCLIP_H, OPENCLIP_BIGG):
            hf = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, hidden_act="gelu", projection_dim=cfg.projection_dim))
            assert _count(OpenCLIPTextModel(cfg)) == _count(CLIPTextModel(cfg)) == _count(hf)
    assert CLIP_L_SDXL == CLIP_L and OPENCLIP_BIGG.projection_dim == 1280


def test_checkpoint_key_names():
    with torch.device("meta"):
        hf_keys = set(CLIPTextModel(CLIP_L).state_dict())
        oc_keys = set(OpenCLIPTextModel(OPENCLIP_BIGG).state_dict())
    assert {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.11.self_attn.q_proj.weight", "text_model.encoder.layers.0.mlp.fc2.bias",
            "text_model.final_layer_norm.weight"} <= hf_keys
    assert not any("position_ids" in k or "text_projection" in k for k in hf_keys)
    assert {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.bias",
            "transformer.resblocks.31.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_bias",
            "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.ln_1.weight",
            "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_proj.bias"} <= oc_keys
    assert len(hf_keys) == 4 + 12 * 16 and len(oc_keys) == 5 + 32 * 12
    with torch.device("meta"):
        assert OpenCLIPTextModel(OPENCLIP_BIGG).text_projection.shape == (1280, 1280)


def test_config_from_transformers_json():
    sd1 = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
           "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
           "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408, "layer_norm_eps": 1e-5}
    assert clip_config_from_hf(sd1) == CLIP_L
    bigg = {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
            "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
            "projection_dim": 1280, "vocab_size": 49408}
    assert clip_config_from_hf(bigg) == OPENCLIP_BIGG
    assert clip_config_from_hf({"text_config": sd1, "architectures": ["CLIPModel"]}) == CLIP_L
    with pytest.raises(ValueError, match="gelu_new"):
        clip_config_from_hf({**sd1, "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="hidden_size"):
        clip_config_from_hf({"vocab_size": 3})


def test_converter_names_bad_keys():
    hf = _hf_model("gelu", True)
    cfg = clip_config_from_hf({**hf.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    sd = dict(hf.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old saves carry it: dropped
    assert "text_projection" in openclip_state_dict_from_hf(sd, cfg)
    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing keys: text_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias"):
        openclip_state_dict_from_hf(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys: text_model\.logit_scale"):
        clip_state_dict_from_hf({**sd, "logit_scale": torch.zeros(())}, cfg)
    with pytest.raises(ValueError, match=r"wrong shape keys: text_projection\.weight: \(8, 32\) != \(16, 32\)"):
        clip_state_dict_from_hf({**sd, "text_projection.weight": torch.zeros(8, 32)}, cfg)


def test_bad_input_ids():
    model = CLIPTextModel(TINY)
    with pytest.raises(ValueError, match="token id 49408 is outside the vocab"):
        model(torch.tensor([[49406, 49408]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="int64/int32 tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="int64/int32 tensor"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"layer=3 is out of range .* -3\.\.2"):
        model(torch.zeros(1, 5, dtype=torch.long), layer=3)
    with pytest.raises(ValueError, match=r"layer=-4"):
        model(torch.zeros(1, 5, dtype=torch.long), layer=-4)


def test_config_validation():
    with pytest.raises(ValueError, match=r"act='relu'.*\['gelu', 'quick_gelu'\]"):
        CLIPTextConfig(act="relu")
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig(width=30, heads=4)


def test_init_is_seeded_by_generator():
    a = OpenCLIPTextModel(TINY, generator=torch.Generator().manual_seed(3))
    b = OpenCLIPTextModel(TINY, generator=torch.Generator().manual_seed(3))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.ln_final.weight, torch.ones(32)) and torch.equal(a.transformer.resblocks[0].attn.in_proj_bias, torch.zeros(96))
    assert abs(a.token_embedding.weight.std().item() - 0.02) < 1e-3


def test_quick_gelu_closed_form():
    x = torch.tensor([-2.0, 0.0, 1.0])
    expected = x / (1 + torch.exp(-1.702 * x))
    torch.testing.assert_close(quick_gelu(x), expected, atol=1e-7, rtol=0)

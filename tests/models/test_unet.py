"""Tests of the LDM/SGM UNet (`diffusekit.models.unet`) and its diffusers rename table.

Parity: tiny diffusers `UNet2DConditionModel`s with random weights (fixed seeds) in the SD 1,
SD 2 and SDXL layouts are converted with the table, loaded strictly, and must give the same
output as diffusers on the same inputs within 1e-5 absolute (fp32; outputs are O(1)).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from diffusekit.models.convert_unet import (
    unet_config_from_diffusers,
    unet_key_table,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from diffusekit.models.unet import (
    SD2,
    SD15,
    SD15_INPAINT,
    SDXL,
    SDXL_REFINER,
    TINY,
    UNetConfig,
    UNetModel,
    timestep_embedding,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 parity, absolute, on outputs of magnitude ~1

SD1_LAYOUT = dict(  # 3 levels, no attention at the deepest one, conv projections, 2 heads
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2)
SD2_LAYOUT = dict(SD1_LAYOUT, use_linear_projection=True, attention_head_dim=(2, 4, 4), cross_attention_dim=40)
SDXL_LAYOUT = dict(  # no attention at level 0, depth 1 then 2, 16-wide heads, text_time embedding
    block_out_channels=(32, 64, 128), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), cross_attention_dim=48, attention_head_dim=(2, 4, 8),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=20 + 6 * 8)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Toy-size ops gain nothing from threads, and on a shared CPU a second OpenMP thread that
    waits for a core makes every op ~10x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_unet(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**kw).eval()


def converted(reference) -> UNetModel:
    config = unet_config_from_diffusers(dict(reference.config))
    model = UNetModel(config).eval()
    model.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), config), strict=True)
    return model


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite LDM's zero-initialised layers so every parameter gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(1, p[0].numel()))))
    return model


@pytest.mark.parametrize("layout,size", [(SD1_LAYOUT, (16, 16)), (SD1_LAYOUT, (13, 11)), (SD2_LAYOUT, (16, 16))])
def test_parity_with_diffusers(layout, size):
    reference = diffusers_unet(**layout)
    model = converted(reference)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    t = torch.tensor([10.5, 937.25])  # fractional, as the sampler's sigma -> t map gives
    context = torch.randn(2, 7, layout["cross_attention_dim"], generator=g)
    with torch.no_grad():
        want = reference(x, t, context).sample
        got = model(x, t, context)
    assert got.shape == want.shape == x.shape
    assert want.abs().max() > 0.1  # diffusers' init is not zero: the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_parity_with_diffusers_sdxl_text_time():
    reference = diffusers_unet(**SDXL_LAYOUT)
    model = converted(reference)
    assert model.config.num_classes == "sequential" and model.config.adm_in_channels == 68
    assert model.config.transformer_depth == (0, 1, 2) and model.config.num_head_channels == 16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 0.5])
    context = torch.randn(2, 9, 48, generator=g)
    pooled = torch.randn(2, 20, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 48, 8, 4, 64, 64]])  # orig hw, crop, target hw
    # y as SGM builds it: pooled text ++ 256-dim (here 8) sinusoid of each of the six numbers.
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 8).reshape(2, -1)], dim=-1)
    with torch.no_grad():
        want = reference(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = model(x, t, context, y=y)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_parity_with_diffusers_class_labels():
    reference = diffusers_unet(**dict(SD1_LAYOUT, num_class_embeds=5))
    model = converted(reference)
    assert model.config.num_classes == 5 and isinstance(model.label_emb, torch.nn.Embedding)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([4, 1])
    with torch.no_grad():
        want = reference(x, torch.tensor([5.0, 6.0]), context, class_labels=labels).sample
        got = model(x, torch.tensor([5.0, 6.0]), context, y=labels)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", [SD1_LAYOUT, SD2_LAYOUT, SDXL_LAYOUT])
def test_round_trip_to_diffusers_keys(layout):
    reference = diffusers_unet(**layout)
    model = converted(reference)
    back = unet_state_dict_to_diffusers(model.state_dict(), model.config)
    assert back.keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(back[k], v), k


def test_key_names_are_ldm_checkpoint_keys():
    keys = set(UNetModel(TINY).state_dict())
    for k in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
              "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
              "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.proj_in.weight",
              "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
              "input_blocks.1.1.transformer_blocks.0.ff.net.2.bias",
              "input_blocks.1.1.transformer_blocks.0.norm3.weight", "input_blocks.2.0.op.weight",
              "input_blocks.3.0.skip_connection.weight", "middle_block.1.proj_out.weight",
              "middle_block.2.out_layers.0.bias", "output_blocks.1.2.conv.weight",
              "out.0.weight", "out.2.bias"]:
        assert k in keys, k
    sdxl = set(k for k, _ in _meta(SDXL).named_parameters())
    assert {"label_emb.0.0.weight", "label_emb.0.2.bias", "output_blocks.2.2.conv.weight",
            "input_blocks.4.1.transformer_blocks.1.attn1.to_out.0.weight",
            "middle_block.1.transformer_blocks.9.norm1.weight"} <= sdxl
    assert not any(k.startswith("input_blocks.1.1.") for k in sdxl)  # level 0 has no attention


def _meta(config: UNetConfig) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,diffusers_kw,count", [
    (SD15, dict(cross_attention_dim=768), 859_520_964),
    (SD15_INPAINT, dict(cross_attention_dim=768, in_channels=9), 859_535_364),
    (SD2, dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
     865_910_724),
    (SDXL, dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
     2_567_463_684),
    (SDXL_REFINER, dict(block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                        use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560),
     2_259_526_660),
])
def test_full_size_presets_match_diffusers(preset, diffusers_kw, count):
    assert _count(_meta(preset)) == count
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**diffusers_kw)
    assert _count(reference) == count
    assert unet_config_from_diffusers(dict(reference.config)) == preset
    # the table covers every key with matching shapes (checked on meta tensors: no memory)
    ldm = unet_state_dict_from_diffusers(reference.state_dict(), preset)
    assert len(ldm) == len(reference.state_dict())


def test_rename_errors_name_the_keys():
    reference = diffusers_unet(**SD1_LAYOUT)
    config = unet_config_from_diffusers(dict(reference.config))
    sd = dict(reference.state_dict())
    sd["down_blocks.0.extra.weight"] = torch.zeros(1)
    del sd["mid_block.resnets.1.conv2.bias"]
    with pytest.raises(ValueError, match=r"down_blocks\.0\.extra\.weight.*mid_block\.resnets\.1\.conv2\.bias"):
        unet_state_dict_from_diffusers(sd, config)
    sd = dict(reference.state_dict())
    sd["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    with pytest.raises(ValueError, match=r"conv_in\.weight has shape \(32, 4, 1, 1\).*input_blocks\.0\.0\.weight"):
        unet_state_dict_from_diffusers(sd, config)
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        unet_config_from_diffusers(dict(reference.config, resnet_time_scale_shift="scale_shift"))
    assert unet_key_table(config)["middle_block.1.proj_in.weight"] == "mid_block.attentions.0.proj_in.weight"


def test_timestep_embedding_closed_form():
    # freqs = 10000^(-i/2) for i = 0, 1 -> (1, 0.01); layout [cos..., sin...] (flip_sin_to_cos)
    emb = timestep_embedding(torch.tensor([0.0, 1.5]), 4)
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                         [math.cos(1.5), math.cos(0.015), math.sin(1.5), math.sin(0.015)]])
    torch.testing.assert_close(emb, want, atol=1e-7, rtol=0)
    assert timestep_embedding(torch.tensor([3.0]), 5).shape == (1, 5)


def test_fractional_timesteps_interpolate_smoothly():
    model = randomize(UNetModel(TINY)).eval()
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        outs = [model(x, torch.tensor([t]), context) for t in (400.0, 400.25, 400.5, 401.0)]
    assert torch.isfinite(outs[2]).all()
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[2], outs[3])
    # a quarter step moves the output less than a whole step
    assert (outs[1] - outs[0]).abs().max() < (outs[3] - outs[0]).abs().max()
    # a scalar or a 0-d timestep broadcasts over the batch
    with torch.no_grad():
        torch.testing.assert_close(model(x, 400.5, context), outs[2])


def test_fresh_model_predicts_zero_like_ldm():
    # zero_module on out.2 (LDM): an untrained UNet outputs exactly zero
    out = UNetModel(TINY)(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 32))
    assert torch.equal(out, torch.zeros_like(out))


def test_gradient_checkpointing_gives_same_gradients():
    config = replace(TINY, transformer_depth_middle=2)
    g = torch.Generator().manual_seed(6)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    t = torch.tensor([10.0, 700.5])
    grads = []
    for checkpointing in (False, True):
        model = randomize(UNetModel(config)).train()
        model.set_gradient_checkpointing(checkpointing)
        loss = model(x, t, context).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(grads[0][n].abs().sum() > 0 for n in ["out.2.weight", "input_blocks.1.0.in_layers.2.weight"])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_bad_inputs_raise_clear_errors():
    model = UNetModel(TINY)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"in_channels=4.*\(2, 9, 8, 8\)"):
        model(torch.randn(2, 9, 8, 8), t, context)
    with pytest.raises(ValueError, match=r"context_dim=32.*\(2, 5, 768\)"):
        model(x, t, torch.randn(2, 5, 768))
    with pytest.raises(ValueError, match="got None"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes=None"):
        model(x, t, context, y=torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"timesteps must be"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), context)
    sdxl_tiny = UNetModel(replace(TINY, num_classes="sequential", adm_in_channels=12))
    with pytest.raises(ValueError, match="needs y"):
        sdxl_tiny(x, t, context)
    with pytest.raises(ValueError, match=r"adm_in_channels=12.*\(2, 10\)"):
        sdxl_tiny(x, t, context, y=torch.randn(2, 10))
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetConfig(channel_mult=(1, 2), transformer_depth=(1, 1, 1))
    with pytest.raises(ValueError, match="'sequential'"):
        UNetConfig(num_classes="continuous")


def test_bf16_weights_track_fp32():
    model = randomize(UNetModel(TINY)).eval()
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    t = torch.tensor([3.0, 800.0])
    with torch.no_grad():
        want = model(x, t, context)
        got = model.to(torch.bfloat16)(x, t, context)
    assert got.dtype == torch.float32  # returned in x's dtype
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 has an 8-bit mantissa


@pytest.mark.slow
def test_full_size_sd15_parity_with_diffusers():
    reference = diffusers_unet(cross_attention_dim=768)  # SD 1.5 layout, random init, 3.4 GB
    config = unet_config_from_diffusers(dict(reference.config))
    assert config == SD15
    with torch.device("meta"):
        model = UNetModel(config)
    model.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), config),
                          strict=True, assign=True)  # shares diffusers' tensors
    g = torch.Generator().manual_seed(9)
    x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([999.0, 123.456])
    with torch.no_grad():
        want = reference(x, t, context).sample
        got = model.eval()(x, t, context)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # 1e-4: 25 blocks of fp32 rounding

"""MMDiT (SD3 / SD3.5): parity with diffusers' SD3Transformer2DModel, key layout, presets."""

from dataclasses import replace

import pytest
import torch

from diffusekit.models import mmdit
from diffusekit.models.convert_mmdit import (mmdit_config_from_diffusers, mmdit_key_table,
                                             mmdit_state_dict_from_diffusers, mmdit_state_dict_to_diffusers)
from diffusekit.models.mmdit import MMDiT, MMDiTConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402


def _diffusers_config(cfg: MMDiTConfig) -> dict:
    return dict(sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
                joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.hidden_size,
                pooled_projection_dim=cfg.adm_in_channels, out_channels=cfg.out_channels,
                pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.x_block_self_attn_layers,
                qk_norm="rms_norm" if cfg.qk_norm == "rms" else None)


VARIANTS = {
    "sd3": mmdit.TINY,
    "sd35-qk-norm": replace(mmdit.TINY, qk_norm="rms"),
    "sd35-medium-dual": replace(mmdit.TINY, qk_norm="rms", x_block_self_attn_layers=(0, 1)),
    "dual-no-qk-norm": replace(mmdit.TINY, x_block_self_attn_layers=(1,), in_channels=4, out_channels=4),
}


def _random_diffusers(cfg: MMDiTConfig, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**_diffusers_config(cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight random (adaLN included), so no branch hides behind a zero
        for name, p in ref.state_dict().items():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("pos_embed"):
                p.add_(0.1 * noise)
            elif "norm_" in name:                      # RMSNorm gains around 1
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:                          # biases
                p.copy_(0.1 * noise)
            else:                                      # weights of unit gain: the output stays O(1)
                p.copy_(noise / p[0].numel() ** 0.5)
    return ref


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers_sd3_transformer(name):
    cfg = VARIANTS[name]
    ref = _random_diffusers(cfg)
    ours = MMDiT(mmdit_config_from_diffusers(ref.config)).eval()
    assert ours.config == cfg
    ours.load_state_dict(mmdit_state_dict_from_diffusers(ref.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, 8, 12, generator=g)        # non-square: a 4x6 crop of the 16x16 grid
    t = torch.tensor([999.0, 137.25])                               # fractional time, 1000 * sigma
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.adm_in_channels, generator=g)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, context=context, y=pooled)
    assert got.shape == want.shape == x.shape[:1] + (cfg.out_channels,) + x.shape[2:]
    assert want.abs().max() > 0.1  # a live comparison, not two zeros
    # fp32 both; ours runs its inference linears through oneDNN, diffusers through MKL: the two round their
    # sums differently (1.5e-5 at most seen). A wrong key or formula is off by 1e-2 and more.
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_state_dict_round_trips_to_diffusers_layout():
    cfg = VARIANTS["sd35-medium-dual"]
    ref = _random_diffusers(cfg, seed=5)
    theirs = ref.state_dict()
    back = mmdit_state_dict_to_diffusers(mmdit_state_dict_from_diffusers(theirs, cfg), cfg)
    assert back.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(back[k], v), k


def test_keys_are_the_single_file_checkpoint_keys():
    """Names of the SD3 / SD3.5 single files under model.diffusion_model. (sd3-ref mmditx.py)."""
    cfg = replace(mmdit.TINY, qk_norm="rms", x_block_self_attn_layers=(0,))
    keys = set(MMDiT(cfg).state_dict())
    for k in ["pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
              "y_embedder.mlp.0.weight", "context_embedder.weight",
              "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn.ln_q.weight",
              "joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.0.x_block.attn2.proj.bias",
              "joint_blocks.0.x_block.adaLN_modulation.1.weight", "joint_blocks.0.x_block.mlp.fc1.weight",
              "joint_blocks.1.context_block.attn.proj.weight", "joint_blocks.2.context_block.attn.ln_k.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert k in keys, k
    # the last block's context stream is pre-only: modulation (shift, scale), no proj, no MLP
    assert "joint_blocks.2.context_block.attn.proj.weight" not in keys
    assert not any(k.startswith("joint_blocks.2.context_block.mlp") for k in keys)
    assert "joint_blocks.1.x_block.attn2.qkv.weight" not in keys
    sd = MMDiT(cfg).state_dict()
    h = cfg.hidden_size
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * h, h)   # MMDiT-X
    assert sd["joint_blocks.1.x_block.adaLN_modulation.1.weight"].shape == (6 * h, h)
    assert sd["joint_blocks.2.context_block.adaLN_modulation.1.weight"].shape == (2 * h, h)
    assert sd["pos_embed"].shape == (1, cfg.pos_embed_max_size ** 2, h)


@pytest.mark.parametrize("preset, config", [
    ("sd3_medium", dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=192, caption_projection_dim=1536)),
    ("sd35_large", dict(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, caption_projection_dim=2432,
                        qk_norm="rms_norm")),
    ("sd35_medium", dict(num_layers=24, num_attention_heads=24, pos_embed_max_size=384, caption_projection_dim=1536,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
])
def test_presets_are_the_released_architectures(preset, config):
    """The presets equal the published diffusers configs (stabilityai/stable-diffusion-3*-*/transformer)."""
    cfg = mmdit.PRESETS[preset]
    assert mmdit_config_from_diffusers(config | dict(sample_size=128)) == cfg
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**config)
        ours = MMDiT(cfg)
    table = mmdit_key_table(cfg)
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k for _, srcs in table.values() for k in srcs} == set(theirs)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(v.numel() for v in theirs.values())
    if preset == "sd3_medium":
        assert 2.0e9 < n_ours < 2.1e9  # "SD3 Medium, 2B parameters"


def test_pos_embed_init_is_diffusers_sincos_grid():
    cfg = mmdit.TINY
    ref = SD3Transformer2DModel(**_diffusers_config(cfg))
    torch.testing.assert_close(MMDiT(cfg).pos_embed.data, ref.pos_embed.pos_embed, atol=1e-6, rtol=0)


def test_untrained_model_predicts_zero_and_trains():
    """DiT init (zero adaLN and final layer): v = 0 at the start, and gradients reach every block."""
    cfg = mmdit.TINY
    model = MMDiT(cfg)
    x, t = torch.randn(2, 16, 4, 4), torch.tensor([500.0, 10.0])
    ctx, y = torch.randn(2, 5, cfg.context_dim), torch.randn(2, cfg.adm_in_channels)
    assert torch.equal(model(x, t, ctx, y), torch.zeros_like(x))
    model.set_gradient_checkpointing(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):  # zero gates open after the final layer has moved: 3 steps reach the attention
        loss = (model(x, t, ctx, y) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.joint_blocks[0].x_block.attn.qkv.weight.grad.abs().sum() > 0
    assert model(x, t, ctx, y).abs().sum() > 0


def test_without_pooled_text():
    """adm_in_channels=None: no y_embedder, conditioned by the token context alone (sd3-ref's option)."""
    cfg = replace(mmdit.TINY, adm_in_channels=None, sample_size=None, in_channels=4, out_channels=4)
    model = MMDiT(cfg)
    assert model.y_embedder is None and not any(k.startswith("y_embedder") for k in model.state_dict())
    torch.testing.assert_close(model.pos_embed.data[0], mmdit.sincos_pos_embed_2d(64, 16, 16))
    out = model(torch.randn(1, 4, 6, 6), torch.tensor(400.0), torch.randn(1, 3, 48))
    assert out.shape == (1, 4, 6, 6)
    with pytest.raises(ValueError, match="no y_embedder"):
        model(torch.randn(1, 4, 6, 6), torch.tensor(400.0), torch.randn(1, 3, 48), torch.randn(1, 40))


def test_errors_name_the_bad_value():
    model = MMDiT(mmdit.TINY)
    ctx, y = torch.randn(1, 5, 48), torch.randn(1, 40)
    with pytest.raises(ValueError, match="multiple of patch_size=2"):
        model(torch.randn(1, 16, 5, 4), torch.tensor([1.0]), ctx, y)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size=16"):
        model(torch.randn(1, 16, 34, 4), torch.tensor([1.0]), ctx, y)
    with pytest.raises(ValueError, match=r"context must be \(B=1, tokens, 48\)"):
        model(torch.randn(1, 16, 4, 4), torch.tensor([1.0]), torch.randn(1, 5, 32), y)
    with pytest.raises(ValueError, match="qk_norm='layer'"):
        MMDiTConfig(qk_norm="layer")
    with pytest.raises(ValueError, match="x_block_self_attn_layers"):
        replace(mmdit.TINY, x_block_self_attn_layers=(3,))
    with pytest.raises(ValueError, match="missing keys"):
        mmdit_state_dict_from_diffusers({}, mmdit.TINY)

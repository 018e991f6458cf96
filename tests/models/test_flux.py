"""Flux.1 transformer: parity with diffusers' FluxTransformer2DModel (dev and schnell), BFL key names, RoPE,
patchify, conversion tables, config from shapes, stored-dtype (bf16 / fp8) compute."""

from dataclasses import replace

import pytest
import torch

from diffusekit.models import flux
from diffusekit.models.convert_flux import (flux_config_from_diffusers, flux_config_from_shapes, flux_config_to_diffusers,
                                            flux_state_dict_from_diffusers, flux_state_dict_to_diffusers)
from diffusekit.models.flux import Flux, FluxConfig
from diffusekit.models.keys import module_shapes

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {"dev": flux.TINY, "schnell": flux.TINY_SCHNELL,
            "no-double-blocks": replace(flux.TINY_SCHNELL, depth=0, depth_single_blocks=3),
            "out-channels": replace(flux.TINY, depth_single_blocks=1)}


def _random_diffusers(cfg: FluxConfig, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**flux_config_to_diffusers(cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight random (adaLN included), so no branch hides behind a zero
        for name, p in ref.state_dict().items():
            noise = torch.randn(p.shape, generator=g)
            if ".norm_" in name:                           # RMSNorm gains around 1
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return ref


def _inputs(cfg: FluxConfig, b: int = 2, h: int = 8, w: int = 12, tokens: int = 7, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.latent_channels, h, w, generator=g), torch.tensor([1000.0, 371.25])[:b],
            torch.randn(b, tokens, cfg.context_in_dim, generator=g), torch.randn(b, cfg.vec_in_dim, generator=g),
            torch.tensor([3.5, 1.25])[:b])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers_flux_transformer(name):
    cfg = VARIANTS[name]
    ref = _random_diffusers(cfg)
    assert flux_config_from_diffusers(ref.config) == cfg
    ours = Flux(cfg).eval()
    ours.load_state_dict(flux_state_dict_from_diffusers(ref.state_dict(), cfg), strict=True)
    x, t, ctx, y, guidance = _inputs(cfg)
    h, w = x.shape[2] // 2, x.shape[3] // 2                 # a non-square 4 x 6 patch grid
    with torch.no_grad():
        want = ref(hidden_states=flux.patchify(x, 2), encoder_hidden_states=ctx, pooled_projections=y,
                   timestep=t / 1000, img_ids=flux.image_ids(h, w), txt_ids=torch.zeros(ctx.shape[1], 3),
                   guidance=guidance if cfg.guidance_embed else None).sample
        want = flux.unpatchify(want, h, w, 2)
        got = ours(x, t, ctx, y, guidance=guidance)
    assert got.shape == want.shape == x.shape
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_guidance_is_an_input_of_dev_only():
    dev = Flux(flux.TINY).eval()
    with torch.no_grad():
        for p in dev.parameters():
            p.normal_(0, 0.3)
    x, t, ctx, y, _ = _inputs(flux.TINY, b=1)
    with torch.no_grad():
        a, b = dev(x, t, ctx, y, guidance=3.5), dev(x, t, ctx, y, guidance=torch.tensor([1.0]))
    assert (a - b).abs().max() > 1e-3                     # the guidance scale changes the prediction
    with pytest.raises(ValueError, match="guidance-distilled"):
        dev(x, t, ctx, y)
    schnell = Flux(flux.TINY_SCHNELL).eval()
    assert schnell.guidance_in is None
    with torch.no_grad():
        torch.testing.assert_close(schnell(x, t, ctx, y, guidance=3.5), schnell(x, t, ctx, y))


def test_state_dict_round_trips_to_diffusers_layout():
    ref = _random_diffusers(flux.TINY, seed=5)
    theirs = ref.state_dict()
    back = flux_state_dict_to_diffusers(flux_state_dict_from_diffusers(theirs, flux.TINY), flux.TINY)
    assert back.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(back[k], v), k


def test_conversion_errors_name_the_keys():
    sd = _random_diffusers(flux.TINY).state_dict()
    sd.pop("single_transformer_blocks.1.proj_mlp.weight")
    with pytest.raises(ValueError, match=r"missing keys \[single_transformer_blocks\.1\.proj_mlp\.weight"):
        flux_state_dict_from_diffusers(sd, flux.TINY)
    with pytest.raises(ValueError, match="patch_size=2"):
        flux_config_from_diffusers({"patch_size": 2})
    with pytest.raises(ValueError, match="axes_dim"):
        FluxConfig(axes_dim=(16, 56, 50))


# the BFL single-file names (flux1-dev.safetensors), one of each kind
BFL_KEYS = {
    "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
    "time_in.out_layer.bias": (3072,), "vector_in.in_layer.weight": (3072, 768), "guidance_in.out_layer.weight": (3072, 3072),
    "double_blocks.18.img_mod.lin.weight": (18432, 3072), "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
    "double_blocks.0.img_attn.proj.weight": (3072, 3072), "double_blocks.0.img_mlp.0.weight": (12288, 3072),
    "double_blocks.0.txt_mlp.2.weight": (3072, 12288), "double_blocks.0.txt_mod.lin.bias": (18432,),
    "single_blocks.37.linear1.weight": (21504, 3072), "single_blocks.0.linear2.weight": (3072, 15360),
    "single_blocks.0.norm.key_norm.scale": (128,), "single_blocks.0.modulation.lin.weight": (9216, 3072),
    "final_layer.adaLN_modulation.1.weight": (6144, 3072), "final_layer.linear.weight": (64, 3072),
}


def test_dev_preset_has_the_bfl_keys_and_size():
    shapes = module_shapes(lambda: Flux(flux.DEV))
    for key, shape in BFL_KEYS.items():
        assert shapes[key] == shape, key
    assert len([k for k in shapes if k.startswith("double_blocks.")]) == 19 * 24
    assert len([k for k in shapes if k.startswith("single_blocks.")]) == 38 * 8
    n = sum(torch.Size(s).numel() for s in shapes.values())
    assert n == 11_901_408_320                            # Flux.1 dev's parameter count
    schnell = module_shapes(lambda: Flux(flux.SCHNELL))
    assert not any(k.startswith("guidance_in.") for k in schnell)
    prefixed = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    assert flux_config_from_shapes(prefixed) == flux.DEV
    assert flux_config_from_shapes(schnell, prefix="") == flux.SCHNELL
    for cfg in VARIANTS.values():
        assert flux_config_from_shapes(module_shapes(lambda: Flux(cfg)), prefix="") == cfg


def test_patchify_is_bfl_rearrange_and_inverts():
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = flux.patchify(x, 2)                          # "b c (h ph) (w pw) -> b (h w) (c ph pw)"
    assert tokens.shape == (2, 6, 64)
    assert torch.equal(tokens[1, 4], torch.stack([x[1, c, 2 + i, 2 + j] for c in range(16)
                                                  for i in range(2) for j in range(2)]))
    assert torch.equal(flux.unpatchify(tokens, 2, 3, 2), x)
    ids = flux.image_ids(2, 3)
    assert ids.tolist()[4] == [0.0, 1.0, 1.0]              # (0, row, column) of patch 4 = row 1, column 1


def test_rope_rotates_pairs_and_depends_on_relative_position():
    axes, theta = (4, 6, 6), 10000
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(pos_q, pos_k):
        cq, sq = flux.rope_frequencies(torch.tensor([pos_q], dtype=torch.float32), axes, theta)
        ck, sk = flux.rope_frequencies(torch.tensor([pos_k], dtype=torch.float32), axes, theta)
        return float((flux.apply_rope(q, cq, sq) * flux.apply_rope(k, ck, sk)).sum())

    # a rotation: norms kept; attention logits see only the offset between positions
    c, s = flux.rope_frequencies(torch.tensor([[0.0, 3.0, 5.0]]), axes, theta)
    assert torch.allclose(flux.apply_rope(q, c, s).norm(), q.norm(), atol=1e-6)
    assert score([0, 3, 5], [0, 1, 2]) == pytest.approx(score([0, 7, 9], [0, 5, 6]), abs=1e-5)
    assert score([0, 3, 5], [0, 1, 2]) != pytest.approx(score([0, 3, 5], [0, 2, 2]), abs=1e-3)
    # pair 0 of the first axis turns by pos * theta^0 = pos radians: (x0, x1) -> (x0 cos p - x1 sin p, ...)
    c, s = flux.rope_frequencies(torch.tensor([[0.5, 0.0, 0.0]]), axes, theta)
    out = flux.apply_rope(q, c, s)[0, 0, 0]
    x0, x1 = q[0, 0, 0, :2]
    assert torch.allclose(out[:2], torch.stack([x0 * torch.cos(torch.tensor(0.5)) - x1 * torch.sin(torch.tensor(0.5)),
                                               x0 * torch.sin(torch.tensor(0.5)) + x1 * torch.cos(torch.tensor(0.5))]))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e4m3fn])
def test_stored_low_precision_weights_compute_in_the_activation_dtype(stored):
    """bf16 / fp8 weights stay stored; each layer is upcast when it runs: the result equals the float32 model
    over the same rounded weights, exactly (same products, same order)."""
    torch.manual_seed(0)
    model = Flux(flux.TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    low = Flux(flux.TINY).eval()
    low.load_state_dict({k: v.to(stored) for k, v in model.state_dict().items()}, assign=True)
    assert low.img_in.weight.dtype == stored and low.single_blocks[0].linear1.weight.dtype == stored
    rounded = Flux(flux.TINY).eval()
    rounded.load_state_dict({k: v.to(stored).float() for k, v in model.state_dict().items()})
    x, t, ctx, y, guidance = _inputs(flux.TINY)
    low.compute_dtype = torch.float32
    with torch.no_grad():
        torch.testing.assert_close(low(x, t, ctx, y, guidance), rounded(x, t, ctx, y, guidance), atol=0, rtol=0)
        low.compute_dtype = None                          # the weights' own dtype; bf16 for fp8
        out = low(x, t, ctx, y, guidance)
    assert out.dtype == torch.float32 and low.activation_dtype() == torch.bfloat16
    assert (out - rounded(x, t, ctx, y, guidance)).abs().max() < 0.1 * rounded(x, t, ctx, y, guidance).abs().max()

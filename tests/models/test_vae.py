"""Tests for the LDM KL autoencoder (diffusekit.models.vae) and its diffusers converter.

Parity: the same random weights through diffusers' AutoencoderKL (test-only import) give
the same posterior and reconstruction within 1e-5 (fp32). Tiling: measured against the
untiled model; see the tolerances stated at each test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusekit.models.convert_vae import vae_config_from_diffusers, vae_state_dict_from_diffusers
from diffusekit.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, tile_starts, tiled_map

diffusers = pytest.importorskip("diffusers")

SD_PARAMS = 83_653_863  # SD 1.x / 2.x / SDXL VAE, counted with diffusers on the meta device
# a cheap factor-8 network for the tiling tests (67,231 params)
TILE_CFG = VAEConfig(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)


def _diffusers_vae(block_out_channels, layers_per_block=1, norm_num_groups=8, seed=0):
    """A random diffusers AutoencoderKL whose GroupNorm affines are also random (so a
    norm1/norm2 mix-up in the rename table cannot hide behind weight=1, bias=0)."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    model = diffusers.AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _converted(ref):
    cfg = vae_config_from_diffusers(dict(ref.config))
    model = AutoencoderKL(cfg).eval()
    model.load_state_dict(vae_state_dict_from_diffusers(ref.state_dict(), cfg), strict=True)
    return model


# ---- configuration and structure -----------------------------------------------------------


def test_real_config_has_exactly_the_sd_parameter_count():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
        )
    assert sum(p.numel() for p in ours.parameters()) == SD_PARAMS
    assert sum(p.numel() for p in ref.parameters()) == SD_PARAMS
    assert ours.downsample_factor == 8


def test_real_config_uses_ldm_checkpoint_keys_and_converts_strictly_on_meta():
    with torch.device("meta"):
        ours = AutoencoderKL()
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
        )
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # keys and shapes of `first_stage_model.*` in the SD 1.5 single-file checkpoint
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)  # level 0 is last run
    assert shapes["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert len(shapes) == 248
    cfg = vae_config_from_diffusers(dict(ref.config))
    assert cfg == VAEConfig()
    converted = vae_state_dict_from_diffusers(ref.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes
    ours.load_state_dict(converted, strict=True, assign=True)


def test_presets_and_config_errors():
    assert VAEConfig.preset("sdxl") == VAEConfig.preset("sd1") == VAEConfig()
    tiny = VAEConfig.preset("tiny")
    assert tiny.downsample_factor == 8
    assert sum(p.numel() for p in AutoencoderKL(tiny).parameters()) == 1_250_759
    sd3 = VAEConfig.preset("sd3")   # SD3 / SD3.5: 16 latent channels, no quant convs, same 83.65M-class network
    assert (sd3.z_channels, sd3.embed_dim, sd3.use_quant_conv, sd3.use_post_quant_conv) == (16, 16, False, False)
    with torch.device("meta"):
        assert sum(p.numel() for p in AutoencoderKL(sd3).parameters()) == 83_819_683   # = diffusers AutoencoderKL of SD3's vae/config.json
    with pytest.raises(ValueError, match="'sd1', 'sd2', 'sdxl', 'sd3', 'tiny'"):
        VAEConfig.preset("flux")
    with pytest.raises(ValueError, match="norm_groups=32"):
        VAEConfig(ch=48)


# ---- parity with diffusers -----------------------------------------------------------------


@pytest.mark.parametrize("block_out_channels", [(32, 64), (32, 64, 64, 64)])
def test_parity_with_diffusers(block_out_channels):
    ref = _diffusers_vae(block_out_channels)
    ours = _converted(ref)
    img = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(img), ref.encode(img).latent_dist
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.std, ref_post.std, atol=1e-5, rtol=0)
        z = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_parity_through_legacy_diffusers_attention_names():
    ref = _diffusers_vae((32, 64))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    cfg = vae_config_from_diffusers(dict(ref.config))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(sd, cfg), strict=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_converter_names_unknown_missing_and_misshapen_keys():
    ref = _diffusers_vae((32, 64))
    cfg = vae_config_from_diffusers(dict(ref.config))
    sd = dict(ref.state_dict())
    with pytest.raises(ValueError, match=r"encoder\.foo\.weight"):
        vae_state_dict_from_diffusers({**sd, "encoder.foo.weight": torch.zeros(1)}, cfg)
    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.0.resnets.1.norm2.bias"}
    with pytest.raises(ValueError, match=r"decoder\.up\.1\.block\.1\.norm2\.bias"):
        vae_state_dict_from_diffusers(missing, cfg)
    bad = {**sd, "quant_conv.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(ValueError, match=r"quant_conv\.weight.*\(8, 8, 3, 3\).*\(8, 8, 1, 1\)"):
        vae_state_dict_from_diffusers(bad, cfg)
    # a config describing a different network: the 4th level's keys are missing
    with pytest.raises(ValueError, match="lacks"):
        vae_state_dict_from_diffusers(sd, VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8))


def test_config_from_diffusers_errors_teach():
    good = dict(_diffusers_vae((32, 64)).config)
    with pytest.raises(ValueError, match="frobnicate"):
        vae_config_from_diffusers({**good, "frobnicate": 1})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        vae_config_from_diffusers({**good, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="'gelu'"):
        vae_config_from_diffusers({**good, "act_fn": "gelu"})
    no_quant = vae_config_from_diffusers({**good, "use_quant_conv": False, "use_post_quant_conv": False})
    assert AutoencoderKL(no_quant).quant_conv is None


# ---- posterior -----------------------------------------------------------------------------


def test_diagonal_gaussian_closed_forms():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    q = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(q.kl(), torch.distributions.kl_divergence(ref, std_normal).sum((1, 2, 3)))
    other = DiagonalGaussian(mean.flip(0), logvar.flip(1))
    ref_other = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(q.kl(other), torch.distributions.kl_divergence(ref, ref_other).sum((1, 2, 3)))
    x = torch.randn(mean.shape, generator=g)
    torch.testing.assert_close(q.nll(x), -ref.log_prob(x).sum((1, 2, 3)))
    assert q.mode() is mean
    s1, s2 = q.sample(torch.Generator().manual_seed(7)), q.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, mean + q.std * eps)
    huge = DiagonalGaussian(mean, torch.full_like(mean, 100.0))
    assert huge.logvar.max().item() == 20.0  # clamped as in LDM


# ---- inputs, dtypes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig.tiny()).eval()


def test_bad_inputs_raise_teaching_errors(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 32, 32\)"):
        tiny.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"multiples of the VAE factor 8, got 36x32.*32x32 or 40x32"):
        tiny.encode(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match="factor 8"):
        tiny.tiled_encode(torch.zeros(1, 3, 32, 30))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\).*\(1, 3, 4, 4\)"):
        tiny.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        tiny.decode(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="overlap < tile"):
        tiny.tiled_decode(torch.zeros(1, 4, 8, 8), tile=8, overlap=8)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.tiled_encode(torch.zeros(1, 3, 64, 64), tile=60, overlap=16)


def test_shapes_and_forward(tiny):
    img = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post = tiny.encode(img)
        assert post.mean.shape == post.logvar.shape == (2, 4, 2, 3)
        assert tiny.decode(post.mode()).shape == img.shape
        rec, post2 = tiny(img, sample_posterior=True, generator=torch.Generator().manual_seed(1))
        rec2, _ = tiny(img, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    assert rec.shape == img.shape
    torch.testing.assert_close(rec, rec2, atol=0, rtol=0)
    torch.testing.assert_close(post2.mean, post.mean, atol=0, rtol=0)


def test_bf16_round_trip(tiny):
    """bf16 keeps ~3 significant digits; measured max abs deviation from fp32 of the
    reconstruction is 0.037 (outputs up to 1.41), so 0.1 bounds it with margin."""
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = tiny.decode(tiny.encode(img).mode())
        half = AutoencoderKL(tiny.config).eval()
        half.load_state_dict(tiny.state_dict())
        half = half.to(torch.bfloat16)
        post = half.encode(img.to(torch.bfloat16))
        z = post.sample(torch.Generator().manual_seed(0))
        out = half.decode(post.mode())
    assert post.mean.dtype == z.dtype == out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.1


# ---- tiling --------------------------------------------------------------------------------


def _jumps(x: torch.Tensor, axis: int, reduce: str = "max") -> torch.Tensor:
    """|x[j+1] - x[j]| along `axis`, reduced (max or mean) over the other dims: one value per j."""
    d = (x.narrow(axis, 1, x.shape[axis] - 1) - x.narrow(axis, 0, x.shape[axis] - 1)).abs()
    dims = [i for i in range(x.ndim) if i != axis % x.ndim]
    return d.amax(dim=dims) if reduce == "max" else d.mean(dim=dims)


def _edges(n: int, starts: list[int], tile: int, scale: float) -> tuple[list[int], list[int]]:
    """Indices j of the jumps x[j] -> x[j+1] that cross a tile edge (where a hard cut would
    be) and of all the others, along an output axis of length n."""
    edges = sorted({round(b * scale) - 1 for s in starts for b in (s, s + tile) if 0 < round(b * scale) < n})
    assert edges, "no tile edge along this axis: the image fits in one tile"
    return edges, [i for i in range(n - 1) if i not in edges]


def _edge_vs_inside(x: torch.Tensor, starts: list[int], tile: int, scale: float, axis: int = -1):
    """Largest pixel jump across a tile edge and largest elsewhere."""
    edges, inside = _edges(x.shape[axis], starts, tile, scale)
    j = _jumps(x, axis)
    return j[edges].max().item(), j[inside].max().item()


def _coherent_seam(err: torch.Tensor, starts: list[int], tile: int, scale: float, axis: int = -1) -> float:
    """A seam is a jump shared by a whole row/column: the largest line-averaged jump of the
    error across a tile edge, divided by the median line-averaged jump elsewhere."""
    edges, inside = _edges(err.shape[axis], starts, tile, scale)
    j = _jumps(err, axis, reduce="mean")
    return (j[edges].max() / j[inside].median()).item()


def test_tile_starts_cover_with_requested_overlap():
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    assert tile_starts(1000, 512, 128, align=8) == [0, 248, 488]
    assert tile_starts(100, 128, 32) == [0]
    for size, tile, overlap, align in [(1000, 512, 128, 8), (1024, 64, 16, 1), (520, 512, 128, 8), (97, 16, 5, 1)]:
        s = tile_starts(size, tile, overlap, align)
        assert s[0] == 0 and s[-1] + tile == size and all(v % align == 0 for v in s)
        assert all(tile - (b - a) >= overlap for a, b in zip(s, s[1:]))


def test_tiled_map_is_exact_for_local_maps():
    """Weights are normalised, so a per-pixel map gives its untiled result exactly."""
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    up = lambda t: F.interpolate(t, scale_factor=8, mode="nearest") * 2 + 1  # noqa: E731
    torch.testing.assert_close(tiled_map(up, x, tile=16, overlap=4, scale=8), up(x), atol=1e-6, rtol=1e-6)
    down = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    torch.testing.assert_close(tiled_map(down, x, tile=16, overlap=8, scale=1 / 8, align=8), down(x))


def test_feathering_removes_the_seam_a_hard_cut_makes():
    """A map with a per-tile offset (what per-tile GroupNorm statistics do): with feathering
    the largest jump across a tile edge is no larger than elsewhere; with abutting tiles and
    no overlap the edge jump is ~tile/2 times the smooth ramp's slope."""
    x = torch.linspace(0, 1, 96).expand(1, 1, 8, 96).contiguous()  # slope 1/95 per pixel
    offset = lambda t: t + 0.5 * t.mean()  # noqa: E731
    edge, inside = _edge_vs_inside(tiled_map(offset, x, tile=32, overlap=16), tile_starts(96, 32, 16), 32, 1.0)
    assert edge <= inside
    edge, inside = _edge_vs_inside(tiled_map(offset, x, tile=32, overlap=0), tile_starts(96, 32, 0), 32, 1.0)
    assert edge > 10 * inside


@pytest.fixture(scope="module")
def tile_model():
    torch.manual_seed(0)
    return AutoencoderKL(TILE_CFG).eval()


def test_tiled_decode_matches_untiled_without_seams(tile_model):
    """Latent 40x40 (image 320x320) in 2x2 tiles of 32 with overlap 8 (256 px / 64 px).
    Measured (random weights, seed 0): mean |tiled - untiled| = 0.047 of the image's std,
    max = 0.094 of its max |value|. The error comes from per-tile GroupNorm statistics,
    attention over one tile and zero padding at tile edges, and shrinks as tiles grow
    (3x3 tiles of 16, overlap 4: mean 0.30 of std). A single tile is bit-equal to `decode`.

    Seams, two ways. (1) The largest pixel jump of the error across a tile edge is no larger
    than elsewhere (measured ratios 0.35-0.64). A random network's output is texture, so this alone
    would also pass for a hard cut; hence (2): the line-averaged jump of the error at a tile
    edge over its median elsewhere is 1.0-1.6 with feathering, 3.6-4.6 for abutting tiles."""
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tile_model.decode(z)
        tiled = tile_model.tiled_decode(z, tile=32, overlap=8)
        hard = tile_model.tiled_decode(z, tile=20, overlap=0)  # 2x2 abutting tiles: hard cuts
        one = z[..., :8, :16]
        single = tile_model.tiled_decode(one, tile=16, overlap=4)
        torch.testing.assert_close(single, tile_model.decode(one), atol=0, rtol=0)
    err = (tiled - full).abs()
    assert err.mean() < 0.07 * full.std()
    assert err.max() < 0.14 * full.abs().max()
    for axis in (-1, -2):
        starts = tile_starts(40, 32, 8)
        edge, inside = _edge_vs_inside(tiled - full, starts, 32, 8.0, axis)
        assert edge <= inside
        assert _coherent_seam(tiled - full, starts, 32, 8.0, axis) < 2.0
        assert _coherent_seam(hard - full, tile_starts(40, 20, 0), 20, 8.0, axis) > 3.0


def test_tiled_encode_matches_untiled_without_seams(tile_model):
    """Image 256x256. Closeness with 2x2 tiles of 192 px, overlap 64 px; measured (random
    weights, seed 0): mean |tiled - untiled| = 0.09 (posterior mean) and 0.12 (logvar) of
    their std, max 0.17 / 0.23 of their max |value|. Seams with 3x3 tiles of 128 px,
    overlap 32: the largest jump of the error across a tile edge is no larger than
    elsewhere (measured ratios 0.64-0.86)."""
    g = torch.Generator().manual_seed(1)
    img = F.interpolate(torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, size=(256, 256), mode="bilinear")
    with torch.no_grad():
        full = tile_model.encode(img)
        tiled = tile_model.tiled_encode(img, tile=192, overlap=64)
        small = tile_model.tiled_encode(img, tile=128, overlap=32)
    for a, b in ((tiled.mean, full.mean), (tiled.logvar, full.logvar)):
        err = (a - b).abs()
        assert err.mean() < 0.15 * b.std()
        assert err.max() < 0.3 * b.abs().max()
    for a, b in ((small.mean, full.mean), (small.logvar, full.logvar)):
        for axis in (-1, -2):
            edge, inside = _edge_vs_inside(a - b, tile_starts(256, 128, 32, 8), 128, 1 / 8, axis)
            assert edge <= inside


def test_bf16_decode_through_the_cpu_kernels_matches_the_stock_convolutions():
    """The VAE's convolutions are cpu_ops.Conv2d (packed oneDNN weights at bf16 inference): the decode
    agrees with the same weights through nn.Conv2d's stock forward as closely as either agrees with fp32."""
    from torch import nn

    from diffusekit.models.cpu_ops import Conv2d

    torch.manual_seed(0)
    ref = AutoencoderKL(TILE_CFG).eval()
    fast, stock = (AutoencoderKL(TILE_CFG).eval() for _ in range(2))
    for m in (fast, stock):
        m.load_state_dict(ref.state_dict())
        m.to(torch.bfloat16)
    convs = [m for m in stock.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)
    for m in convs:
        m.forward = nn.Conv2d.forward.__get__(m)
    z = torch.randn(2, TILE_CFG.z_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z)
        got, base = (m.decode(z.bfloat16()).float() for m in (fast, stock))
    err_fast, err_stock = (want - got).abs().mean().item(), (want - base).abs().mean().item()
    assert err_fast <= 1.5 * err_stock + 1e-4, (err_fast, err_stock)
    torch.testing.assert_close(got, base, rtol=0, atol=0.1)

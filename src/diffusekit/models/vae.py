"""The KL-regularised autoencoder ("VAE") of latent diffusion.

Implements the first-stage model of Rombach et al. (2022), "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.1 / App. G: a convolutional encoder maps an image
x in [-1, 1] to the parameters of a diagonal Gaussian q(z|x) over a latent with
`z_channels` channels and `2 ** (len(ch_mult) - 1)` times smaller sides; a decoder maps a
latent back to an image. The network (ResNet blocks, one single-head self-attention block
in the middle, asymmetric padding before each stride-2 convolution) is the `Encoder` /
`Decoder` of the LDM code base, and every module attribute is named like the keys of an
LDM single-file checkpoint under `first_stage_model.` so loading is a strict key copy.

The model knows nothing of the latent scale (0.18215 for SD 1.x/2.x, 0.13025 for SDXL):
`decode` takes and `encode` returns *unscaled* latents; the pipeline scales them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_ops import Conv2d

__all__ = [
    "VAEConfig",
    "DiagonalGaussian",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "Encoder",
    "Decoder",
    "AutoencoderKL",
    "tile_starts",
    "tiled_map",
]


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an `AutoencoderKL`. Defaults are the VAE of SD 1.x, SD 2.x and SDXL
    (83,653,863 parameters); they differ only in the latent scale, which the pipeline owns.

    ch            channels of the first level; level i has ch * ch_mult[i]
    ch_mult       one entry per resolution level; len(ch_mult) - 1 stride-2 downsamplings
    num_res_blocks ResNet blocks per encoder level (the decoder uses one more per level)
    z_channels    channels the encoder's conv_out produces (times 2 when double_z)
    embed_dim     latent channels after quant_conv (what the UNet sees)
    double_z      encoder predicts mean and log-variance (True for the KL autoencoder)
    mid_attention single-head self-attention in the middle blocks (the only attention)
    use_quant_conv / use_post_quant_conv  the 1x1 convs around the latent (SD3/Flux drop them)
    norm_groups, norm_eps  GroupNorm everywhere (LDM hard-codes 32 groups, eps 1e-6)
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        for c in [self.ch * m for m in self.ch_mult]:
            if c % self.norm_groups:
                raise ValueError(
                    f"every level width ch * ch_mult = {[self.ch * m for m in self.ch_mult]} must be "
                    f"divisible by norm_groups={self.norm_groups}; {c} is not"
                )
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(
                f"without quant_conv the latent has z_channels={self.z_channels} channels, so "
                f"embed_dim must equal it (got {self.embed_dim})"
            )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for the real model)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """TINY preset for tests: same topology and factor 8 as the real model, 1,250,759 params."""
        return cls(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        """Named presets: "sd1", "sd2", "sdxl" (all the same 83.65M network), "sd3" (SD3 / SD3.5:
        16 latent channels, no quant convs, 83.65M; its latent scale 1.5305 and shift 0.0609 belong to
        the family), "tiny" and "sd3-tiny"."""
        if name in ("sd1", "sd2", "sdxl"):
            return cls()
        if name == "tiny":
            return cls.tiny()
        if name in ("sd3", "sd3-tiny"):
            base = cls() if name == "sd3" else cls.tiny()
            return replace(base, z_channels=16, embed_dim=16, use_quant_conv=False, use_post_quant_conv=False)
        raise ValueError(f"unknown VAE preset {name!r}; valid: 'sd1', 'sd2', 'sdxl', 'sd3', 'tiny', 'sd3-tiny'")


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the posterior of the KL autoencoder.

    `logvar` is clamped to [-30, 20] as in LDM so exp() stays finite. Shapes (B, C, h, w).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split quant_conv's output (B, 2C, h, w) into mean (first C) and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def var(self) -> torch.Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean (what SD pipelines use for img2img)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps. eps is drawn in float32 on the generator's device (the CPU by
        default) and then moved, so one seed gives one latent on every device and dtype."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) summed over (C, h, w) -> (B,); other=None means N(0, I)."""
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x) summed over (C, h, w) -> (B,)."""
        terms = math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=(1, 2, 3))


def _norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block (He et al. 2016) without time embedding:
    h = conv2(silu(norm2(conv1(silu(norm1(x)))))); out = nin_shortcut(x) + h.
    `nin_shortcut` (1x1 conv, "network in network") only when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = _norm(in_channels, cfg)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, cfg)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (Vaswani et al. 2017) over all h*w positions, with
    1x1-conv projections q, k, v, proj_out as in LDM; softmax(q k^T / sqrt(C)) v via SDPA."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, h, w) -> (B, 1 head, h*w tokens, C)
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as LDM
        o = o.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding (left 0, right 1, top 0, bottom 1): LDM's asymmetric
    padding, so a side of 2n gives n and the kernel never reads past the bottom-right edge."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (the resize-convolution of Odena et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResNet blocks) then `downsample` or `upsample`."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, kind: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.kind = kind
        if resample is not None:
            setattr(self, kind, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        resample = getattr(self, self.kind, None)
        return x if resample is None else resample(x)


class _Mid(nn.Module):
    """Middle of encoder and decoder: block_1, attn_1 (optional), block_2, at constant width."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg) if cfg.mid_attention else None
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, c_in = [], cfg.ch
        for i, c_out in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg))
                c_in = c_out
            last = i == len(widths) - 1
            levels.append(_Level(blocks, None if last else Downsample(c_out), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, cfg)
        self.norm_out = _norm(c_in, cfg)
        self.conv_out = Conv2d(c_in, (2 if cfg.double_z else 1) * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f).

    `up[i]` is resolution level i (as in LDM, whose list is built deepest-first and stored
    in level order), so it runs in the order up[n-1], ..., up[0]; each level has
    num_res_blocks + 1 ResNet blocks and all but level 0 end in an Upsample."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, cfg)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, widths[i], cfg))
                c_in = widths[i]
            levels.insert(0, _Level(blocks, Upsample(c_in) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, cfg)
        self.conv_out = Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size): the fewest tiles whose
    neighbours overlap by at least `overlap`, spread evenly, each start a multiple of
    `align`, the last ending at `size`. With size, tile and overlap multiples of align the
    spacing never exceeds tile - overlap (rounding is half-up in exact integers)."""
    if size <= tile:
        return [0]
    n = 1 + -(-(size - tile) // (tile - overlap))  # ceil division
    units = (size - tile) // align
    # start_i = align * round_half_up(i * units / (n - 1))
    return [align * ((2 * i * units + n - 1) // (2 * (n - 1))) for i in range(n)]


def _ramp(starts: list[int], length: int, scale: float, size: int) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights in output units: 1 inside, rising linearly across the
    overlap with the previous tile and falling across the overlap with the next one, so in
    a two-tile overlap the weights sum to 1 (linear feathering). Never exactly 0."""
    out_len = round(min(length, size) * scale)
    spans = [(round(s * scale), round(s * scale) + out_len) for s in starts]
    weights = []
    for i, (a, b) in enumerate(spans):
        pos = torch.arange(a, b, dtype=torch.float32) + 0.5  # pixel centres
        w = torch.ones(b - a)
        if i > 0 and spans[i - 1][1] > a:  # overlap with the previous tile
            w = w * ((pos - a) / (spans[i - 1][1] - a)).clamp(max=1.0)
        if i + 1 < len(spans) and spans[i + 1][0] < b:  # overlap with the next tile
            w = w * ((b - pos) / (b - spans[i + 1][0])).clamp(max=1.0)
        weights.append(w)
    return weights


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float = 1.0,
    align: int = 1,
) -> torch.Tensor:
    """Apply `fn` to overlapping square tiles of x (B, C, H, W) and blend the outputs.

    `fn` maps a (B, C, h, w) tile to (B, C', h*scale, w*scale). Tiles of side `tile`
    (clipped to the image) start at `tile_starts(...)`; each output is weighted by the outer
    product of `_ramp` windows and the sum is divided by the summed weights, so overlaps
    are linearly feathered (the weighted-average fusion of MultiDiffusion, Bar-Tal et al.
    2023) and a purely local `fn` gives exactly its untiled result. Accumulates in fp32.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if tile % align or overlap % align:
        raise ValueError(f"tile={tile} and overlap={overlap} must be multiples of {align} (the VAE factor)")
    H, W = x.shape[-2:]
    if H % align or W % align:
        raise ValueError(f"input sides {H}x{W} must be multiples of {align}")
    ys, xs = tile_starts(H, tile, overlap, align), tile_starts(W, tile, overlap, align)
    wy, wx = _ramp(ys, tile, scale, H), _ramp(xs, tile, scale, W)
    th, tw = min(tile, H), min(tile, W)
    out = weight = None
    for y0, wyi in zip(ys, wy):
        for x0, wxi in zip(xs, wx):
            part = fn(x[..., y0 : y0 + th, x0 : x0 + tw]).float()  # (B, C', th*scale, tw*scale)
            if out is None:
                out = part.new_zeros((*part.shape[:2], round(H * scale), round(W * scale)))
                weight = part.new_zeros(out.shape[-2:])
            w2 = (wyi[:, None] * wxi[None, :]).to(part.device)  # (th*scale, tw*scale)
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = part.shape[-2:]
            out[..., oy : oy + ph, ox : ox + pw] += part * w2
            weight[oy : oy + ph, ox : ox + pw] += w2
    return (out / weight).to(x.dtype)


class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1).

    Keys equal an LDM checkpoint's `first_stage_model.*` keys: encoder.*, decoder.*,
    quant_conv, post_quant_conv. `encode(img) -> DiagonalGaussian`, `decode(z) -> img`;
    images are (B, 3, H, W) in [-1, 1], latents unscaled.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2 = (2 if cfg.double_z else 1) * cfg.z_channels
        e2 = (2 if cfg.double_z else 1) * cfg.embed_dim
        self.quant_conv = Conv2d(z2, e2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1) if cfg.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # ---- input checks -------------------------------------------------------------------
    def _check_image(self, img: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if img.ndim != 4 or img.shape[1] != c:
            raise ValueError(f"expected an image batch of shape (B, {c}, H, W), got {tuple(img.shape)}")
        h, w = img.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image height and width must be multiples of the VAE factor {f}, got {h}x{w}; "
                f"nearest valid sizes: {h // f * f or f}x{w // f * f or f} or {-(-h // f) * f}x{-(-w // f) * f}"
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.config.embed_dim
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"expected a latent batch of shape (B, {c}, h, w), got {tuple(z.shape)}")

    # ---- untiled ------------------------------------------------------------------------
    def _moments(self, img: torch.Tensor) -> torch.Tensor:
        h = self.encoder(img)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _posterior(self, moments: torch.Tensor) -> DiagonalGaussian:
        if self.config.double_z:
            return DiagonalGaussian.from_moments(moments)
        # deterministic encoder: a point mass (logvar -30 -> std ~3e-7)
        return DiagonalGaussian(moments, torch.full_like(moments, -30.0))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, img: torch.Tensor) -> DiagonalGaussian:
        """img (B, 3, H, W) in [-1, 1], H and W multiples of the factor -> q(z|img) over
        (B, embed_dim, H/f, W/f)."""
        self._check_image(img)
        return self._posterior(self._moments(img))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        self._check_latent(z)
        return self._decode(z)

    def forward(
        self, img: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (for training): decode(sample or mode of encode(img))."""
        posterior = self.encode(img)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self._decode(z), posterior

    # ---- tiled ----------------------------------------------------------------------------
    def tiled_encode(self, img: torch.Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussian:
        """`encode` for large images in overlapping tiles of `tile` pixels; the tiles' mean and
        log-variance are blended with linear feathering across the `overlap` pixels. Not
        bit-equal to `encode`: GroupNorm statistics and the attention see one tile at a time."""
        self._check_image(img)
        f = self.downsample_factor
        return self._posterior(tiled_map(self._moments, img, tile, overlap, 1.0 / f, f))

    def tiled_decode(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` for large latents in overlapping tiles of `tile` latent pixels (64 = 512 px),
        blended with linear feathering across `overlap` latent pixels (times the factor in the
        image). Not bit-equal to `decode` (per-tile GroupNorm statistics and attention)."""
        self._check_latent(z)
        return tiled_map(self._decode, z, tile, overlap, float(self.downsample_factor), 1)

"""The UNet noise predictor of latent diffusion (Stable Diffusion 1.x / 2.x / SDXL).

Architecture of `openaimodel.UNetModel` in Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models" (CompVis/latent-diffusion, Stability-AI/stablediffusion) and its
SDXL form in Podell et al. 2023, "SDXL" (Stability-AI/generative-models `sgm`): a UNet of
residual blocks (Ho et al. 2020, "DDPM", after Dhariwal & Nichol 2021) conditioned on a sinusoidal
timestep embedding, with SpatialTransformer blocks (self-attention, cross-attention to the text
`context`, GEGLU feed-forward) at the lower resolutions.

Every module attribute is named after the key of the original single-file checkpoint under
`model.diffusion_model.` (`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`,
`middle_block.1...`, `output_blocks.2.2.conv.weight`, `out.2.weight`, `label_emb.0.0.weight`), so
loading such a checkpoint is a strict `load_state_dict`. The network knows nothing of sigma: it
maps `(x_t, t, context, y) -> eps / v` for a float (possibly fractional) timestep `t`.

Attention levels are given per level by `transformer_depth` (0 = no SpatialTransformer at that
level), the form used by SGM / ComfyUI, instead of LDM's `attention_resolutions` downsampling
factors: `attention_resolutions=(4, 2, 1)` with depth 1 on four levels is `(1, 1, 1, 0)`.

Speed on CPU (same outputs, different kernels): the layers are `cpu_ops.Linear` / `cpu_ops.Conv2d`
(packed oneDNN weights at inference, im2col GEMMs, fp32 compute where a CPU emulates bf16/fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cpu_ops import Conv2d, Linear, _compute_in_fp32, linear

__all__ = [
    "UNetConfig",
    "UNetModel",
    "keep_stored_weights",
    "timestep_embedding",
    "SD15",
    "SD15_INPAINT",
    "SD2",
    "SDXL",
    "SDXL_REFINER",
    "TINY",
    "PRESETS",
]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of `UNetModel`; the defaults are the Stable Diffusion 1.5 UNet.

    Field names follow LDM/SGM `openaimodel.UNetModel` except the attention layout:
    - `transformer_depth[level]`: SpatialTransformer depth after each ResBlock of that level on
      the way down, 0 = no attention at that level (LDM: `attention_resolutions`).
    - `transformer_depth_output`: one depth per output block (`len(channel_mult) *
      (num_res_blocks + 1)` of them, deepest level first); None = `transformer_depth[level]`.
    - `transformer_depth_middle`: depth in the middle block; 0 = ResBlock, ResBlock only.
    Heads: `num_head_channels > 0` fixes the head width (SD 2 / SDXL: 64) and the head count is
    `channels // num_head_channels`; otherwise `num_heads` heads at every level (SD 1: 8).
    Extra conditioning `y` (added to the timestep embedding): `num_classes=int` -> `label_emb`
    is an `nn.Embedding` over integer labels; `num_classes="sequential"` -> an MLP over a float
    vector of `adm_in_channels` features (SDXL: pooled text 1280 + 6 x 256 size/crop embeddings).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    transformer_depth_output: tuple[int, ...] | None = None
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int | None = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    num_classes: int | str | None = None
    norm_num_groups: int = 32
    dropout: float = 0.0
    # Softmax(QK^T) in fp32 for fp16/bf16 weights: SD 2.1-768 overflows in fp16 without it.
    upcast_attention: bool = False
    # torch.utils.checkpoint around every block while training (LDM `use_checkpoint`).
    use_checkpoint: bool = False

    def __post_init__(self):
        levels = len(self.channel_mult)
        if len(self.transformer_depth) != levels:
            raise ValueError(
                f"transformer_depth={self.transformer_depth} needs one entry per level of "
                f"channel_mult={self.channel_mult} ({levels})")
        if self.transformer_depth_output is not None:
            need = levels * (self.num_res_blocks + 1)
            if len(self.transformer_depth_output) != need:
                raise ValueError(
                    f"transformer_depth_output={self.transformer_depth_output} needs {need} "
                    f"entries (levels x (num_res_blocks + 1))")
        if self.num_classes is not None and not isinstance(self.num_classes, int) \
                and self.num_classes != "sequential":
            raise ValueError(f"num_classes={self.num_classes!r}; valid: None, an int, 'sequential'")
        if self.num_classes == "sequential" and not self.adm_in_channels:
            raise ValueError("num_classes='sequential' needs adm_in_channels (SDXL: 2816)")
        for mult in self.channel_mult:
            ch = mult * self.model_channels
            if ch % self.norm_num_groups:
                raise ValueError(f"channels {ch} not divisible by norm_num_groups={self.norm_num_groups}")
            if self.num_head_channels > 0 and ch % self.num_head_channels:
                raise ValueError(f"channels {ch} not divisible by num_head_channels={self.num_head_channels}")
            if self.num_head_channels <= 0 and ch % self.num_heads:
                raise ValueError(f"channels {ch} not divisible by num_heads={self.num_heads}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a SpatialTransformer over `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def output_depths(self) -> tuple[int, ...]:
        """Transformer depth of every output block, deepest level first."""
        if self.transformer_depth_output is not None:
            return tuple(self.transformer_depth_output)
        n = self.num_res_blocks + 1
        return tuple(d for d in reversed(self.transformer_depth) for _ in range(n))


SD15 = UNetConfig()
SD15_INPAINT = replace(SD15, in_channels=9)
SD2 = replace(SD15, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SDXL = UNetConfig(
    model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10),
    transformer_depth_middle=10, num_head_channels=64, context_dim=2048,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")
SDXL_REFINER = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4, num_head_channels=64, context_dim=1280,
    use_linear_in_transformer=True, adm_in_channels=2560, num_classes="sequential")
TINY = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
    transformer_depth_middle=1, num_heads=2, context_dim=32, norm_num_groups=8)
PRESETS: dict[str, UNetConfig] = {
    "sd15": SD15, "sd15_inpaint": SD15_INPAINT, "sd2": SD2, "sdxl": SDXL,
    "sdxl_refiner": SDXL_REFINER, "tiny": TINY}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)), in fp32.

    Vaswani et al. 2017 positional encoding as used by LDM (`timestep_embedding`), i.e. diffusers
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`. `timesteps` (B,) may be fractional.
    Returns (B, dim); an odd `dim` gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added between its two convolutions.

    `ResBlock` of LDM openaimodel (Dhariwal & Nichol 2021, no scale-shift norm):
    h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv(dropout(SiLU(GN(h)))); return skip(x) + h.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int,
                 dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # zero_module: the block starts as identity
        nn.init.zeros_(self.out_layers[3].bias)
        # 1x1 projection when the width changes (LDM: use_conv=False); Identity has no keys.
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (LDM `Downsample`, conv_resample=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to the size of the matching skip) then a 3x3 convolution.

    LDM `Upsample`; resizing to the skip's size (as ComfyUI and diffusers do) lets latents whose
    side is not a multiple of 2^(levels-1) go through.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V of queries `x` over `context` (or x).

    LDM `CrossAttention` (Vaswani et al. 2017); evaluated with `scaled_dot_product_attention`.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(kv_dim, inner, bias=False)
        self.to_v = Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, tokens, heads*d) -> (B, heads, tokens, d): a view, SDPA takes the strides.
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        dtype = q.dtype
        if (self.upcast and dtype != torch.float32) or _compute_in_fp32(q):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, tokens, d)
        out = out.to(dtype).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU unit x * GELU(gate) of Shazeer 2020, "GLU Variants Improve Transformer"."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of width 4*dim (LDM `FeedForward(glu=True)`): keys net.0.proj, net.2."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the context, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, added back residually.

    LDM `SpatialTransformer`: GN(eps 1e-6) -> proj_in (1x1 conv, or linear for SD 2 / SDXL) ->
    `depth` BasicTransformerBlocks over (B, H*W, C) tokens -> proj_out -> + input.
    A 1x1 conv is a linear map over channels, so both kinds are applied to the (B, H, W, C)
    view; on a channels_last tensor that view is free (no transpose copy).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int,
                 context_dim: int | None, groups: int, use_linear: bool,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, upcast)
            for _ in range(depth))
        self.proj_out = Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero_module, as LDM
        nn.init.zeros_(self.proj_out.bias)

    def _project(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        # Linear weight (out, in); a 1x1 conv weight (out, in, 1, 1) is the same matrix.
        return linear(h, layer.weight.flatten(1), layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # (B, H*W, C)
        h = self._project(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self._project(self.proj_out, h)
        # (B, H*W, C) -> (B, C, H, W) as a channels_last view.
        return x + h.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: a list of layers, each given what it consumes (emb, context, skip size)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The LDM / SGM UNet: `forward(x, timesteps, context, y) -> prediction` (eps or v).

    `openaimodel.UNetModel` of Rombach et al. 2022 and Podell et al. 2023 with
    `use_spatial_transformer=True, legacy=False, conv_resample=True, use_scale_shift_norm=False`.
    """

    def __init__(self, config: UNetConfig = SD15):
        super().__init__()
        self.config = cfg = config
        mc, ted, groups, nrb = cfg.model_channels, cfg.time_embed_dim, cfg.norm_num_groups, cfg.num_res_blocks
        self.gradient_checkpointing = cfg.use_checkpoint
        # the activations' dtype; None = the weights' own. With fp16 / bf16 weights kept as stored (`keep_stored_weights`)
        # it is float32 and every Linear / Conv2d casts its weight for the call only
        self.compute_dtype: torch.dtype | None = None

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, groups,
                                      cfg.use_linear_in_transformer, cfg.dropout, cfg.upcast_attention)

        self.time_embed = nn.Sequential(Linear(mc, ted), nn.SiLU(), Linear(ted, ted))
        if isinstance(cfg.num_classes, int):
            self.label_emb = nn.Embedding(cfg.num_classes, ted)
        elif cfg.num_classes == "sequential":  # SDXL: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(
                Linear(cfg.adm_in_channels, ted), nn.SiLU(), Linear(ted, ted)))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, groups, cfg.dropout)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, ted, ch, groups, cfg.dropout)]
        if cfg.transformer_depth_middle > 0:
            middle.append(transformer(ch, cfg.transformer_depth_middle))
        middle.append(ResBlock(ch, ted, ch, groups, cfg.dropout))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        out_depths = iter(cfg.output_depths())
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(nrb + 1):
                layers = [ResBlock(ch + skip_chans.pop(), ted, mc * mult, groups, cfg.dropout)]
                ch = mc * mult
                depth = next(out_depths)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == nrb:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(),
                                 Conv2d(mc, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block's activations in backward (saves memory while training)."""
        self.gradient_checkpointing = enabled

    def _check_inputs(self, x, timesteps, context, y):
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W) for this UNet "
                             f"(in_channels={cfg.in_channels}); got shape {tuple(x.shape)}")
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"timesteps must be a scalar or shape ({x.shape[0]},); got {tuple(timesteps.shape)}")
        has_attention = any(cfg.transformer_depth) or cfg.transformer_depth_middle or any(cfg.output_depths())
        if cfg.context_dim is not None and has_attention:
            if context is None:
                raise ValueError(f"this UNet cross-attends to a context (B, tokens, {cfg.context_dim}); got None")
            if context.ndim != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] != x.shape[0]:
                raise ValueError(f"context must be ({x.shape[0]}, tokens, {cfg.context_dim}) "
                                 f"(context_dim={cfg.context_dim}); got shape {tuple(context.shape)}")
        elif context is not None:
            raise ValueError("this UNet has no cross-attention (context_dim=None); pass context=None")
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("y given but this UNet has no label/adm embedding (num_classes=None)")
        elif y is None:
            raise ValueError(f"this UNet needs y (num_classes={cfg.num_classes!r}"
                             + (f", adm_in_channels={cfg.adm_in_channels})" if cfg.adm_in_channels else ")"))
        elif cfg.num_classes == "sequential" and tuple(y.shape) != (x.shape[0], cfg.adm_in_channels):
            raise ValueError(f"y must be ({x.shape[0]}, {cfg.adm_in_channels}) (adm_in_channels="
                             f"{cfg.adm_in_channels}); got shape {tuple(y.shape)}")
        elif isinstance(cfg.num_classes, int) and tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"y must be ({x.shape[0]},) integer labels; got shape {tuple(y.shape)}")

    def _run(self, block: TimestepEmbedSequential, h, emb, context, size=None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, size, use_reentrant=False)
        return block(h, emb, context, size)

    def activation_dtype(self) -> torch.dtype:
        """The dtype the network computes in: `compute_dtype`, else its weights' own."""
        return self.compute_dtype or self.out[2].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,) float, context (B, tokens, context_dim),
        y (B,) labels or (B, adm_in_channels) -> (B, out_channels, H, W) in x's dtype."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        self._check_inputs(x, timesteps, context, y)
        dtype = self.activation_dtype()
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        # (B, model_channels) fp32 sinusoid -> (B, 4*model_channels)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y if isinstance(self.config.num_classes, int) else y.to(dtype))
        if context is not None:
            context = context.to(dtype)

        h, skips = x.to(dtype), []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None  # next skip's size for Upsample
            h = self._run(block, h, emb, context, size)
        return self.out(h).to(x.dtype).contiguous()


def keep_stored_weights(net: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Compute `net` in `compute_dtype` while its big Linear / Conv2d weights stay in their stored dtype (fp16 /
    bf16, memory-mapped from the file): each such layer casts its weight for one call (`cpu_ops`), as ComfyUI's
    manual cast does. Every other parameter and buffer (norms, embeddings, plain convolutions: a few MB) is cast
    now. Sets `net.compute_dtype`; returns `net`."""
    for m in net.modules():
        if isinstance(m, (Linear, Conv2d)):   # cpu_ops' layers: they cast their weight per call
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != compute_dtype:
                setattr(m, name, nn.Parameter(p.detach().to(compute_dtype), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            if b.is_floating_point() and b.dtype != compute_dtype:
                m._buffers[name] = b.to(compute_dtype)   # keeps the buffer's persistence
    net.compute_dtype = compute_dtype
    return net


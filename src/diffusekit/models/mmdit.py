"""MMDiT, the rectified-flow transformer of Stable Diffusion 3 / 3.5.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(Stability-AI/sd3-ref `mmdit.py`, SD3.5's `mmditx.py`), built on DiT (Peebles & Xie 2023,
"Scalable Diffusion Models with Transformers"):

- the latent (B, C, H, W) is cut into 2x2 patches by a strided convolution (`x_embedder`) and a
  learned positional embedding, cropped from the centre of a `pos_embed_max_size`^2 grid, is added;
- the text context (B, L, 4096) is projected to the model width (`context_embedder`); the
  timestep's sinusoidal embedding (`t_embedder`) plus the pooled text vector (`y_embedder`) give
  the conditioning vector c (B, hidden);
- every joint block keeps two streams, image tokens (`x_block`) and text tokens
  (`context_block`), each with its own weights, LayerNorm and adaLN-Zero modulation from c
  (DiT: shift/scale before attention and MLP, a gate on each residual); attention runs once over
  the concatenation of both streams' tokens;
- SD3.5 adds RMS-norm on queries and keys per head (`ln_q`, `ln_k`, qk_norm="rms"; Large and
  Medium), and SD3.5 Medium's MMDiT-X blocks add a second, image-only self-attention (`attn2`)
  with its own modulation (9 chunks instead of 6);
- the last block's context stream is "pre-only": it contributes keys/values to the attention
  and then ends (no output projection, no MLP); the final layer modulates, projects to p*p*C
  and un-patchifies.

Every attribute is named after the key of the single-file checkpoint under
`model.diffusion_model.` (`joint_blocks.3.x_block.attn.qkv.weight`, `final_layer.linear.weight`,
`pos_embed`), so loading one is a strict `load_state_dict`; `convert_mmdit` renames a diffusers
`SD3Transformer2DModel` folder. The network knows nothing of sigma: it maps
`(x_t, t, context, y) -> v` with SD3's time input t = 1000 * sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cpu_ops import Conv2d, Linear, _compute_in_fp32
from .unet import timestep_embedding

__all__ = [
    "MMDiTConfig", "MMDiT", "sincos_pos_embed_2d",
    "SD3_MEDIUM", "SD35_LARGE", "SD35_MEDIUM", "TINY", "PRESETS",
]

QK_NORMS = (None, "rms")


@dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of `MMDiT`; the defaults are SD3 Medium (2B).

    - `depth` joint blocks of width `hidden_size` with `num_heads` heads (SD3: 64 per head,
      hidden = 64 * depth, heads = depth).
    - `pos_embed_max_size`: side of the positional-embedding grid in patches (SD3: 192, i.e. latents
      up to 384x384 = images up to 3072 px); the embedding of an h x w patch grid is its centre crop.
    - `sample_size`: the latent side the sinusoidal initialisation of `pos_embed` is scaled to
      (diffusers' `sample_size`, 128 for the released models; None = the grid itself). Only used when
      a model is built from scratch: checkpoints carry their `pos_embed`.
    - `context_dim`: width of the joint text context (T5-XXL 4096; CLIP states are zero-padded to it);
      `adm_in_channels` (sd3-ref's name): the pooled text, CLIP-L (768) + CLIP-G (1280) = 2048;
      None = no `y_embedder` (a model conditioned on the token context only).
    - `qk_norm`: None, or "rms" for SD3.5's per-head RMSNorm of queries and keys.
    - `x_block_self_attn_layers`: the blocks with MMDiT-X's extra image self-attention (SD3.5 Medium: 0-12).
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    pos_embed_max_size: int = 192
    sample_size: int | None = None
    context_dim: int = 4096
    adm_in_channels: int | None = 2048
    mlp_ratio: float = 4.0
    qk_norm: str | None = None
    x_block_self_attn_layers: tuple[int, ...] = ()
    # torch.utils.checkpoint around every joint block while training.
    use_checkpoint: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r}; valid: {QK_NORMS}")
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"x_block_self_attn_layers {bad} are outside the {self.depth} blocks 0..{self.depth - 1}")
        if self.depth < 1 or self.patch_size < 1 or self.pos_embed_max_size < 1:
            raise ValueError(f"depth, patch_size and pos_embed_max_size must be >= 1, got "
                             f"{self.depth}, {self.patch_size}, {self.pos_embed_max_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


SD3_MEDIUM = MMDiTConfig(sample_size=128)
SD35_LARGE = MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, sample_size=128, qk_norm="rms")
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, sample_size=128, qk_norm="rms",
                          x_block_self_attn_layers=tuple(range(13)))
TINY = MMDiTConfig(depth=3, hidden_size=64, num_heads=4, pos_embed_max_size=16, sample_size=16,
                   context_dim=48, adm_in_channels=40)
PRESETS: dict[str, MMDiTConfig] = {
    "sd3_medium": SD3_MEDIUM, "sd35_large": SD35_LARGE, "sd35_medium": SD35_MEDIUM, "tiny": TINY}


def sincos_pos_embed_2d(dim: int, grid: int, base_size: float) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding of a grid x grid patch grid, (grid*grid, dim), row-major.

    MAE / DiT `get_2d_sincos_pos_embed` with positions scaled by base_size / grid (diffusers'
    `PatchEmbed` with `pos_embed_max_size`): half the channels embed the row, half the column, each
    as [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sincos embedding needs a width divisible by 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float64) * (base_size / grid)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(p: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dim/2)
        args = p[:, None] * omega[None]
        return torch.cat([args.sin(), args.cos()], dim=1)

    rows = pos[:, None].expand(grid, grid).reshape(-1)
    cols = pos[None, :].expand(grid, grid).reshape(-1)
    # MAE meshgrid(w, h) puts the column coordinate first.
    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift with (B, D) modulation over (B, tokens, D)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) over the last axis, reduced in fp32, result in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain (`weight`), eps 1e-6 as in SD3.5."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V over (B, heads, tokens, d) -> (B, tokens, heads * d)."""
    b, n = q.shape[0], q.shape[2]
    dtype = q.dtype
    if _compute_in_fp32(q):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.to(dtype).transpose(1, 2).reshape(b, n, -1)


class SelfAttention(nn.Module):
    """The projections of one stream: fused `qkv`, optional per-head `ln_q`/`ln_k`, output `proj`.

    `pre_only` (the last block's context stream) has no output projection.
    """

    def __init__(self, dim: int, heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(dim // heads)
            self.ln_k = RMSNorm(dim // heads)
        else:
            self.ln_q = self.ln_k = None
        self.proj = None if pre_only else Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, tokens, D) -> q, k, v each (B, heads, tokens, d) (transposed views of the fused projection)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)   # (B, tokens, heads, d) each
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*self.pre_attention(x)))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, width mlp_ratio * dim (DiT / timm `Mlp`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    """One stream of a joint block (sd3-ref `DismantledBlock`): adaLN-Zero around attention and MLP.

    Modulation chunks from SiLU(c) -> Linear: (shift, scale, gate) for attention and for the MLP,
    plus (shift, scale, gate) for `attn2` in an MMDiT-X image stream (9 chunks); a pre-only stream
    has (shift, scale) only. Its attention is evaluated jointly by `JointBlock`.
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, self_attn: bool = False):
        super().__init__()
        dim = cfg.hidden_size
        self.pre_only, self.self_attn = pre_only, self_attn
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, pre_only=pre_only)
        if self_attn:
            self.attn2 = SelfAttention(dim, cfg.num_heads, cfg.qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, cfg.mlp_hidden)
        chunks = 2 if pre_only else (9 if self_attn else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, chunks * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """-> (q, k, v) of the joint attention, (output, gate) of the second self-attention or None, and the
        modulation still needed after the attention."""
        mod = self.adaLN_modulation(c).chunk(self.adaLN_modulation[1].out_features // x.shape[-1], dim=1)
        h = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(h, mod[0], mod[1]))
        if self.pre_only:
            return qkv, None, None
        x_attn2 = None
        if self.self_attn:  # MMDiT-X: image-only attention from the same normalised input, and its gate
            x_attn2 = (self.attn2(modulate(h, mod[6], mod[7])), mod[8])
        return qkv, x_attn2, mod[2:6]

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, x_attn2, mod) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        # gated residuals x + gate * f(x) as one fused pass each (addcmul)
        x = torch.addcmul(x, gate_msa[:, None], self.attn.proj(attn))
        if x_attn2 is not None:
            x = torch.addcmul(x, x_attn2[1][:, None], x_attn2[0])
        return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """Image and text streams with one attention over their concatenated tokens [context; x]."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool, self_attn: bool):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=pre_only)
        self.x_block = DismantledBlock(cfg, self_attn=self_attn)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        c_qkv, _, c_mod = self.context_block.pre_attention(context, c)
        x_qkv, x_attn2, x_mod = self.x_block.pre_attention(x, c)
        # the concatenation along tokens is contiguous in SDPA's (B, heads, L+N, d) layout
        k, v = (torch.cat([ct, xt], dim=2) for ct, xt in zip(c_qkv[1:], x_qkv[1:]))
        if self.context_block.pre_only:   # the text tokens' outputs would be discarded: only image queries
            return None, self.x_block.post_attention(x, attention(x_qkv[0], k, v), x_attn2, x_mod)
        n_ctx = context.shape[1]
        out = attention(torch.cat([c_qkv[0], x_qkv[0]], dim=2), k, v)                     # (B, L+N, D)
        x = self.x_block.post_attention(x, out[:, n_ctx:], x_attn2, x_mod)
        return self.context_block.post_attention(context, out[:, :n_ctx], None, c_mod), x


class PatchEmbed(nn.Module):
    """p x p patches -> tokens by a stride-p convolution (`proj`): (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = Conv2d(cfg.in_channels, cfg.hidden_size, p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (keys mlp.0, mlp.2): the timestep and pooled-text embedders."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to p*p*out_channels per token (DiT `FinalLayer`)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim, p = cfg.hidden_size, cfg.patch_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, p * p * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def check_transformer_inputs(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, channels: int,
                             patch: int, context_dim: int) -> None:
    """ValueError naming the bad input of a patchifying flow transformer (MMDiT, Flux): x (B, channels, H, W)
    with H, W multiples of `patch`, t (B,), context (B, tokens, context_dim)."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be the latent (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % patch or x.shape[3] % patch:
        raise ValueError(f"latent size {tuple(x.shape[2:])} must be a multiple of patch_size={patch}")
    b = x.shape[0]
    if t.shape != (b,):
        raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
    if context is None or context.ndim != 3 or context.shape[0] != b or context.shape[2] != context_dim:
        got = None if context is None else tuple(context.shape)
        raise ValueError(f"context must be (B={b}, tokens, {context_dim}), got {got}")


class MMDiT(nn.Module):
    """The SD3 / SD3.5 transformer: `forward(x, t, context, y) -> v`, keys of `model.diffusion_model.*`."""

    FREQ_DIM = 256  # width of the sinusoidal timestep features fed to t_embedder

    def __init__(self, config: MMDiTConfig = SD3_MEDIUM):
        super().__init__()
        cfg = self.config = config
        dim = cfg.hidden_size
        self.gradient_checkpointing = cfg.use_checkpoint
        self.x_embedder = PatchEmbed(cfg)
        base = cfg.pos_embed_max_size if cfg.sample_size is None else cfg.sample_size / cfg.patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, cfg.pos_embed_max_size, base)[None])
        self.t_embedder = MLPEmbedder(self.FREQ_DIM, dim)
        self.y_embedder = MLPEmbedder(cfg.adm_in_channels, dim) if cfg.adm_in_channels else None
        self.context_embedder = Linear(cfg.context_dim, dim)
        self.joint_blocks = nn.ModuleList(
            JointBlock(cfg, pre_only=i == cfg.depth - 1, self_attn=i in cfg.x_block_self_attn_layers)
            for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, zero adaLN (every block starts as identity)
        and a zero final projection, so an untrained model predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for emb in (self.t_embedder, self.y_embedder):
            if emb is None:
                continue
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
        for layer in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every joint block in the backward pass (memory for compute while training)."""
        self.gradient_checkpointing = enabled

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w crop of the positional grid, (1, h*w, D)."""
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"a {h}x{w} patch grid exceeds pos_embed_max_size={m} "
                             f"(latents up to {m * self.config.patch_size} px a side)")
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def _check_inputs(self, x, t, context, y) -> None:
        cfg = self.config
        check_transformer_inputs(x, t, context, cfg.in_channels, cfg.patch_size, cfg.context_dim)
        b = x.shape[0]
        if cfg.adm_in_channels and (y is None or y.shape != (b, cfg.adm_in_channels)):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"y (pooled text) must be ({b}, {cfg.adm_in_channels}), got {got}")
        if not cfg.adm_in_channels and y is not None:
            raise ValueError("this MMDiT has no y_embedder (adm_in_channels=None): pass y=None")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy latent, t (B,) or a scalar: time in [0, 1000] (1000 * sigma), context
        (B, L, context_dim), y (B, adm_in_channels) pooled text -> the velocity (B, out_channels, H, W) in x's dtype."""
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
        self._check_inputs(x, t, context, y)
        cfg, p = self.config, self.config.patch_size
        dtype = self.context_embedder.weight.dtype
        h, w = x.shape[2] // p, x.shape[3] // p
        tokens = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w).to(dtype)  # (B, h*w, D)
        c = self.t_embedder(timestep_embedding(t, self.FREQ_DIM).to(dtype))                 # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y.to(dtype))
        ctx = self.context_embedder(context.to(dtype))                                    # (B, L, D)
        for block in self.joint_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                ctx, tokens = checkpoint(block, ctx, tokens, c, use_reentrant=False)
            else:
                ctx, tokens = block(ctx, tokens, c)
        out = self.final_layer(tokens, c)                                                 # (B, h*w, p*p*C)
        out = out.view(x.shape[0], h, w, p, p, cfg.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], cfg.out_channels, h * p, w * p)
        return out.to(x.dtype).contiguous()


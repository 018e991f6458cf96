"""Flux.1, the rectified-flow transformer of Black Forest Labs (dev and schnell).

Black Forest Labs 2024 (github.com/black-forest-labs/flux, `flux/model.py`, `flux/modules/layers.py`;
Labs et al. 2025, "FLUX.1 Kontext", Sec. 2 describes the base model). The same family of ideas as
SD3's MMDiT (Esser et al. 2024), with different parts:

- the 16-channel latent (B, 16, H, W) is cut into 2x2 patches *by reshaping* ("b c (h ph) (w pw) ->
  b (h w) (c ph pw)": 64 features per token) and projected by a linear layer (`img_in`); there is no
  learned positional embedding: positions enter through rotary embeddings (RoPE, Su et al. 2021) over
  3-axis ids, (0, row, column) for image tokens and zeros for text tokens, the head dimension split into
  `axes_dim` = (16, 56, 56) channels, one axis each;
- the text context (T5-XXL states, B, L, 4096) is projected by `txt_in`; the conditioning vector is
  time (`time_in`) + guidance (`guidance_in`, Flux.1 dev only: the guidance scale is a model input,
  distilled from CFG) + the pooled CLIP-L vector (`vector_in`), each an MLP over its sinusoidal or raw
  input;
- `depth` double-stream blocks (separate image / text weights, adaLN modulation from SiLU(vec),
  one joint attention over [text; image]) then `depth_single_blocks` single-stream blocks over the
  concatenated tokens, each one fused linear (`linear1`: q, k, v and the MLP input) feeding attention
  and MLP in parallel, and one fused output linear (`linear2`) over [attention; GELU(mlp)] (Dehghani
  et al. 2023, "Scaling Vision Transformers to 22B Parameters", parallel layers);
- queries and keys get a per-head RMS norm (`norm.query_norm`, `norm.key_norm`, gain `scale`) before RoPE;
- the final layer modulates the image tokens (shift, scale), projects to 64 features and un-patchifies.

Every attribute is named after the key of the BFL single file (`double_blocks.3.img_attn.qkv.weight`,
`single_blocks.0.linear1.weight`, `final_layer.adaLN_modulation.1.weight`; ComfyUI writes them under
`model.diffusion_model.`), so loading one is a strict `load_state_dict`; `convert_flux` renames a
diffusers `FluxTransformer2DModel` folder. The network knows nothing of sigma: `forward(x, t, context,
y, guidance)` maps the noisy latent at time t = 1000 * sigma to the velocity (BFL feeds sigma and
multiplies by its `time_factor` 1000 inside: the same embedding).

Memory (12B parameters): every `Linear` casts its stored weight to the activations' dtype at compute
time (`unet.linear`), so bf16 or fp8 weights stay memory-mapped as stored and only the layer being run
is upcast; `compute_dtype` picks the activations' dtype (None: the weights' own, bf16 for fp8 weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cpu_ops import Linear
from .mmdit import attention, check_transformer_inputs, modulate, rms_norm
from .unet import timestep_embedding

__all__ = ["FluxConfig", "Flux", "DEV", "SCHNELL", "TINY", "TINY_SCHNELL", "PRESETS", "patchify", "unpatchify",
           "image_ids", "rope_frequencies"]

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class FluxConfig:
    """Hyper-parameters of `Flux` (BFL `FluxParams`, same names); the defaults are Flux.1 dev (11.9B).

    - `in_channels`: features per image token, latent channels x patch_size^2 (16 x 2 x 2 = 64);
      `out_channels` None = in_channels.
    - `vec_in_dim`: the pooled CLIP-L vector (768); `context_in_dim`: T5-XXL's width (4096).
    - `hidden_size` with `num_heads` heads (3072 = 24 x 128); `axes_dim`: the head dimension's split
      over the three RoPE axes (must sum to hidden_size / num_heads), `theta` their base.
    - `depth` double-stream and `depth_single_blocks` single-stream blocks (19 and 38).
    - `guidance_embed`: the guidance-distilled dev model's `guidance_in` embedder (schnell: False).
    """

    in_channels: int = 64
    out_channels: int | None = None
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    patch_size: int = 2
    use_checkpoint: bool = False   # torch.utils.checkpoint around every block while training

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim={self.axes_dim} must be even numbers summing to the head dimension "
                             f"{self.head_dim} (hidden_size / num_heads)")
        if self.in_channels % (self.patch_size ** 2):
            raise ValueError(f"in_channels={self.in_channels} must be latent channels x patch_size^2 "
                             f"(patch_size={self.patch_size})")
        if self.depth < 0 or self.depth_single_blocks < 0 or self.depth + self.depth_single_blocks < 1:
            raise ValueError(f"depth={self.depth}, depth_single_blocks={self.depth_single_blocks}: need at least one block")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the network denoises (16): in_channels without the 2x2 patch."""
        return self.in_channels // self.patch_size ** 2

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


DEV = FluxConfig()
SCHNELL = FluxConfig(guidance_embed=False)
TINY = FluxConfig(vec_in_dim=24, context_in_dim=40, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=(4, 14, 14))
TINY_SCHNELL = FluxConfig(**{**TINY.__dict__, "guidance_embed": False})
PRESETS: dict[str, FluxConfig] = {"dev": DEV, "schnell": SCHNELL, "tiny": TINY, "tiny_schnell": TINY_SCHNELL}


# ------------------------------------------------------------------------------ patches and positions
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p), features in (c, ph, pw) order (BFL's rearrange)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of `patchify` for an (h, w) patch grid: (B, h*w, C*p*p) -> (B, C, h*p, w*p)."""
    b = tokens.shape[0]
    c = tokens.shape[2] // (p * p)
    return tokens.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(h*w, 3) position ids of an h x w patch grid: (0, row, column), row-major (BFL / diffusers)."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (N, head_dim / 2) in float32, for ids (N, n_axes).

    Axis a rotates its axes_dim[a] / 2 channel pairs by pos_a * theta^(-2k / axes_dim[a]), k = 0..;
    the axes' pairs are concatenated in order (BFL `EmbedND` / `rope`, computed in float64)."""
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, a].double()[:, None] * omega[None])                # (N, dim/2)
    angle = torch.cat(angles, dim=1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x0, x1) of x (B, heads, N, d) by the angles (N, d/2), in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))                                      # (B, heads, N, d/2, 2)
    x0, x1 = pairs.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------ parts
class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer: the time, guidance and pooled-vector embedders."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, dim)
        self.out_layer = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Scale(nn.Module):
    """An RMSNorm gain stored as `scale` (BFL's key), eps 1e-6."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, 1e-6)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries (`query_norm`) and keys (`key_norm`)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = Scale(head_dim)
        self.key_norm = Scale(head_dim)


class Modulation(nn.Module):
    """adaLN from the conditioning vector: lin(SiLU(vec)) cut into (shift, scale, gate) triples: two for a
    double-stream stream (attention, MLP), one for a single-stream block."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = Linear(dim, self.chunks * dim)

    def forward(self, silu_vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(silu_vec).chunk(self.chunks, dim=-1)                     # each (B, D)


class SelfAttention(nn.Module):
    """One stream's fused `qkv`, its `norm` (QKNorm) and output `proj`."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> normalised q, k and v, each (B, heads, N, d)."""
        return _split_qkv(self.qkv(x), self.heads, self.norm)


def _split_qkv(qkv: torch.Tensor, heads: int, norm: QKNorm):
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)   # (B, heads, N, d) each
    return norm.query_norm(q), norm.key_norm(k), v


def _joint_attention(q, k, v, pe) -> torch.Tensor:
    """RoPE on q and k, then softmax attention: (B, heads, N, d) -> (B, N, heads * d)."""
    cos, sin = pe
    return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


class MLP(nn.Sequential):
    """Linear -> GELU (tanh approximation) -> Linear, keys `0` and `2`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights; one attention over [text; image] tokens."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.hidden_size
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(dim, cfg.num_heads, cfg.qkv_bias))
            setattr(self, f"{s}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", MLP(dim, cfg.mlp_hidden))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, silu_vec: torch.Tensor, pe):
        img_mod, txt_mod = self.img_mod(silu_vec), self.txt_mod(silu_vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_mod[0], img_mod[1]))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_mod[0], txt_mod[1]))
        # text first, as the ids (txt_ids; img_ids) the RoPE angles are computed for
        out = _joint_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        n_txt = txt.shape[1]
        img = self._residuals(img, out[:, n_txt:], img_mod, self.img_attn, self.img_norm2, self.img_mlp)
        txt = self._residuals(txt, out[:, :n_txt], txt_mod, self.txt_attn, self.txt_norm2, self.txt_mlp)
        return img, txt

    @staticmethod
    def _residuals(x, attn, mod, attn_m, norm2, mlp):
        """x + gate1 * proj(attn), then + gate2 * MLP(modulated norm2) (fused addcmul each)."""
        x = torch.addcmul(x, mod[2][:, None], attn_m.proj(attn))
        return torch.addcmul(x, mod[5][:, None], mlp(modulate(norm2(x), mod[3], mod[4])))


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP over all tokens: linear1 -> (q, k, v, mlp_in); linear2([attn; GELU(mlp_in)])."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = self.dim = cfg.hidden_size
        self.heads = cfg.num_heads
        self.linear1 = Linear(dim, 3 * dim + cfg.mlp_hidden)
        self.linear2 = Linear(dim + cfg.mlp_hidden, dim)
        self.norm = QKNorm(cfg.head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: torch.Tensor, silu_vec: torch.Tensor, pe) -> torch.Tensor:
        shift, scale, gate = self.modulation(silu_vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.dim, self.linear2.in_features
                                                                                 - self.dim], dim=-1)
        out = _joint_attention(*_split_qkv(qkv, self.heads, self.norm), pe)       # (B, N, D)
        return torch.addcmul(x, gate[:, None], self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], -1)))


class LastLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to the 64 patch features (`final_layer`)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, cfg.output_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------ the model
class Flux(nn.Module):
    """Flux.1: `forward(x, t, context, y, guidance) -> v`, keys of the BFL single file."""

    FREQ_DIM = 256   # width of the sinusoidal time / guidance features

    def __init__(self, config: FluxConfig = DEV):
        super().__init__()
        cfg = self.config = config
        dim = cfg.hidden_size
        self.compute_dtype: torch.dtype | None = None
        self.gradient_checkpointing = cfg.use_checkpoint
        self.img_in = Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(self.FREQ_DIM, dim)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(self.FREQ_DIM, dim) if cfg.guidance_embed else None
        self.txt_in = Linear(cfg.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linears, zero biases, zero adaLN and a zero final projection (DiT): an untrained
        model predicts v = 0. (BFL publishes no initialisation; released weights replace all of it.)"""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight)
        for layer in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def activation_dtype(self) -> torch.dtype:
        """The dtype the network computes in: `compute_dtype`, else its weights' (bf16 for fp8 weights)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        stored = self.img_in.weight.dtype
        return torch.bfloat16 if stored in FP8 else stored

    def _check_inputs(self, x, t, context, y, guidance) -> None:
        cfg = self.config
        check_transformer_inputs(x, t, context, cfg.latent_channels, cfg.patch_size, cfg.context_in_dim)
        b = x.shape[0]
        if y is None or tuple(y.shape) != (b, cfg.vec_in_dim):
            raise ValueError(f"y (pooled CLIP vector) must be ({b}, {cfg.vec_in_dim}), got "
                             f"{None if y is None else tuple(y.shape)}")
        if cfg.guidance_embed and (guidance is None or guidance.shape != (b,)):
            raise ValueError(f"this Flux is guidance-distilled (dev): pass guidance of shape ({b},) (e.g. 3.5), got "
                             f"{None if guidance is None else tuple(guidance.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """x (B, 16, H, W) noisy latent, t (B,) or a scalar: time in [0, 1000] (1000 * sigma), context
        (B, L, context_in_dim) T5 states, y (B, vec_in_dim) pooled CLIP-L, guidance (B,) or a number: the
        distilled guidance scale (dev; ignored by a model without `guidance_in`) -> velocity (B, 16, H, W)
        in x's dtype."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(b) if t.ndim == 0 else t
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device, dtype=torch.float32)
            guidance = guidance.reshape(1).expand(b) if guidance.ndim == 0 else guidance
        if self.guidance_in is None:
            guidance = None
        self._check_inputs(x, t, context, y, guidance)
        cfg, p = self.config, self.config.patch_size
        dtype = self.activation_dtype()
        h, w = x.shape[2] // p, x.shape[3] // p
        img = self.img_in(patchify(x.to(dtype), p))                                       # (B, h*w, D)
        vec = self.time_in(timestep_embedding(t, self.FREQ_DIM).to(dtype))                # (B, D)
        if self.guidance_in is not None:     # BFL's time_factor 1000 on the guidance scale too
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000, self.FREQ_DIM).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(context.to(dtype))                                              # (B, L, D)
        ids = torch.cat([torch.zeros(txt.shape[1], 3, device=x.device), image_ids(h, w, x.device)])
        pe = rope_frequencies(ids, cfg.axes_dim, cfg.theta)                               # (L + h*w, d/2) x 2
        silu_vec = F.silu(vec)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.double_blocks:
            img, txt = checkpoint(block, img, txt, silu_vec, pe, use_reentrant=False) if ckpt else block(img, txt, silu_vec, pe)
        tokens = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            tokens = checkpoint(block, tokens, silu_vec, pe, use_reentrant=False) if ckpt else block(tokens, silu_vec, pe)
        out = self.final_layer(tokens[:, txt.shape[1]:], vec)                             # (B, h*w, 64)
        return unpatchify(out, h, w, p).to(x.dtype)

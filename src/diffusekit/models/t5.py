"""The T5 v1.1 text encoder (T5-XXL of Stable Diffusion 3 / 3.5).

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5), in its v1.1 form (google-research/text-to-text-transfer-transformer,
"T5.1.1": gated-GELU feed-forward, Shazeer 2020, no parameter sharing between embedding and
classifier, no dropout at inference). Encoder only, as SD3 uses it (Esser et al. 2024, Sec. 5.2):

- token embeddings (`shared`), no absolute positions: every layer's attention logits get a learned
  bias per head indexed by a bucketed relative position (`relative_position_bucket`; bidirectional,
  exact up to 8, log-spaced up to 128), computed once by the first block and shared by all;
- pre-norm blocks with RMS norm without mean subtraction or bias (`T5LayerNorm`, Zhang & Sennrich
  2019), self-attention without the 1/sqrt(d) scaling (folded into T5's initialisation), and the
  gated-GELU MLP wo(gelu_tanh(wi_0 x) * wi_1 x);
- a final RMS norm (`encoder.final_layer_norm`).

Attribute names equal transformers' `T5EncoderModel` keys (`shared.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
`encoder.block.N.layer.1.DenseReluDense.wi_0.weight`, ...), which is also the layout inside SD3
single files (`text_encoders.t5xxl.transformer.*`) and of the stand-alone `t5xxl_fp16.safetensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mmdit import RMSNorm
from .cpu_ops import Linear, _compute_in_fp32

__all__ = ["T5Config", "T5EncoderModel", "relative_position_bucket", "t5_config_from_hf", "T5_XXL", "TINY"]


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 v1.1 encoder; the defaults are T5-XXL (google/t5-v1_1-xxl, 4.76B encoder parameters).

    Field names follow transformers' `T5Config`. `max_positions` is no limit of the architecture
    (relative positions have none): it is the token count SD3 feeds (256), used as the default length.
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    max_positions: int = 256

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4 "
                             "(half per direction, half of those exact)")

    @property
    def width(self) -> int:
        """Width of the hidden states (d_model): the name the CLIP configs use."""
        return self.d_model


T5_XXL = T5Config()
TINY = T5Config(vocab_size=400, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of `relative_position` = key position - query position (Mesh TF
    `_relative_position_bucket`): half the buckets per sign; within a half, distances below
    num_buckets/4 get their own bucket, larger ones share log-spaced buckets up to max_distance,
    beyond which all fall into the last."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    n = relative_position.abs()
    exact = half // 2
    # log-spaced bins for n >= exact; clamp(min=1) only keeps log() finite where `exact` wins anyway
    large = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, large)


class T5LayerNorm(RMSNorm):
    """T5's "layer norm": RMS norm with a gain and no bias or mean subtraction, w * x / sqrt(mean(x^2) + eps)
    (the mean taken in fp32; `mmdit.RMSNorm`, the same operation SD3.5 applies to queries and keys)."""


class T5Attention(nn.Module):
    """Multi-head self-attention softmax(Q K^T + bias) V, no 1/sqrt(d) scale, no biases."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.cfg = cfg.num_heads, cfg
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, n: int, device) -> torch.Tensor:
        """(1, heads, n, n) learned bias of every (query, key) pair from its bucketed relative position."""
        pos = torch.arange(n, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)    # (n, n)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]            # (1, heads, n, n)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        dtype = q.dtype
        if _compute_in_fp32(q):
            q, k, v = q.float(), k.float(), v.float()
        # scale=1: T5 has no 1/sqrt(d); the bias (incl. a padding mask) enters as an additive float mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.to(dtype).transpose(1, 2).reshape(b, n, -1))


class _SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU MLP (Shazeer 2020): wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # transformers keeps wo in fp32 under fp16 weights; float32 activations over stored half weights
        # (compute_dtype) stay float32 (the layer upcasts its weight)
        return self.wo(h if h.dtype == torch.float32 else h.to(self.wo.weight.dtype))


class _FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5-XXL's residual stream exceeds the fp16 range; clamp just inside it (transformers does the same)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max - 1000
    return x.clamp(-big, big)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([_SelfAttentionLayer(cfg, has_relative_bias), _FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class _Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """`forward(input_ids, attention_mask=None) -> (B, T, d_model)` last hidden state after the final norm.

    SD3 (diffusers `StableDiffusion3Pipeline`, sd3-ref) calls it without an attention mask, so the
    padding tokens take part in attention; `attention_mask` (B, T) of 1/0 masks them out instead.
    """

    # `encoder.embed_tokens.weight` is transformers' tied alias of `shared.weight`; files carry either or both
    ignored_keys = ("encoder.embed_tokens.weight",)

    def __init__(self, config: T5Config = T5_XXL):
        super().__init__()
        self.config = config
        # None: compute in the weights' dtype; float32 over stored bf16 / fp16 weights kept memory-mapped (each
        # linear layer upcasts its weight when it runs: `unet.linear`), as Flux on a CPU loads T5-XXL
        self.compute_dtype: torch.dtype | None = None
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = _Stack(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """T5's initialisation (Mesh TF, transformers `T5PreTrainedModel._init_weights`, factor 1):
        embeddings N(0, 1); q N(0, (d_model d_kv)^-1/2), k, v N(0, d_model^-1/2), o N(0, (H d_kv)^-1/2);
        wi N(0, d_model^-1/2), wo N(0, d_ff^-1/2); relative bias N(0, d_model^-1/2); norms 1."""
        c = self.config
        std = {"shared": 1.0, ".q.": (c.d_model * c.d_kv) ** -0.5, ".k.": c.d_model ** -0.5,
               ".v.": c.d_model ** -0.5, ".o.": (c.num_heads * c.d_kv) ** -0.5, "wi_": c.d_model ** -0.5,
               ".wo.": c.d_ff ** -0.5, "relative_attention_bias": c.d_model ** -0.5}
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
                continue
            s = next(v for k, v in std.items() if k in name)
            p.normal_(0.0, s, generator=generator)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.shared(input_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an int64/int32 tensor of shape (batch, tokens), got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds                   # (B, T, D)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(x.shape[1], x.device).float()                                 # (1, H, T, T)
        if attention_mask is not None:
            bias = bias + (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


_HF_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance", "layer_norm_epsilon")


def t5_config_from_hf(config: dict) -> T5Config:
    """A transformers `T5Config` (config.json as a dict) -> T5Config; ValueError unless it is a v1.1-style
    encoder (gated-GELU feed-forward)."""
    proj = config.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ValueError(f"feed_forward_proj={proj!r} is not supported: the T5 v1.1 encoders of SD3 use 'gated-gelu'")
    return T5Config(**{k: config[k] for k in _HF_KEYS if k in config})

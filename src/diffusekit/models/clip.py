"""CLIP text encoders (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", section 2.4): a causal pre-LayerNorm Transformer over BPE tokens whose
hidden states condition the UNet through cross-attention, and whose final-norm state at the EOS
token (optionally projected) is the "pooled" text embedding SDXL feeds into its `y` vector.

Two module classes compute the same function but store their weights the way the two checkpoint
families do, so that their attribute names equal checkpoint keys and loading is a key-by-key copy:

- `CLIPTextModel`: the Hugging Face transformers layout (`text_model.encoder.layers.N.self_attn.
  q_proj.weight`, optional `text_projection.weight`). SD1 (`cond_stage_model.transformer.`), SDXL's
  first encoder (`conditioner.embedders.0.transformer.`), diffusers `text_encoder/`, `text_encoder_2/`.
- `OpenCLIPTextModel`: the open_clip layout (`transformer.resblocks.N.attn.in_proj_weight`, a
  (width, proj) `text_projection` matrix). SD2 (`cond_stage_model.model.`), SDXL's second encoder
  (`conditioner.embedders.1.model.`).

Both take `forward(input_ids, *, layer=-1, final_norm=True, need_pooled=True)`. `layer` indexes the
transformer layers python-style, so A1111's "Clip skip N" is `layer=-N` (with `final_norm=True`,
as A1111 does), SD2 is `layer=-2` with the final norm and SDXL `layer=-2` without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import CLIP_EOS_ID


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016, section 2)
    that OpenAI trained CLIP ViT-L/14 with; the real model needs exactly this function."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" is the exact erf form


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer. Defaults: OpenAI CLIP ViT-L/14 text (SD1's encoder)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072  # hidden size of each MLP (transformers: intermediate_size)
    max_positions: int = 77
    act: str = "quick_gelu"  # one of ACTIVATIONS
    projection_dim: int | None = None  # None: no text_projection (pooled output stays `width` wide)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r} is not supported; valid: {sorted(ACTIVATIONS)}")
        for name in ("vocab_size", "width", "layers", "heads", "mlp_dim", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim} must be >= 1 or None")


CLIP_L = CLIPTextConfig()  # SD1: 123,060,480 parameters
CLIP_L_SDXL = CLIP_L  # SDXL's first encoder is the same CLIP ViT-L/14 text model, without projection
OPENCLIP_H = CLIPTextConfig(  # SD2: OpenCLIP ViT-H/14 text; checkpoints carry its text_projection
    width=1024, layers=24, heads=16, mlp_dim=4096, act="gelu", projection_dim=1024)
OPENCLIP_BIGG = CLIPTextConfig(  # SDXL's second encoder: OpenCLIP ViT-bigG/14 text
    width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu", projection_dim=1280)
# tests: CLIP-L's structure at toy width with the real vocab (so the real tokenizer fits); for a
# bigG-like toy use dataclasses.replace(TINY, act="gelu", projection_dim=...)
TINY = CLIPTextConfig(width=32, layers=3, heads=4, mlp_dim=64)


class TextEncoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, width): output of the chosen layer, final norm applied iff asked
    pooled: torch.Tensor | None  # (B, projection_dim or width); None when need_pooled=False


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention with a causal mask (token t sees tokens <= t), as
    CLIP's text transformer uses. q, k, v: (B, T, W) -> (B, T, W)."""
    b, t, w = q.shape
    q, k, v = (z.view(b, t, heads, w // heads).transpose(1, 2) for z in (q, k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale d^-1/2
    return out.transpose(1, 2).reshape(b, t, w)


class _TextEncoder(nn.Module):
    """The forward pass shared by both layouts; subclasses say where their weights live."""

    config: CLIPTextConfig

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, W) rows of the token-embedding table, before positions are added: the
        vectors a textual-inversion embedding replaces (`forward(..., inputs_embeds=)`)."""
        raise NotImplementedError

    def _add_positions(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W) + (T, W)
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, input_ids: torch.Tensor, layer: int) -> None:
        cfg = self.config
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32)
                or input_ids.dim() != 2):
            raise ValueError("input_ids must be an int64/int32 tensor of shape (batch, tokens), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
        if not 1 <= input_ids.shape[1] <= cfg.max_positions:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this encoder takes 1..{cfg.max_positions} "
                             "(split longer prompts into chunks of 75 tokens + BOS + EOS)")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocab (valid: 0..{cfg.vocab_size - 1})")
        if not -cfg.layers <= layer < cfg.layers:
            raise ValueError(f"layer={layer} is out of range for {cfg.layers} layers (valid: {-cfg.layers}..{cfg.layers - 1};"
                             " -1 = last, -2 = penultimate = A1111 'Clip skip 2')")

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        need_pooled: bool = True,
        inputs_embeds: torch.Tensor | None = None,
        eos_id: int = CLIP_EOS_ID,
    ) -> TextEncoderOutput:
        """input_ids (B, T) int -> (hidden (B, T, W), pooled (B, P) or None).

        hidden: output of transformer layer `layer` (-1 last, -2 penultimate, ...), passed through
        the final LayerNorm iff `final_norm`. pooled: the final-normed last-layer state at the first
        position of `eos_id` (the tokenizer's EOS; transformers' `eos_token_id`: a vocabulary with added
        tokens has ids above EOS, so the largest id is not the EOS), then the text projection if the
        model has one. With need_pooled=False the layers after `layer` are
        skipped and pooled is None.

        inputs_embeds: (B, T, W) token embeddings used instead of `token_embeddings(input_ids)`, as
        transformers' `CLIPTextEmbeddings(inputs_embeds=)` (positions are still added); textual
        inversion puts its vectors there. `input_ids` still gives the length and the EOS position."""
        self._check_input(input_ids, layer)
        if inputs_embeds is not None and inputs_embeds.shape != (*input_ids.shape, self.config.width):
            raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected "
                             f"{(*input_ids.shape, self.config.width)} (batch, tokens, width)")
        n = self.config.layers
        stop = layer % n  # index of the requested layer
        blocks = self._blocks()
        x = self._add_positions(self.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds)  # (B, T, W)
        hidden = x
        for i in range(n if need_pooled else stop + 1):
            x = blocks[i](x)
            if i == stop:
                hidden = x
        if final_norm:
            hidden = self._final_norm(hidden)
        pooled = None
        if need_pooled:
            eos = (input_ids == eos_id).int().argmax(dim=-1)  # (B,) first EOS position (0 when none)
            last_at_eos = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, W)
            pooled = self._project(self._final_norm(last_at_eos))  # LayerNorm is per token
        return TextEncoderOutput(hidden, pooled)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random initialization of CLIP / open_clip (`init_parameters`): token embedding N(0, 0.02),
        positions N(0, 0.01), attention inputs N(0, W^-1/2), residual outputs N(0, W^-1/2 (2L)^-1/2),
        MLP input N(0, (2W)^-1/2), projection N(0, W^-1/2); biases 0, LayerNorms 1 and 0."""
        cfg = self.config
        attn_std = cfg.width ** -0.5
        proj_std = attn_std * (2 * cfg.layers) ** -0.5
        fc_std = (2 * cfg.width) ** -0.5
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() == 1:  # every bias (incl. in_proj_bias) -> 0; the only 1-D weights are LayerNorm gains -> 1
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            if "token_embedding" in name:
                std = 0.02
            elif "position" in name:
                std = 0.01
            elif "out_proj" in name or "fc2" in name or "c_proj" in name:
                std = proj_std
            elif "fc1" in name or "c_fc" in name:
                std = fc_std
            else:  # q/k/v or in_proj, text_projection
                std = attn_std
            p.normal_(0.0, std, generator=generator)


# --------------------------------------------------------------------------- transformers layout
class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class _HFAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class _HFMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _HFEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN1(x)), then + mlp(LN2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = _HFAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _HFMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _HFEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(_HFEncoderLayer(cfg) for _ in range(cfg.layers))


class _HFTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = _HFEmbeddings(cfg)
        self.encoder = _HFEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextModel(_TextEncoder):
    """CLIP text encoder with transformers' parameter names (`CLIPTextModel`, or
    `CLIPTextModelWithProjection` when config.projection_dim is set)."""

    # keys real checkpoints carry that hold no weights: SD1 / SDXL single files store a position-id
    # buffer (in some merged models with corrupted float values); positions are always 0..T-1 here
    ignored_keys = ("text_model.embeddings.position_ids",)

    def __init__(self, config: CLIPTextConfig = CLIP_L, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.text_model = _HFTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)
        self.reset_parameters(generator)

    def token_embeddings(self, input_ids):
        return self.text_model.embeddings.token_embedding(input_ids)

    def _add_positions(self, x):
        return x + self.text_model.embeddings.position_embedding.weight[: x.shape[1]]

    def _blocks(self):
        return self.text_model.encoder.layers

    def _final_norm(self, x):
        return self.text_model.final_layer_norm(x)

    def _project(self, pooled):
        return self.text_projection(pooled) if self.config.projection_dim is not None else pooled


# --------------------------------------------------------------------------- open_clip layout
class _OpenCLIPAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters: q, k, v stacked in one (3W, W) in_proj."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, W)
        return self.out_proj(causal_self_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_dim)
        self.c_proj = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = _OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(_TextEncoder):
    """CLIP text encoder with open_clip's parameter names (the text half of `open_clip.CLIP`)."""

    # keys real checkpoints carry that this module does not use: CLIP's contrastive temperature
    # (SD2 and SDXL single files keep it) and the causal mask buffer of old open_clip versions
    ignored_keys = ("logit_scale", "attn_mask")

    def __init__(self, config: CLIPTextConfig = OPENCLIP_H, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = _OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))  # x @ P
        self.reset_parameters(generator)

    def token_embeddings(self, input_ids):
        return self.token_embedding(input_ids)

    def _add_positions(self, x):
        return x + self.positional_embedding[: x.shape[1]]

    def _blocks(self):
        return self.transformer.resblocks

    def _final_norm(self, x):
        return self.ln_final(x)

    def _project(self, pooled):
        return pooled @ self.text_projection if self.config.projection_dim is not None else pooled


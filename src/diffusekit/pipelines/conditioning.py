"""Prompt text -> the UNet's conditioning, as A1111 builds it.

A prompt is split into weighted 75-token chunks (`prompts.tokenize_weighted`), each chunk becomes
BOS + 75 + EOS = 77 ids with the family's padding, goes through every text encoder of the family at
the family's layer (A1111 "Clip skip" moves SD1's layer), gets its emphasis applied
(`prompts.apply_emphasis`, per encoder, per chunk, as A1111 does), and the chunks are concatenated
along the token axis. SDXL concatenates its two encoders along channels (768 + 1280 = 2048) and puts
bigG's pooled output of the first chunk, with sinusoidal embeddings of the size and crop numbers,
into the UNet's `y` vector. Prompt editing (`[from:to:when]`, `[a|b]`) gives one conditioning per
schedule entry; `ConditioningSchedule.at(step)` picks the one in force.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.families import ModelFamily
from ..models.unet import timestep_embedding
from . import prompts as P

# A1111 applies "Clip skip" to SD1-style encoders only; for SD2/SDXL its setting is ignored by default.
CLIP_SKIP_FAMILIES_NOTE = "Clip skip applies to encoders read at their last layer (SD1 and custom models)"


@dataclass
class Conditioning:
    """What one prompt text becomes: context (1, 77*k, C) and, for SDXL, pooled (1, P)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class ConditioningSchedule:
    """Prompt editing: [(end_step, Conditioning)], the entry with step <= end_step is in force."""

    entries: list[tuple[int, Conditioning]]

    def at(self, step: int) -> Conditioning:
        for end, cond in self.entries:
            if step <= end:
                return cond
        return self.entries[-1][1]

    @property
    def chunks(self) -> int:
        return max(c.context.shape[1] for _, c in self.entries) // 77


class TextConditioner:
    """The family's text encoders and tokenizer, used the A1111 way."""

    def __init__(self, family: ModelFamily, encoders: Sequence[torch.nn.Module], tokenizers: Sequence):
        if len(encoders) != len(family.text_encoders):
            raise ValueError(f"family {family.name} has {len(family.text_encoders)} text encoders, got {len(encoders)}")
        if not tokenizers:
            raise ValueError("no tokenizer: a text-conditioned model needs the CLIP BPE vocabulary")
        self.family, self.encoders, self.tokenizer = family, list(encoders), tokenizers[0]

    def _layer(self, spec, clip_skip: int) -> int:
        if spec.layer == -1 and clip_skip > 1:
            return max(-clip_skip, -spec.config.layers)
        return spec.layer

    def chunks(self, text: str) -> list[P.Chunk]:
        return P.tokenize_weighted(text, self.tokenizer.encode)

    @torch.no_grad()
    def encode_chunks(self, chunks: Sequence[P.Chunk], clip_skip: int = 1) -> Conditioning:
        hidden_parts, pooled = [], None
        for spec, enc in zip(self.family.text_encoders, self.encoders):
            device = next(enc.parameters()).device
            ids = torch.tensor([P.build_ids(c, pad=spec.pad_id) for c in chunks], device=device)   # (k, 77)
            weights = torch.tensor([P.build_weights(c) for c in chunks], device=device)           # (k, 77)
            out = enc(ids, layer=self._layer(spec, clip_skip), final_norm=spec.final_norm, need_pooled=spec.pooled)
            # a chunk without emphasis is left exactly as encoded (A1111's rescale is then the identity;
            # skipping it also avoids 0/0 when a final LayerNorm makes the mean exactly 0)
            h = torch.stack([out.hidden[i] if bool((weights[i] == 1).all())
                             else P.apply_emphasis(out.hidden[i:i + 1], weights[i:i + 1])[0] for i in range(len(chunks))])
            hidden_parts.append(h.reshape(1, -1, h.shape[-1]))                                   # (1, 77k, W)
            if spec.pooled:
                pooled = out.pooled[:1]                                                          # first chunk
        return Conditioning(torch.cat(hidden_parts, dim=-1), pooled)

    def schedule(self, prompt: str, steps: int, clip_skip: int = 1, min_chunks: int = 1) -> ConditioningSchedule:
        """Encode every prompt-editing variant of `prompt`, padded to at least `min_chunks` chunks."""
        entries = []
        cache: dict[str, Conditioning] = {}
        for end, text in P.get_schedules(prompt, steps):
            if text not in cache:
                ch = self.chunks(text)
                ch = ch + [P.empty_chunk()] * max(0, min_chunks - len(ch))
                cache[text] = self.encode_chunks(ch, clip_skip)
            entries.append((end, cache[text]))
        return ConditioningSchedule(entries)

    def pair(self, prompt: str, negative: str, steps: int, clip_skip: int = 1):
        """(cond, uncond) schedules with the same number of chunks, so CFG runs them as one batch."""
        n = max(len(self.chunks(t)) for _, t in P.get_schedules(prompt, steps) + P.get_schedules(negative, steps))
        return (self.schedule(prompt, steps, clip_skip, n), self.schedule(negative, steps, clip_skip, n))


def adm_vector(family: ModelFamily, pooled: torch.Tensor, *, original_size: tuple[int, int],
               crop_coords: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
               aesthetic_score: float = 6.0) -> torch.Tensor:
    """SDXL's `y`: pooled text + 256-dim sinusoidal embeddings of each size/crop number (SGM order:
    original (h, w), crop (top, left), target (h, w); the refiner takes an aesthetic score instead of the
    target size). Returns (1, adm_in_channels)."""
    numbers = {"original_size": original_size, "crop_coords": crop_coords,
               "target_size": target_size or original_size, "aesthetic_score": (aesthetic_score,)}
    parts = []
    for name in family.adm_inputs:
        if name == "pooled":
            parts.append(pooled.float())
        else:
            values = torch.tensor([float(v) for v in numbers[name]], device=pooled.device)
            parts.append(timestep_embedding(values, family.size_embed_dim).reshape(1, -1))
    return torch.cat(parts, dim=1)

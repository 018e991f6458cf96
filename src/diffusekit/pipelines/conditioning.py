"""Prompt text -> the UNet's conditioning, as A1111 builds it.

A prompt is split into weighted 75-token chunks (`prompts.tokenize_weighted`), each chunk becomes
BOS + 75 + EOS = 77 ids with the family's padding, goes through every text encoder of the family at
the family's layer (A1111 "Clip skip" moves SD1's layer), gets its emphasis applied
(`prompts.apply_emphasis`, per encoder and chunk position over all prompt-editing variants of the
prompt, as A1111 does), and the chunks are concatenated along the token axis. SDXL concatenates its
two encoders along channels (768 + 1280 = 2048) and puts bigG's pooled output of the first chunk,
with sinusoidal embeddings of the size and crop numbers, into the UNet's `y` vector; an empty SDXL
negative prompt is all zeros, as in A1111 and diffusers. Textual-inversion embeddings (`set_embeddings`)
replace their name's tokens by their vectors in every encoder's token-embedding rows (A1111
`EmbeddingsWithFixes`: after the token lookup, before positions are added). Prompt editing (`[from:to:when]`, `[a|b]`)
gives one conditioning per schedule entry; `ConditioningSchedule.at(step)` picks the one in force.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from ..models.families import ModelFamily
from ..models.unet import timestep_embedding
from . import prompts as P


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


class TextConditioner:
    """The family's text encoders and tokenizer, used the A1111 way.

    Deliberate differences from A1111 (documented, not accidental):
    - cond and uncond are padded to the same number of chunks (A1111's option "pad prompt/negative prompt
      to be same length"; its default instead runs the two halves separately when they differ);
    - "Clip skip" moves only encoders read at their last layer (SD1 and custom models); A1111 ignores it
      for SD2 and (by default, `sdxl_clip_l_skip` off) for SDXL too, so the result is the same.
    """

    def __init__(self, family: ModelFamily, encoders: Sequence[torch.nn.Module], tokenizers: Sequence,
                 embeddings: Mapping[str, Sequence[torch.Tensor]] | None = None):
        if len(encoders) != len(family.text_encoders):
            raise ValueError(f"family {family.name} has {len(family.text_encoders)} text encoders, got {len(encoders)}")
        if not tokenizers:
            raise ValueError("no tokenizer: a text-conditioned model needs the CLIP BPE vocabulary")
        self.family, self.encoders, self.tokenizer = family, list(encoders), tokenizers[0]
        positions = min(spec.config.max_positions for spec in family.text_encoders)
        if positions < 3:
            raise ValueError(f"the text encoders have {positions} positions; a prompt window needs BOS, EOS and "
                             "at least one token")
        tok = self.tokenizer
        # the facts of this tokenizer and these encoders, not CLIP's: ids and window length
        self.window = P.Window(bos=tok.bos_id, eos=tok.eos_id, comma=tok.comma_id, length=positions - 2)
        self.set_embeddings(embeddings or {})

    def set_embeddings(self, embeddings: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """Textual-inversion embeddings the prompts may name: {name: one (N, W_e) tensor per text encoder,
        in the family's encoder order} (`models.embeddings.EmbeddingLibrary.vectors()`)."""
        widths = [spec.config.width for spec in self.family.text_encoders]
        for name, parts in embeddings.items():
            shapes = [tuple(v.shape) for v in parts]
            if len(parts) != len(widths) or any(len(s) != 2 or s[1] != w or s[0] != shapes[0][0]
                                                for s, w in zip(shapes, widths)):
                raise ValueError(f"embedding {name!r} has vectors {shapes}; this model needs one (N, W) tensor "
                                 f"per text encoder with widths {widths}")
        self.embeddings = {name: tuple(parts) for name, parts in embeddings.items()}
        self._matcher = (P.EmbeddingMatcher({n: p[0].shape[0] for n, p in self.embeddings.items()}, self.tokenizer.encode)
                         if self.embeddings else None)

    def embeddings_used(self, texts: Iterable[str]) -> list[str]:
        """Names of the embeddings `texts` use, in order of first use."""
        names: dict[str, None] = {}
        for text in texts:
            for chunk in self.chunks(text):
                names.update((name, None) for _, name in chunk.fixes)
        return list(names)

    @property
    def zeroes_empty_negative(self) -> bool:
        """SGM-conditioned models (SDXL base, inpaint, refiner: the ones with a `y` vector) use all-zero
        context and pooled text for an empty negative prompt (A1111 `force_zero_negative_prompt`, diffusers
        `force_zeros_for_empty_prompt`) instead of encoding ""."""
        return bool(self.family.adm_inputs)

    def _layer(self, spec, clip_skip: int) -> int:
        if spec.layer == -1 and clip_skip > 1:
            return max(-clip_skip, -spec.config.layers)
        return spec.layer

    def chunks(self, text: str) -> list[P.Chunk]:
        w = self.window
        return P.tokenize_weighted(text, self.tokenizer.encode, w.length, w.comma, eos_id=w.eos,
                                   find_embedding=self._matcher)

    def _pad_to(self, chunks: Sequence[P.Chunk], n: int) -> list[P.Chunk]:
        return P.pad_to(chunks, n, chunk_len=self.window.length, eos_id=self.window.eos)

    @torch.no_grad()
    def encode_chunks(self, chunks: Sequence[P.Chunk], clip_skip: int = 1) -> Conditioning:
        """One text's chunks -> its Conditioning (see `encode_batch`)."""
        return self.encode_batch([list(chunks)], clip_skip)[0]

    @torch.no_grad()
    def encode_batch(self, texts: Sequence[Sequence[P.Chunk]], clip_skip: int = 1) -> list[Conditioning]:
        """Several texts' chunk lists -> one Conditioning each, encoded as A1111 encodes one prompt's
        prompt-editing variants: shorter texts are padded with empty chunks, and chunk position i of every
        text goes through each encoder as one batch whose emphasis is normalised together
        (`prompts.apply_emphasis` takes the mean over the whole batch, as A1111's does)."""
        n = max(len(c) for c in texts)
        padded = [self._pad_to(c, n) for c in texts]
        hidden_parts, pooled_parts = [], []
        for e, (spec, enc) in enumerate(zip(self.family.text_encoders, self.encoders)):
            if spec.kind == "t5":                   # SD3's T5 reads the text, not CLIP chunks (conditioning_sd3)
                continue
            device = next(enc.parameters()).device
            per_position = []
            for i in range(n):
                batch = [c[i] for c in padded]
                w = self.window
                ids = torch.tensor([P.build_ids(c, w.bos, w.eos, spec.pad_id) for c in batch], device=device)  # (T, 77)
                weights = torch.tensor([P.build_weights(c) for c in batch], device=device)           # (T, 77)
                out = enc(ids, layer=self._layer(spec, clip_skip), final_norm=spec.final_norm,
                          need_pooled=spec.pooled and i == 0, inputs_embeds=self._inputs_embeds(enc, e, ids, batch),
                          eos_id=w.eos)
                h = out.hidden
                # no emphasis anywhere in the batch: A1111's rescale is the identity; skipping it also avoids
                # 0/0 when a final LayerNorm makes the mean exactly 0
                if not bool((weights == 1).all()):
                    h = P.apply_emphasis(h, weights)
                if spec.context_tokens:                 # a small model trained on the first N states only
                    h = h[:, :spec.context_tokens]
                per_position.append(h)                                                          # (T, 77, W)
                if spec.pooled and i == 0:
                    pooled_parts.append(out.pooled)                                             # (T, P): first chunk
            hidden_parts.append(torch.cat(per_position, dim=1))                                 # (T, 77n, W)
        context = torch.cat(hidden_parts, dim=-1)                                               # (T, 77n, C)
        # SDXL: bigG's pooled vector; SD3: CLIP-L's and CLIP-G's, concatenated (768 + 1280)
        pooled = torch.cat(pooled_parts, dim=-1) if pooled_parts else None
        return [Conditioning(context[j:j + 1], None if pooled is None else pooled[j:j + 1]) for j in range(len(texts))]

    def _encode_texts(self, texts: Sequence[str], padded: Sequence[Sequence[P.Chunk]], clip_skip: int) -> list[Conditioning]:
        """The Conditioning of each text from its (padded) chunks; a family-specific conditioner also reads
        the texts themselves (SD3's T5, `conditioning_sd3.JointTextConditioner`)."""
        return self.encode_batch(padded, clip_skip)

    def _inputs_embeds(self, enc, e: int, ids: torch.Tensor, batch: Sequence[P.Chunk]) -> torch.Tensor | None:
        """Token embeddings (T, 77, W) of `ids` with encoder e's vectors of each chunk's embeddings written
        at their positions (+1 for BOS), or None when no chunk of the batch has one."""
        if not any(c.fixes for c in batch):
            return None
        x = enc.token_embeddings(ids).clone()                                                   # (T, 77, W)
        for row, chunk in enumerate(batch):
            for offset, name in chunk.fixes:
                v = self.embeddings[name][e]                                                    # (N, W)
                x[row, 1 + offset:1 + offset + v.shape[0]] = v.to(x)
        return x

    def schedule(self, prompt: str, steps: int, clip_skip: int = 1, min_chunks: int = 1, *,
                 hires_steps: int | None = None, zero_if_empty: bool = False) -> ConditioningSchedule:
        """Encode every prompt-editing variant of `prompt`, padded to at least `min_chunks` chunks.

        hires_steps: the schedule of a hires-fix second pass of that many steps after a first pass of
        `steps` (A1111 >= 1.8: edits count on from the first pass, see `prompts.get_schedules`).
        zero_if_empty: an all-empty prompt becomes zeros (see `zeroes_empty_negative`)."""
        return self._schedules([prompt], steps, clip_skip, min_chunks, hires_steps, [zero_if_empty])[0]

    def pair(self, prompt: str, negative: str, steps: int, clip_skip: int = 1, *,
             hires_steps: int | None = None) -> tuple[ConditioningSchedule, ConditioningSchedule]:
        """(cond, uncond) schedules with the same number of chunks, so CFG runs them as one batch."""
        return tuple(self._schedules([prompt, negative], steps, clip_skip, 1, hires_steps,
                                     [False, self.zeroes_empty_negative]))

    def _schedules(self, prompts, steps, clip_skip, min_chunks, hires_steps, zero_if_empty):
        plans = [P.get_schedules(p, steps, hires_steps=hires_steps) for p in prompts]
        chunks = {text: self.chunks(text) for plan in plans for _, text in plan}      # tokenize each text once
        n = max([min_chunks] + [len(c) for c in chunks.values()])
        out = []
        for plan, zero in zip(plans, zero_if_empty):
            texts = list(dict.fromkeys(text for _, text in plan))                     # distinct, in order
            padded = [self._pad_to(chunks[t], n) for t in texts]
            encoded = dict(zip(texts, self._encode_texts(texts, padded, clip_skip)))
            if zero and all(t == "" for t in texts):
                encoded = {t: Conditioning(torch.zeros_like(c.context),
                                           None if c.pooled is None else torch.zeros_like(c.pooled))
                           for t, c in encoded.items()}
            out.append(ConditioningSchedule([(end, encoded[text]) for end, text in plan]))
        return out


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

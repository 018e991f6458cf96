"""Prompt text -> the joint context and pooled vector of an MMDiT (SD3 / SD3.5, and small flow models).

SD3 (Esser et al. 2024, Sec. 5.2; sd3-ref `sd3_infer.py`, diffusers `StableDiffusion3Pipeline.encode_prompt`):
- CLIP-L and CLIP-G read 77-token windows at their penultimate layer without the final norm; their
  states are concatenated along channels (768 + 1280 = 2048) and zero-padded to the MMDiT's context
  width (T5's 4096); the pooled vector is both projected EOS states, concatenated (768 + 1280 = 2048);
- T5-XXL reads the prompt as one window of 256 tokens (pieces cut to 255, `</s>`, `<pad>`), no attention
  mask, its last layer after the final norm; without a T5 (SD3 allows it) that block is 256 zero tokens;
- the context is [CLIP tokens; T5 tokens] along the token axis: 77 + 256 = 333 tokens of 4096.
A1111 prompt syntax works as for the other families: the CLIP part is chunked and weighted by
`TextConditioner` (a prompt of more than 75 tokens gives 77 k CLIP tokens, where diffusers truncates);
T5 gets the same emphasis weights on its tokens (each emphasis segment tokenized on its own, the text
of a plain prompt as a whole, so a plain prompt gives diffusers' ids), normalised as A1111 does.
Textual-inversion embeddings act on the CLIP encoders only. An empty negative prompt is encoded, not
zeroed (diffusers and sd3-ref encode ""). A family without a T5 spec (a small flow model such as
shapes-flow) uses the CLIP part alone, padded to the MMDiT's context width.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import prompts as P
from .conditioning import Conditioning, TextConditioner


class JointTextConditioner(TextConditioner):
    """`TextConditioner` for MMDiT families: CLIP chunks as usual, then SD3's T5 block appended."""

    def __init__(self, family, encoders, tokenizers, embeddings=None):
        super().__init__(family, encoders, tokenizers, embeddings)
        self.context_dim = family.unet.context_dim
        self.t5 = [(i, spec) for i, spec in enumerate(family.text_encoders) if spec.kind == "t5"]
        self.tokenizers = list(tokenizers)
        clip_width = sum(s.config.width for s in family.text_encoders if s.kind != "t5")
        if clip_width > self.context_dim:
            raise ValueError(f"the CLIP states are {clip_width} wide but the MMDiT's context is {self.context_dim}")

    def _encode_texts(self, texts: Sequence[str], padded, clip_skip: int) -> list[Conditioning]:
        clip = self.encode_batch(padded, clip_skip)
        extra = [self._t5_states(i, spec, texts) for i, spec in self.t5]                     # (T, 256, 4096) each
        out = []
        for j, c in enumerate(clip):
            ctx = F.pad(c.context, (0, self.context_dim - c.context.shape[-1]))                # (1, 77n, 4096)
            out.append(Conditioning(torch.cat([ctx] + [e[j:j + 1].to(ctx) for e in extra], dim=1), c.pooled))
        return out

    @torch.no_grad()
    def _t5_states(self, i: int, spec, texts: Sequence[str]) -> torch.Tensor:
        """(T, max_length, width) last-layer T5 states of each text, or zeros without a T5 encoder."""
        enc, tok = self.encoders[i], self.tokenizers[i]
        if enc is None or tok is None:
            return torch.zeros(len(texts), spec.max_length, self.context_dim)    # diffusers: joint_attention_dim wide
        device = next(enc.parameters()).device
        rows, weights = [], []
        for text in texts:
            pieces, w = [], []
            for segment, weight in P.parse_emphasis(text):
                if (segment, weight) == P.BREAK:      # BREAK has no meaning in one T5 window
                    continue
                ids = tok.encode(segment)
                pieces += ids
                w += [weight] * len(ids)
            ids = tok.ids(pieces, spec.max_length)
            rows.append(ids)
            weights.append(w[: spec.max_length - 1] + [1.0] * (spec.max_length - min(len(w), spec.max_length - 1)))
        ids = torch.tensor(rows, device=device)
        w = torch.tensor(weights, device=device)
        h = enc(ids)                                                                          # (T, 256, W)
        return h if bool((w == 1).all()) else P.apply_emphasis(h, w)

"""Prompt text -> Flux.1's context and pooled vector.

BFL `flux/modules/conditioner.py` (`HFEmbedder`) and diffusers `FluxPipeline.encode_prompt`:
- T5-XXL reads the prompt as one window of `max_length` tokens (dev 512, schnell 256: pieces cut to
  max_length - 1, `</s>`, `<pad>`), no attention mask, its last layer after the final norm: that is the
  whole context (B, 512, 4096); CLIP contributes no context tokens;
- CLIP-L reads a 77-token window and gives its pooled output, the final-normed state at the first EOS,
  without projection (768): the transformer's `y`;
- the text position ids are zeros (the model builds them: `flux.Flux.forward`).
A1111 prompt syntax works as for SD3 (`conditioning_sd3.JointTextConditioner`): emphasis weights on the T5
tokens, normalised as A1111 does; the pooled vector is the first CLIP chunk's (a prompt of more than 75
CLIP tokens is cut there, as diffusers truncates). An empty negative prompt (true CFG) is encoded, as
diffusers encodes it.
"""
from __future__ import annotations

from typing import Sequence

from .conditioning import Conditioning, TextConditioner
from .conditioning_sd3 import JointTextConditioner


class FluxTextConditioner(JointTextConditioner):
    """CLIP-L's pooled vector + T5's states as the context."""

    def __init__(self, family, encoders, tokenizers, embeddings=None):
        TextConditioner.__init__(self, family, encoders, tokenizers, embeddings)
        self.context_dim = family.unet.context_in_dim
        self.t5 = [(i, spec) for i, spec in enumerate(family.text_encoders) if spec.kind == "t5"]
        self.tokenizers = list(tokenizers)
        if len(self.t5) != 1 or any(encoders[i] is None or tokenizers[i] is None for i, _ in self.t5):
            raise ValueError(f"family {family.name!r}: Flux needs its T5 encoder and tokenizer (the whole context)")

    def _encode_texts(self, texts: Sequence[str], padded, clip_skip: int) -> list[Conditioning]:
        clip = self.encode_batch(padded, clip_skip)                                      # pooled (1, 768) each
        (i, spec), = self.t5
        t5 = self._t5_states(i, spec, texts)                                             # (T, 512, 4096)
        return [Conditioning(t5[j:j + 1], c.pooled) for j, c in enumerate(clip)]

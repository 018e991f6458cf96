"""The SentencePiece (Unigram) tokenizer of T5, through Hugging Face `tokenizers`.

T5 tokenizes with a SentencePiece Unigram model (Kudo 2018, "Subword Regularization"; Kudo &
Richardson 2018, "SentencePiece"): NFKC-style normalisation from a precompiled character map,
whitespace runs collapsed, "▁" marking word starts, the most probable segmentation by Viterbi over
the piece log-probabilities, and `</s>` (id 1) appended; `<pad>` is 0, `<unk>` 2, and the 100
sentinels `<extra_id_N>` are the last ids.

What "T5's tokenization" is, exactly: the one transformers (>= 5) defines in `T5Tokenizer` and
diffusers uses. From a `tokenizer.json` it keeps only the data, the Unigram pieces with their scores,
the unk id and the precompiled character map of the normaliser, and rebuilds the pipeline around it:
normaliser = that map (none without one), pre-tokeniser = split on whitespace, then "▁" before every
word (Metaspace, prepend "always"); any other normaliser / pre-tokeniser in the file is ignored.
`T5Tokenizer.from_file` does the same, so a file written by another converter tokenizes alike.

Why `tokenizers` and not `sentencepiece`: both are well kept, but `tokenizers` reads `tokenizer.json`,
the file every diffusers SD3 / SD3.5 folder ships in `tokenizer_3/` (and ComfyUI ships for T5), and
it *is* the engine of transformers' T5 tokenizer (transformers >= 5 has no other), so the ids are
those of the reference pipeline by construction rather than by a second implementation agreeing;
`sentencepiece` reads only `spiece.model` and would add protobuf-based conversion to reach the same
place. A Unigram Viterbi with the precompiled normaliser is no "short readable loop" (unlike CLIP's
BPE in `tokenizer.py`), so it is not rewritten here. `tokenizers` is an optional dependency (the `sd3`
extra; transformers installs it anyway); it is imported only when a T5 tokenizer is loaded.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["T5Tokenizer", "require_tokenizers"]


def require_tokenizers():
    """The `tokenizers` module, or an ImportError that says how to get it."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the T5 tokenizer of SD3 needs the `tokenizers` package: pip install 'diffusekit[sd3]' "
                          "(or pip install tokenizers)") from None
    return tokenizers


def _charsmap(normalizer) -> bytes | None:
    """The precompiled SentencePiece character map inside a tokenizer.json normaliser, if any."""
    if not normalizer:
        return None
    for n in normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
    return None


def _t5_pipeline(data: dict):
    """A `tokenizers.Tokenizer` with T5's pipeline (see the module doc) over the data of a tokenizer.json."""
    tk = require_tokenizers()
    model = data["model"]
    tok = tk.Tokenizer(tk.models.Unigram([(str(p), float(s)) for p, s in model["vocab"]],
                                         unk_id=model.get("unk_id", 2), byte_fallback=False))
    charsmap = _charsmap(data.get("normalizer"))
    if charsmap is not None:
        tok.normalizer = tk.normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.WhitespaceSplit(),
        tk.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    specials = [a["content"] for a in data.get("added_tokens", []) if a.get("special")]
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


class T5Tokenizer:
    """Text -> T5 ids. `encode(text)` gives the pieces' ids without `</s>`; `__call__(texts, max_length)`
    gives (B, max_length) ids as SD3 feeds T5: the pieces cut to max_length - 1, `</s>`, then `<pad>`."""

    def __init__(self, tokenizer, *, pad_id: int | None = None, eos_id: int | None = None):
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.pad_id = vocab.get("<pad>", 0) if pad_id is None else pad_id
        self.eos_id = vocab.get("</s>", 1) if eos_id is None else eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "T5Tokenizer":
        """From a `tokenizer.json` file, or a folder holding one (a diffusers `tokenizer_3/`)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            hint = (" (it has spiece.model only: convert it once with transformers, "
                    "T5TokenizerFast.from_pretrained(folder).save_pretrained(folder), which writes tokenizer.json)"
                    if (path / "spiece.model").is_file() else "")
            raise FileNotFoundError(f"no T5 tokenizer.json at {file}{hint}")
        data = json.loads(file.read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
            raise ValueError(f"{file} is not a SentencePiece Unigram tokenizer (model type {model.get('type')!r}); "
                             "T5 uses Unigram")
        return cls(_t5_pipeline(data))

    def encode(self, text: str) -> list[int]:
        """The ids of `text`'s pieces, no `</s>` (special strings such as `</s>` in the text are matched)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def ids(self, pieces: Sequence[int], max_length: int = 256) -> list[int]:
        """pieces[:max_length - 1] + `</s>`, padded with `<pad>` to max_length (transformers' padding="max_length",
        truncation=True)."""
        body = list(pieces)[: max_length - 1] + [self.eos_id]
        return body + [self.pad_id] * (max_length - len(body))

    def __call__(self, texts: str | Sequence[str], max_length: int = 256) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([self.ids(self.encode(t), max_length) for t in texts], dtype=torch.long)

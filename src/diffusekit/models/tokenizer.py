"""CLIP byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; byte-level BPE from Radford et al. 2019, GPT-2).

Why hand-written: the tokenizer is about 200 lines of plain Python over the `regex` package (a
runtime dependency: the CLIP split pattern needs the Unicode classes `\\p{L}` / `\\p{N}` that the
stdlib `re` lacks). The one library that reproduces transformers' `CLIPTokenizer` exactly is Hugging
Face `tokenizers` (it *is* that tokenizer's engine), but it is a compiled package that pulls in
`huggingface_hub` for a job a short, readable loop does, and it cannot express the OpenAI-style text
cleaning as an option. `ftfy` is never required. The output equals transformers' `CLIPTokenizer`
(transformers >= 5, and `CLIPTokenizerFast` in 4.x, which diffusers uses) id for id; the tests check
this on a corpus of awkward prompts (unicode, emoji, CJK, accents, A1111 emphasis syntax, html
entities, very long text) and on every code point assigned in Python's Unicode database (code points
assigned only in newer Unicode versions can differ, as the libraries' Unicode tables differ).

The steps, in the order transformers applies them:
1. the exact strings `<|startoftext|>` / `<|endoftext|>` in the raw text become their ids;
2. each remaining segment is normalized: Unicode NFC, every whitespace run -> one space, lowercase
   (character by character, like Rust's `char::to_lowercase`: no final-sigma rule);
3. split into words by the CLIP pattern (contractions, letter runs, single digits, punctuation runs;
   whitespace is dropped), then by GPT-2's byte-level pattern (this only splits a lowercased
   special string such as `<|ENDOFTEXT|>` into `<|`, `endoftext`, `|>`);
4. each word's UTF-8 bytes map to printable characters (`bytes_to_unicode`), its last symbol gets the
   end-of-word marker `</w>`, and BPE merges the lowest-ranked adjacent pair until none applies.
With `fix_text=True` the text is first cleaned as OpenAI CLIP / open_clip do (`ftfy.fix_text` when
ftfy is importable, html unescape twice, strip); transformers 4's slow tokenizer with ftfy installed
(the A1111 environment) behaves close to this.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# Number of merges used by CLIP: vocab 49408 = 256 bytes + 256 bytes with </w> + merges + 2 specials.
CLIP_NUM_MERGES = 49408 - 256 - 256 - 2  # 48894

# The CLIP split pattern (OpenAI CLIP `simple_tokenizer.py`, identical in transformers).
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# transformers then splits every piece again with GPT-2's byte-level pattern; that is the identity on
# all CLIP pieces except a lowercased special string such as "<|endoftext|>" -> "<|", "endoftext", "|>"
_GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")
_SPECIALS = regex.compile(regex.escape(BOS_TOKEN) + "|" + regex.escape(EOS_TOKEN))


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table: the 188 printable Latin-1 bytes map to
    themselves, the other 68 bytes to the code points 256, 257, ... in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order: printable bytes, then the rest (the CLIP vocab's first 256 ids)


class CLIPTokenizer:
    """CLIP byte-level BPE: `encode` gives token ids without BOS/EOS (the pipeline chunks long
    prompts into 75-token pieces itself); calling the tokenizer gives the padded (B, 77) batch.

    vocab: token string -> id (49408 entries for CLIP); merges: BPE merge pairs, best rank first.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        fix_text: bool = False,
        cache_size: int = 65536,
    ):
        for special in (BOS_TOKEN, EOS_TOKEN):
            if special not in vocab:
                raise ValueError(f"vocab lacks the special token {special!r}; a CLIP vocab has both "
                                 f"{BOS_TOKEN!r} and {EOS_TOKEN!r}")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        odd = next((pair for pair in self.merge_ranks if len(pair) != 2), None)
        if odd is not None:
            raise ValueError(f"merge {odd!r} is not a pair of symbols; pass merges as (left, right) tuples")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.fix_text = fix_text
        self.cache_size = cache_size
        self._cache: dict[str, tuple[int, ...]] = {}  # word -> ids; per instance, bounded

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> CLIPTokenizer:
        """Hugging Face layout: `vocab.json` (token -> id) and `merges.txt` ("#version" line, then
        one "a b" pair per line), e.g. the `tokenizer/` folder of a diffusers model."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        merges = []
        for line in Path(merges_txt).read_text(encoding="utf-8").split("\n"):
            if not line or line.startswith("#version"):
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"{merges_txt}: merge line {line!r} is not two space-separated symbols")
            merges.append((pair[0], pair[1]))
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_bpe_gz(cls, path: str | Path | None = None, **kwargs) -> CLIPTokenizer:
        """OpenAI CLIP / open_clip layout: `bpe_simple_vocab_16e6.txt.gz` holds only merges (line 0
        is a header; CLIP uses lines 1..48894). The vocab is the 256 byte symbols, the same with
        `</w>`, one token per merge, then BOS and EOS. `path=None` uses `find_bundled_bpe()`."""
        if path is None:
            path = find_bundled_bpe()
            if path is None:
                raise FileNotFoundError(
                    "no CLIP BPE file given and none found: pass the path of bpe_simple_vocab_16e6.txt.gz, "
                    "use CLIPTokenizer.from_files(vocab.json, merges.txt), or install open_clip_torch")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
        if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: expected {CLIP_NUM_MERGES} merge lines of two symbols after the header")
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        return cls({t: i for i, t in enumerate(tokens)}, merges, **kwargs)

    # ---------------------------------------------------------------- properties
    @property
    def bos_id(self) -> int:
        return self.encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ---------------------------------------------------------------- the algorithm
    def normalize(self, text: str) -> str:
        """Steps 2 (and the optional OpenAI cleaning): NFC, whitespace runs -> " ", lowercase."""
        if self.fix_text:
            text = _openai_basic_clean(text)
        text = unicodedata.normalize("NFC", text)
        text = _WHITESPACE.sub(" ", text)
        # per character: str.lower() on the whole string would apply the final-sigma rule, which
        # the Rust normalizer behind transformers does not
        return "".join(c.lower() for c in text)

    def bpe(self, word: str) -> list[str]:
        """Byte-pair merges of one pre-tokenized word (Sennrich et al. 2016): start from its byte
        symbols with `</w>` on the last, repeatedly merge every occurrence (left to right) of the
        adjacent pair with the lowest merge rank, stop when no adjacent pair is a known merge."""
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        ranks = self.merge_ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self.encoder[s] for piece in _GPT2_PATTERN.findall(word) for s in self.bpe(piece))
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}")
        ids: list[int] = []
        start = 0
        # step 1: exact special-token strings in the raw text (matched before normalization, as
        # transformers' added tokens are)
        for match in [*_SPECIALS.finditer(text), None]:
            segment = text[start : match.start() if match else len(text)]
            for word in _WORD_PATTERN.findall(self.normalize(segment)):
                ids.extend(self._word_ids(word))
            if match is not None:
                ids.append(self.encoder[match.group()])
                start = match.end()
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: bytes back to UTF-8 (invalid sequences become U+FFFD), `</w>` -> space,
        stripped; BOS/EOS are dropped unless `skip_special_tokens=False`."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces = []
        for i in ids:
            if i not in self.decoder:
                raise ValueError(f"token id {i} is not in the vocab (valid: 0..{self.vocab_size - 1})")
            if skip_special_tokens and i in (self.bos_id, self.eos_id):
                continue
            pieces.append(self.decoder[i])
        raw = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int = 77,
        pad_id: int = 49407,
        truncate: bool = True,
    ) -> torch.Tensor:
        """(B, max_length) int64 ids: BOS, the tokens, EOS, then `pad_id`. SD1 / CLIP-L pads with
        EOS (49407, the default); OpenCLIP tokenizers (SD2, SDXL's second encoder) pad with 0.
        Too-long texts keep their first max_length - 2 tokens (EOS stays last) when `truncate`, else
        raise ValueError."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS; use >= 2 (CLIP: 77)")
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id={pad_id} is not in the vocab (valid: 0..{self.vocab_size - 1}; "
                             f"SD1 pads with {self.eos_id}, OpenCLIP with 0)")
        out = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length - 2:
                if not truncate:
                    raise ValueError(f"text {row} has {len(ids)} tokens, more than max_length - 2 = "
                                     f"{max_length - 2}; pass truncate=True or split it into chunks")
                ids = ids[: max_length - 2]
            row_ids = [self.bos_id, *ids, self.eos_id]
            out[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        return out


BUNDLED_BPE = Path(__file__).resolve().parents[1] / "assets" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"


def find_bundled_bpe() -> Path | None:
    """Path of CLIP's `bpe_simple_vocab_16e6.txt.gz`: the copy diffusekit ships (assets/tokenizer), else
    the one inside an installed `open_clip` package, found through its import spec without importing
    it (open_clip imports heavy optional modules); None when neither exists."""
    if BUNDLED_BPE.is_file():
        return BUNDLED_BPE
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def _openai_basic_clean(text: str) -> str:
    """OpenAI CLIP's `basic_clean`: ftfy.fix_text (only when ftfy is importable), html unescape
    twice (for doubly escaped entities such as `&amp;amp;`), strip."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import regex
import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI CLIP's vocabulary (bpe_simple_vocab_16e6): BOS, EOS and ",</w>" (byte 44 is the 12th printable
# symbol: 256 + 11). Defaults only; a tokenizer's own ids are `bos_id`, `eos_id`, `comma_id`.
CLIP_BOS_ID, CLIP_EOS_ID, CLIP_COMMA_ID = 49406, 49407, 267
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


def _alternation(tokens) -> regex.Pattern:
    """A pattern matching any of `tokens`, the longest first where several start at one place (the
    leftmost-longest match of the Aho-Corasick automaton transformers' added vocabulary uses)."""
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


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
        added_tokens: Mapping[str, int] | None = None,
        special_tokens: Mapping[str, int] | None = None,
        fix_text: bool = False,
        cache_size: int = 65536,
    ):
        for special in (BOS_TOKEN, EOS_TOKEN):
            if special not in vocab and special not in (special_tokens or {}):
                raise ValueError(f"vocab lacks the special token {special!r}; a CLIP vocab has both "
                                 f"{BOS_TOKEN!r} and {EOS_TOKEN!r}")
        self.encoder = {**vocab, **(added_tokens or {}), **(special_tokens or {})}
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
        # transformers' added tokens: special ones match the raw text, the others the normalized text
        self.special_tokens = {BOS_TOKEN: self.encoder[BOS_TOKEN], EOS_TOKEN: self.encoder[EOS_TOKEN],
                               **(special_tokens or {})}
        self.added_tokens = {self.normalize(t): i for t, i in (added_tokens or {}).items()}
        self._specials = _alternation(self.special_tokens)
        self._added = _alternation(self.added_tokens) if self.added_tokens else None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> CLIPTokenizer:
        """Hugging Face layout: `vocab.json` (token -> id) and `merges.txt` ("#version" line, then
        one "a b" pair per line), e.g. the `tokenizer/` folder of a diffusers model."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        merges = _read_merges(Path(merges_txt))
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> CLIPTokenizer:
        """A tokenizer folder as transformers writes it (a diffusers model's `tokenizer/`): `tokenizer.json`
        (transformers >= 5 saves only that), or `vocab.json` + `merges.txt` with the added tokens of
        `added_tokens.json` / `tokenizer_config.json` (`added_tokens_decoder`). Added tokens (textual
        inversion training adds "<cat-toy>" after id 49407) are matched as transformers does: special
        ones in the raw text, the others in the normalized (lowercased) text, also inside words."""
        folder = Path(folder)
        found = read_tokenizer_files(folder)
        if found is None:
            raise FileNotFoundError(f"{folder}: no tokenizer.json and no vocab.json + merges.txt")
        vocab, merges, added, special = found
        return cls(vocab, merges, added_tokens=added, special_tokens=special, **kwargs)

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
    def comma_id(self) -> int | None:
        """The id of a lone "," (A1111's comma backtracking looks for it); None if the vocab has none."""
        ids = self.encode(",")
        return ids[0] if len(ids) == 1 else None

    @property
    def vocab_size(self) -> int:
        """Rows of the token-embedding table this vocabulary needs: 1 + its largest id."""
        return max(self.encoder.values()) + 1

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
        # step 1: exact special-token strings in the raw text (matched before normalization, as
        # transformers' special added tokens are); then the other added tokens in the normalized text
        for segment, special in _split(self._specials, text):
            if special is not None:
                ids.append(self.special_tokens[special])
                continue
            for piece, added in _split(self._added, self.normalize(segment)):
                if added is not None:
                    ids.append(self.added_tokens[added])
                    continue
                for word in _WORD_PATTERN.findall(piece):
                    ids.extend(self._word_ids(word))
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
        pad_id: int | None = None,
        truncate: bool = True,
    ) -> torch.Tensor:
        """(B, max_length) int64 ids: BOS, the tokens, EOS, then `pad_id`. SD1 / CLIP-L pads with
        EOS (None, the default); OpenCLIP tokenizers (SD2, SDXL's second encoder) pad with 0.
        Too-long texts keep their first max_length - 2 tokens (EOS stays last) when `truncate`, else
        raise ValueError."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS; use >= 2 (CLIP: 77)")
        pad_id = self.eos_id if pad_id is None else pad_id
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


def read_tokenizer_files(folder: Path):
    """(vocab, merges, added tokens, special added tokens) of a transformers tokenizer folder, None when
    it holds neither tokenizer.json nor vocab.json + merges.txt. Added tokens are {content: id}."""
    def load(name):
        return json.loads((folder / name).read_text(encoding="utf-8"))

    entries = []                               # [{content, id, special, normalized}] of the added tokens
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = load("vocab.json")
        merges = _read_merges(folder / "merges.txt")
        config = load("tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        for i, e in (config.get("added_tokens_decoder") or {}).items():
            entries.append({**e, "id": int(i)})
        if (folder / "added_tokens.json").is_file():
            known = {e["content"] for e in entries}
            entries += [{"content": t, "id": i, "special": False} for t, i in load("added_tokens.json").items()
                        if t not in known]
    elif (folder / "tokenizer.json").is_file():
        data = load("tokenizer.json")
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{folder / 'tokenizer.json'} is a {model.get('type')!r} tokenizer, not CLIP's BPE")
        vocab = dict(model["vocab"])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        entries = list(data.get("added_tokens") or [])
    else:
        return None
    added, special = {}, {}
    for e in entries:
        if e["content"] in vocab and vocab[e["content"]] == e["id"] and e["content"] not in (BOS_TOKEN, EOS_TOKEN):
            if not e.get("special"):
                continue                       # already an ordinary BPE token of the vocab
        raw = e.get("special") or e.get("normalized") is False
        (special if raw else added)[e["content"]] = int(e["id"])
    return vocab, merges, added, special


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: a "#version" line, then one "a b" pair per line."""
    merges = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("#version"):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}: merge line {line!r} is not two space-separated symbols")
        merges.append((pair[0], pair[1]))
    return merges


def _split(pattern: regex.Pattern | None, text: str):
    """(text, None) for each stretch between matches of `pattern` and (token, token) for each match,
    in order; empty stretches are left out."""
    start = 0
    for m in (pattern.finditer(text) if pattern is not None else ()):
        if m.start() > start:
            yield text[start:m.start()], None
        yield m.group(), m.group()
        start = m.end()
    if start < len(text):
        yield text[start:], None


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

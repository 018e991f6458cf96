"""A1111 prompt syntax: emphasis weights, prompt editing schedules, 75-token chunks.

Reproduces the prompt handling of AUTOMATIC1111 stable-diffusion-webui v1.10, so that a prompt
written for A1111 conditions the model the same way here:

* `parse_emphasis` - `(x)`, `(x:1.3)`, `[x]`, escapes, `BREAK` (modules/prompt_parser.py,
  `parse_prompt_attention`).
* `get_schedules` / `prompt_at_step` - prompt editing `[from:to:when]` and alternation `[a|b]`
  (modules/prompt_parser.py, `get_learned_conditioning_prompt_schedules`, whose lark grammar is
  re-implemented here as a small recursive-descent parser).
* `tokenize_weighted`, `build_ids`, `build_weights`, `pad_chunks` - 75-token chunks with per-token
  weights and comma backtracking (modules/sd_hijack_clip.py, `tokenize_line`).
* `apply_emphasis` - the "Original" emphasis: scale each token's hidden state by its weight, then
  restore the mean (modules/sd_emphasis.py).

* textual-inversion embeddings: `tokenize_weighted(find_embedding=)` puts an embedding's N vectors
  in place of its name's tokens (A1111 `tokenize_line` with `EmbeddingDatabase.find_embedding_at_position`);
  `Chunk.fixes` says where, `conditioning.TextConditioner` writes the vectors.

The "AND" composition split is not handled here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..models.clip import CLIP_L
from ..models.tokenizer import CLIP_BOS_ID, CLIP_COMMA_ID, CLIP_EOS_ID

__all__ = [
    "BREAK",
    "Chunk",
    "Window",
    "EmbeddingMatcher",
    "apply_emphasis",
    "build_ids",
    "build_weights",
    "empty_chunk",
    "get_schedules",
    "pad_chunks",
    "pad_to",
    "parse_emphasis",
    "prompt_at_step",
    "tokenize_weighted",
]

# The defaults below are OpenAI CLIP's vocabulary and window (what SD 1.x / 2.x / XL use); the pipeline
# passes the facts of its own tokenizer and text encoders instead (`conditioning.TextConditioner.window`).
BOS_ID, EOS_ID, COMMA_ID = CLIP_BOS_ID, CLIP_EOS_ID, CLIP_COMMA_ID
CHUNK_LEN = CLIP_L.max_positions - 2        # tokens of a window between BOS and EOS: 75

BREAK = ("BREAK", -1.0)
"""The marker `parse_emphasis` emits for the keyword BREAK; A1111 writes it ["BREAK", -1]."""

ROUND_MULTIPLIER = 1.1  # `(x)` multiplies attention by 1.1, `[x]` divides by 1.1

# ---------------------------------------------------------------------------------------- emphasis

# One token of emphasis syntax per match, in A1111's order of precedence.
_EMPHASIS_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]                 # escaped bracket or backslash: a literal character
    | \\                         # any other backslash: dropped
    | \( | \[                    # openers
    | :\s*([+-]?[.\d]+)\s*\)     # ':1.3)' closes a round bracket with an explicit weight
    | \) | \]                    # closers
    | [^\\()\[\]:]+              # plain text
    | :                          # a colon that closes nothing is text
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split `text` into (segment, weight) pairs by A1111's emphasis syntax.

    `(x)` multiplies the weight of x by 1.1 (nesting multiplies), `(x:1.3)` by 1.3, `[x]` divides by
    1.1; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; brackets left open are closed at the
    end of the text. The keyword BREAK (a separate word) becomes the marker `("BREAK", -1.0)`.
    Adjacent segments of equal weight are merged, so `'(a)(b)'` gives `[('ab', 1.1)]`.

    Like A1111, a BREAK inside brackets has its -1 multiplied by the bracket and is then no longer
    a marker (`tokenize_weighted` treats it as the word "break").
    Source: A1111 modules/prompt_parser.py, `parse_prompt_attention`.
    """
    res: list[list] = []  # [segment, weight] pairs, mutable while brackets close
    round_open: list[int] = []  # index into res where each open '(' started
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(text):
        tok, weight = match.group(0), match.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(
                    f"emphasis weight {weight!r} in {tok!r} is not a number; write it like (word:1.2)") from None
            multiply_from(round_open.pop(), factor)
        elif tok == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif tok == "]" and square_open:
            multiply_from(square_open.pop(), 1 / ROUND_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(tok)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    # unbalanced brackets close at the end of the prompt
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, 1 / ROUND_MULTIPLIER)

    if not res:
        res = [["", 1.0]]

    merged: list[list] = [res[0]]
    for seg, w in res[1:]:
        if w == merged[-1][1]:  # exact equality, as A1111
            merged[-1][0] += seg
        else:
            merged.append([seg, w])
    return [(seg, float(w)) for seg, w in merged]


# ------------------------------------------------------------------------------ prompt editing

# lark's common.SIGNED_NUMBER: optional sign, INT, DECIMAL ("1.", "1.5", ".5"), optional exponent.
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
# The grammar's `plain` terminal: anything but \ [ ] ( ) : |, or a backslash and one character
# ('.' does not match a newline, as in lark).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHITESPACE = re.compile(r"\s+")


@dataclass
class _Scheduled:
    """`[before:after:when]`; `before` is None for `[after:when]`. `when` is set by the step pass."""

    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    """`[a|b|...]`: option (step - 1) % n at 1-based step `step`."""

    options: list[list]


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar (lark, v1.10):

        start:      (prompt | /[][():]/+)*
        prompt:     (emphasized | scheduled | alternate | plain | WHITESPACE)*
        emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
        scheduled:  "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
        alternate:  "[" prompt ("|" [prompt])+ "]"

    A sequence is a list of str and `_Scheduled` / `_Alternate` nodes; emphasis brackets are kept
    as literal text (they are parsed later by `parse_emphasis`). Inside brackets a prompt cannot
    hold stray brackets, so each `prompt` ends at a fixed place and the choice between
    scheduled / alternate / emphasized is decided by the separator after the first prompt.
    At top level a bracket that opens no valid construct is literal text; a '|' outside
    alternation (or a backslash before a newline or at the end) makes the whole prompt unparsable.
    """

    def __init__(self, text: str):
        self.s = text
        # prompt(pos) depends on pos only; caching it keeps retries after a failed bracket linear
        self._prompt_cache: dict[int, tuple[list, int]] = {}

    def parse(self) -> list | None:
        s, pos, out = self.s, 0, []
        while pos < len(s):
            items, end = self.prompt(pos)
            if end > pos:
                out.extend(items)
                pos = end
            elif s[pos] in "[]():":
                out.append(s[pos])  # stray bracket or colon at top level: literal
                pos += 1
            else:
                return None
        return out

    def prompt(self, pos: int) -> tuple[list, int]:
        """Longest run of prompt elements from `pos` (possibly empty)."""
        if pos not in self._prompt_cache:
            self._prompt_cache[pos] = self._prompt(pos)
        return self._prompt_cache[pos]

    def _prompt(self, pos: int) -> tuple[list, int]:
        s, out = self.s, []
        while pos < len(s):
            m = _PLAIN.match(s, pos)
            if m:
                out.append(m.group(0))
                pos = m.end()
                continue
            parsed = self.round(pos) if s[pos] == "(" else self.square(pos) if s[pos] == "[" else None
            if parsed is None:
                break
            node, pos = parsed
            if isinstance(node, list):
                out.extend(node)  # emphasis brackets: literal text around the inner elements
            else:
                out.append(node)
        return out, pos

    def round(self, pos: int) -> tuple[list, int] | None:
        s = self.s
        first, pos = self.prompt(pos + 1)
        if s.startswith(")", pos):
            return ["(", *first, ")"], pos + 1
        if s.startswith(":", pos):
            second, pos = self.prompt(pos + 1)
            if s.startswith(")", pos):
                return ["(", *first, ":", *second, ")"], pos + 1
        return None

    def square(self, pos: int) -> tuple[list | _Scheduled | _Alternate, int] | None:
        s = self.s
        first, pos = self.prompt(pos + 1)
        if s.startswith("]", pos):
            return ["[", *first, "]"], pos + 1
        if s.startswith("|", pos):
            options = [first]
            while s.startswith("|", pos):
                option, pos = self.prompt(pos + 1)
                options.append(option)
            if s.startswith("]", pos):
                return _Alternate(options), pos + 1
            return None
        if s.startswith(":", pos):
            # [after:when]
            end = self._when(pos + 1)
            if end is not None:
                number, end = end
                return _Scheduled(None, first, number), end
            # [before:after:when]
            second, pos = self.prompt(pos + 1)
            if s.startswith(":", pos):
                end = self._when(pos + 1)
                if end is not None:
                    number, end = end
                    return _Scheduled(first, second, number), end
        return None

    def _when(self, pos: int) -> tuple[str, int] | None:
        """[WHITESPACE] NUMBER [WHITESPACE] "]" from `pos`: (number text, position after ']')."""
        s = self.s
        ws = _WHITESPACE.match(s, pos)
        pos = ws.end() if ws else pos
        num = _NUMBER.match(s, pos)
        if num is None:
            return None
        pos = num.end()
        ws = _WHITESPACE.match(s, pos)
        pos = ws.end() if ws else pos
        if not s.startswith("]", pos):
            return None
        return num.group(0), pos + 1


def _walk(seq: list):
    """Every node of a parsed sequence, depth first."""
    for item in seq:
        if isinstance(item, _Scheduled):
            yield item
            if item.before is not None:
                yield from _walk(item.before)
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            yield item
            for option in item.options:
                yield from _walk(option)


def _render(seq: list, step: int) -> str:
    parts = []
    for item in seq:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, _Scheduled):
            if step <= item.when:
                parts.append("" if item.before is None else _render(item.before, step))
            else:
                parts.append(_render(item.after, step))
        else:
            parts.append(_render(item.options[(step - 1) % len(item.options)], step))
    return "".join(parts)


def get_schedules(
    prompt: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[tuple[int, str]]:
    """The prompt-editing schedule of `prompt`: `[(end_step, text), ...]`, end steps ascending,
    the last equal to the step count. `text` applies while `step <= end_step` (see `prompt_at_step`).

    `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`;
    `[from::when]` removes `from` after `when`; nesting works. `when` with a decimal point is a
    fraction of the steps (`0.25`), without one a step number (`5`); the result is truncated to an
    int, clipped to `steps`, and ignored as a switch point when < 1. `[a|b|c]` alternates every
    step (step 1 -> a, 2 -> b, ...; empty options allowed). Emphasis brackets stay in the text.
    A prompt the grammar cannot parse (e.g. a bare '|', or brackets nested some 300 deep, past
    Python's recursion limit) is returned unchanged as one entry.

    `hires_steps` gives the schedule of a hires-fix second pass: steps count on from the first
    pass (`when` minus `steps`, fractions minus 1.0). `use_old_scheduling` restores A1111 < 1.8
    (`when` < 1 is a fraction, anything else a step). Matches A1111
    `get_learned_conditioning_prompt_schedules` (modules/prompt_parser.py) doctests.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if hires_steps is None or use_old_scheduling:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps

    try:
        tree = _ScheduleParser(prompt).parse()
    except RecursionError:  # brackets nested hundreds deep: treat as unparsable, like a syntax error
        tree = None
    if tree is None:
        return [(total, prompt)]

    ends = {total}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
            continue
        v = float(node.number)
        if use_old_scheduling:
            v = v * total if v < 1 else v
        elif "." in node.number:
            v = (v - frac_offset) * total
        else:
            v = v - int_offset
        node.when = min(total, int(v))
        if node.when >= 1:
            ends.add(node.when)
    return [(end, _render(tree, end)) for end in sorted(ends)]


def prompt_at_step(schedules: Sequence[tuple[int, str]], step: int) -> str:
    """The text of `schedules` (from `get_schedules`) in force at `step`: the first entry with
    `step <= end_step`. A1111 passes its 0-based denoiser-call counter here, so with
    `[a:b:5]` and 20 steps "a" conditions calls 0..5 (six calls) - kept for parity.
    Past the last end step the last text stays (A1111 falls back to the first entry instead).
    Source: A1111 modules/prompt_parser.py, `reconstruct_cond_batch`.
    """
    if not schedules:
        raise ValueError("schedules is empty; build it with get_schedules(prompt, steps)")
    for end, text in schedules:
        if step <= end:
            return text
    return schedules[-1][1]


# -------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Window:
    """What chunking needs to know of a tokenizer and its text encoders: BOS, EOS and comma ids (comma
    None: no comma backtracking) and `length`, the prompt tokens per window (positions - BOS - EOS)."""

    bos: int
    eos: int
    comma: int | None
    length: int


@dataclass(frozen=True)
class Chunk:
    """One text-encoder window of a prompt: `tokens` and `weights` of length `chunk_len` (75),
    without BOS/EOS; the tail is EOS padding of weight 1.0. `build_ids` / `build_weights` add
    the two special positions (77 in all).

    `fixes`: ((offset, name), ...) textual-inversion embeddings whose vectors fill the positions
    offset .. offset + N - 1 of `tokens` (placeholder id 0 there, as A1111; +1 after BOS in the ids)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()


class EmbeddingMatcher:
    """Finds embedding names in token sequences, as A1111 `EmbeddingDatabase.find_embedding_at_position`:
    each name is tokenized like prompt text; at a position the longest name whose token ids follow
    there wins. `names`: {name: number of vectors}; `encode`: the tokenizer's str -> ids."""

    def __init__(self, names: dict[str, int], encode: Callable[[str], list[int]]):
        self.by_first: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
        for name, count in names.items():
            ids = tuple(encode(name))
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name, int(count)))
        for options in self.by_first.values():
            options.sort(key=lambda o: len(o[0]), reverse=True)  # stable: equal lengths keep insertion order

    def __call__(self, tokens: Sequence[int], position: int) -> tuple[str, int, int] | None:
        """(name, tokens matched, vectors) of the embedding whose name starts at `position`, or None."""
        for ids, name, count in self.by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return name, len(ids), count
        return None


def tokenize_weighted(
    text: str,
    encode: Callable[[str], list[int]],
    chunk_len: int = CHUNK_LEN,
    comma_id: int | None = COMMA_ID,
    *,
    eos_id: int = EOS_ID,
    comma_backtrack: int = 20,
    emphasis: bool = True,
    find_embedding: Callable[[Sequence[int], int], tuple[str, int, int] | None] | None = None,
) -> list[Chunk]:
    """Split a prompt into weighted chunks the way A1111 does before the text encoder.

    `encode(str) -> ids` must return token ids without BOS/EOS (e.g. `CLIPTokenizer.encode`).
    Rules (A1111 `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`):
    * each `parse_emphasis` segment is encoded on its own; every token gets its segment's weight;
    * tokens fill chunks of `chunk_len`; when a chunk is full and a comma is among its last
      `comma_backtrack` tokens, the tokens after that comma move to the next chunk
      (`comma_backtrack=0` disables this);
    * BREAK ends the current chunk, even an empty one;
    * chunks are padded with `eos_id` at weight 1.0; an empty prompt gives one chunk of padding.
    `emphasis=False` is A1111's emphasis mode "None": the text is encoded as is, all weights 1.
    `find_embedding(tokens, i)` (an `EmbeddingMatcher`) names a textual-inversion embedding whose name
    starts at token i of a segment: its N vectors take N positions (placeholder id 0, the segment's
    weight), recorded in `Chunk.fixes`; when they do not fit in the current chunk it is closed first,
    so an embedding never straddles two chunks (A1111). Unlike A1111, comma backtracking moves an
    embedding that lies after the comma along with its tokens (A1111 leaves the fix behind, writing its
    vectors over the padding of the closed chunk).
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len} must be >= 1 (CLIP: 75 = 77 - BOS - EOS)")
    segments = parse_emphasis(text) if emphasis else [(text, 1.0)]

    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1  # index in `tokens` of the latest comma of the current chunk

    def close_chunk() -> None:
        nonlocal tokens, weights, fixes, last_comma
        pad = chunk_len - len(tokens)
        chunks.append(Chunk(tuple(tokens + [eos_id] * pad), tuple(weights + [1.0] * pad), tuple(fixes)))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for segment, weight in segments:
        if segment == BREAK[0] and weight == BREAK[1]:
            close_chunk()
            continue
        ids = encode(segment)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == chunk_len and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                # move the words (and embeddings) after the last comma into the next chunk
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                moved_fixes = [(off - cut, name) for off, name in fixes if off >= cut]
                tokens, weights = tokens[:cut], weights[:cut]
                fixes = [f for f in fixes if f[0] < cut]
                close_chunk()
                tokens, weights, fixes = moved_tokens, moved_weights, moved_fixes
            if len(tokens) == chunk_len:
                close_chunk()
            found = find_embedding(ids, position) if find_embedding is not None else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            name, matched, count = found
            if count > chunk_len:
                raise ValueError(f"embedding {name!r} has {count} vectors; at most {chunk_len} fit in a prompt chunk")
            if len(tokens) + count > chunk_len:
                close_chunk()
            fixes.append((len(tokens), name))
            tokens.extend([0] * count)
            weights.extend([weight] * count)
            position += matched

    if tokens or not chunks:
        close_chunk()
    return chunks


def empty_chunk(chunk_len: int = CHUNK_LEN, eos_id: int = EOS_ID) -> Chunk:
    """A chunk of padding only (A1111 `empty_chunk`): what an empty prompt encodes to."""
    return Chunk((eos_id,) * chunk_len, (1.0,) * chunk_len)


def pad_to(chunks: Sequence[Chunk], n: int, *, chunk_len: int = CHUNK_LEN, eos_id: int = EOS_ID) -> list[Chunk]:
    """`chunks` extended with empty chunks to `n` of them (A1111 pads every prompt of one batch so)."""
    return list(chunks) + [empty_chunk(chunk_len, eos_id)] * (n - len(chunks))


def pad_chunks(a: list[Chunk], b: list[Chunk], *, eos_id: int = EOS_ID) -> tuple[list[Chunk], list[Chunk]]:
    """Extend the shorter of two chunk lists (cond and uncond) with empty chunks so both encode to
    the same number of tokens and can share one batched UNet call. Equals A1111 with the option
    "pad prompt/negative prompt to be same length" (its default instead runs the two separately)."""
    lengths = {len(chunk.tokens) for chunk in (*a, *b)}
    if len(lengths) > 1:
        raise ValueError(f"chunks of different lengths {sorted(lengths)} cannot be padded together")
    n, chunk_len = max(len(a), len(b)), lengths.pop() if lengths else CHUNK_LEN
    return pad_to(a, n, chunk_len=chunk_len, eos_id=eos_id), pad_to(b, n, chunk_len=chunk_len, eos_id=eos_id)


def build_ids(chunk: Chunk, bos: int = BOS_ID, eos: int = EOS_ID, pad: int = EOS_ID) -> list[int]:
    """The encoder input of one chunk: BOS + tokens + EOS (chunk length + 2 ids: 77 for CLIP). With `pad != eos`
    every id after the first EOS becomes `pad`: OpenCLIP encoders (SD2, SDXL's bigG) pad with 0,
    as A1111 `FrozenOpenCLIPEmbedderWithCustomWords` (id_pad = 0) does."""
    ids = [bos, *chunk.tokens, eos]
    if pad != eos:
        first_eos = ids.index(eos)
        ids[first_eos + 1:] = [pad] * (len(ids) - first_eos - 1)
    return ids


def build_weights(chunk: Chunk) -> list[float]:
    """Per-position weights matching `build_ids`: 1.0 for BOS and EOS around the chunk's weights."""
    return [1.0, *chunk.weights, 1.0]


# ------------------------------------------------------------------------------------- emphasis


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor | Sequence, *, normalize: bool = True) -> torch.Tensor:
    """A1111 "Original" emphasis on encoder output `hidden` (B, T, C) with `weights` (B, T):
    each token's hidden state is multiplied by its weight, then the whole tensor is rescaled so its
    mean (over batch, tokens and channels together) equals the mean before weighting.
    `normalize=False` is A1111's "No norm" mode. Source: A1111 modules/sd_emphasis.py.

    Because the mean is taken over the batch, results depend on which chunks are encoded together;
    A1111 encodes one prompt's schedule texts, chunk position by chunk position, as one batch.
    """
    w = torch.as_tensor(weights, dtype=hidden.dtype, device=hidden.device)
    if w.shape != hidden.shape[:-1]:
        raise ValueError(f"weights of shape {tuple(w.shape)} do not match hidden {tuple(hidden.shape)}; "
                         f"expected {tuple(hidden.shape[:-1])}")
    original_mean = hidden.mean()
    z = hidden * w.unsqueeze(-1)  # (B, T, C) * (B, T, 1)
    if normalize:
        new_mean = z.mean()
        if new_mean != 0:  # a zero mean (e.g. straight after a bias-free LayerNorm) has nothing to restore
            z = z * (original_mean / new_mean)
    return z

"""A1111 infotext: the generation-parameters text that AUTOMATIC1111 stores in every image.

Layout (A1111 v1.10 modules/processing.py `create_infotext`)::

    <prompt, any number of lines>
    Negative prompt: <negative prompt>          (line omitted when the negative prompt is empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

PNG files carry it in a text chunk named `parameters`; JPEG / WebP in the EXIF UserComment.
Parsing follows modules/infotext_utils.py `parse_generation_parameters`. Everything here is
plain text and Pillow; no model is involved.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, PngImagePlugin

__all__ = [
    "FIELDS",
    "KNOWN_SCHEDULE_TYPES",
    "PARAM_ORDER",
    "fields_from_params",
    "format_infotext",
    "params_from_fields",
    "parse_infotext",
    "quote",
    "read_infotext",
    "save_png_with_infotext",
    "split_legacy_sampler",
    "unquote",
]

PARAM_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Image CFG scale", "Seed",
    "Face restoration",
    "Size", "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE",
    "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr",
    "Init image hash", "RNG", "Tiling",
)
"""Keys A1111 writes first, in its order (Forge adds "Distilled CFG Scale", Flux.1 dev's guidance input,
after "CFG scale"); any other key follows in the caller's order."""
_TRAILING = ("Version", "User")  # written after the extra keys

class Field(NamedTuple):
    """One infotext key and the `GenerationParams` field it stands for."""

    key: str                 # the A1111 label ("CFG scale"); "Size" is split into Size-1 / Size-2 when read
    name: str                # the GenerationParams field
    kind: type               # int, float or str: how a parsed value is read
    read: bool = True        # False: written only ("Refiner" names a file the reader cannot know the path of)


FIELDS: tuple[Field, ...] = (
    Field("Steps", "steps", int), Field("Sampler", "sampler_name", str), Field("Schedule type", "scheduler", str),
    Field("CFG scale", "cfg_scale", float), Field("Distilled CFG Scale", "guidance", float), Field("Seed", "seed", int),
    Field("Size-1", "width", int), Field("Size-2", "height", int),
    Field("Variation seed", "subseed", int), Field("Variation seed strength", "subseed_strength", float),
    Field("Denoising strength", "denoising_strength", float), Field("Mask blur", "mask_blur", int),
    Field("Clip skip", "clip_skip", int), Field("Eta", "eta", float), Field("CFG rescale", "cfg_rescale", float),
    Field("SDE noise", "sde_noise", str), Field("Hires upscale", "hr_scale", float),
    Field("Hires steps", "hr_second_pass_steps", int), Field("Hires upscaler", "hr_upscaler", str),
    Field("Refiner", "refiner_checkpoint", str, read=False), Field("Refiner switch at", "refiner_switch_at", float),
)
"""The one table of infotext keys <-> GenerationParams fields: the pipeline writes with it
(`fields_from_params`), the CLI's `--from IMAGE` reads with it (`params_from_fields`). Writing order;
`format_infotext` puts the keys of `PARAM_ORDER` first."""


def fields_from_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """{infotext key: value} for the GenerationParams field values in `values`, in `FIELDS` order (fields
    not in `values` or None are left out; width and height become one "Size: WxH")."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f.name in ("width", "height"):
            if f.name == "width" and values.get("width") is not None:
                out["Size"] = f"{values['width']}x{values['height']}"
        elif values.get(f.name) is not None:
            out[f.key] = values[f.name]
    return out


def params_from_fields(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """{GenerationParams field: typed value} for the keys of a parsed infotext (`parse_infotext`) that the
    table reads; a value that is not a number where one belongs is a ValueError naming the key."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f.read and f.key in parsed:
            try:
                out[f.name] = f.kind(parsed[f.key])
            except ValueError:
                raise ValueError(f"infotext {f.key}: {parsed[f.key]!r} is not "
                                 f"a{'n integer' if f.kind is int else ' number'}") from None
    return out


def read_keys() -> set[str]:
    """The parsed-infotext keys that `params_from_fields` uses."""
    return {f.key for f in FIELDS if f.read}


# A1111's parameter regex, r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)': `Key: value` pairs, a
# value either JSON-quoted or up to the next comma. Its `findall` is quadratic in the line's length (a
# 120 kB run of letters holding no ':' costs ~n^2/2 steps, with the GIL held); `_param_pairs` finds the
# same pairs in one left-to-right pass, with these pieces of it.
_SPACE = re.compile(r"\s*")
_WORD = re.compile(r"\w")
_KEY_TAIL = re.compile(r"[\w \-/]*")
_PLAIN = re.compile(r'[^\\"]*')
MAX_INFOTEXT_CHARS = 65_536  # what readers of untrusted images (the server's png-info) parse at most
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_MIN_PARAMS = 3  # a last line with fewer `Key: value` pairs is still prompt text

# A1111 v1.10 modules/sd_schedulers.py: (name, label, aliases). Sampler names from before v1.9
# carried the schedule as a suffix ("DPM++ 2M Karras").
KNOWN_SCHEDULE_TYPES = (
    ("automatic", "Automatic", ()), ("uniform", "Uniform", ()), ("karras", "Karras", ()),
    ("exponential", "Exponential", ()), ("polyexponential", "Polyexponential", ()),
    ("sgm_uniform", "SGM Uniform", ("SGMUniform",)), ("kl_optimal", "KL Optimal", ()),
    ("align_your_steps", "Align Your Steps", ()), ("simple", "Simple", ()), ("normal", "Normal", ()),
    ("ddim", "DDIM", ()), ("beta", "Beta", ()),
)

# EXIF: the Exif sub-IFD pointer and its UserComment tag; UserComment starts with an 8-byte charset.
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def quote(value: Any) -> Any:
    """A value as A1111 writes it: JSON-quoted when its text holds ',', ':' or a newline (which
    would break the `Key: value, ...` line), else unchanged."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of `quote` for one value; text that is not a valid JSON string stays as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _dropped(key: str, value: Any) -> bool:
    """Values A1111 leaves out of the parameters line."""
    if value is None:
        return True
    if key == "Clip skip":  # only written when > 1 (1 is the default)
        try:
            return int(value) <= 1
        except (TypeError, ValueError):
            return False
    return key == "RNG" and value == "GPU"  # the default source is not written


def format_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any]) -> str:
    """The A1111 infotext of one image.

    `params` maps A1111 labels to values (`{"Steps": 20, "Sampler": "DPM++ 2M", "Size": "512x512",
    ...}`). Known keys come first in `PARAM_ORDER`, then the other keys in the order given, then
    "Version" and "User". None values are dropped, as are "Clip skip" <= 1 and "RNG" == "GPU";
    a value equal to its key is written as the bare key (a flag). Values containing ',', ':' or a
    newline are JSON-quoted; values are otherwise written with `str` (7.0 stays "7.0").
    """
    keys = [k for k in PARAM_ORDER if k in params]
    keys += [k for k in params if k not in PARAM_ORDER and k not in _TRAILING]
    keys += [k for k in _TRAILING if k in params]
    items = []
    for key in keys:
        value = params[key]
        if _dropped(key, value):
            continue
        items.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(items)}".strip()


def split_legacy_sampler(sampler: str) -> tuple[str, str | None]:
    """Split a pre-v1.9 sampler name with a schedule suffix: "DPM++ 2M Karras" -> ("DPM++ 2M",
    "Karras"); a name without a known suffix gives (name, None). The longest matching label, name
    or alias wins ("... SGM Uniform" is not read as "Uniform")."""
    options = sorted(
        ((option, label) for name, label, aliases in KNOWN_SCHEDULE_TYPES for option in (label, name, *aliases)),
        key=lambda pair: -len(pair[0]),
    )
    for option, label in options:
        suffix = " " + option
        if sampler.endswith(suffix) and len(sampler) > len(suffix):
            return sampler[: -len(suffix)], label
    return sampler, None


def _quoted_end(line: str, start: int, memo: dict[int, int]) -> int:
    """Where the scan of a quoted value's body from `start` stops: the index of its closing '"', or -1 (a
    backslash before a newline or the end, or no closing quote). The regex's `(?:\\.|[^\\"])+"` read as a
    function of the start. A scan goes run by run (a run: the characters up to the next '\\' or '"') and
    every scan starts right after a '"', hence at a run's start; `memo` (shared by one line's scans) maps
    run starts to where they end, so all of a line's scans together read each run once."""
    path, i, n = [], start, len(line)
    while True:
        if i in memo:
            end = memo[i]
            break
        path.append(i)
        j = _PLAIN.match(line, i).end()
        if j >= n:
            end = -1
        elif line[j] == '"':
            end = j
        elif j + 1 >= n or line[j + 1] == "\n":             # a backslash with nothing it may escape
            end = -1
        else:
            i = j + 2
            continue
        break
    for k in path:
        memo[k] = end
    return end


def _param_pairs(line: str) -> list[tuple[str, str]]:
    """`re.findall` of A1111's parameter regex over `line` (the same pairs, see the comment at `_SPACE`), in
    time linear in the line's length.

    Why one pass is enough: after the leading spaces a key is a word character plus the longest run of
    `[\\w \\-/]` after it, and it counts only when a ':' follows that run. When none follows, no start inside
    the run can do better (it reaches the same run end), so the search goes on from the run's end. A value
    is a quoted string ending where a ',' or the line's end follows it, else everything up to the next ','.
    """
    pairs: list[tuple[str, str]] = []
    memo: dict[int, int] = {}
    pos, n = 0, len(line)
    while pos < n:
        q = _SPACE.match(line, pos).end()
        if q >= n or not _WORD.match(line, q):
            pos = q + 1                                  # no key starts anywhere in line[pos:q + 1]
            continue
        r = _KEY_TAIL.match(line, q + 1).end()
        if r == q + 1 or r >= n or line[r] != ":":
            pos = r                                      # no key starts anywhere in line[pos:r]
            continue
        s = _SPACE.match(line, r + 1).end()
        end = _quoted_end(line, s + 1, memo) if s < n and line[s] == '"' else -1
        after = end + 1
        if end > s + 1 and (after == n or line[after] == "," or (after == n - 1 and line[after] == "\n")):
            value, pos = line[s:after], after + (after < n and line[after] == ",")
        else:
            comma = line.find(",", s)
            value, pos = (line[s:], n) if comma < 0 else (line[s:comma], comma + 1)
        pairs.append((line[q:r], value))
    return pairs


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse an A1111 infotext into `{"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}`.

    As A1111 `parse_generation_parameters`: the last line counts as parameters only when the
    parameter regex finds at least 3 `Key: value` pairs there (otherwise it is prompt text);
    every prompt line is stripped; values are strings, JSON-unquoted; a `WxH` value is split into
    `<Key>-1` / `<Key>-2` (`Size-1`, `Size-2`, `Hires resize-1`, ...); a key with an empty value is
    skipped. Missing keys get A1111's defaults "Clip skip" "1", "RNG" "GPU", "Schedule type"
    "Automatic". A legacy sampler name with a schedule suffix is split ("DPM++ 2M Karras" ->
    Sampler "DPM++ 2M", Schedule type "Karras"; likewise "Hires sampler" -> "Hires schedule type").
    """
    res: dict[str, Any] = {}
    prompt_lines: list[str] = []
    negative_lines: list[str] = []

    *lines, last = text.strip().split("\n")
    pairs = _param_pairs(last)
    if len(pairs) < _MIN_PARAMS:
        lines.append(last)
        pairs = []

    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    res["Prompt"] = "\n".join(prompt_lines)
    res["Negative prompt"] = "\n".join(negative_lines)

    for key, value in pairs:
        if not value:
            continue  # A1111 fails on an empty value and skips the key
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value

    for key, schedule_key in (("Sampler", "Schedule type"), ("Hires sampler", "Hires schedule type")):
        if key in res:
            sampler, schedule = split_legacy_sampler(res[key])
            if schedule is not None:
                res[key], res[schedule_key] = sampler, schedule

    res.setdefault("Clip skip", "1")
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    return res


# ------------------------------------------------------------------------------------- files


def save_png_with_infotext(image: Image.Image, path: str | os.PathLike, infotext: str) -> Path:
    """Write `image` as PNG with `infotext` in a text chunk named `parameters` (Pillow writes
    tEXt, or iTXt when the text is not Latin-1), atomically: a temporary file in the same folder
    is renamed over `path`, so a reader never sees a half-written image. Returns the path."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    # a unique name next to the target (same file system, so the rename is atomic); plain open()
    # keeps the usual umask permissions, which mkstemp's 0600 would not
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: an 8-byte charset prefix, then the text. A1111 (via piexif) writes
    b"UNICODE\\0" + UTF-16 big-endian; other writers use little-endian, which the zero bytes of
    ASCII text reveal."""
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        little = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="ignore").rstrip("\x00")


def read_infotext(image_or_path: Image.Image | str | os.PathLike) -> str | None:
    """The infotext stored in an image, or None when it holds none.

    Looks, as A1111 `read_info_from_image` does, at the PNG text chunk `parameters`, then the EXIF
    UserComment (JPEG, WebP, also PNG eXIf), then a GIF comment.
    """
    if isinstance(image_or_path, Image.Image):
        return _infotext_of(image_or_path)
    with Image.open(image_or_path) as image:
        return _infotext_of(image)


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get("parameters")
    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a malformed EXIF block is not worth failing over
        comment = None
    if comment:
        decoded = _decode_user_comment(comment)
        if decoded:
            text = decoded
    if text is None and isinstance(image.info.get("comment"), bytes):
        text = image.info["comment"].decode("utf-8", errors="ignore")
    return text

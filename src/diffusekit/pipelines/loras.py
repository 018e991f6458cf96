"""A1111's `<lora:NAME:WEIGHT>` prompt syntax and the folder of LoRA files it names.

A1111 (modules/extra_networks.py `parse_prompt`, extensions-builtin/Lora/extra_networks_lora.py):
every `<lora:...>` tag is cut out of the positive prompt before the prompt is parsed or tokenized; its
arguments are split on ":": NAME, then the text-encoder multiplier (default 1), then the UNet
multiplier (default: the text-encoder one), also given by name as `te=`, `unet=`. NAME is a file
stem in the LoRA folder. The negative prompt is not searched (A1111 parses the positive prompts
only). Tags of other extra-network kinds (`<hypernet:...>`) are left in the text here.

Infotext: `Lora hashes: "name: 0123456789ab, other: ..."`: the name as written in the prompt with ":"
and "," removed, and the first 12 hex digits of A1111's LoRA hash (`models.lora.LoRA.hash`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..models.lora import LoRA, LoRAError, load_lora

__all__ = ["LoraRef", "LoraLibrary", "extract_loras", "lora_hashes_text"]

_TAG = re.compile(r"<lora:([^>]+)>")


@dataclass(frozen=True)
class LoraRef:
    """One `<lora:...>` tag: the file name and the text-encoder / UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"<lora:{tag}>: {text!r} is not a number (write <lora:NAME:WEIGHT>, e.g. <lora:style:0.8>)") from None


def _parse(args: str) -> LoraRef:
    items = args.split(":")
    positional = [x for x in items if "=" not in x]
    named = dict(x.split("=", 1) for x in items if "=" in x)
    bad = set(named) - {"te", "unet"}
    if bad:
        raise ValueError(f"<lora:{args}>: unknown argument(s) {sorted(bad)}; valid: te=, unet=")
    name = positional[0].strip() if positional else ""
    if not name:
        raise ValueError(f"<lora:{args}>: no LoRA name")
    te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), args)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(te)), args)
    return LoraRef(name, te, unet)


def extract_loras(prompt: str) -> tuple[str, list[LoraRef]]:
    """(prompt with every `<lora:...>` tag removed, the tags in order), as A1111 cuts them out."""
    refs: list[LoraRef] = []

    def found(m: re.Match) -> str:
        refs.append(_parse(m.group(1)))
        return ""

    return _TAG.sub(found, prompt), refs


def infotext_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


class LoraLibrary:
    """The `.safetensors` LoRA files under a folder (searched recursively, as A1111's models/Lora),
    by file stem; files are read once and kept while unchanged (path, mtime)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._loaded: dict[Path, tuple[float, LoRA]] = {}

    def available(self) -> dict[str, Path]:
        """{name: path}; the first file in sorted path order wins a name two subfolders share."""
        if not self.folder.is_dir():
            return {}
        out: dict[str, Path] = {}
        for path in sorted(self.folder.rglob("*.safetensors")):
            out.setdefault(path.stem, path)
        return out

    def path(self, name: str) -> Path:
        available = self.available()
        if name not in available:
            shown = ", ".join(sorted(available)) or "(none)"
            raise LoRAError(f"unknown LoRA {name!r} in <lora:{name}:...>; available in {self.folder}: {shown}")
        return available[name]

    def load(self, name: str, te_count: int = 1) -> LoRA:
        path = self.path(name)
        mtime = path.stat().st_mtime
        cached = self._loaded.get(path)
        if cached is None or cached[0] != mtime:
            self._loaded[path] = (mtime, load_lora(path, te_count=te_count))
        return self._loaded[path][1]


def lora_hashes_text(items: list[tuple[LoraRef, LoRA]]) -> str | None:
    """A1111's "Lora hashes" value, e.g. `style: 0123456789ab, detail: ba9876543210`; None if no hash."""
    seen, parts = set(), []
    for ref, lora in items:
        h = lora.hash
        if h and ref.name not in seen:
            seen.add(ref.name)
            parts.append(f"{infotext_name(ref.name)}: {h[:12]}")
    return ", ".join(parts) or None

"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word: Personalizing
Text-to-Image Generation using Textual Inversion"): N learned vectors in a text encoder's
token-embedding space that stand for one word of the prompt.

File formats, as AUTOMATIC1111 stable-diffusion-webui v1.10 reads them
(modules/textual_inversion/textual_inversion.py, `EmbeddingDatabase.load_from_file`,
`create_embedding_from_data`):

- `.pt` / `.bin` from A1111 or the original textual-inversion code: a dict whose
  `string_to_param` holds one tensor (N, W), plus optional `name`, `step`, `sd_checkpoint`,
  `sd_checkpoint_name`;
- SDXL files (`.safetensors` mostly): `clip_l` (N, 768) and `clip_g` (N, 1280), one tensor per
  text encoder;
- any other dict with exactly one tensor: kohya-ss `emb_params` (N, W), diffusers
  `learned_embeds.bin` `{"<token>": (W,) or (N, W)}`.

The name is the file stem (what users write in the prompt). Pickles are read with
`torch.load(weights_only=True)` only: a file that needs any other object (old files holding a
`torch.nn.ParameterDict`, for instance) is refused with an `EmbeddingError`, never unpickled.
A file whose widths do not fit the model's text encoders is "skipped" with the reason, as A1111
skips embeddings of another model family. PNG/WEBP images carrying an embedding are not read.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["EMBEDDING_SUFFIXES", "EmbeddingError", "EmbeddingLibrary", "TextualInversion", "load_embedding"]

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL files: one tensor per text encoder, in the model's encoder order
MAX_VECTORS = 75  # one 75-token prompt chunk; A1111 cannot place a longer embedding either


class EmbeddingError(ValueError):
    """A textual-inversion file that cannot be read, or that does not fit the loaded model."""


@dataclass
class TextualInversion:
    """One embedding file. `vectors`: {"*": (N, W)} for single-encoder files (SD1, SD2), or
    {"clip_l": (N, 768), "clip_g": (N, 1280)} for SDXL ones; float32 on the CPU."""

    name: str
    vectors: dict[str, torch.Tensor]
    path: Path | None = None
    sha256: str | None = None  # of the whole file (A1111 `hashes.sha256`)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        """N, the number of prompt positions the embedding fills (A1111 `Embedding.vectors`)."""
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def shape(self) -> int:
        """Summed width of the vectors (A1111 `Embedding.shape`: 768 SD1, 1024 SD2, 2048 SDXL)."""
        return sum(int(v.shape[-1]) for v in self.vectors.values())

    @property
    def shorthash(self) -> str | None:
        """First 12 hex digits of the file's sha256: what A1111 writes in `TI hashes`."""
        return self.sha256[:12] if self.sha256 else None

    def for_encoders(self, widths: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The (N, W_e) vectors for each text encoder of widths `widths` (the model's encoder order),
        or an `EmbeddingError` whose message is the reason the embedding is skipped."""
        widths = tuple(int(w) for w in widths)
        have = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.vectors.items())
        if len(widths) == 1 and "*" in self.vectors:
            parts = (self.vectors["*"],)
        elif len(widths) == 2 and set(self.vectors) == set(SDXL_KEYS):
            parts = tuple(self.vectors[k] for k in SDXL_KEYS)
        else:
            kind = "an SDXL embedding (clip_l + clip_g)" if "*" not in self.vectors else "a single-encoder embedding"
            raise EmbeddingError(f"{kind} [{have}] does not fit a model with {len(widths)} text encoder(s) of "
                                 f"width {'+'.join(map(str, widths))}")
        for v, w in zip(parts, widths):
            if v.shape[-1] != w:
                raise EmbeddingError(f"vectors [{have}] are {v.shape[-1]} wide; this model's text encoder(s) take "
                                     f"{'+'.join(map(str, widths))} (the embedding was trained for another model family)")
        return parts


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> dict:
    """The raw dict of an embedding file: safetensors, or a weights-only pickle."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on garbage
            raise EmbeddingError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = ""
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            needed = f" (it references {', '.join(found)})" if found else ""
        except Exception:  # noqa: BLE001 - only used to make the message better
            pass
        raise EmbeddingError(f"{path} cannot be read without running arbitrary pickled code{needed}; diffusekit "
                             "reads only tensors and plain containers from pickles. Convert the embedding to "
                             ".safetensors in an environment you trust.") from e
    except Exception as e:  # noqa: BLE001 - garbage input can fail inside torch.load in any way
        raise EmbeddingError(f"{path} is not a readable PyTorch file (truncated or corrupt?): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} holds a {type(data).__name__}, not an embedding dict")
    return data


def _as_matrix(t, path: Path, key: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or not t.is_floating_point():
        raise EmbeddingError(f"{path}: {key} must be a float tensor (N, width) or (width,), got "
                             f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    t = t.detach().to("cpu", torch.float32)
    return t.unsqueeze(0) if t.dim() == 1 else t


def load_embedding(path: str | os.PathLike) -> TextualInversion:
    """Read one embedding file (see the module docstring for the formats)."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(f"{path}: unknown embedding extension {path.suffix!r}; valid: {', '.join(EMBEDDING_SUFFIXES)}")
    data = _read(path)
    if "string_to_param" in data:  # A1111 / original textual inversion
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor, got "
                                 f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        vectors = {"*": _as_matrix(next(iter(params.values())), path, "string_to_param")}
    elif all(k in data for k in SDXL_KEYS):  # SDXL: one tensor per encoder
        vectors = {k: _as_matrix(data[k], path, k) for k in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingError(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors, clip_g {vectors['clip_g'].shape[0]}")
    else:  # kohya `emb_params`, diffusers `{"<token>": tensor}`: the one tensor of the file
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise EmbeddingError(f"{path} is not a textual-inversion embedding: expected string_to_param, clip_l + clip_g, "
                                 f"or exactly one tensor; found keys {sorted(map(str, data))[:8]}")
        key, t = next(iter(tensors.items()))
        vectors = {"*": _as_matrix(t, path, str(key))}
    n = next(iter(vectors.values())).shape[0]
    if not 1 <= n <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: {n} vectors; an embedding fills 1..{MAX_VECTORS} prompt positions")

    def meta(key):
        v = data.get(key)
        return v if isinstance(v, (int, str)) and not isinstance(v, bool) else None

    return TextualInversion(path.stem, vectors, path, _file_sha256(path), meta("step"), meta("sd_checkpoint"),
                            meta("sd_checkpoint_name"))


@dataclass
class EmbeddingLibrary:
    """The embedding files under `folder` (recursive, as A1111's `embeddings/`), sorted into those that
    fit text encoders of widths `widths` (`loaded`) and those that do not (`skipped`, with the reason).
    Unreadable files land in `failed` ({name: reason}) and never stop the others. When two files share
    a name the first in sorted path order wins. `refresh()` rereads only files that changed."""

    folder: Path
    widths: tuple[int, ...]
    loaded: dict[str, TextualInversion] = field(default_factory=dict)
    skipped: dict[str, tuple[TextualInversion, str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)        # path -> ((mtime, size), TI or error text)
    _vectors: dict = field(default_factory=dict, repr=False)      # name -> per-encoder vectors

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.widths = tuple(int(w) for w in self.widths)

    def refresh(self) -> bool:
        """Rescan the folder; True when the set of loaded embeddings changed."""
        files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES
                       and p.is_file()) if self.folder.is_dir() else []
        loaded, skipped, failed, vectors, cache = {}, {}, {}, {}, {}
        for path in files:
            st = path.stat()
            if st.st_size == 0 or path.stem in loaded or path.stem in skipped or path.stem in failed:
                continue
            key = (st.st_mtime_ns, st.st_size)
            old = self._cache.get(path)
            if old is not None and old[0] == key:
                item = old[1]
            else:
                try:
                    item = load_embedding(path)
                except EmbeddingError as e:
                    item = str(e)
            cache[path] = (key, item)
            if isinstance(item, str):
                failed[path.stem] = item
                continue
            try:
                vectors[item.name] = item.for_encoders(self.widths)
                loaded[item.name] = item
            except EmbeddingError as e:
                skipped[item.name] = (item, str(e))
        changed = {n: id(t) for n, t in loaded.items()} != {n: id(t) for n, t in self.loaded.items()}
        self.loaded, self.skipped, self.failed, self._vectors, self._cache = loaded, skipped, failed, vectors, cache
        return changed

    def vectors(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """{name: per-encoder (N, W_e) vectors} of the loaded embeddings."""
        return dict(self._vectors)

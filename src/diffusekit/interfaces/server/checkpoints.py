"""The checkpoints a server may load: the files of its models folder plus the shipped models.

A client names a model by one of the strings this listing shows (A1111 title "name.safetensors [hash]",
the title without the hash, model_name, file name or hash); the name is looked up, never joined onto a
path, so `../x`, absolute paths and symlink tricks name nothing and are refused with the valid names.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ...pipelines import shipped
from .schemas import RequestError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# folders of parts, not checkpoints: SD3.5 keeps clip_l / clip_g / t5xxl files in text_encoders/ beside the model
PART_FOLDERS = ("text_encoders",)
# files of parts: Flux's autoencoder beside BFL's transformer file (models/flux_loading.VAE_FILE_NAMES)
PART_FILES = ("ae.safetensors", "flux_ae.safetensors")
HASH_EAGER_MAX_BYTES = 512 * 2**20   # files up to this size are hashed when listed; bigger ones once loaded


@dataclass(frozen=True)
class ModelEntry:
    """One loadable checkpoint as /sdapi/v1/sd-models shows it."""

    name: str            # path relative to the models folder ("sub/model.safetensors"), or the shipped name
    model_name: str      # A1111 model_name: name without the extension
    path: Path           # absolute; a file or a diffusers folder
    shipped: bool = False


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file()


class ModelStore:
    """Lists checkpoints, computes and caches their sha256, resolves client-given names to entries."""

    def __init__(self, models_dir: str | os.PathLike | None = None, extra: list[str | os.PathLike] = ()):
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise FileNotFoundError(f"models_dir={str(models_dir)!r} is not a folder")
        self._extra = [Path(p).resolve() for p in extra]
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ listing
    def add_extra(self, path: str | os.PathLike) -> ModelEntry:
        """Make a file the operator named (`--model path`) loadable by name too."""
        p = Path(path).resolve()
        if p not in self._extra:
            self._extra.append(p)
        return next(e for e in self.entries() if e.path == p)

    def entries(self) -> list[ModelEntry]:
        out: list[ModelEntry] = []
        if self.models_dir is not None:
            for root, dirs, files in os.walk(self.models_dir):
                rootp = Path(root)
                for d in list(dirs):
                    if _is_diffusers_folder(rootp / d):
                        rel = (rootp / d).relative_to(self.models_dir).as_posix()
                        out.append(ModelEntry(rel, rel, rootp / d))
                        dirs.remove(d)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in PART_FOLDERS)
                for f in sorted(files):
                    if f.endswith(CHECKPOINT_SUFFIXES) and not f.startswith(".") and f not in PART_FILES:
                        rel = (rootp / f).relative_to(self.models_dir).as_posix()
                        out.append(ModelEntry(rel, rel.rsplit(".", 1)[0], rootp / f))
        for name in shipped.available():
            out.append(ModelEntry(name, name, shipped.shipped_path(name).resolve(), shipped=True))
        known = {e.path for e in out}
        for p in self._extra:
            if p not in known and p.exists():
                out.append(ModelEntry(p.name, p.stem if p.is_file() else p.name, p))
        return out

    # ------------------------------------------------------------------ hashes
    def sha256(self, entry: ModelEntry, compute: bool = True) -> str | None:
        """A1111's checkpoint hash (sha256 of the file; of the weight files of a folder), cached by size+mtime."""
        files = [entry.path] if entry.path.is_file() else sorted(
            f for f in entry.path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))
        try:
            stats = [f.stat() for f in files]
        except OSError:
            return None
        key = (str(entry.path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        if not compute or key[1] > HASH_EAGER_MAX_BYTES:
            return None
        return self._hash_files(key, files)

    def remember_hash(self, entry: ModelEntry, files: list[Path]) -> str:
        """Hash a (possibly big) checkpoint once it is being loaded anyway."""
        stats = [f.stat() for f in files]
        key = (str(entry.path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        return self._hash_files(key, files)

    def _hash_files(self, key, files) -> str:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._hashes[key] = digest
        return digest

    def title(self, entry: ModelEntry, compute_hash: bool = False) -> str:
        h = self.sha256(entry, compute=compute_hash)
        return f"{entry.name} [{h[:10]}]" if h else entry.name

    def describe(self, entry: ModelEntry) -> dict:
        """The A1111 /sd-models item."""
        h = self.sha256(entry)
        return {"title": f"{entry.name} [{h[:10]}]" if h else entry.name, "model_name": entry.model_name,
                "hash": h[:10] if h else None, "sha256": h, "filename": str(entry.path), "config": None}

    # ------------------------------------------------------------------ lookup
    def find(self, name: object, field: str = "sd_model_checkpoint") -> ModelEntry:
        """The entry a client-given name means; RequestError (422) naming the field and the valid names."""
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"{field}={name!r}: give a model name from GET /sdapi/v1/sd-models", field=field)
        wanted = name.strip()
        entries = self.entries()
        for e in entries:
            h = self.sha256(e, compute=False)
            aliases = {e.name, e.model_name, e.path.name}
            if h:
                aliases |= {f"{e.name} [{h[:10]}]", h[:10], h}
            if wanted in aliases:
                return e
        valid = ", ".join(repr(e.name) for e in entries) or "(none: the models folder is empty)"
        raise RequestError(f"{field}={wanted[:200]!r} is not a model in the models folder; valid: {valid}",
                           status=422, field=field)

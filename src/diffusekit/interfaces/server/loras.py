"""The server's LoRA folder (`serve --lora-dir DIR`) as AUTOMATIC1111's Lora extension shows it.

A1111 (extensions-builtin/Lora/scripts/lora_script.py, networks.py): GET /sdapi/v1/loras lists a snapshot
of the folder, `[{"name", "alias", "path", "metadata"}]` (name: the file stem; path: the full file name;
metadata: the safetensors `__metadata__`, values that hold a JSON object decoded); POST /sdapi/v1/refresh-loras
re-scans the folder and answers null; a prompt naming a LoRA missing from the snapshot re-scans once.

Differences, on purpose: a prompt that names an unknown LoRA is refused (422 listing the available names)
where A1111 logs it and generates without; `alias` is the file stem, the only name `<lora:NAME:...>`
resolves here (A1111 also accepts the `ss_output_name` metadata); files whose real location is outside
the folder (symlinks leading out) are neither listed nor loaded, so a client never learns or reaches
anything outside it.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ...pipelines.loras import LoraLibrary, extract_loras
from .schemas import RequestError

NO_FOLDER = ("the prompt has <lora:...> tags ({names}) but this server has no LoRA folder: "
             "start it with `diffusekit serve --lora-dir DIR` (serve(lora_dir=...))")


def read_metadata(path: Path) -> dict:
    """The safetensors `__metadata__` of `path`, JSON-object strings decoded as A1111 does; {} if unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
    except Exception:  # a broken or foreign file is still listed (A1111 does too), just without metadata
        return {}
    out: dict = {}
    for k, v in raw.items():
        out[k] = v
        if isinstance(v, str) and v.startswith("{"):
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


class LoraCatalog:
    """A snapshot of the `.safetensors` files under `folder`, by file stem, refreshed on demand.

    Names resolve exactly as `pipelines.loras.LoraLibrary` (which the pipelines load from) resolves them,
    so the file a client sees listed is the file a prompt tag loads."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"lora_dir={str(folder)!r} is not a folder")
        self._library = LoraLibrary(self.folder)
        self._lock = threading.Lock()
        self._snapshot: dict[str, Path] = {}
        self._metadata: dict[tuple[Path, int, int], dict] = {}     # (path, size, mtime_ns) -> metadata
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the folder (POST /sdapi/v1/refresh-loras)."""
        found = {name: path for name, path in self._library.available().items() if self._inside(path)}
        with self._lock:
            self._snapshot = found

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.folder)
        except OSError:          # a dangling or looping link
            return False

    def names(self) -> dict[str, Path]:
        with self._lock:
            return dict(self._snapshot)

    def describe(self) -> list[dict]:
        """The A1111 GET /sdapi/v1/loras items, in name order."""
        out = []
        for name, path in sorted(self.names().items()):
            try:
                st = path.stat()
            except OSError:                  # deleted since the last refresh
                continue
            key = (path, st.st_size, st.st_mtime_ns)
            meta = self._metadata.get(key)
            if meta is None:
                meta = self._metadata[key] = read_metadata(path)
            out.append({"name": name, "alias": name, "path": str(path), "metadata": meta})
        return out


def check_prompt_loras(catalog: LoraCatalog | None, prompt: str | None, field: str = "prompt") -> None:
    """The request-time check of a prompt's LoRA tags, before any job is queued: a 422 that names the
    field and, for an unknown name, the available ones; with no catalog, a 422 saying how to set one."""
    try:
        _, refs = extract_loras(prompt or "")
    except ValueError as e:
        raise RequestError(f"{field}: {e}", field=field) from None
    if not refs:
        return
    wanted = list(dict.fromkeys(r.name for r in refs))
    if catalog is None:
        raise RequestError(f"{field}: " + NO_FOLDER.format(names=", ".join(wanted)), field=field)
    missing = [n for n in wanted if n not in catalog.names()]
    if missing:
        catalog.refresh()                    # A1111 re-scans once when a prompt names an unlisted LoRA
        missing = [n for n in wanted if n not in catalog.names()]
    if missing:
        shown = ", ".join(sorted(catalog.names())) or "(none: the LoRA folder has no .safetensors files)"
        raise RequestError(f"{field}: unknown LoRA {', '.join(map(repr, missing))} in <lora:NAME:...>; "
                           f"available (GET /sdapi/v1/loras): {shown}", field=field)

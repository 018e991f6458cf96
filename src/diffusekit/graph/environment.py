"""Where a workflow's files live and how its checkpoints load: ComfyUI's folder_paths, made explicit.

Names a workflow uses are looked up, never joined onto a path: a checkpoint, LoRA or input image is one of
the names the listing shows ("sub/model.safetensors"), so `../x`, absolute paths and links out of the
folder name nothing. Output files (SaveImage) are written under `output_dir` ("output"), previews under
`temp_dir` ("temp"); uploads and LoadImage read `input_dir` ("input"), ComfyUI's three folder types.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..pipelines import shipped

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_TYPES = ("output", "input", "temp")


class PathRefused(ValueError):
    """A file name that would leave its folder (.., absolute, a link out) or names nothing there."""


def list_files(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{posix path relative to folder: absolute path} of the files with one of `suffixes`, sorted; hidden
    files and folders and anything resolving outside `folder` are left out."""
    if folder is None or not folder.is_dir():
        return {}
    root = folder.resolve()
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or not f.lower().endswith(suffixes):
                continue
            p = Path(dirpath) / f
            real = p.resolve()
            if real.is_file() and real.is_relative_to(root):
                out[p.relative_to(root).as_posix()] = real
    return out


def inside(folder: Path, relative: str) -> Path:
    """folder / relative, refused (PathRefused) unless it stays inside folder once resolved."""
    rel = str(relative).replace("\\", "/")
    if not rel or rel.startswith("/") or any(part in ("..",) for part in rel.split("/")) or "\x00" in rel:
        raise PathRefused(f"{relative!r}: names must be relative to the folder, without '..'")
    root = folder.resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise PathRefused(f"{relative!r} leaves the folder")
    return p


@dataclass
class Environment:
    """What nodes may read and write. `checkpoints` / `loader` default to the models folder plus the shipped
    models, loaded with `Pipeline.from_pretrained`; a server passes its own so that it and its A1111 API
    share one listing and one model in memory."""

    models_dir: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    output_dir: Path = field(default_factory=lambda: Path("output"))
    input_dir: Path = field(default_factory=lambda: Path("input"))
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "diffusekit-temp")
    device: str = "cpu"
    limits: object | None = None                       # max_steps, max_pixels, max_batch_size (or None)
    checkpoints: Callable[[], dict[str, Path]] | None = None
    loader: Callable[[Path], object] | None = None     # checkpoint path -> Pipeline
    _loaded: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        for name in ("models_dir", "lora_dir", "embeddings_dir", "output_dir", "input_dir", "temp_dir"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, Path(v).resolve())

    # ------------------------------------------------------------------ listings (ComfyUI's folder names)
    def checkpoint_files(self) -> dict[str, Path]:
        if self.checkpoints is not None:
            return dict(self.checkpoints())
        found = list_files(self.models_dir, CHECKPOINT_SUFFIXES)
        for name in shipped.available():
            found.setdefault(name, shipped.shipped_path(name).resolve())
        return found

    def lora_files(self) -> dict[str, Path]:
        return list_files(self.lora_dir, LORA_SUFFIXES)

    def embedding_names(self) -> list[str]:
        return sorted(Path(n).stem for n in list_files(self.embeddings_dir, (".pt", ".bin", ".safetensors")))

    def input_images(self) -> list[str]:
        return list(list_files(self.input_dir, IMAGE_SUFFIXES))

    def folder(self, kind: str) -> Path:
        """The folder of a ComfyUI folder type: "output", "input" or "temp"."""
        if kind not in FOLDER_TYPES:
            raise PathRefused(f"type={kind!r}: valid folder types are {', '.join(FOLDER_TYPES)}")
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}[kind]

    def model_folders(self) -> dict[str, Callable[[], list[str]]]:
        """GET /models/{folder}: ComfyUI's folder names and their files."""
        return {"checkpoints": lambda: list(self.checkpoint_files()), "loras": lambda: list(self.lora_files()),
                "embeddings": self.embedding_names, "vae": lambda: [], "configs": lambda: [],
                "upscale_models": lambda: [], "controlnet": lambda: []}

    def resolve_image(self, name: str) -> Path:
        """A LoadImage value: "name.png", "sub/name.png", or annotated "name.png [output]" (ComfyUI)."""
        kind = "input"
        text = str(name)
        for k in FOLDER_TYPES:
            if text.endswith(f" [{k}]"):
                text, kind = text[: -len(k) - 3], k
                break
        p = inside(self.folder(kind), text)
        if not p.is_file():
            raise PathRefused(f"Invalid image file: {name}")
        return p

    # ------------------------------------------------------------------ models
    def load_checkpoint(self, name: str):
        """The Pipeline of a listed checkpoint; the last one stays loaded (one model in memory)."""
        files = self.checkpoint_files()
        if name not in files:
            raise PathRefused(f"ckpt_name={name!r} is not a listed checkpoint; valid: {', '.join(files)}")
        path = files[name]
        if self.loader is not None:
            return self.loader(path)
        if self._loaded is None or self._loaded[0] != path:
            from ..pipelines.pipeline import Pipeline
            self._loaded = None
            pipe = Pipeline.from_pretrained(name if name in shipped.SHIPPED else path, device=self.device,
                                            embeddings_dir=self.embeddings_dir)
            self._loaded = (path, pipe)
        return self._loaded[1]

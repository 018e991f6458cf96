"""Checkpoint tensor files: safetensors and weights-only pickles, read and written.

Reading: `read_safetensors_header` validates a safetensors header against the file size (format,
huggingface/safetensors: 8-byte little-endian header length N, N bytes of JSON, then the data);
`open_file` gives a `_Source` whose `read(names, dtype, device)` yields tensors either memory-mapped
(no copy, when neither dtype nor device changes) or read through a temporary buffer and converted
once, so no page of the source stays resident. `.ckpt` / `.pt` / `.pth` / `.bin` files go through
`torch.load(weights_only=True, mmap=True)` only: a pickle that needs more than tensors and plain
containers is refused, never run.

Writing: `write_safetensors` streams tensors into a temp file (one cast tensor in memory at a
time) and renames it into place. Every failure is a `CheckpointError` saying what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .families import CheckpointError

__all__ = ["PICKLE_SUFFIXES", "read_safetensors_header", "open_file", "write_safetensors", "convert"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ------------------------------------------------------------------------------ reading
def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({name: (dtype, shape)}, metadata) of a safetensors file, validated against the file size.
    A truncated, corrupt or non-safetensors file is a CheckpointError saying which."""
    entries, metadata, _ = _parse_header(Path(path))
    return {k: (dtype, shape) for k, (dtype, shape, _, _) in entries.items()}, metadata


def _parse_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
    """({name: (dtype, shape, begin, end)}, metadata, offset of the data) of a safetensors file.

    Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
    A truncated, corrupt or non-safetensors file is a CheckpointError saying which."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too short for a safetensors file: truncated or empty")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100_000_000:
            if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or pickle protocol 2+
                raise CheckpointError(f"{path} is a PyTorch pickle/zip file, not safetensors; rename it to .ckpt "
                                      "(it is then read with torch.load(weights_only=True))")
            raise CheckpointError(f"{path}: the header claims {n} bytes but the file has {size}: not a "
                                  "safetensors file, or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}): a corrupt file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object: a corrupt file")
    metadata = header.pop("__metadata__", None) or {}
    data_size, end_max, entries = size - 8 - n, 0, {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            itemsize = _ST_DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {name!r} = {info!r} is malformed or has an unsupported "
                                  f"dtype (supported: {', '.join(_ST_DTYPES)})") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} {dtype}{list(shape)} spans bytes [{begin}, {end}): "
                                  "inconsistent header, a corrupt file")
        if end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at data byte {end} but the file "
                                  f"holds {data_size} (an interrupted download or copy?)")
        end_max = max(end_max, end)
        entries[name] = (dtype, shape, begin, end)
    if end_max != data_size:
        raise CheckpointError(f"{path}: {data_size - end_max} bytes after the last tensor: a corrupt file")
    return entries, dict(metadata), 8 + n


class _Source:
    """Tensors of one checkpoint file: names and shapes without reading data, then the data."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]):
        self.shapes, self.metadata = shapes, metadata

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None,
             device: torch.device = torch.device("cpu"), *, keep_fp8: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor converted by `_target` to dtype / device) for each name; keep_fp8: fp8-stored
        tensors stay fp8 (and memory-mapped) when dtype is None, for a network that upcasts per layer."""
        raise NotImplementedError


class _SafetensorsSource(_Source):
    def __init__(self, path: Path):
        self.entries, metadata, self.data_start = _parse_header(path)
        super().__init__({k: e[1] for k, e in self.entries.items()}, metadata)
        self.path = path

    def read(self, names, dtype=None, device=torch.device("cpu"), *, keep_fp8=False):
        # Kept as is: the memory-mapped tensor itself (zero copy; the mapping lives as long as the
        # parameter). Converted: read into a temporary buffer with plain file I/O, so no mapped page
        # of the source stays resident while the converted copies accumulate (peak = the converted
        # model + one tensor, not + the whole source file).
        with safe_open(self.path, framework="pt") as f, open(self.path, "rb", buffering=0) as raw:
            for name in names:
                stored, shape, begin, end = self.entries[name]
                stored = _ST_DTYPES[stored]
                target = _target(stored, dtype, keep_fp8)
                if target == stored and device.type == "cpu":
                    yield name, f.get_tensor(name)
                    continue
                buf = torch.empty(end - begin, dtype=torch.uint8)
                view, done = memoryview(buf.numpy()), 0
                raw.seek(self.data_start + begin)
                while done < end - begin:
                    got = raw.readinto(view[done:])
                    if not got:
                        raise CheckpointError(f"{self.path} ended while reading {name}: the file was truncated")
                    done += got
                yield name, buf.view(stored).reshape(shape).to(device=device, dtype=target)


class _DictSource(_Source):
    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        super().__init__({k: tuple(v.shape) for k, v in tensors.items()}, metadata or {})
        self.tensors = tensors

    def read(self, names, dtype=None, device=torch.device("cpu"), *, keep_fp8=False):
        for name in names:
            yield name, convert(self.tensors[name], dtype, device, keep_fp8)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a .ckpt/.pt file, unpickling tensors and plain containers only."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to make the message better
            needed = []
        what = f" (it references {', '.join(needed)})" if needed else ""
        raise CheckpointError(
            f"{path} cannot be read without running arbitrary pickled code{what}; diffusekit only reads "
            "tensors from pickles. Convert it to .safetensors in an environment you trust, or use a "
            "safetensors / diffusers release of the model.") from None
    except Exception as e:  # noqa: BLE001 - garbage input can fail inside torch.load in any way
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def open_file(path: Path) -> _Source:
    """The tensors of one .safetensors or weights-only pickle file (chosen by the extension)."""
    if path.suffix == ".safetensors":
        return _SafetensorsSource(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _DictSource(_torch_load(path))
    raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}; valid: .safetensors, "
                          f"{', '.join(PICKLE_SUFFIXES)}, or a diffusers folder with model_index.json")


def _target(stored: torch.dtype, dtype: torch.dtype | None, keep_fp8: bool = False) -> torch.dtype:
    """The dtype a stored tensor is loaded as: `dtype` for floating tensors (None: as stored;
    fp8-stored weights become bf16, since compute needs a real float type, unless `keep_fp8`)."""
    if dtype is None:
        fp8 = stored in (torch.float8_e4m3fn, torch.float8_e5m2)
        return torch.bfloat16 if fp8 and not keep_fp8 else stored
    return dtype if stored.is_floating_point else stored


def convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device, keep_fp8: bool = False) -> torch.Tensor:
    """`t` as `_target` says, on `device`; the tensor itself when nothing changes."""
    target = _target(t.dtype, dtype, keep_fp8)
    if target == t.dtype and t.device == device:
        return t  # zero copy (a memory-mapped safetensors tensor stays mapped)
    return t.to(device=device, dtype=target)


# ------------------------------------------------------------------------------ writing
def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      dtype: torch.dtype | None = None) -> None:
    """Stream tensors into the safetensors format, one (cast) tensor in memory at a time. Larger
    elements first, so every tensor sits at a multiple of its element size (the header is padded
    to 8 bytes), as the reference writer arranges them. `dtype` casts floating tensors."""
    path = Path(path)
    out_dtype = {k: dtype if dtype is not None and t.is_floating_point() else t.dtype for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: (-out_dtype[k].itemsize, k))
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for name in order:
        if out_dtype[name] not in _ST_NAMES:
            raise CheckpointError(f"tensor {name} has dtype {out_dtype[name]}, which safetensors cannot store")
        nbytes = tensors[name].numel() * out_dtype[name].itemsize
        header[name] = {"dtype": _ST_NAMES[out_dtype[name]], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                t = tensors[name].detach().to(device="cpu", dtype=out_dtype[name]).contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

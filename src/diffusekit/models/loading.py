"""Loading and saving whole Stable Diffusion checkpoints.

`load_checkpoint` reads
- a single-file `.safetensors` checkpoint in the LDM / SGM key layout (the files A1111 and
  ComfyUI load: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
  `conditioner.embedders.N.*`), in fp32, fp16 or bf16;
- a `.ckpt` / `.pt` / `.pth` / `.bin` file through `torch.load(weights_only=True, mmap=True)`
  only: a pickle that needs anything beyond tensors and plain containers is refused, never run;
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder*/`, `tokenizer*/`,
  `scheduler/`), renamed to the LDM layout by the `convert_*` tables.

Memory: modules are built on the `meta` device (no allocation, no random init) and receive the
file's tensors with `load_state_dict(assign=True)`. Without a cast or move, the memory-mapped
safetensors tensors (`safe_open`) become the parameters with no copy at all (private copy-on-write
pages: in-place training updates never reach the file); with one, each tensor is read into a
temporary buffer and converted once, so no page of the source stays resident. Peak RSS is about
1.05x the loaded size either way (bench/load.py measures it). Every key is accounted for: missing,
unexpected and mis-shaped keys are one `CheckpointError` naming them. Known non-weight entries
are skipped: LDM's DDPM schedule buffers (`betas`, `alphas_cumprod`, ...), `model_ema.*`,
the encoders' `ignored_keys` (position ids, logit scale); `v_pred` / `ztsnr` marker keys (SDXL
v-prediction fine-tunes) set the family's prediction type / zero-terminal-SNR flag.

`save_checkpoint` writes the same single-file layout (a streamed safetensors writer, temp file +
os.replace) with the `ModelFamily` as JSON metadata, so toy and custom models reload exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from .clip import CLIPTextModel, OpenCLIPTextModel
from .convert_clip import clip_config_from_hf, clip_state_dict_from_hf, openclip_state_dict_from_hf
from .convert_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
from .convert_vae import vae_config_from_diffusers, vae_state_dict_from_diffusers
from .families import CheckpointError, ModelFamily, TextEncoderSpec, detect_family, get_family
from .tokenizer import CLIPTokenizer, find_bundled_bpe
from .unet import UNetModel
from .vae import AutoencoderKL

__all__ = ["CheckpointError", "ModelParts", "load_checkpoint", "save_checkpoint", "predicts_v",
           "read_safetensors_header"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FAMILY_METADATA_KEY = "diffusekit.family"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# LDM `DDPM.register_schedule` buffers and other entries that are not weights of the three parts.
_SKIP_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay", "model_ema.num_updates"})
_SKIP_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_MARKERS = ("v_pred", "ztsnr")  # empty tensors some SDXL fine-tunes carry (read by ComfyUI, sd.cpp)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------ reading tensors
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
             device: torch.device = torch.device("cpu")) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor converted by `_target` to dtype / device) for each name."""
        raise NotImplementedError


class _SafetensorsSource(_Source):
    def __init__(self, path: Path):
        self.entries, metadata, self.data_start = _parse_header(path)
        super().__init__({k: e[1] for k, e in self.entries.items()}, metadata)
        self.path = path

    def read(self, names, dtype=None, device=torch.device("cpu")):
        # Kept as is: the memory-mapped tensor itself (zero copy; the mapping lives as long as the
        # parameter). Converted: read into a temporary buffer with plain file I/O, so no mapped page
        # of the source stays resident while the converted copies accumulate (peak = the converted
        # model + one tensor, not + the whole source file).
        with safe_open(self.path, framework="pt") as f, open(self.path, "rb", buffering=0) as raw:
            for name in names:
                stored, shape, begin, end = self.entries[name]
                stored = _ST_DTYPES[stored]
                target = _target(stored, dtype)
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

    def read(self, names, dtype=None, device=torch.device("cpu")):
        for name in names:
            yield name, _convert(self.tensors[name], dtype, device)


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


def _open_file(path: Path) -> _Source:
    if path.suffix == ".safetensors":
        return _SafetensorsSource(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _DictSource(_torch_load(path))
    raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}; valid: .safetensors, "
                          f"{', '.join(PICKLE_SUFFIXES)}, or a diffusers folder with model_index.json")


# ------------------------------------------------------------------------------ building modules
class _SkipInitOnMeta(TorchFunctionMode):
    """Makes weight initialisers no-ops on meta tensors (there is nothing to initialise). Without
    it `normal_` on a meta tensor runs a Python decomposition that imports torch._dynamo, a
    one-off cost of several seconds per process. Scoped and thread-local (a torch function mode)."""

    _INIT = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                       "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "zero_", "fill_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._INIT:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _build(factory, *args) -> nn.Module:
    with torch.device("meta"), _SkipInitOnMeta():  # shapes only: no memory, no random init
        return factory(*args)


def _text_encoder(spec: TextEncoderSpec) -> nn.Module:
    return _build(CLIPTextModel if spec.kind == "clip" else OpenCLIPTextModel, spec.config)


def _components(family: ModelFamily) -> list[tuple[str, str, nn.Module]]:
    """(label, key prefix, module on meta) for every part of the family."""
    parts = [("unet", UNET_PREFIX, _build(UNetModel, family.unet)),
             ("vae", VAE_PREFIX, _build(AutoencoderKL, family.vae))]
    parts += [(f"text_encoder_{i}", spec.prefix, _text_encoder(spec)) for i, spec in enumerate(family.text_encoders)]
    return parts


def _module_key(module: nn.Module, key: str) -> str:
    # Checkpoints made with transformers < 4.x name CLIP keys without `text_model.` (A1111 fixes them too).
    if isinstance(module, CLIPTextModel) and key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return "text_model." + key
    return key


def _target(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a stored tensor is loaded as: `dtype` for floating tensors (None: as stored;
    fp8-stored weights become bf16, since compute needs a real float type)."""
    if dtype is None:
        return torch.bfloat16 if stored in (torch.float8_e4m3fn, torch.float8_e5m2) else stored
    return dtype if stored.is_floating_point else stored


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    target = _target(t.dtype, dtype)
    if target == t.dtype and t.device == device:
        return t  # zero copy (a memory-mapped safetensors tensor stays mapped)
    return t.to(device=device, dtype=target)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    module.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer the module would have to rebuild itself
        raise RuntimeError(f"{what}: tensors {left} were not in the state dict and are still on meta")
    return module.eval()


def _load_single_file(path: Path, family, dtype, device, probe: bool) -> tuple[list[nn.Module], ModelFamily]:
    src = _open_file(path)
    markers = {k for k in _MARKERS if k in src.shapes}
    fam, how = _resolve_family(family, src.metadata, src.shapes, path)
    if how == "detected" and markers:
        fam = replace(fam, prediction_type="v" if "v_pred" in markers else fam.prediction_type,
                      zero_terminal_snr="ztsnr" in markers)
    components = _components(fam)
    plan = {label: {} for label, _, _ in components}
    unexpected, wrong, misshaped = [], [], set()
    expected = {label: {k: tuple(v.shape) for k, v in m.state_dict().items()} for label, _, m in components}
    for fkey, shape in src.shapes.items():
        if fkey in _SKIP_KEYS or fkey in markers or fkey.startswith(_SKIP_PREFIXES):
            continue
        for label, prefix, module in components:
            if fkey.startswith(prefix):
                mkey = _module_key(module, fkey[len(prefix):])
                want = expected[label].get(mkey)
                if want is None:
                    if mkey not in getattr(module, "ignored_keys", ()):
                        unexpected.append(fkey)
                elif tuple(shape) != want:
                    wrong.append(f"{fkey} {list(shape)} (model: {list(want)})")
                    misshaped.add((label, mkey))
                else:
                    plan[label][mkey] = fkey
                break
        else:
            unexpected.append(fkey)
    missing = [prefix + k for label, prefix, _ in components for k in expected[label]
               if k not in plan[label] and (label, k) not in misshaped]
    if missing or unexpected or wrong:
        _raise_mismatch(path, fam, how, src.shapes, missing, unexpected, wrong)

    modules = []
    for label, _, module in components:
        names = {fkey: mkey for mkey, fkey in plan[label].items()}
        tensors = {names[fkey]: t for fkey, t in src.read(names, dtype, device)}
        modules.append(_assign(module, tensors, f"{path} {label}"))
    if how == "detected" and fam.name == "sd2-v" and probe and not predicts_v(modules[0]):
        fam = replace(get_family("sd2"), unet=fam.unet, vae=fam.vae, text_encoders=fam.text_encoders)
    return modules, fam


def _raise_mismatch(path, fam, how, shapes, missing, unexpected, wrong):
    parts = [f"{label} ({len(keys)}): {_names(sorted(keys))}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    hint = ""
    if how != "detected":
        try:
            looks = detect_family(shapes)
            source = "given" if how == "given" else "read from the file's metadata"
            hint = f" The keys look like family {looks!r}; family {fam.name!r} was {source}."
        except CheckpointError as e:
            hint = f" ({e})"
    elif fam.name != "custom":
        hint = (f" The keys say {fam.name!r} but the shapes are not the published {fam.name} ones; a "
                "model of another size needs its ModelFamily (save_checkpoint stores it in the file).")
    raise CheckpointError(f"{path} does not match family {fam.name!r}: " + "; ".join(parts) + "." + hint)


def _resolve_family(family, metadata, shapes, path) -> tuple[ModelFamily, str]:
    """(family, how it was found: "given" | "metadata" | "detected")."""
    stored = None
    if FAMILY_METADATA_KEY in metadata:
        try:
            stored = ModelFamily.from_dict(json.loads(metadata[FAMILY_METADATA_KEY]))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable {FAMILY_METADATA_KEY} metadata: {e}") from None
    if isinstance(family, ModelFamily):
        return family, "given"
    if family is not None:
        if family == "custom" and stored is None:
            get_family("custom")  # raises, explaining
        named = stored if family == "custom" else get_family(family)
        if stored is not None and family != "custom":
            # the name decides the conventions; the stored configs are the file's true shapes
            if len(stored.text_encoders) != len(named.text_encoders):
                raise CheckpointError(f"{path} stores a {stored.name!r} model with {len(stored.text_encoders)} "
                                      f"text encoder(s); family {family!r} has {len(named.text_encoders)}")
            named = replace(named, unet=stored.unet, vae=stored.vae, text_encoders=tuple(
                replace(spec, config=s.config) for spec, s in zip(named.text_encoders, stored.text_encoders)))
        return named, "given"
    if stored is not None:
        return stored, "metadata"
    return get_family(detect_family(shapes)), "detected"


@torch.no_grad()
def predicts_v(unet: UNetModel) -> bool:
    """Whether an SD 2.x UNet predicts v rather than eps, by A1111's test
    (`sd_models_config.is_using_v_parameterization_for_sd2`): at t = 999 the input x_t = 0.5 is
    almost pure noise, so an eps model returns about x_t (mean(out - x) near 0) while a v model
    returns v = alpha eps - sigma x0, about -x0 (mean(out - x) < -1 for the released 2.x models).
    An empirical rule for trained SD 2 UNets; meaningless for random weights."""
    p = next(unet.parameters())
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, cfg.context_dim), 0.5, dtype=p.dtype, device=p.device)
    out = unet(x, torch.tensor([999.0], device=p.device), context)
    return float((out.float() - x.float()).mean()) < -1.0


# ------------------------------------------------------------------------------ diffusers folders
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing from the diffusers folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of one diffusers component: safetensors first, sharded via an index,
    fp16 variants when the plain file is absent, then .bin pickles (read with weights_only)."""
    for ext in (".safetensors", ".bin"):
        for variant in ("", ".fp16"):
            for stem in ("diffusion_pytorch_model", "model"):
                single = folder / f"{stem}{variant}{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}{variant}{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                    return [folder / s for s in shards]
    raise CheckpointError(f"{folder} has no weight file (diffusion_pytorch_model.safetensors, model.safetensors, "
                          "their .fp16 / sharded / .bin forms)")


def _component_tensors(folder: Path, dtype, device) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        src = _open_file(file)
        out.update(src.read(list(src.shapes), dtype, device))
    return out


def _tokenizer_json(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]] | None:
    """(vocab, merges) of a tokenizer.json (all that transformers >= 5 saves); None if absent."""
    if not (folder / "tokenizer.json").is_file():
        return None
    data = _read_json(folder / "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{folder / 'tokenizer.json'} is a {model.get('type')!r} tokenizer, not CLIP's BPE")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    return vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _folder_tokenizer(folder: Path) -> CLIPTokenizer | None:
    """A transformers tokenizer folder: vocab.json + merges.txt (what the Hub's SD repositories
    carry) or tokenizer.json; None if it has neither."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    found = _tokenizer_json(folder)
    return None if found is None else CLIPTokenizer(*found)


def _pad_id(folder: Path, default: int) -> int:
    """The tokenizer's pad id: its pad_token (special_tokens_map.json / tokenizer_config.json)
    looked up in its vocab; `default` when the folder does not say."""
    vocab = _read_json(folder / "vocab.json") if (folder / "vocab.json").is_file() else (
        (_tokenizer_json(folder) or ({}, []))[0])
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = _read_json(folder / name).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str) and pad in vocab:
                return int(vocab[pad])
    return default


def _diffusers_family(folder: Path, family, ucfg, vcfg, vjson, te_configs, sched) -> ModelFamily:
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get((sched or {}).get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(f"{folder}: scheduler prediction_type={sched['prediction_type']!r} is not supported; "
                              "valid: 'epsilon', 'v_prediction'")
    suffix = "-inpaint" if ucfg.in_channels == 9 else ""
    names = [n for n, _ in te_configs]
    if isinstance(family, ModelFamily):
        base = family
    elif family is not None:
        base = get_family(family)
    elif ucfg.num_classes == "sequential":
        base = get_family("sdxl-refiner" if names == ["text_encoder_2"] else "sdxl" + suffix)
    elif te_configs and te_configs[0][1].act == "gelu":  # OpenCLIP-H (SD 2) rather than CLIP-L (quick_gelu)
        base = get_family("sd2-inpaint" if suffix else ("sd2-v" if prediction == "v" else "sd2"))
    else:
        base = get_family("sd1" + suffix)
    if len(te_configs) != len(base.text_encoders):
        raise CheckpointError(f"{folder} has text encoders {names}; family {base.name!r} needs "
                              f"{len(base.text_encoders)}")
    specs = []
    for spec, (name, cfg) in zip(base.text_encoders, te_configs):
        tok = folder / name.replace("text_encoder", "tokenizer")
        spec = replace(spec, config=cfg, pad_id=_pad_id(tok, spec.pad_id))
        if base.name.startswith("sd2") and not isinstance(family, ModelFamily):
            # diffusers ships SD 2's OpenCLIP-H cut to 23 layers and reads its last layer + final norm,
            # which is the LDM penultimate layer + ln_final.
            spec = replace(spec, layer=-1)
        specs.append(spec)
    fam = replace(base, unet=ucfg, vae=vcfg, text_encoders=tuple(specs),
                  latent_scale=float(vjson.get("scaling_factor", base.latent_scale)))
    if sched:
        fam = replace(fam, zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
                      beta_schedule=replace(fam.beta_schedule,
                                            kind=sched.get("beta_schedule", fam.beta_schedule.kind),
                                            beta_start=float(sched.get("beta_start", fam.beta_schedule.beta_start)),
                                            beta_end=float(sched.get("beta_end", fam.beta_schedule.beta_end)),
                                            num_timesteps=int(sched.get("num_train_timesteps", 1000))))
        if family is None:
            fam = replace(fam, prediction_type=prediction)
    return fam


def _load_diffusers(folder: Path, family, dtype, device) -> tuple[list[nn.Module], ModelFamily, dict | None, list[str]]:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a directory without model_index.json: not a diffusers model folder "
                              "(pass a .safetensors file or a folder saved by DiffusionPipeline.save_pretrained)")
    index = _read_json(folder / "model_index.json")

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and entry[:1] != [None] and (folder / name).is_dir()

    for name in ("unet", "vae"):
        if not present(name):
            raise CheckpointError(f"{folder}: model_index.json has no {name!r} component (or {folder / name} is "
                                  "missing); diffusekit loads UNet + VAE + CLIP text encoder pipelines")

    def config(what, fn, data):
        try:
            return fn(data)
        except ValueError as e:
            raise CheckpointError(f"{folder / what}/config.json: {e}") from None

    vjson = _read_json(folder / "vae" / "config.json")
    ucfg = config("unet", unet_config_from_diffusers, _read_json(folder / "unet" / "config.json"))
    vcfg = config("vae", vae_config_from_diffusers, vjson)
    te_configs = [(n, config(n, clip_config_from_hf, _read_json(folder / n / "config.json")))
                  for n in ("text_encoder", "text_encoder_2") if present(n)]
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file) if sched_file.is_file() else None
    fam = _diffusers_family(folder, family, ucfg, vcfg, vjson, te_configs, sched)

    def load(what: str, module: nn.Module, convert) -> nn.Module:
        try:
            sd = convert(_component_tensors(folder / what, dtype, device))
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{folder / what}: {e}") from None
        return _assign(module, {k: _convert(t, dtype, device) for k, t in sd.items()}, f"{folder / what}")

    modules = [load("unet", _build(UNetModel, fam.unet), lambda sd: unet_state_dict_from_diffusers(sd, fam.unet)),
               load("vae", _build(AutoencoderKL, fam.vae), lambda sd: vae_state_dict_from_diffusers(sd, fam.vae))]
    for spec, (name, _) in zip(fam.text_encoders, te_configs):
        rename = clip_state_dict_from_hf if spec.kind == "clip" else openclip_state_dict_from_hf
        modules.append(load(name, _text_encoder(spec), lambda sd, s=spec, r=rename: r(sd, s.config)))
    return modules, fam, sched, [n for n, _ in te_configs]


# ------------------------------------------------------------------------------ tokenizers
def _tokenizers(source: Path, tokenizer, te_names: list[str]) -> list[CLIPTokenizer]:
    """One tokenizer per text encoder: `tokenizer` if given (an instance, a transformers tokenizer
    folder or a CLIP `bpe_simple_vocab_16e6.txt.gz`), else the diffusers folder's tokenizer*/ files, else the
    BPE file bundled with open_clip. Encoders sharing one vocabulary file share one instance (the
    pad id differs per encoder and is passed at call time: `TextEncoderSpec.pad_id`)."""
    if isinstance(tokenizer, CLIPTokenizer):
        return [tokenizer] * len(te_names)
    if tokenizer is not None:
        path = Path(tokenizer)
        one = CLIPTokenizer.from_bpe_gz(path) if path.name.endswith(".gz") and path.is_file() else (
            _folder_tokenizer(path))
        if one is None:
            raise CheckpointError(f"tokenizer={str(path)!r}: expected a folder with vocab.json + merges.txt (or "
                                  "tokenizer.json), or a CLIP bpe_simple_vocab_16e6.txt.gz file")
        return [one] * len(te_names)
    out, bundled = [], None
    for name in te_names:
        own = _folder_tokenizer(source / name.replace("text_encoder", "tokenizer")) if source.is_dir() else None
        if own is not None:
            out.append(own)
            continue
        if bundled is None:
            bpe = find_bundled_bpe()
            if bpe is None:
                raise CheckpointError(
                    f"{source} carries no tokenizer files and no CLIP BPE vocabulary is installed: run "
                    "`pip install open_clip_torch --no-deps` (it ships bpe_simple_vocab_16e6.txt.gz), or pass "
                    "tokenizer=<folder with vocab.json and merges.txt>, or load a diffusers folder")
            bundled = CLIPTokenizer.from_bpe_gz(bpe)
        out.append(bundled)
    return out


# ------------------------------------------------------------------------------ the public API
@dataclass(eq=False)
class ModelParts:
    """A loaded model: `unet(x, t, context, y)`, `vae.encode/decode`, one text encoder and one
    tokenizer per `family.text_encoders` spec (same order), the family conventions, the diffusers
    scheduler config when the model came from a folder (else None), and its identity."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    tokenizers: list[CLIPTokenizer]
    family: ModelFamily
    scheduler_config: dict | None = None
    name: str = ""
    path: Path | None = None
    files: tuple[Path, ...] = field(default=(), repr=False)

    @cached_property
    def sha256(self) -> str | None:
        """sha256 of the checkpoint file (A1111's model hash), computed on first use; for a
        diffusers folder, of its weight files read in sorted path order; None if built in memory."""
        if not self.files:
            return None
        h = hashlib.sha256()
        for file in self.files:
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()

    @property
    def hash10(self) -> str | None:
        """A1111 "Model hash": the first 10 hex digits of `sha256`."""
        return None if self.sha256 is None else self.sha256[:10]


def load_checkpoint(path: str | os.PathLike, family: str | ModelFamily | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
                    tokenizer: CLIPTokenizer | str | os.PathLike | None = None,
                    probe_prediction: bool = True) -> ModelParts:
    """Load a whole model from a single-file checkpoint or a diffusers folder.

    family: None = from the file's diffusekit metadata, else detected (`detect_family`; a diffusers
      folder: from its UNet config, text encoders and scheduler prediction_type); a name from
      FAMILY_NAMES overrides the conventions (prediction type, ...) while the shapes stay the file's;
      a ModelFamily is used as is for a single file (for a folder, its configs come from config.json).
    dtype: cast floating weights while loading (torch.bfloat16 / float16 halve an fp32 file);
      None keeps the stored dtype. device: where the weights go.
    tokenizer: a CLIPTokenizer to use for every encoder, a folder with vocab.json + merges.txt (or
      tokenizer.json), or a bpe_simple_vocab_16e6.txt.gz file; None: the folder's, else open_clip's.
    probe_prediction: for a detected 4-channel SD 2 single file, run A1111's v-prediction test
      (`predicts_v`) and choose "sd2-v" or "sd2"; False keeps "sd2-v" (the 768-v convention).
    Every failure is a CheckpointError that says what is wrong with the file and what to do.
    """
    path = Path(path)
    device = torch.device(device)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        modules, fam, sched, te_names = _load_diffusers(path, family, dtype, device)
        files = tuple(sorted(f for d in ("unet", "vae", *te_names) for f in _weight_files(path / d)))
    else:
        modules, fam = _load_single_file(path, family, dtype, device, probe_prediction)
        sched, te_names, files = None, [f"text_encoder_{i}" for i in range(len(fam.text_encoders))], (path,)
    tokenizers = _tokenizers(path, tokenizer, te_names)
    return ModelParts(unet=modules[0], vae=modules[1], text_encoders=modules[2:], tokenizers=tokenizers,
                      family=fam, scheduler_config=sched, name=path.stem if path.is_file() else path.name,
                      path=path, files=files)


def save_checkpoint(parts: ModelParts | Mapping[str, object], path: str | os.PathLike, *,
                    family: ModelFamily | None = None, dtype: torch.dtype | None = None,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a single-file LDM-layout safetensors checkpoint, atomically (temp file + os.replace).

    parts: a ModelParts, or a mapping {"unet", "vae", "text_encoders"} together with `family`.
    The family is stored as JSON metadata ("diffusekit.family") so the file reloads with the same
    configs; other tools read the file by its keys. dtype casts floating weights on the way out."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save_checkpoint writes safetensors only; {path} should end in .safetensors")
    if isinstance(parts, ModelParts):
        unet_m, vae_m, encoders, fam = parts.unet, parts.vae, list(parts.text_encoders), family or parts.family
    else:
        if family is None:
            raise CheckpointError("save_checkpoint(mapping, ...) needs family=ModelFamily(...) to name the key layout")
        missing = [k for k in ("unet", "vae", "text_encoders") if k not in parts]
        if missing:
            raise CheckpointError(f"save_checkpoint: the mapping lacks {missing}; give unet, vae, text_encoders")
        unet_m, vae_m, encoders, fam = parts["unet"], parts["vae"], list(parts["text_encoders"]), family
    if len(encoders) != len(fam.text_encoders):
        raise CheckpointError(f"family {fam.name!r} has {len(fam.text_encoders)} text encoder(s); got {len(encoders)}")
    tensors: dict[str, torch.Tensor] = {}
    groups = [(UNET_PREFIX, unet_m), (VAE_PREFIX, vae_m)]
    for spec, module in zip(fam.text_encoders, encoders):
        cls = CLIPTextModel if spec.kind == "clip" else OpenCLIPTextModel
        if not isinstance(module, cls):
            raise CheckpointError(f"text encoder for {spec.prefix} must be a {cls.__name__} (spec kind "
                                  f"{spec.kind!r}); got {type(module).__name__}")
        groups.append((spec.prefix, module))
    for prefix, module in groups:
        tensors.update({prefix + k: t for k, t in module.state_dict().items()})
    meta = {"format": "pt", FAMILY_METADATA_KEY: fam.to_json(), **(metadata or {})}
    _write_safetensors(path, tensors, meta, dtype)
    return path


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
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

"""What loading an SD3 / SD3.5 model needs beyond the LDM-style single file: where its parts live.

Layouts (the files Stability AI releases and ComfyUI / diffusers read):
- single files `sd3_medium.safetensors` (MMDiT + VAE), `sd3_medium_incl_clips.safetensors` (+ CLIP-L and
  CLIP-G), `sd3_medium_incl_clips_t5xxlfp8.safetensors` / `..._t5xxlfp16` (+ T5-XXL), SD3.5
  `sd3.5_large.safetensors` (MMDiT + VAE) with the encoders beside it in `text_encoders/`
  (`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`,
  transformers key layout without prefix);
- diffusers folders: `transformer/` (SD3Transformer2DModel), `vae/`, `text_encoder/` and `text_encoder_2/`
  (CLIPTextModelWithProjection), `text_encoder_3/` (T5EncoderModel, may be null), `tokenizer*/`,
  `scheduler/` (FlowMatchEulerDiscreteScheduler, its `shift`).
T5 is optional (SD3 runs with its states as zeros); its tokenizer is a `tokenizer.json` that single files
do not carry: `find_t5_tokenizer` says where it is looked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from .convert_clip import clip_config_from_hf
from .convert_mmdit import mmdit_config_from_diffusers
from .convert_vae import vae_config_from_diffusers
from .families import CheckpointError, ModelFamily, get_family
from .t5 import t5_config_from_hf

__all__ = ["SD3_ENCODER_NAMES", "T5_TOKENIZER_ENV", "find_text_encoder_files", "find_t5_tokenizer",
           "standalone_prefix", "sd3_diffusers_family"]

SD3_ENCODER_NAMES = ("clip_l", "clip_g", "t5xxl")   # in the order of an SD3 family's text_encoders
T5_TOKENIZER_ENV = "DIFFUSEKIT_T5_TOKENIZER"
_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def find_text_encoder_files(path: Path, given: Mapping[str, str | os.PathLike] | None,
                            names: tuple[str, ...] = SD3_ENCODER_NAMES) -> dict[str, Path]:
    """{"clip_l" | "clip_g" | "t5xxl": file} for an SD3 (or, `names` = ("clip_l", "t5xxl"), Flux) single file's
    encoders kept in separate files.

    `given` wins (unknown names are an error); otherwise `<dir>/text_encoders/` and `<dir>/` are searched
    for `<name>*.safetensors` (the SD3.5 release layout: t5xxl_fp16 preferred over fp8)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CheckpointError(f"text_encoder_files names {unknown}; valid: {', '.join(names)}")
    out = {name: Path(p) for name, p in given.items()}
    for name, p in out.items():
        if not p.is_file():
            raise CheckpointError(f"text_encoder_files[{name!r}] = {p} does not exist")
    for folder in (path.parent / "text_encoders", path.parent):
        if not folder.is_dir():
            continue
        for name in names:
            if name not in out:
                found = sorted(folder.glob(f"{name}*.safetensors"), key=lambda f: ("fp8" in f.name, f.name))
                if found:
                    out[name] = found[0]
    return out


def standalone_prefix(keys, spec_prefix: str) -> str:
    """The key prefix of a stand-alone text encoder file: the single-file one, `transformer.`, or none."""
    for prefix in (spec_prefix, "transformer."):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def find_t5_tokenizer(source: Path, given: str | os.PathLike | None, folder: str = "tokenizer_3") -> Path | None:
    """Where the T5 tokenizer.json is: `given` (a file or folder), else $DIFFUSEKIT_T5_TOKENIZER, else
    `<folder>/` of a diffusers folder (SD3: tokenizer_3, Flux: tokenizer_2), or beside a single file
    (`<dir>/<folder>/`, `<dir>/text_encoders/<folder>/`, `<dir>/text_encoders/t5_tokenizer/`); None if nowhere."""
    if given is not None:
        return Path(given)
    if os.environ.get(T5_TOKENIZER_ENV):
        return Path(os.environ[T5_TOKENIZER_ENV])
    base = source if source.is_dir() else source.parent
    for candidate in (base / folder, base / "text_encoders" / folder,
                      base / "text_encoders" / "t5_tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def config_reader(folder: Path) -> Callable:
    """config(component, parse, data) -> parse(data), a ValueError becoming a CheckpointError naming the file."""
    def config(what, fn, data):
        try:
            return fn(data)
        except ValueError as e:
            raise CheckpointError(f"{folder / what}/config.json: {e}") from None
    return config


def sd3_diffusers_family(folder: Path, family, read_json: Callable[[Path], dict], present: Callable[[str], bool],
                         pad_id: Callable[[Path, int], int]) -> tuple[ModelFamily, dict | None, list[str | None]]:
    """(family, scheduler config, text-encoder folder per family encoder, None where absent) of a diffusers
    StableDiffusion3Pipeline folder, from its JSON files."""
    config = config_reader(folder)

    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if not present(name):
            raise CheckpointError(f"{folder}: the SD3 pipeline has no {name!r} component (model_index.json or "
                                  f"{folder / name} missing); diffusekit needs the transformer, VAE and both CLIPs")
    mcfg = config("transformer", mmdit_config_from_diffusers, read_json(folder / "transformer" / "config.json"))
    vjson = read_json(folder / "vae" / "config.json")
    vcfg = config("vae", vae_config_from_diffusers, vjson)
    base = family if isinstance(family, ModelFamily) else get_family(
        family or ("sd35-medium" if mcfg.x_block_self_attn_layers else "sd35-large" if mcfg.qk_norm else "sd3"))
    if not base.is_mmdit:
        raise CheckpointError(f"{folder} is an SD3 (MMDiT) pipeline; family {base.name!r} is not an SD3 family")
    specs, names = [], []
    for spec, name in zip(base.text_encoders, _FOLDERS):
        if not present(name):
            if not spec.optional:
                raise CheckpointError(f"{folder}: {name} is missing; only text_encoder_3 (T5) is optional")
            specs.append(spec)
            names.append(None)
            continue
        fn = t5_config_from_hf if spec.kind == "t5" else clip_config_from_hf
        cfg = config(name, fn, read_json(folder / name / "config.json"))
        tok = folder / name.replace("text_encoder", "tokenizer")
        specs.append(replace(spec, config=cfg, pad_id=pad_id(tok, spec.pad_id) if spec.kind != "t5" else spec.pad_id))
        names.append(name)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_file) if sched_file.is_file() else None
    if sched and sched.get("use_dynamic_shifting"):
        raise CheckpointError(f"{sched_file}: use_dynamic_shifting=True (resolution-dependent shift, FLUX-style) "
                              "is not supported; SD3 / SD3.5 use a fixed shift")
    fam = replace(base, unet=mcfg, vae=vcfg, text_encoders=tuple(specs),
                  latent_scale=float(vjson.get("scaling_factor", base.latent_scale)),
                  latent_shift=float(vjson.get("shift_factor") or 0.0),
                  flow_shift=float((sched or {}).get("shift", base.flow_shift)))
    return fam, sched, names

"""What loading a Flux.1 model needs beyond the LDM-style single file: where its parts live.

Layouts (the files Black Forest Labs releases and ComfyUI / Forge / diffusers read):
- BFL's `flux1-dev.safetensors` / `flux1-schnell.safetensors`: the transformer alone, keys without prefix
  (`double_blocks.0.img_attn.qkv.weight`), bf16; the autoencoder `ae.safetensors` beside it (LDM VAE keys
  `encoder.*`, `decoder.*`, no prefix) and the encoders in ComfyUI's `text_encoders/` layout
  (`clip_l.safetensors`, `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`);
- ComfyUI checkpoints (`flux1-dev-fp8.safetensors`): `model.diffusion_model.*` (often fp8 e4m3fn),
  `first_stage_model.*` and `text_encoders.{clip_l,t5xxl}.transformer.*`; ComfyUI's own "diffusion
  model" files are the transformer alone with the prefix;
- diffusers folders (FluxPipeline): `transformer/` (FluxTransformer2DModel), `vae/` (AutoencoderKL, its
  scaling 0.3611 and shift 0.1159), `text_encoder/` (CLIPTextModel), `text_encoder_2/` (T5EncoderModel),
  `tokenizer/`, `tokenizer_2/` (T5 tokenizer.json), `scheduler/` (FlowMatchEulerDiscreteScheduler: dev
  `use_dynamic_shifting` with base_shift 0.5 / max_shift 1.15 at 256 / 4096 tokens, schnell shift 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .convert_clip import clip_config_from_hf
from .convert_flux import flux_config_from_diffusers
from .convert_vae import vae_config_from_diffusers
from .families import CheckpointError, ModelFamily, get_family
from .sd3_loading import config_reader
from .t5 import t5_config_from_hf

__all__ = ["FLUX_ENCODER_NAMES", "find_vae_file", "flux_diffusers_family", "is_flux_folder"]

FLUX_ENCODER_NAMES = ("clip_l", "t5xxl")   # in the order of a Flux family's text_encoders
_FOLDERS = ("text_encoder", "text_encoder_2")
VAE_FILE_NAMES = ("ae.safetensors", "flux_ae.safetensors", "vae/ae.safetensors")


def is_flux_folder(index: dict, read_transformer_config: Callable[[], dict]) -> bool:
    """A diffusers folder holds Flux: its model_index names FluxPipeline (or a Flux* pipeline), or its
    transformer is a FluxTransformer2DModel."""
    if str(index.get("_class_name", "")).startswith("Flux"):
        return True
    entry = index.get("transformer")
    return isinstance(entry, list) and len(entry) > 1 and entry[1] == "FluxTransformer2DModel" or (
        read_transformer_config().get("_class_name") == "FluxTransformer2DModel")


def find_vae_file(path: Path, given: str | Path | None) -> Path:
    """The autoencoder of a Flux single file that carries none: `given`, else `ae.safetensors` (BFL's name) beside
    the file or in `<dir>/vae/`; CheckpointError naming the places looked in."""
    if given is not None:
        if not Path(given).is_file():
            raise CheckpointError(f"vae_file={given} does not exist")
        return Path(given)
    looked = [path.parent / name for name in VAE_FILE_NAMES]
    for candidate in looked:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path} holds no VAE (first_stage_model.*) and none was found at "
                          f"{', '.join(map(str, looked))}: put BFL's ae.safetensors beside it or pass vae_file=")


def flux_diffusers_family(folder: Path, family, read_json: Callable[[Path], dict], present: Callable[[str], bool],
                          pad_id: Callable[[Path, int], int]) -> tuple[ModelFamily, dict | None, list[str | None]]:
    """(family, scheduler config, text-encoder folders) of a diffusers FluxPipeline folder, from its JSON files."""
    config = config_reader(folder)

    for name in ("transformer", "vae", *_FOLDERS):
        if not present(name):
            raise CheckpointError(f"{folder}: the Flux pipeline has no {name!r} component (model_index.json or "
                                  f"{folder / name} missing); diffusekit needs the transformer, VAE, CLIP-L and T5")
    fcfg = config("transformer", flux_config_from_diffusers, read_json(folder / "transformer" / "config.json"))
    vjson = read_json(folder / "vae" / "config.json")
    vcfg = config("vae", vae_config_from_diffusers, vjson)
    base = family if isinstance(family, ModelFamily) else get_family(
        family or ("flux-dev" if fcfg.guidance_embed else "flux-schnell"))
    if not base.is_flux:
        raise CheckpointError(f"{folder} is a Flux pipeline; family {base.name!r} is not a Flux family "
                              "(valid: flux-dev, flux-schnell)")
    specs = []
    for spec, name in zip(base.text_encoders, _FOLDERS):
        fn = t5_config_from_hf if spec.kind == "t5" else clip_config_from_hf
        cfg = config(name, fn, read_json(folder / name / "config.json"))
        tok = folder / name.replace("text_encoder", "tokenizer")
        specs.append(replace(spec, config=cfg, pad_id=pad_id(tok, spec.pad_id) if spec.kind != "t5" else spec.pad_id))
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_file) if sched_file.is_file() else None
    fam = replace(base, unet=fcfg, vae=vcfg, text_encoders=tuple(specs),
                  latent_scale=float(vjson.get("scaling_factor", base.latent_scale)),
                  latent_shift=float(vjson.get("shift_factor") or 0.0))
    if sched:
        dynamic = None
        if sched.get("use_dynamic_shifting"):
            lo_n, hi_n = int(sched.get("base_image_seq_len", 256)), int(sched.get("max_image_seq_len", 4096))
            lo, hi = float(sched.get("base_shift", 0.5)), float(sched.get("max_shift", 1.15))
            if (lo_n, hi_n) != (256, 4096):   # the same line, re-expressed at 256 and 4096 tokens
                slope = (hi - lo) / (hi_n - lo_n)
                lo, hi = lo + slope * (256 - lo_n), lo + slope * (4096 - lo_n)
            if sched.get("time_shift_type", "exponential") != "exponential":
                raise CheckpointError(f"{sched_file}: time_shift_type={sched['time_shift_type']!r}; "
                                      "only Flux's 'exponential' shift is supported")
            dynamic = (lo, hi)
        fam = replace(fam, dynamic_shift=dynamic, flow_shift=float(sched.get("shift", 1.0)) if dynamic is None
                      else fam.flow_shift)
    return fam, sched, list(_FOLDERS)

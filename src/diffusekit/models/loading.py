"""Loading and saving whole Stable Diffusion checkpoints.

`load_checkpoint` reads
- a single-file `.safetensors` checkpoint in the LDM / SGM key layout (the files A1111 and
  ComfyUI load: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
  `conditioner.embedders.N.*`), in fp32, fp16 or bf16;
- a `.ckpt` / `.pt` / `.pth` / `.bin` file through `torch.load(weights_only=True, mmap=True)`
  only: a pickle that needs anything beyond tensors and plain containers is refused, never run;
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder*/`, `tokenizer*/`,
  `scheduler/`), renamed to the LDM layout by the `convert_*` tables;
- Flux.1 dev / schnell (`flux_loading` says where their parts live): BFL's transformer-only files (keys
  without prefix, `ae.safetensors` and the encoders beside them), ComfyUI checkpoints and diffusers
  FluxPipeline folders. The transformer's bf16 / fp8 weights stay as stored and memory-mapped when
  dtype is None (each layer is upcast at compute time: `flux.Flux.compute_dtype`);
- SD3 / SD3.5 (an MMDiT instead of the UNet; `sd3_loading` says where their parts live): single files
  with or without their text encoders (those missing are read from stand-alone files beside it, T5 may
  be absent altogether) and diffusers `StableDiffusion3Pipeline` folders. fp8-stored weights (the
  t5xxl_fp8 releases) are upcast on load: to `dtype`, or bf16 when None, as CPUs cannot compute in fp8.

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
os.replace) with the `ModelFamily` as JSON metadata, so toy and custom models reload exactly. A
pixel-space family (`family.vae is None`: the UNet denoises the pixels) has no `first_stage_model.*`
keys and loads with `ModelParts.vae = None`; since no published layout looks like that, such a file
is read by its stored family (or one passed in). The file formats themselves (safetensors header
checks, memory-mapped and converting reads, weights-only pickles, the writer) live in `weight_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import flux_loading, sd3_loading
from .clip import CLIPTextModel, OpenCLIPTextModel
from .convert_clip import clip_config_from_hf, clip_state_dict_from_hf, openclip_state_dict_from_hf
from .convert_flux import flux_config_from_shapes, flux_state_dict_from_diffusers
from .convert_mmdit import mmdit_config_from_shapes, mmdit_state_dict_from_diffusers
from .convert_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
from .convert_vae import vae_config_from_diffusers, vae_state_dict_from_diffusers
from .families import CheckpointError, ModelFamily, TextEncoderSpec, detect_family, flux_key_prefix, get_family
from .flux import Flux
from .keys import key_list
from .mmdit import MMDiT
from .t5 import T5EncoderModel
from .t5_tokenizer import T5Tokenizer
from .tokenizer import CLIPTokenizer, find_bundled_bpe, read_tokenizer_files
from .unet import UNetModel
from .vae import AutoencoderKL
from .weight_files import convert, open_file, read_safetensors_header, write_safetensors

__all__ = ["CheckpointError", "ModelParts", "load_checkpoint", "save_checkpoint", "predicts_v", "read_family",
           "read_safetensors_header"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
FAMILY_METADATA_KEY = "diffusekit.family"

# LDM `DDPM.register_schedule` buffers and other entries that are not weights of the three parts.
_SKIP_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay", "model_ema.num_updates"})
_SKIP_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_MARKERS = ("v_pred", "ztsnr")  # empty tensors some SDXL fine-tunes carry (read by ComfyUI, sd.cpp)


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


_ENCODER_CLASSES = {"clip": CLIPTextModel, "openclip": OpenCLIPTextModel, "t5": T5EncoderModel}


def _text_encoder(spec: TextEncoderSpec) -> nn.Module:
    return _build(_ENCODER_CLASSES[spec.kind], spec.config)


def _network_class(family: ModelFamily) -> type[nn.Module]:
    return Flux if family.is_flux else MMDiT if family.is_mmdit else UNetModel


def _components(family: ModelFamily, net_prefix: str = UNET_PREFIX) -> list[tuple[str, str, nn.Module]]:
    """(label, key prefix, module on meta) for every part of the family (no VAE for a pixel-space one);
    `net_prefix`: where the denoising network's keys are ("" in BFL's Flux files)."""
    parts = [("unet", net_prefix, _build(_network_class(family), family.unet))]
    if family.vae is not None:
        parts.append(("vae", VAE_PREFIX, _build(AutoencoderKL, family.vae)))
    parts += [(f"text_encoder_{i}", spec.prefix, _text_encoder(spec)) for i, spec in enumerate(family.text_encoders)]
    return parts


def _module_key(module: nn.Module, key: str, has_key: Callable[[str], bool] = lambda k: True) -> str:
    # Checkpoints made with transformers < 4.x name CLIP keys without `text_model.` (A1111 fixes them too).
    if isinstance(module, CLIPTextModel) and key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return "text_model." + key
    if isinstance(module, T5EncoderModel):
        return _t5_key(key, has_key)
    return key


def _t5_key(key: str, has_key: Callable[[str], bool]) -> str:
    """T5's token table is stored as `shared`, as its tied alias `encoder.embed_tokens`, or as both."""
    return "shared.weight" if key == "encoder.embed_tokens.weight" and not has_key("shared.weight") else key


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    module.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer the module would have to rebuild itself
        raise RuntimeError(f"{what}: tensors {left} were not in the state dict and are still on meta")
    return module.eval()


def _file_family(src, family, path: Path) -> tuple[ModelFamily, str, set[str]]:
    """(family, how it was found, marker keys present) of a single file, from its keys and metadata."""
    markers = {k for k in _MARKERS if k in src.shapes}
    fam, how = _resolve_family(family, src.metadata, src.shapes, path)
    if how == "detected" and markers:
        fam = replace(fam, prediction_type="v" if "v_pred" in markers else fam.prediction_type,
                      zero_terminal_snr="ztsnr" in markers)
    return fam, how, markers


def _load_single_file(path: Path, family, dtype, device, probe: bool,
                      te_files=None, vae_file=None) -> tuple[dict[str, nn.Module | None], ModelFamily]:
    src = open_file(path)
    fam, how, markers = _file_family(src, family, path)
    net_prefix = (flux_key_prefix(src.shapes) if fam.is_flux else None)
    components = _components(fam, UNET_PREFIX if net_prefix is None else net_prefix)
    # SD3 / Flux files may leave out their text encoders (and Flux, its VAE): those come from stand-alone
    # files (or, SD3's T5, not at all). BFL's prefix-less Flux file holds the transformer only.
    bare = net_prefix == ""
    absent = {label for label, prefix, _ in components if fam.is_transformer and label != "unet"
              and (label != "vae" or fam.is_flux) and (bare or not any(k.startswith(prefix) for k in src.shapes))}
    components = [c for c in components if c[0] not in absent]
    plan = {label: {} for label, _, _ in components}
    unexpected, wrong, misshaped = [], [], set()
    expected = {label: {k: tuple(v.shape) for k, v in m.state_dict().items()} for label, _, m in components}
    for fkey, shape in src.shapes.items():
        if fkey in _SKIP_KEYS or fkey in markers or fkey.startswith(_SKIP_PREFIXES):
            continue
        for label, prefix, module in components:
            if fkey.startswith(prefix):
                mkey = _module_key(module, fkey[len(prefix):], lambda k, p=prefix: p + k in src.shapes)
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

    modules = {}
    for label, _, module in components:
        names = {fkey: mkey for mkey, fkey in plan[label].items()}
        # Flux keeps fp8 as stored (upcast per layer at compute time); other networks get bf16 at load
        keep_fp8 = label == "unet" and fam.is_flux and dtype is None
        tensors = {names[fkey]: t for fkey, t in src.read(names, dtype, device, keep_fp8=keep_fp8)}
        modules[label] = _assign(module, tensors, f"{path} {label}")
    if "vae" in absent:
        modules["vae"] = _standalone_vae(flux_loading.find_vae_file(path, vae_file), fam, dtype, device)
        absent.discard("vae")
    if absent:
        modules |= _standalone_encoders(path, fam, sorted(absent), te_files, dtype, device)
    if how == "detected" and fam.name == "sd2-v" and probe and not predicts_v(modules["unet"]):
        fam = replace(get_family("sd2"), unet=fam.unet, vae=fam.vae, text_encoders=fam.text_encoders)
    return modules, fam


def _standalone_encoders(path: Path, fam: ModelFamily, labels: list[str], te_files, dtype,
                         device) -> dict[str, nn.Module | None]:
    """SD3 text encoders a single file lacks, read from stand-alone files (`sd3_loading.find_text_encoder_files`);
    an optional one (T5) with no file is None."""
    all_names = flux_loading.FLUX_ENCODER_NAMES if fam.is_flux else sd3_loading.SD3_ENCODER_NAMES
    files = sd3_loading.find_text_encoder_files(path, te_files, all_names)
    out: dict[str, nn.Module | None] = {}
    for label in labels:
        i = int(label.rsplit("_", 1)[1])
        spec, name = fam.text_encoders[i], all_names[i]
        if name not in files:
            if spec.optional:
                out[label] = None
                continue
            raise CheckpointError(
                f"{path} has no {name} ({spec.prefix}*) and no {name}*.safetensors was found in "
                f"{path.parent / 'text_encoders'} or {path.parent}: put the encoder files there (the SD3.5 release "
                f"layout) or pass text_encoder_files={{'{name}': 'path/to/{name}.safetensors', ...}}")
        src, module = open_file(files[name]), _text_encoder(spec)
        prefix = sd3_loading.standalone_prefix(src.shapes, spec.prefix)
        names = {}
        for fkey in src.shapes:
            mkey = _module_key(module, fkey[len(prefix):] if fkey.startswith(prefix) else fkey,
                               lambda k: prefix + k in src.shapes)
            if mkey not in getattr(module, "ignored_keys", ()):
                names[fkey] = mkey
        out[label] = _read_part(files[name], src, module, names, f"the {name} text encoder of family {fam.name!r}",
                                dtype, device)
    return out


def _read_part(file: Path, src, module: nn.Module, names: dict[str, str], what: str, dtype, device) -> nn.Module:
    """A stand-alone part file's tensors ({file key: module key} `names`) into `module`; a CheckpointError
    listing missing, unexpected and mis-shaped keys ("{file} is not {what}: ...")."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(names.values()))
    unexpected = sorted(f for f, m in names.items() if m not in want)
    wrong = sorted(f"{f} {list(src.shapes[f])} (model: {list(want[m])})" for f, m in names.items()
                   if m in want and tuple(src.shapes[f]) != want[m])
    if missing or unexpected or wrong:
        parts = [f"{kind} ({len(k)}): {key_list(k)}" for kind, k in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if k]
        raise CheckpointError(f"{file} is not {what}: " + "; ".join(parts))
    return _assign(module, {names[f]: t for f, t in src.read(list(names), dtype, device)}, f"{file} ({what})")


def _standalone_vae(file: Path, fam: ModelFamily, dtype, device) -> nn.Module:
    """A VAE file beside a Flux transformer (BFL's `ae.safetensors`: LDM keys without prefix, or with
    `first_stage_model.` / `vae.`)."""
    src, module = open_file(file), _build(AutoencoderKL, fam.vae)
    prefix = next((p for p in (VAE_PREFIX, "vae.") if any(k.startswith(p) for k in src.shapes)), "")
    names = {f: f[len(prefix):] for f in src.shapes if f.startswith(prefix)}
    return _read_part(file, src, module, names, f"the 16-channel VAE of family {fam.name!r}", dtype, device)


def _raise_mismatch(path, fam, how, shapes, missing, unexpected, wrong):
    parts = [f"{label} ({len(keys)}): {key_list(keys)}" for label, keys in
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
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    if fam.vae is None and has_vae:
        hint += (f" Family {fam.name!r} is a pixel-space model (vae=None) but the file holds a VAE "
                 f"({VAE_PREFIX}*): give a family with its VAEConfig.")
    elif fam.vae is not None and not has_vae:
        hint += (f" The file holds no VAE ({VAE_PREFIX}*): a pixel-space model, whose family needs vae=None "
                 "(save_checkpoint stores such a family in the file).")
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
    fam = get_family(detect_family(shapes))
    if fam.is_mmdit:  # the MMDiT's exact shape (SD3.5 Large Turbo, fine-tunes, toy files) from its keys
        fam = replace(fam, unet=mmdit_config_from_shapes(shapes))
    elif fam.is_flux:
        fam = replace(fam, unet=flux_config_from_shapes(shapes, flux_key_prefix(shapes)))
    return fam, "detected"


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
        src = open_file(file)
        out.update(src.read(list(src.shapes), dtype, device))
    return out


def _folder_tokenizer(folder: Path) -> CLIPTokenizer | None:
    """A transformers tokenizer folder (`CLIPTokenizer.from_pretrained`); None if it holds no tokenizer."""
    try:
        found = read_tokenizer_files(folder)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return None if found is None else CLIPTokenizer(found[0], found[1], added_tokens=found[2],
                                                    special_tokens=found[3])


def _pad_id(folder: Path, default: int) -> int:
    """The tokenizer's pad id: its pad_token (special_tokens_map.json / tokenizer_config.json)
    looked up in its vocab; `default` when the folder does not say."""
    found = read_tokenizer_files(folder)
    vocab = {} if found is None else {**found[0], **found[2], **found[3]}
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


def _diffusers_configs(folder: Path, family) -> tuple[ModelFamily, dict | None, list[str | None]]:
    """(family, scheduler config, text encoder folder names) of a diffusers folder, from its JSON files
    (None for an absent optional encoder: SD3 without T5)."""
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a directory without model_index.json: not a diffusers model folder "
                              "(pass a .safetensors file or a folder saved by DiffusionPipeline.save_pretrained)")
    index = _read_json(folder / "model_index.json")

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and entry[:1] != [None] and (folder / name).is_dir()

    if "transformer" in index and flux_loading.is_flux_folder(
            index, lambda: _read_json(folder / "transformer" / "config.json")):    # FluxPipeline
        return flux_loading.flux_diffusers_family(folder, family, _read_json, present, _pad_id)
    if "transformer" in index:   # StableDiffusion3Pipeline: an MMDiT instead of the UNet
        return sd3_loading.sd3_diffusers_family(folder, family, _read_json, present, _pad_id)
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
    return _diffusers_family(folder, family, ucfg, vcfg, vjson, te_configs, sched), sched, [n for n, _ in te_configs]


def _load_diffusers(folder: Path, family, dtype, device) -> tuple[dict[str, nn.Module], ModelFamily, dict | None,
                                                                  list[str]]:
    fam, sched, te_names = _diffusers_configs(folder, family)

    def load(what: str, module: nn.Module, rename) -> nn.Module:
        try:
            sd = rename(_component_tensors(folder / what, dtype, device))
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{folder / what}: {e}") from None
        return _assign(module, {k: convert(t, dtype, device) for k, t in sd.items()}, f"{folder / what}")

    if fam.is_flux:
        net = load("transformer", _build(Flux, fam.unet), lambda sd: flux_state_dict_from_diffusers(sd, fam.unet))
    elif fam.is_mmdit:
        net = load("transformer", _build(MMDiT, fam.unet), lambda sd: mmdit_state_dict_from_diffusers(sd, fam.unet))
    else:
        net = load("unet", _build(UNetModel, fam.unet), lambda sd: unet_state_dict_from_diffusers(sd, fam.unet))
    modules = {"unet": net,
               "vae": load("vae", _build(AutoencoderKL, fam.vae), lambda sd: vae_state_dict_from_diffusers(sd, fam.vae))}
    for i, (spec, name) in enumerate(zip(fam.text_encoders, te_names)):
        if name is None:                           # an optional encoder the pipeline was saved without
            modules[f"text_encoder_{i}"] = None
            continue
        rename = {"clip": clip_state_dict_from_hf, "openclip": openclip_state_dict_from_hf, "t5": _t5_from_hf}[spec.kind]
        modules[f"text_encoder_{i}"] = load(name, _text_encoder(spec), lambda sd, s=spec, r=rename: r(sd, s.config))
    return modules, fam, sched, te_names


def _t5_from_hf(sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers T5EncoderModel keys are ours; the tied alias `encoder.embed_tokens` is dropped (or is `shared`)."""
    out = {_t5_key(k, sd.__contains__): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if k not in T5EncoderModel.ignored_keys}


# ------------------------------------------------------------------------------ tokenizers
def _tokenizers(source: Path, tokenizer, te_names: list[str | None], fam: ModelFamily, modules: dict,
                t5_tokenizer) -> list[CLIPTokenizer | T5Tokenizer | None]:
    """One tokenizer per text encoder of `fam`: CLIP ones by `_clip_tokenizers`, T5 (SD3) from
    `sd3_loading.find_t5_tokenizer`; None for an absent optional encoder."""
    clip = iter(_clip_tokenizers(source, tokenizer, [n for s, n in zip(fam.text_encoders, te_names) if s.kind != "t5"]))
    out: list[CLIPTokenizer | T5Tokenizer | None] = []
    for i, spec in enumerate(fam.text_encoders):
        if spec.kind != "t5":
            out.append(next(clip))
        elif modules.get(f"text_encoder_{i}") is None:
            out.append(None)
        else:
            where = sd3_loading.find_t5_tokenizer(source, t5_tokenizer, "tokenizer_2" if fam.is_flux else "tokenizer_3")
            if where is None:
                raise CheckpointError(
                    f"{source} has a T5 text encoder but no T5 tokenizer was found: pass t5_tokenizer=<tokenizer.json "
                    f"or a folder with one>, set ${sd3_loading.T5_TOKENIZER_ENV} (CLI, server), or put a "
                    + ("tokenizer_2/ folder (from a diffusers Flux repository)" if fam.is_flux else
                       "tokenizer_3/ folder (from a diffusers SD3 repository)") + " beside the file")
            try:
                out.append(T5Tokenizer.from_file(where))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"T5 tokenizer {where}: {e}") from None
    return out


def _clip_tokenizers(source: Path, tokenizer, te_names: list[str]) -> list[CLIPTokenizer]:
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
    """A loaded model: `unet(x, t, context, y)` (the UNet, or an SD3 family's MMDiT), `vae.encode/decode`
    (None for a pixel-space model, `family.vae is None`: the UNet works on the pixels), one text encoder
    and one tokenizer per `family.text_encoders` spec (same order; None for an absent optional encoder,
    SD3's T5), the family conventions, the diffusers scheduler config when the model came from a folder
    (else None), and its identity."""

    unet: UNetModel | MMDiT
    vae: AutoencoderKL | None
    text_encoders: list[nn.Module | None]
    tokenizers: list[CLIPTokenizer | T5Tokenizer | None]
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
                    probe_prediction: bool = True,
                    text_encoder_files: Mapping[str, str | os.PathLike] | None = None,
                    t5_tokenizer: str | os.PathLike | None = None,
                    vae_file: str | os.PathLike | None = None) -> ModelParts:
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
    text_encoder_files: SD3 single files without their encoders: {"clip_l": file, "clip_g": file, "t5xxl": file}
      (default: `<dir>/text_encoders/<name>*.safetensors`, then `<dir>/<name>*.safetensors`); no T5 = zeros.
    t5_tokenizer: SD3's T5 tokenizer.json (or a folder with one); default: $DIFFUSEKIT_T5_TOKENIZER, a
      diffusers folder's tokenizer_3/, or a tokenizer_3/ folder beside the file (Flux: tokenizer_2/).
      Flux single files: text_encoder_files={"clip_l": ..., "t5xxl": ...} as for SD3; vae_file: the
      autoencoder of a file without one (default: `ae.safetensors` beside it).
    Every failure is a CheckpointError that says what is wrong with the file and what to do.
    """
    path = Path(path)
    device = torch.device(device)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        modules, fam, sched, te_names = _load_diffusers(path, family, dtype, device)
        net = "transformer" if fam.is_transformer else "unet"
        files = tuple(sorted(f for d in (net, "vae", *te_names) if d for f in _weight_files(path / d)))
    else:
        modules, fam = _load_single_file(path, family, dtype, device, probe_prediction, text_encoder_files, vae_file)
        sched, te_names, files = None, [f"text_encoder_{i}" for i in range(len(fam.text_encoders))], (path,)
    tokenizers = _tokenizers(path, tokenizer, te_names, fam, modules, t5_tokenizer)
    encoders = [modules[f"text_encoder_{i}"] for i in range(len(fam.text_encoders))]
    return ModelParts(unet=modules["unet"], vae=modules.get("vae"), text_encoders=encoders, tokenizers=tokenizers,
                      family=fam, scheduler_config=sched, name=path.stem if path.is_file() else path.name,
                      path=path, files=files)


def read_family(path: str | os.PathLike, family: str | ModelFamily | None = None) -> ModelFamily:
    """The ModelFamily that `load_checkpoint(path, family)` would use, read without building any module:
    a safetensors file's header (metadata, else key names and shapes), a pickle's tensor shapes, or a
    diffusers folder's JSON files. A detected 4-channel SD 2 file reads as "sd2-v" (no v-prediction probe:
    that needs the weights). Errors are CheckpointErrors, as for load_checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        return _diffusers_configs(path, family)[0]
    return _file_family(open_file(path), family, path)[0]


def save_checkpoint(parts: ModelParts | Mapping[str, object], path: str | os.PathLike, *,
                    family: ModelFamily | None = None, dtype: torch.dtype | None = None,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a single-file LDM-layout safetensors checkpoint, atomically (temp file + os.replace).

    parts: a ModelParts, or a mapping {"unet", "vae", "text_encoders"} together with `family`; for a
    pixel-space family (family.vae is None) the VAE is None or left out. The family is stored as JSON metadata ("diffusekit.family") so the file reloads with the same
    configs; other tools read the file by its keys. dtype casts floating weights on the way out."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save_checkpoint writes safetensors only; {path} should end in .safetensors")
    if isinstance(parts, ModelParts):
        unet_m, vae_m, encoders, fam = parts.unet, parts.vae, list(parts.text_encoders), family or parts.family
    else:
        if family is None:
            raise CheckpointError("save_checkpoint(mapping, ...) needs family=ModelFamily(...) to name the key layout")
        needed = ("unet", "text_encoders") if family.vae is None else ("unet", "vae", "text_encoders")
        missing = [k for k in needed if k not in parts]
        if missing:
            raise CheckpointError(f"save_checkpoint: the mapping lacks {missing}; give {', '.join(needed)}")
        unet_m, vae_m, encoders, fam = parts["unet"], parts.get("vae"), list(parts["text_encoders"]), family
    if len(encoders) != len(fam.text_encoders):
        raise CheckpointError(f"family {fam.name!r} has {len(fam.text_encoders)} text encoder(s); got {len(encoders)}")
    if (vae_m is None) != (fam.vae is None):
        raise CheckpointError(
            f"family {fam.name!r} is a pixel-space model (vae=None) but a {type(vae_m).__name__} VAE was given: "
            "pass vae=None, or a family with the VAE's config" if fam.vae is None else
            f"family {fam.name!r} has a VAE ({fam.vae}) but vae is None: give the AutoencoderKL, or "
            "replace(family, vae=None) for a pixel-space model")
    tensors: dict[str, torch.Tensor] = {}
    groups = [(UNET_PREFIX, unet_m)] + ([(VAE_PREFIX, vae_m)] if vae_m is not None else [])
    for spec, module in zip(fam.text_encoders, encoders):
        cls = _ENCODER_CLASSES[spec.kind]
        if module is None and spec.optional:       # SD3 without T5: the file has no such keys, it loads as None
            continue
        if not isinstance(module, cls):
            raise CheckpointError(f"text encoder for {spec.prefix} must be a {cls.__name__} (spec kind "
                                  f"{spec.kind!r}); got {type(module).__name__}")
        groups.append((spec.prefix, module))
    for prefix, module in groups:
        tensors.update({prefix + k: t for k, t in module.state_dict().items()})
    meta = {"format": "pt", FAMILY_METADATA_KEY: fam.to_json(), **(metadata or {})}
    write_safetensors(path, tensors, meta, dtype)
    return path

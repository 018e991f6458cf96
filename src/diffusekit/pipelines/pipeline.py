"""The generation pipeline: txt2img, img2img, inpainting, hires fix and refiner hand-over.

The only layer that knows Stable Diffusion's specifics: latent scale, 77-token context, eps vs v, the
SDXL `y` vector, A1111's img2img step arithmetic and seeds. Everything else is composed from `core`
(schedules, sigmas, denoisers, guidance, samplers) and `models` (networks and checkpoints).

Deliberate differences from A1111 v1.10 (besides those listed in `conditioning.TextConditioner`):
- the VAE encodes init images with its posterior mean (deterministic); A1111 samples the posterior with
  the unseeded global RNG;
- prompt editing counts sampling steps, not model calls: for second-order samplers (Heun, DPM2, DPM++ SDE,
  DPM++ 2S a, Restart) A1111 counts both calls of a step over a schedule of 2 x steps, so there an integer
  `when` is half a step of ours (fractions agree);
- in img2img the prompt-editing schedule spans the steps actually run (t_enc + 1); A1111 spans all `steps`
  but counts from 0 in the shortened run, so its `[a:b:0.5]` at strength 0.5 never switches;
- the refiner is a second sampler call on the rest of the same sigma schedule (A1111 swaps the model inside
  one loop), so a multistep sampler (DPM++ 2M, UniPC, LMS) restarts its history at the hand-over. A refiner
  with another latent scale gets the latent with its signal part rescaled (x + (r - 1) x0_estimate, r the
  scale ratio; the noise part stays), and its result comes back the same way; images are decoded with the
  base model's VAE (A1111 uses the refiner's; SDXL's two are the same).
"""
from __future__ import annotations

import inspect
import random
import time
from contextlib import closing
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..version import __version__
from ..core import samplers as sampler_registry
from ..core import sigmas as sigma_schedules
from ..core.consistency import ConsistencyDenoiser
from ..core.denoisers import EpsDenoiser, FlowDenoiser, VDenoiser
from ..core.guidance import cfg
from ..core.schedules import DiscreteSchedule
from ..models.embeddings import EmbeddingLibrary
from ..models.loading import ModelParts, load_checkpoint, read_family
from ..models.lora import LoRATargets, merged
from ..models.unet import keep_stored_weights
from . import infotext as infotext_mod
from .loras import LoraLibrary, extract_loras, infotext_name, lora_hashes_text
from . import prompts as prompt_mod
from .conditioning import Conditioning, TextConditioner, adm_vector
from .conditioning_flux import FluxTextConditioner
from .conditioning_sd3 import JointTextConditioner
from .latents import (LATENT_RGB, fill_masked, fit_latent_rgb, initial_noise, latent_mask, overlay_mask,
                      pil_to_tensor, prepare_mask, preview, tensor_to_pil)
from .params import GenerationParams, GenerationResult, StepInfo
from .sde_noise import BROWNIAN_SAMPLERS, changes_image, pass_noise, require_torchsde
from .shipped import family_defaults, recommended, resolve_model, shipped_name
from .state import PromptSteps, SamplingPass, _Batch, _Call, _ConcatKey, _InitImages

# A1111's defaults for the SDXL refiner's aesthetic-score input (sdxl_refiner_high/low_aesthetic_score)
AESTHETIC_SCORE_COND, AESTHETIC_SCORE_UNCOND = 6.0, 2.5

# A1111's latent upscale modes for hires fix: name -> (torch interpolate mode, antialias)
HIRES_LATENT_MODES = {
    "latent": ("bilinear", False), "latent (antialiased)": ("bilinear", True),
    "latent (bicubic)": ("bicubic", False), "latent (bicubic antialiased)": ("bicubic", True),
    "latent (nearest)": ("nearest", False), "latent (nearest-exact)": ("nearest-exact", False),
}


DECODE_PIXELS_PER_CALL = 1024 * 1024   # VAE decode: as many images per call as hold this many pixels (>= 1)
VAE_TILE, VAE_TILE_OVERLAP = 64, 16     # `vae_tiling`: tiles of 64 latent pixels (512 px at factor 8), 16 shared


class NonFiniteOutput(RuntimeError):
    """Sampling or decoding gave NaN / inf: the model (its weights or configuration) is broken, not the
    request; raised instead of returning the black image such values turn into."""


class Interrupted(Exception):
    """Raised inside sampling when the caller asked to stop; carries the last x0 estimate, which the
    pipeline decodes and returns (as A1111 returns its last latent)."""

    def __init__(self, latent: torch.Tensor):
        super().__init__("generation interrupted")
        self.latent = latent


def split_sampler_name(name: str, scheduler: str) -> tuple[str, str]:
    """A1111 < 1.9 names carried the schedule ("DPM++ 2M Karras"): split them into sampler + schedule."""
    try:
        return sampler_registry.resolve(name), scheduler
    except ValueError:
        for label, sid in sigma_schedules.DISPLAY_NAMES.items():
            if label != "Automatic" and name.lower().endswith(" " + label.lower()):
                return sampler_registry.resolve(name[: -len(label) - 1]), label
        raise


def image_seeds(seed: int, subseed: int, subseed_strength: float, start: int, count: int):
    """A1111's seeds of images start .. start + count - 1 of a job (processing.py, `all_seeds`): seed + i and
    subseed + i, except that with a variation (subseed_strength > 0) the seed stays and only the subseed
    advances, so a batch shows variations of one image."""
    seeds = [seed + (0 if subseed_strength > 0 else i) for i in range(start, start + count)]
    return seeds, [subseed + i for i in range(start, start + count)]


def _rows(t: torch.Tensor, b: int) -> torch.Tensor:
    """b rows from the n rows of t, used in turn (n = 1: a view, no copy)."""
    n = t.shape[0]
    return t.expand(b, *t.shape[1:]) if n == 1 else t[[i % n for i in range(b)]]


def _at(entries: list, step: int):
    """The value of a prompt-editing list [(end_step, value)] in force at `step` (first end >= step)."""
    for end, value in entries:
        if step <= end:
            return value
    return entries[-1][1]


def _rescale_signal(x: torch.Tensor, x0: torch.Tensor | None, r: float) -> torch.Tensor:
    """x = x0 + sigma eps -> r x0 + sigma eps, with x0 estimated: moves a latent between two latent scales
    (ratio r) keeping its noise. The identity for r = 1."""
    return x if r == 1.0 or x0 is None else x + (r - 1.0) * x0


class UNetAdapter(torch.nn.Module):
    """The LDM UNet as a network `model(x, t, context=, y=, c_concat=, guidance=)` for the denoiser wrappers:
    concatenates an inpainting model's extra channels and casts to the UNet's dtype (the sampler's latent
    stays float32; the output is cast back). `guidance` (Flux.1 dev's distilled scale) goes to the network
    as is; a network with its own compute dtype (`activation_dtype`: Flux over stored bf16 / fp8 weights)
    gets its inputs in that dtype."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, y=None, c_concat=None, guidance=None):
        own = getattr(self.unet, "activation_dtype", None)
        dtype = own() if own is not None else next(self.unet.parameters()).dtype
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        extra = {} if guidance is None else {"guidance": guidance.to(x.device, torch.float32)}
        out = self.unet(x.to(dtype), t.to(x.device, torch.float32),
                        None if context is None else context.to(dtype), None if y is None else y.to(dtype), **extra)
        return out.to(x.dtype)


class Pipeline:
    """Generation on one checkpoint. `Pipeline.from_pretrained(name_or_path)` then `.generate(params)`."""

    def __init__(self, parts: ModelParts, *, device: str | torch.device = "cpu",
                 lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None,
                 offload_text_encoders: bool = False, vae_tiling: bool = False):
        self.lora_dir = lora_dir                 # where <lora:NAME:W> finds NAME.safetensors (pipelines/loras.py)
        self._lora_targets: LoRATargets | None = None
        if (parts.vae is None) != parts.family.pixel_space:
            raise ValueError(f"family {parts.family.name!r} " + (
                "is pixel-space (vae=None) but the parts carry a VAE" if parts.family.pixel_space else
                "has a VAE config but parts.vae is None (a pixel-space model needs a family with vae=None)"))
        self.parts = parts
        self.family = parts.family
        self.device = torch.device(device)
        self.name = parts.name
        self.unet = parts.unet.to(self.device).eval()
        self.vae = parts.vae.to(self.device).eval() if parts.vae is not None else None
        # offload: the text encoders (Flux's / SD3's T5-XXL: 4.7B parameters) stay on the CPU and encode there;
        # only their outputs move to `device`, so they never take accelerator memory
        self.offload_text_encoders = bool(offload_text_encoders)
        for enc in parts.text_encoders:
            if enc is not None:
                (enc if self.offload_text_encoders else enc.to(self.device)).eval()
        conditioner = (FluxTextConditioner if self.family.is_flux else
                       JointTextConditioner if self.family.is_mmdit else TextConditioner)
        self.text = conditioner(self.family, parts.text_encoders, parts.tokenizers) if parts.text_encoders else None
        self._shifted: dict[float, FlowDenoiser] = {}
        if self.family.prediction_type == "flow":   # rectified flow (SD3, Flux): its own sigma table in [0, 1]
            self.denoiser = FlowDenoiser(UNetAdapter(self.unet), shift=self.family.flow_shift)
            self.schedule = self.denoiser.schedule
        else:
            b = self.family.beta_schedule
            opts = {"beta_start": b.beta_start, "beta_end": b.beta_end} if b.kind != "cosine" else {}
            self.schedule = DiscreteSchedule.from_name(b.kind, b.num_timesteps,
                                                       zero_terminal_snr=self.family.zero_terminal_snr, **opts)
            wrapper = VDenoiser if self.family.prediction_type == "v" else EpsDenoiser
            # pixel space: the x0 estimate is clipped to the images' [-1, 1] at every step (see core.denoisers)
            self.denoiser = wrapper(UNetAdapter(self.unet), self.schedule,
                                    data_range=(-1.0, 1.0) if self.family.pixel_space else None)
            if self.family.consistency:   # an LCM: its boundary scalings (core.consistency)
                self.denoiser = ConsistencyDenoiser(self.denoiser)
        # decode / encode large images in overlapping 512 px tiles (diffusers' enable_vae_tiling, ComfyUI's
        # VAEDecodeTiled): bounded VAE activations at any size; not bit-equal to the whole-image pass
        self.vae_tiling = bool(vae_tiling)
        self._rgb = None
        self._refiners: dict[str, Pipeline] = {}
        self.embeddings_dir = embeddings_dir     # textual-inversion files named by their stem in prompts
        # sampler_name, scheduler, steps, cfg_scale the model's card recommends (shipped.recommended)
        self.defaults: dict = family_defaults(self.family)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        family: str | None = None, lora_dir: str | Path | None = None,
                        embeddings_dir: str | Path | None = None, offload_text_encoders: bool = False,
                        vae_tiling: bool = False, low_memory: bool = False, **load_options) -> "Pipeline":
        """A shipped model name ("shapes"), a single-file checkpoint or a diffusers folder.

        dtype=None keeps the file's precision on an accelerator and computes in float32 on the CPU,
        where float16 arithmetic is emulated (~30x slower; A1111 likewise runs CPUs with --no-half).
        lora_dir: the folder of LoRA files that `<lora:NAME:WEIGHT>` prompt tags name.
        embeddings_dir: the folder of textual-inversion embeddings (A1111's `embeddings/`): a file's stem
        written in a prompt or negative prompt stands for its vectors.
        offload_text_encoders: keep the text encoders on the CPU when `device` is an accelerator (they run once
        per prompt; T5-XXL is 9.5 GB in bf16).
        vae_tiling: decode (and encode) images larger than 512 px in overlapping 512 px tiles
        (`VAE.tiled_decode` / `tiled_encode`; bench/sdxl_memory.py measures the peak memory it saves).
        low_memory: on a CPU with dtype=None, a UNet stored in fp16 / bf16 keeps those weights as stored
        (memory-mapped) and computes in float32, each Linear / Conv2d upcast for its call only
        (`unet.keep_stored_weights`; ComfyUI's manual cast): SDXL's UNet then takes its file's 5 GB, not 10 GB.
        The same float32 arithmetic on the same (exactly upcast) values: a few % slower per step.
        Flux on a CPU with dtype=None: the transformer and T5 keep their stored bf16 / fp8 / fp16 weights,
        memory-mapped, and compute in float32 (each layer upcast as it runs), so a 12B model needs its file's
        pages, not 48 GB of float32 copies (bench/flux_memory.py).
        load_options: passed to `load_checkpoint` (SD3 / Flux: `text_encoder_files=`, `t5_tokenizer=`, Flux:
        `vae_file=`)."""
        path = resolve_model(name_or_path)
        on_cpu = dtype is None and torch.device(device).type == "cpu"
        fam = read_family(path, family) if on_cpu else None
        keep = on_cpu and fam.is_flux                                   # Flux: always as stored on a CPU
        stored = on_cpu and low_memory and not fam.is_transformer      # a UNet, when asked
        if on_cpu and not keep and not stored:
            dtype = torch.float32
        parts = load_checkpoint(path, family=family, dtype=dtype, device="cpu", **load_options)
        if keep or stored:   # the big network (and Flux's T5) stays as stored (memory-mapped bf16 / fp8 / fp16
            # pages, each layer upcast when it runs), computed in float32; the small parts become float32 now
            if stored:
                keep_stored_weights(parts.unet, torch.float32)
            else:
                parts.unet.compute_dtype = torch.float32
            for module in (parts.vae, *parts.text_encoders):
                if hasattr(module, "compute_dtype"):
                    module.compute_dtype = torch.float32
                elif module is not None:
                    module.float()
        shipped = shipped_name(path)
        if shipped is not None:            # infotext "Model: shapes", not the file's stem "model"
            parts.name = shipped
        pipe = cls(parts, device=device, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                   offload_text_encoders=offload_text_encoders, vae_tiling=vae_tiling)
        pipe.defaults = recommended(path, parts.family)
        return pipe

    @property
    def lora_dir(self) -> Path | None:
        return None if self._loras is None else self._loras.folder

    @lora_dir.setter
    def lora_dir(self, folder: str | Path | None) -> None:
        self._loras = None if folder is None else LoraLibrary(folder)

    @property
    def embeddings_dir(self) -> Path | None:
        return None if self._embeddings is None else self._embeddings.folder

    @embeddings_dir.setter
    def embeddings_dir(self, folder: str | Path | None) -> None:
        widths = [spec.config.width for spec in self.family.text_encoders]
        self._embeddings = None if folder is None else EmbeddingLibrary(Path(folder), widths)
        if self.text is not None:
            self.text.set_embeddings({})
        self.refresh_embeddings()

    @property
    def embeddings(self) -> EmbeddingLibrary | None:
        """The textual-inversion embeddings of `embeddings_dir` (`.loaded`, `.skipped` with reasons, `.failed`)."""
        return self._embeddings

    def refresh_embeddings(self) -> None:
        """Rescan `embeddings_dir` (done at every generate(), as A1111 does when the folder changed)."""
        if self._embeddings is not None and self._embeddings.refresh() and self.text is not None:
            self.text.set_embeddings(self._embeddings.vectors())

    def _ti_hashes(self, params: GenerationParams, prompt: str) -> str | None:
        """A1111's "TI hashes" value: `name: <first 12 hex of the file's sha256>` for each embedding the
        prompt (`prompt`: params.prompt without its LoRA tags) or negative prompt (any prompt-editing
        variant) uses; ":" and "," dropped from names."""
        if self._embeddings is None or self.text is None or not self.text.embeddings:
            return None
        texts = []
        for text in (prompt, params.negative_prompt):
            steps = [(params.steps, None)] + ([(params.steps, params.hr_second_pass_steps or params.steps)]
                                              if params.enable_hr else [])
            for n, hires in steps:
                texts += [t for _, t in prompt_mod.get_schedules(text, n, hires_steps=hires)]
        parts = []
        for name in self.text.embeddings_used(dict.fromkeys(texts)):
            ti = self._embeddings.loaded[name]
            if ti.shorthash:
                parts.append(f"{infotext_name(name)}: {ti.shorthash}")
        return ", ".join(parts) or None

    def _prompt_loras(self, prompt: str) -> tuple[str, list]:
        """(the prompt without its `<lora:...>` tags, [(LoraRef, LoRA)] of those tags, read from `lora_dir`)."""
        clean, refs = extract_loras(prompt)
        if refs and self._loras is None:
            raise ValueError(f"the prompt names LoRAs ({', '.join(r.name for r in refs)}) but no LoRA folder is set: "
                             "pass lora_dir= to Pipeline / from_pretrained (CLI: --lora-dir)")
        return clean, [(r, self._loras.load(r.name, te_count=len(self.family.text_encoders))) for r in refs]

    @property
    def latent_channels(self) -> int:
        """Channels the sampler works in: the VAE latent's, or the image's for a pixel-space model."""
        return self.family.latent_channels

    @property
    def factor(self) -> int:
        return self.family.latent_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor, times the patch size of an MMDiT (SD3: 16)."""
        return self.factor * (self.family.unet.patch_size if self.family.is_transformer else 1)

    @property
    def sample_space(self) -> str:
        """What the sampler's x is, e.g. "4-channel latents at 1/8 size" or "3-channel pixels"."""
        if self.family.pixel_space:
            return f"{self.latent_channels}-channel pixels"
        return f"{self.latent_channels}-channel latents at 1/{self.factor} size"

    @property
    def scale(self) -> float:
        """Model-space latent = scale x (VAE latent - shift); 1 in pixel space, where the images are the latents."""
        return self.family.latent_scale if self.vae is not None else 1.0

    @property
    def shift(self) -> float:
        """The VAE-latent offset removed before scaling (SD3: 0.0609; 0 for SD 1/2/XL and in pixel space)."""
        return self.family.latent_shift if self.vae is not None else 0.0

    # ------------------------------------------------------------------ pixels <-> latents
    @torch.no_grad()
    def encode(self, images: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> model-space latents ((VAE mean - shift) times the latent scale).
        `tile` = (tile, overlap) in pixels encodes in blended tiles (default: 512 / 128 px when `vae_tiling`
        is on and the image is larger than one tile)."""
        if self.vae is None:
            return images.to(self.device)
        dtype = next(self.vae.parameters()).dtype
        if tile is None and self.vae_tiling and max(images.shape[-2:]) > VAE_TILE * self.factor:
            tile = (VAE_TILE * self.factor, VAE_TILE_OVERLAP * self.factor)
        encode = self.vae.encode if tile is None else partial(self.vae.tiled_encode, tile=tile[0], overlap=tile[1])
        return (encode(images.to(self.device, dtype)).mode().float() - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> (B, 3, H, W) in [-1, 1], `DECODE_PIXELS_PER_CALL` pixels' worth of images
        per VAE call (one image at a time from 1024x1024 up: the decoder's activations grow with batch x
        pixels; each image decodes alone anyway). A non-finite result of a half-precision VAE (the fp16
        SDXL VAE overflows: black images) is decoded again in float32. Non-finite latents, or a non-finite
        float32 decode, raise `NonFiniteOutput` (broken weights: never a silent black image)."""
        if not torch.isfinite(latents).all():
            raise NonFiniteOutput(f"sampling produced non-finite latents (NaN or inf) with model {self.name!r}: "
                                  f"its UNet weights or its configuration are broken")
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        per_call = max(1, DECODE_PIXELS_PER_CALL // (latents.shape[-2] * latents.shape[-1] * self.factor ** 2))
        return torch.cat([self._decode(latents[i:i + per_call]) for i in range(0, latents.shape[0], per_call)])

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
        """One VAE call; `tile` = (tile, overlap) in latent pixels decodes in blended tiles (default: 64 / 16
        when `vae_tiling` is on and the latent is larger than one tile)."""
        dtype = next(self.vae.parameters()).dtype
        z = latents / self.scale + self.shift
        if z.device.type == "cpu":   # oneDNN's convolutions at the decoder's high resolutions run faster
            z = z.contiguous(memory_format=torch.channels_last)   # channels-last: 0.82x a 256 px decode
        if tile is None and self.vae_tiling and max(z.shape[-2:]) > VAE_TILE:
            tile = (VAE_TILE, VAE_TILE_OVERLAP)
        decode = self.vae.decode if tile is None else partial(self.vae.tiled_decode, tile=tile[0], overlap=tile[1])
        force32 = self.family.vae_force_upcast and dtype == torch.float16
        out = None if force32 else decode(z.to(dtype)).float()
        if out is None or (dtype != torch.float32 and not torch.isfinite(out).all()):
            self.vae.float()
            try:
                out = decode(z.float()).float()
            finally:
                self.vae.to(dtype)
        if not torch.isfinite(out).all():
            raise NonFiniteOutput(f"the VAE of model {self.name!r} decoded non-finite values (NaN or inf), in "
                                  f"float32 too: its VAE weights are broken")
        return out.clamp(-1, 1).contiguous()

    def preview(self, latents: torch.Tensor):
        """Cheap RGB previews of model-space latents (linear map; no VAE call). In pixel space the
        latents are the images: the preview is the (clamped) image itself, equal to `decode`."""
        if self.vae is None:
            return tensor_to_pil(latents)
        if self._rgb is None:
            known = LATENT_RGB.get(round(self.scale, 5)) if self.latent_channels == 4 and self.family.name != "custom" else None
            self._rgb = known or fit_latent_rgb(lambda im: self.vae.encode(im.to(self.device, next(self.vae.parameters()).dtype)).mode(),
                                                self.scale, self.factor)
        return preview(latents, *self._rgb)

    # ------------------------------------------------------------------ the public entry
    def generate(self, params: GenerationParams, callback: Callable[[StepInfo], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """Run `params`: all `n_iter` batches of `iter_batches`, stopping after a batch that was interrupted
        or when `should_stop()` is true between two batches. `<lora:NAME:WEIGHT>` tags are cut out of the
        prompt (A1111) and the LoRAs they name (files in `lora_dir`) are merged into this model's weights for
        this call only: restored bit for bit afterwards, also after an error or an interrupt. A refiner model
        gets no LoRA."""
        t0 = time.perf_counter()
        done: list[GenerationResult] = []
        interrupted = False
        with closing(self.iter_batches(params, callback=callback, should_stop=should_stop)) as batches:
            for r in batches:
                done.append(r)
                if r.interrupted:
                    interrupted = True
                    break
                if len(done) < params.n_iter and should_stop is not None and should_stop():
                    interrupted = True                       # asked to stop between batches
                    break
        first = done[0]
        info = {k: first.info[k] for k in ("model", "sampler", "schedule", "seed", "subseed", "hashes")}
        info |= {"seconds": time.perf_counter() - t0, "images_requested": params.batch_size * params.n_iter}
        return GenerationResult(images=[im for r in done for im in r.images], seeds=[s for r in done for s in r.seeds],
                                subseeds=[s for r in done for s in r.subseeds],
                                infotexts=[t for r in done for t in r.infotexts], params=params,
                                latents=torch.cat([r.latents for r in done]),
                                process=[rec for r in done for rec in r.process], interrupted=interrupted, info=info)

    def iter_batches(self, params: GenerationParams, callback: Callable[[StepInfo], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Iterator[GenerationResult]:
        """The `n_iter` batches of `params`, one `GenerationResult` each, computed as they are asked for
        (a caller that stops asking runs no more; close the iterator, or use `contextlib.closing`, to
        restore LoRA-merged weights at once). A batch whose sampling `should_stop()` cut short comes with
        `interrupted=True` and the decoded last x0 estimate; the caller decides whether to go on (the server
        does after a /skip). Seeds follow A1111: image k of the call has `image_seeds(seed, subseed, ..., k)`.
        `info` of each: model, sampler and schedule ids, the resolved seed and subseed of the call, job_no,
        and `hashes`, the infotext's "Lora hashes" / "TI hashes" fields (A1111's extra_generation_params)."""
        params.validate(factor=self.factor)
        self.refresh_embeddings()
        clean, loras = self._prompt_loras(params.prompt)
        hashes = {"Lora hashes": lora_hashes_text(loras) if loras else None,   # A1111: "name: <12 hex>, ..."
                  "TI hashes": self._ti_hashes(params, clean)}                # A1111: "name: <12 hex of sha256>, ..."
        hashes = {k: v for k, v in hashes.items() if v}
        if not loras:
            yield from self._batches(params, params, callback, should_stop, hashes)
            return
        if self.family.is_transformer:
            raise ValueError(f"the prompt names LoRAs ({', '.join(ref.name for ref, _ in loras)}), but LoRA merging is "
                             f"implemented for UNet models (SD 1.x / 2.x / SDXL); {self.name!r} is a "
                             f"{'Flux' if self.family.is_flux else 'SD3'} transformer: remove the <lora:...> tags")
        if self._lora_targets is None:
            self._lora_targets = LoRATargets.of(self.parts)
        with merged(self._lora_targets, [(lora, ref.te, ref.unet) for ref, lora in loras]):
            yield from self._batches(params, params.copy(prompt=clean), callback, should_stop, hashes)

    def _batches(self, params: GenerationParams, text_params: GenerationParams, callback, should_stop,
                 hashes: dict[str, str]) -> Iterator[GenerationResult]:
        """`iter_batches` once the LoRAs are merged: `text_params` is `params` with the prompt the text
        encoders read (LoRA tags removed); the infotext and the results keep `params`."""
        sampler_id, scheduler = split_sampler_name(params.sampler_name, params.scheduler)
        schedule_id = sigma_schedules.resolve(scheduler)
        if schedule_id == "automatic":   # flow models: ComfyUI's "simple" over the shifted flow table (SD3 workflows)
            schedule_id = ("simple" if self.family.prediction_type == "flow"
                           else sampler_registry.INFO[sampler_id].default_schedule)
        if params.sde_noise != "diffusekit" and sampler_id in BROWNIAN_SAMPLERS:
            require_torchsde(params.sde_noise)                     # before any model work
        width = params.width or self.family.default_size
        height = params.height or self.family.default_size
        if width % self.size_multiple or height % self.size_multiple:
            raise ValueError(f"width={width}, height={height}: must be multiples of {self.size_multiple} for this model")
        seed = params.resolved_seed()
        subseed = params.subseed if params.subseed != -1 else random.SystemRandom().randrange(2**32)
        init = self._prepare_init(params, width, height) if params.is_img2img else None
        call = _Call(params, text_params, sampler_id, schedule_id, width, height, seed, subseed, hashes, init,
                     callback, should_stop)
        bs = params.batch_size
        for job_no in range(params.n_iter):
            t0 = time.perf_counter()
            batch = _Batch(call, job_no, *image_seeds(seed, subseed, params.subseed_strength, job_no * bs, bs))
            interrupted = False
            try:
                latent = self._run_batch(batch)
            except Interrupted as stop:
                latent, interrupted = stop.latent, True
            pixels = self.decode(latent)
            if init is not None and init.overlay is not None:   # A1111's inpaint overlay of the original pixels
                pixels = _rows(init.originals, bs) * (1 - init.overlay) + pixels * init.overlay
            images, infotexts = [], []
            for i, img in enumerate(tensor_to_pil(pixels)):
                text = self.infotext(call, batch.seeds[i], batch.subseeds[i])
                img.info["parameters"] = text
                images.append(img)
                infotexts.append(text)
            info = {"model": self.name, "sampler": sampler_id, "schedule": schedule_id, "seed": seed,
                    "subseed": subseed, "hashes": dict(hashes), "job_no": job_no,
                    "seconds": time.perf_counter() - t0, "images_requested": bs}
            yield GenerationResult(images=images, seeds=batch.seeds, subseeds=batch.subseeds, infotexts=infotexts,
                                   params=params, latents=latent.cpu(), process=batch.log, interrupted=interrupted,
                                   info=info)

    # ------------------------------------------------------------------ inputs
    def _prepare_init(self, params: GenerationParams, width: int, height: int) -> _InitImages:
        """Resize (Lanczos), mask (A1111 "Whole picture"), fill and encode the init images, once per call."""
        size = (width, height)
        resized = [im.convert("RGB") if im.size == size else im.convert("RGB").resize(size, Image.LANCZOS)
                   for im in params.init_images]
        originals = pil_to_tensor(resized).to(self.device)
        if params.mask is None:
            return _InitImages(originals, originals, self.encode(originals))
        m = prepare_mask(params.mask, size, params.mask_blur, params.inpainting_mask_invert)
        pixels = originals
        if params.inpainting_fill != 1:          # A1111 fills the pixels for 0 and before the latent fills 2, 3
            pixels = pil_to_tensor([fill_masked(im, m) for im in resized]).to(self.device)
        repaint = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0).round()[None, None]
        return _InitImages(originals, pixels, self.encode(pixels),
                           mask=latent_mask(m, (height // self.factor, width // self.factor)).to(self.device),
                           repaint=repaint.to(self.device), overlay=overlay_mask(m).to(self.device))

    def _inpaint_concat(self, batch: _Batch, sp: SamplingPass) -> torch.Tensor | None:
        """The extra input channels of an inpainting UNet: mask (1) + masked-image latent (4), as A1111's
        `inpainting_image_conditioning` builds them: with a mask, the image with its (rounded) repaint area
        set to 0 (grey) and the mask at latent size (nearest); otherwise (txt2img, plain img2img, hires)
        an all-ones mask and the latent of a grey image. None for other models."""
        if not self.family.is_inpaint:
            return None
        init, width, height = sp.init, sp.width, sp.height
        key = _ConcatKey(width, height, masked=init is not None and init.repaint is not None)
        cache = batch.call.cache.of(self).concat
        if key not in cache:
            hw = (height // self.factor, width // self.factor)
            if key.masked:
                cache[key] = (F.interpolate(init.repaint, size=hw), self.encode(init.pixels * (1 - init.repaint)))
            else:
                cache[key] = (torch.ones(1, 1, *hw, device=self.device),
                              self.encode(torch.zeros(1, 3, height, width, device=self.device)))
        m, latent = cache[key]
        b = sp.x.shape[0]
        return torch.cat([m.expand(b, -1, -1, -1), _rows(latent, b)], 1)

    def denoiser_at(self, width: int, height: int):
        """The denoiser for images of width x height: `self.denoiser`, except for a resolution-dependent flow
        shift (Flux.1 dev, `ModelFamily.shift_at`), where it is a FlowDenoiser of that shift (cached)."""
        if self.family.prediction_type != "flow" or self.family.dynamic_shift is None:
            return self.denoiser
        shift = self.family.shift_at(width, height)
        if shift not in self._shifted:
            self._shifted[shift] = FlowDenoiser(self.denoiser.inner_model, shift=shift)
        return self._shifted[shift]

    def _sigmas(self, schedule_id: str, steps: int, width: int | None = None, height: int | None = None) -> torch.Tensor:
        """The schedule's sigmas over the model's table (for a resolution-dependent shift: at width x height,
        the native size when not given)."""
        size = self.family.default_size
        table = self.denoiser_at(width or size, height or size).schedule
        return sigma_schedules.get(schedule_id, steps, schedule=table, sigma_min=table.sigma_min,
                                   sigma_max=table.sigma_max).to(self.device)

    # ------------------------------------------------------------------ one batch
    def _run_batch(self, batch: _Batch) -> torch.Tensor:
        call = batch.call
        p, b, width, height, init = call.text_params, len(batch.seeds), call.width, call.height, call.init
        shape = (b, self.latent_channels, height // self.factor, width // self.factor)
        noise, gens = initial_noise(shape, batch.seeds, batch.subseeds, p.subseed_strength)
        noise = noise.to(self.device)
        full = self._sigmas(batch.call.schedule_id, p.steps, width, height)
        init_latent = mask = None
        if init is None:   # pure noise at the first level: sigma * noise (VE), noise itself (flow, s = 1)
            sig, x = full, self.denoiser.noise_scaling(full[0], noise)
        else:
            init_latent = _rows(init.latents, b)
            if p.denoising_strength == 0.0:
                return init_latent
            mask = init.mask
            if mask is not None and p.inpainting_fill == 2:            # latent noise
                init_latent = init_latent * (1 - mask) + noise * mask
            elif mask is not None and p.inpainting_fill == 3:          # latent nothing
                init_latent = init_latent * (1 - mask)
            t_enc = int(min(float(p.denoising_strength), 0.999) * p.steps)   # A1111's img2img arithmetic
            sig = full[p.steps - t_enc - 1:]
            x = self.denoiser.noise_scaling(sig[0], noise, init_latent)   # x0 + s noise; flow: (1 - s) x0 + s noise
        hires = p.enable_hr and init is None
        refiner = self._refiner(p)
        sp = SamplingPass("txt2img" if init is None else "img2img", sig, x, gens, width, height,
                          PromptSteps(len(sig) - 1), schedule=full, signal=init_latent, init_latent=init_latent,
                          mask=mask, init=init)
        x = self._pass(batch, sp, None if hires else refiner)
        if hires:
            x = self._hires(batch, x, refiner)
        return x

    def _hires(self, batch: _Batch, x: torch.Tensor, refiner: "Pipeline | None"):
        """A1111's hires fix: upscale (latent interpolation, or decode-resize-encode) and run exactly
        `hr_second_pass_steps or steps` img2img steps at the hires strength (A1111 passes the step count, so
        its fixed-steps arithmetic applies: a schedule of int(steps / strength) steps, its last ones run),
        from fresh noise of the images' seeds at the new size, with the refiner if one is set."""
        p, width, height = batch.call.text_params, batch.call.width, batch.call.height
        m = max(8, self.size_multiple)
        hw, hh = int(width * p.hr_scale) // m * m, int(height * p.hr_scale) // m * m
        name = p.hr_upscaler.strip().lower()
        if name.startswith("latent"):
            mode, antialias = HIRES_LATENT_MODES.get(name, HIRES_LATENT_MODES["latent"])
            x = F.interpolate(x, size=(hh // self.factor, hw // self.factor), mode=mode, antialias=antialias)
        else:
            resample = Image.NEAREST if name == "nearest" else Image.LANCZOS
            imgs = [im.resize((hw, hh), resample) for im in tensor_to_pil(self.decode(x))]
            x = self.encode(pil_to_tensor(imgs))
        strength = p.hr_denoising_strength if p.hr_denoising_strength is not None else p.denoising_strength
        if strength <= 0:
            return x
        steps = p.hr_second_pass_steps or p.steps
        total = int(steps / min(float(strength), 0.999))
        full = self._sigmas(batch.call.schedule_id, total, hw, hh)
        sig = full[total - steps:]
        noise, gens = initial_noise(x.shape, batch.seeds, batch.subseeds, p.subseed_strength)
        sp = SamplingPass("hires", sig, self.denoiser.noise_scaling(sig[0], noise.to(x.device), x), gens, hw, hh,
                          PromptSteps(p.steps, steps), schedule=full, signal=x)
        return self._pass(batch, sp, refiner)

    def _refiner(self, params) -> "Pipeline | None":
        if not params.refiner_checkpoint or params.refiner_switch_at is None:
            return None
        key = str(params.refiner_checkpoint)
        if self.family.prediction_type == "flow":
            raise ValueError(f"refiner {key!r}: a refiner hand-over is defined for variance-exploding (eps / v) models; "
                             f"{self.name!r} is a rectified-flow model: run the refiner as an img2img pass instead")
        if key not in self._refiners:
            refiner = Pipeline.from_pretrained(key, device=str(self.device), dtype=next(self.unet.parameters()).dtype)
            if refiner.sample_space != self.sample_space:
                raise ValueError(f"refiner {key!r} samples {refiner.sample_space} but this model samples "
                                 f"{self.sample_space}: a refiner must work in the base model's space")
            self._refiners[key] = refiner
        return self._refiners[key]

    def _switch_index(self, sig: torch.Tensor, switch_at: float) -> int:
        """A1111's refiner switch (sd_samplers_common.apply_refiner, by sigma, its default): the first step i
        whose sigma's nearest training timestep t has (T - 1 - t) / T >= switch_at; len(sig) - 1 if none."""
        table, last = self.schedule.sigmas, self.schedule.num_timesteps - 1
        for i, s in enumerate(sig[:-1].tolist()):
            t = int(torch.argmin((table - s).abs()))
            if (last - t) / (last + 1) >= switch_at:
                return i
        return len(sig) - 1

    def _pass(self, batch: _Batch, sp: SamplingPass, refiner: "Pipeline | None") -> torch.Tensor:
        """Run `sp`, handed over to `refiner` at A1111's switch point when one is given; returns the final
        latent in this model's space. `sp.schedule` bounds A1111's Brownian tree (None = sp.sigmas)."""
        sig = sp.sigmas
        p = batch.call.text_params
        cut = len(sig) - 1 if refiner is None else self._switch_index(sig, p.refiner_switch_at)
        x, x0 = sp.x, sp.signal
        sde_noise = pass_noise(p.sde_noise, batch.call.sampler_id, x, sig if sp.schedule is None else sp.schedule,
                               batch.seeds, sp.generators)
        if cut > 0:
            x, x0 = self._sample(batch, replace(sp, sigmas=sig[:cut + 1], noise_sampler=sde_noise(sig[:cut + 1])))
        if cut == len(sig) - 1:
            return x
        r = refiner.scale / self.scale
        handed = replace(sp, name="refiner", sigmas=sig[cut:], x=_rescale_signal(x, x0, r), step_offset=cut,
                         init_latent=None if sp.init_latent is None else sp.init_latent * r, log_scale=1 / r,
                         noise_sampler=sde_noise(sig[cut:]))
        try:
            x, x0 = refiner._sample(batch, handed)
        except Interrupted as stop:
            raise Interrupted(stop.latent / r) from None
        return _rescale_signal(x, x0, 1 / r)

    def _guided(self, batch: _Batch, prompt: PromptSteps, width: int, height: int) -> list:
        """[(end_step, denoiser)]: one CFG-wrapped denoiser per prompt-editing entry, with its text (and for
        SDXL its `y`), built once per pass rather than on every model call. The text encodings are cached
        for the whole generate() call."""
        p = batch.call.text_params
        denoiser = self.denoiser_at(width, height)
        if self.text is None:
            return [(0, denoiser)]
        cache = batch.call.cache.of(self).text
        if prompt not in cache:
            cache[prompt] = self.text.pair(p.prompt, p.negative_prompt, prompt.steps, p.clip_skip,
                                           hires_steps=prompt.hires_steps)
        cs, us = cache[prompt]
        ends = sorted({end for end, _ in cs.entries} | {end for end, _ in us.entries})
        out = []
        for end in ends:
            c = self._network_kwargs(cs.at(end), AESTHETIC_SCORE_COND, width, height, p.guidance)
            u = self._network_kwargs(us.at(end), AESTHETIC_SCORE_UNCOND, width, height, p.guidance)
            out.append((end, cfg(denoiser, p.cfg_scale, c, u, rescale=p.cfg_rescale)))
        return out

    def guidance(self, params: GenerationParams) -> float | None:
        """The distilled guidance scale a guidance-distilled model (Flux.1 dev) gets: params.guidance, else
        the family's default (3.5); None for every other model."""
        if not self.family.takes_guidance:
            return None
        return float(self.family.guidance if params.guidance is None else params.guidance)

    def _network_kwargs(self, c: Conditioning, aesthetic: float, width: int, height: int,
                        guidance: float | None = None) -> dict:
        """A Conditioning as the network's keyword arguments (batch 1; guidance expands them)."""
        kw = {"context": c.context.to(self.device)}
        if self.family.is_transformer and c.pooled is not None:   # SD3, Flux: pooled CLIP joins the time embedding
            kw["y"] = c.pooled.to(self.device)
        if self.family.takes_guidance:   # Flux.1 dev: the distilled guidance scale is a network input
            kw["guidance"] = torch.tensor([float(self.family.guidance if guidance is None else guidance)],
                                          device=self.device)
        elif self.family.adm_inputs:
            kw["y"] = adm_vector(self.family, c.pooled, original_size=(height, width), target_size=(height, width),
                                 aesthetic_score=aesthetic)
        return kw

    def _sample(self, batch: _Batch, sp: SamplingPass):
        """Run the sampler over `sp.sigmas` from `sp.x` with this model; returns (final x, last x0 estimate).
        The prompt-editing step counter starts at `sp.step_offset`; process records are stored in the base
        model's latent space (`sp.log_scale` converts a refiner's)."""
        p = batch.call.text_params
        sig, mask, init_latent = sp.sigmas, sp.mask, sp.init_latent
        steps = len(sig) - 1
        guided = self._guided(batch, sp.prompt, sp.width, sp.height)
        concat = self._inpaint_concat(batch, sp)
        extra = {} if concat is None else {"c_concat": concat}
        state = {"step": sp.step_offset, "denoised": None}

        def denoiser(xx, sigma, **_):
            out = _at(guided, state["step"])(xx, sigma, **extra)
            if mask is not None:                                    # inpainting: keep the unmasked x0
                out = init_latent * (1 - mask) + out * mask
            return out
        # the data convention the sampler registry routes noise-drawing samplers by (core.samplers: "flow")
        denoiser.noise_form = getattr(self.denoiser, "noise_form", "ve")

        def on_step(d):
            state["step"] = sp.step_offset + d["i"] + 1
            state["denoised"] = d["denoised"]
            if p.save_process:
                xr, dr = _rescale_signal(d["x"], d["denoised"], sp.log_scale), d["denoised"] * sp.log_scale
                batch.log.append({"job": batch.job_no, "pass": sp.name, "step": d["i"], "sigma": float(d["sigma"]),
                                  "x": xr.detach().cpu(), "denoised": dr.detach().cpu()})
            if batch.call.callback is not None:
                batch.call.callback(StepInfo(step=d["i"], steps=steps, sigma=float(d["sigma"]), latent=d["x"],
                                        denoised=d["denoised"], preview=lambda den=d["denoised"]: self.preview(den),
                                        job_no=batch.job_no, job_count=batch.call.params.n_iter, pass_name=sp.name))
            if batch.call.should_stop is not None and batch.call.should_stop():
                raise Interrupted(d["denoised"])

        fn = sampler_registry.SAMPLERS[batch.call.sampler_id]
        knobs = _knobs_for(fn, p, batch.call.sampler_id)
        if sp.noise_sampler is not None:
            knobs["noise_sampler"] = sp.noise_sampler
        with torch.no_grad():
            out = fn(denoiser, sp.x, sig.to(sp.x.device), callback=on_step, generator=sp.generators, **knobs)
        if mask is not None and float(sig[-1]) == 0.0:
            out = init_latent * (1 - mask) + out * mask
        return out, state["denoised"]

    # ------------------------------------------------------------------ infotext
    def infotext(self, call: _Call, seed: int, subseed: int) -> str:
        """The A1111 infotext of one image: the fields A1111 writes for these settings (keys from
        `infotext.FIELDS`), the model, "RNG: CPU", the LoRA / TI hashes and the version."""
        params, sampler_id, schedule_id = call.params, call.sampler_id, call.schedule_id
        hires, refiner = params.enable_hr, params.refiner_checkpoint and params.refiner_switch_at is not None
        varied = params.subseed_strength > 0
        values = {
            "steps": params.steps, "sampler_name": sampler_registry.INFO[sampler_id].label,
            "scheduler": sigma_schedules.LABELS.get(schedule_id, schedule_id), "cfg_scale": params.cfg_scale,
            "guidance": self.guidance(params),             # Forge's "Distilled CFG Scale": Flux.1 dev only
            "seed": seed, "width": call.width, "height": call.height,
            "subseed": subseed if varied else None, "subseed_strength": params.subseed_strength if varied else None,
            "denoising_strength": (params.hr_denoising_strength if hires and params.hr_denoising_strength is not None
                                   else params.denoising_strength) if params.is_img2img or hires else None,
            "mask_blur": params.mask_blur if params.mask is not None else None,
            "clip_skip": params.clip_skip if params.clip_skip > 1 else None,
            "eta": params.eta, "cfg_rescale": params.cfg_rescale or None,
            # ours; only where it changes the image
            "sde_noise": params.sde_noise if changes_image(params.sde_noise, sampler_id, params.s_churn) else None,
            "hr_scale": params.hr_scale if hires else None,
            "hr_second_pass_steps": params.hr_second_pass_steps if hires and params.hr_second_pass_steps else None,
            "hr_upscaler": params.hr_upscaler if hires else None,     # (A1111 writes Hires steps only when set)
            "refiner_checkpoint": Path(str(params.refiner_checkpoint)).stem if refiner else None,
            "refiner_switch_at": params.refiner_switch_at if refiner else None,
        }
        d = infotext_mod.fields_from_params(values)
        d |= {"Model hash": self.parts.hash10, "Model": self.name, "RNG": "CPU"}     # PARAM_ORDER places them
        d.update(call.hashes)                               # Lora / TI hashes (quoted by format_infotext)
        d["Version"] = f"diffusekit {__version__}"
        return infotext_mod.format_infotext(params.prompt, params.negative_prompt, d)


# A1111 hands its "Eta for ancestral samplers" setting (default 1) to every k-diffusion sampler taking eta;
# DPM fast / adaptive are the ones whose own default differs (0, k-diffusion's and ComfyUI's)
_A1111_ETA = {"dpm_fast": 1.0, "dpm_adaptive": 1.0}


def _knobs_for(fn, params: GenerationParams, sampler_id: str = "") -> dict:
    """The sampler knobs the chosen sampler accepts, from the params that were set (eta unset: A1111's)."""
    accepted = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}
    eta = _A1111_ETA.get(sampler_id) if params.eta is None else params.eta
    wanted = {"eta": eta, "s_churn": params.s_churn, "s_tmin": params.s_tmin, "s_tmax": params.s_tmax,
              "s_noise": params.s_noise}
    # a value equal to the sampler's own default is not passed (the same, and a sampler may warn on a knob)
    return {k: v for k, v in wanted.items() if k in accepted and v is not None and v != accepted[k]}

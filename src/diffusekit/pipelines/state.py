"""The typed per-call state of `Pipeline.generate`: what one call resolves once (`_Call`), what each of its
n_iter batches holds (`_Batch`), one sampler run (`SamplingPass`), the prepared img2img inputs
(`_InitImages`) and the per-model cache of text encodings and inpainting inputs (`_CallCache`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .conditioning import ConditioningSchedule
from .params import GenerationParams, StepInfo

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass(frozen=True)
class PromptSteps:
    """The prompt-editing schedule a pass reads: `steps` of the base pass, and of a hires pass (None = none)."""

    steps: int
    hires_steps: int | None = None


@dataclass(frozen=True)
class _ConcatKey:
    """Which inpainting-UNet extra input: the image size, and whether a repaint mask is set."""

    width: int
    height: int
    masked: bool


@dataclass
class _ModelInputs:
    """What one model (the base or a refiner) computes once per generate() call and reuses in every batch."""

    text: dict[PromptSteps, tuple[ConditioningSchedule, ConditioningSchedule]] = field(default_factory=dict)
    concat: dict[_ConcatKey, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _CallCache:
    """Per generate() call: the `_ModelInputs` of every model the call samples with."""

    models: dict["Pipeline", _ModelInputs] = field(default_factory=dict)

    def of(self, pipe: "Pipeline") -> _ModelInputs:
        return self.models.setdefault(pipe, _ModelInputs())


@dataclass
class _Call:
    """One generate() call: what its batches share, resolved once."""

    params: GenerationParams                 # as given (the infotext and the results keep it)
    text_params: GenerationParams            # with the prompt the text encoders read (LoRA tags removed)
    sampler_id: str
    schedule_id: str
    width: int
    height: int
    seed: int                                # resolved (-1 drawn at random, once)
    subseed: int
    hashes: dict[str, str]                   # the infotext's "Lora hashes" / "TI hashes"
    init: "_InitImages | None"               # img2img / inpainting inputs, prepared once
    callback: Callable[[StepInfo], None] | None
    should_stop: Callable[[], bool] | None
    cache: _CallCache = field(default_factory=_CallCache)


@dataclass
class _Batch:
    """One batch of a call (one of n_iter): its seeds and its save_process records."""

    call: _Call
    job_no: int
    seeds: list[int]
    subseeds: list[int]
    log: list = field(default_factory=list)


@dataclass
class SamplingPass:
    """One sampler run of a batch: the txt2img / img2img pass, the hires pass, or a refiner's part of either."""

    name: str                                # "txt2img" | "img2img" | "hires" | "refiner"
    sigmas: torch.Tensor                     # the steps run, descending
    x: torch.Tensor                          # (B, C, h, w) the start latent
    generators: list                         # one CPU torch.Generator per image (ancestral noise)
    width: int                               # image size in pixels
    height: int
    prompt: PromptSteps                      # the prompt-editing schedule
    schedule: torch.Tensor | None = None     # the whole schedule `sigmas` is the tail of (bounds the Brownian tree)
    signal: torch.Tensor | None = None       # the x0 part of x (None = 0)
    init_latent: torch.Tensor | None = None  # img2img / inpainting: the encoded init images (B rows)
    mask: torch.Tensor | None = None         # (1, 1, h, w) latent repaint mask
    init: "_InitImages | None" = None
    step_offset: int = 0                     # a refiner continues the step count of the pass it takes over
    log_scale: float = 1.0                   # process records are kept in the base model's latent scale
    noise_sampler: Callable | None = None    # the SDE noise source (sde_noise.pass_noise); None = the sampler's own


@dataclass
class _InitImages:
    """The img2img / inpainting inputs of one generate() call, prepared once for all its batches. Rows are
    the distinct init images (image i of a batch uses row i mod n)."""

    originals: torch.Tensor                  # (n, 3, H, W) in [-1, 1]: the init images, resized
    pixels: torch.Tensor                     # (n, 3, H, W): the same after A1111's fill (inpainting_fill != 1)
    latents: torch.Tensor                    # (n, C, h, w) model-space latents of `pixels`
    mask: torch.Tensor | None = None         # (1, 1, h, w) binary latent repaint mask
    repaint: torch.Tensor | None = None      # (1, 1, H, W) the rounded full-size mask (inpainting UNets)
    overlay: torch.Tensor | None = None      # (1, 1, H, W) in [0, 1]: where generated pixels are kept

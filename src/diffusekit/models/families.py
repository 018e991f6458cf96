"""Model families: what a pipeline must know about a checkpoint beyond its weights.

A Stable Diffusion checkpoint is a UNet, a VAE and one or two CLIP text encoders, plus
conventions that the weights do not state: the prediction target (eps or v, Salimans & Ho
2022), the latent scale (Rombach et al. 2022, Sec. 4.3.2: 0.18215 for SD 1/2, 0.13025 for
SDXL), which hidden layer of which text encoder is the context (SD 2 and SDXL use the
penultimate layer; Podell et al. 2023, Sec. 2.1), the pad token, the default image size and
the training beta schedule. `ModelFamily` holds all of it; `FAMILIES` has the published
families, `tiny_family` the same layouts at toy size for tests, and `detect_family` tells
a family from a single-file checkpoint's key names and shapes.

Key layouts (LDM / SGM single files, as A1111, ComfyUI and sgm read them):
  UNet `model.diffusion_model.`, VAE `first_stage_model.`;
  SD 1.x  CLIP ViT-L in the transformers layout at `cond_stage_model.transformer.`;
  SD 2.x  OpenCLIP ViT-H in the open_clip layout at `cond_stage_model.model.`;
  SDXL    CLIP ViT-L at `conditioner.embedders.0.transformer.` and OpenCLIP bigG at
          `conditioner.embedders.1.model.`; the refiner has only bigG, at `conditioner.embedders.0.model.`;
  SD3/3.5 the MMDiT at `model.diffusion_model.joint_blocks.*`, and when the file carries them (the
          "incl_clips[_t5xxl]" releases) CLIP-L, CLIP-G (both transformers layout, with projection) and
          T5-XXL at `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`;
  Flux.1  the transformer at `model.diffusion_model.double_blocks.*` / `single_blocks.*` (ComfyUI; BFL's
          own release has the same keys without the prefix and no other part), CLIP-L and T5-XXL at
          `text_encoders.{clip_l,t5xxl}.transformer.` when the file carries them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from . import clip, flux, mmdit, t5, unet, vae
from .clip import CLIPTextConfig
from .flux import FluxConfig
from .mmdit import MMDiTConfig
from .t5 import T5Config
from .unet import UNetConfig
from .vae import VAEConfig

__all__ = [
    "CheckpointError",
    "BetaSchedule",
    "TextEncoderSpec",
    "ModelFamily",
    "FAMILIES",
    "FAMILY_NAMES",
    "get_family",
    "tiny_family",
    "detect_family",
    "flux_key_prefix",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


MAX_DEFAULT_SIZE = 8192   # px: the largest native side a family may declare


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class BetaSchedule:
    """The training noise schedule beta_1..beta_T (Ho et al. 2020). SD trains with
    "scaled_linear": beta = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""

    kind: str = "scaled_linear"  # "scaled_linear" | "linear" (diffusers' beta_schedule names)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000

    def __post_init__(self):  # read from checkpoint metadata too: a bad value must fail here, not at sampling
        if not isinstance(self.kind, str):
            raise ValueError(f"beta_schedule.kind={self.kind!r}: must be a name such as 'scaled_linear'")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"beta_schedule.{name}={v!r}: must be a number strictly between 0 and 1")
        if not _is_int(self.num_timesteps) or not 2 <= self.num_timesteps <= 100_000:
            raise ValueError(f"beta_schedule.num_timesteps={self.num_timesteps!r}: must be an integer from 2 to 100000")


TEXT_ENCODER_KINDS = ("clip", "openclip", "t5")
PREDICTION_TYPES = ("eps", "v", "flow")


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and how the pipeline reads it.

    kind          "clip": `clip.CLIPTextModel` (transformers layout); "openclip": `OpenCLIPTextModel`;
                  "t5": `t5.T5EncoderModel` (config a `T5Config`; SD3's third encoder)
    prefix        where its weights live in a single-file checkpoint
    layer         hidden layer fed to the UNet, python-style over the transformer layers (-1 last,
                  -2 penultimate); A1111 "Clip skip N" moves it to -N
    final_norm    apply the final LayerNorm to that layer (SD1, SD2: yes; SDXL: no)
    pad_id        id after EOS: 49407 (EOS) for CLIP-L tokenizers, 0 for open_clip tokenizers
    pooled        the pooled, projected EOS state is used (SDXL bigG -> the UNet's `y`; SD3: CLIP-L and
                  CLIP-G, concatenated)
    max_length    tokens per window (CLIP: 77 = BOS + 75 + EOS; SD3's T5: 256)
    optional      the model works without this encoder, its states replaced by zeros (SD3's T5)
    context_tokens  0: every hidden state of a window is context; N: only the first N (a small MMDiT
                  trained on short captions, e.g. the shipped shapes-flow)
    """

    kind: str
    config: CLIPTextConfig | T5Config
    prefix: str
    layer: int = -1
    final_norm: bool = True
    pad_id: int = 49407
    pooled: bool = False
    max_length: int = 77
    optional: bool = False
    context_tokens: int = 0

    def __post_init__(self):
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"TextEncoderSpec kind={self.kind!r}; valid: {', '.join(map(repr, TEXT_ENCODER_KINDS))}")


@dataclass(frozen=True)
class ModelFamily:
    """Everything a pipeline needs per checkpoint family besides the weights.

    adm_inputs: the parts of SDXL's `y` vector in order; "pooled" is the bigG pooled text, every
    other entry is a pair of numbers each embedded sinusoidally to `size_embed_dim` features
    (original_size (h, w), crop_coords (top, left), target_size (h, w); the refiner's
    aesthetic_score is one number). Empty for SD 1/2.
    vae_force_upcast: the VAE overflows in fp16 (the SDXL VAE): decode it in fp32.
    vae: None for a pixel-space model (Ho et al. 2020's DDPM; the trainer's configs without
    [model.vae]): the UNet denoises the images themselves in [-1, 1], so `latent_scale` and
    `vae_force_upcast` do not apply and the latent space is the pixel space.
    unet: the denoising network's config, a `UNetConfig` or, for SD3-class models, an `MMDiTConfig`
    (the slot keeps its historical name: `ModelParts.unet` is then the MMDiT).
    prediction_type "flow": rectified flow x = (1 - s) x0 + s eps, the network predicts v = eps - x0
    (SD3, Esser et al. 2024); `flow_shift` is its time shift (SD3 / SD3.5: 3.0) and `beta_schedule`
    does not apply. latent_shift: model-space latent = (VAE latent - latent_shift) * latent_scale
    (SD3: 0.0609 and 1.5305; Flux: 0.1159 and 0.3611; 0 for SD 1/2/XL).
    dynamic_shift: Flux.1 dev's resolution-dependent shift, (mu at 256, mu at 4096 image tokens) = (0.5,
    1.15): mu is linear in the number of 2x2 latent patches and the time shift is exp(mu) (diffusers
    `calculate_shift` + `time_shift`, ComfyUI ModelSamplingFlux); None: the fixed `flow_shift`.
    guidance: the default distilled guidance scale of a guidance-distilled model (Flux.1 dev: 3.5; Forge's
    "Distilled CFG Scale"); used only when the network has a guidance input.
    consistency: the network was distilled into a consistency model (Latent Consistency Distillation,
    `training/distill.py`): the pipeline wraps its eps / v denoiser in `core.consistency.ConsistencyDenoiser`
    (LCM's boundary scalings c_skip / c_out), as diffusers' LCMScheduler and ComfyUI's "lcm" model
    sampling do. It is sampled with the LCM sampler at 1-8 steps and no CFG.
    """

    name: str
    unet: UNetConfig | MMDiTConfig
    vae: VAEConfig | None
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction_type: str = "eps"  # "eps" | "v" | "flow"
    latent_scale: float = 0.18215
    default_size: int = 512
    beta_schedule: BetaSchedule = field(default_factory=BetaSchedule)
    zero_terminal_snr: bool = False
    adm_inputs: tuple[str, ...] = ()
    size_embed_dim: int = 256
    vae_force_upcast: bool = False
    latent_shift: float = 0.0
    flow_shift: float = 3.0
    dynamic_shift: tuple[float, float] | None = None
    guidance: float = 3.5
    consistency: bool = False     # a consistency model (LCM): its x0 estimate gets the boundary scalings

    def __post_init__(self):
        # checkpoint metadata sets these too: refuse at load what would only fail (or draw black) later
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}; valid: {', '.join(map(repr, PREDICTION_TYPES))}")
        if not _is_int(self.default_size) or not 8 <= self.default_size <= MAX_DEFAULT_SIZE or self.default_size % 8:
            raise ValueError(f"default_size={self.default_size!r}: the native image side must be a multiple of 8 "
                             f"from 8 to {MAX_DEFAULT_SIZE}")
        s = self.latent_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"latent_scale={s!r}: must be a finite number > 0 (SD 1.x: 0.18215, SDXL: 0.13025)")
        if not _is_int(self.size_embed_dim) or self.size_embed_dim < 1:
            raise ValueError(f"size_embed_dim={self.size_embed_dim!r}: must be a positive integer")
        for name in ("zero_terminal_snr", "vae_force_upcast", "consistency"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be true or false")
        if self.is_transformer and self.prediction_type != "flow":
            raise ValueError(f"an MMDiT / Flux family is a rectified-flow model: prediction_type must be 'flow', "
                             f"got {self.prediction_type!r}")
        d = self.dynamic_shift
        if d is not None and (len(d) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in d)):
            raise ValueError(f"dynamic_shift={d!r}: must be None or (mu at 256 tokens, mu at 4096 tokens), "
                             "e.g. (0.5, 1.15)")
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance={g!r}: must be a finite number >= 0 (Flux.1 dev: 3.5)")
        f = self.flow_shift
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"flow_shift={f!r}: must be a finite number > 0 (SD3: 3.0)")
        if isinstance(self.latent_shift, bool) or not isinstance(self.latent_shift, (int, float)):
            raise ValueError(f"latent_shift={self.latent_shift!r}: must be a number (SD3: 0.0609)")

    @property
    def is_mmdit(self) -> bool:
        """The network is an SD3-style `MMDiT` (else the LDM `UNetModel`, or Flux)."""
        return isinstance(self.unet, MMDiTConfig)

    @property
    def is_flux(self) -> bool:
        """The network is a Flux.1 transformer (`models.flux.Flux`)."""
        return isinstance(self.unet, FluxConfig)

    @property
    def is_transformer(self) -> bool:
        """An SD3 MMDiT or a Flux: a patchifying flow transformer in a diffusers `transformer/` folder, whose
        single files may leave their text encoders (and Flux's, the VAE) to separate files."""
        return self.is_mmdit or self.is_flux

    @property
    def takes_guidance(self) -> bool:
        """The network has a distilled-guidance input (Flux.1 dev's `guidance_in`)."""
        return self.is_flux and self.unet.guidance_embed

    def shift_at(self, width: int, height: int) -> float:
        """The flow time shift for an image of width x height pixels: exp(mu(n)) with n its 2x2 latent patches
        when `dynamic_shift` is set (mu linear through (256, mu_256) and (4096, mu_4096)), else `flow_shift`."""
        if self.dynamic_shift is None:
            return self.flow_shift
        n = (width // self.latent_factor // 2) * (height // self.latent_factor // 2)
        lo, hi = self.dynamic_shift
        return math.exp(lo + (hi - lo) * (n - 256) / (4096 - 256))

    @property
    def pixel_space(self) -> bool:
        """No VAE: the diffusion runs on the pixels."""
        return self.vae is None

    @property
    def latent_channels(self) -> int:
        """Channels of the space the UNet denoises: the VAE's latent (embed_dim, after quant_conv), or
        the UNet's output channels in pixel space."""
        return self.vae.embed_dim if self.vae is not None else self.unet.out_channels

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side: the VAE's downsampling factor, 1 in pixel space."""
        return self.vae.downsample_factor if self.vae is not None else 1

    @property
    def is_inpaint(self) -> bool:
        """The UNet takes latent + mask (1) + masked-image latent: 4 + 1 + 4 = 9 channels for SD."""
        return self.unet.in_channels == 2 * self.latent_channels + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in checkpoints that `save_checkpoint` writes); "vae": null
        for a pixel-space model."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFamily:
        """Inverse of `to_dict`; unknown fields are an error naming the valid ones. "vae": null is a
        pixel-space model; a missing "vae", like any missing field, takes the default."""
        data = dict(data)
        net = data.get("unet", {})
        data["unet"] = _config(FluxConfig if "depth_single_blocks" in net else
                               MMDiTConfig if "hidden_size" in net else UNetConfig, net)
        vae_data = data.get("vae", {})
        data["vae"] = None if vae_data is None else _config(VAEConfig, vae_data)
        data["beta_schedule"] = _config(BetaSchedule, data.get("beta_schedule", {}))
        data["text_encoders"] = tuple(
            _config(TextEncoderSpec, {**spec, "config": _config(T5Config if spec.get("kind") == "t5" else CLIPTextConfig,
                                                                spec.get("config", {}))})
            for spec in data.get("text_encoders", ()))
        return _config(cls, data)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _config(cls, data: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} fields {unknown} in the model description; "
                              f"valid: {sorted(names)}")
    try:
        return cls(**{k: _tuples(v) for k, v in data.items()})
    except TypeError as e:  # a required field is missing
        raise CheckpointError(f"incomplete {cls.__name__} description: {e}") from None


# ---------------------------------------------------------------------------------- the families
SD_PREFIX_CLIP = "cond_stage_model.transformer."
SD_PREFIX_OPENCLIP = "cond_stage_model.model."
SDXL_PREFIX_CLIP = "conditioner.embedders.0.transformer."
SDXL_PREFIX_BIGG = "conditioner.embedders.1.model."
REFINER_PREFIX_BIGG = "conditioner.embedders.0.model."
SD3_PREFIX_CLIP_L = "text_encoders.clip_l.transformer."
SD3_PREFIX_CLIP_G = "text_encoders.clip_g.transformer."
SD3_PREFIX_T5 = "text_encoders.t5xxl.transformer."
SDXL_ADM = ("pooled", "original_size", "crop_coords", "target_size")
REFINER_ADM = ("pooled", "original_size", "crop_coords", "aesthetic_score")


def _sd1(u: UNetConfig, v: VAEConfig, te: CLIPTextConfig, name: str = "sd1") -> ModelFamily:
    # CLIP-L last layer with its final norm; the tokenizer pads with EOS.
    return ModelFamily(name, u, v, (TextEncoderSpec("clip", te, SD_PREFIX_CLIP),))


def _sd2(u: UNetConfig, v: VAEConfig, te: CLIPTextConfig, name: str) -> ModelFamily:
    # OpenCLIP-H penultimate layer through ln_final (FrozenOpenCLIPEmbedder layer="penultimate");
    # open_clip's tokenizer pads with 0.
    spec = TextEncoderSpec("openclip", te, SD_PREFIX_OPENCLIP, layer=-2, final_norm=True, pad_id=0)
    v_pred = name == "sd2-v"
    return ModelFamily(name, u, v, (spec,), prediction_type="v" if v_pred else "eps",
                       default_size=768 if v_pred else 512)


def _sdxl(u: UNetConfig, v: VAEConfig, te_l: CLIPTextConfig, te_g: CLIPTextConfig, name: str) -> ModelFamily:
    # Both encoders' penultimate layer without final norm, concatenated (768 + 1280 = 2048);
    # bigG's pooled output goes into y. sgm's CLIP-L tokenizer pads with EOS, open_clip's with 0.
    specs = (TextEncoderSpec("clip", te_l, SDXL_PREFIX_CLIP, layer=-2, final_norm=False),
             TextEncoderSpec("openclip", te_g, SDXL_PREFIX_BIGG, layer=-2, final_norm=False,
                             pad_id=0, pooled=True))
    return ModelFamily(name, u, v, specs, latent_scale=0.13025, default_size=1024,
                       adm_inputs=SDXL_ADM, vae_force_upcast=True)


def _refiner(u: UNetConfig, v: VAEConfig, te_g: CLIPTextConfig) -> ModelFamily:
    spec = TextEncoderSpec("openclip", te_g, REFINER_PREFIX_BIGG, layer=-2, final_norm=False,
                           pad_id=0, pooled=True)
    return ModelFamily("sdxl-refiner", u, v, (spec,), latent_scale=0.13025, default_size=1024,
                       adm_inputs=REFINER_ADM, vae_force_upcast=True)


def _sd3(m: MMDiTConfig, v: VAEConfig, te_l: CLIPTextConfig, te_g: CLIPTextConfig, te_t5: T5Config,
         name: str) -> ModelFamily:
    # sd3-ref / diffusers StableDiffusion3Pipeline: CLIP-L and CLIP-G penultimate layers without final
    # norm, concatenated (768 + 1280 = 2048) and zero-padded to T5's 4096, then T5-XXL's last layer
    # (256 tokens) appended along the token axis; the pooled vector is both projected EOS states
    # (768 + 1280 = 2048). CLIP-L pads with EOS, CLIP-G with 0, T5 with <pad> = 0.
    specs = (TextEncoderSpec("clip", te_l, SD3_PREFIX_CLIP_L, layer=-2, final_norm=False, pooled=True),
             TextEncoderSpec("clip", te_g, SD3_PREFIX_CLIP_G, layer=-2, final_norm=False, pad_id=0, pooled=True),
             TextEncoderSpec("t5", te_t5, SD3_PREFIX_T5, pad_id=0, max_length=256, optional=True))
    return ModelFamily(name, m, v, specs, prediction_type="flow", latent_scale=1.5305, latent_shift=0.0609,
                       default_size=1024, flow_shift=3.0)


SD3_FAMILIES = ("sd3", "sd35-large", "sd35-medium")
FLUX_FAMILIES = ("flux-dev", "flux-schnell")
FLUX_PREFIX_CLIP_L = SD3_PREFIX_CLIP_L   # ComfyUI writes Flux's encoders where it writes SD3's
FLUX_PREFIX_T5 = SD3_PREFIX_T5
FLUX_DYNAMIC_SHIFT = (0.5, 1.15)


def _flux(m: FluxConfig, v: VAEConfig, te_l: CLIPTextConfig, te_t5: T5Config, name: str) -> ModelFamily:
    # BFL `HFEmbedder` / diffusers FluxPipeline: CLIP-L's pooled output (the final-normed EOS state, no
    # projection: 768) is `y`; T5-XXL's last layer over one window of 512 tokens (dev; 256 for schnell as
    # diffusers and BFL use) is the whole context. CLIP-L pads with EOS, T5 with <pad> = 0.
    schnell = name == "flux-schnell"
    specs = (TextEncoderSpec("clip", te_l, FLUX_PREFIX_CLIP_L, pooled=True),
             TextEncoderSpec("t5", te_t5, FLUX_PREFIX_T5, pad_id=0, max_length=256 if schnell else 512))
    return ModelFamily(name, m, v, specs, prediction_type="flow", latent_scale=0.3611, latent_shift=0.1159,
                       default_size=1024, flow_shift=1.0, dynamic_shift=None if schnell else FLUX_DYNAMIC_SHIFT)


def _build(name: str, u: Mapping[str, UNetConfig | MMDiTConfig], v: VAEConfig, t: Mapping[str, Any]) -> ModelFamily:
    if name in FLUX_FAMILIES:
        return _flux(u[name], t["vae16"], t["clip_l"], t["t5"], name)
    if name in SD3_FAMILIES:
        return _sd3(u[name], t["vae16"], t["clip_l_sd3"], t["clip_g_sd3"], t["t5"], name)
    if name in ("sd1", "sd1-inpaint"):
        return _sd1(u[name], v, t["clip_l"], name)
    if name in ("sd2", "sd2-v", "sd2-inpaint"):
        return _sd2(u[name], v, t["openclip_h"], name)
    if name in ("sdxl", "sdxl-inpaint"):
        return _sdxl(u[name], v, t["clip_l_sdxl"], t["bigg"], name)
    return _refiner(u["sdxl-refiner"], v, t["bigg"])


FAMILY_NAMES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-inpaint",
                "sdxl-refiner", *SD3_FAMILIES, *FLUX_FAMILIES, "custom")

_REAL_UNETS = {"sd1": unet.SD15, "sd1-inpaint": unet.SD15_INPAINT, "sd2": unet.SD2, "sd2-v": unet.SD2,
               "sd2-inpaint": replace(unet.SD2, in_channels=9), "sdxl": unet.SDXL,
               "sdxl-inpaint": replace(unet.SDXL, in_channels=9), "sdxl-refiner": unet.SDXL_REFINER,
               "sd3": mmdit.SD3_MEDIUM, "sd35-large": mmdit.SD35_LARGE, "sd35-medium": mmdit.SD35_MEDIUM,
               "flux-dev": flux.DEV, "flux-schnell": flux.SCHNELL}
_REAL_TEXT = {"clip_l": clip.CLIP_L, "clip_l_sdxl": clip.CLIP_L_SDXL, "openclip_h": clip.OPENCLIP_H,
              "bigg": clip.OPENCLIP_BIGG, "clip_l_sd3": replace(clip.CLIP_L, projection_dim=768),
              "clip_g_sd3": clip.OPENCLIP_BIGG, "t5": t5.T5_XXL, "vae16": VAEConfig.preset("sd3")}

#: The published families (read-only). "custom" is not here: its configs travel in the checkpoint.
FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(
    {n: _build(n, _REAL_UNETS, VAEConfig(), _REAL_TEXT) for n in FAMILY_NAMES if n != "custom"})


def get_family(name: str) -> ModelFamily:
    """The published family `name` (see FAMILY_NAMES)."""
    if name == "custom":
        raise CheckpointError("family 'custom' has no fixed shape: its configs come from the metadata "
                              "that save_checkpoint writes into the file, or build a ModelFamily yourself")
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; valid: {', '.join(FAMILY_NAMES)}")
    return FAMILIES[name]


def tiny_family(name: str) -> ModelFamily:
    """Family `name` with its real layout (projection kind, heads rule, encoders, adm vector,
    conventions) at toy size, for tests: UNet/VAE/CLIP TINY presets, 9 input channels for the
    inpainting families; CLIP-L tiny is 32 wide, bigG tiny 48 wide with a 24-dim projection.
    SD3 families: MMDiT TINY over a 96-wide joint context (CLIP 32 + 48, padded) and 64-dim pooled
    text (projections 32 + 32), T5 TINY 96 wide, the 16-channel VAE at TINY size. Flux families: Flux TINY (schnell without
    guidance_in) over T5 TINY 40 wide and CLIP-L TINY's 32-wide pooled state."""
    if name == "custom":
        return replace(tiny_family("sd1"), name="custom")
    get_family(name)  # validates the name
    small_l = replace(clip.TINY, projection_dim=None)
    small_h = replace(clip.TINY, act="gelu")
    small_g = replace(clip.TINY, width=48, mlp_dim=96, act="gelu", projection_dim=24)
    base = unet.TINY
    sd2 = replace(base, num_head_channels=16, use_linear_in_transformer=True, context_dim=small_h.width)
    sdxl = replace(base, transformer_depth=(0, 2), transformer_depth_middle=2, num_head_channels=16,
                   use_linear_in_transformer=True, context_dim=small_l.width + small_g.width,
                   num_classes="sequential", adm_in_channels=small_g.projection_dim + 6 * 256)
    refiner = replace(base, model_channels=48, transformer_depth=(0, 1), num_head_channels=16,
                      use_linear_in_transformer=True, context_dim=small_g.width,
                      num_classes="sequential", adm_in_channels=small_g.projection_dim + 5 * 256)
    unets = {"sd1": replace(base, context_dim=small_l.width), "sd2": sd2, "sd2-v": sd2, "sdxl": sdxl,
             "sdxl-refiner": refiner}
    for n in ("sd1", "sd2", "sdxl"):
        unets[f"{n}-inpaint"] = replace(unets[n], in_channels=9)
    small_t5 = replace(t5.TINY, d_model=96)
    sd3_l, sd3_g = replace(clip.TINY, projection_dim=32), replace(small_g, projection_dim=32)
    mm = replace(mmdit.TINY, context_dim=small_t5.d_model, adm_in_channels=64)
    unets |= {"sd3": mm, "sd35-large": replace(mm, qk_norm="rms"),
              "sd35-medium": replace(mm, qk_norm="rms", x_block_self_attn_layers=(0, 1))}
    if name in FLUX_FAMILIES:
        fx = replace(flux.TINY if name == "flux-dev" else flux.TINY_SCHNELL, vec_in_dim=small_l.width)
        return _flux(fx, VAEConfig.preset("sd3-tiny"), small_l, replace(t5.TINY, d_model=fx.context_in_dim), name)
    texts = {"clip_l": small_l, "clip_l_sdxl": small_l, "openclip_h": small_h, "bigg": small_g,
             "clip_l_sd3": sd3_l, "clip_g_sd3": sd3_g, "t5": small_t5, "vae16": VAEConfig.preset("sd3-tiny")}
    return _build(name, unets, VAEConfig.tiny(), texts)


# ---------------------------------------------------------------------------------- detection
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_MMDIT_IN = "model.diffusion_model.x_embedder.proj.weight"
_UNSUPPORTED_MARKERS = {
    "cond_stage_model.roberta.": "AltDiffusion (XLM-RoBERTa text encoder)",
    "depth_model.": "SD 2 depth-to-image (MiDaS)",
    "edm_vpred.sigma_max": "an EDM v-prediction model (CosXL)",
}


def detect_family(keys_and_shapes: Mapping[str, Sequence[int]]) -> str:
    """Family name of a single-file (LDM / SGM layout) checkpoint from its key names and shapes.

    Rules (those of A1111 `guess_model_config_from_state_dict` and ComfyUI `model_detection`):
    - `conditioner.embedders.1.*` (CLIP-L + OpenCLIP bigG): "sdxl";
    - only `conditioner.embedders.0.model.*` (bigG) and an adm `label_emb`: "sdxl-refiner"
      (the real refiner also has 384 model channels; that is not required, so toy refiners load);
    - `cond_stage_model.model.*` (OpenCLIP-H): SD 2.x; `cond_stage_model.transformer.*`: SD 1.x;
    - 9 UNet input channels: the "-inpaint" variant;
    - an MMDiT (`model.diffusion_model.joint_blocks.*`): "sd35-medium" with MMDiT-X blocks
      (`x_block.attn2`), "sd35-large" with QK-norm (`ln_q`), else "sd3" (SD3 Medium). The loader reads
      the MMDiT's exact config from the shapes (`convert_mmdit.mmdit_config_from_shapes`);
    - a Flux transformer (`double_blocks.*` / `single_blocks.*`, with or without `model.diffusion_model.`):
      "flux-dev" with a guidance embedder (`guidance_in`), else "flux-schnell" (ComfyUI's rule).
    SD 2.x eps and v checkpoints have identical keys and shapes, so this returns "sd2-v" for a
    4-channel SD 2 checkpoint: v is the convention of SD 2.x at 768 px (2.0-768-v, 2.1-768), the
    SD 2 checkpoints most people use. `load_checkpoint` refines that with A1111's test of the
    UNet's output (`predicts_v`) unless the family is given; pass family="sd2" for 512-base models.
    Raises CheckpointError naming what the keys look like when no family fits.
    """
    keys = keys_and_shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    for marker, what in _UNSUPPORTED_MARKERS.items():
        if has(marker):
            raise CheckpointError(f"this checkpoint is {what}, which diffusekit does not support; "
                                  f"supported families: {', '.join(FAMILY_NAMES)}")
    flux_prefix = flux_key_prefix(keys_and_shapes)
    if flux_prefix is not None:
        return "flux-dev" if flux_prefix + "guidance_in.in_layer.weight" in keys_and_shapes else "flux-schnell"
    if _MMDIT_IN in keys_and_shapes:
        if has("model.diffusion_model.joint_blocks.0.x_block.attn2."):
            return "sd35-medium"
        return "sd35-large" if has("model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.") else "sd3"
    if _UNET_IN not in keys_and_shapes:
        raise CheckpointError(_not_a_checkpoint(keys))
    in_ch = int(keys_and_shapes[_UNET_IN][1])
    if in_ch not in (4, 9):
        what = "an InstructPix2Pix model (8 channels)" if in_ch == 8 else f"a {in_ch}-channel UNet"
        if in_ch in (1, 3) and not has("first_stage_model."):
            what = ("a pixel-space model: no VAE; its layout is no published family, so load it with "
                    "family=ModelFamily(..., vae=None) or from a file save_checkpoint wrote, which stores it")
        raise CheckpointError(f"the UNet takes {in_ch} input channels ({what}); supported: 4 (txt2img) "
                              "and 9 (inpainting)")
    suffix = "-inpaint" if in_ch == 9 else ""
    if has("conditioner.embedders.1."):
        return "sdxl" + suffix
    if has(REFINER_PREFIX_BIGG) and has("model.diffusion_model.label_emb.") and not suffix:
        return "sdxl-refiner"
    if has(SD_PREFIX_OPENCLIP):
        return "sd2" + suffix if suffix else "sd2-v"
    if has(SD_PREFIX_CLIP):
        return "sd1" + suffix
    if has("conditioner.embedders.0."):
        raise CheckpointError("an SGM-layout checkpoint with one text encoder at conditioner.embedders.0 "
                              "and no SDXL adm input (sgm's SD 1/2 configs); re-save it in the LDM layout "
                              "(cond_stage_model.*)")
    raise CheckpointError("the checkpoint has a UNet (model.diffusion_model.*) but no text encoder "
                          "(cond_stage_model.* or conditioner.embedders.*): a UNet-only file cannot be "
                          "loaded as a full model")


def flux_key_prefix(keys) -> str | None:
    """The prefix of a Flux transformer's keys in a file: "model.diffusion_model." (ComfyUI), "" (BFL's
    release), or None when the file holds no Flux."""
    for prefix in ("model.diffusion_model.", ""):
        if prefix + "img_in.weight" in keys and (prefix + "double_blocks.0.img_mod.lin.weight" in keys
                                                 or prefix + "single_blocks.0.linear1.weight" in keys):
            return prefix
    return None


def _not_a_checkpoint(keys) -> str:
    sample = sorted(keys)[:5]
    if any(k.startswith(("lora_unet_", "lora_te", "lora_te1_")) or ".lora_" in k for k in keys):
        what = "a LoRA, not a full checkpoint"
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        what = "a standalone VAE, not a full checkpoint"
    elif any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        what = "one diffusers component (diffusers key names); pass the diffusers folder instead"
    elif any(k.startswith("model_ema.") for k in keys):
        what = "EMA weights only"
    else:
        what = "not a Stable Diffusion checkpoint in the LDM/SGM layout"
    return (f"no UNet weights (model.diffusion_model.input_blocks.0.0.weight) in the checkpoint: it looks "
            f"like {what}. First keys: {sample}")

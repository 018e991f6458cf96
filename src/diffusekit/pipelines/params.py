"""What a generation is asked to do, with A1111's API field names, and what it returns."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

MAX_PROMPT_CHARS = 20_000   # longer prompts are refused (A1111 would encode hundreds of chunks)
MAX_SIDE = 4096
# where the SDE samplers' Brownian noise comes from (see pipelines/sde_noise.py)
SDE_NOISE_MODES = ("diffusekit", "a1111", "comfyui")


@dataclass
class GenerationParams:
    """One txt2img / img2img / inpaint job. Field names and meanings follow A1111's /sdapi/v1 API.

    width/height None = the model's native size. sampler_name and scheduler take the A1111 display names
    ("DPM++ 2M", "Karras") or canonical ids ("dpmpp_2m", "karras"); "Automatic" picks the sampler's own
    default schedule, as A1111 does. A legacy combined name such as "DPM++ 2M Karras" is split.
    seed -1 draws a random seed; image i of the job uses seed + i and subseed + i, except that with a
    variation (subseed_strength > 0) every image keeps `seed` and only the subseed advances (A1111).
    Several init_images are used in turn for the images of a batch (A1111 instead shrinks batch_size to
    their number). refiner_switch_at follows A1111's default rule: the refiner takes over at the first
    step whose nearest training timestep t has (999 - t) / 1000 >= switch_at (sd_samplers_common); with
    enable_hr it refines the second pass only (A1111's default "Hires fix: which pass": second pass).
    hr_upscaler: "Latent" (bilinear), "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic
    antialiased)", "Latent (nearest)", "Latent (nearest-exact)", "Nearest"; any other name resizes the
    decoded image with Lanczos (A1111's "Lanczos"; its model upscalers do not exist here).
    sde_noise picks the Brownian noise of the SDE samplers (DPM++ SDE, 2M SDE, 3M SDE): "diffusekit" (our
    counter-based tree, the default), "a1111" or "comfyui" (torchsde's tree built as those tools build it,
    so a CPU render at the same seed comes out the same; needs `pip install torchsde`). "a1111" also draws
    the churn noise of Euler / Heun / DPM2 as A1111 does (a draw on every step, so an s_tmin / s_tmax
    window gives A1111's image). Other samplers ignore it.
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    batch_size: int = 1
    n_iter: int = 1
    width: Optional[int] = None
    height: Optional[int] = None
    clip_skip: int = 1
    # img2img / inpainting
    init_images: Optional[list] = None          # PIL images (the API layer decodes base64)
    denoising_strength: float = 0.75
    mask: Any = None                            # PIL image, white = repaint
    mask_blur: int = 4
    inpainting_mask_invert: bool = False
    inpainting_fill: int = 1                    # A1111: 0 fill, 1 original (its UI default; the API's is 0),
                                                # 2 latent noise, 3 latent nothing
    # sampler knobs (None = the sampler's default)
    eta: Optional[float] = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    cfg_rescale: float = 0.0
    guidance: Optional[float] = None            # Flux.1 dev's distilled guidance (Forge "Distilled CFG Scale");
                                                # None = the model's default (3.5); other models ignore it
    sde_noise: str = "diffusekit"               # "diffusekit" | "a1111" | "comfyui" (pipelines/sde_noise.py)
    # two-stage generation
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None   # fraction of the steps after which the refiner takes over
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"                 # "Latent" (latent bilinear) or "Lanczos" (image space)
    hr_second_pass_steps: int = 0               # 0 = same as steps
    hr_denoising_strength: Optional[float] = None  # None = denoising_strength (A1111 uses that field)
    # output
    save_process: bool = False                  # keep every step's latent/x0 for a denoising video

    def copy(self, **changes) -> "GenerationParams":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return GenerationParams(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("init_images"); d.pop("mask")
        return d

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    def resolved_seed(self, rng: random.Random | None = None) -> int:
        """The job's first seed: the given one, or a random 32-bit one for -1 (as A1111)."""
        return int(self.seed) if int(self.seed) != -1 else (rng or random.SystemRandom()).randrange(2**32)

    def validate(self, factor: int | None = None) -> None:
        """Raise ValueError naming the first bad field and what is valid. `factor`: the model's latent
        downsampling factor (`Pipeline.factor`: 8 for SD's VAE, 4 for `shapes`, 1 in pixel space); width
        and height must be multiples of it. None (no model at hand) checks their range only; the
        pipeline checks the rest with its own factor."""
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.prompt, str):
            bad("prompt", "must be a string")
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name) or ""
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{name}: character {e.start} is a lone surrogate ({ascii(text[e.start])}), "
                                     f"which is not text; send valid Unicode (a surrogate pair joins two into "
                                     f"one character)") from None
        if len(self.prompt) > MAX_PROMPT_CHARS or len(self.negative_prompt or "") > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            bad("steps", "must be an integer from 1 to 1000")
        for side in ("width", "height"):
            v = getattr(self, side)
            if v is None:
                continue
            if factor is None:
                if not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= MAX_SIDE:
                    bad(side, f"must be an integer from 8 to {MAX_SIDE}")
            elif not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= MAX_SIDE or v % factor:
                low = -(-8 // factor) * factor
                why = (f"the model's VAE downsamples by {factor}" if factor > 1 else
                       "a pixel-space model: no VAE factor")
                bad(side, f"must be {f'a multiple of {factor}' if factor > 1 else 'an integer'} from {low} to "
                          f"{MAX_SIDE} ({why})")
        if not 0.0 <= float(self.denoising_strength) <= 1.0:
            bad("denoising_strength", "must be in [0, 1]")
        if not 0.0 <= float(self.subseed_strength) <= 1.0:
            bad("subseed_strength", "must be in [0, 1]")
        if not math.isfinite(float(self.cfg_scale)) or not 0.0 <= float(self.cfg_scale) <= 100.0:
            bad("cfg_scale", "must be a number from 0 to 100")
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float))
                                          or not math.isfinite(float(self.guidance)) or not 0 <= self.guidance <= 100):
            bad("guidance", "must be a number from 0 to 100 (Flux.1 dev's distilled guidance, 3.5 by default) or None")
        if not 0.0 <= float(self.cfg_rescale) <= 1.0:
            bad("cfg_rescale", "must be in [0, 1]")
        if self.sde_noise not in SDE_NOISE_MODES:
            bad("sde_noise", "valid are 'diffusekit' (the default, our Brownian tree), 'a1111' and 'comfyui' "
                             "(torchsde's Brownian tree as AUTOMATIC1111 / ComfyUI seed it)")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 64:
            bad("batch_size", "must be an integer from 1 to 64")
        if not isinstance(self.n_iter, int) or not 1 <= self.n_iter <= 100:
            bad("n_iter", "must be an integer from 1 to 100")
        if not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            bad("clip_skip", "must be an integer from 1 to 12")
        for name in ("seed", "subseed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not -1 <= v < 2**63 - 2**16:
                bad(name, "must be -1 (random) or a non-negative integer below 2**63")
        if self.inpainting_fill not in (0, 1, 2, 3):
            bad("inpainting_fill", "must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
        if self.mask is not None and not self.init_images:
            bad("mask", "inpainting needs init_images too")
        if self.mask is not None and hasattr(self.mask, "size") and hasattr(self.init_images[0], "size") \
                and tuple(self.mask.size) != tuple(self.init_images[0].size):
            (mw, mh), (iw, ih) = self.mask.size, self.init_images[0].size
            raise ValueError(f"mask: its size {mw}x{mh} differs from the init image's {iw}x{ih} "
                             f"(init_images[0]); send a mask of the init image's size")
        if self.mask_blur < 0:
            bad("mask_blur", "must be >= 0")
        if self.refiner_switch_at is not None and not 0.0 < float(self.refiner_switch_at) < 1.0:
            bad("refiner_switch_at", "must be a fraction strictly between 0 and 1")
        if self.enable_hr and not 1.0 <= float(self.hr_scale) <= 4.0:
            bad("hr_scale", "must be from 1 to 4")
        if self.hr_denoising_strength is not None and not 0.0 <= float(self.hr_denoising_strength) <= 1.0:
            bad("hr_denoising_strength", "must be in [0, 1] (or None to use denoising_strength)")
        if not isinstance(self.hr_second_pass_steps, int) or not 0 <= self.hr_second_pass_steps <= 1000:
            bad("hr_second_pass_steps", "must be an integer from 0 (= steps) to 1000")


@dataclass
class StepInfo:
    """What the per-step callback receives."""

    step: int                 # 0-based step index within the current pass
    steps: int                # steps in the current pass
    sigma: float
    latent: Any               # (B, C, h, w) current x
    denoised: Any             # (B, C, h, w) x0 estimate
    preview: Any = None       # callable -> list[PIL.Image]: cheap linear latent->RGB approximation
    job_no: int = 0           # which n_iter batch
    job_count: int = 1
    pass_name: str = "txt2img"  # "txt2img" | "img2img" | "hires" | "refiner"


@dataclass
class GenerationResult:
    images: list                          # PIL images with the A1111 infotext in .info["parameters"]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    params: GenerationParams
    latents: Any = None                   # final latents (B, C, h, w)
    process: list = field(default_factory=list)  # per-step records when save_process: list of dict(step, sigma, x, denoised)
    interrupted: bool = False
    info: dict = field(default_factory=dict)     # extra facts (model name/hash, unsupported fields, timings)

"""Request and response bodies of the A1111-compatible API, and their translation to GenerationParams.

Field names and defaults follow AUTOMATIC1111 v1.10 `modules/api/models.py` (which generates its models
from `StableDiffusionProcessingTxt2Img/Img2Img`): every field is optional, null means "the default".
A field A1111 has but diffusekit does not implement is accepted and, when set to something other than
its default, named in `info["unsupported_fields"]`; it is never silently applied in some other way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields as dc_fields
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ...pipelines.infotext import MAX_INFOTEXT_CHARS
from ...pipelines.cost import device_memory_bytes, estimate_memory, pixel_steps
from ...pipelines.params import MAX_PROMPT_CHARS, GenerationParams
from ...pipelines.shipped import A1111_DEFAULTS


class RequestError(ValueError):
    """A request the server refuses: HTTP `status` with a message that names the field or limit."""

    def __init__(self, message: str, status: int = 422, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Exceeding a limit answers 422 and names it (e.g. `max_steps=150`).

    The defaults admit everything A1111's own UI sliders allow for SD 1.x / SDXL (2048 x 2048, 150 steps,
    batch 8) while keeping one request from occupying the server for hours or exhausting memory.
    """

    max_pixels: int = 2048 * 2048          # width * height, also of the hires-fix output
    max_steps: int = 150                   # steps and hr_second_pass_steps
    max_batch_size: int = 8                # images denoised together (memory)
    max_images: int = 32                   # batch_size * n_iter, and cells of a compare grid (time)
    max_body_bytes: int = 32 * 2**20       # request body (base64 init images live here)
    max_input_pixels: int = 4096 * 4096    # a decoded init image / mask / png-info image
    max_prompt_chars: int = MAX_PROMPT_CHARS
    # the cost of the whole request, not of one field (every field within its limit still multiplies up):
    max_pixel_steps: int = 2**30           # work: width*height*steps*images, summed over the passes (hires too)
    max_memory_mb: Optional[int] = None    # estimated peak memory (weights + activations); None = the device's
    max_infotext_chars: int = MAX_INFOTEXT_CHARS   # png-info: the longest infotext read from an image

    def __post_init__(self):
        for f in dc_fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "max_memory_mb":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f.name}={v!r}: limits must be positive integers")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dc_fields(self)}


# strict: a number field takes a JSON number only (true / "123" are refused, not read as 1 / 123; an integer
# field also refuses 1.5 and 1.0), as pydantic's strict mode; a float field takes integers too.
_MODEL = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False, protected_namespaces=(), strict=True)
MAX_JSON_DEPTH = 32          # nesting of the free-form fields (comments, override_settings, script_args, ...)


def check_json_value(value: Any, where: str) -> None:
    """Refuse what the server could not send back or work with: a lone surrogate ("\\ud800": JSON allows
    it, UTF-8 cannot encode it) in any string or key, and nesting deeper than MAX_JSON_DEPTH. ValueError
    naming the path (`comments.a[0]`); iterative, so no depth can overflow the stack here."""
    stack = [(value, where, 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError(f"{path}: nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(v, dict):
                for k, item in v.items():
                    key = str(k)
                    _check_text(key, f"{path} (a key)")
                    stack.append((item, f"{path}.{key[:40]}", depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v))


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{path}: character {e.start} is a lone surrogate ({ascii(text[e.start])}), which is "
                         f"not text; send valid Unicode") from None


class _Checked(BaseModel):
    """Every field and every extra (unknown) field goes through `check_json_value` (field name in the path)."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_json(cls, v, info: ValidationInfo):
        if v is not None:
            check_json_value(v, info.field_name)
        return v

    @model_validator(mode="after")
    def _valid_extras(self):
        for k, v in (self.model_extra or {}).items():
            check_json_value({k: v}, "body")
        return self


class Txt2ImgRequest(_Checked):
    """POST /sdapi/v1/txt2img. A1111's fields; `save_process`, `cfg_rescale` and `sde_noise` are diffusekit additions."""

    model_config = _MODEL

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = Field(-1, description="-1 picks a random seed; image i of the job uses seed + i")
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0.0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = Field(None, description="A1111 label ('DPM++ 2M'), id ('dpmpp_2m') or legacy "
                                                          "combined name ('DPM++ 2M Karras'); null = sampler_index")
    scheduler: Optional[str] = Field(None, description="schedule label ('Karras') or id; null = the model card's "
                                                       "(Karras for the shipped models), else 'Automatic'")
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = Field(None, description="null = the model card's (20 for the shipped models), else 20")
    cfg_scale: Optional[float] = Field(None, description="null = the model card's (5 for the shipped models), else 7")
    width: Optional[int] = Field(None, description="null = the model's native size (512 for SD 1.x)")
    height: Optional[int] = None
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    enable_hr: Optional[bool] = False
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""
    force_task_id: Optional[str] = None
    sampler_index: Optional[str] = Field(None, description="A1111's older name of sampler_name; both null = the "
                                                           "model card's sampler (DPM++ 2M), else 'DPM++ 2M'")
    script_name: Optional[str] = None
    script_args: Optional[list[Any]] = Field(default_factory=list)
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict[str, Any]] = Field(default_factory=dict)
    infotext: Optional[str] = None
    # diffusekit additions
    save_process: Optional[bool] = Field(False, description="keep every step for GET /diffusekit/v1/video")
    cfg_rescale: Optional[float] = Field(0.0, description="CFG rescale phi (Lin et al. 2023), 0 = off")
    distilled_cfg_scale: Optional[float] = Field(None, description="Forge's field: Flux.1 dev's distilled guidance, "
                                                                   "a model input (null = 3.5); other models ignore it")
    sde_noise: Optional[str] = Field(None, description="SDE samplers' Brownian noise: 'diffusekit' (null), 'a1111' "
                                                       "or 'comfyui' (torchsde's tree seeded as those tools do)")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the init image(s) and inpainting mask (base64)."""

    init_images: Optional[list[str]] = Field(None, description="base64 images (a data: URL prefix is accepted)")
    resize_mode: Optional[int] = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: Optional[bool] = False
    denoising_strength: Optional[float] = 0.75


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs (no data: prefix), each with its infotext in the "
                                          "`parameters` text chunk")
    parameters: dict[str, Any] = Field(description="the request, as received, with defaults filled in")
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, unsupported_fields, ...")


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    image: str = Field(description="a base64 image (PNG with a `parameters` chunk, or JPEG/WebP with EXIF)")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class CompareRequest(_Checked):
    """POST /diffusekit/v1/compare: one prompt and seed, samplers across, a second axis down."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: Optional[int] = Field(None, description="null = the model card's (20 for the shipped models), else 20")
    cfg_scale: Optional[float] = Field(None, description="null = the model card's (5 for the shipped models), else 7")
    width: Optional[int] = None
    height: Optional[int] = None
    scheduler: Optional[str] = Field(None, description="null = the model card's (Karras for the shipped models), "
                                                       "else 'Automatic'")
    samplers: list[str] = Field(default_factory=lambda: ["Euler", "Euler a", "DPM++ 2M", "DDIM"],
                                description="the X axis: sampler names")
    y_axis: str = Field("scheduler", description="what varies down the rows: scheduler | steps | cfg_scale | seed")
    y_values: list[Any] = Field(default_factory=lambda: ["Automatic"],
                                description="the rows' values: schedule names (strings) for y_axis=scheduler, "
                                            "integers for steps and seed, numbers for cfg_scale")

    @model_validator(mode="after")
    def _axis_values(self):
        """Strict like the fields: the values of a numeric axis are JSON numbers, not true or "20"."""
        want = {"scheduler": (str,), "steps": (int,), "seed": (int,), "cfg_scale": (int, float)}.get(self.y_axis)
        for v in self.y_values if want else ():
            ok = isinstance(v, want) and not isinstance(v, bool) and (not isinstance(v, float) or math.isfinite(v))
            if not ok:
                kind = "a schedule name" if want == (str,) else "an integer" if want == (int,) else "a finite number"
                raise ValueError(f"y_values: {v!r} is not {kind} (y_axis={self.y_axis})")
        return self


class OptionsRequest(_Checked):
    """POST /sdapi/v1/options: the settings to change. Two take effect here; any other A1111 setting is
    accepted and, when it differs from what GET /sdapi/v1/options reports, named in `unsupported_options`."""

    model_config = _MODEL
    sd_model_checkpoint: Optional[str] = Field(None, description="load this model now (a title, name or hash "
                                                                 "from GET /sdapi/v1/sd-models)")
    CLIP_stop_at_last_layers: Optional[int] = Field(None, ge=1, le=12, description="Clip skip for later jobs")


class OptionsResponse(BaseModel):
    unsupported_options: list[str] = Field(description="the settings given that this server does not apply")


class ValidationItem(BaseModel):
    loc: list[Union[str, int]]
    msg: str
    type: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error answer, 4xx and 5xx, has this shape."""

    detail: Union[str, list[ValidationItem]] = Field(
        description="what went wrong: a sentence naming the field or limit; a list, one item per problem, when "
                    "the body does not fit the schema")
    error: str = Field(description="the HTTP reason phrase ('Unprocessable Entity', 'Internal Server Error', ...)")
    field: Optional[str] = Field(None, description="the request field or server limit the refusal names")
    errors: Optional[str] = Field(None, description="schema problems, all of them in one line")


ERROR_STATUSES = {400: "the body is not JSON the server can parse, or a header is malformed",
                  401: "api_auth is set and the credentials are missing or wrong",
                  404: "nothing to show yet, or no such route",
                  405: "the route exists for other methods (see the Allow header)",
                  409: "no model is selected",
                  422: "a field or the request's cost is outside what this server accepts (the message names it)",
                  500: "the server failed: a broken model, LoRA or embedding file, or a bug (never the request)",
                  503: "busy (the queue is full: see Retry-After), shutting down, or the model cannot be loaded"}
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": why} for code, why in ERROR_STATUSES.items()}


# ---------------------------------------------------------------------------------------- translation
# A1111 fields diffusekit does not implement -> the values that mean "not used" (None always does).
_UNSUPPORTED_DEFAULTS: dict[str, tuple] = {
    "styles": ([],), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0), "restore_faces": (False,),
    "tiling": (False,), "s_min_uncond": (0, 0.0), "firstpass_image": ("",), "firstphase_width": (0,),
    "firstphase_height": (0,), "hr_resize_x": (0,), "hr_resize_y": (0,), "hr_checkpoint_name": ("", "Use same checkpoint"),
    "hr_sampler_name": ("", "Use same sampler"), "hr_scheduler": ("", "Use same scheduler"), "hr_prompt": ("",),
    "hr_negative_prompt": ("",), "script_name": ("",), "script_args": ([],), "alwayson_scripts": ({},),
    "save_images": (False,), "infotext": ("",),
    # img2img
    "resize_mode": (0,), "image_cfg_scale": (), "initial_noise_multiplier": (1, 1.0), "latent_mask": ("",),
    "inpaint_full_res_padding": (0,),
}
# fields that are no-ops here by nature (nothing is saved, there are no extra networks) or handled elsewhere
_NO_OPS = {"do_not_save_samples", "do_not_save_grid", "disable_extra_networks", "comments", "force_task_id",
           "send_images", "override_settings", "override_settings_restore_afterwards", "sampler_index",
           "include_init_images", "mask_round", "mask_blur_x", "mask_blur_y", "init_images", "mask"}
_OVERRIDES_SUPPORTED = {"sd_model_checkpoint", "CLIP_stop_at_last_layers"}
_OVERRIDE_DEFAULTS = {"eta_noise_seed_delta": (0,), "sd_vae": ("Automatic", "None"), "samples_format": ("png",)}


def unsupported_fields(req: Txt2ImgRequest, *, has_mask: bool = False) -> list[str]:
    """Names of the request's fields that are set but not implemented, plus fields A1111 does not know."""
    out = []
    for name, ok in _UNSUPPORTED_DEFAULTS.items():
        if name in type(req).model_fields:
            v = getattr(req, name)
            if v is not None and v not in ok:
                out.append(name)
    if isinstance(req, Img2ImgRequest):
        if has_mask and req.inpaint_full_res:
            out.append("inpaint_full_res")      # diffusekit inpaints the whole picture ("Whole picture" mode)
        if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
            out.append("mask_blur_y")           # one blur radius only: mask_blur_x is used
    if req.enable_hr and req.hr_upscaler not in (None, "Latent", "Lanczos"):
        out.append("hr_upscaler")               # only "Latent" (bilinear) and "Lanczos" exist here
    for key, value in (req.override_settings or {}).items():
        if key not in _OVERRIDES_SUPPORTED and value not in _OVERRIDE_DEFAULTS.get(key, ()):
            out.append(f"override_settings.{key}")
    out += sorted(req.model_extra or {})
    return out


def _or(value, default):
    return default if value is None else value


def to_generation_params(req: Txt2ImgRequest, *, init_images=None, mask=None, clip_skip: int = 1,
                         defaults: dict | None = None) -> GenerationParams:
    """The GenerationParams a request asks for (images already decoded to PIL). Validation happens later.
    `defaults`: sampler_name, scheduler, steps and cfg_scale for the fields the request leaves null: those
    the model's card recommends (`shipped.recommended`), A1111's (`A1111_DEFAULTS`) when not given."""
    d = defaults or A1111_DEFAULTS
    overrides = req.override_settings or {}
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        v = overrides["CLIP_stop_at_last_layers"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 12:
            raise RequestError(f"override_settings.CLIP_stop_at_last_layers={v!r}: must be an integer from 1 to 12",
                               field="override_settings.CLIP_stop_at_last_layers")
        clip_skip = v
    sampler = req.sampler_name or req.sampler_index or d["sampler_name"]
    p = GenerationParams(
        prompt=_or(req.prompt, ""), negative_prompt=_or(req.negative_prompt, ""), steps=_or(req.steps, d["steps"]),
        sampler_name=sampler, scheduler=_or(req.scheduler, d["scheduler"]), cfg_scale=float(_or(req.cfg_scale, d["cfg_scale"])),
        seed=_or(req.seed, -1), subseed=_or(req.subseed, -1), subseed_strength=float(_or(req.subseed_strength, 0.0)),
        batch_size=_or(req.batch_size, 1), n_iter=_or(req.n_iter, 1), width=req.width, height=req.height,
        clip_skip=clip_skip, eta=req.eta, s_churn=float(_or(req.s_churn, 0.0)), s_tmin=float(_or(req.s_tmin, 0.0)),
        s_tmax=float(_or(req.s_tmax, math.inf)), s_noise=float(_or(req.s_noise, 1.0)),
        cfg_rescale=float(_or(req.cfg_rescale, 0.0)), refiner_switch_at=req.refiner_switch_at,
        save_process=bool(req.save_process), sde_noise=_or(req.sde_noise, "diffusekit"),
        guidance=None if req.distilled_cfg_scale is None else float(req.distilled_cfg_scale),
    )
    if req.denoising_strength is not None:
        p.denoising_strength = float(req.denoising_strength)
    if req.enable_hr:
        p.enable_hr = True
        p.hr_scale = float(_or(req.hr_scale, 2.0))
        p.hr_upscaler = _or(req.hr_upscaler, "Latent")
        p.hr_second_pass_steps = _or(req.hr_second_pass_steps, 0)
    if init_images:
        p.init_images = list(init_images)
    if isinstance(req, Img2ImgRequest):
        p.mask = mask
        p.mask_blur = _or(req.mask_blur, _or(req.mask_blur_x, 4))
        p.inpainting_fill = _or(req.inpainting_fill, 0)
        p.inpainting_mask_invert = bool(req.inpainting_mask_invert)
    return p


def check_limits(p: GenerationParams, limits: Limits) -> None:
    """Refuse what exceeds the server's limits; the message names the field and the limit."""
    if len(p.prompt or "") > limits.max_prompt_chars or len(p.negative_prompt or "") > limits.max_prompt_chars:
        which = "prompt" if len(p.prompt or "") > limits.max_prompt_chars else "negative_prompt"
        raise RequestError(f"{which} has {len(getattr(p, which))} characters, over the server limit "
                           f"max_prompt_chars={limits.max_prompt_chars}", field=which)
    if isinstance(p.steps, int) and p.steps > limits.max_steps:
        raise RequestError(f"steps={p.steps} is over the server limit max_steps={limits.max_steps}", field="steps")
    if isinstance(p.hr_second_pass_steps, int) and p.enable_hr and p.hr_second_pass_steps > limits.max_steps:
        raise RequestError(f"hr_second_pass_steps={p.hr_second_pass_steps} is over the server limit "
                           f"max_steps={limits.max_steps}", field="hr_second_pass_steps")
    if isinstance(p.batch_size, int) and p.batch_size > limits.max_batch_size:
        raise RequestError(f"batch_size={p.batch_size} is over the server limit max_batch_size={limits.max_batch_size}",
                           field="batch_size")
    if isinstance(p.batch_size, int) and isinstance(p.n_iter, int) and p.batch_size * p.n_iter > limits.max_images:
        raise RequestError(f"batch_size * n_iter = {p.batch_size} * {p.n_iter} = {p.batch_size * p.n_iter} images is "
                           f"over the server limit max_images={limits.max_images}", field="n_iter")
    if isinstance(p.width, int) and isinstance(p.height, int):
        if p.width * p.height > limits.max_pixels:
            raise RequestError(f"width * height = {p.width} * {p.height} = {p.width * p.height} pixels is over the "
                               f"server limit max_pixels={limits.max_pixels}", field="width")
        if p.enable_hr and isinstance(p.hr_scale, (int, float)):
            if not 1.0 <= p.hr_scale <= 4.0:                # before any arithmetic: 1e308 * 512 overflows
                raise RequestError(f"hr_scale={p.hr_scale!r}: must be from 1 to 4", field="hr_scale")
            hw, hh = int(p.width * p.hr_scale), int(p.height * p.hr_scale)
            if hw * hh > limits.max_pixels:
                raise RequestError(f"the hires-fix output {hw}x{hh} (hr_scale={p.hr_scale}) is over the server limit "
                                   f"max_pixels={limits.max_pixels}", field="hr_scale")
        if all(isinstance(v, int) for v in (p.steps, p.batch_size, p.n_iter, p.hr_second_pass_steps)):
            work = pixel_steps(p)
            if work > limits.max_pixel_steps:
                raise RequestError(f"the request's work, width x height x steps x images summed over its passes, is "
                                   f"{work:,} pixel-steps, over the server budget max_pixel_steps="
                                   f"{limits.max_pixel_steps:,}: ask for fewer or smaller images or fewer steps",
                                   field="max_pixel_steps")


def memory_budget_bytes(limits: Limits, device) -> int | None:
    """max_memory_mb, or without it the device's total memory (GPU memory, else RAM); None if unknown."""
    return limits.max_memory_mb * 2**20 if limits.max_memory_mb else device_memory_bytes(device)


def _activation_bytes(net) -> int:
    """Bytes per activation element: the network's compute dtype (Flux over bf16 / fp8 weights computes in
    its `activation_dtype`), else its weights' dtype."""
    own = getattr(net, "activation_dtype", None)
    return (own() if own is not None else next(net.parameters()).dtype).itemsize


def check_memory(p: GenerationParams, pipe, budget_bytes: int | None) -> dict:
    """Refuse (422 naming max_memory_mb) a request whose estimated peak memory on `pipe` (weights plus
    activations, `pipelines.cost.estimate_memory`; width/height resolved) exceeds the budget."""
    from ...pipelines.pipeline import DECODE_PIXELS_PER_CALL
    modules = [m for m in (pipe.unet, pipe.vae, *pipe.parts.text_encoders) if m is not None]
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.parameters())
    est = estimate_memory(pipe.family, p, width=p.width, height=p.height,
                          dtype_bytes=_activation_bytes(pipe.unet), weight_bytes=weights,
                          decode_pixels_per_call=DECODE_PIXELS_PER_CALL)
    if budget_bytes and est["peak"] > budget_bytes:
        gib = 2**30
        raise RequestError(f"the request would need about {est['peak'] / gib:.1f} GiB (weights {weights / gib:.1f} "
                           f"GiB + UNet {est['unet'] / gib:.1f} GiB or VAE decode {est['vae'] / gib:.1f} GiB, estimated "
                           f"from the model's shape), over the server budget max_memory_mb={budget_bytes // 2**20}: "
                           f"ask for fewer or smaller images", field="max_memory_mb")
    return est


def validate_params(p: GenerationParams, limits: Limits, factor: int | None = None) -> None:
    """Limits first (they name the server limit), then the library's own checks (they name the field);
    `factor`: the model's latent factor once it is known (the size rule names it)."""
    check_limits(p, limits)
    # two fields GenerationParams.validate does not check (torch would fail later without naming them)
    if not -2**63 <= int(p.subseed) < 2**63:
        raise RequestError(f"subseed={p.subseed}: must be -1 (random) or an integer below 2**63", field="subseed")
    if p.inpainting_fill not in (0, 1, 2, 3):
        raise RequestError(f"inpainting_fill={p.inpainting_fill!r}: valid are 0 (fill), 1 (original), "
                           f"2 (latent noise), 3 (latent nothing)", field="inpainting_fill")
    try:
        p.validate(factor=factor)
    except (ValueError, TypeError) as e:       # the message starts with the field: "steps=0: ..." / "mask: ..."
        name = str(e).split("=", 1)[0].split(":", 1)[0]
        raise RequestError(str(e), field=name if name in _PARAM_FIELDS else None) from None


_PARAM_FIELDS = {f.name for f in dc_fields(GenerationParams)}

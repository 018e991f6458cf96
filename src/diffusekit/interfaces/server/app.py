"""The HTTP layer: AUTOMATIC1111's /sdapi/v1 API, diffusekit's own /diffusekit/v1 endpoints and the web UI.

Thin: parse and check a request, hand the work to the worker thread (`jobs.Worker`), format the answer.
Every refusal is a 4xx whose message names the field or the server limit; only a bug is a 500, and a job
that fails never takes the server down.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import secrets
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ...core import samplers as sampler_registry
from ...core import sigmas as sigma_schedules
from .checkpoints import ModelStore
from .jobs import QueueFull, ShuttingDown, Worker
from .loras import LoraCatalog, check_prompt_loras
from .schemas import (CompareRequest, GenerationResponse, Img2ImgRequest, Limits, PngInfoRequest, PngInfoResponse,
                      RequestError, Txt2ImgRequest, to_generation_params, unsupported_fields, validate_params)
from .service import Service, sampler_labels

log = logging.getLogger("diffusekit.server")
STATIC = Path(__file__).resolve().parent / "static"
# schedules that index the model's own discrete noise table (A1111's need_inner_model)
_TABLE_SCHEDULES = {"uniform", "sgm_uniform", "simple", "normal", "ddim_uniform"}
_DEFAULT_RHO = {"karras": 7.0, "polyexponential": 1.0}


# ------------------------------------------------------------------------------------ middleware
class BodyLimit:
    """Refuse request bodies over `max_bytes` (422 naming max_body_bytes), by Content-Length or as they
    stream: the body is read here (it would be read whole anyway) and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error(422, f"the request body is over the server limit max_body_bytes={self.max_bytes}",
                         field="max_body_bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and int(declared) > self.max_bytes:
                return await too_big(scope, receive, send)
        except ValueError:
            return await _error(400, "Content-Length is not a number")(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":          # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                          # then wait for a disconnect, as usual

        return await self.app(scope, replay, send)


def parse_api_auth(credentials: str) -> list[bytes]:
    """"user:pass[,user2:pass2]" (A1111's --api-auth) -> the accepted "user:pass" byte strings."""
    allowed = []
    for pair in str(credentials).split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user:
            raise ValueError("api_auth: expected 'user:password[,user2:password2]'; an entry has no 'user:' part")
        allowed.append(f"{user}:{password}".encode())
    return allowed


class BasicAuth:
    """A1111's --api-auth: HTTP basic auth on every route (API, docs and web UI alike)."""

    def __init__(self, app, allowed: list[bytes]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        ok = False
        if header[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(header[6:].strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
            ok = any(secrets.compare_digest(given, a) for a in self.allowed)
        if not ok:
            resp = JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="diffusekit"'})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"detail": message, "error": _REASONS.get(status, "Error")}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict", 422: "Unprocessable Entity",
            500: "Internal Server Error", 503: "Service Unavailable"}


# ------------------------------------------------------------------------------------ images
def decode_image(data: Any, field: str, limits: Limits) -> Image.Image:
    """A base64 image (optionally a data: URL) -> a loaded PIL image; RequestError naming `field` otherwise."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field}: expected a base64-encoded image string", field=field)
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise RequestError(f"{field}: URLs are not fetched; send the image itself as base64", field=field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{field}: not valid base64 ({e})", field=field) from None
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > limits.max_input_pixels:
            raise RequestError(f"{field}: the image is {w}x{h}, over the server limit "
                               f"max_input_pixels={limits.max_input_pixels}", field=field)
        img.load()
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"{field}: the base64 data is not an image in a format Pillow reads (PNG, JPEG, WebP, ...)",
                           field=field) from None
    except Exception as e:  # PIL raises many types for broken files; all mean "not an image we can read"
        raise RequestError(f"{field}: the base64 data is not a readable image ({type(e).__name__}: {e})",
                           field=field) from None
    return img


def encode_png(img: Image.Image) -> str:
    """base64 PNG (no data: prefix) with the infotext in the `parameters` text chunk, as A1111 sends."""
    meta = PngImagePlugin.PngInfo()
    if img.info.get("parameters"):
        meta.add_text("parameters", str(img.info["parameters"]))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------ the app
def create_app(*, model: str | None = "shapes", models_dir: str | os.PathLike | None = None,
               api_auth: str | None = None, queue_size: int = 8, device: str | None = None,
               limits: Limits | None = None, preload: bool = True, lora_dir: str | os.PathLike | None = None,
               embeddings_dir: str | os.PathLike | None = None, **limit_overrides) -> FastAPI:
    """Build the FastAPI app. `model`: a name in the models folder, a shipped name or a path (None = none
    selected yet); `lora_dir`: the folder `<lora:NAME:WEIGHT>` prompt tags read (GET /sdapi/v1/loras lists it);
    `embeddings_dir`: textual-inversion files whose names prompts may use (GET /sdapi/v1/embeddings lists them);
    `limit_overrides`: any field of `Limits` (max_pixels=..., max_steps=...)."""
    unknown = set(limit_overrides) - set(Limits().as_dict())
    if unknown:
        raise ValueError(f"unknown server option(s) {sorted(unknown)}; the limits are {sorted(Limits().as_dict())}")
    limits = limits or Limits(**limit_overrides)
    allowed_users = parse_api_auth(api_auth) if api_auth else []
    store = ModelStore(models_dir)
    loras = LoraCatalog(lora_dir) if lora_dir is not None else None
    if embeddings_dir is not None and not Path(embeddings_dir).is_dir():
        raise FileNotFoundError(f"embeddings_dir={str(embeddings_dir)!r} is not a folder")
    service = Service(store, model, limits=limits, device=device, loras=loras,
                      embeddings_dir=Path(embeddings_dir).resolve() if embeddings_dir is not None else None)
    worker = Worker(queue_size)
    flags = {"host": None, "port": None, "model": model, "models_dir": str(store.models_dir) if store.models_dir else None,
             "lora_dir": str(loras.folder) if loras else None,
             "embeddings_dir": str(service.embeddings_dir) if service.embeddings_dir else None, "api_auth": bool(api_auth), "queue_size": queue_size,
             "device": service.device, **limits.as_dict(), "api": True, "nowebui": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        if preload and service.selected is not None:
            loading = worker.submit("load model", lambda ctx: service.pipeline())
            loading.add_done_callback(lambda f: f.exception() and log.error("loading %s failed: %s",
                                                                            service.selected.name, f.exception()))
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="diffusekit", version=__version__, lifespan=lifespan,
                  description="AUTOMATIC1111-compatible /sdapi/v1 API and diffusekit's own /diffusekit/v1 endpoints.")
    app.state.service, app.state.worker, app.state.limits, app.state.flags = service, worker, limits, flags

    # ---------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        items, lines = [], []
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ())]
            where = ".".join(loc[1:] if loc[:1] == ["body"] and len(loc) > 1 else loc) or "body"
            if e.get("type") == "json_invalid":
                where = "body"
                msg = f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
            else:
                msg = e.get("msg", "invalid")
            items.append({"loc": loc, "msg": msg, "type": e.get("type")})
            lines.append(f"{where}: {msg}")
        return JSONResponse({"detail": items, "error": "Unprocessable Entity", "errors": "; ".join(lines)[:2000]},
                            status_code=422)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return _error(exc.status, str(exc)[:4000], exc.field)

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: QueueFull):
        return _error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def on_shutdown(request: Request, exc: ShuttingDown):
        return _error(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, f"{type(exc).__name__}: {exc}"[:4000])

    async def run_job(label: str, fn):
        """Queue `fn(ctx)` on the worker and wait for it without blocking the event loop."""
        future = worker.submit(label, fn)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()                      # the client left: drop the job if it has not started
            raise
        except RequestError:
            raise
        except (ValueError, FileNotFoundError) as e:  # the library's "this input is invalid" errors
            raise RequestError(str(e)) from None

    # ---------------------------------------------------------------- generation
    def prepare(req: Txt2ImgRequest, images: list | None, mask) -> tuple:
        unsupported = unsupported_fields(req, has_mask=mask is not None)
        p = to_generation_params(req, init_images=images, mask=mask, clip_skip=service.clip_skip)
        sampler_labels(p.sampler_name, p.scheduler)              # unknown names: 422 before queueing
        check_prompt_loras(loras, p.prompt)                       # unknown LoRAs too, before a model loads
        overrides = req.override_settings or {}
        entry = None
        if overrides.get("sd_model_checkpoint") not in (None, ""):
            entry = store.find(overrides["sd_model_checkpoint"], field="override_settings.sd_model_checkpoint")
        if req.refiner_checkpoint not in (None, "", "None"):
            p.refiner_checkpoint = str(store.find(req.refiner_checkpoint, field="refiner_checkpoint").path)
        validate_params(p, limits)
        return p, entry, unsupported

    async def generate(req: Txt2ImgRequest, label: str, images=None, mask=None) -> dict:
        p, entry, unsupported = await run_in_threadpool(prepare, req, images, mask)
        restore = req.override_settings_restore_afterwards is not False
        outcome = await run_job(label, lambda ctx: service.generate(ctx, p, model=entry, restore=restore,
                                                                    unsupported=unsupported))
        encoded = await run_in_threadpool(lambda: [encode_png(i) for i in outcome.images]) if req.send_images is not False else []
        params = req.model_dump()
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            params["init_images"], params["mask"] = None, None
        return {"images": encoded, "parameters": params, "info": json.dumps(outcome.info)}

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse, tags=["sdapi"])
    async def txt2img(req: Txt2ImgRequest):
        return await generate(req, "txt2img")

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse, tags=["sdapi"])
    async def img2img(req: Img2ImgRequest):
        if not req.init_images:
            raise RequestError("init_images: img2img needs at least one base64 image", field="init_images")
        if len(req.init_images) > limits.max_batch_size:
            raise RequestError(f"init_images: {len(req.init_images)} images is over the server limit "
                               f"max_batch_size={limits.max_batch_size}", field="init_images")

        def decode_all():
            imgs = [decode_image(s, f"init_images[{i}]", limits) for i, s in enumerate(req.init_images)]
            m = decode_image(req.mask, "mask", limits) if req.mask else None
            return imgs, m

        images, mask = await run_in_threadpool(decode_all)
        return await generate(req, "img2img", images, mask)

    # ---------------------------------------------------------------- progress and control
    @app.get("/sdapi/v1/progress", tags=["sdapi"])
    async def progress(skip_current_image: bool = Query(False)):
        return worker.snapshot(include_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip", tags=["sdapi"])
    async def skip():
        worker.skip()
        return {}

    # ---------------------------------------------------------------- listings
    @app.get("/sdapi/v1/samplers", tags=["sdapi"])
    async def samplers():
        return [{"name": i.label, "aliases": [sid],
                 "options": {"default_scheduler": i.default_schedule, "stochastic": str(i.stochastic),
                             "nfe_per_step": str(i.nfe_per_step)}}
                for sid, i in sampler_registry.INFO.items()]

    @app.get("/sdapi/v1/schedulers", tags=["sdapi"])
    async def schedulers():
        aliases: dict[str, list[str]] = {}
        for alias, target in {"sgmuniform": "sgm_uniform", "ays": "align_your_steps"}.items():
            aliases.setdefault(target, []).append(alias)
        return [{"name": sid, "label": label, "aliases": aliases.get(sid) or None,
                 "default_rho": _DEFAULT_RHO.get(sid), "need_inner_model": sid in _TABLE_SCHEDULES}
                for label, sid in sigma_schedules.DISPLAY_NAMES.items()]

    @app.get("/sdapi/v1/sd-models", tags=["sdapi"])
    async def sd_models():
        return await run_in_threadpool(lambda: [store.describe(e) for e in store.entries()])

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"])
    async def refresh_checkpoints():
        return {}                                  # the folder is rescanned on every listing

    @app.get("/sdapi/v1/loras", tags=["sdapi"])
    async def list_loras():
        """The LoRA folder's files as A1111 lists them: [{name, alias, path, metadata}] ([] without --lora-dir)."""
        return await run_in_threadpool(loras.describe) if loras else []

    @app.post("/sdapi/v1/refresh-loras", tags=["sdapi"])
    async def refresh_loras():
        """Re-scan the LoRA folder, so files added since the start (or the last refresh) are listed."""
        if loras:
            await run_in_threadpool(loras.refresh)
        return None

    @app.get("/sdapi/v1/sd-vae", tags=["sdapi"])
    async def sd_vae():
        return []                                  # VAEs come with their checkpoint; none are listed separately

    @app.get("/sdapi/v1/upscalers", tags=["sdapi"])
    async def upscalers():
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for n in ("Latent", "Lanczos")]

    @app.get("/sdapi/v1/latent-upscale-modes", tags=["sdapi"])
    async def latent_upscale_modes():
        return [{"name": "Latent"}]

    @app.get("/sdapi/v1/embeddings", tags=["sdapi"])
    async def embeddings():
        """A1111's listing: {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
        "skipped": {...}} for the loaded model (embeddings that do not fit its text encoders are skipped)."""
        return await run_in_threadpool(service.embeddings_listing)

    @app.post("/sdapi/v1/refresh-embeddings", tags=["sdapi"])
    async def refresh_embeddings():
        # on the worker: rescanning swaps the vectors of the pipeline a running job is using
        await run_job("refresh embeddings", lambda ctx: service.embeddings_listing(refresh=True))
        return None

    # ---------------------------------------------------------------- options
    def current_options() -> dict:
        sel = service.selected
        return {"sd_model_checkpoint": store.title(sel) if sel else None,
                "sd_checkpoint_hash": store.sha256(sel, compute=False) if sel else None,
                "CLIP_stop_at_last_layers": service.clip_skip, "samples_format": "png", "eta_noise_seed_delta": 0,
                "randn_source": "CPU", "sd_vae": "Automatic", "live_previews_enable": True,
                "show_progress_every_n_steps": 1, "sd_checkpoints_limit": 1}

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options():
        return await run_in_threadpool(current_options)

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(request: Request):
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})", field="body") from None
        if not isinstance(body, dict):
            raise RequestError("the options body must be a JSON object {\"option\": value}", field="body")
        if "CLIP_stop_at_last_layers" in body:
            v = body["CLIP_stop_at_last_layers"]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 12:
                raise RequestError(f"CLIP_stop_at_last_layers={v!r}: must be an integer from 1 to 12",
                                   field="CLIP_stop_at_last_layers")
        entry = None
        if body.get("sd_model_checkpoint") is not None:
            entry = await run_in_threadpool(store.find, body["sd_model_checkpoint"])
        if entry is not None:
            await run_job("load model", lambda ctx: service.select(ctx, entry))
        if "CLIP_stop_at_last_layers" in body:
            service.clip_skip = body["CLIP_stop_at_last_layers"]
        known = current_options()
        ignored = sorted(k for k, v in body.items() if k not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
                         and known.get(k, object()) != v)
        return {"unsupported_options": ignored} if ignored else None

    @app.get("/sdapi/v1/cmd-flags", tags=["sdapi"])
    async def cmd_flags():
        return flags

    @app.get("/sdapi/v1/memory", tags=["sdapi"])
    async def memory():
        return await run_in_threadpool(_memory)

    # ---------------------------------------------------------------- png-info
    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse, tags=["sdapi"])
    async def png_info(req: PngInfoRequest):
        from ...pipelines.infotext import parse_infotext, read_infotext

        def work():
            img = decode_image(req.image, "image", limits)
            text = read_infotext(img) or ""
            items = {k: v for k, v in img.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
            return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

        return await run_in_threadpool(work)

    # ---------------------------------------------------------------- diffusekit extras for the web UI
    @app.post("/diffusekit/v1/compare", tags=["diffusekit"])
    async def compare(req: CompareRequest):
        """An X/Y grid: the samplers across, `y_axis` (scheduler | steps | cfg_scale | seed) down."""
        await run_in_threadpool(check_prompt_loras, loras, req.prompt)
        cells, cols, rows = await run_in_threadpool(_compare_cells, req, limits)
        grid, info = await run_job("compare", lambda ctx: service.compare(ctx, cells, cols, rows, req.y_axis))
        return {"image": await run_in_threadpool(encode_png, grid), "info": info}

    @app.get("/diffusekit/v1/video", tags=["diffusekit"])
    async def video(format: str = Query("mp4", pattern="^(mp4|gif)$")):
        """The denoising video of the last image of the last job run with save_process=true."""
        src = service.last_video
        if src is None:
            raise RequestError("no denoising video yet: run txt2img/img2img with \"save_process\": true first",
                               status=404)
        data = await run_in_threadpool(_render_video, src, format)
        return Response(data, media_type="video/mp4" if format == "mp4" else "image/gif",
                        headers={"X-Seed": str(src.seed), "Cache-Control": "no-store"})

    @app.get("/diffusekit/v1/info", tags=["diffusekit"])
    async def info():
        """What the web UI needs besides the A1111 listings: the loaded model's native size, the limits."""
        pipe, sel = service.loaded, service.selected
        return {"version": __version__, "model": sel.name if sel else None,
                "family": pipe.family.name if pipe else None, "native_size": pipe.family.default_size if pipe else None,
                "limits": limits.as_dict(), "queue_size": worker.queue_size, "device": service.device}

    # ---------------------------------------------------------------- the web UI
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_auth:
        app.add_middleware(BasicAuth, allowed=allowed_users)
    return app


def _compare_cells(req: CompareRequest, limits: Limits):
    """The grid's GenerationParams (rows x cols), checked before anything is queued."""
    from ...pipelines.params import GenerationParams
    if not req.samplers:
        raise RequestError("samplers: give at least one sampler name", field="samplers")
    if not req.y_values:
        raise RequestError("y_values: give at least one value", field="y_values")
    if req.y_axis not in ("scheduler", "steps", "cfg_scale", "seed"):
        raise RequestError(f"y_axis={req.y_axis!r}: valid are scheduler, steps, cfg_scale, seed", field="y_axis")
    n = len(req.samplers) * len(req.y_values)
    if n > limits.max_images:
        raise RequestError(f"{len(req.samplers)} samplers x {len(req.y_values)} rows = {n} images is over the server "
                           f"limit max_images={limits.max_images}", field="samplers")
    cols = [str(s) for s in req.samplers]
    base = GenerationParams(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
                            cfg_scale=req.cfg_scale, width=req.width, height=req.height, scheduler=req.scheduler)
    cells, rows = [], []
    for v in req.y_values:
        row = []
        for s in req.samplers:
            try:
                change = {"scheduler": str(v)} if req.y_axis == "scheduler" else \
                         {req.y_axis: (float(v) if req.y_axis == "cfg_scale" else int(v))}
            except (TypeError, ValueError):
                raise RequestError(f"y_values: {v!r} is not a valid {req.y_axis}", field="y_values") from None
            p = base.copy(sampler_name=str(s), **change)
            sampler_labels(p.sampler_name, p.scheduler, sampler_field="samplers",
                           scheduler_field="y_values" if req.y_axis == "scheduler" else "scheduler")
            validate_params(p, limits)
            row.append(p)
        cells.append(row)
        rows.append(str(v))
    return cells, cols, rows


def _render_video(src, fmt: str) -> bytes:
    """Side-by-side step previews (noisy latent x_t | x0 estimate), encoded once per format and cached."""
    if fmt in src.rendered:
        return src.rendered[fmt]
    from ...media.video import label_frames, side_by_side, write_gif, write_mp4
    frames = side_by_side([label_frames(src.x_frames, src.sigmas), label_frames(src.denoised_frames, src.sigmas)],
                          ["x_t (noisy latent)", "x0 estimate"])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"denoise.{fmt}"
        (write_mp4 if fmt == "mp4" else write_gif)(frames, path, fps=4.0)
        src.rendered[fmt] = path.read_bytes()
    return src.rendered[fmt]


def _memory() -> dict:
    """A1111's /memory shape: system RAM, this process's peak RSS, CUDA memory when there is a GPU."""
    import resource

    import torch
    ram: dict[str, Any] = {}
    try:
        page, total, free = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        ram = {"total": page * total, "free": page * free, "used": page * (total - free)}
    except (ValueError, OSError, AttributeError):
        pass
    ram["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free_b, "used": total_b - free_b, "total": total_b},
                "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
    else:
        cuda = {"error": "CUDA is not available"}
    return {"ram": ram, "cuda": cuda}

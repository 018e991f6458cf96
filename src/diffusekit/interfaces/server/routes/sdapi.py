"""AUTOMATIC1111's /sdapi/v1 API: txt2img, img2img, progress and control, the listings, options, png-info."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ....core import samplers as sampler_registry
from ....core import sigmas as sigma_schedules
from ..images import decode_image, encode_png
from ..loras import check_prompt_loras
from ..schemas import (GenerationResponse, Img2ImgRequest, OptionsRequest, OptionsResponse, PngInfoRequest,
                       PngInfoResponse, RequestError, Txt2ImgRequest, to_generation_params, unsupported_fields,
                       validate_params)
from ..service import sampler_labels
from ..state import ServerState


def router(state: ServerState) -> APIRouter:
    """The A1111 routes, working on `state` (its service, worker and limits)."""
    router = APIRouter(tags=["sdapi"])
    service, worker, limits, store, loras, flags = (state.service, state.worker, state.limits, state.store,
                                                    state.loras, state.flags)
    run_job = state.run_job

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

    @router.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    async def txt2img(req: Txt2ImgRequest):
        return await generate(req, "txt2img")

    @router.post("/sdapi/v1/img2img", response_model=GenerationResponse)
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
    @router.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = Query(False)):
        return worker.snapshot(include_image=not skip_current_image)

    @router.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @router.post("/sdapi/v1/skip")
    async def skip():
        worker.skip()
        return {}

    # ---------------------------------------------------------------- listings
    @router.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": i.label, "aliases": [sid],
                 "options": {"default_scheduler": i.default_schedule, "stochastic": str(i.stochastic),
                             "nfe_per_step": str(i.nfe_per_step)}}
                for sid, i in sampler_registry.INFO.items()]

    @router.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": sid, "label": label, "aliases": sigma_schedules.aliases(sid) or None,
                 "default_rho": sigma_schedules.default_options(sid).get("rho"),
                 "need_inner_model": sigma_schedules.needs_table(sid)}
                for label, sid in sigma_schedules.DISPLAY_NAMES.items()]

    @router.get("/sdapi/v1/sd-models")
    async def sd_models():
        return await run_in_threadpool(lambda: [store.describe(e) for e in store.entries()])

    @router.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return {}                                  # the folder is rescanned on every listing

    @router.get("/sdapi/v1/loras")
    async def list_loras():
        """The LoRA folder's files as A1111 lists them: [{name, alias, path, metadata}] ([] without --lora-dir)."""
        return await run_in_threadpool(loras.describe) if loras else []

    @router.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        """Re-scan the LoRA folder, so files added since the start (or the last refresh) are listed."""
        if loras:
            await run_in_threadpool(loras.refresh)
        return None

    @router.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return []                                  # VAEs come with their checkpoint; none are listed separately

    @router.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for n in ("Latent", "Lanczos")]

    @router.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": "Latent"}]

    @router.get("/sdapi/v1/embeddings")
    async def embeddings():
        """A1111's listing: {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}},
        "skipped": {...}} for the loaded model (embeddings that do not fit its text encoders are skipped)."""
        return await run_in_threadpool(service.embeddings_listing)

    @router.post("/sdapi/v1/refresh-embeddings")
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

    @router.get("/sdapi/v1/options")
    async def get_options():
        return await run_in_threadpool(current_options)

    @router.post("/sdapi/v1/options", response_model=Optional[OptionsResponse])
    async def set_options(req: OptionsRequest):
        """Change settings: sd_model_checkpoint loads that model now (its errors answer this request),
        CLIP_stop_at_last_layers sets Clip skip. Answers null, or the settings it did not apply."""
        body = {**req.model_dump(exclude_unset=True), **(req.model_extra or {})}
        entry = None
        if body.get("sd_model_checkpoint") is not None:
            entry = await run_in_threadpool(store.find, body["sd_model_checkpoint"])
        if entry is not None:
            await run_job("load model", lambda ctx: service.select(ctx, entry))
        if body.get("CLIP_stop_at_last_layers") is not None:
            service.clip_skip = body["CLIP_stop_at_last_layers"]
        known = current_options()
        ignored = sorted(k for k, v in body.items() if k not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
                         and known.get(k, object()) != v)
        return {"unsupported_options": ignored} if ignored else None

    @router.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return flags

    @router.get("/sdapi/v1/memory")
    async def memory():
        return await run_in_threadpool(memory_use)

    # ---------------------------------------------------------------- png-info
    @router.post("/sdapi/v1/png-info", response_model=PngInfoResponse)
    async def png_info(req: PngInfoRequest):
        from ....pipelines.infotext import parse_infotext, read_infotext

        def work():                                # off the event loop: decoding and parsing untrusted data
            img = decode_image(req.image, "image", limits)
            text = read_infotext(img) or ""
            if len(text) > limits.max_infotext_chars:
                raise RequestError(f"image: its infotext has {len(text)} characters, over the server limit "
                                   f"max_infotext_chars={limits.max_infotext_chars}", field="image")
            items = {k: v for k, v in img.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
            return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

        return await run_in_threadpool(work)

    return router


def memory_use() -> dict:
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


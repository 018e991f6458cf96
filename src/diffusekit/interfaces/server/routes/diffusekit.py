"""diffusekit's own /diffusekit/v1 endpoints for the web UI: the sampler comparison grid, the denoising video
of the last job, and the facts the page needs besides the A1111 listings."""
from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ....version import __version__
from ....media import compare as comparison
from ....pipelines.params import GenerationParams
from ..images import encode_png
from ..loras import check_prompt_loras
from ..schemas import CompareRequest, Limits, RequestError, validate_params
from ..service import sampler_labels
from ..state import ServerState

# the request's y_axis (a GenerationParams field) -> (media.compare.grid axis, how a value is read)
Y_AXES = {"scheduler": ("schedulers", str), "steps": ("steps", int), "cfg_scale": ("cfg", float),
          "seed": ("seeds", int)}


def router(state: ServerState) -> APIRouter:
    """The /diffusekit/v1 routes, working on `state`."""
    router = APIRouter(tags=["diffusekit"])
    service, worker, limits, loras = state.service, state.worker, state.limits, state.loras

    @router.post("/diffusekit/v1/compare")
    async def compare(req: CompareRequest):
        """An X/Y grid: the samplers across, `y_axis` (scheduler | steps | cfg_scale | seed) down."""
        await run_in_threadpool(check_prompt_loras, loras, req.prompt)
        planned = await run_in_threadpool(compare_plan, req, limits)
        grid, info = await state.run_job("compare", lambda ctx: service.compare(ctx, planned))
        info |= {"samplers": [str(s) for s in req.samplers], "rows": [str(v) for v in req.y_values],
                 "y_axis": req.y_axis}
        return {"image": await run_in_threadpool(encode_png, grid), "info": info}

    @router.get("/diffusekit/v1/video")
    async def video(format: str = Query("mp4", pattern="^(mp4|gif)$")):
        """The denoising video of the last image of the last job run with save_process=true."""
        src = service.last_video
        if src is None:
            raise RequestError("no denoising video yet: run txt2img/img2img with \"save_process\": true first",
                               status=404)
        data = await run_in_threadpool(render_video, src, format)
        return Response(data, media_type="video/mp4" if format == "mp4" else "image/gif",
                        headers={"X-Seed": str(src.seed), "Cache-Control": "no-store"})

    @router.get("/diffusekit/v1/info")
    async def info():
        """What the web UI needs besides the A1111 listings: the loaded model's native size, the limits."""
        pipe, sel = service.loaded, service.selected
        return {"version": __version__, "model": sel.name if sel else None,
                "family": pipe.family.name if pipe else None, "native_size": pipe.family.default_size if pipe else None,
                "limits": limits.as_dict(), "queue_size": worker.queue_size, "device": service.device}

    return router


def compare_plan(req: CompareRequest, limits: Limits) -> comparison.Plan:
    """The grid's cells (`media.compare.grid`: samplers across, y_axis down), checked before anything is queued."""
    if not req.samplers:
        raise RequestError("samplers: give at least one sampler name", field="samplers")
    if not req.y_values:
        raise RequestError("y_values: give at least one value", field="y_values")
    if req.y_axis not in Y_AXES:
        raise RequestError(f"y_axis={req.y_axis!r}: valid are {', '.join(Y_AXES)}", field="y_axis")
    n = len(req.samplers) * len(req.y_values)
    if n > limits.max_images:
        raise RequestError(f"{len(req.samplers)} samplers x {len(req.y_values)} rows = {n} images is over the server "
                           f"limit max_images={limits.max_images}", field="samplers")
    axis, read = Y_AXES[req.y_axis]
    values = []
    for v in req.y_values:
        try:
            values.append(read(v))
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"y_values: {v!r} is not a valid {req.y_axis}", field="y_values") from None
    base = GenerationParams(prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
                            cfg_scale=req.cfg_scale, width=req.width, height=req.height, scheduler=req.scheduler)
    for v in values:
        row = base.copy(**{req.y_axis: v})
        for s in req.samplers:
            sampler_labels(str(s), row.scheduler, sampler_field="samplers",
                           scheduler_field="y_values" if req.y_axis == "scheduler" else "scheduler")
        validate_params(row, limits)             # the server's limits (named), before the plan's own checks
    try:
        return comparison.grid(base, ("samplers", [str(s) for s in req.samplers]), (axis, values))
    except ValueError as e:
        raise RequestError(str(e)) from None


def render_video(src, fmt: str) -> bytes:
    """Side-by-side step previews (noisy latent x_t | x0 estimate), encoded once per format and cached."""
    if fmt in src.rendered:
        return src.rendered[fmt]
    from ....media.video import label_frames, side_by_side, write_gif, write_mp4
    frames = side_by_side([label_frames(src.x_frames, src.sigmas), label_frames(src.denoised_frames, src.sigmas)],
                          ["x_t (noisy latent)", "x0 estimate"])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"denoise.{fmt}"
        (write_mp4 if fmt == "mp4" else write_gif)(frames, path, fps=4.0)
        src.rendered[fmt] = path.read_bytes()
    return src.rendered[fmt]

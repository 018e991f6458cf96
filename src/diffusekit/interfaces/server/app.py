"""The HTTP layer: AUTOMATIC1111's /sdapi/v1 API, diffusekit's own /diffusekit/v1 endpoints and the web UI.

Thin: parse and check a request, hand the work to the worker thread (`jobs.Worker`), format the answer.
Every refusal is a 4xx whose message names the field or the server limit; what fails inside the server (a
broken model file, a bug) is a 500 (`errors.py`), and a job that fails never takes the server down.
`create_app` builds the shared `ServerState` and includes one router per API (`routes/`), each of which
receives that state.
"""
from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ...version import __version__
from .checkpoints import ModelStore
from . import errors
from .docs import add_offline_docs
from .jobs import ClientWatch, Worker
from .loras import LoraCatalog
from .middleware import BasicAuth, BodyLimit, parse_api_auth
from ...graph import Environment
from .comfy import ComfyQueue
from .routes import comfy as comfy_routes
from .routes import diffusekit as diffusekit_routes
from .routes import sdapi as sdapi_routes
from .routes import webui as webui_routes
from .schemas import ERROR_RESPONSES, Limits
from .service import Service
from .state import ServerState

log = logging.getLogger("diffusekit.server")


def create_app(*, model: str | None = "shapes", models_dir: str | os.PathLike | None = None,
               api_auth: str | None = None, queue_size: int = 8, device: str | None = None,
               limits: Limits | None = None, preload: bool = True, lora_dir: str | os.PathLike | None = None,
               embeddings_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike = "output",
               input_dir: str | os.PathLike = "input", **limit_overrides) -> FastAPI:
    """Build the FastAPI app. `model`: a name in the models folder, a shipped name or a path (None = none
    selected yet); `lora_dir`: the folder `<lora:NAME:WEIGHT>` prompt tags read (GET /sdapi/v1/loras lists it);
    `embeddings_dir`: textual-inversion files whose names prompts may use (GET /sdapi/v1/embeddings lists them);
    `output_dir` / `input_dir`: ComfyUI's output folder (SaveImage) and input folder (uploads, LoadImage);
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

    app = FastAPI(title="diffusekit", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  docs_url=None, redoc_url=None,
                  description="AUTOMATIC1111-compatible /sdapi/v1 API and diffusekit's own /diffusekit/v1 endpoints.")
    add_offline_docs(app)                    # /docs and /redoc from files this server serves (no CDN)
    app.state.service, app.state.worker, app.state.limits, app.state.flags = service, worker, limits, flags

    errors.install(app)                       # one error shape; no error drops the connection

    state = ServerState(service=service, worker=worker, limits=limits, store=store, loras=loras, flags=flags)
    app.state.server = state
    app.include_router(sdapi_routes.router(state))
    app.include_router(diffusekit_routes.router(state))
    app.include_router(webui_routes.router())
    comfy = ComfyQueue(worker, _comfy_environment(state, output_dir, input_dir, embeddings_dir), service)
    app.state.comfy = comfy
    for prefix in ("", "/api"):                      # ComfyUI serves every route under /api too
        app.include_router(comfy_routes.router(state, comfy, prefix))

    app.add_middleware(ClientWatch)           # lets a job see its client leave (jobs.wait_for_job)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_auth:
        app.add_middleware(BasicAuth, allowed=allowed_users)
    return app


def _comfy_environment(state: ServerState, output_dir, input_dir, embeddings_dir) -> Environment:
    """The ComfyUI routes' folders, listing the server's checkpoints and loading them through its service
    (one model in memory for both APIs; the worker thread is the only one that loads)."""
    import tempfile
    store, service = state.store, state.service

    def load(path: Path):
        entry = next(e for e in store.entries() if e.path == path)
        return service.pipeline(entry)

    temp = Path(tempfile.gettempdir()) / f"diffusekit-temp-{os.getpid()}"     # PreviewImage; made when first used
    return Environment(models_dir=store.models_dir, lora_dir=state.loras.folder if state.loras else None,
                       embeddings_dir=embeddings_dir, output_dir=Path(output_dir), input_dir=Path(input_dir),
                       temp_dir=Path(temp), device=service.device, limits=state.limits,
                       checkpoints=lambda: {e.name: e.path for e in store.entries()}, loader=load)

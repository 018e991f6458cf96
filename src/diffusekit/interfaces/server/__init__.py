"""`diffusekit serve`: an AUTOMATIC1111-compatible HTTP API (/sdapi/v1, docs at /docs) and a web UI at /.

    from diffusekit.interfaces.server import serve
    serve(port=7860, model="shapes", models_dir="models", lora_dir="models/Lora", api_auth="me:secret", queue_size=8)

Needs the `serve` extra (fastapi, uvicorn); imported lazily so the rest of diffusekit does not.
"""
from __future__ import annotations

import logging
import os

from .schemas import Limits

__all__ = ["Limits", "create_app", "serve"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(**kwargs):
    """The FastAPI app (see `app.create_app` for the arguments)."""
    from .app import create_app as _create
    return _create(**kwargs)


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = "shapes",
          models_dir: str | os.PathLike | None = None, api_auth: str | None = None, queue_size: int = 8,
          device: str | None = None, log_level: str = "info", lora_dir: str | os.PathLike | None = None,
          embeddings_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike = "output",
          input_dir: str | os.PathLike = "input", **limits) -> None:
    """Run the server until interrupted.

    host: 127.0.0.1 by default (this machine only); "0.0.0.0" listens on every interface (then use api_auth).
    model: the checkpoint to load first: a name in `models_dir`, a shipped name ("shapes") or a path.
    models_dir: the folder whose checkpoints clients may switch between (POST /sdapi/v1/options).
    lora_dir: the folder of LoRA .safetensors files that `<lora:NAME:WEIGHT>` prompt tags name (A1111's
        --lora-dir); GET /sdapi/v1/loras lists it, POST /sdapi/v1/refresh-loras re-scans it.
    embeddings_dir: textual-inversion embeddings (A1111's --embeddings-dir); GET /sdapi/v1/embeddings.
    output_dir / input_dir: ComfyUI's folders (SaveImage writes to output, uploads and LoadImage use input).
    api_auth: "user:password[,user2:password2]" HTTP basic auth on every route (A1111's --api-auth).
    queue_size: how many jobs may wait behind the running one (0: none); more answer 503 with Retry-After.
    limits: any field of `Limits` (max_pixels, max_steps, max_batch_size, max_images, max_body_bytes, ...).
    """
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError("serving needs the 'serve' extra: pip install 'diffusekit[serve]'") from e
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO))
    if host not in LOCAL_HOSTS and not api_auth:
        logging.getLogger("diffusekit.server").warning(
            "listening on %s without api_auth: anyone who can reach this port can use the server", host)
    app = create_app(model=model, models_dir=models_dir, api_auth=api_auth, queue_size=queue_size, device=device,
                     lora_dir=lora_dir, embeddings_dir=embeddings_dir, output_dir=output_dir, input_dir=input_dir,
                     **limits)
    app.state.flags.update(host=host, port=port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

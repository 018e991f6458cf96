"""ComfyUI's HTTP and websocket API beside /sdapi/v1: POST /prompt, GET/POST /queue, POST /interrupt,
GET/POST /history, GET /view, POST /upload/image, GET /object_info[/{node}], GET /system_stats,
GET /embeddings, GET /models[/{folder}], GET /ws?clientId= (every route also under /api, as ComfyUI serves).

Refusals use ComfyUI's shapes: POST /prompt answers 400 {"error": {"type", "message", "details",
"extra_info"}, "node_errors": {...}} (`graph.validate`); the other routes 400 / 403 / 404 with
{"error": {...}} naming the bad value. A file name is looked up inside its folder: `..`, absolute paths
and links out are refused.
"""
from __future__ import annotations

import io
import os
import platform
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ....graph import PathRefused, object_info, validate_prompt
from ....graph.environment import inside
from ....version import __version__
from ..comfy import ComfyQueue
from ..jobs import QueueFull, ShuttingDown
from ..state import ServerState

UPLOAD_TYPES = ("input", "temp", "output")


class ComfyErrorInfo(BaseModel):
    type: str = Field(description="ComfyUI's error type, e.g. prompt_outputs_failed_validation, invalid_json")
    message: str
    details: str = ""
    extra_info: dict[str, Any] = Field(default_factory=dict)


class ComfyErrorBody(BaseModel):
    """ComfyUI's error answer: one error, and per node the inputs that failed validation."""
    error: ComfyErrorInfo
    node_errors: dict[str, Any] = Field(default_factory=dict)


# ComfyUI's routes answer their own refusals in ComfyUI's shape; auth (401), the body limit (422) and server
# failures (500) keep the server-wide shape documented on the app.
COMFY_RESPONSES = {400: {"model": ComfyErrorBody, "description": "bad input: invalid JSON, a graph that fails "
                         "validation (node_errors names node, input and valid choices), a refused path"},
                   404: {"model": ComfyErrorBody, "description": "no such file, prompt or model folder"},
                   503: {"model": ComfyErrorBody, "description": "the queue is full (see Retry-After)"}}


def comfy_error(status: int, type_: str, message: str, details: str = "", **extra) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, "details": details, "extra_info": extra},
                         "node_errors": {}}, status_code=status)


async def _json_body(request: Request):
    """The body as JSON, or a 400 JSONResponse saying why not."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError) as e:
        return comfy_error(400, "invalid_json", "The request body is not valid JSON", str(e))


async def _json_object(request: Request):
    """A body that must be {"clear": true} and/or {"delete": [ids]} (POST /queue, POST /history)."""
    body = await _json_body(request)
    if isinstance(body, JSONResponse):
        return body
    if not isinstance(body, dict) or not isinstance(body.get("delete", []), list):
        return comfy_error(400, "invalid_request",
                           "the body must be {\"clear\": true} and/or {\"delete\": [prompt ids]}", repr(body)[:200])
    return body


def router(state: ServerState, queue: ComfyQueue, prefix: str = "") -> APIRouter:
    """ComfyUI's routes under `prefix` ("" and "/api")."""
    r = APIRouter(prefix=prefix, tags=["comfyui"], responses=COMFY_RESPONSES)
    env = queue.env

    @r.post("/prompt")
    async def post_prompt(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if not isinstance(body, dict) or "prompt" not in body:
            return comfy_error(400, "no_prompt", "No prompt provided", "the body must be {\"prompt\": {...}}")
        prompt = body["prompt"]
        extra = body.get("extra_data") or {}
        if not isinstance(extra, dict):
            return comfy_error(400, "invalid_prompt", "extra_data must be an object", repr(extra)[:200])
        extra = dict(extra)
        if "client_id" in body:
            extra["client_id"] = str(body["client_id"])
        number = body.get("number")
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
            return comfy_error(400, "invalid_prompt", "number must be a number", repr(number)[:200])
        checked = await run_in_threadpool(validate_prompt, prompt, env, limits=state.limits)
        if not checked.ok:
            return JSONResponse({"error": checked.error, "node_errors": checked.node_errors}, status_code=400)
        try:
            prompt_id, number = queue.submit(prompt, checked.outputs, extra, number=number,
                                             front=bool(body.get("front")))
        except QueueFull as e:
            return JSONResponse({"error": {"type": "queue_full", "message": str(e), "details": "",
                                           "extra_info": {"queue_size": e.capacity}}, "node_errors": {}},
                                status_code=503, headers={"Retry-After": str(e.retry_after)})
        except ShuttingDown as e:
            return comfy_error(503, "shutting_down", str(e))
        return {"prompt_id": prompt_id, "number": number, "node_errors": checked.node_errors}

    @r.get("/prompt")
    async def get_prompt():
        return queue.queue_info()

    @r.get("/queue")
    async def get_queue():
        return queue.current_queue()

    @r.post("/queue", response_class=Response, responses={200: {"description": "done (an empty body, as ComfyUI answers)"}})
    async def post_queue(request: Request):
        body = await _json_object(request)
        if isinstance(body, JSONResponse):
            return body
        if body.get("clear"):
            queue.clear()
        if body.get("delete"):
            queue.delete([str(x) for x in body["delete"]])
        return Response(status_code=200)

    @r.post("/interrupt", response_class=Response, responses={200: {"description": "done (an empty body, as ComfyUI answers)"}})
    async def post_interrupt(request: Request):
        body = await request.body()
        pid = None
        if body.strip():
            data = await _json_body(request)
            if isinstance(data, dict) and data.get("prompt_id"):
                pid = str(data["prompt_id"])
        queue.interrupt(pid)
        return Response(status_code=200)

    @r.get("/history")
    async def get_history(max_items: int | None = None, offset: int = -1):
        if max_items is not None and max_items < 0:
            return comfy_error(400, "invalid_request", "max_items must be >= 0", str(max_items))
        return queue.get_history(max_items=max_items, offset=offset)

    @r.get("/history/{prompt_id}")
    async def get_history_item(prompt_id: str):
        return queue.get_history(prompt_id)

    @r.post("/history", response_class=Response, responses={200: {"description": "done (an empty body, as ComfyUI answers)"}})
    async def post_history(request: Request):
        body = await _json_object(request)
        if isinstance(body, JSONResponse):
            return body
        queue.edit_history(bool(body.get("clear")), body.get("delete") or [])
        return Response(status_code=200)

    @r.get("/view")
    async def view(filename: str, type: str = "output", subfolder: str = "", preview: str | None = None,
                   channel: str | None = None):
        def find():
            if "/" in filename.replace("\\", "/") or filename in ("", ".", ".."):
                raise PathRefused(f"filename={filename!r}: give the file name only (its folder goes in subfolder)")
            return inside(env.folder(type), f"{subfolder}/{filename}" if subfolder else filename)
        try:
            path = await run_in_threadpool(find)
        except PathRefused as e:
            return comfy_error(400, "invalid_path", str(e))
        if not path.is_file():
            return comfy_error(404, "not_found", f"no file {filename!r} in {type}/{subfolder}")
        headers = {"Content-Disposition": f'filename="{path.name}"'}
        if preview or channel in ("rgb", "a"):
            data, media = await run_in_threadpool(_converted, path, preview, channel)
            return Response(data, media_type=media, headers=headers)
        return FileResponse(path, headers=headers)

    @r.post("/upload/image")
    async def upload_image(request: Request):
        try:
            form = await request.form()
        except Exception as e:                   # not multipart, or broken
            return comfy_error(400, "invalid_upload", "expected a multipart form with an `image` file", str(e))
        image = form.get("image")
        if image is None or not hasattr(image, "read") or not getattr(image, "filename", None):
            return comfy_error(400, "invalid_upload", "the form has no `image` file field")
        kind = str(form.get("type") or "input")
        subfolder = str(form.get("subfolder") or "")
        overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
        data = await image.read()
        try:
            saved = await run_in_threadpool(_store_upload, env, data, image.filename, kind, subfolder, overwrite)
        except PathRefused as e:
            return comfy_error(400, "invalid_path", str(e))
        except ValueError as e:
            return comfy_error(400, "invalid_image", str(e))
        return saved

    @r.get("/object_info")
    async def get_object_info():
        return await run_in_threadpool(object_info, env)

    @r.get("/object_info/{node_class}")
    async def get_object_info_node(node_class: str):
        return await run_in_threadpool(object_info, env, node_class)

    @r.get("/system_stats")
    async def system_stats():
        return await run_in_threadpool(_system_stats, state)

    @r.get("/embeddings")
    async def embeddings():
        return await run_in_threadpool(env.embedding_names)

    @r.get("/models")
    async def model_types():
        return list(env.model_folders())

    @r.get("/models/{folder}")
    async def models(folder: str):
        folders = env.model_folders()
        if folder not in folders:
            return comfy_error(404, "not_found", f"no model folder {folder!r}; valid: {', '.join(folders)}")
        return await run_in_threadpool(folders[folder])

    @r.websocket("/ws")
    async def websocket(ws: WebSocket):
        import asyncio
        import uuid
        await ws.accept()
        queue.sockets.loop = asyncio.get_running_loop()
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        queue.sockets.add(sid, ws)
        try:
            await ws.send_json({"type": "status", "data": {"status": queue.queue_info(), "sid": sid}})
            now = queue.executing
            if now is not None and now[2] == sid:   # a client back during its own prompt learns the node
                await ws.send_json({"type": "executing", "data": {"node": now[1], "prompt_id": now[0]}})
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass                               # ComfyUI ignores what clients send (text or binary)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            queue.sockets.remove(sid, ws)

    return r


def _converted(path: Path, preview: str | None, channel: str | None) -> tuple[bytes, str]:
    """/view?preview=webp;90 or jpeg;q, /view?channel=rgb|a, as ComfyUI converts them."""
    with Image.open(path) as img:
        img.load()
        buf = io.BytesIO()
        if preview:
            fmt, _, q = preview.partition(";")
            fmt = fmt if fmt in ("webp", "jpeg") and channel != "a" else "webp"
            out = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            out.save(buf, format=fmt.upper(), quality=int(q) if q.isdigit() else 90)
            return buf.getvalue(), f"image/{fmt}"
        if channel == "rgb":
            img.convert("RGB").save(buf, format="PNG")
        else:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
            out.save(buf, format="PNG")
        return buf.getvalue(), "image/png"


def _store_upload(env, data: bytes, filename: str, kind: str, subfolder: str, overwrite: bool) -> dict:
    """ComfyUI's image_upload: into input (or temp/output)/subfolder, "name (1).png" when taken by other
    content; the same content again is not stored twice. Only readable images are accepted."""
    if kind not in UPLOAD_TYPES:
        raise PathRefused(f"type={kind!r}: valid types are {', '.join(UPLOAD_TYPES)}")
    name = os.path.basename(filename.replace("\\", "/"))
    if not name or name in (".", "..") or name != filename.replace("\\", "/").split("/")[-1]:
        raise PathRefused(f"filename={filename!r} is not a plain file name")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > 8192 * 8192:
                raise ValueError(f"{filename}: {w}x{h} is over 8192x8192 pixels")
            img.verify()
    except UnidentifiedImageError:
        raise ValueError(f"{filename}: not an image in a format Pillow reads (PNG, JPEG, WebP, ...)") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{filename}: not a readable image ({type(e).__name__}: {e})") from None
    folder = env.folder(kind)
    folder.mkdir(parents=True, exist_ok=True)
    target_dir = inside(folder, subfolder) if subfolder else folder.resolve()
    target_dir.mkdir(parents=True, exist_ok=True)
    path = inside(target_dir, name)
    stem, dot, ext = name.rpartition(".")
    stem, ext = (stem, dot + ext) if dot else (name, "")
    i = 1
    while path.exists() and not overwrite:
        if path.read_bytes() == data:
            return {"name": path.name, "subfolder": subfolder, "type": kind}
        path = inside(target_dir, f"{stem} ({i}){ext}")
        i += 1
    path.write_bytes(data)
    return {"name": path.name, "subfolder": subfolder, "type": kind}


def _system_stats(state: ServerState) -> dict:
    import torch
    device = torch.device(state.service.device)
    ram_total = ram_free = 0
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        ram_total, ram_free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        vram = {"vram_total": total, "vram_free": free, "torch_vram_total": torch.cuda.memory_reserved(device),
                "torch_vram_free": torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)}
        name = torch.cuda.get_device_name(device)
    else:
        vram = {"vram_total": ram_total, "vram_free": ram_free, "torch_vram_total": 0, "torch_vram_free": 0}
        name = str(device)
    return {"system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": f"diffusekit {__version__}", "python_version": sys.version,
                       "pytorch_version": torch.__version__, "embedded_python": False, "argv": sys.argv,
                       "platform": platform.platform()},
            "devices": [{"name": name, "type": device.type, "index": device.index, **vram}]}

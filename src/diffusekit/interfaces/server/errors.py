"""Every error answer has one shape (`schemas.ErrorResponse`), and each sits on the right side.

- 4xx: the request is wrong (`RequestError`, schema failures, a body that is not JSON). A full queue or a
  shutdown is a 503 with Retry-After.
- 500 (`ServerError`): the server failed: a broken model, LoRA or embedding file, non-finite output of a
  broken model, a bug. 503 (`ModelUnavailable`) while the selected model cannot be loaded.
- Messages name the request field or server limit; server folders are written as their option names
  (`<models_dir>/x.safetensors`), never as paths on the server.
- No error closes the connection: uvicorn closes a kept-alive connection after any exception that leaves
  the app, even when a 500 was already sent, so `CatchAll` turns the unexpected ones into answers here.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .jobs import ClientGone, QueueFull, ShuttingDown, Worker, wait_for_job
from .middleware import REASONS, error_response, safe_text
from .schemas import RequestError

log = logging.getLogger("diffusekit.server")


class ServerError(Exception):
    """The server's fault, not the request's: answered with `status` (500) and the message."""

    status = 500


class ModelUnavailable(ServerError):
    """The selected model cannot be loaded (a broken or missing file): 503 until another is selected."""

    status = 503


def redact(message: str, folders: dict[str, str | os.PathLike | None]) -> str:
    """Write the server's folders as their option names: "/srv/models/x" -> "<models_dir>/x"."""
    for name, folder in sorted(folders.items(), key=lambda kv: -len(str(kv[1] or ""))):
        if folder:
            for form in {str(folder), str(Path(folder).resolve())}:
                message = message.replace(form, f"<{name}>")
    return message


def server_failure(exc: BaseException, folders: dict | None = None) -> ServerError:
    """A job's unexpected exception as a 500 whose message says whose fault it is and what failed."""
    if isinstance(exc, ServerError):
        return exc
    return ServerError(redact(f"the job failed inside the server (not because of the request): "
                              f"{type(exc).__name__}: {exc}", folders or {}))


_PASS = (RequestError, ServerError, ClientGone, QueueFull, ShuttingDown)


async def run_job(worker: Worker, label: str, fn, folders: dict | None = None):
    """Queue `fn(ctx)` on the worker and await it (`jobs.wait_for_job`: a client that leaves drops its job).
    A request's own errors (RequestError: raised before or inside the job) stay 4xx; anything else the
    job raises is the server's fault: a 500 `ServerError`, with the server's folders redacted."""
    try:
        return await wait_for_job(worker, worker.submit(label, fn))
    except _PASS:
        raise
    except Exception as e:
        raise server_failure(e, folders) from e


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a 500 in the one error shape, answered here,
    so that uvicorn keeps the connection (it drops it after an exception reaches it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # the last line of defence: a bug must not take the connection down
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await error_response(500, f"{type(exc).__name__}: {exc}")(scope, receive, send)


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers at this path (asked of each route with each method: routers included
    in the app are matched only as a whole)."""
    return [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in request.app.router.routes)]


def install(app: FastAPI) -> None:
    """The exception handlers and the CatchAll middleware, on `app`."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        items, lines = [], []
        for e in exc.errors():
            loc = [x if isinstance(x, int) else safe_text(x, 200) for x in e.get("loc", ())]
            names = [str(x) for x in loc]
            where = ".".join(names[1:] if names[:1] == ["body"] and len(names) > 1 else names) or "body"
            if e.get("type") == "json_invalid":
                where = "body"
                msg = f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
            else:
                msg = safe_text(e.get("msg", "invalid"), 1000)
            items.append({"loc": loc, "msg": msg, "type": e.get("type")})
            lines.append(f"{where}: {msg}")
        return JSONResponse({"detail": items, "error": REASONS[422], "errors": safe_text("; ".join(lines), 2000)},
                            status_code=422)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return error_response(exc.status, str(exc), exc.field)

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: QueueFull):
        return error_response(503, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def on_shutdown(request: Request, exc: ShuttingDown):
        return error_response(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone):
        return error_response(499, "the client disconnected; its job was dropped")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        message = exc.detail if isinstance(exc.detail, str) else REASONS.get(exc.status_code, "Error")
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
            message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the request body could not be parsed as JSON (malformed, or nested too deeply)"
        return error_response(exc.status_code, message, headers=headers or None)

    app.add_middleware(CatchAll)

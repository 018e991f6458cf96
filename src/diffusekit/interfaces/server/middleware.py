"""HTTP plumbing shared by every router: the body-size limit, A1111's --api-auth basic auth, and the JSON
error body ({"detail", "error", "field"}) that every refusal uses."""
from __future__ import annotations

import base64
import binascii
import secrets

from fastapi.responses import JSONResponse


class BodyLimit:
    """Refuse request bodies over `max_bytes` (422 naming max_body_bytes), by Content-Length or as they
    stream: the body is read here (it would be read whole anyway) and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # refused before the body is read: the connection cannot carry another request, so say so
        too_big = error_response(422, f"the request body is over the server limit max_body_bytes={self.max_bytes}",
                                 field="max_body_bytes", headers={"Connection": "close"})
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and int(declared) > self.max_bytes:
                return await too_big(scope, receive, send)
        except ValueError:
            return await error_response(400, "Content-Length is not a number",
                                        headers={"Connection": "close"})(scope, receive, send)
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
    """A1111's --api-auth: HTTP basic auth on every route (API, docs, web UI and websockets alike; a
    websocket without the credentials is closed before it opens: HTTP 403)."""

    def __init__(self, app, allowed: list[bytes]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        ok = False
        if header[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(header[6:].strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
            ok = any(secrets.compare_digest(given, a) for a in self.allowed)
        if not ok and scope["type"] == "websocket":
            await receive()                                 # the websocket.connect event
            return await send({"type": "websocket.close", "code": 1008})
        if not ok:
            resp = error_response(401, "Incorrect username or password",
                                  headers={"WWW-Authenticate": 'Basic realm="diffusekit"'})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The one error body (`schemas.ErrorResponse`): {"detail": message, "error": reason phrase, "field": ...}."""
    body = {"detail": safe_text(message), "error": REASONS.get(status, "Error")}
    if field:
        body["field"] = safe_text(field, 200)
    return JSONResponse(body, status_code=status, headers=headers)


def safe_text(text: object, limit: int = 4000) -> str:
    """`text` as a string that UTF-8 can encode (a lone surrogate becomes `\\ud800`), at most `limit` chars."""
    return str(text)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           422: "Unprocessable Entity", 499: "Client Closed Request", 500: "Internal Server Error",
           503: "Service Unavailable"}



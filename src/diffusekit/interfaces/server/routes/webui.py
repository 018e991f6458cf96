"""The web UI: one HTML page with vanilla JavaScript (static/), an ordinary client of the public API."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"


def router() -> APIRouter:
    """GET / (the page) and /static/* (its script and style)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    router.mount("/static", StaticFiles(directory=STATIC), name="static")
    return router

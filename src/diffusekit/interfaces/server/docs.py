"""The API docs pages (/docs: Swagger UI, /redoc: ReDoc) served from this server, never from a CDN.

FastAPI's own /docs page loads Swagger UI's JavaScript and CSS from a CDN, so offline (how diffusekit
runs) it is blank. FastAPI documents the fix, "self-hosting JavaScript and CSS for docs": create the app
with docs_url=None and redoc_url=None, serve the files yourself, and build the pages with
`get_swagger_ui_html` / `get_redoc_html` pointing at them. The files come from the `fastapi-offline`
package (in the `serve` extra), which ships Swagger UI 5 (OpenAPI 3.1, which FastAPI writes; the
older `swagger-ui-bundle` package still ships Swagger UI 4, which cannot read 3.1) and ReDoc.
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request

ASSETS_URL = "/docs-assets"


def docs_assets() -> Path:
    """The folder holding swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    try:
        import fastapi_offline
    except ModuleNotFoundError:
        raise RuntimeError("the offline API docs need the fastapi-offline package: pip install 'diffusekit[serve]'") from None
    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    missing = [f for f in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js") if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline's {folder} lacks {', '.join(missing)}: reinstall it "
                           "(pip install --force-reinstall fastapi-offline)")
    return folder


def add_offline_docs(app, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at `docs_url` and ReDoc at `redoc_url` with their files at ASSETS_URL. The app
    must have been created with docs_url=None and redoc_url=None (FastAPI's CDN pages off)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.staticfiles import StaticFiles

    app.mount(ASSETS_URL, StaticFiles(directory=docs_assets()), name="docs-assets")
    title = app.title

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request):
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{title} - Swagger UI",
                                   oauth2_redirect_url=f"{root}{app.swagger_ui_oauth2_redirect_url}",
                                   swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png")

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request):
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)

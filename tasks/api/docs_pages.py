"""`/docs` (Swagger UI) and `/redoc` (ReDoc), with their scripts, styles and icon served by the API itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google): offline, or
behind a firewall, they are blank. The fastapi-offline package ships those files; they are served under
STATIC_URL, and the pages FastAPI draws (`get_swagger_ui_html`, `get_redoc_html`) point there, under the
app's root path when it is behind a proxy. `include_docs_pages` adds them to an app created with
`docs_url=None, redoc_url=None`.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_UI_URL = "/docs"
REDOC_URL = "/redoc"
STATIC_URL = "/docs/static"
STATIC_DIRECTORY = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, ...


def include_docs_pages(app: FastAPI) -> None:
    """Serve Swagger UI at /docs and ReDoc at /redoc, every file they load from this app."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIRECTORY), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{SWAGGER_UI_URL}/oauth2-redirect"

    @app.get(SWAGGER_UI_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_redirect_url,
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            # Swagger UI would otherwise send the document to swagger.io's online validator.
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )

"""/docs and /redoc work offline: every script, stylesheet and icon they load comes from the API itself."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.api_server import api_client
from tests.conftest import Stores

LOADED = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""")
ANY_URL = re.compile(r"(?:https?:)?//[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")  # a host: scheme-relative too
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
def client(stores: Stores) -> Iterator[httpx.Client]:
    with api_client() as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_docs_page_loads_every_file_from_the_api_itself(client: httpx.Client, page: str) -> None:
    answer = client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    assert ANY_URL.findall(html) == []  # no CDN, no web font: nothing from another host
    loaded = LOADED.findall(html)
    assert any(url.endswith(".js") for url in loaded)
    for url in loaded:
        assert url.startswith("/"), url
        file = client.get(url)
        assert file.status_code == 200, url
        assert len(file.content) > 1000, url
        suffix = url[url.rindex(".") :]
        assert CONTENT_TYPES[suffix] in file.headers["content-type"], (url, file.headers["content-type"])
    assert client.get("/openapi.json").json()["info"]["title"] == "stepcache"
    if page == "/docs":
        assert '"validatorUrl": null' in html  # the document is not sent to swagger.io's validator


def test_the_docs_files_are_not_in_the_openapi_document_and_nothing_else_is_served_beside_them(
    client: httpx.Client,
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]
    assert client.get("/docs/static/no-such-file.js").status_code == 404
    assert client.get("/docs/static/%2e%2e/docs_pages.py").status_code == 404
    assert client.get("/docs/oauth2-redirect").status_code == 200

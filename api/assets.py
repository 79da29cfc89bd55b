"""The assets (images, audio) first-rows points to, served under ASSETS_BASE_URL with signed URLs.

A URL is valid until `expires` (unix seconds) and carries `signature`, the hex HMAC-SHA256 of
`"<path under the base>\\n<expires>"` with API_ASSETS_SIGNING_KEY. The API signs the `src` of every asset
it serves in a response; `expires` is rounded up to the next multiple of API_ASSETS_URL_TTL_SECONDS (plus
one), so the same response is the same bytes for a while and its ETag holds. A path is refused, even
signed, when a part of it is empty, `.` or `..`, or holds a backslash or NUL, or when it resolves through
a symbolic link or outside ASSETS_STORAGE_DIRECTORY.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api.errors import ForbiddenError, NotFoundError
from common.config import AppConfig, get_config


@cache
def _random_key() -> bytes:
    return secrets.token_bytes(32)


def signing_key(settings: AppConfig) -> bytes:
    """API_ASSETS_SIGNING_KEY, or a key drawn once per process when it is empty."""
    key = settings.api.assets_signing_key.get_secret_value()
    return key.encode() if key else _random_key()


def signature(key: bytes, path: str, expires: int) -> str:
    return hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def expiry(ttl: int, now: float | None = None) -> int:
    """When URLs signed now expire: at least `ttl` seconds from now, and the same for `ttl` seconds."""
    return (int(time.time() if now is None else now) // ttl + 2) * ttl


def url_signer(settings: AppConfig, expires: int) -> Callable[[str], str]:
    """Signs the URL of an asset under ASSETS_BASE_URL (other strings come back as they are)."""
    base = settings.assets.base_url.rstrip("/") + "/"
    key = signing_key(settings)

    def sign(url: str) -> str:
        if not url.startswith(base) or "?" in url:
            return url
        path = url.removeprefix(base)
        return f"{url}?expires={expires}&signature={signature(key, path, expires)}"

    return sign


def sign_sources(content: Any, sign: Callable[[str], str]) -> Any:
    """The content with the `src` of every asset it holds signed."""
    if isinstance(content, dict):
        return {
            name: sign(value) if name == "src" and isinstance(value, str) else sign_sources(value, sign)
            for name, value in content.items()
        }
    if isinstance(content, list):
        return [sign_sources(item, sign) for item in content]
    return content


def route_prefix(settings: AppConfig) -> str:
    """The path the assets are served under: ASSETS_BASE_URL's path ("assets" → "/assets")."""
    base = settings.assets.base_url
    path = urlsplit(base).path if "://" in base else base
    return "/" + path.strip("/")


def resolve(storage: Path, path: str) -> Path:
    """The file `path` names in the storage directory, or NotFoundError (same answer for every refusal)."""
    parts = path.split("/")
    refused = NotFoundError("no such asset")
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        raise refused
    root = os.path.realpath(storage)
    lexical = os.path.join(root, *parts)
    if os.path.realpath(lexical) != lexical or not os.path.isfile(lexical):  # a symlink, or not a file
        raise refused
    return Path(lexical)


def router(settings: AppConfig) -> APIRouter:
    assets = APIRouter(tags=["assets"])

    @assets.get(
        route_prefix(settings) + "/{path:path}",
        response_class=FileResponse,
        responses={
            403: {"description": "a missing, tampered or expired signature"},
            404: {"description": "no such file"},
        },
    )
    def asset(
        path: str,
        expires: int = Query(description="unix seconds after which the URL is refused"),
        signature_: str = Query(alias="signature", description="hex HMAC-SHA256 of the path and expiry"),
    ) -> FileResponse:
        """An asset file, with the signature first-rows gave its URL."""
        current = get_config()
        if not hmac.compare_digest(signature(signing_key(current), path, expires).encode(), signature_.encode()):
            raise ForbiddenError("the asset URL's signature does not match", error_code="InvalidSignatureError")
        if expires < time.time():
            raise ForbiddenError("the asset URL has expired", error_code="ExpiredSignatureError")
        file = resolve(current.assets.storage_path, path)
        headers = {"Cache-Control": f"private, max-age={max(0, int(expires - time.time()))}"}
        return FileResponse(file, headers=headers)

    return assets

"""The assets (images, audio) first-rows points to, served under ASSETS_BASE_URL with signed URLs.

A URL is valid until `expires` (unix seconds) and carries `signature`, the hex HMAC-SHA256 of
`"<path under the base, percent-decoded>\\n<expires>"` with API_ASSETS_SIGNING_KEY. The API signs the
`src` of the image and audio cells of the first rows it serves, when they point into that dataset's own
files (a cell of another column is data: never signed). `expires` is rounded up to the next multiple
of API_ASSETS_URL_TTL_SECONDS (plus one), so the same response is the same bytes for a while and its
ETag (which names the key) holds. A URL without `expires` and `signature`, or with a signature that
does not match or has expired, is 403. A path is 404, signed or not, when a part of it is empty, `.` or
`..`, or holds a backslash or NUL (checked before the signature), or when it resolves through a symbolic
link or outside ASSETS_STORAGE_DIRECTORY.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from common import storage
from common.config import AppConfig, get_config
from tasks.api.errors import ForbiddenError, NotFoundError

MEDIA = {"Image", "Audio"}  # the features whose cells first rows store as asset files


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


def key_id(settings: AppConfig) -> str:
    """Names the signing key without revealing it (a response's ETag changes with it)."""
    return hashlib.sha256(signing_key(settings)).hexdigest()[:8]


def url_signer(settings: AppConfig, expires: int, dataset: str) -> Callable[[str], str]:
    """Signs the URL of one of the dataset's assets under ASSETS_BASE_URL (other strings come back as
    they are: a URL into another dataset's files is never signed)."""
    base = settings.assets.base_url.rstrip("/") + "/"
    own = f"{base}{quote(dataset, safe='/')}/--/"
    key = signing_key(settings)

    def sign(url: str) -> str:
        if not url.startswith(own) or "?" in url or "#" in url:
            return url
        path = unquote(url.removeprefix(base))
        return f"{url}?expires={expires}&signature={signature(key, path, expires)}"

    return sign


def media_columns(content: dict[str, Any]) -> list[str]:
    """The columns of first rows whose cells the step stored as asset files: images and audio."""
    return [
        feature["name"]
        for feature in content.get("features", [])
        if isinstance(feature, dict) and isinstance(feature.get("type"), dict) and _kind(feature["type"]) in MEDIA
    ]


def _kind(feature_type: dict[str, Any]) -> str | None:
    kind = feature_type.get("_type")  # a struct's field may be named "_type": then it is not a string
    return kind if isinstance(kind, str) else None


def map_media_sources(content: dict[str, Any], change: Callable[[str], str]) -> dict[str, Any]:
    """First rows with `change` applied to the `src` of each image or audio cell, and nothing else (what a
    dataset's own cells hold is data, never a URL of ours)."""
    columns = media_columns(content)
    if not columns:
        return content

    def changed(source: Any) -> Any:
        if isinstance(source, dict) and isinstance(source.get("src"), str):
            return {**source, "src": change(source["src"])}
        return source

    rows = []
    for item in content.get("rows", []):
        row = dict(item.get("row", {})) if isinstance(item, dict) else {}
        for column in columns:
            cell = row.get(column)
            row[column] = [changed(source) for source in cell] if isinstance(cell, list) else changed(cell)
        rows.append({**item, "row": row} if isinstance(item, dict) else item)
    return {**content, "rows": rows}


def check_signature(what: str, signed: str, expires: int | None, signature_: str | None) -> None:
    """A URL whose `signed` text (an asset's path, or a Parquet file's) this API signed, unexpired; else 403
    with the reason's error code (`what` names the file in the message)."""
    if expires is None or signature_ is None:  # a signed URL cut short: refused as a tampered one
        raise ForbiddenError(f"the {what} URL needs its expires and signature", error_code="MissingSignatureError")
    if not hmac.compare_digest(signature(signing_key(get_config()), signed, expires).encode(), signature_.encode()):
        raise ForbiddenError(f"the {what} URL's signature does not match", error_code="InvalidSignatureError")
    if expires < time.time():
        raise ForbiddenError(f"the {what} URL has expired", error_code="ExpiredSignatureError")


def route_prefix(settings: AppConfig) -> str:
    """The path the assets are served under: ASSETS_BASE_URL's path ("assets" → "/assets")."""
    base = settings.assets.base_url
    path = urlsplit(base).path if "://" in base else base
    return "/" + path.strip("/")


def safe_parts(path: str) -> list[str]:
    """The parts of `path`, or NotFoundError when one is empty, `.` or `..`, or holds a backslash or NUL
    (whether the URL is signed or not: nothing about the storage is looked at; common.storage.safe_parts)."""
    parts = storage.safe_parts(path)
    if parts is None:
        raise NotFoundError("no such asset")
    return parts


def resolve(directory: Path, path: str) -> Path:
    """The file `path` names in the storage directory, or NotFoundError (same answer for every refusal:
    common.storage.inside)."""
    found = storage.inside(directory, path)
    if found is None:
        raise NotFoundError("no such asset")
    return found


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
        expires: int | None = Query(None, description="unix seconds after which the URL is refused"),
        signature_: str | None = Query(None, alias="signature", description="hex HMAC-SHA256 of the path and expiry"),
    ) -> FileResponse:
        """An asset file, with the signature first-rows gave its URL."""
        safe_parts(path)  # 404, signed or not
        check_signature("asset", path, expires, signature_)
        assert expires is not None  # (checked)
        file = resolve(get_config().assets.storage_path, path)
        headers = {"Cache-Control": f"private, max-age={max(0, int(expires - time.time()))}"}
        return FileResponse(file, headers=headers)

    return assets

"""`GET` and `HEAD /parquet-files/<dataset>/--/<revision>/--/<config>/<split>/<file>`: the exported Parquet files.

The path is the one a config-parquet entry holds for the file (relative to WORKER_PARQUET_DIRECTORY), so
`/parquet` answers give each file's `url` by appending it (tasks.api.urls). The revision in the path makes
a URL name one file's bytes: a reader that reads the footer, then the row groups, never mixes two
conversions; once the dataset moves on, the old URL is 404.

Checked in this order, nothing on disk looked at before the last:
1. the path: a part empty, `.`, `..`, or holding a backslash or NUL, or a path not of that shape (a revision
   of `[A-Za-z0-9._-]`, a file `NNNN.parquet`), is 404 `NotFoundError`; a bad dataset, config or split name is
   422 with its typed error (common.names);
2. access: a signed URL (`expires`, `signature`, as `/parquet` gives for a gated or private dataset: 403
   `MissingSignatureError`, `InvalidSignatureError` or `ExpiredSignatureError`), or else the dataset's
   access rules (tasks.api.auth: 401/403 for a gated or private dataset without a JWT for it);
3. the file is one the dataset's current config-parquet entry lists, and a regular file inside the storage
   (no symbolic link): else 404 `NotFoundError`, the same answer whatever the reason.

The answer: `Accept-Ranges: bytes`, `Content-Length`, a strong `ETag` (the file's path, size, modification
time and inode) and `Last-Modified`; `If-None-Match` gets 304; one `Range` (`bytes=a-b`, `a-`, `-n`) on a GET
gets 206 with `Content-Range`, or 416 `RangeNotSatisfiableError` with `Content-Range: bytes */<size>` when
it starts past the end; `If-Range` with another validator, several ranges or a malformed Range get the
whole file (200), as HTTP allows. The bytes come from the file opened once, so a conversion that replaces
it meanwhile does not change an answer under way.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, BinaryIO

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from common import cache
from common.config import get_config
from common.exceptions import CachedResponseNotFoundError
from common.names import validate_key
from tasks.api.assets import check_signature, resolve, safe_parts
from tasks.api.auth import check_dataset_access
from tasks.api.cached import PARQUET, _matches, relative_parquet_files
from tasks.api.errors import ApiError, NotFoundError
from tasks.api.urls import PARQUET_FILES_PREFIX, parquet_signed_path

REVISION = re.compile(r"[A-Za-z0-9._-]{1,128}")
FILE_NAME = re.compile(r"[0-9]{4,6}\.parquet")
# Possessive quantifiers: no backtracking, whatever the header (a run of spaces once took seconds per byte)
RANGE = re.compile(r"\s*+bytes\s*+=\s*+([0-9]*+)\s*+-\s*+([0-9]*+)\s*+", re.IGNORECASE)
MAX_RANGE_HEADER = 200  # longer: not one range a reader sends; the whole file is answered
MEDIA_TYPE = "application/vnd.apache.parquet"
CHUNK_BYTES = 256 * 1024
NO_SUCH_FILE = "no such Parquet file"
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the file", "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    206: {"description": "the bytes of the one range asked for, with Content-Range"},
    304: {"description": "the file has not changed since the ETag given in If-None-Match"},
    401: {"description": "a gated or private dataset, and neither a signed URL nor a valid JWT for it"},
    403: {"description": "a JWT for another dataset, or a missing, tampered or expired signature"},
    404: {"description": "no such file in the dataset's current config-parquet entry (NotFoundError)"},
    416: {"description": "the range starts past the end of the file (RangeNotSatisfiableError)"},
    422: {"description": "a bad dataset, config or split name"},
}


class RangeNotSatisfiableError(ApiError):
    http_status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE


@dataclass(frozen=True)
class ParquetFileKey:
    dataset: str
    revision: str
    config: str
    split: str
    file_name: str

    @property
    def path(self) -> str:
        """Where the file is, relative to WORKER_PARQUET_DIRECTORY (as config-parquet entries say)."""
        return f"{self.dataset}/--/{self.revision}/--/{self.config}/{self.split}/{self.file_name}"


def parse(path: str) -> ParquetFileKey:
    """The file a path under /parquet-files names: NotFoundError for a path of another shape or one that could
    leave the storage, the names' typed errors for a bad name."""
    try:
        safe_parts(path)
    except NotFoundError:
        raise NotFoundError(NO_SUCH_FILE) from None
    dataset, _, rest = path.partition("/--/")  # a valid dataset name holds no "--"
    revision, _, tail = rest.partition("/--/")
    parts = tail.split("/")
    if len(parts) != 3 or not REVISION.fullmatch(revision) or not FILE_NAME.fullmatch(parts[2]):
        raise NotFoundError(NO_SUCH_FILE)
    valid_dataset, config, split = validate_key(dataset, parts[0], parts[1])
    assert config is not None and split is not None
    return ParquetFileKey(valid_dataset, revision, config, split, parts[2])


def authorize(request: Request, key: ParquetFileKey, expires: int | None, signature_: str | None) -> str:
    """The answer's Cache-Control, once the request may read the file."""
    if expires is None and signature_ is None:
        access = check_dataset_access(request, key.dataset)
        visibility = "public" if access == "public" else "private"
        return f"{visibility}, max-age={get_config().api.cache_max_age_seconds}"
    check_signature("Parquet file", parquet_signed_path(key.path), expires, signature_)
    assert expires is not None
    return f"private, max-age={max(0, int(expires - time.time()))}"


def open_listed(key: ParquetFileKey) -> BinaryIO:
    """The file, opened, when the dataset's current config-parquet entry lists it; else NotFoundError."""
    try:
        entry = cache.get_response(PARQUET, key.dataset, key.config)
    except CachedResponseNotFoundError:
        raise NotFoundError(NO_SUCH_FILE) from None
    files = (relative_parquet_files(entry.content).get("parquet_files") or []) if entry.is_success else []
    if not any(isinstance(file, dict) and file.get("path") == key.path for file in files):
        raise NotFoundError(NO_SUCH_FILE)
    try:
        handle = resolve(get_config().worker.parquet_path, key.path).open("rb")
    except (NotFoundError, OSError):  # a symbolic link, not a file, or gone meanwhile
        raise NotFoundError(NO_SUCH_FILE) from None
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise NotFoundError(NO_SUCH_FILE)
    return handle


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else 10**18  # past any file's size, without a huge int()


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes [start, end) the one range of a `Range` header asks for; None to send the whole file (no
    header, a malformed one, several ranges); RangeNotSatisfiableError when the range holds none of it."""
    match = RANGE.fullmatch(header) if header is not None and len(header) <= MAX_RANGE_HEADER else None
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = _number(first)
        if last and _number(last) < start:
            return None  # invalid: ignored
        if start >= size:
            raise RangeNotSatisfiableError(
                f"the range starts past the end of the file ({size} bytes)", {"Content-Range": f"bytes */{size}"}
            )
        return start, min(_number(last) + 1, size) if last else size
    if not last:
        return None
    suffix = _number(last)
    if suffix == 0:
        raise RangeNotSatisfiableError("an empty suffix range", {"Content-Range": f"bytes */{size}"})
    return (max(0, size - suffix), size) if size else None


def entity_tag(path: str, status: os.stat_result) -> str:
    """Strong: a conversion that replaces the file makes another inode and modification time."""
    identity = f"{path}\n{status.st_size}\n{status.st_mtime_ns}\n{status.st_ino}"
    return '"' + hashlib.sha256(identity.encode()).hexdigest()[:32] + '"'


async def _chunks(handle: BinaryIO, start: int, end: int) -> AsyncIterator[bytes]:
    try:
        while start < end:
            chunk = await anyio.to_thread.run_sync(os.pread, handle.fileno(), min(CHUNK_BYTES, end - start), start)
            if not chunk:
                raise RuntimeError("a Parquet file was cut while it was served")  # the connection is cut too
            start += len(chunk)
            yield chunk
    finally:
        handle.close()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing


def answer_file(request: Request, key: ParquetFileKey, handle: BinaryIO, cache_control: str) -> Response:
    status = os.fstat(handle.fileno())
    size, tag = status.st_size, entity_tag(key.path, status)
    last_modified = formatdate(status.st_mtime, usegmt=True)
    headers = {"ETag": tag, "Last-Modified": last_modified, "Cache-Control": cache_control, "Accept-Ranges": "bytes"}
    wanted: tuple[int, int] | None = None
    try:
        if _matches(request.headers.get("if-none-match"), tag):
            handle.close()
            return Response(status_code=HTTPStatus.NOT_MODIFIED, headers=headers)
        if_range = request.headers.get("if-range")
        if request.method == "GET" and (if_range is None or if_range.strip() in (tag, last_modified)):
            wanted = byte_range(request.headers.get("range"), size)
    except RangeNotSatisfiableError:
        handle.close()
        raise
    start, end = wanted or (0, size)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        handle.close()
        body = _nothing()
    else:
        body = _chunks(handle, start, end)
    status_code = HTTPStatus.PARTIAL_CONTENT if wanted is not None else HTTPStatus.OK
    return StreamingResponse(body, status_code, headers=headers, media_type=MEDIA_TYPE)


def router() -> APIRouter:
    routes = APIRouter(tags=["parquet files"])

    def parquet_file(
        request: Request,
        path: str,
        expires: int | None = Query(None, description="unix seconds after which a signed URL is refused"),
        signature_: str | None = Query(None, alias="signature", description="hex HMAC-SHA256 of the path and expiry"),
    ) -> Response:
        """A Parquet file of the export, as `/parquet` lists it: Range requests, ETag, If-None-Match."""
        key = parse(path)
        cache_control = authorize(request, key, expires, signature_)
        return answer_file(request, key, open_listed(key), cache_control)

    route = PARQUET_FILES_PREFIX + "/{path:path}"
    options: dict[str, Any] = {"response_class": Response, "responses": RESPONSES}
    routes.add_api_route(route, parquet_file, methods=["GET"], **options)
    # HEAD answers as GET does, without the body (and without a Range): out of the schema, whose clients
    # expect an error's JSON body.
    routes.add_api_route(route, parquet_file, methods=["HEAD"], include_in_schema=False, **options)
    return routes

"""The cached responses, one endpoint per kind of response, as the dataset viewer serves them.

`GET /<endpoint>?dataset=&config=&split=`: which of config and split are given picks the step (the level).
The answer is the entry's content with its stored HTTP status, and, for an error, `{error, error_code}`
and the `X-Error-Code` header. `ETag` comes from the entries' revisions and update times (and the
expiry of the asset URLs they hold), `Cache-Control` is `public` or, for a gated or private dataset,
`private`, with `max-age` API_CACHE_MAX_AGE_SECONDS; `If-None-Match` with the same ETag gets 304.

Without an entry:
- when a job of the dataset is waiting, queued or running (or ended, its next steps being enqueued): 202
  `ResponseNotReadyError`, `Retry-After` API_RETRY_AFTER_SECONDS, `Location` the job that produces the
  entry (`/jobs/for/<kind>?dataset=...`: it exists once the entry's parents ended), and `job_id` in the
  body: that job, else the ancestor it waits for;
- when a step it depends on failed: that step's cached error;
- otherwise a backfill of the dataset is enqueued, once per API_BACKFILL_INTERVAL_SECONDS per dataset
  (Redis remembers it), and the answer is 202 `ResponseNotReadyError` with `backfill: true`, or 404
  `ResponseNotFoundError` when the graph expects no such entry (a config the dataset does not have).

At the dataset level, `/splits`, `/parquet` and `/info` are the entries of steps that gather their configs'
(dataset-split-names, dataset-parquet, dataset-info: tasks/steps/gathered.py), with the configs still
`pending` and those `failed`, and `partial` when any is either or was cut.

Nothing names the machine: an error's message is served without local paths or the host name
(common.redaction; its cause stays in the entry's `details`, never served), and a Parquet file's `path` is
relative to WORKER_PARQUET_DIRECTORY (an entry written before held an absolute path: cut when served).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from common import cache, orchestrator
from common.config import get_config
from common.constants import REDIS_PREFIX
from common.exceptions import CachedResponseNotFoundError, InvalidInputError, ParentStepFailedError
from common.names import validate_key
from common.processing_graph import InputType, get_processing_graph
from common.redaction import redact
from common.redis_connection import get_redis
from common.sources import Access
from tasks.api.assets import expiry, key_id, map_media_sources, media_columns, url_signer
from tasks.api.auth import check_dataset_access, no_such_dataset
from tasks.api.errors import (
    ERROR_CODE_HEADER,
    MissingRequiredParameterError,
    ResponseNotFoundError,
    ResponseNotReadyError,
    error_body,
)
from tasks.api.jobs import producer_url
from tasks.api.urls import ParquetLinks, parquet_links, public_base_url

REVISION_HEADER = "X-Revision"  # the dataset's revision the answer was computed at (the viewer's)
FIRST_ROWS = "split-first-rows"
PARQUET = "config-parquet"
PARQUET_KINDS = frozenset({PARQUET, "dataset-parquet"})  # their files get their URLs when served
VALIDITY_FLAGS = ("preview", "viewer", "search", "filter", "statistics")  # what /is-valid answers


@dataclass(frozen=True)
class Endpoint:
    path: str
    summary: str
    kinds: dict[InputType, str]


ENDPOINTS = (
    Endpoint(
        "/is-valid",
        "Which views of the dataset work",
        {InputType.DATASET: "dataset-is-valid", InputType.CONFIG: "config-is-valid", InputType.SPLIT: "split-is-valid"},
    ),
    Endpoint(
        "/splits",
        "The splits of a config, or of every config",
        {InputType.DATASET: "dataset-split-names", InputType.CONFIG: "config-split-names"},
    ),
    Endpoint("/first-rows", "The first rows of a split", {InputType.SPLIT: FIRST_ROWS}),
    Endpoint("/parquet", "The Parquet files", {InputType.DATASET: "dataset-parquet", InputType.CONFIG: PARQUET}),
    Endpoint("/info", "Features and splits", {InputType.DATASET: "dataset-info", InputType.CONFIG: "config-info"}),
    Endpoint("/size", "Sizes in rows and bytes", {InputType.DATASET: "dataset-size", InputType.CONFIG: "config-size"}),
    Endpoint("/statistics", "Descriptive statistics of a split", {InputType.SPLIT: "split-descriptive-statistics"}),
)
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the cached content"},
    304: {"description": "the entry has not changed since the ETag given in If-None-Match"},
    401: {"description": "no such dataset, or a gated or private one and no valid JWT (ExternalUnauthenticatedError)"},
    404: {
        "description": "a valid JWT for another dataset (ExternalAuthenticatedError), no such entry "
        "(ResponseNotFound), or a cached 404"
    },
    422: {"description": "a parameter missing or empty (MissingRequiredParameter), or invalid (InvalidParameter)"},
    500: {
        "description": "not ready: a job computes it, ask again after Retry-After (ResponseNotReady); or a cached "
        "error (its step's code)"
    },
}


class ContentResponse(JSONResponse):
    """JSON by orjson: what BSON keeps and JSON lacks made JSON (NaN and infinities as null, dates as text)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


def entity_tag(entries: Sequence[cache.CachedResponse], *more: object) -> str:
    parts = [(e.kind, e.config, e.split, e.dataset_git_revision, e.updated_at.isoformat(), e.fence) for e in entries]
    return '"' + hashlib.sha256(repr((parts, more)).encode()).hexdigest()[:32] + '"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    if if_none_match is None:
        return False
    candidates = [candidate.strip().removeprefix("W/") for candidate in if_none_match.split(",")]
    return "*" in candidates or tag in candidates


def answer(
    request: Request,
    entries: Sequence[cache.CachedResponse],
    content: dict[str, Any],
    status: int,
    error_code: str | None,
    access: Access,
    *tag_parts: object,
) -> Response:
    tag = entity_tag(entries, *tag_parts)
    visibility = "public" if access == "public" else "private"
    headers = {"ETag": tag, "Cache-Control": f"{visibility}, max-age={get_config().api.cache_max_age_seconds}"}
    revision = next((entry.dataset_git_revision for entry in entries if entry.dataset_git_revision), None)
    if revision is not None:
        headers[REVISION_HEADER] = revision
    if not get_config().api.public_url:  # its URLs (Parquet files, images) follow the request's Host
        headers["Vary"] = "Host"
    if error_code is not None:
        headers[ERROR_CODE_HEADER] = error_code
        headers["Cache-Control"] = "no-store"  # an error is asked again, never kept (the viewer's)
    if _matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return ContentResponse(content, status, headers=headers)


def error_message(entry: cache.CachedResponse) -> str | None:
    message = entry.content.get("error")
    return redact(message) if isinstance(message, str) else None


def relative_parquet_files(content: dict[str, Any], links: ParquetLinks | None = None) -> dict[str, Any]:
    """A config-parquet content whose files' paths are relative to WORKER_PARQUET_DIRECTORY (an entry
    written before they were holds absolute ones, cut at the storage or else at the dataset's folder), and,
    with `links`, each file's absolute `url` (tasks.api.urls: signed for a gated or private dataset)."""
    files = content.get("parquet_files") or []
    storage = f"{str(get_config().worker.parquet_path).rstrip('/')}/"

    def relative(file: dict[str, Any]) -> dict[str, Any]:
        path = file.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            return file
        if path.startswith(storage):
            return {**file, "path": path.removeprefix(storage)}
        folder = path.find(f"/{file.get('dataset')}/--/")
        return {**file, "path": path[folder + 1 :] if folder >= 0 else PurePosixPath(path).name}

    def linked(file: dict[str, Any]) -> dict[str, Any]:
        file = relative(file)
        path = file.get("path")
        return {**file, "url": links.url(path)} if links is not None and isinstance(path, str) else file

    return {**content, "parquet_files": [linked(file) for file in files]} if files else content


def answer_entry(request: Request, entry: cache.CachedResponse, access: Access) -> Response:
    if not entry.is_success:
        body = error_body(error_message(entry), entry.error_code)
        return answer(request, [entry], body, entry.http_status, entry.error_code, access)
    if entry.kind in PARQUET_KINDS:
        links = parquet_links(request, access)
        content = relative_parquet_files(entry.content, links)
        return answer(request, [entry], content, entry.http_status, None, access, *links.tag)
    if entry.kind != FIRST_ROWS or not media_columns(entry.content):
        return answer(request, [entry], entry.content, entry.http_status, None, access)
    content, signing = signed_media(request, entry.dataset, entry.content)
    return answer(request, [entry], content, entry.http_status, None, access, *signing)


def signed_media(request: Request, dataset: str, content: dict[str, Any]) -> tuple[dict[str, Any], tuple[object, ...]]:
    """Rows (`{"features", "rows"}`) whose image and audio `src` are absolute signed URLs, as the viewer's
    (ASSETS_BASE_URL is relative to the API unless it is a URL itself); and what the answer's ETag must
    name besides its entries (the expiry, the key, the bases)."""
    settings = get_config()
    expires = expiry(settings.api.assets_url_ttl_seconds)
    sign, base = url_signer(settings, expires, dataset), public_base_url(request)
    signed = map_media_sources(content, lambda url: absolute(base, sign(url)))
    return signed, (expires, key_id(settings), settings.assets.base_url, base)


LEVELS = (InputType.SPLIT, InputType.CONFIG, InputType.DATASET)  # the finest the parameters give, first
REQUIRED = {
    InputType.DATASET: "Parameter 'dataset' is required",
    InputType.CONFIG: "Parameters 'dataset' and 'config' are required",
    InputType.SPLIT: "Parameters 'dataset', 'config' and 'split' are required",
}
# /is-valid answers every flag false for a dataset whose entry is an error (a broken dataset), as the viewer
# does, and while it is not ready
NOTHING_VALID = {"preview": False, "viewer": False, "search": False, "filter": False, "statistics": False}


def level_of(endpoint: Endpoint, dataset: str, config: str | None, split: str | None) -> InputType:
    """The finest level the endpoint serves whose parameters are all given (a finer one given is ignored, as
    the viewer does); MissingRequiredParameter when none is."""
    given: dict[InputType, list[str | None]] = {
        InputType.DATASET: [dataset],
        InputType.CONFIG: [dataset, config],
        InputType.SPLIT: [dataset, config, split],
    }
    served = [level for level in LEVELS if level in endpoint.kinds]
    for level in served:
        if all(isinstance(value, str) and value.strip() for value in given[level]):
            return level
    raise MissingRequiredParameterError(REQUIRED[served[-1]])


def absolute(base: str, url: str) -> str:
    return url if "://" in url else f"{base}/{url.lstrip('/')}"


def serve(endpoint: Endpoint, request: Request, dataset: str, config: str | None, split: str | None) -> Response:
    level = level_of(endpoint, dataset, config, split)
    config = config if level != InputType.DATASET else None
    split = split if level == InputType.SPLIT else None
    dataset, config, split, access = checked_names(request, dataset, config, split)
    kind = endpoint.kinds[level]
    if endpoint.path != "/is-valid":
        return answer_entry(request, cached_entry(kind, dataset, config, split), access)
    try:
        entry = cached_entry(kind, dataset, config, split)
    except ResponseNotReadyError as not_ready:
        # What is valid now: nothing yet (the viewer's /is-valid documents no not-ready answer).
        headers = {"Cache-Control": "no-store", **not_ready.headers}
        return ContentResponse(NOTHING_VALID, 200, headers=headers)
    # the flags only (config-is-valid also lists its splits, for its children)
    flags = {flag: bool(entry.content.get(flag)) for flag in VALIDITY_FLAGS} if entry.is_success else NOTHING_VALID
    return answer(request, [entry], flags, 200, None, access)


def checked_names(
    request: Request, dataset: str, config: str | None, split: str | None
) -> tuple[str, str | None, str | None, Access]:
    """The names, valid, once the request may read the dataset: a dataset name no dataset can have is the
    answer of one that does not exist (whatever the access), a config or split name none can have is 404."""
    try:
        validate_key(dataset, None, None)
    except InvalidInputError:  # no dataset can have that name: the answer of one that does not exist
        no_such_dataset(request)
    access = check_dataset_access(request, dataset)
    try:
        dataset, config, split = validate_key(dataset, config, split)
    except InvalidInputError as error:  # no config or split can have that name: no entry
        raise ResponseNotFoundError(f"Not found: {error}") from None
    return dataset, config, split, access


def cached_entry(kind: str, dataset: str, config: str | None, split: str | None) -> cache.CachedResponse:
    """The entry of the key; else what stands in for it (`stand_in`: an error entry, or not ready or not
    found raised); an entry that is the failure of a step it depends on is that step's own error."""
    try:
        entry = cache.get_response(kind, dataset, config, split)
    except CachedResponseNotFoundError:
        entry = stand_in(kind, dataset, config, split)
    if entry.error_code == ParentStepFailedError.error_code:  # the failure of the step it depends on
        entry = failed_ancestor(kind, dataset, config, split) or entry
    return entry


def stand_in(kind: str, dataset: str, config: str | None, split: str | None) -> cache.CachedResponse:
    """What answers for a missing entry: the error of a step it depends on; else a not-ready or not-found
    error is raised (and a backfill enqueued, once in a while)."""
    from tasks.queue import get_queue

    settings = get_config()
    queue = get_queue()
    retry = {"Retry-After": str(settings.api.retry_after_seconds)}
    busy = queue.in_process(dataset)  # an ended job among them is enqueueing its next steps
    if busy:
        found = orchestrator.producer(queue, orchestrator.JobKey(kind, dataset, config, split), busy)
        own = found.job if found.job in busy else None  # (else the key's last job, ended: not this work)
        job = own or found.waiting_for or busy[0]
        doing = "enqueueing its next steps" if job.status.is_terminal else job.status
        message = f"the response is not ready yet: {job.step} is {doing}"
        location = {"Location": producer_url(kind, dataset, config, split)}
        raise ResponseNotReadyError(message, {**retry, **location}, job_id=job.job_id)
    failed = failed_ancestor(kind, dataset, config, split)
    if failed is not None:
        return failed
    redis = get_redis(settings.queue.redis_url)
    marker = f"{REDIS_PREFIX}:api:backfill:{dataset}"
    if redis.set(marker, 1, nx=True, ex=math.ceil(settings.api.backfill_interval_seconds)):
        jobs = orchestrator.backfill(queue, dataset, priority="normal")
        if jobs:
            message = f"no cache entry yet: a backfill of {dataset} was enqueued ({len(jobs)} job(s))"
            raise ResponseNotReadyError(message, retry, backfill=True)
    raise ResponseNotFoundError(
        f"no cache entry for {kind} of {dataset} {config or ''} {split or ''}, and no job computes it"
    )


def failed_ancestor(kind: str, dataset: str, config: str | None, split: str | None) -> cache.CachedResponse | None:
    """The error entry of a step the entry of `kind` depends on that failed by itself (not a
    ParentStepFailedError): the root cause of the entry's absence, or of its own ParentStepFailedError."""
    ancestors = [step.name for step in get_processing_graph().ancestors(kind)]
    for entry in cache.get_dataset_responses(dataset, ancestors, with_content=False):  # metadata only
        own = entry.error_code != ParentStepFailedError.error_code
        if not entry.is_success and own and entry.config in (None, config) and entry.split in (None, split):
            try:
                return cache.get_response(entry.kind, dataset, entry.config, entry.split)
            except CachedResponseNotFoundError:
                return None  # deleted meanwhile
    return None


def _handler(endpoint: Endpoint) -> Callable[..., Response]:
    def handler(
        request: Request,
        dataset: str = Query(description="org/name, or name", examples=["org/dataset"]),
        config: str | None = Query(None, description="a config of the dataset"),
        split: str | None = Query(None, description="a split of the config"),
    ) -> Response:
        return serve(endpoint, request, dataset, config, split)

    handler.__doc__ = endpoint.summary
    handler.__name__ = endpoint.path.strip("/").replace("-", "_")
    return handler


def router(endpoints: Sequence[Endpoint] = ENDPOINTS) -> APIRouter:
    """A GET route per endpoint, each answered by `serve`."""
    routes = APIRouter(tags=["cached responses"])
    for endpoint in endpoints:
        routes.add_api_route(
            endpoint.path,
            _handler(endpoint),
            methods=["GET"],
            summary=endpoint.summary,
            responses=RESPONSES,
            response_class=ContentResponse,
        )
    return routes

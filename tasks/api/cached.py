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

At the dataset level, `/splits`, `/parquet` and `/info` gather their configs' entries, with the configs
still `pending` and those `failed`, and `partial` when any is either or was cut.

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
from common.exceptions import CachedResponseNotFoundError
from common.names import validate_key
from common.processing_graph import InputType, get_processing_graph
from common.redaction import redact
from common.redis_connection import get_redis
from common.sources import Access
from tasks.api.assets import expiry, key_id, map_media_sources, media_columns, url_signer
from tasks.api.auth import check_dataset_access
from tasks.api.errors import (
    ERROR_CODE_HEADER,
    InvalidParameterError,
    ResponseNotFoundError,
    ResponseNotReadyError,
    error_body,
)
from tasks.api.jobs import producer_url

ROOT_STEP = "dataset-config-names"
FIRST_ROWS = "split-first-rows"
PARQUET = "config-parquet"


@dataclass(frozen=True)
class Endpoint:
    path: str
    summary: str
    kinds: dict[InputType, str]
    gather: str | None = None  # at the dataset level: the field of each config's entry gathered (a list...)
    gather_by_config: bool = False  # ...or a mapping from the config to it


ENDPOINTS = (
    Endpoint("/is-valid", "Which views of the dataset work", {InputType.DATASET: "dataset-is-valid"}),
    Endpoint(
        "/splits", "The splits of a config, or of every config", {InputType.CONFIG: "config-split-names"}, "splits"
    ),
    Endpoint("/first-rows", "The first rows of a split", {InputType.SPLIT: FIRST_ROWS}),
    Endpoint("/parquet", "The Parquet files", {InputType.CONFIG: PARQUET}, "parquet_files"),
    Endpoint("/info", "Features and splits", {InputType.CONFIG: "config-info"}, "dataset_info", gather_by_config=True),
    Endpoint("/size", "Sizes in rows and bytes", {InputType.DATASET: "dataset-size", InputType.CONFIG: "config-size"}),
    Endpoint("/statistics", "Descriptive statistics of a split", {InputType.SPLIT: "split-descriptive-statistics"}),
)
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the cached content"},
    202: {"description": "not ready: a job computes it; ask again after Retry-After (ResponseNotReadyError)"},
    304: {"description": "the entry has not changed since the ETag given in If-None-Match"},
    401: {"description": "a gated or private dataset, and no valid JWT for it"},
    403: {"description": "a JWT for another dataset"},
    404: {"description": "no such entry, and the graph expects none (ResponseNotFoundError), or a cached 404"},
    422: {"description": "a bad dataset, config or split name, or a level the endpoint does not serve"},
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
    if error_code is not None:
        headers[ERROR_CODE_HEADER] = error_code
    if _matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return ContentResponse(content, status, headers=headers)


def error_message(entry: cache.CachedResponse) -> str | None:
    message = entry.content.get("error")
    return redact(message) if isinstance(message, str) else None


def relative_parquet_files(content: dict[str, Any]) -> dict[str, Any]:
    """A config-parquet content whose files' paths are relative to WORKER_PARQUET_DIRECTORY: an entry
    written before they were holds absolute ones, cut at the storage or else at the dataset's folder."""
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

    return {**content, "parquet_files": [relative(file) for file in files]} if files else content


def answer_entry(request: Request, entry: cache.CachedResponse, access: Access) -> Response:
    if not entry.is_success:
        body = error_body(error_message(entry), entry.error_code)
        return answer(request, [entry], body, entry.http_status, entry.error_code, access)
    if entry.kind == PARQUET:
        return answer(request, [entry], relative_parquet_files(entry.content), entry.http_status, None, access)
    if entry.kind != FIRST_ROWS or not media_columns(entry.content):
        return answer(request, [entry], entry.content, entry.http_status, None, access)
    settings = get_config()
    expires = expiry(settings.api.assets_url_ttl_seconds)
    content = map_media_sources(entry.content, url_signer(settings, expires, entry.dataset))
    signing = (expires, key_id(settings), settings.assets.base_url)
    return answer(request, [entry], content, entry.http_status, None, access, *signing)


def serve(endpoint: Endpoint, request: Request, dataset: str, config: str | None, split: str | None) -> Response:
    dataset, config, split = validate_key(dataset, config, split)
    level = InputType.SPLIT if split is not None else InputType.CONFIG if config is not None else InputType.DATASET
    gather = level == InputType.DATASET and endpoint.gather is not None
    kind = endpoint.kinds.get(level)
    if kind is None and not gather:
        levels = " or ".join(_parameters(level) for level in endpoint.kinds)
        raise InvalidParameterError(f"{endpoint.path} takes {levels}")
    access = check_dataset_access(request, dataset)
    if kind is None:
        return gathered(endpoint, request, dataset, access)
    try:
        entry = cache.get_response(kind, dataset, config, split)
    except CachedResponseNotFoundError:
        entry = stand_in(kind, dataset, config, split)
    return answer_entry(request, entry, access)


def _parameters(level: InputType) -> str:
    return {InputType.DATASET: "dataset", InputType.CONFIG: "dataset and config"}.get(
        level, "dataset, config and split"
    )


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
    ancestors = [step.name for step in get_processing_graph().ancestors(kind)]
    for entry in cache.get_dataset_responses(dataset, ancestors, with_content=False):  # metadata only
        failed = not entry.is_success and entry.config in (None, config) and entry.split in (None, split)
        if failed:
            try:
                return cache.get_response(entry.kind, dataset, entry.config, entry.split)
            except CachedResponseNotFoundError:
                break  # deleted meanwhile: no stand-in
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


def gathered(endpoint: Endpoint, request: Request, dataset: str, access: Access) -> Response:
    """The configs' entries of the endpoint gathered into one dataset-level answer."""
    assert endpoint.gather is not None
    kind = endpoint.kinds[InputType.CONFIG]
    entries = cache.get_dataset_responses(dataset, [ROOT_STEP, kind])
    names = next((entry for entry in entries if entry.kind == ROOT_STEP), None) or stand_in(
        ROOT_STEP, dataset, None, None
    )
    if not names.is_success:
        return answer_entry(request, names, access)
    by_config = {entry.config: entry for entry in entries if entry.kind == kind}
    values: list[Any] | dict[str, Any] = {} if endpoint.gather_by_config else []
    pending, failed, partial, used = [], [], False, [names]
    for item in names.content.get("config_names", []):
        config = item["config"]
        entry = by_config.get(config)
        if entry is None:
            pending.append(config)
            continue
        used.append(entry)
        if not entry.is_success:
            failed.append({"config": config, "error_code": entry.error_code, "error": error_message(entry)})
            continue
        partial = partial or bool(entry.content.get("partial", False))
        value = (relative_parquet_files(entry.content) if kind == PARQUET else entry.content).get(endpoint.gather)
        if isinstance(values, dict):
            values[config] = value
        else:
            values.extend(value or [])
    content = {
        endpoint.gather: values,
        "pending": pending,
        "failed": failed,
        "partial": partial or bool(pending or failed),
    }
    return answer(request, used, content, 200, None, access, len(pending))


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


def router() -> APIRouter:
    routes = APIRouter(tags=["cached responses"])
    for endpoint in ENDPOINTS:
        routes.add_api_route(
            endpoint.path,
            _handler(endpoint),
            methods=["GET"],
            summary=endpoint.summary,
            responses=RESPONSES,
            response_class=ContentResponse,
        )
    return routes

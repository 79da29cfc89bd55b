"""More of the viewer's endpoints: the cached answers the Hub reads, and two operator views of the cache.

- `GET /compatible-libraries?dataset=`, `/croissant-crumbs?dataset=`, `/hub-cache?dataset=`: the entries of
  dataset-compatible-libraries, dataset-croissant-crumbs and dataset-hub-cache, served as every cached
  answer is (tasks.api.cached.serve: the same access rules, ETag, Cache-Control, not-ready and not-found
  answers);
- `GET /admin/dataset-status?dataset=` (operator): per step of the graph, the dataset's cache entries (their
  metadata, not their content) and its jobs in process;
- `GET /admin/cache-reports/{kind}?cursor=&limit=` (operator): the entries of one step, every dataset's,
  `limit` at a time in the order they were created, without their content; `next_cursor` is the `cursor`
  of the next page, "" after the last one. A cursor names an entry; an entry created later is on a later
  page, one deleted meanwhile moves nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from fastapi import APIRouter, Depends, Path, Query

from common import cache
from common.names import validate_dataset
from common.processing_graph import InputType, get_processing_graph
from common.redaction import redact
from tasks.api.auth import require_operator
from tasks.api.cached import ContentResponse, Endpoint
from tasks.api.cached import router as cached_router
from tasks.api.errors import InvalidParameterError, NotFoundError

ENDPOINTS = (
    Endpoint(
        "/compatible-libraries",
        "How to load the dataset with datasets, pandas, Polars, DuckDB and Croissant",
        {InputType.DATASET: "dataset-compatible-libraries"},
    ),
    Endpoint(
        "/croissant-crumbs",
        "The parts of the dataset's Croissant metadata the viewer computes",
        {InputType.DATASET: "dataset-croissant-crumbs"},
    ),
    Endpoint(
        "/hub-cache",
        "What the Hub shows of the dataset: preview, viewer, rows, libraries, modalities",
        {InputType.DATASET: "dataset-hub-cache"},
    ),
)
OPERATOR: dict[int | str, dict[str, Any]] = {
    401: {"description": "no operator key, or a bad, stale or replayed signature"}
}
MAX_PAGE = 1_000
REPORTED = (
    *("kind", "dataset", "config", "split", "http_status", "error_code", "job_runner_version"),
    *("dataset_git_revision", "progress", "failed_runs", "updated_at"),
)
JOB_FIELDS = (
    *("job_id", "step", "dataset", "config", "split", "status", "priority", "created_at", "started_at"),
    "attempts",
)


def report(document: Mapping[str, Any]) -> dict[str, Any]:
    """An entry without its content: its key, status and bookkeeping, and the details of an error (its
    message and cause, without local paths or the host name)."""
    details = document.get("details")
    return {
        **{name: document.get(name) for name in REPORTED},
        "details": {name: redact(value) if isinstance(value, str) else value for name, value in details.items()}
        if isinstance(details, Mapping)
        else None,
    }


def cache_reports(kind: str, cursor: str, limit: int) -> dict[str, Any]:
    query: dict[str, Any] = {"kind": kind}
    if cursor:
        try:
            query["_id"] = {"$gt": ObjectId(cursor)}
        except (InvalidId, TypeError):
            raise InvalidParameterError("invalid cursor: give the next_cursor of the page before") from None
    documents = list(
        cache.cache_collection().find(query, projection={"content": False, "claim": False}).sort("_id", 1).limit(limit)
    )
    # An attempt's bare claim (no response yet) is no entry: left out, its place kept for the cursor.
    return {
        "cache_reports": [report(document) for document in documents if "http_status" in document],
        "next_cursor": str(documents[-1]["_id"]) if len(documents) == limit else "",
    }


def dataset_status(dataset: str) -> dict[str, Any]:
    from tasks.queue import get_queue

    dataset = validate_dataset(dataset)
    documents = cache.cache_collection().find(
        {"dataset": dataset, "http_status": {"$exists": True}}, projection={"content": False, "claim": False}
    )
    entries = sorted((report(document) for document in documents), key=lambda e: (e["config"] or "", e["split"] or ""))
    jobs = [{name: getattr(job, name) for name in JOB_FIELDS} for job in get_queue().in_process(dataset)]
    return {
        step.name: {
            "cached_responses": [entry for entry in entries if entry["kind"] == step.name],
            "jobs": [job for job in jobs if job["step"] == step.name],
        }
        for step in get_processing_graph()
    }


def router() -> APIRouter:
    routes = cached_router(ENDPOINTS)
    admin = APIRouter(prefix="/admin", tags=["operator"], dependencies=[Depends(require_operator)], responses=OPERATOR)

    @admin.get("/dataset-status", response_class=ContentResponse)
    def dataset_status_route(dataset: str = Query(description="org/name, or name")) -> dict[str, Any]:
        """Per step: the dataset's cache entries (without content) and its jobs in process."""
        return dataset_status(dataset)

    @admin.get("/cache-reports/{kind}", response_class=ContentResponse)
    def cache_reports_route(
        kind: str = Path(description="a step of the graph", max_length=200),
        cursor: str = Query("", description="next_cursor of the page before; empty: the first page", max_length=64),
        limit: int = Query(100, ge=1, le=MAX_PAGE, description="at most this many entries"),
    ) -> dict[str, Any]:
        """The entries of one step, without content, a page at a time."""
        if kind not in get_processing_graph():
            raise NotFoundError(f"no step {kind!r} in the processing graph")
        return cache_reports(kind, cursor, limit)

    routes.include_router(admin)
    return routes

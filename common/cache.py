"""The MongoDB cache of precomputed responses: collection `cachedResponses` in CACHE_MONGO_DATABASE.

One document per (kind, dataset, config, split), where `kind` is the name of the processing step that
computed it. A success stores the step's content with http_status 200; an error stores the error's
details as content, with its error_code and http_status. `failed_runs` counts consecutive errors for
the same dataset revision: a success, or an error at a new revision, starts it again.

Readers use :func:`get_response`; steps never call this module, the worker stores what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Collection as Collection_
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import bson
from pydantic import BaseModel, ConfigDict
from pymongo import ASCENDING, DESCENDING
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from common.config import get_config
from common.constants import CACHE_COLLECTION
from common.exceptions import (
    CacheableError,
    CachedResponseNotFoundError,
    ContentNotStorableError,
    ContentTooBigError,
    ParentStepFailedError,
    PreviousStepMissingError,
    UnknownStepError,
)
from common.mongo import get_collection
from common.names import validate_key
from common.processing_graph import get_processing_graph
from common.resilience import retry_transient

KEY_FIELDS = ("kind", "dataset", "config", "split")
UPSERT_ATTEMPTS = 3
WRITE_FLAG = "_stepcache_write"  # set and unset within one update: whether this write may replace the entry


class CachedResponse(BaseModel):
    """One cache entry, as readers see it."""

    model_config = ConfigDict(frozen=True)

    kind: str
    dataset: str
    config: str | None
    split: str | None
    content: dict[str, Any]
    http_status: int
    error_code: str | None = None
    details: dict[str, Any] | None = None
    job_runner_version: int | None = None
    dataset_git_revision: str | None = None
    progress: float | None = None
    duration: float | None = None
    failed_runs: int = 0
    updated_at: datetime
    fence: int | None = None  # the limiter's fence of the attempt that wrote it; None: not written by a job

    @property
    def is_success(self) -> bool:
        return self.http_status == HTTPStatus.OK


class CacheCount(BaseModel):
    """How many entries share a kind, an http_status and an error_code."""

    kind: str
    http_status: int
    error_code: str | None
    count: int


def cache_collection() -> Collection[dict[str, Any]]:
    """The `cachedResponses` collection of this process's settings, its indexes created on first use."""
    settings = get_config().cache
    return get_collection(settings.mongo_url, settings.mongo_database, CACHE_COLLECTION, _create_indexes)


def _create_indexes(collection: Collection[dict[str, Any]]) -> None:
    collection.create_index([(field, ASCENDING) for field in KEY_FIELDS], unique=True, name="key")
    collection.create_index([("dataset", ASCENDING), ("kind", ASCENDING)], name="dataset")
    collection.create_index([("kind", ASCENDING), ("http_status", ASCENDING), ("error_code", ASCENDING)], name="status")
    collection.create_index([("updated_at", DESCENDING)], name="updated_at")


def _key(kind: str, dataset: str, config: str | None, split: str | None) -> dict[str, Any]:
    dataset, config, split = validate_key(dataset, config, split)
    if not isinstance(kind, str) or not kind:
        raise UnknownStepError(f"the kind of a cache entry is a step name, not {kind!r}")
    return {"kind": kind, "dataset": dataset, "config": config, "split": split}


def check_content(content: object) -> dict[str, Any]:
    """The content as a storable document, or a typed error when it is not one or is too big."""
    if not isinstance(content, Mapping):
        raise ContentNotStorableError(f"content must be a mapping, not {type(content).__name__}")
    try:
        size = len(bson.encode(content))
    except (bson.errors.InvalidDocument, TypeError, OverflowError) as error:
        raise ContentNotStorableError("content cannot be stored as a document", cause=error) from error
    max_bytes = get_config().worker.content_max_bytes
    if size > max_bytes:
        raise ContentTooBigError(f"content is {size} bytes once encoded, over WORKER_CONTENT_MAX_BYTES={max_bytes}")
    return dict(content)


@retry_transient
def upsert_response(
    kind: str,
    dataset: str,
    content: Mapping[str, Any],
    http_status: int = HTTPStatus.OK,
    config: str | None = None,
    split: str | None = None,
    error_code: str | None = None,
    details: Mapping[str, Any] | None = None,
    job_runner_version: int | None = None,
    dataset_git_revision: str | None = None,
    progress: float | None = 1.0,
    duration: float | None = None,
    fence: int | None = None,
) -> bool:
    """Create or replace the entry of this key; writing the same response twice leaves one entry.

    With a `fence` (the limiter's, for the attempt that computed the response), the entry is written
    only over an older one: False when the entry holds this fence or a newer one, and nothing changed.

    `job_runner_version` defaults to the processing graph's version of the step `kind`. Raises
    ContentTooBigError or ContentNotStorableError, and writes nothing, when the content cannot be stored;
    the entry already in the cache stays as it was.
    """
    key = _key(kind, dataset, config, split)
    if job_runner_version is None:
        graph = get_processing_graph()
        job_runner_version = graph.get_step(kind).job_runner_version if kind in graph else None
    document = check_content(content)
    is_error = http_status != HTTPStatus.OK
    fields: dict[str, Any] = {
        "content": document,
        "http_status": int(http_status),
        "error_code": error_code,
        "details": dict(details) if details is not None else None,
        "job_runner_version": job_runner_version,
        "progress": progress,
        "duration": duration,
        "updated_at": datetime.now(UTC),
        **({"fence": fence} if fence is not None else {}),
    }
    # The revision is compared before it is overwritten: both $set stages run in order, atomically.
    same_revision = {"$eq": ["$dataset_git_revision", {"$literal": dataset_git_revision}]}
    runs: Any = {"$cond": [same_revision, {"$add": [{"$ifNull": ["$failed_runs", 0]}, 1]}, 1]} if is_error else 0
    values = {
        **{name: {"$literal": value} for name, value in fields.items()},
        "failed_runs": runs,
        "dataset_git_revision": {"$literal": dataset_git_revision},
    }
    # The fence is compared inside the document, not in the query: the query stays an exact match on the
    # key index (a condition on `fence` there made SecantusDB scan the collection: 37 ms at 2,000 entries).
    pipeline: list[dict[str, Any]] = [
        {"$set": {WRITE_FLAG: True if fence is None else _older_than(fence)}},
        {"$set": {name: {"$cond": [f"${WRITE_FLAG}", value, f"${name}"]} for name, value in values.items()}},
        {"$unset": WRITE_FLAG},
    ]
    for attempt in range(UPSERT_ATTEMPTS):
        try:
            result = cache_collection().update_one(key, pipeline, upsert=True)
            return result.upserted_id is not None or result.modified_count == 1
        except DuplicateKeyError:
            # Two first writers of one key raced: the loser retries as an update of the winner's entry.
            if attempt == UPSERT_ATTEMPTS - 1:
                raise
    return False  # unreachable: the last attempt returns or raises


def _older_than(fence: int) -> dict[str, Any]:
    """An aggregation expression: the entry was written under an older fence, or by no job (no fence)."""
    return {"$lt": [{"$ifNull": ["$fence", -1]}, fence]}


def upsert_error(
    kind: str,
    dataset: str,
    error: CacheableError,
    config: str | None = None,
    split: str | None = None,
    job_runner_version: int | None = None,
    dataset_git_revision: str | None = None,
    duration: float | None = None,
    fence: int | None = None,
) -> bool:
    """Store a typed error as the response of this key (fenced as `upsert_response` is)."""
    return upsert_response(
        kind,
        dataset,
        content={"error": error.message},
        http_status=error.http_status,
        config=config,
        split=split,
        error_code=error.error_code,
        details=error.as_details(),
        job_runner_version=job_runner_version,
        dataset_git_revision=dataset_git_revision,
        duration=duration,
        fence=fence,
    )


@retry_transient
def update_progress(
    kind: str, dataset: str, config: str | None, split: str | None, progress: float, fence: int
) -> bool:
    """Set the progress (0..1) of an existing entry if it is older than the running attempt's `fence`
    (an entry as new or newer keeps its own); False when there is no entry."""
    key = _key(kind, dataset, config, split)
    value = min(1.0, max(0.0, progress))
    progress_stage = {"$set": {"progress": {"$cond": [_older_than(fence), value, "$progress"]}}}
    return cache_collection().update_one(key, [progress_stage]).matched_count == 1


@retry_transient
def get_response(kind: str, dataset: str, config: str | None = None, split: str | None = None) -> CachedResponse:
    """The entry of this key, or CachedResponseNotFoundError."""
    key = _key(kind, dataset, config, split)
    document = cache_collection().find_one(key, projection={"_id": False})
    if document is None:
        raise CachedResponseNotFoundError(
            f"no cache entry for kind={kind!r} dataset={dataset!r} config={config!r} split={split!r}"
        )
    return CachedResponse.model_validate(document)


def get_previous_step_response(
    kind: str, dataset: str, config: str | None = None, split: str | None = None
) -> CachedResponse:
    """A parent step's successful response; a typed error when it is missing or failed."""
    try:
        entry = get_response(kind, dataset, config, split)
    except CachedResponseNotFoundError as error:
        raise PreviousStepMissingError(f"the response of {kind!r} is not in the cache yet", cause=error) from error
    if not entry.is_success:
        failure = ParentStepFailedError(f"{kind!r} failed with {entry.error_code}: {entry.content.get('error')}")
        failure.http_status = HTTPStatus(entry.http_status)
        raise failure
    return entry


@retry_transient
def get_dataset_responses(
    dataset: str, kinds: Collection_[str] | None = None, with_content: bool = True
) -> list[CachedResponse]:
    """Every entry of the dataset (of these kinds only, when given), ordered by kind, config and split;
    without their content (an empty one), when it is not needed: contents can be megabytes each."""
    dataset, _, _ = validate_key(dataset, None, None)
    query: dict[str, Any] = (
        {"dataset": dataset} if kinds is None else {"dataset": dataset, "kind": {"$in": list(kinds)}}
    )
    projection = {"_id": False} if with_content else {"_id": False, "content": False}
    entries = [
        CachedResponse.model_validate(document if with_content else {**document, "content": {}})
        for document in cache_collection().find(query, projection=projection)
    ]
    return sorted(entries, key=lambda entry: (entry.kind, entry.config or "", entry.split or ""))


@retry_transient
def delete_dataset_responses(dataset: str) -> int:
    """Delete every entry of the dataset (and only its entries); returns how many were deleted."""
    dataset, _, _ = validate_key(dataset, None, None)
    return cache_collection().delete_many({"dataset": dataset}).deleted_count


@retry_transient
def count_by_status(kind: str | None = None) -> list[CacheCount]:
    """How many entries per (kind, http_status, error_code), optionally for one kind."""
    match: dict[str, Any] = {} if kind is None else {"kind": kind}
    pipeline: list[dict[str, Any]] = [
        {"$match": match},
        {
            "$group": {
                "_id": {"kind": "$kind", "http_status": "$http_status", "error_code": "$error_code"},
                "count": {"$sum": 1},
            }
        },
    ]
    counts = [CacheCount(**row["_id"], count=row["count"]) for row in cache_collection().aggregate(pipeline)]
    return sorted(counts, key=lambda c: (c.kind, c.http_status, c.error_code or ""))


def move_dataset_responses(old: str, new: str, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Give the entries of dataset `old` to `new` (whose own entries are replaced), each content passed
    through `rewrite`; returns how many moved. Not atomic: a reader may see both names for a moment; when
    `old` has no entry (a move retried), `new`'s are left as they are."""
    old, _, _ = validate_key(old, None, None)
    new, _, _ = validate_key(new, None, None)
    collection = cache_collection()
    # Every content rewritten before anything changes; none to move (a retried move): nothing changes.
    documents = [
        {**document, "dataset": new, "content": rewrite(document["content"])}
        for document in collection.find({"dataset": old}, projection={"_id": False})
    ]
    if not documents:
        return 0
    collection.delete_many({"dataset": new})
    for document in documents:
        collection.replace_one({field: document[field] for field in KEY_FIELDS}, document, upsert=True)
    collection.delete_many({"dataset": old})
    return len(documents)

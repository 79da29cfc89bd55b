"""The MongoDB cache of precomputed responses: collection `cachedResponses` in CACHE_MONGO_DATABASE.

One document per (kind, dataset, config, split), where `kind` is the name of the processing step that
computed it. A success stores the step's content with http_status 200; an error stores the error's
details as content, with its error_code and http_status. `failed_runs` counts consecutive errors for
the same dataset revision: a success, or an error at a new revision, starts it again.

Fencing, where the write lands: before its step runs, an attempt *claims* its entry (`claim_entry`, the
entry's `claim`: its job and start fence; a placeholder without a response when the entry is new, which
no reader sees). Its response is written only while that claim is still its own (`Writer`): a newer
attempt of the job, another job of the same entry, a cancel (`release_claims`) or a delete (the document
is gone, and a fenced write never creates one) refuses it, whatever the fences' clocks say.

How many entries share a kind, a status and an error code is kept as they change (common/cache_counts.py):
each write here that changes an entry's status, or deletes it, happens only while the entry still has the
status it read, then adds the change to the counts.

Readers use :func:`get_response`; steps never call this module, the worker stores what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from collections.abc import Collection as Collection_
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import bson
from pydantic import BaseModel, ConfigDict
from pymongo import ASCENDING, DESCENDING
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from common.cache_counts import (
    STATUS_PROJECTION,
    CacheCount,
    EntryStatus,
    delete_counted,
    has_status,
    record_change,
    replace_counted,
    replace_counts,
    status_query,
)
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
RESPONSE = {"http_status": {"$exists": True}}  # an entry with a response: not an attempt's bare claim


@dataclass(frozen=True)
class Writer:
    """Who writes a response: the job, and the start fence of its attempt's claim (None: whichever attempt
    of the job holds the claim, as the reaper writes a crash)."""

    job_id: str
    claim: int | None = None
    take_over: int | None = None  # the claim's fence after the write (the reaper's crash: its own fence)

    def may_write(self) -> dict[str, Any]:
        """An aggregation expression: the entry's claim is this writer's; for a writer of no attempt (the
        reaper's crash), also: the job did not write the entry itself (a job ends once: its own entry is
        its end, and a crash recorded for it later is a ghost's)."""
        same_job = {"$eq": ["$claim.job", self.job_id]}
        if self.claim is None:
            return {"$and": [same_job, {"$ne": [{"$ifNull": ["$job_id", None]}, self.job_id]}]}
        return {"$and": [same_job, {"$eq": ["$claim.fence", self.claim]}]}

    def fields(self) -> dict[str, Any]:
        """What a write by it stamps on the entry besides the response."""
        fields: dict[str, Any] = {"job_id": self.job_id, "job_fence": self.claim}
        if self.take_over is not None:
            fields["claim"] = {"job": self.job_id, "fence": self.take_over}
        return fields


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
    job_id: str | None = None  # the job whose attempt wrote it; None: not written by a job
    job_fence: int | None = None  # that attempt's start fence (None: the reaper wrote its crash)

    @property
    def is_success(self) -> bool:
        return self.http_status == HTTPStatus.OK


def cache_collection() -> Collection[dict[str, Any]]:
    """The `cachedResponses` collection of this process's settings, its indexes created on first use."""
    settings = get_config().cache
    return get_collection(settings.mongo_url, settings.mongo_database, CACHE_COLLECTION, _create_indexes)


def _create_indexes(collection: Collection[dict[str, Any]]) -> None:
    collection.create_index([(field, ASCENDING) for field in KEY_FIELDS], unique=True, name="key")
    collection.create_index([("dataset", ASCENDING), ("kind", ASCENDING)], name="dataset")
    collection.create_index([("kind", ASCENDING), ("http_status", ASCENDING), ("error_code", ASCENDING)], name="status")
    collection.create_index([("updated_at", DESCENDING)], name="updated_at")
    collection.create_index([("claim.job", ASCENDING)], name="claim")


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
    writer: Writer | None = None,
) -> bool:
    """Create or replace the entry of this key; writing the same response twice leaves one entry.

    With a `writer` (a job's attempt, its response stamped with the limiter's `fence` of its end), the
    entry is written only while its claim is the writer's, and never created: False when it is not (a
    newer attempt or job claimed it, a cancel released it, a delete removed it), and nothing changed.

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
        **(writer.fields() if writer is not None else {}),
    }
    # The revision is compared before it is overwritten: both $set stages run in order, atomically.
    same_revision = {"$eq": ["$dataset_git_revision", {"$literal": dataset_git_revision}]}
    runs: Any = {"$cond": [same_revision, {"$add": [{"$ifNull": ["$failed_runs", 0]}, 1]}, 1]} if is_error else 0
    values = {
        **{name: {"$literal": value} for name, value in fields.items()},
        "failed_runs": runs,
        "dataset_git_revision": {"$literal": dataset_git_revision},
    }
    after = EntryStatus(kind, int(http_status), error_code)
    collection = cache_collection()
    for attempt in range(UPSERT_ATTEMPTS):
        before = EntryStatus.of(collection.find_one(key, projection=STATUS_PROJECTION))
        # The claim and the status read are compared inside the document, not in the query: the query stays
        # an exact match on the key index (a condition on `fence` there made SecantusDB scan the collection:
        # 37 ms at 2,000 entries). The status read is the one whose count the write moves.
        may_write = has_status(before) if writer is None else {"$and": [writer.may_write(), has_status(before)]}
        pipeline: list[dict[str, Any]] = [
            {"$set": {WRITE_FLAG: may_write}},
            {"$set": {name: {"$cond": [f"${WRITE_FLAG}", value, f"${name}"]} for name, value in values.items()}},
            {"$unset": WRITE_FLAG},
        ]
        try:
            # Created only when none was read (an entry deleted since it was read is read again).
            result = collection.update_one(key, pipeline, upsert=writer is None and before is None)
        except DuplicateKeyError:
            # Two first writers of one key raced: the loser retries as an update of the winner's entry.
            if attempt == UPSERT_ATTEMPTS - 1:
                raise
            continue
        if result.upserted_id is not None or result.modified_count == 1:
            record_change(before, after)
            return True
        if writer is not None and (
            result.matched_count == 0
            or EntryStatus.of(collection.find_one(key, projection=STATUS_PROJECTION)) == before
        ):
            return False  # no entry, or its claim is not the writer's
        # Another write changed or deleted the entry since it was read: read it again.
    return False  # it changed under each attempt: taken as refused


@retry_transient
def claim_entry(
    kind: str, dataset: str, config: str | None, split: str | None, writer: Writer, create: bool = True
) -> bool:
    """Before an attempt's step runs: make the entry's claim this attempt's (a placeholder when the entry
    is new), unless a newer attempt of the same job claimed it; True when the claim is the writer's. Safe
    to repeat. Another job's claim is replaced: only the attempt holding its lease gets this far (a stale
    one stops at its next check and never writes), and a claim taken away from a live attempt is taken
    back by it before it writes (see `Lifecycle`), `create=False`: only on an entry that is there."""
    assert writer.claim is not None
    key = _key(kind, dataset, config, split)
    mine = {"job": writer.job_id, "fence": writer.claim}
    newer_of_same_job = {
        "$and": [{"$eq": ["$claim.job", writer.job_id]}, {"$gt": [{"$ifNull": ["$claim.fence", -1]}, writer.claim]}]
    }
    stage = {"$set": {"claim": {"$cond": [newer_of_same_job, "$claim", {"$literal": mine}]}}}
    # The stage can only change the claim to this writer's: an entry created or changed is claimed. One
    # that did not change is read back (claimed by this writer already, or by a newer attempt).
    for attempt in range(UPSERT_ATTEMPTS):
        try:
            result = cache_collection().update_one(key, [stage], upsert=create)
        except DuplicateKeyError:
            if attempt == UPSERT_ATTEMPTS - 1:
                raise
            continue
        if result.upserted_id is not None or result.modified_count == 1:
            return True
        break
    document = cache_collection().find_one(key, projection={"claim": True})
    return document is not None and document.get("claim") == mine


@retry_transient
def release_claims(job_ids: Iterable[str], before: int | None = None) -> None:
    """The attempts of these jobs (those that started before the fence `before`, when given: a later
    attempt keeps its claim) write nothing from now on: their claims are released, their placeholders
    removed (an entry with a response keeps it)."""
    ids = list(job_ids)
    if not ids:
        return
    claimed: dict[str, Any] = {"claim.job": {"$in": ids}}
    if before is not None:
        claimed["claim.fence"] = {"$lt": before}
    collection = cache_collection()
    collection.delete_many({**claimed, "http_status": {"$exists": False}})
    collection.update_many(claimed, {"$unset": {"claim": ""}})


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
    writer: Writer | None = None,
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
        writer=writer,
    )


@retry_transient
def update_progress(
    kind: str, dataset: str, config: str | None, split: str | None, progress: float, writer: Writer
) -> bool:
    """Set the progress (0..1) of an existing entry while its claim is the running attempt's; False when
    there is no entry with a response."""
    key = _key(kind, dataset, config, split)
    value = min(1.0, max(0.0, progress))
    progress_stage = {"$set": {"progress": {"$cond": [writer.may_write(), value, "$progress"]}}}
    return cache_collection().update_one({**key, **RESPONSE}, [progress_stage]).matched_count == 1


@retry_transient
def get_response(kind: str, dataset: str, config: str | None = None, split: str | None = None) -> CachedResponse:
    """The entry of this key, or CachedResponseNotFoundError."""
    key = _key(kind, dataset, config, split)
    # By key alone, the response checked here: SecantusDB scans the collection for an `$exists` filter.
    document = cache_collection().find_one(key, projection={"_id": False, "claim": False})
    if document is None or "http_status" not in document:
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
    query |= RESPONSE
    projection = {"_id": False, "claim": False} if with_content else {"_id": False, "claim": False, "content": False}
    entries = [
        CachedResponse.model_validate(document if with_content else {**document, "content": {}})
        for document in cache_collection().find(query, projection=projection)
    ]
    return sorted(entries, key=lambda entry: (entry.kind, entry.config or "", entry.split or ""))


@retry_transient
def delete_response(kind: str, dataset: str, config: str | None = None, split: str | None = None) -> bool:
    """Delete the entry of this key (a bare claim too); False when there was none."""
    key = _key(kind, dataset, config, split)
    collection = cache_collection()
    for _ in range(UPSERT_ATTEMPTS):
        document = collection.find_one(key, projection=STATUS_PROJECTION)
        if document is None:
            return False
        status = EntryStatus.of(document)
        # Only while it has the status read (else read it again): the count of that status loses one.
        if collection.delete_one({"_id": document["_id"], **status_query(status)}).deleted_count == 1:
            record_change(status, None)
            return True
    return False  # its status changed under each attempt: left to the writer


@retry_transient
def delete_dataset_responses(dataset: str) -> int:
    """Delete every entry of the dataset (and only its entries); returns how many were deleted."""
    dataset, _, _ = validate_key(dataset, None, None)
    return delete_counted(cache_collection(), {"dataset": dataset})


@retry_transient
def dataset_names() -> list[str]:
    """Every dataset that has an entry (one pass over the cache: for an operator's command)."""
    return sorted(str(name) for name in cache_collection().distinct("dataset"))


@retry_transient
def count_by_status(kind: str | None = None) -> list[CacheCount]:
    """How many entries per (kind, http_status, error_code), optionally for one kind, counted now: one pass
    over the cache (the kept counts, common.cache_counts.kept_counts, cost one read of a small collection)."""
    match: dict[str, Any] = dict(RESPONSE) if kind is None else {"kind": kind, **RESPONSE}
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


def recount_entries() -> list[CacheCount]:
    """Count the cache again and keep what was found (common/cache_counts.py: the repair of counts a crash
    left off); returns the counts. One pass over the cache: each worker runs it once when it starts."""
    counts = count_by_status()
    replace_counts(counts)
    return counts


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
        for document in collection.find({"dataset": old, **RESPONSE}, projection={"_id": False, "claim": False})
    ]
    if not documents:
        return 0
    delete_counted(collection, {"dataset": new})
    for document in documents:
        replace_counted(collection, {field: document[field] for field in KEY_FIELDS}, document)
    delete_counted(collection, {"dataset": old})
    return len(documents)

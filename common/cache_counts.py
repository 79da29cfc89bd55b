"""How many cache entries share a kind, an http_status and an error_code, kept as the entries change:
collection `cacheCounts` in CACHE_MONGO_DATABASE, one document per (kind, http_status, error_code).

A scrape reads these few documents instead of counting the cache. Each write of common/cache.py that
gives an entry its first response, changes its status or error code, or deletes it, first makes sure
the entry still has the status it read (the write is conditional on it), then adds the change here with
`$inc` (one round trip); :func:`delete_counted` and :func:`replace_counted` are such writes for a
dataset's deletion and renaming. An entry without a response (an attempt's bare claim) is not counted.

The counts are exact while every writer lives. The change is added after the entry's write, not with
it: a process that dies between the two, or a write retried after its answer was lost, leaves a count
off by that entry. :func:`common.cache.recount_entries` repairs them (one pass over the cache): every
worker runs it once when it starts, and `python -m tasks cache-counts --recount` on demand. A write that
lands while a recount runs may be counted twice or not at all; the next recount fixes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pymongo import ASCENDING, DeleteOne, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from common.config import get_config
from common.constants import CACHE_COUNTS_COLLECTION
from common.mongo import get_collection
from common.resilience import retry_transient

STATUS_FIELDS = ("kind", "http_status", "error_code")
STATUS_PROJECTION = dict.fromkeys(STATUS_FIELDS, True)  # what a write reads of an entry before it
ATTEMPTS = 3  # reads of an entry's status before a write gives up on an entry that keeps changing


class CacheCount(BaseModel):
    """How many entries share a kind, an http_status and an error_code."""

    kind: str
    http_status: int
    error_code: str | None
    count: int


@dataclass(frozen=True)
class EntryStatus:
    """What an entry with a response is counted under."""

    kind: str
    http_status: int
    error_code: str | None

    @classmethod
    def of(cls, document: Mapping[str, Any] | None) -> EntryStatus | None:
        """The status of a cache document; None when there is no document or it has no response."""
        if document is None or document.get("http_status") is None:
            return None
        return cls(document["kind"], int(document["http_status"]), document.get("error_code"))

    def query(self) -> dict[str, Any]:
        return {"kind": self.kind, "http_status": self.http_status, "error_code": self.error_code}


def status_query(status: EntryStatus | None) -> dict[str, Any]:
    """A query condition (beside the entry's kind): the entry has this status (None: no response)."""
    if status is None:
        return {"http_status": {"$exists": False}}
    return {"http_status": status.http_status, "error_code": status.error_code}


def has_status(status: EntryStatus | None) -> dict[str, Any]:
    """An aggregation expression (beside the entry's kind): the entry has this status (None: no response,
    as a document an upsert is creating)."""
    if status is None:
        return {"$eq": [{"$ifNull": ["$http_status", None]}, None]}
    return {
        "$and": [
            {"$eq": ["$http_status", {"$literal": status.http_status}]},
            {"$eq": [{"$ifNull": ["$error_code", None]}, {"$literal": status.error_code}]},
        ]
    }


def counts_collection() -> Collection[dict[str, Any]]:
    settings = get_config().cache
    return get_collection(settings.mongo_url, settings.mongo_database, CACHE_COUNTS_COLLECTION, _create_indexes)


def _create_indexes(collection: Collection[dict[str, Any]]) -> None:
    collection.create_index([(field, ASCENDING) for field in STATUS_FIELDS], unique=True, name="status")


def record_change(before: EntryStatus | None, after: EntryStatus | None) -> None:
    """One entry went from `before` to `after` (None: no entry, or no response)."""
    if before == after:
        return
    changes: Counter[EntryStatus] = Counter()
    if before is not None:
        changes[before] -= 1
    if after is not None:
        changes[after] += 1
    add(changes)


@retry_transient
def add(changes: Mapping[EntryStatus, int]) -> None:
    """Add these numbers of entries to the counts of their statuses, in one round trip."""
    operations = [
        UpdateOne(status.query(), {"$inc": {"count": change}}, upsert=True)
        for status, change in changes.items()
        if change
    ]
    if operations:
        counts_collection().bulk_write(operations, ordered=False)


@retry_transient
def kept_counts() -> list[CacheCount]:
    """The counts as kept (one read of a collection as small as the statuses in use); none at zero."""
    documents = counts_collection().find({}, projection={"_id": False})
    counts = [CacheCount.model_validate(document) for document in documents if document.get("count", 0) > 0]
    return sorted(counts, key=lambda c: (c.kind, c.http_status, c.error_code or ""))


@retry_transient
def replace_counts(counts: Iterable[CacheCount]) -> None:
    """Make the kept counts these, and only these (what a count of the whole cache found)."""
    wanted = {EntryStatus(c.kind, c.http_status, c.error_code): c.count for c in counts}
    collection = counts_collection()
    kept = list(collection.find({}, projection={"count": False}))
    operations: list[UpdateOne | DeleteOne] = [
        DeleteOne({"_id": document["_id"]}) for document in kept if EntryStatus.of(document) not in wanted
    ]
    operations += [UpdateOne(status.query(), {"$set": {"count": n}}, upsert=True) for status, n in wanted.items()]
    if operations:
        collection.bulk_write(operations, ordered=False)


def delete_counted(collection: Collection[dict[str, Any]], query: dict[str, Any]) -> int:
    """Delete the cache entries `query` finds (on an index), one (kind, status) at a time so that each count
    loses exactly what was deleted (an entry whose status changed meanwhile goes in the next round);
    returns how many were deleted."""
    deleted: Counter[EntryStatus | None] = Counter()
    group = {"_id": {"kind": "$kind", "http_status": "$http_status", "error_code": "$error_code"}}
    try:
        for _ in range(ATTEMPTS):
            found = [row["_id"] for row in collection.aggregate([{"$match": query}, {"$group": group}])]
            if not found:
                break
            for row in found:
                status = EntryStatus.of(row)
                condition = {**query, "kind": row["kind"], **status_query(status)}
                deleted[status] += collection.delete_many(condition).deleted_count
    finally:  # what was deleted is counted, even when a later step fails
        add({status: -n for status, n in deleted.items() if status is not None})
    return deleted.total()


def replace_counted(collection: Collection[dict[str, Any]], key: dict[str, Any], document: dict[str, Any]) -> None:
    """Make `document` the cache entry of `key`, only while the entry has the status read (else read it
    again), and move its count."""
    for attempt in range(ATTEMPTS):
        current = collection.find_one(key, projection=STATUS_PROJECTION)
        if current is None:
            try:
                collection.insert_one(dict(document))
            except DuplicateKeyError:
                if attempt == ATTEMPTS - 1:
                    raise
                continue
            record_change(None, EntryStatus.of(document))
            return
        before = EntryStatus.of(current)
        if collection.replace_one({"_id": current["_id"], **status_query(before)}, document).matched_count == 1:
            record_change(before, EntryStatus.of(document))
            return
    # Its status changed under each attempt: the entry a newer write left stays.

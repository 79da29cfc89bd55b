"""The job ledger: collection `jobs` in QUEUE_MONGO_DATABASE, the durable record of every job.

Redis holds the fast path (waiting rooms, leases, dedupe) and decides; the ledger follows it, a bounded
lag behind (common/queue/journal.py), and is what survives Redis losing its data. Every transition
(waiting -> queued -> started -> success | error | cancelled, and back to waiting when a lease expires) is
a journal entry of the limiter's, with its fence: it is written only if the job has not ended and no newer
decision was recorded, so a late, repeated or stale writer never moves a job back.

A success or an error leaves its effects pending (`effects_pending`: its next steps, its events) until
the journal says they are applied; the entries of the children it enqueued come before that one in the
journal, so a job whose effects the ledger calls applied has its children in the ledger too. A repair
gives Redis back the ends whose effects are still pending (common/queue/queue.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, InsertOne, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from common.config import get_config
from common.constants import JOBS_COLLECTION
from common.mongo import get_collection
from common.queue.jobs import PENDING_STATUSES, TERMINAL_STATUSES, Job, JobPayload, JobStatus
from common.resilience import retry_transient

DUPLICATE_KEY = 11000
CREATED = "created"  # a journal entry's status when it admits the job (scripts/admit.lua)
PENDING = frozenset(PENDING_STATUSES)
MAY_WRITE = "_stepcache_write"  # set and unset within one update: whether it may apply
APPLIED = "applied"  # a journal entry's status when the effects of its end are applied (scripts/applied.lua)


def jobs_collection() -> Collection[dict[str, Any]]:
    """The `jobs` collection of this process's settings, its indexes created on first use."""
    settings = get_config().queue
    return get_collection(settings.mongo_url, settings.mongo_database, JOBS_COLLECTION, _create_indexes)


def _create_indexes(collection: Collection[dict[str, Any]]) -> None:
    collection.create_index([("unicity_id", ASCENDING), ("status", ASCENDING)], name="unicity")
    collection.create_index([("dataset", ASCENDING), ("status", ASCENDING)], name="dataset")
    collection.create_index([("status", ASCENDING), ("namespace", ASCENDING)], name="status")
    collection.create_index([("status", ASCENDING), ("created_at", ASCENDING)], name="created")
    collection.create_index([("effects_pending", ASCENDING)], name="effects_pending")


@dataclass(frozen=True)
class JournalEntry:
    """One transition of a job, as a limiter script decided it (at: the Redis clock); status None: the
    effects of its end are applied."""

    status: JobStatus | None
    fence: int
    at: datetime
    payload: JobPayload
    attempt: int
    token: str | None
    worker: str | None
    error_code: str | None
    revision: str | None
    created: bool  # the job's admission (status waiting)

    @classmethod
    def parse(cls, raw: bytes | str) -> JournalEntry:
        status, fence, at, job_id, attempt, token, worker, code, revision, payload = json.loads(raw)
        return cls(
            None if status == APPLIED else JobStatus.WAITING if status == CREATED else JobStatus(status),
            int(fence),
            datetime.fromtimestamp(int(at) / 1000, UTC),
            JobPayload.from_compact(job_id, payload),
            int(attempt),
            token or None,
            worker or None,
            code or None,
            revision or None,
            status == CREATED,
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _fields(entry: JournalEntry) -> dict[str, Any]:
    """What a transition sets."""
    if entry.status is None:
        return {"effects_pending": False}
    fields: dict[str, Any] = {"status": entry.status, "fence": entry.fence}
    if entry.status == JobStatus.QUEUED:
        fields["queued_at"] = entry.at
    elif entry.status == JobStatus.STARTED:
        fields |= {"started_at": entry.at, "last_heartbeat": entry.at, "lease_token": entry.token}
        fields |= {"attempts": entry.attempt, "worker": entry.worker}
    elif entry.status.is_terminal:
        fields |= {"finished_at": entry.at, "error_code": entry.error_code}
        fields["effects_pending"] = entry.status != JobStatus.CANCELLED
    return fields


class _JobWrite:
    """A job's entries of one write, folded into one operation: the fields they set, in fence order (as
    applying them one by one would leave them), under the newest fence."""

    def __init__(self, entries: list[JournalEntry]) -> None:
        entries = sorted(entries, key=lambda entry: (entry.fence, entry.status is None))  # an end, then "applied"
        self.job_id = entries[0].payload.job_id
        self.fence = entries[-1].fence
        self.effects_only = all(entry.status is None for entry in entries)
        self.applied_fence = max((entry.fence for entry in entries if entry.status is None), default=0)
        # A start is taken over another start only after a requeue or a dispatch newer than the recorded
        # one: a Redis that rolled back confirms again a message whose job started already, and that
        # second start must not replace the first (common/lifecycle.py reads back which start it took).
        starts = [entry.fence for entry in entries if entry.status == JobStatus.STARTED]
        self.start = max(starts, default=0)
        self.requeue = max(
            (entry.fence for entry in entries if entry.status in PENDING and entry.fence < self.start), default=0
        )
        self.fields: dict[str, Any] = {}
        for entry in entries:
            self.fields |= _fields(entry)
        first = next((entry for entry in entries if entry.created), entries[0])
        self.created = first.created
        self.job = first.payload.model_dump(exclude={"job_id", "rank"}) | {
            "created_at": first.at,
            "revision": first.revision,
            "age": first.fence if first.created else None,
        }

    def insert(self) -> InsertOne[dict[str, Any]]:
        """Its creation is among the entries: a plain insert (refused if another writer created it)."""
        return InsertOne({"_id": self.job_id, **self.job, **self.fields})

    def creation(self) -> UpdateOne:
        """The facts of its creation, which never change, when a later entry created the document first
        (a start written at once); and when it was queued, if the update could not say it (the newest)."""
        update: dict[str, Any] = {"$set": {name: self.job[name] for name in ("created_at", "revision", "age")}}
        if "queued_at" in self.fields:
            update["$max"] = {"queued_at": self.fields["queued_at"]}
        return UpdateOne({"_id": self.job_id}, update)

    def applied(self) -> UpdateOne:
        """The end's effects applied, on the end it follows (its fence), whatever the status."""
        return UpdateOne({"_id": self.job_id, "fence": self.applied_fence}, {"$set": {"effects_pending": False}})

    def update(self) -> UpdateOne:
        """Only if the job has not ended and no newer decision was recorded; created if not there yet
        (an upsert that finds its _id taken means "older": refused). Only "applied": on the end it follows
        (its fence), whatever the status. With a start among the entries, the condition is checked inside
        the document (a pipeline): a query with `$or` makes SecantusDB scan the collection."""
        if self.effects_only:
            return self.applied()
        if self.start:
            return UpdateOne({"_id": self.job_id}, self.pipeline(), upsert=True)
        condition = {"_id": self.job_id, "status": {"$nin": list(TERMINAL_STATUSES)}, "fence": {"$lt": self.fence}}
        return UpdateOne(condition, {"$set": self.fields, "$setOnInsert": self.job}, upsert=True)

    def pipeline(self) -> list[dict[str, Any]]:
        """The update as stages: whether it may apply (not ended, older, and not a start over another start
        without a requeue between them), then each field set only if so; the creation's facts if absent."""
        status, fence = {"$ifNull": ["$status", None]}, {"$ifNull": ["$fence", -1]}
        may = {
            "$and": [
                *({"$ne": [status, ended.value]} for ended in TERMINAL_STATUSES),
                {"$lt": [fence, self.fence]},
                {
                    "$or": [
                        {"$ne": [status, JobStatus.STARTED.value]},
                        {"$gte": [fence, self.start]},  # this start, recorded already
                        {"$lt": [fence, self.requeue]},  # started before the requeue among these entries
                    ]
                },
            ]
        }
        fields = {
            name: {"$cond": [f"${MAY_WRITE}", {"$literal": value}, f"${name}"]} for name, value in self.fields.items()
        }
        # The creation's facts only with the write: a refused write changes nothing (`record_start` reads
        # "modified" as "taken").
        facts = {
            name: {"$cond": [f"${MAY_WRITE}", {"$ifNull": [f"${name}", {"$literal": value}]}, f"${name}"]}
            for name, value in self.job.items()
        }
        return [{"$set": {MAY_WRITE: may}}, {"$set": {**fields, **facts}}, {"$unset": MAY_WRITE}]


def _job(document: dict[str, Any]) -> Job:
    return Job.model_validate({**document, "job_id": document["_id"]})


class Ledger:
    """Reads and conditional transitions of the `jobs` collection."""

    def __init__(self, collection: Collection[dict[str, Any]] | None = None) -> None:
        self.collection = collection if collection is not None else jobs_collection()

    @retry_transient
    def get(self, job_id: str) -> Job | None:
        document = self.collection.find_one({"_id": job_id})
        return None if document is None else _job(document)

    @retry_transient
    def write(self, entries: Sequence[JournalEntry]) -> None:
        """Apply journal entries in bulk, one operation per job: its entries folded, written only if the
        job has not ended and no newer decision was recorded (the limiter's fences only grow), so entries
        written late, twice or out of order never move a job back. A job created among the entries is
        inserted; if another writer inserted it first, it is updated as the others are."""
        by_job: dict[str, list[JournalEntry]] = {}
        for entry in entries:
            by_job.setdefault(entry.payload.job_id, []).append(entry)
        writes = [_JobWrite(job_entries) for job_entries in by_job.values()]
        # An end folded with its "applied" is refused whole where another writer wrote the end first (two
        # processes reading one journal at once): "applied" goes alone too, after the writes (its index). A
        # creation's insert holds it already, and one refused is retried below, with it: none for them (an
        # update beside a bulk of inserts is a command of its own).
        applied = [
            write.applied() for write in writes if write.applied_fence and not (write.effects_only or write.created)
        ]
        refused = self._bulk([*(write.insert() if write.created else write.update() for write in writes), *applied])
        again = [writes[index] for index in refused if index < len(writes) and writes[index].created]
        operations = [operation for write in again for operation in (write.update(), write.creation())]
        self._bulk([*operations, *(write.applied() for write in again if write.applied_fence)])

    @retry_transient
    def record_start(self, entry: JournalEntry) -> bool:
        """Write one start at once (before its step runs), as `write` would; True when the ledger took it,
        False when it refused it (the job ended, or another start is recorded and no requeue came between
        them: the journal's entries before it say, see `_JobWrite`). A write that created or changed the
        document took it (a refused one changes nothing, and a taken one moves its fence); one that changed
        nothing is read back (this start, recorded already, or refused)."""
        write = _JobWrite([entry])
        result = self.collection.update_one({"_id": write.job_id}, write.pipeline(), upsert=True)
        if result.upserted_id is not None or result.modified_count == 1:
            return True
        recorded = self.get(write.job_id)
        return recorded is not None and recorded.status == JobStatus.STARTED and recorded.fence == entry.fence

    def _bulk(self, operations: Sequence[InsertOne[dict[str, Any]] | UpdateOne]) -> list[int]:
        """One unordered bulk write; the indexes of the operations refused for a duplicate _id."""
        if not operations:
            return []
        try:
            self.collection.bulk_write(list(operations), ordered=False)
        except BulkWriteError as error:
            failures = error.details.get("writeErrors", [])
            if any(failure.get("code") != DUPLICATE_KEY for failure in failures):
                raise
            return [failure["index"] for failure in failures]
        return []

    @retry_transient
    def heartbeat(self, job_id: str, token: str) -> bool:
        result = self.collection.update_one(
            {"_id": job_id, "status": JobStatus.STARTED, "lease_token": token}, {"$set": {"last_heartbeat": _now()}}
        )
        return result.modified_count == 1

    @retry_transient
    def jobs_by_id(self, job_ids: Iterable[str]) -> list[Job]:
        return [_job(document) for document in self.collection.find({"_id": {"$in": list(job_ids)}})]

    @retry_transient
    def jobs(self, dataset: str | None = None, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
        """Jobs of a dataset (or of every dataset), optionally only in these statuses, oldest first."""
        query: dict[str, Any] = {}
        if dataset is not None:
            query["dataset"] = dataset
        if statuses is not None:
            query["status"] = {"$in": list(statuses)}
        return sorted((_job(d) for d in self.collection.find(query)), key=lambda job: job.created_at)

    @retry_transient
    def in_process(self, dataset: str) -> list[Job]:
        """Jobs of the dataset waiting, queued or started, or ended with the effects of their end (their next
        steps) not applied yet, oldest first: what is still to change the dataset's cache entries. One query,
        so that a job passing from one to the other (its end, then its children) is seen in either; without
        `$or`, which makes SecantusDB scan the collection (200 ms at 20,000 jobs, 1 ms without): an unfinished
        job has no `effects_pending` yet (an end written before the field existed has none either: left out
        here)."""
        documents = self.collection.find({"dataset": dataset, "effects_pending": {"$ne": False}})
        jobs = [
            _job(document)
            for document in documents
            if document.get("effects_pending") is True or document["status"] not in TERMINAL_STATUSES
        ]
        return sorted(jobs, key=lambda job: job.created_at)

    @retry_transient
    def latest(self, unicity_id: str) -> Job | None:
        """The newest job of a key (by its unicity id), whatever its status."""
        jobs = [_job(document) for document in self.collection.find({"unicity_id": unicity_id})]
        return max(jobs, key=lambda job: job.created_at, default=None)

    @retry_transient
    def served_since(self, unicity_ids: Sequence[str], since: datetime) -> set[str]:
        """The unicity ids with a job waiting or queued now, or started at `since` or after."""
        query = {
            "unicity_id": {"$in": list(unicity_ids)},
            "$or": [{"status": {"$in": list(PENDING)}}, {"started_at": {"$gte": since}}],
        }
        return {document["unicity_id"] for document in self.collection.find(query, {"unicity_id": True})}

    @retry_transient
    def effects_pending(self) -> list[Job]:
        """Ended jobs whose effects (next steps, events) the journal has not called applied yet."""
        return [_job(document) for document in self.collection.find({"effects_pending": True})]

    def unfinished(self) -> list[Job]:
        """Jobs not ended yet, the started ones first."""
        jobs = self.jobs(statuses=(JobStatus.WAITING, JobStatus.QUEUED, JobStatus.STARTED))
        return sorted(jobs, key=lambda job: job.status != JobStatus.STARTED)

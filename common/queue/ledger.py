"""The job ledger: collection `jobs` in QUEUE_MONGO_DATABASE, the durable record of every job.

Redis holds the fast path (waiting rooms, leases); the ledger is what survives Redis losing its data.
Every transition (waiting -> queued -> started -> success | error | cancelled, and back to waiting when a
lease expires) applies a decision of the limiter and carries its fence: it happens only if the job has
not ended and no newer decision was recorded, so a late, repeated or stale writer never moves a job back.

Dedupe: a pending job (waiting or queued) holds `pending_key`, its unicity id, under a unique partial
index, so two identical pending jobs cannot exist; the first writer wins and later ones get its id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from common.config import get_config
from common.constants import JOBS_COLLECTION
from common.mongo import get_collection
from common.queue.jobs import TERMINAL_STATUSES, Job, JobStatus
from common.resilience import retry_transient

CREATE_ATTEMPTS = 5
DUPLICATE_KEY = 11000


def jobs_collection() -> Collection[dict[str, Any]]:
    """The `jobs` collection of this process's settings, its indexes created on first use."""
    settings = get_config().queue
    return get_collection(settings.mongo_url, settings.mongo_database, JOBS_COLLECTION, _create_indexes)


def _create_indexes(collection: Collection[dict[str, Any]]) -> None:
    # A pending job holds its unicity id here: two identical pending jobs cannot exist.
    collection.create_index(
        "pending_key", unique=True, name="pending", partialFilterExpression={"pending_key": {"$type": "string"}}
    )
    collection.create_index([("unicity_id", ASCENDING), ("status", ASCENDING)], name="unicity")
    collection.create_index([("dataset", ASCENDING), ("status", ASCENDING)], name="dataset")
    collection.create_index([("status", ASCENDING), ("namespace", ASCENDING)], name="status")
    collection.create_index([("status", ASCENDING), ("created_at", ASCENDING)], name="created")


def _now() -> datetime:
    return datetime.now(UTC)


def _job(document: dict[str, Any]) -> Job:
    return Job.model_validate({**document, "job_id": document["_id"]})


class Ledger:
    """Reads and conditional transitions of the `jobs` collection."""

    def __init__(self, collection: Collection[dict[str, Any]] | None = None) -> None:
        self.collection = collection if collection is not None else jobs_collection()

    @retry_transient
    def create(self, job: Job) -> tuple[Job, bool]:
        """Record a new waiting job, or return the identical pending job and False."""
        document = job.model_dump(exclude={"job_id"}) | {"_id": job.job_id, "pending_key": job.unicity_id}
        for _ in range(CREATE_ATTEMPTS):
            try:
                self.collection.insert_one(document)
                return job, True
            except DuplicateKeyError:
                if self.collection.find_one({"_id": job.job_id}, {"_id": True}) is not None:
                    return job, True  # our own insert, whose answer was lost and which was retried
                existing = self.collection.find_one({"pending_key": job.unicity_id})
                if existing is not None:
                    return _job(existing), False
                # The identical job started between our insert and our read: try again.
        raise RuntimeError(f"could not record job {job.job_id}: its twin keeps changing state")

    def create_many(self, jobs: Sequence[Job]) -> list[tuple[Job, bool]]:
        """`create` for many jobs in one bulk insert: each job, or the identical pending job and False."""
        documents = [
            job.model_dump(exclude={"job_id"}) | {"_id": job.job_id, "pending_key": job.unicity_id} for job in jobs
        ]
        try:
            self._insert_many(documents)
            return [(job, True) for job in jobs]
        except BulkWriteError as error:
            refused = {failure["index"] for failure in error.details.get("writeErrors", [])}
            if any(failure.get("code") != DUPLICATE_KEY for failure in error.details.get("writeErrors", [])):
                raise
        # The refused ones have a pending twin (or were ours, inserted by an attempt whose answer was lost):
        # settled one by one, as `create` does.
        return [(job, True) if index not in refused else self.create(job) for index, job in enumerate(jobs)]

    @retry_transient
    def _insert_many(self, documents: list[dict[str, Any]]) -> None:
        self.collection.insert_many(documents, ordered=False)

    @retry_transient
    def get(self, job_id: str) -> Job | None:
        document = self.collection.find_one({"_id": job_id})
        return None if document is None else _job(document)

    def mark_queued(self, job_id: str, fence: int, unicity_id: str) -> bool:
        return self._move(job_id, fence, JobStatus.QUEUED, {"queued_at": _now()}, pending=unicity_id)

    def mark_waiting(self, job_id: str, fence: int, unicity_id: str) -> bool:
        """A job whose lease expired waits again (pending again, unless its twin is)."""
        return self._move(job_id, fence, JobStatus.WAITING, {}, pending=unicity_id)

    def mark_started(self, job_id: str, fence: int, token: str, attempt: int, worker: str) -> bool:
        now = _now()
        fields = {"started_at": now, "last_heartbeat": now, "lease_token": token, "attempts": attempt, "worker": worker}
        return self._move(job_id, fence, JobStatus.STARTED, fields, pending=None)

    def end(self, job_id: str, fence: int, status: JobStatus, error_code: str | None = None) -> bool:
        """Record the job's end, decided under this fence; False when it had ended already."""
        if not status.is_terminal:
            raise ValueError(f"{status} is not a terminal status")
        return self._move(job_id, fence, status, {"finished_at": _now(), "error_code": error_code}, pending=None)

    @retry_transient
    def _move(self, job_id: str, fence: int, status: JobStatus, fields: dict[str, Any], pending: str | None) -> bool:
        """Move the job to `status` if it has not ended and no newer decision was recorded: the limiter's
        fences only grow, so records applied late, twice or out of order never move a job backwards.
        A pending status (waiting, queued) holds the job's unicity id `pending` for dedupe."""
        query = {"_id": job_id, "status": {"$nin": list(TERMINAL_STATUSES)}, "fence": {"$lt": fence}}
        values = {**fields, "status": status, "fence": fence}
        if pending is None:
            update: Any = [{"$set": {k: {"$literal": v} for k, v in values.items()}}, {"$unset": "pending_key"}]
            return self.collection.update_one(query, update).modified_count == 1
        try:
            result = self.collection.update_one(query, {"$set": {**values, "pending_key": pending}})
        except DuplicateKeyError:  # its identical twin is pending: dedupe goes to that one
            result = self.collection.update_one(query, {"$set": values})
        return result.modified_count == 1

    @retry_transient
    def heartbeat(self, job_id: str, token: str) -> bool:
        result = self.collection.update_one(
            {"_id": job_id, "status": JobStatus.STARTED, "lease_token": token}, {"$set": {"last_heartbeat": _now()}}
        )
        return result.modified_count == 1

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
    def created_waiting(self, since: datetime, until: datetime, limit: int = 0) -> list[Job]:
        """Jobs created in [since, until] that are still waiting, oldest first (at most `limit` of them)."""
        query = {"status": JobStatus.WAITING, "created_at": {"$gte": since, "$lte": until}}
        return [_job(document) for document in self.collection.find(query).sort("created_at", 1).limit(limit)]

    def unfinished(self) -> list[Job]:
        """Jobs not ended yet, the started ones first."""
        jobs = self.jobs(statuses=(JobStatus.WAITING, JobStatus.QUEUED, JobStatus.STARTED))
        return sorted(jobs, key=lambda job: job.status != JobStatus.STARTED)

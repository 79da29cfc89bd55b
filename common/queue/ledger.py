"""The job ledger: collection `jobs` in QUEUE_MONGO_DATABASE, the durable record of every job.

Redis holds the fast path (waiting rooms, leases); the ledger is what survives Redis losing its data.
Every transition is conditional on the status it leaves (waiting -> queued -> started -> success |
error, any non-terminal -> cancelled), so a late or repeated writer never moves a job backwards.

Dedupe: a pending job (waiting or queued) holds `pending_key`, its unicity id, under a unique partial
index, so two identical pending jobs cannot exist; the first writer wins and later ones get its id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from common.config import get_config
from common.constants import JOBS_COLLECTION
from common.mongo import get_collection
from common.queue.jobs import TERMINAL_STATUSES, Job, JobStatus
from common.resilience import retry_transient

CREATE_ATTEMPTS = 5


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

    @retry_transient
    def get(self, job_id: str) -> Job | None:
        document = self.collection.find_one({"_id": job_id})
        return None if document is None else _job(document)

    @retry_transient
    def mark_queued(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.collection.update_many(
                {"_id": {"$in": list(job_ids)}, "status": JobStatus.WAITING},
                {"$set": {"status": JobStatus.QUEUED, "queued_at": _now()}},
            )

    @retry_transient
    def mark_waiting(self, expired: Sequence[tuple[str, str]]) -> None:
        """Jobs whose lease expired go back to waiting (pending again unless a twin is), unless a newer
        attempt already started: only a queued job, or one started under the expired token, moves."""
        for job_id, token in expired:
            document = self.collection.find_one({"_id": job_id}, {"unicity_id": True})
            if document is None:
                continue
            query = {
                "_id": job_id,
                "$or": [{"status": JobStatus.QUEUED}, {"status": JobStatus.STARTED, "lease_token": token}],
            }
            try:
                self.collection.update_one(
                    query, {"$set": {"status": JobStatus.WAITING, "pending_key": document["unicity_id"]}}
                )
            except DuplicateKeyError:
                self.collection.update_one(query, {"$set": {"status": JobStatus.WAITING}})

    @retry_transient
    def mark_started(self, job_id: str, token: str, attempt: int, worker: str) -> bool:
        now = _now()
        # Any status but an end: the Redis lease just confirmed is the fence, and a ledger that lags
        # (a requeue not recorded yet) must not lose the job.
        result = self.collection.update_one(
            {"_id": job_id, "status": {"$nin": list(TERMINAL_STATUSES)}},
            [
                {
                    "$set": {
                        "status": JobStatus.STARTED,
                        "queued_at": {"$ifNull": ["$queued_at", now]},
                        "started_at": now,
                        "last_heartbeat": now,
                        "lease_token": token,
                        "attempts": attempt,
                        "worker": worker,
                    }
                },
                {"$unset": "pending_key"},
            ],
        )
        return result.matched_count == 1

    @retry_transient
    def heartbeat(self, job_id: str) -> bool:
        result = self.collection.update_one(
            {"_id": job_id, "status": JobStatus.STARTED}, {"$set": {"last_heartbeat": _now()}}
        )
        return result.modified_count == 1

    @retry_transient
    def finish(self, job_id: str, token: str, status: JobStatus, error_code: str | None = None) -> bool:
        """Record the end of the job's attempt that started under this lease token; False when that
        attempt is not the job's current one (cancelled, taken back, started again elsewhere)."""
        if not status.is_terminal:
            raise ValueError(f"{status} is not a terminal status")
        result = self.collection.update_one(
            {"_id": job_id, "status": JobStatus.STARTED, "lease_token": token},
            {"$set": {"status": status, "finished_at": _now(), "error_code": error_code}},
        )
        return result.matched_count == 1

    def fail(self, job_ids: Iterable[str], error_code: str) -> int:
        """End non-terminal jobs as errors (the reaper's crashed jobs); returns how many were not ended yet."""
        return self._end(job_ids, JobStatus.ERROR, error_code)

    def cancel(self, job_ids: Iterable[str]) -> int:
        return self._end(job_ids, JobStatus.CANCELLED, None)

    @retry_transient
    def _end(self, job_ids: Iterable[str], status: JobStatus, error_code: str | None) -> int:
        ids = list(job_ids)
        if not ids:
            return 0
        return int(
            self.collection.update_many(
                {"_id": {"$in": ids}, "status": {"$nin": list(TERMINAL_STATUSES)}},
                [
                    {"$set": {"status": status, "finished_at": _now(), "error_code": error_code}},
                    {"$unset": "pending_key"},
                ],
            ).modified_count
        )

    @retry_transient
    def jobs(self, dataset: str | None = None, statuses: Iterable[JobStatus] | None = None) -> list[Job]:
        """Jobs of a dataset (or of every dataset), optionally only in these statuses, oldest first."""
        query: dict[str, Any] = {}
        if dataset is not None:
            query["dataset"] = dataset
        if statuses is not None:
            query["status"] = {"$in": list(statuses)}
        return sorted((_job(d) for d in self.collection.find(query)), key=lambda job: job.created_at)

    def unfinished(self) -> list[Job]:
        """Jobs not ended yet, the started ones first."""
        jobs = self.jobs(statuses=(JobStatus.WAITING, JobStatus.QUEUED, JobStatus.STARTED))
        return sorted(jobs, key=lambda job: job.status != JobStatus.STARTED)

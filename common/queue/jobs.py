"""What a job is: its statuses, priorities, the ledger document and the payload the limiter keeps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from common.names import namespace_of


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """0 runs first."""
        return {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}[self]

    @property
    def celery_priority(self) -> int:
        """Celery's Redis transport consumes lower numbers first."""
        return self.rank * 3


class JobStatus(StrEnum):
    WAITING = "waiting"
    QUEUED = "queued"
    STARTED = "started"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCESS, JobStatus.ERROR, JobStatus.CANCELLED})
PENDING_STATUSES = (JobStatus.WAITING, JobStatus.QUEUED)


def unicity_id(step: str, dataset: str, config: str | None, split: str | None) -> str:
    """Jobs with the same unicity id compute the same cache entry."""
    return f"{step},{dataset},{config or ''},{split or ''}"


class JobPayload(BaseModel):
    """What the limiter keeps of a waiting or leased job: enough to publish its Celery message."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    step: str
    dataset: str
    config: str | None
    split: str | None
    namespace: str
    unicity_id: str
    priority: Priority
    rank: int

    @classmethod
    def of(
        cls, job_id: str, step: str, dataset: str, config: str | None, split: str | None, priority: Priority
    ) -> JobPayload:
        """A payload, its namespace, unicity id and rank derived from the rest."""
        return cls(
            job_id=job_id,
            step=step,
            dataset=dataset,
            config=config,
            split=split,
            namespace=namespace_of(dataset),
            unicity_id=unicity_id(step, dataset, config, split),
            priority=priority,
            rank=priority.rank,
        )

    def compact(self) -> str:
        """What Redis keeps: `[step, dataset, config, split, rank]`, the rest is derived (the job id is
        the hash field; the namespace, the unicity id and the priority come from the others). Short enough
        for Redis' compact encodings (64 bytes for typical names): most of a parked job's memory."""
        return json.dumps([self.step, self.dataset, self.config, self.split, self.rank], separators=(",", ":"))

    @classmethod
    def from_compact(cls, job_id: str, raw: str | bytes) -> JobPayload:
        """The payload `compact` wrote (or a whole JSON object, as versions before it wrote)."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith("{"):
            return cls.model_validate_json(text)
        step, dataset, config, split, rank = json.loads(text)
        priority = next(priority for priority in Priority if priority.rank == rank)
        return cls.of(job_id, step, dataset, config, split, priority)


class Job(BaseModel):
    """A job as the ledger (collection `jobs`) records it."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    step: str
    dataset: str
    config: str | None = None
    split: str | None = None
    namespace: str
    revision: str | None = None
    priority: Priority = Priority.NORMAL
    status: JobStatus
    unicity_id: str
    created_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_heartbeat: datetime | None = None
    worker: str | None = None
    attempts: int = 0
    lease_token: str | None = None
    error_code: str | None = None
    fence: int = 0  # the limiter's fence of the last decision recorded here (the ending's, once ended)
    age: int | None = None  # the fence of its admission: its place in line
    effects_pending: bool | None = None  # ended, and its end's effects (next steps, events) not applied yet

    def payload(self) -> JobPayload:
        return JobPayload(
            job_id=self.job_id,
            step=self.step,
            dataset=self.dataset,
            config=self.config,
            split=self.split,
            namespace=self.namespace,
            unicity_id=self.unicity_id,
            priority=self.priority,
            rank=self.priority.rank,
        )


@dataclass(frozen=True)
class Dispatch:
    """A job the limiter leased a slot to: publish its message with this token."""

    payload: JobPayload
    token: str
    borrowed: bool = False  # a slot beyond its namespace's limit: published after every other message

"""What happens to jobs, tasks and the cache, as events other services can react to.

Every event has a `type`, a `schema_version`, an `event_id` and a `time`. Two families:

- `job.*` and `cache.updated`: a job's story as the ledger records it, told by the job's one fenced way
  out (common/lifecycle.py) and the queue; they carry the job's key (job id, step, dataset, config,
  split, namespace). A job that crashed is told by the reaper, since no process of it is left.
- `task.*`: Celery's story of every task of the app, steps and plain tasks alike, told by Celery's
  signals (tasks/signals.py): started, heartbeat, succeeded, failed, retried, revoked, dropped. They carry
  the task's name, id and worker; for a step, its job's key too.
 Consumers read them with :func:`parse_event`, which ignores fields
it does not know, so an old consumer keeps working when a newer producer adds fields or event types.
They travel on a Redis Stream (see common/event_bus.py) as one JSON field.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.logging import current_request_id

SCHEMA_VERSION = 1
JOB_KEY_FIELDS: set[str] = {"job_id", "step", "dataset", "config", "split", "namespace"}  # every event carries them


class EventType(StrEnum):
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_PROGRESS = "job.progress"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    CACHE_UPDATED = "cache.updated"
    TASK_STARTED = "task.started"
    TASK_HEARTBEAT = "task.heartbeat"
    TASK_SUCCEEDED = "task.succeeded"
    TASK_FAILED = "task.failed"
    TASK_RETRIED = "task.retried"
    TASK_REVOKED = "task.revoked"
    TASK_DROPPED = "task.dropped"

    @property
    def ends_job(self) -> bool:
        return self in (EventType.JOB_SUCCEEDED, EventType.JOB_FAILED, EventType.JOB_CANCELLED)


class Event(BaseModel):
    """An event; the subclasses add what their type carries (an unknown type parses as a plain Event)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    job_id: str | None = None
    step: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    namespace: str | None = None
    request_id: str | None = Field(default_factory=current_request_id)  # the API request it was published in


class JobEvent(Event):
    """An event about a job: its key is always there."""

    step: str
    dataset: str
    namespace: str


class JobQueued(JobEvent):
    type: str = EventType.JOB_QUEUED
    priority: str = "normal"


class JobStarted(JobEvent):
    type: str = EventType.JOB_STARTED
    worker: str | None = None
    attempt: int = 1


class JobProgress(JobEvent):
    type: str = EventType.JOB_PROGRESS
    current: float
    total: float
    fraction: float
    message: str | None = None


class JobSucceeded(JobEvent):
    type: str = EventType.JOB_SUCCEEDED
    duration: float | None = None


class JobFailed(JobEvent):
    type: str = EventType.JOB_FAILED
    error_code: str | None = None
    message: str | None = None
    duration: float | None = None


class JobCancelled(JobEvent):
    type: str = EventType.JOB_CANCELLED


class JobState(JobEvent):
    """Not published: what `Queue.follow` yields first, the job's state in the ledger when following began."""

    type: str = "job.state"
    status: str
    attempts: int = 0


class CacheUpdated(JobEvent):
    type: str = EventType.CACHE_UPDATED
    http_status: int
    error_code: str | None = None


class TaskEvent(Event):
    """An event about a task run by a worker, as Celery's signals tell it; a step's carries its job's key."""

    task: str
    task_id: str
    worker: str | None = None


class TaskStarted(TaskEvent):
    type: str = EventType.TASK_STARTED


class TaskHeartbeat(TaskEvent):
    type: str = EventType.TASK_HEARTBEAT
    running_for: float = 0.0


class TaskSucceeded(TaskEvent):
    type: str = EventType.TASK_SUCCEEDED
    runtime: float | None = None


class TaskFailed(TaskEvent):
    type: str = EventType.TASK_FAILED
    exception: str
    message: str | None = None
    runtime: float | None = None


class TaskRetried(TaskEvent):
    type: str = EventType.TASK_RETRIED
    reason: str | None = None


class TaskRevoked(TaskEvent):
    type: str = EventType.TASK_REVOKED
    terminated: bool = False
    signal: str | None = None


class TaskDropped(TaskEvent):
    """The task's message was acknowledged without running (a step's stale, cancelled or repeated message)."""

    type: str = EventType.TASK_DROPPED


EVENT_CLASSES: dict[str, type[Event]] = {
    EventType.JOB_QUEUED: JobQueued,
    EventType.JOB_STARTED: JobStarted,
    EventType.JOB_PROGRESS: JobProgress,
    EventType.JOB_SUCCEEDED: JobSucceeded,
    EventType.JOB_FAILED: JobFailed,
    EventType.JOB_CANCELLED: JobCancelled,
    EventType.CACHE_UPDATED: CacheUpdated,
    EventType.TASK_STARTED: TaskStarted,
    EventType.TASK_HEARTBEAT: TaskHeartbeat,
    EventType.TASK_SUCCEEDED: TaskSucceeded,
    EventType.TASK_FAILED: TaskFailed,
    EventType.TASK_RETRIED: TaskRetried,
    EventType.TASK_REVOKED: TaskRevoked,
    EventType.TASK_DROPPED: TaskDropped,
}


class InvalidEventError(ValueError):
    """A stream entry that is not an event this version can read."""


def parse_event(data: str | bytes | dict[str, Any]) -> Event:
    """The event in `data` (JSON or a dict), as its own class, or as a plain Event for unknown types."""
    try:
        raw = data if isinstance(data, dict) else json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidEventError(f"not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidEventError("an event is a JSON object")
    try:
        return EVENT_CLASSES.get(str(raw.get("type")), Event).model_validate(raw)
    except ValidationError as error:
        raise InvalidEventError(f"not a stepcache event: {error.errors()[0]['msg']}") from None

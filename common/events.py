"""What happens to jobs and the cache, as events other services can react to.

Every event has a `type`, a `schema_version`, an `event_id`, a `time`, and the job's key (job id, step,
dataset, config, split, namespace). Consumers read them with :func:`parse_event`, which ignores fields
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

SCHEMA_VERSION = 1
JOB_KEY_FIELDS: set[str] = {"job_id", "step", "dataset", "config", "split", "namespace"}  # every event carries them


class EventType(StrEnum):
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_PROGRESS = "job.progress"
    JOB_HEARTBEAT = "job.heartbeat"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    CACHE_UPDATED = "cache.updated"

    @property
    def ends_job(self) -> bool:
        return self in (EventType.JOB_SUCCEEDED, EventType.JOB_FAILED, EventType.JOB_CANCELLED)


class Event(BaseModel):
    """An event; the subclasses add what their type carries."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    job_id: str | None = None
    step: str
    dataset: str
    config: str | None = None
    split: str | None = None
    namespace: str


class JobQueued(Event):
    type: str = EventType.JOB_QUEUED
    priority: str = "normal"


class JobStarted(Event):
    type: str = EventType.JOB_STARTED
    worker: str | None = None
    attempt: int = 1


class JobProgress(Event):
    type: str = EventType.JOB_PROGRESS
    current: float
    total: float
    fraction: float
    message: str | None = None


class JobHeartbeat(Event):
    type: str = EventType.JOB_HEARTBEAT


class JobSucceeded(Event):
    type: str = EventType.JOB_SUCCEEDED
    duration: float | None = None


class JobFailed(Event):
    type: str = EventType.JOB_FAILED
    error_code: str | None = None
    message: str | None = None
    duration: float | None = None


class JobCancelled(Event):
    type: str = EventType.JOB_CANCELLED


class JobState(Event):
    """Not published: what `Queue.follow` yields first, the job's state in the ledger when following began."""

    type: str = "job.state"
    status: str
    attempts: int = 0


class CacheUpdated(Event):
    type: str = EventType.CACHE_UPDATED
    http_status: int
    error_code: str | None = None


EVENT_CLASSES: dict[str, type[Event]] = {
    EventType.JOB_QUEUED: JobQueued,
    EventType.JOB_STARTED: JobStarted,
    EventType.JOB_PROGRESS: JobProgress,
    EventType.JOB_HEARTBEAT: JobHeartbeat,
    EventType.JOB_SUCCEEDED: JobSucceeded,
    EventType.JOB_FAILED: JobFailed,
    EventType.JOB_CANCELLED: JobCancelled,
    EventType.CACHE_UPDATED: CacheUpdated,
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

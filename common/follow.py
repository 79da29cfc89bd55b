"""Following a job: its state in the ledger, then its events from its own stream until it ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from common.event_bus import EventBus
from common.events import JOB_KEY_FIELDS, Event, EventType, JobEvent, JobState
from common.exceptions import UnknownJobError
from common.queue.jobs import Job

ENDING_EVENTS = frozenset(event_type.value for event_type in EventType if event_type.ends_job)


def follow(lookup: Callable[[str], Job | None], events: EventBus, job_id: str, block_ms: int = 1000) -> Iterator[Event]:
    """The job's state in the ledger (`lookup`, the queue's `job`: its journals written first), then its
    job events until it ends, so that a late follower misses nothing: events published after that state
    are read from the job's own stream."""
    job = lookup(job_id)
    if job is None:
        raise UnknownJobError(f"no job {job_id!r} in the ledger")
    position = events.last_job_id(job_id, job.namespace)  # what happens next is on the job's stream
    job = lookup(job_id) or job  # read after the position: nothing falls between the two
    yield JobState(**job.model_dump(include=JOB_KEY_FIELDS), status=job.status.value, attempts=job.attempts)
    if job.status.is_terminal:
        return
    while True:
        for stream_id, event in events.read_job(job_id, job.namespace, position, block_ms=block_ms):
            position = stream_id
            if isinstance(event, JobEvent):
                yield event
                if event.type in ENDING_EVENTS:
                    return

"""Jobs, as the ledger records them, and their events as they happen.

`GET /jobs/{job_id}`: the job's ledger state (its lease token left out).
`GET /jobs/{job_id}/events`: Server-Sent Events, one per event of the job on the event stream (job.*,
task.*: queued, started, progress, heartbeat, cache updated, succeeded or failed), each with its stream id
as `id` and its type as `event`; the stream ends with the job's end. Without `Last-Event-ID` it starts at
the job's creation; with one (what an EventSource sends when it reconnects), right after it. When the end
is no longer on the stream (trimmed, or the job ended before), a last `job.state` event gives the ledger's
state; a connection replays at most SCAN_BUDGET entries of other jobs' events in a row. The stream is
read every 0.5 s without holding a thread while waiting (each watcher reads every event: the cost grows
with watchers times events); a comment line is sent every 15 s to keep proxies from closing an idle
stream.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Path, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from common.config import get_config
from common.events import EventType, JobState
from common.queue import Job
from tasks.api.auth import check_dataset_access
from tasks.api.errors import InvalidParameterError, NotFoundError

JOB_ID = r"^[A-Za-z0-9-]{1,64}$"
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
POLL_SECONDS = 0.5
LEDGER_CHECK_EVERY = 4  # polls without news between two looks at the ledger
READ_COUNT = 200
SCAN_BUDGET = 20_000  # others' events one connection reads in a row before it stops replaying
ENDS = frozenset(str(kind) for kind in EventType if kind.ends_job)
PING_SECONDS = 15
MAX_LEDGER_WAIT_SECONDS = 1.0
START_MARGIN_MS = 10_000  # the job was created by a clock other than Redis': read from a little before


async def find_job(job_id: str) -> Job:
    """The job in the ledger; a job enqueued a moment ago may still be in its namespace's journal (written
    within QUEUE_LEDGER_LAG_SECONDS), so a miss is looked up once more after that (no journal is written
    for an unknown id: asking costs two reads)."""
    from tasks.queue import get_queue

    ledger = get_queue().ledger
    for wait in (0.0, min(MAX_LEDGER_WAIT_SECONDS, 2 * get_config().queue.ledger_lag_seconds)):
        await asyncio.sleep(wait)
        job = await run_in_threadpool(ledger.get, job_id)
        if job is not None:
            return job
    raise NotFoundError(f"no job {job_id}", error_code="UnknownJobError")


async def readable_job(request: Request, job_id: str) -> Job:
    """The job, if the request may read its dataset (tasks.api.auth: a gated or private one needs a JWT)."""
    job = await find_job(job_id)
    await run_in_threadpool(check_dataset_access, request, job.dataset)
    return job


def _is_stream_id(text: str) -> bool:
    return STREAM_ID.fullmatch(text) is not None and all(int(part) < 2**64 for part in text.split("-"))


def job_document(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json", exclude={"lease_token"})


async def job_events(job: Job, after: str) -> AsyncIterator[ServerSentEvent]:
    """The job's events after stream id `after`, until its end. One connection reads at most SCAN_BUDGET
    entries of others' events in a row: past that (a job long finished, its events trimmed), a terminal
    job's state closes the stream, and a running one's state is sent and the reading jumps to now."""
    from tasks.queue import get_queue

    bus = get_queue().events
    position, quiet, scanned = after, 0, 0
    while True:
        entries = await run_in_threadpool(bus.read, position, READ_COUNT, None)
        for stream_id, event in entries:
            position, scanned = stream_id, scanned + 1
            if event.job_id != job.job_id:
                continue
            scanned = 0
            yield ServerSentEvent(event.model_dump_json(), event=event.type, id=stream_id)
            if event.type in ENDS:
                return
        if scanned > SCAN_BUDGET:
            current = await find_job(job.job_id)
            if not current.status.is_terminal:
                position, scanned = await run_in_threadpool(bus.last_id), 0
            yield _state(current, position)
            if current.status.is_terminal:
                return
            continue
        if entries:
            quiet = 0
            continue
        quiet += 1
        if quiet % LEDGER_CHECK_EVERY == 0:
            current = await find_job(job.job_id)
            if current.status.is_terminal and not await run_in_threadpool(_has_news, bus, position):
                yield _state(current, position)
                return
        await asyncio.sleep(POLL_SECONDS)


def _state(job: Job, position: str) -> ServerSentEvent:
    """The job's state in the ledger, as a `job.state` event at this stream position."""
    key = job.model_dump(include={"job_id", "step", "dataset", "config", "split", "namespace"})
    state = JobState(**key, status=job.status.value, attempts=job.attempts)
    return ServerSentEvent(state.model_dump_json(), event=state.type, id=position)


def _has_news(bus: Any, position: str) -> bool:
    return bool(bus.read(position, 1, None))


def router() -> APIRouter:
    jobs = APIRouter(prefix="/jobs", tags=["jobs"])

    @jobs.get("/{job_id}", responses={404: {"description": "no such job"}})
    async def job(request: Request, job_id: str = Path(pattern=JOB_ID)) -> dict[str, Any]:
        """The job's state in the ledger (a job of a gated or private dataset: with a JWT for it)."""
        return job_document(await readable_job(request, job_id))

    @jobs.get(
        "/{job_id}/events",
        response_class=EventSourceResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "the job's events"}},
    )
    async def events(
        request: Request,
        job_id: str = Path(pattern=JOB_ID),
        last_event_id: str | None = Header(None, description="resume after this stream id"),
    ) -> EventSourceResponse:
        """The job's events as Server-Sent Events, until it ends."""
        if last_event_id is not None and not _is_stream_id(last_event_id):
            raise InvalidParameterError(f"Last-Event-ID is a stream id (<ms>-<n>), not {last_event_id[:64]!r}")
        found = await readable_job(request, job_id)
        start = last_event_id or f"{max(0, int(found.created_at.timestamp() * 1000) - START_MARGIN_MS)}-0"
        return EventSourceResponse(job_events(found, start), ping=PING_SECONDS)

    return jobs

"""Jobs, as the ledger records them, and their events as they happen.

`GET /jobs/{job_id}`: the job's ledger state (its lease token and worker left out).
`GET /jobs/for/{kind}?dataset=&config=&split=`: the job that produces that entry (a not-ready answer's
`Location`): its job in process, else the last that ran; 202 with the ancestor's job while it is not
created yet (a job is created when its parents end).
`GET /jobs/{job_id}/events`: Server-Sent Events, one per event of the job (job.*, task.*: queued, started,
progress, heartbeat, cache updated, succeeded or failed), each with its id on the job's own stream
(common.event_bus) as `id` and its type as `event`; the stream ends with the job's end. Without
`Last-Event-ID` it starts at the job's first event; with one (what an EventSource sends when it
reconnects), right after it. A connection reads only its job's events: its cost follows the job, never
the traffic of others. When the end is no longer on the job's stream (it expired, or the job ended long
before), a last `job.state` event gives the ledger's state.

Streams are bounded: at most API_EVENTS_MAX_STREAMS per API process and API_EVENTS_MAX_STREAMS_PER_CLIENT
per client address (past them: 429 with Retry-After); a stream with no event of its job for
API_EVENTS_IDLE_SECONDS (a job that waits, or is paused) closes with a `job.state` event whose id resumes
it. The job's stream is read every 0.5 s without holding a thread while waiting; a comment line is sent
every 15 s to keep proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Header, Path, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from common.config import ApiConfig, get_config
from common.events import EventType, JobState
from common.names import validate_key
from common.orchestrator import JobKey, Producer, producer
from common.processing_graph import get_processing_graph
from common.queue import Job
from tasks.api.auth import check_dataset_access
from tasks.api.errors import InvalidParameterError, NotFoundError, TooManyStreamsError
from tasks.api.protocol import client_key

JOB_ID = r"^[A-Za-z0-9-]{1,64}$"
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
POLL_SECONDS = 0.5
LEDGER_CHECK_EVERY = 4  # polls without news between two looks at the ledger
READ_COUNT = 200
ENDS = frozenset(str(kind) for kind in EventType if kind.ends_job)
PING_SECONDS = 15
MAX_LEDGER_WAIT_SECONDS = 1.0
UNANSWERED = {"lease_token", "worker", "effects_pending"}  # a secret, the worker's host name, bookkeeping
# A task's failure is told by its exception's type; its text may name the stores' hosts (job.failed has
# the cached error's message, redacted).
UNANSWERED_TASK_FAILED = UNANSWERED | {"message"}


class StreamSlots:
    """The event streams open in this process, in total and per client address (asyncio: one thread)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: Counter[str] = Counter()

    @contextmanager
    def taken(self, client: str, settings: ApiConfig) -> Iterator[Callable[[], None]]:
        """Take a slot for `client` (429 TooManyStreamsError past a cap); yields its release, which may be
        called more than once."""
        per_client = settings.events_max_streams_per_client
        if self.total >= settings.events_max_streams or self.by_client[client] >= per_client:
            raise TooManyStreamsError(
                f"too many event streams open (at most {per_client} per client, "
                f"{settings.events_max_streams} in all): close one, or poll /jobs/{{job_id}}",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            )
        self.total += 1
        self.by_client[client] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.total -= 1
                self.by_client[client] -= 1
                if not self.by_client[client]:
                    del self.by_client[client]

        try:
            yield release
        except BaseException:
            release()
            raise


async def find_job(job_id: str) -> Job:
    """The job in the ledger; a job enqueued a moment ago may still be in its namespace's journal (written
    within QUEUE_LEDGER_LAG_SECONDS), so a miss is looked up once more after that (no journal is written
    for an unknown id: asking costs two reads)."""
    from tasks.queue import get_queue

    ledger = (await run_in_threadpool(get_queue)).ledger  # built in a thread: it may wait on MongoDB
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
    return job.model_dump(mode="json", exclude=UNANSWERED)


async def job_events(
    job: Job, after: str, idle_seconds: float, release: Callable[[], None]
) -> AsyncIterator[ServerSentEvent]:
    """The job's events after the id `after` of its own stream, until its end, or until `idle_seconds`
    pass without one (then the job's state, at the position reached); `release` frees the stream's slot."""
    from tasks.queue import get_queue

    bus = (await run_in_threadpool(get_queue)).events
    position, quiet, quiet_since = after, 0, time.monotonic()
    try:
        while True:
            entries = await run_in_threadpool(bus.read_job, job.job_id, job.namespace, position, READ_COUNT)
            for stream_id, event in entries:
                position = stream_id
                hidden = UNANSWERED_TASK_FAILED if event.type == EventType.TASK_FAILED else UNANSWERED
                yield ServerSentEvent(event.model_dump_json(exclude=hidden), event=event.type, id=stream_id)
                if event.type in ENDS:
                    return
            if entries:
                quiet, quiet_since = 0, time.monotonic()
                continue
            if quiet % LEDGER_CHECK_EVERY == 0:  # the first quiet poll, then every few
                current = await find_job(job.job_id)
                # Ended, its end's events published (they go with its effects), and none left to read.
                ended = (
                    current.status.is_terminal
                    and not current.effects_pending
                    and not await run_in_threadpool(bus.read_job, job.job_id, job.namespace, position, 1)
                )
                if ended or time.monotonic() - quiet_since >= idle_seconds:
                    yield _state(current, position)
                    return
            quiet += 1
            await asyncio.sleep(POLL_SECONDS)
    finally:
        release()


def _state(job: Job, position: str) -> ServerSentEvent:
    """The job's state in the ledger, as a `job.state` event at this stream position."""
    key = job.model_dump(include={"job_id", "step", "dataset", "config", "split", "namespace"})
    state = JobState(**key, status=job.status.value, attempts=job.attempts)
    return ServerSentEvent(state.model_dump_json(), event=state.type, id=position)


def producer_url(kind: str, dataset: str, config: str | None, split: str | None) -> str:
    """The URL of the job that produces the entry of this key (`GET /jobs/for/{kind}`)."""
    given = {"dataset": dataset, "config": config, "split": split}
    return f"/jobs/for/{quote(kind)}?{urlencode({name: value for name, value in given.items() if value is not None})}"


def _producer(kind: str, dataset: str, config: str | None, split: str | None) -> Producer:
    from tasks.queue import get_queue

    dataset, config, split = validate_key(dataset, config, split)
    get_processing_graph().get_step(kind)  # UnknownStepError: 422
    return producer(get_queue(), JobKey(kind, dataset, config, split))


def router() -> APIRouter:
    jobs = APIRouter(prefix="/jobs", tags=["jobs"])

    @jobs.get(
        "/for/{kind}",
        responses={
            202: {"description": "its job is not created yet: `waiting_for` is the ancestor's job it waits for"},
            404: {"description": "no job of this entry, nor of an ancestor, is in process or ran"},
        },
    )
    async def producing_job(
        request: Request,
        response: Response,
        kind: str = Path(description="the step (the kind of entry)"),
        dataset: str = Query(),
        config: str | None = Query(None),
        split: str | None = Query(None),
    ) -> dict[str, Any]:
        """The job that produces the entry of (kind, dataset, config, split): its job in process, else the
        last one that ran (200, as `/jobs/{id}`). A step's job is created once its parents ended, so while an
        ancestor's job is in process the answer is 202, the ancestor's job in `waiting_for`."""
        await run_in_threadpool(check_dataset_access, request, dataset)
        found = await run_in_threadpool(_producer, kind, dataset, config, split)
        if found.waiting_for is not None:
            response.status_code = HTTPStatus.ACCEPTED
            response.headers["Retry-After"] = str(get_config().api.retry_after_seconds)
            key = {"step": kind, "dataset": dataset, "config": config, "split": split}
            return {**key, "status": "not created yet", "waiting_for": job_document(found.waiting_for)}
        if found.job is None:
            raise NotFoundError(
                f"no job of {kind} for {dataset} {config or ''} {split or ''}", error_code="UnknownJobError"
            )
        response.headers["Content-Location"] = f"/jobs/{found.job.job_id}"
        return job_document(found.job)

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
        settings = get_config().api
        slots: StreamSlots = request.app.state.event_streams
        with slots.taken(client_key(request.client.host) if request.client else "-", settings) as release:
            found = await readable_job(request, job_id)
            stream = job_events(found, last_event_id or "0-0", settings.events_idle_seconds, release)
            return EventSourceResponse(stream, ping=PING_SECONDS, background=BackgroundTask(release))

    return jobs

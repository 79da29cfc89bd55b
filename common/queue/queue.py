"""The Queue: the ledger and the limiter working together, as callers and operators use them.

A job's life through this class::

    enqueue  -> ledger: waiting -> limiter.admit -> dispatched? publish, ledger: queued
    start    -> limiter.confirm -> ledger: started          (or: drop a stale/redelivered message)
    heartbeat-> limiter.renew + ledger.last_heartbeat
    finish   -> ledger: success|error -> limiter.release_and_promote -> publish the promoted jobs
    reap     -> expired leases: requeue, or fail as JobManagerCrashedError in ledger and cache

It does not know Celery: a :class:`Dispatcher` publishes the messages and revokes started jobs.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol

from redis.exceptions import LockError

from common import cache
from common.config import get_config
from common.event_bus import EventBus
from common.events import (
    JOB_KEY_FIELDS,
    CacheUpdated,
    Event,
    EventType,
    JobCancelled,
    JobFailed,
    JobHeartbeat,
    JobQueued,
    JobStarted,
    JobState,
    JobSucceeded,
)
from common.exceptions import (
    CacheableError,
    InvalidArgumentsError,
    JobManagerCrashedError,
    MissingStepInputError,
    StepcacheError,
    UnknownJobError,
)
from common.names import namespace_of, validate_key
from common.processing_graph import InputType, ProcessingStep, get_processing_graph
from common.queue.jobs import (
    PENDING_STATUSES,
    Dispatch,
    Job,
    JobPayload,
    JobStatus,
    Priority,
    unicity_id,
)
from common.queue.ledger import Ledger
from common.queue.limiter import Confirmation, NamespaceCounts, NamespaceLimiter
from common.redis_connection import get_redis

logger = logging.getLogger(__name__)
REAPER_LOCK_KEY = "stepcache:reaper"
REAPER_LOCK_SECONDS = 10
ENDING_EVENTS = frozenset(event_type.value for event_type in EventType if event_type.ends_job)


class Dispatcher(Protocol):
    """Publishes the messages of jobs that got a slot, and stops started jobs (Celery, in tasks/)."""

    def publish(self, dispatch: Dispatch) -> None: ...

    def revoke(self, job_ids: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """How a job ended, as its cache entry says."""

    http_status: int
    error_code: str | None = None
    message: str | None = None
    duration: float | None = None


@dataclass
class ReapReport:
    crashed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    dispatched: int = 0


def check_step_input(step: ProcessingStep, config: str | None, split: str | None) -> None:
    """A step gets exactly the config and split its input type needs."""
    needs_config = step.input_type in (InputType.CONFIG, InputType.SPLIT)
    needs_split = step.input_type == InputType.SPLIT
    if needs_config != (config is not None) or needs_split != (split is not None):
        wanted = {
            InputType.DATASET: "a dataset only",
            InputType.CONFIG: "a dataset and a config",
            InputType.SPLIT: "a dataset, a config and a split",
        }[step.input_type]
        raise MissingStepInputError(f"step {step.name!r} takes {wanted}; got config={config!r} split={split!r}")


def parse_priority(priority: object) -> Priority:
    if isinstance(priority, str) and priority in {p.value for p in Priority}:
        return Priority(priority)
    raise InvalidArgumentsError(f"priority must be one of {', '.join(Priority)}, not {priority!r}")


class Queue:
    """Jobs in and out of the ledger and the limiter."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        ledger: Ledger,
        limiter: NamespaceLimiter,
        events: EventBus | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.ledger = ledger
        self.limiter = limiter
        self.events = events if events is not None else EventBus(limiter.redis)

    def emit(self, kind: type[Event], payload: JobPayload, **fields: Any) -> None:
        """Publish an event about this job; a failure to publish is logged, never fatal to the job."""
        try:
            self.events.publish(kind(**payload.model_dump(include=JOB_KEY_FIELDS), **fields))
        except Exception:
            logger.exception("could not publish %s for job %s", kind.__name__, payload.job_id)

    @classmethod
    def from_config(cls, dispatcher: Dispatcher) -> Queue:
        settings = get_config()
        limiter = NamespaceLimiter(
            get_redis(settings.queue.redis_url),
            default_limit=settings.queue.max_jobs_per_namespace,
            started_ttl_seconds=settings.worker.lease_ttl_seconds,
            queued_ttl_seconds=settings.worker.queued_lease_seconds,
            max_attempts=settings.worker.max_attempts,
        )
        return cls(dispatcher, Ledger(), limiter)

    # --- the life of a job -------------------------------------------------------------------------

    def enqueue(
        self,
        step: str,
        dataset: str,
        config: str | None = None,
        split: str | None = None,
        priority: object = Priority.NORMAL,
        revision: str | None = None,
    ) -> Job:
        """Validate, record and admit a job; the identical pending job instead, when there is one."""
        processing_step = get_processing_graph().get_step(step)
        dataset, config, split = validate_key(dataset, config, split)
        check_step_input(processing_step, config, split)
        job = Job(
            job_id=str(uuid.uuid4()),
            step=step,
            dataset=dataset,
            config=config,
            split=split,
            namespace=namespace_of(dataset),
            revision=revision,
            priority=parse_priority(priority),
            status=JobStatus.WAITING,
            unicity_id=unicity_id(step, dataset, config, split),
            created_at=datetime.now(UTC),
        )
        job, created = self.ledger.create(job)
        if created or job.status in PENDING_STATUSES:
            # Admitting is idempotent: this also rescues a pending twin whose admission was lost
            # (its process died between the ledger and Redis).
            self._admit(job)
        return job

    def _admit(self, job: Job) -> None:
        _, dispatched = self.limiter.admit(job.payload())
        self._publish(dispatched)

    def _publish(self, dispatched: Sequence[Dispatch]) -> None:
        published = []
        for dispatch in dispatched:
            try:
                self.dispatcher.publish(dispatch)
                published.append(dispatch)
            except Exception:
                # Back to the waiting room: the reaper's next pass (or a release) dispatches it anew.
                logger.exception("could not publish job %s; it waits again", dispatch.payload.job_id)
                self.limiter.unlease(dispatch.payload.namespace, dispatch.payload.job_id, dispatch.token)
        self.ledger.mark_queued([dispatch.payload.job_id for dispatch in published])
        for dispatch in published:
            self.emit(JobQueued, dispatch.payload, priority=dispatch.payload.priority.value)

    def start(self, payload: JobPayload, token: str, worker: str) -> Confirmation:
        """At task start: whether this message may run; it may only while holding a lease."""
        confirmation = self.limiter.confirm(payload.namespace, payload.job_id, token)
        if confirmation.decision == "orphan":
            # Redis forgot the job (finished, cancelled, or Redis lost its data): ask the ledger.
            job = self.ledger.get(payload.job_id)
            if job is not None and not job.status.is_terminal:
                self._admit(job)  # parked again; promotion sends it a fresh message
            return Confirmation("drop")
        if confirmation.run and not self.ledger.mark_started(payload.job_id, token, confirmation.attempt, worker):
            # Cancelled between dispatch and start.
            self.release(payload, token)
            return Confirmation("drop")
        if confirmation.run:
            self.emit(JobStarted, payload, worker=worker, attempt=confirmation.attempt)
        return confirmation

    def heartbeat(self, payload: JobPayload, token: str) -> bool:
        """Keep a started job's lease; False when it lost it (cancelled, reaped)."""
        renewed = self.limiter.renew(payload.namespace, payload.job_id, token)
        if renewed == 1:
            self.ledger.heartbeat(payload.job_id)
            self.emit(JobHeartbeat, payload)
        return renewed != 0  # a job cancelled while it runs keeps its slot until it ends

    def finish(self, payload: JobPayload, token: str, outcome: Outcome) -> None:
        """Record the job's end (its response is in the cache), give its slot to the next waiting job,
        and wake its blocked twin."""
        status = JobStatus.SUCCESS if outcome.http_status == HTTPStatus.OK else JobStatus.ERROR
        recorded = self.ledger.finish(payload.job_id, token, status, outcome.error_code)
        self.release(payload, token)
        self.emit(CacheUpdated, payload, http_status=outcome.http_status, error_code=outcome.error_code)
        if not recorded:
            return  # cancelled or taken back meanwhile: its end was told already
        if status == JobStatus.SUCCESS:
            self.emit(JobSucceeded, payload, duration=outcome.duration)
        else:
            self.emit(
                JobFailed,
                payload,
                error_code=outcome.error_code,
                message=outcome.message,
                duration=outcome.duration,
            )

    def release(self, payload: JobPayload, token: str) -> None:
        _, dispatched = self.limiter.release_and_promote(payload.namespace, payload.job_id, token)
        self._publish(dispatched)

    def reap(self) -> ReapReport | None:
        """Take back expired leases in every namespace; None when another process is reaping."""
        # Short-lived: a reaper killed mid-pass must not keep the others from reaping for long.
        lock = self.limiter.redis.lock(REAPER_LOCK_KEY, timeout=REAPER_LOCK_SECONDS, blocking=False)
        if not lock.acquire():
            return None
        try:
            report = ReapReport()
            for namespace in self.limiter.namespaces():
                reaped = self.limiter.reap(namespace)
                self.ledger.mark_waiting(reaped.requeued)
                for payload in reaped.crashed:
                    self._fail_crashed(payload)
                # Also a safety net for free slots nobody promoted (a message that could not be published).
                dispatched = reaped.dispatched + self.limiter.promote(namespace)
                self._publish(dispatched)
                report.crashed += [p.job_id for p in reaped.crashed]
                report.requeued += [job_id for job_id, _ in reaped.requeued]
                report.dispatched += len(dispatched)
            return report
        finally:
            with contextlib.suppress(LockError):  # a pass longer than the lock: another reaper may run now
                lock.release()

    def _fail_crashed(self, payload: JobPayload) -> None:
        error = JobManagerCrashedError(
            f"the job's worker stopped sending heartbeats {get_config().worker.max_attempts} times"
        )
        if not self.ledger.fail([payload.job_id], error.error_code):
            return  # it had ended (only its release was lost): its response stays
        cache.upsert_error(
            payload.step,
            payload.dataset,
            error,
            config=payload.config,
            split=payload.split,
        )
        self.emit(CacheUpdated, payload, http_status=error.http_status, error_code=error.error_code)
        self.emit(JobFailed, payload, error_code=error.error_code, message=error.message)
        self.enqueue_next(payload, None, error)  # its children are still scheduled: with an error

    def enqueue_next(
        self, payload: JobPayload, content: Mapping[str, Any] | None, error: CacheableError | None
    ) -> None:
        """Enqueue what the processing graph asks for after this job (children inherit its priority);
        a failure here is logged and never fails the job that ended."""
        from common import orchestrator

        key = orchestrator.JobKey(payload.step, payload.dataset, payload.config, payload.split)
        try:
            if error is None:
                next_jobs = orchestrator.after_success(payload.step, key, content or {})
            else:
                next_jobs = orchestrator.after_failure(payload.step, key, error)
            for job in next_jobs:
                self.enqueue(job.step, job.dataset, job.config, job.split, priority=payload.priority)
        except Exception:
            logger.exception("could not enqueue the jobs after %s %s", payload.step, payload.job_id)

    def follow(self, job_id: str, block_ms: int = 1000) -> Iterator[Event]:
        """The job's events until it ends, starting with its state in the ledger, so that a late follower
        misses nothing: events published after that state are read from the stream."""
        position = self.events.last_id()  # before reading the state: what happens next is on the stream
        job = self.ledger.get(job_id)
        if job is None:
            raise UnknownJobError(f"no job {job_id!r} in the ledger")
        yield JobState(**job.model_dump(include=JOB_KEY_FIELDS), status=job.status.value, attempts=job.attempts)
        if job.status.is_terminal:
            return
        while True:
            for stream_id, event in self.events.read(position, block_ms=block_ms):
                position = stream_id
                if event.job_id == job_id:
                    yield event
                    if event.type in ENDING_EVENTS:
                        return

    def backfill(self, dataset: str, priority: object = Priority.LOW) -> list[Job]:
        """Enqueue what the graph expects of the dataset and the cache lacks: missing, obsolete (older
        job_runner_version), stale (another revision) or retryable errors; returns the jobs enqueued."""
        from common.orchestrator import backfill_plan
        from common.sources import get_source

        dataset, _, _ = validate_key(dataset, None, None)
        try:
            revision: str | None = get_source().revision(dataset)
        except StepcacheError:
            revision = None  # the root step will cache why
        return [
            self.enqueue(job.step, job.dataset, job.config, job.split, priority=priority)
            for job in backfill_plan(dataset, revision)
        ]

    # --- operators -----------------------------------------------------------------------------------

    def cancel(self, dataset: str, revoke_started: bool = False) -> list[Job]:
        """Cancel every waiting or queued job of the dataset, and its started ones if asked to."""
        dataset, _, _ = validate_key(dataset, None, None)
        statuses = [*PENDING_STATUSES, *([JobStatus.STARTED] if revoke_started else [])]
        jobs = self.ledger.jobs(dataset, statuses)
        if not jobs:
            return []
        # The ledger first: a worker starting one of them now finds it cancelled and does not run it.
        self.ledger.cancel(job.job_id for job in jobs)
        _, dispatched = self.limiter.cancel(namespace_of(dataset), [job.job_id for job in jobs])
        self._publish(dispatched)
        for job in jobs:
            self.emit(JobCancelled, job.payload())
        started = [job.job_id for job in jobs if job.status == JobStatus.STARTED]
        if started:
            self.dispatcher.revoke(started)
        return jobs

    def jobs(self, dataset: str | None = None, statuses: Sequence[JobStatus] | None = None) -> list[Job]:
        return self.ledger.jobs(dataset, statuses)

    def counts(self) -> dict[str, NamespaceCounts]:
        """Waiting, queued and started jobs of every namespace the limiter knows."""
        return {namespace: self.limiter.counts(namespace) for namespace in self.limiter.namespaces()}

    def set_limit(self, namespace: str, limit: int | None) -> None:
        """Override one namespace's limit (0 pauses it) or, with None, go back to the default."""
        namespace = namespace_of(namespace)
        self._publish(self.limiter.set_limit(namespace, limit))

    def get_limit(self, namespace: str) -> tuple[int, bool]:
        return self.limiter.get_limit(namespace_of(namespace))

    def reconcile(self) -> int:
        """Rebuild waiting rooms and leases from the ledger after Redis lost its data; returns how many."""
        restored = 0
        for job in self.ledger.unfinished():
            token = job.lease_token if job.status == JobStatus.STARTED else None
            restored += self.limiter.restore(job.payload(), token, job.attempts)
        for namespace in self.limiter.namespaces():
            self._publish(self.limiter.promote(namespace))
        return restored

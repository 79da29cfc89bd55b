"""How a started job runs and ends: start, heartbeat, the one way out, and the reaper's pass.

An attempt is a job's run under one lease token. Every ending goes through :meth:`Lifecycle.end` —
the step's success or typed error, the soft or hard time limit, a revoke, a cancel — or, for a crash
the reaper found, through the end record the reaper's script made. Either way::

    renew(fence)            the attempt still holds its lease?   no: it is stale and writes nothing
    cache entry             stamped with the fence; never written over a newer one
    limiter end (Lua)       forget the job, record END in the outbox and the ledger's transition in the
                            journal, lease freed slots (DISPATCH records)
    apply(records)          events, next steps, metrics; publish the dispatched jobs; then drop the
                            records from the outbox

What the caller cannot apply (a lost reply, Mongo down, a SIGKILL) stays in the outbox and the
reaper's next pass applies it: every effect is idempotent and fenced, so applying twice is harmless
(events are delivered at least once). The end of a job and its fan-out are one resumable unit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock

from common import cache, metrics, orchestrator
from common.config import get_config
from common.events import CacheUpdated, Event, JobCancelled, JobFailed, JobProgress, JobStarted, JobSucceeded
from common.exceptions import CacheableError, CachedResponseNotFoundError, JobManagerCrashedError
from common.progress import ProgressMeta
from common.queue import Job, JobPayload, JobStatus, Queue
from common.queue.ledger import JournalEntry
from common.queue.limiter import Ending, LeaseState, Record
from common.queue.queue import job_events

logger = logging.getLogger(__name__)
REAPER_LOCK_KEY = "stepcache:reaper"
REAPER_LOCK_SECONDS = 10
REAP_NAMESPACES_PER_ROUND = 200
# A record older than two heartbeat intervals (at least a second) was left behind by its caller: the
# reaper applies it. Younger ones are their caller's, which is applying them now.
OUTBOX_GRACE_MIN_SECONDS = 1.0
STATUS_OF = {
    Ending.SUCCESS: JobStatus.SUCCESS,
    Ending.ERROR: JobStatus.ERROR,
    Ending.CRASHED: JobStatus.ERROR,
    Ending.CANCELLED: JobStatus.CANCELLED,
}


@dataclass(frozen=True)
class Attempt:
    """One run of a job: the lease token of the message that started it, its number and start fence."""

    payload: JobPayload
    token: str
    number: int = 0
    fence: int = 0
    started: str = field(default="", compare=False)  # its start's journal entry, for the ledger at once


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as its own process (or the worker that killed it) knows it."""

    ending: Ending
    content: Mapping[str, Any] | None = None
    error: CacheableError | None = None
    duration: float | None = None
    revision: str | None = None

    @classmethod
    def success(cls, content: Mapping[str, Any], duration: float | None = None, revision: str | None = None) -> Outcome:
        return cls(Ending.SUCCESS, content=content, duration=duration, revision=revision)

    @classmethod
    def failure(cls, error: CacheableError, duration: float | None = None, revision: str | None = None) -> Outcome:
        return cls(Ending.ERROR, error=error, duration=duration, revision=revision)


CANCELLED = Outcome(Ending.CANCELLED)


@dataclass
class ReapReport:
    crashed: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    dispatched: int = 0
    applied: int = 0


class Lifecycle:
    """A job's start, heartbeats and end, on top of the queue's ledger and limiter."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.limiter = queue.limiter
        self.ledger = queue.ledger
        queue.ended_elsewhere = _ended_by_its_cache_entry

    # --- a running attempt -------------------------------------------------------------------------

    def start(self, payload: JobPayload, token: str, delivery: str, worker: str = "") -> Attempt | None:
        """Whether this delivery of the job's message may run: only while its token holds a lease not
        started by another delivery (the ledger will say it started, on this worker). None: drop the
        message, and change nothing else."""
        confirmation = self.limiter.confirm(payload.namespace, payload.job_id, token, delivery, worker)
        if not confirmation.run:
            return None
        return Attempt(payload, token, confirmation.attempt, confirmation.fence, confirmation.started)

    def record_start(self, attempt: Attempt, worker: str) -> None:
        """The ledger, the events and the metrics learn of the start (a worker does it beside the step, in
        a thread of its own). The ledger at once, not within the lag: should Redis lose its data
        now, the repair gives this attempt its lease back, and no other job of the namespace takes its
        slot. A failure here never stops the attempt (its lease is in Redis, its start in the journal)."""
        payload = attempt.payload
        try:
            if attempt.started:  # (the journal's writer writes it again, with what follows: harmless)
                self.ledger.write([JournalEntry.parse(attempt.started)])
        except Exception:
            logger.exception("could not record the start of job %s; the journal's writer will", payload.job_id)
        self.queue.emit(JobStarted, payload, worker=worker, attempt=attempt.number)
        metrics.job_started(payload.step)

    def renew(self, attempt: Attempt) -> LeaseState:
        """Keep the attempt's lease (Redis only: this never waits on Mongo). LOST only once Redis is known
        to have kept its data: after a loss, the reaper gives started attempts their leases back."""
        state = self.limiter.renew(attempt.payload.namespace, attempt.payload.job_id, attempt.token).state
        if state == LeaseState.LOST and not self.redis_kept_its_data():
            state = self.limiter.renew(attempt.payload.namespace, attempt.payload.job_id, attempt.token).state
        return state

    def beat(self, attempt: Attempt) -> None:
        """What a heartbeat writes besides the lease: the ledger's last_heartbeat (the heartbeat event of
        every running task, steps included, comes from Celery's signals: tasks/signals.py)."""
        self.ledger.heartbeat(attempt.payload.job_id, attempt.token)

    def progress(self, attempt: Attempt, meta: ProgressMeta) -> bool:
        """If the attempt still holds its lease (asked of Redis: reports are throttled), the cache entry of
        an earlier run shows the progress (fenced: never a newer entry), and an event tells it. False:
        the attempt is stale, and nothing was written."""
        if self.renew(attempt) == LeaseState.LOST:
            return False
        payload = attempt.payload
        cache.update_progress(
            payload.step, payload.dataset, payload.config, payload.split, meta["fraction"], attempt.fence
        )
        self.queue.emit(JobProgress, payload, **meta)
        return True

    # --- the one way out -----------------------------------------------------------------------------

    def end(self, attempt: Attempt, outcome: Outcome) -> bool:
        """End the attempt with this outcome, whatever ended it; False (and nothing written anywhere)
        when the attempt is stale: its lease was taken back, or the job ended otherwise."""
        payload = attempt.payload
        renewal = self.limiter.renew(payload.namespace, payload.job_id, attempt.token, fence=True)
        if renewal.state == LeaseState.LOST and not self.redis_kept_its_data():
            renewal = self.limiter.renew(payload.namespace, payload.job_id, attempt.token, fence=True)
        if renewal.state == LeaseState.LOST:
            return False
        if renewal.state == LeaseState.CANCELLED:
            outcome = CANCELLED
        elif outcome.ending in (Ending.SUCCESS, Ending.ERROR):
            outcome = self._write_cache(payload, outcome, renewal.fence)
        error_code = outcome.error.error_code if outcome.error is not None else None
        record, dispatched = self.limiter.end(payload, attempt.token, renewal.fence, outcome.ending, error_code)
        if record is None:
            return False  # taken back meanwhile: our entry's fence is older than any newer attempt's
        self.apply([record, *dispatched], outcome)
        return True

    def _write_cache(self, payload: JobPayload, outcome: Outcome, fence: int) -> Outcome:
        """The attempt's response, stamped with its fence; content that cannot be stored is replaced by
        the typed error that says why."""
        if outcome.error is None:
            try:
                cache.upsert_response(
                    payload.step,
                    payload.dataset,
                    outcome.content or {},
                    config=payload.config,
                    split=payload.split,
                    dataset_git_revision=outcome.revision,
                    duration=outcome.duration,
                    fence=fence,
                )
                return outcome
            except CacheableError as error:
                outcome = Outcome.failure(error, outcome.duration, outcome.revision)
        assert outcome.error is not None
        cache.upsert_error(
            payload.step,
            payload.dataset,
            outcome.error,
            config=payload.config,
            split=payload.split,
            dataset_git_revision=outcome.revision,
            duration=outcome.duration,
            fence=fence,
        )
        return outcome

    def apply(self, records: Sequence[Record], outcome: Outcome | None = None) -> bool:
        """Carry out records of one namespace (an end with the outcome its own attempt knows, when it is
        there); what fails stays in the outbox for the reaper. True when the namespace has nothing left."""
        return self.queue.apply(records, end=lambda record: self._apply_end(record, outcome))

    def _apply_end(self, record: Record, outcome: Outcome | None) -> list[Event]:
        """The end's effects outside Redis (cache of a crash, next steps, metrics); its events."""
        payload, ending = record.payload, record.ending or Ending.ERROR
        content: Mapping[str, Any] | None = None
        error: CacheableError | None = None
        if ending == Ending.CRASHED:
            error = JobManagerCrashedError(f"the job's worker stopped sending heartbeats {record.attempt} times")
            cache.upsert_error(payload.step, payload.dataset, error, payload.config, payload.split, fence=record.fence)
        elif outcome is not None:
            content, error = outcome.content, outcome.error
        elif ending != Ending.CANCELLED:
            content, error = _outcome_in_cache(record)
        error_code = error.error_code if error is not None else record.error_code
        if ending != Ending.CANCELLED and (content is not None or error is not None):
            self.enqueue_next(payload, content, error)
        duration = outcome.duration if outcome is not None else None
        metrics.job_finished(payload.step, STATUS_OF[ending].value, duration)
        if ending == Ending.CANCELLED:
            return job_events(payload, (JobCancelled, {}))
        if content is None and error is None:
            # A newer entry replaced this job's: only the job's own end is told, as the record says it.
            if ending == Ending.SUCCESS:
                return job_events(payload, (JobSucceeded, {}))
            return job_events(payload, (JobFailed, {"error_code": error_code}))
        http_status = HTTPStatus.OK if error is None else error.http_status
        updated = (CacheUpdated, {"http_status": http_status, "error_code": error and error.error_code})
        if error is None:
            return job_events(payload, updated, (JobSucceeded, {"duration": duration}))
        failed = {"error_code": error.error_code, "message": error.message, "duration": duration}
        return job_events(payload, updated, (JobFailed, failed))

    def enqueue_next(
        self, payload: JobPayload, content: Mapping[str, Any] | None, error: CacheableError | None
    ) -> None:
        """Carry out what the processing graph asks for after this job (children inherit its priority)."""
        key = orchestrator.JobKey(payload.step, payload.dataset, payload.config, payload.split)
        orchestrator.after_job(self.queue, key, content, error, payload.priority)

    # --- the reaper ----------------------------------------------------------------------------------

    def reap(self) -> ReapReport | None:
        """One pass of the safety net, in every namespace with work: expired leases requeued or ended,
        free slots leased, records left behind applied, journals written to the ledger, idle namespaces
        unlisted, and Redis repaired from the ledger if it lost its data. None when another process is
        reaping."""
        # Short-lived and extended as it goes: a reaper killed mid-pass must not stop the others for long.
        lock = self.limiter.redis.lock(REAPER_LOCK_KEY, timeout=REAPER_LOCK_SECONDS, blocking=False)
        if not lock.acquire():
            return None
        try:
            self.queue.check_epoch()
            report = ReapReport()
            grace_ms = int(max(OUTBOX_GRACE_MIN_SECONDS, 2 * get_config().worker.heartbeat_interval_seconds) * 1000)
            namespaces = self.limiter.namespaces()
            for start in range(0, len(namespaces), REAP_NAMESPACES_PER_ROUND):
                batch = namespaces[start : start + REAP_NAMESPACES_PER_ROUND]
                idle, left_behind = [], []
                for namespace, reaped in self.limiter.reap(batch, grace_ms).items():
                    report.requeued += reaped.requeued
                    report.crashed += reaped.crashed
                    report.applied += len(reaped.records)
                    report.dispatched += len(reaped.dispatched)
                    if reaped.idle or (reaped.records and self.apply(reaped.records)):
                        idle.append(namespace)
                    if reaped.left_behind:
                        left_behind.append(namespace)
                # What killed processes left in the journals (the living write their own).
                try:
                    self.queue.journal.flush(left_behind, keep_alive=lambda: _extend(lock))
                except Exception:
                    logger.exception("could not write the journals to the ledger; the next pass will")
                self.limiter.unlist_if_idle(idle)
                _extend(lock)
            return report
        finally:
            with contextlib.suppress(LockError):  # a pass longer than the lock: another reaper may run now
                lock.release()

    def redis_kept_its_data(self) -> bool:
        """True when Redis has its epoch marker. Otherwise it lost its data (or is new): it is repaired
        from the ledger first, and False is returned: an attempt that found its lease gone asks again,
        since a started job gets its lease back."""
        return self.queue.check_epoch()


def _extend(lock: Lock) -> None:
    """Keep the lock a while longer (lost meanwhile: another process may hold it now)."""
    with contextlib.suppress(LockError):
        lock.reacquire()


def _ended_by_its_cache_entry(job: Job) -> tuple[Ending, int, str | None] | None:
    """A started job whose cache entry is newer than its start wrote its outcome: the attempt ended (its
    end was lost with Redis' data). Its ending, the fence of its entry and its error code."""
    try:
        entry = cache.get_response(job.step, job.dataset, job.config, job.split)
    except CachedResponseNotFoundError:
        return None
    if entry.fence is None or entry.fence <= job.fence:
        return None
    if entry.is_success:
        return Ending.SUCCESS, entry.fence, None
    return Ending.ERROR, entry.fence, entry.error_code


def _outcome_in_cache(record: Record) -> tuple[Mapping[str, Any] | None, CacheableError | None]:
    """The outcome an ended attempt wrote, read back from its cache entry (an end applied by the reaper);
    nothing when a newer entry replaced it (the newer attempt schedules what follows)."""
    payload = record.payload
    try:
        entry = cache.get_response(payload.step, payload.dataset, payload.config, payload.split)
    except CachedResponseNotFoundError:
        return None, None
    if entry.fence != record.fence:
        return None, None
    if entry.is_success:
        return entry.content, None
    error = CacheableError(str(entry.content.get("error")))
    error.http_status = HTTPStatus(entry.http_status)
    error.error_code = entry.error_code or error.error_code
    return None, error

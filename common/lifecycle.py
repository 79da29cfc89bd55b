"""How a started job runs and ends: start, heartbeat, the one way out, and the reaper's pass.

An attempt is a job's run under one lease token. Every ending goes through :meth:`Lifecycle.end` —
the step's success or typed error, the soft or hard time limit, a revoke, a cancel — or, for a crash
the reaper found, through the end record the reaper's script made. Either way::

    renew(fence)            the attempt still holds its lease?   no: it is stale and writes nothing
    cache entry             stamped with the fence; written only while the attempt's claim on it holds
    limiter end (Lua)       forget the job, record END in the outbox and the ledger's transition in the
                            journal, lease freed slots (DISPATCH records)
    apply(records)          events, next steps, metrics; publish the dispatched jobs; then drop the
                            records from the outbox

What the caller cannot apply (a lost reply, Mongo down, a SIGKILL) stays in the outbox and the
reaper's next pass applies it: every effect is idempotent and fenced, so applying twice is harmless
(events are delivered at least once). The end of a job and its fan-out are one resumable unit.

Before its step runs, an attempt's start is durable: written to the ledger (with the journal it is in,
which checks that Redis has not rolled back), its cache entry claimed, its lease checked again. A repair
then never hands out a second lease for a job whose attempt may be running: the ledger says it started.
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
from common.exceptions import (
    CacheableError,
    CachedResponseNotFoundError,
    JobManagerCrashedError,
    StepNotKnownError,
    UnknownStepError,
)
from common.processing_graph import get_processing_graph
from common.progress import ProgressMeta
from common.queue import Job, JobPayload, JobStatus, Queue
from common.queue.ledger import JournalEntry
from common.queue.limiter import Ending, EndRecorded, LeaseState, Reaped, Record, Renewal
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
    fence: int = 0  # its start fence (0: unknown, as a worker's main process knows it): its claim on the entry
    started: str = field(default="", compare=False)  # its start's journal entry ("" when confirmed again)

    @property
    def writer(self) -> cache.Writer:
        return cache.Writer(self.payload.job_id, self.fence or None)


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
        started by another delivery, once its start is durable (`_make_durable`). None: drop the message
        (a stale or cancelled one, or a start that could not be made durable: its job is given back
        unstarted, for the reaper's next promotion), and run nothing."""
        confirmation = self.limiter.confirm(payload.namespace, payload.job_id, token, delivery, worker)
        if not confirmation.run:
            return None
        attempt = Attempt(payload, token, confirmation.attempt, confirmation.fence, confirmation.started)
        try:
            state = self._make_durable(attempt)
        except Exception:
            logger.exception("could not make the start of job %s durable; it waits again", payload.job_id)
            with contextlib.suppress(Exception):  # (or its lease lapses, and the reaper requeues it)
                self.limiter.unstart(payload.namespace, payload.job_id, token, attempt.fence)
            return None
        if state == LeaseState.CANCELLED:
            self.end(attempt, CANCELLED)
        return attempt if state == LeaseState.RUNNING else None

    def _make_durable(self, attempt: Attempt) -> LeaseState:
        """Before the step runs: the start in the ledger (written at once; if refused, the namespace's
        journal is written, which also finds a Redis that rolled back, and the ledger read back: it takes
        no start over another one), the cache entry claimed for this attempt, then the lease asked again:
        a repair that read the ledger before the start restored the job as not started, and this attempt
        finds its lease gone."""
        payload = attempt.payload
        if not (attempt.started and self.ledger.record_start(JournalEntry.parse(attempt.started))):
            # Refused, or a repeated confirm: the journal before it may hold a requeue the ledger has not
            # seen, or Redis rolled back (the journal's write finds it); then the ledger says.
            self.queue.journal.flush([payload.namespace])
            recorded = self.ledger.get(payload.job_id)
            if recorded is None or recorded.status != JobStatus.STARTED or recorded.fence != attempt.fence:
                # The ledger did not take this start: the job ended, or another start of it is recorded (a
                # Redis that rolled back confirmed its message again). It does not run.
                return LeaseState.LOST
        if not cache.claim_entry(payload.step, payload.dataset, payload.config, payload.split, attempt.writer):
            return LeaseState.LOST  # a newer attempt of the job claimed it
        return self.renew(attempt)

    def record_start(self, attempt: Attempt, worker: str) -> None:
        """The events and the metrics learn of the start (a worker does it beside the step, in a thread of
        its own; the ledger knows already)."""
        self.queue.emit(JobStarted, attempt.payload, worker=worker, attempt=attempt.number)
        metrics.job_started(attempt.payload.step)

    def _renew(self, attempt: Attempt, fence: bool = False) -> Renewal:
        """Renew the lease of this attempt; LOST only once Redis is known to be as the ledger left it
        (markers and generation): after a loss or a rollback, the repair gives started attempts their
        leases back."""
        payload = attempt.payload
        args = (payload.namespace, payload.job_id, attempt.token)
        renewal = self.limiter.renew(*args, fence=fence, start=attempt.fence)
        if renewal.state == LeaseState.LOST and not self.queue.check_epoch(deep=True):
            renewal = self.limiter.renew(*args, fence=fence, start=attempt.fence)
        return renewal

    def renew(self, attempt: Attempt) -> LeaseState:
        """Keep the attempt's lease (Redis only, unless it finds it gone: this never waits on Mongo)."""
        return self._renew(attempt).state

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
            payload.step, payload.dataset, payload.config, payload.split, meta["fraction"], attempt.writer
        )
        self.queue.emit(JobProgress, payload, **meta)
        return True

    # --- the one way out -----------------------------------------------------------------------------

    def end(self, attempt: Attempt, outcome: Outcome) -> bool:
        """End the attempt with this outcome, whatever ended it; False (and nothing written anywhere)
        when the attempt is stale: its lease was taken back, or the job ended otherwise."""
        payload = attempt.payload
        renewal = self._renew(attempt, fence=True)
        if renewal.state == LeaseState.LOST:
            return False
        # The attempt that holds the lease (a worker's main process does not know its start fence).
        attempt = Attempt(payload, attempt.token, attempt.number, attempt.fence or renewal.start)
        if renewal.state == LeaseState.CANCELLED:
            outcome = CANCELLED
        elif outcome.ending in (Ending.SUCCESS, Ending.ERROR):
            outcome = self._write_cache(attempt, outcome, renewal.fence)
        error_code = outcome.error.error_code if outcome.error is not None else None
        ended = self.limiter.end(payload, attempt.token, renewal.fence, outcome.ending, error_code, attempt.fence)
        if ended.record is None:
            return False  # taken back meanwhile: its claim went to the newer attempt, which writes
        self.apply([ended.record, *ended.dispatched], outcome)
        if ended.wants is not None:  # its slot is about to be free: idle, unless a job waits for it
            self.queue.borrow_soon({payload.namespace: ended.wants})
        return True

    def _write_cache(self, attempt: Attempt, outcome: Outcome, fence: int) -> Outcome:
        """The attempt's response, stamped with its fence, written only while its claim on the entry holds;
        content that cannot be stored is replaced by the typed error that says why. A claim a stale attempt
        took late is taken back (this attempt holds the lease); a claim released (a cancel) or an entry
        removed (a delete) ends the attempt as cancelled, having written nothing."""
        for _ in range(2):
            outcome, written = self._write_response(attempt, outcome, fence)
            if written:
                return outcome
            payload = attempt.payload
            key = (payload.step, payload.dataset, payload.config, payload.split)
            # Taken back only if the entry is there: a delete's removal is final (no placeholder again).
            if self.renew(attempt) != LeaseState.RUNNING or not cache.claim_entry(*key, attempt.writer, create=False):
                break
        logger.warning(
            "job %s: its entry was released or removed while it ran; it writes nothing", attempt.payload.job_id
        )
        return CANCELLED

    def _write_response(self, attempt: Attempt, outcome: Outcome, fence: int) -> tuple[Outcome, bool]:
        payload, writer = attempt.payload, attempt.writer
        if outcome.error is None:
            try:
                written = cache.upsert_response(
                    payload.step,
                    payload.dataset,
                    outcome.content or {},
                    config=payload.config,
                    split=payload.split,
                    dataset_git_revision=outcome.revision,
                    duration=outcome.duration,
                    fence=fence,
                    writer=writer,
                )
                return outcome, written
            except CacheableError as error:
                outcome = Outcome.failure(error, outcome.duration, outcome.revision)
        assert outcome.error is not None
        written = cache.upsert_error(
            payload.step,
            payload.dataset,
            outcome.error,
            config=payload.config,
            split=payload.split,
            dataset_git_revision=outcome.revision,
            duration=outcome.duration,
            fence=fence,
            writer=writer,
        )
        return outcome, written

    def apply(self, records: Sequence[Record], outcome: Outcome | None = None) -> bool:
        """Carry out records of one namespace (an end with the outcome its own attempt knows, when it is
        there); what fails stays in the outbox for the reaper. True when the namespace has nothing left."""
        return self.queue.apply(records, end=lambda record: self._apply_end(record, outcome))

    def _apply_end(self, record: Record, outcome: Outcome | None) -> list[Event]:
        """The end's effects outside Redis (cache of a crash, next steps, metrics); its events. Each is safe
        to repeat: the crash's cache write is the job's own (its claim) and stamped with the record's fence;
        the children have ids of their own (`enqueue_next`); events are delivered at least once, each with
        the job's key; the metrics count once per process that applies it (a repeat is a reaper's, rare)."""
        payload, ending = record.payload, record.ending or Ending.ERROR
        unknown_here = payload.step not in get_processing_graph()
        if unknown_here and ending != Ending.CANCELLED and record.error_code != StepNotKnownError.error_code:
            # A user's step this process does not import: its effects (a crash's entry, its children) are
            # planned by a process that knows it; the record waits for one (common/queue/queue.py).
            raise UnknownStepError(f"step {payload.step!r} is not in this process's graph")
        content: Mapping[str, Any] | None = None
        error: CacheableError | None = None
        if ending == Ending.CANCELLED:
            cache.release_claims([payload.job_id])  # a placeholder it claimed after it was cancelled
        elif ending == Ending.CRASHED:
            crash = JobManagerCrashedError(f"the job's worker stopped sending heartbeats {record.attempt} times")
            # The job's claim, taken over under the crash's fence: a paused attempt's write is refused.
            writer = cache.Writer(payload.job_id, take_over=record.fence)
            if cache.upsert_error(
                payload.step, payload.dataset, crash, payload.config, payload.split, fence=record.fence, writer=writer
            ):
                error = crash  # (never claimed, or its entry deleted meanwhile: no entry, nothing follows)
            else:  # applied again: the crash's entry is there from the first time (its fence says so)
                content, error = _outcome_in_cache(record)
        elif outcome is not None:
            content, error = outcome.content, outcome.error
        else:
            content, error = _outcome_in_cache(record)
        error_code = error.error_code if error is not None else record.error_code
        if ending != Ending.CANCELLED and (content is not None or error is not None):
            self.enqueue_next(record, content, error, again=outcome is None)
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
        self, record: Record, content: Mapping[str, Any] | None, error: CacheableError | None, again: bool
    ) -> None:
        """Carry out what the processing graph asks for after this ending (children inherit its priority).
        Each child's job id is derived from the ending (its job and fence) and the child's key, so applying
        the end twice (`again`: the reaper's, a repair's) enqueues none twice: a child still in Redis is
        refused by admit.lua, one that ended already is found in the ledger (its journal written first)."""
        payload = record.payload
        key = orchestrator.JobKey(payload.step, payload.dataset, payload.config, payload.split)
        parent = orchestrator.Parent(payload.job_id, record.fence, again, record.at_ms)
        orchestrator.after_job(self.queue, key, content, error, payload.priority, parent)

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
            self.queue.check_epoch(deep=True)
            report = ReapReport()
            grace_ms = int(max(OUTBOX_GRACE_MIN_SECONDS, 2 * get_config().worker.heartbeat_interval_seconds) * 1000)
            namespaces = self.limiter.namespaces()
            for start in range(0, len(namespaces), REAP_NAMESPACES_PER_ROUND):
                batch = namespaces[start : start + REAP_NAMESPACES_PER_ROUND]
                idle, left_behind = [], []
                reaped_batch = self.limiter.reap(batch, grace_ms)
                for namespace, reaped in reaped_batch.items():
                    _release(reaped)
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
                # A worker that joined since, or borrowers no end has served: the fleet's idle slots.
                self.queue.borrow({ns: reaped.wants for ns, reaped in reaped_batch.items() if reaped.wants})
                _extend(lock)
            return report
        finally:
            with contextlib.suppress(LockError):  # a pass longer than the lock: another reaper may run now
                lock.release()

    def redis_kept_its_data(self) -> bool:
        """True when Redis is as the ledger left it (markers and generation). Otherwise it lost its data,
        rolled back or is new: it is repaired from the ledger first, and False is returned."""
        return self.queue.check_epoch(deep=True)


def _release(reaped: Reaped) -> None:
    """The lapsed attempts of the requeued jobs write nothing from now on (the next attempt claims again).
    Not retried beyond the store's retries: until it lands, a lapsed attempt's write may still land, and
    the next attempt's claim then refuses it and replaces its entry."""
    if not reaped.requeued:
        return
    try:
        cache.release_claims(reaped.requeued, before=reaped.fence)
    except Exception:
        logger.exception("could not release the claims of %s requeued jobs", len(reaped.requeued))


def _extend(lock: Lock) -> None:
    """Keep the lock a while longer (lost meanwhile: another process may hold it now)."""
    with contextlib.suppress(LockError):
        lock.reacquire()


def _ended_by_its_cache_entry(job: Job) -> EndRecorded | None:
    """A started job whose cache entry its own attempt wrote reached its end (Redis forgot it: lost with its
    data, or rolled back). Its ending, the fence of its entry and its error code."""
    try:
        entry = cache.get_response(job.step, job.dataset, job.config, job.split)
    except CachedResponseNotFoundError:
        return None
    if entry.job_id != job.job_id or entry.job_fence != job.fence or entry.fence is None:
        return None  # not written, or written by an earlier attempt of the job (the ledger's is another)
    at = int(entry.updated_at.timestamp() * 1000)
    if entry.is_success:
        return EndRecorded(Ending.SUCCESS, entry.fence, None, at)
    return EndRecorded(Ending.ERROR, entry.fence, entry.error_code, at)


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

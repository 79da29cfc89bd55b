"""The Queue: the ledger and the limiter working together, as callers and operators use them.

It knows neither the processing graph's plans (common/orchestrator.py) nor how a started job ends
(common/lifecycle.py) nor how events are followed (common/follow.py).

    enqueue  -> limiter.admit (dedupe, journal: waiting) -> records: dispatch (journal: queued) -> publish
    cancel   -> limiter.cancel -> records: cancel (journal: cancelled); started jobs are revoked
    set_limit, reconcile -> records: dispatch

Every limiter call returns the outbox records it made; `apply` carries out the dispatch and cancel ones
(messages, events) and drops them from the outbox. A record left behind (an exception, a lost reply, a
SIGKILL) is applied by the reaper's next pass. The ledger follows what the scripts journaled
(common/queue/journal.py): enqueueing writes to Redis only. It does not know Celery: a
:class:`Dispatcher` publishes the messages and revokes started jobs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from redis.exceptions import LockError
from redis.lock import Lock

from common import cache
from common.config import get_config
from common.event_bus import EventBus
from common.events import (
    JOB_KEY_FIELDS,
    Event,
    JobCancelled,
    JobQueued,
)
from common.exceptions import (
    InvalidArgumentsError,
    MissingStepInputError,
    UnknownStepError,
)
from common.names import namespace_of, validate_key
from common.processing_graph import InputType, ProcessingStep, get_processing_graph
from common.queue.borrowing import Borrowers, Capacity, Coalescing
from common.queue.epoch import Generation, epoch_keys, epoch_markers, kept_its_data
from common.queue.jobs import (
    PENDING_STATUSES,
    Dispatch,
    Job,
    JobPayload,
    JobStatus,
    Priority,
    unicity_id,
)
from common.queue.journal import Journal
from common.queue.ledger import JournalEntry, Ledger
from common.queue.limiter import (
    FENCE_EPOCH_MS,
    Ending,
    EndRecorded,
    NamespaceCounts,
    NamespaceLimiter,
    Policy,
    Record,
    RecordKind,
    Wants,
)
from common.redis_cluster import ScriptBatch, all_exist
from common.redis_connection import get_redis

logger = logging.getLogger(__name__)
ENQUEUE_BATCH = 10_000  # jobs per Redis round trip of enqueue_many
REPAIR_LOCK_KEY = "stepcache:repair"
REPAIR_LOCK_SECONDS = 60
REPAIR_ATTEMPTS = 3
RESYNC_BATCH = 1_000  # jobs per round trip of a repair
RESYNC_READ_BATCH = 10_000  # ledger documents per read of a repair
CRASHED_ERROR_CODE = "JobManagerCrashedError"
# Set the marker only if the repair's own key survived it.
MARK_EPOCH = """if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0"""


class Dispatcher(Protocol):
    """Publishes the messages of jobs that got a slot, and stops started jobs (Celery, in tasks/)."""

    def publish(self, dispatch: Dispatch) -> None: ...

    def revoke(self, job_ids: Sequence[str]) -> None: ...


def age_of(job: Job) -> int:
    """A job's place in line: the limiter's fence of its admission (from its creation time, for a job
    recorded without it)."""
    if job.age is not None:
        return job.age
    return int((job.created_at.timestamp() * 1000 - FENCE_EPOCH_MS) * 1000)


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


class JobInput(NamedTuple):
    """What a job is asked for: a step and the dataset (and config, split) it runs on."""

    step: str
    dataset: str
    config: str | None = None
    split: str | None = None


def new_job(item: JobInput, priority: Priority, revision: str | None, job_id: str | None = None) -> Job:
    """A waiting job for this input, validated (a typed InvalidInputError otherwise)."""
    processing_step = get_processing_graph().get_step(item.step)
    dataset, config, split = validate_key(item.dataset, item.config, item.split)
    check_step_input(processing_step, config, split)
    return Job(
        job_id=job_id or str(uuid.uuid4()),
        step=item.step,
        dataset=dataset,
        config=config,
        split=split,
        namespace=namespace_of(dataset),
        revision=revision,
        priority=priority,
        status=JobStatus.WAITING,
        unicity_id=unicity_id(item.step, dataset, config, split),
        created_at=datetime.now(UTC),
    )


def job_events(payload: JobPayload, *events: tuple[type[Event], dict[str, Any]]) -> list[Event]:
    """Events about this job: each kind with its fields, and the job's key."""
    key = payload.model_dump(include=JOB_KEY_FIELDS)
    return [kind(**key, **fields) for kind, fields in events]


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
        ledger_lag_seconds: float | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.ledger = ledger
        self.limiter = limiter
        # Without a measure of the fleet's capacity (a dispatcher that is not Celery's), nothing borrows.
        self.borrowers = Borrowers(limiter, capacity) if capacity is not None else None
        self._borrowing = Coalescing(self.borrow, "stepcache-borrow")
        self.events = events if events is not None else EventBus(limiter.redis)
        lag = ledger_lag_seconds if ledger_lag_seconds is not None else get_config().queue.ledger_lag_seconds
        self.generation = Generation(limiter.redis)
        self.journal = Journal(limiter, ledger, lag, self.generation)
        self.journal.markers = lambda: epoch_markers(limiter.redis)
        self.journal.on_repair = self._restore_written
        self.journal.on_rollback = self._rolled_back
        # The end of a started job that Redis lost with its data, if what it wrote elsewhere tells it (the
        # lifecycle's: its cache entry). The repair gives it its end back.
        self.ended_elsewhere: Callable[[Job], EndRecorded | None] = lambda job: None
        self._mark_epoch = limiter.redis.register_script(MARK_EPOCH)

    def emit(self, kind: type[Event], payload: JobPayload, **fields: Any) -> None:
        """Publish an event about this job; a failure to publish is logged, never fatal to the job."""
        self.emit_all(payload, (kind, fields))

    def emit_all(self, payload: JobPayload, *events: tuple[type[Event], dict[str, Any]]) -> None:
        """Publish events about this job, in order, in one round trip (a failure is logged, never fatal)."""
        self._publish(job_events(payload, *events))

    def _publish(self, events: Sequence[Event]) -> None:
        try:
            self.events.publish_many(events)
        except Exception:
            logger.exception("could not publish %s", [event.type for event in events])

    @classmethod
    def from_config(cls, dispatcher: Dispatcher, capacity: Capacity | None = None) -> Queue:
        settings = get_config()
        limiter = NamespaceLimiter(
            get_redis(settings.queue.redis_url),
            default_limit=settings.queue.max_jobs_per_namespace,
            started_ttl_seconds=settings.worker.lease_ttl_seconds,
            queued_ttl_seconds=settings.worker.queued_lease_seconds,
            max_attempts=settings.worker.max_attempts,
            default_borrow=settings.queue.borrow,
        )
        return cls(dispatcher, Ledger(), limiter, capacity=capacity)

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
        return self.enqueue_many([JobInput(step, dataset, config, split)], priority, revision)[0]

    def enqueue_many(
        self,
        inputs: Sequence[JobInput],
        priority: object = Priority.NORMAL,
        revision: str | None = None,
        job_ids: Sequence[str] | None = None,
        once_since: datetime | None = None,
        once: bool = False,
    ) -> list[Job]:
        """Validate every input (a typed error for the first bad one, and nothing written), admit them in
        one Redis round trip per ENQUEUE_BATCH (the ledger follows within QUEUE_LEDGER_LAG_SECONDS), then
        publish the jobs that got a slot; returns each input's job (the identical pending job's id
        instead, when there is one). With `job_ids`, the jobs have these ids (admit.lua refuses one Redis
        knows). `once_since` (an ending applied again): once their namespaces' journals are written, a job
        the ledger has is not admitted again (it is returned as the ledger has it), nor one whose key had a
        job waiting, queued, or started since then (the twin the first admission was deduped to). `once`:
        the first of these only (a fan-in job, named by its inputs, that another ending enqueued)."""
        ids: Sequence[str | None] = job_ids if job_ids is not None else [None] * len(inputs)
        jobs = [
            new_job(JobInput(*item), parse_priority(priority), revision, job_id)
            for item, job_id in zip(inputs, ids, strict=True)
        ]
        if (once_since is not None or once) and jobs:
            self.journal.flush(sorted({job.namespace for job in jobs}))
            existing = {job.job_id: job for job in self.ledger.jobs_by_id(job.job_id for job in jobs)}
            served = self.ledger.served_since([job.unicity_id for job in jobs], once_since) if once_since else set()
            fresh = [job for job in jobs if job.job_id not in existing and job.unicity_id not in served]
            if len(fresh) < len(jobs):
                logger.info("%s of %s jobs were enqueued already: not again", len(jobs) - len(fresh), len(jobs))
            return list(existing.values()) + self.enqueue_many(
                [JobInput(job.step, job.dataset, job.config, job.split) for job in fresh],
                priority,
                revision,
                [job.job_id for job in fresh],
            )
        recorded: list[Job] = []
        for start in range(0, len(jobs), ENQUEUE_BATCH):
            batch = jobs[start : start + ENQUEUE_BATCH]
            # Redis that lost its data gets its started jobs back first: a slot is never leased twice.
            self.check_epoch()
            admission = self.limiter.admit_many([job.payload() for job in batch], revision)
            self._apply_by_namespace(admission.dispatched)
            self.borrow(admission.wanting)
            recorded += [
                job if job_id == job.job_id else job.model_copy(update={"job_id": job_id})
                for job, job_id in zip(batch, admission.job_ids, strict=True)
            ]
        return recorded

    def apply(self, records: Sequence[Record], end: Callable[[Record], list[Event]] | None = None) -> bool:
        """Carry out records of one namespace, the dispatches first (a freed slot never waits for the rest),
        ends through `end` (the lifecycle's); then publish their events and drop them from the outbox, in
        one round trip. One that fails stays there for the reaper. True when the namespace has nothing left."""
        done: list[Record] = []
        events: list[Event] = []
        for record in sorted(records, key=lambda record: record.kind == RecordKind.END):
            try:
                events += end(record) if record.kind == RecordKind.END and end is not None else self._apply(record)
                done.append(record)
            except UnknownStepError as error:  # a user's step this process does not import (common/orchestrator.py)
                job_id = record.payload.job_id
                logger.warning("%s of job %s left for a process that knows its step: %s", record.kind, job_id, error)
            except Exception:
                logger.exception("could not apply %s of job %s; the reaper will", record.kind, record.payload.job_id)
        if not done:
            self._publish(events)
            return False
        namespace = done[0].payload.namespace
        batch = ScriptBatch(self.limiter.redis)
        self.events.add(batch.pipe, events)
        self.limiter.add_applied(batch, namespace, done)
        try:
            return bool(batch.execute()[-1])
        except Exception:
            logger.exception("could not publish the events of %s records and drop them; trying apart", len(done))
        self._publish(events)
        return self.limiter.applied(namespace, done)

    def _apply(self, record: Record) -> list[Event]:
        payload = record.payload
        if record.kind == RecordKind.DISPATCH:
            # Safe to repeat: a second message of the same lease token is dropped by confirm.lua (one
            # delivery per token starts), and its JobQueued event is delivered at least once anyway.
            try:
                self.dispatcher.publish(record.dispatch)
            except Exception:
                # Back to the waiting room: the reaper's next pass (or a release) dispatches it anew.
                logger.exception("could not publish job %s; it waits again", payload.job_id)
                self.limiter.unlease(payload.namespace, payload.job_id, record.token)
                return []
            return job_events(payload, (JobQueued, {"priority": payload.priority.value}))
        if record.kind == RecordKind.CANCEL:
            return job_events(payload, (JobCancelled, {}))
        if record.kind == RecordKind.REQUEUE:  # all in the journal
            return []
        raise ValueError(f"the queue does not apply {record.kind} records")

    # --- operators -----------------------------------------------------------------------------------

    def cancel(self, dataset: str, revoke_started: bool = False) -> list[Job]:
        """Cancel every waiting or queued job of the dataset, and its started ones if asked to: those keep
        their slot until their process is gone, and end as cancelled."""
        dataset, _, _ = validate_key(dataset, None, None)
        statuses = [*PENDING_STATUSES, *([JobStatus.STARTED] if revoke_started else [])]
        jobs = self.jobs(dataset, statuses)
        self.cancel_jobs(namespace_of(dataset), [job.job_id for job in jobs])
        return jobs

    def cancel_jobs(self, namespace: str, job_ids: Sequence[str]) -> None:
        """Cancel these jobs of one namespace (waiting, queued, or started: those are revoked)."""
        if not job_ids:
            return
        cancellation = self.limiter.cancel(namespace, job_ids)
        # From now on their attempts write nothing, even one that got its fence before the cancel (or a
        # requeued job's earlier attempt, paused past its lease).
        cache.release_claims(job_ids, before=cancellation.fence)
        self.apply([*cancellation.records, *cancellation.dispatched])
        if cancellation.started:
            self.dispatcher.revoke(cancellation.started)

    def jobs(self, dataset: str | None = None, statuses: Sequence[JobStatus] | None = None) -> list[Job]:
        """Jobs in the ledger, once the journals of their namespace (of every namespace, without a
        dataset) are written: every transition decided before the call is there."""
        if dataset is None:
            self.journal.flush_all()
        else:
            self.journal.flush([namespace_of(dataset)])
        return self.ledger.jobs(dataset, statuses)

    def in_process(self, dataset: str) -> list[Job]:
        """The dataset's jobs waiting, queued or started, or ended with their next steps still to enqueue,
        once its namespace's journal is written (see `Ledger.in_process`)."""
        dataset, _, _ = validate_key(dataset, None, None)
        self.journal.flush([namespace_of(dataset)])
        return self.ledger.in_process(dataset)

    def job(self, job_id: str) -> Job | None:
        """A job in the ledger, once every journal is written (reads the ledger itself for no wait)."""
        self.journal.flush_all()
        return self.ledger.get(job_id)

    def counts(self) -> dict[str, NamespaceCounts]:
        """Waiting, queued and started jobs of every namespace the limiter knows."""
        return {namespace: self.limiter.counts(namespace) for namespace in self.limiter.namespaces()}

    def set_limit(self, namespace: str, limit: int | None) -> None:
        """Override one namespace's limit (0 pauses it) or, with None, go back to the default."""
        self.apply(self.limiter.set_limit(namespace_of(namespace), limit))

    def set_policy(self, namespace: str, policy: Policy | None) -> None:
        """Change the borrowing overrides a Policy gives (its None fields stay as they are); None: back to
        the defaults. A namespace that may borrow now does at once, if the fleet has idle capacity."""
        namespace = namespace_of(namespace)
        if policy is None:
            self.limiter.set_policy(namespace, Policy())
            return
        current = self.limiter.policy(namespace)
        merged = Policy(
            current.borrow if policy.borrow is None else policy.borrow,
            current.ceiling if policy.ceiling is None else policy.ceiling,
            current.weight if policy.weight is None else policy.weight,
        )
        self.limiter.set_policy(namespace, merged)
        self.borrow({namespace: (0.0, merged.weight or 1.0)})

    def get_limit(self, namespace: str) -> tuple[int, bool]:
        return self.limiter.get_limit(namespace_of(namespace))

    def reconcile(self) -> int:
        """Make Redis agree with the ledger (see `repair`), then lease free slots; how many jobs took the
        ledger's state. An operator's command: the repair runs by itself whenever Redis lost its data or
        rolled back."""
        self.journal.flush_all()  # the ledger says what Redis decided: nothing ended comes back
        resynced = self._resync_all()
        self._restore_pending_effects()
        self._promote_all()
        return resynced

    def _resync_all(self, keep_alive: Callable[[], object] = lambda: None) -> int:
        """Every job the ledger says is unfinished, and every job Redis knows, made to agree (resync.lua):
        what the ledger says ended is forgotten, what it says is unfinished is known to Redis again, at the
        state of the newer side. Started jobs first: a started job owns its cache entry before its blocked
        twin is parked. Cost follows active work: the ledger's unfinished jobs and Redis' live ones."""
        unfinished = self.ledger.unfinished()
        known = {job.job_id for job in unfinished}
        in_redis = [job_id for namespace in self.limiter.namespaces() for job_id in self.limiter.job_ids(namespace)]
        others = [job_id for job_id in in_redis if job_id not in known]
        ended = [
            job
            for start in range(0, len(others), RESYNC_READ_BATCH)
            for job in self.ledger.jobs_by_id(others[start : start + RESYNC_READ_BATCH])
            if job.status.is_terminal
        ]
        jobs = unfinished + ended
        return self._resync(jobs, keep_alive)

    def _resync(self, jobs: Sequence[Job], keep_alive: Callable[[], object] = lambda: None) -> int:
        resynced = 0
        ordered = sorted(jobs, key=lambda job: job.status != JobStatus.STARTED)
        for start in range(0, len(ordered), RESYNC_BATCH):
            keep_alive()
            batch = []
            for job in ordered[start : start + RESYNC_BATCH]:
                ended = self.ended_elsewhere(job) if job.status == JobStatus.STARTED else None
                if ended is None:
                    batch.append((job, age_of(job)))
                    continue
                logger.warning("job %s had ended (%s): its end is recorded again, not its lease", job.job_id, ended)
                self.limiter.restore_end(job.payload(), job.lease_token or "", job.attempts, ended)
            resynced += self.limiter.resync(batch)
            # Those that ended since the ledger was read, their journal written and gone already (a live
            # end): the ledger says so now, and the end wins (resync.lua), before a slot goes to them.
            read = {job.job_id: job.status for job, _ in batch if not job.status.is_terminal}
            since = [job for job in self.ledger.jobs_by_id(read) if job.status.is_terminal]
            self.limiter.resync([(job, age_of(job)) for job in since])
        return resynced

    def _restore_pending_effects(self) -> None:
        """Ends whose effects (next steps, events) the ledger does not call applied, and which Redis has no
        record of: recorded again, for the reaper to apply (idempotently: their children have ids of their
        own, and those the ledger has are not enqueued again)."""
        for job in self.ledger.effects_pending():
            ending = (
                Ending.CRASHED
                if job.error_code == CRASHED_ERROR_CODE
                else Ending.SUCCESS
                if job.status == JobStatus.SUCCESS
                else Ending.ERROR
            )
            at = int(job.finished_at.timestamp() * 1000) if job.finished_at is not None else 0
            end = EndRecorded(ending, job.fence, job.error_code, at)
            if self.limiter.restore_end(job.payload(), job.lease_token or "", job.attempts, end):
                logger.warning("job %s ended; its effects are applied again (Redis forgot them)", job.job_id)

    def _restore_written(self, entries: Sequence[JournalEntry]) -> None:
        """Journal entries were written while Redis lost its data: the repair may have read the ledger
        before them. Once a repair ran (if one still runs elsewhere, it reads the ledger after this write),
        what Redis decided since is written too, then these jobs are made to agree again, as the repair
        would have (a job Redis decided about since keeps Redis' state: resync.lua)."""
        redis = self.limiter.redis
        if not self.check_epoch() and not kept_its_data(redis):
            return
        namespaces = sorted({entry.payload.namespace for entry in entries})
        self.journal.flush(namespaces)
        self._resync(self.ledger.jobs_by_id({entry.payload.job_id for entry in entries}))
        for namespace in namespaces:
            self.apply(self.limiter.promote(namespace))

    def _promote_all(self) -> None:
        for namespace in self.limiter.namespaces():
            self.apply(self.limiter.promote(namespace))

    def borrow_soon(self, wanting: Mapping[str, Wants]) -> None:
        """`borrow`, in a thread of this process: a job's end does not keep its worker slot for it (the
        borrowed message waiting ahead, tasks/capacity.py, takes the slot meanwhile). What it could not do
        (the process died first), the next end or reaper pass does."""
        self._borrowing.submit(wanting)

    def borrow(self, wanting: Mapping[str, Wants]) -> None:
        """Lease idle capacity to the namespaces that want to borrow (common/queue/borrowing.py) and publish
        what it dispatched. Never raises: what it could not do, the reaper's next pass does."""
        if not wanting or self.borrowers is None:
            return
        try:
            self.borrowers.borrow(wanting, self._apply_by_namespace)
        except Exception:
            logger.exception("could not lease idle capacity to %s namespaces; the reaper will", len(wanting))

    def _apply_by_namespace(self, records: Sequence[Record]) -> None:
        by_namespace: dict[str, list[Record]] = {}
        for record in records:
            by_namespace.setdefault(record.payload.namespace, []).append(record)
        for namespace_records in by_namespace.values():
            self.apply(namespace_records)

    def check_epoch(self, deep: bool = False) -> bool:
        """Whether Redis is as the ledger left it: every master has its epoch marker (one round trip) and,
        when `deep` (the reaper's pass, an attempt that lost its lease), no master's generation is behind
        the ledger's (common/queue/epoch.py). Otherwise it lost its data (a flush, a restart without
        persistence, a failover), rolled back (a restart from a snapshot, a replica promoted behind its
        master) or is new: it is repaired first, and False is returned."""
        if kept_its_data(self.limiter.redis) and not (deep and self.generation.behind()):
            return True
        self.repair()
        return False

    def _rolled_back(self) -> None:
        """A write to the ledger found Redis rolled back: every process learns it (the markers go), and
        this one repairs it now."""
        redis = self.limiter.redis
        redis.delete(*epoch_markers(redis))
        self.check_epoch()

    def repair(self) -> None:
        """Make Redis agree with the ledger, one process at a time: its journals written to the ledger first
        (what Redis, or the snapshot it came back from, decided), then every job resynced (see
        `_resync_all`), the ends whose effects are pending recorded again, the markers and the generation
        set, and free slots leased. Slots are leased, and the markers set, only once a whole repair ran
        without Redis losing its data again (otherwise it repairs again); a repair another process finished
        meanwhile is not run twice."""
        redis = self.limiter.redis
        lock = redis.lock(REPAIR_LOCK_KEY, timeout=REPAIR_LOCK_SECONDS, blocking_timeout=REPAIR_LOCK_SECONDS)
        keep_alive = _keeper(lock)
        with contextlib.suppress(LockError), lock:  # a lock lost to a flush: the repair still completes
            # MongoDB recorded a generation of this Redis: it had data (a new Redis is only initialized).
            known = bool(self.generation.recorded())
            for _ in range(REPAIR_ATTEMPTS):
                markers = epoch_keys(redis)
                if all_exist(redis, [epoch for _, epoch in markers]) and not self.generation.behind():
                    break
                repair = uuid.uuid4().hex
                for repairing, _ in markers:
                    redis.set(repairing, repair)
                self.journal.flush_for_repair(keep_alive)
                resynced = self._resync_all(keep_alive)
                self._restore_pending_effects()
                now = datetime.now(UTC).isoformat()
                if all([self._mark_epoch(keys=[repairing, epoch], args=[repair, now]) for repairing, epoch in markers]):
                    self.generation.catch_up()
                    self._promote_all()
                    if known or resynced:
                        logger.warning("Redis lost its data or rolled back: %s jobs took the ledger's state", resynced)
                    else:
                        logger.info("Redis initialized: a new Redis (the ledger has no job for it)")
                    break


def _keeper(lock: Lock) -> Callable[[], None]:
    """Extends the lock when a third of its time has passed: a long repair stays one at a time."""
    extended = [time.monotonic()]

    def keep_alive() -> None:
        if time.monotonic() - extended[0] > REPAIR_LOCK_SECONDS / 3:
            extended[0] = time.monotonic()
            with contextlib.suppress(LockError):
                lock.reacquire()

    return keep_alive

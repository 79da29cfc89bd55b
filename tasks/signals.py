"""The one module that knows Celery's signal names: it translates them into stepcache's hooks.

Every task of the app, steps and plain tasks alike, has its run told on the event stream from here
(common/events.py, `task.*`): task_prerun (started, then a heartbeat every interval while it runs),
task_success, task_failure, task_retry, task_revoked, and task_postrun (dropped: a step's stale or
cancelled message, acknowledged without running). For a step they only observe: its lease, cache entry,
ledger and `job.*` events are written by its one fenced way out (common/lifecycle.py), where a stale
attempt can be kept from writing. What a job's process cannot do, because it is gone or because it is
not a job's business, happens here too:

- setup_logging: stepcache's logging (level and format from COMMON_LOG_*), instead of Celery's;
- worker_init, worker_ready, worker_shutdown (main process): the metrics directory for the pool and the
  libraries that read datasets (imported before the pool forks), the reaper thread, a recount of the
  cache entries (common/cache_counts.py), the metrics HTTP server and the worker's record in the
  registry (common/registry.py: node name, queues, concurrency, metrics URL), renewed until shutdown;
- worker_process_shutdown: a pool process's metrics bookkeeping;
- task_revoked of a terminated job (main process): its attempt ends as cancelled, through the one way
  out, under the killed message's own token (the hard time limit does the same from the step's
  Request, tasks/step_task.py, which alone can keep Celery from storing a stale attempt's FAILURE).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Task, states
from celery.signals import (
    setup_logging,
    task_failure,
    task_postrun,
    task_prerun,
    task_rejected,
    task_retry,
    task_revoked,
    task_success,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from pydantic import SecretStr

from common import cache, cache_counts, metrics, registry
from common.config import get_config
from common.event_bus import EventBus
from common.events import (
    JOB_KEY_FIELDS,
    TaskDropped,
    TaskEvent,
    TaskFailed,
    TaskHeartbeat,
    TaskRetried,
    TaskRevoked,
    TaskStarted,
    TaskSucceeded,
)
from common.exceptions import StepcacheError
from common.lifecycle import CANCELLED
from common.logging import configure_logging
from common.reading import preload_reading
from common.redis_connection import get_redis
from tasks.queue import get_queue
from tasks.reaper import Reaper
from tasks.routing import known_steps, step_queues
from tasks.step_task import StepTask, end_delivered_attempt, message_payload

logger = logging.getLogger(__name__)
_running: dict[str, Any] = {}


# --- task events, for every task -------------------------------------------------------------------


@dataclass
class _Run:
    task: Task
    fields: dict[str, Any]  # what every event of this run carries
    started: float
    next_beat: float


class _Runs:
    """The tasks this process runs, and the thread that tells each one's heartbeat every interval."""

    def __init__(self) -> None:
        self.runs: dict[str, _Run] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid = 0

    def add(self, task_id: str, run: _Run) -> None:
        with self.lock:
            self.runs[task_id] = run
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                # Started lazily, in the process that runs tasks: a forked pool process has no threads.
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._beat, name="stepcache-task-heartbeats", daemon=True)
                self.thread.start()
        self.wake.set()

    def pop(self, task_id: str) -> _Run | None:
        with self.lock:
            return self.runs.pop(task_id, None)

    def get(self, task_id: str) -> _Run | None:
        with self.lock:
            return self.runs.get(task_id)

    def _beat(self) -> None:
        while True:
            interval = get_config().worker.heartbeat_interval_seconds
            with self.lock:
                now = time.monotonic()
                due = [run for run in self.runs.values() if run.next_beat <= now]
                for run in due:
                    run.next_beat = now + interval
                wait = min((run.next_beat for run in self.runs.values()), default=now + interval) - now
                self.wake.clear()
            for run in due:
                _publish(run.task, TaskHeartbeat(**run.fields, running_for=now - run.started))
            self.wake.wait(max(wait, 0.01))


_runs = _Runs()


@functools.cache
def _event_bus(url: str) -> EventBus:
    return EventBus(get_redis(SecretStr(url)))


def _publish(task: Task, event: TaskEvent) -> None:
    """Publish a task event (Redis only: a plain task never waits on MongoDB); a failure to publish is
    logged, never fatal to the task."""
    try:
        _event_bus(get_config().queue.redis_url.get_secret_value()).publish(event)
    except Exception:
        logger.exception("could not publish %s of task %s", event.type, event.task_id)


def _fields(task: Task, task_id: str, args: Any, kwargs: Any, worker: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"task": task.name, "task_id": task_id, "worker": worker}
    if isinstance(task, StepTask):
        # A message with bad arguments: the step drops it, the event says which task.
        with contextlib.suppress(StepcacheError):
            fields |= message_payload(task.name, task_id, args, kwargs, None).model_dump(include=JOB_KEY_FIELDS)
    return fields


def _task_started(
    sender: Task | None = None, task_id: str = "", args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    if sender is None:
        return
    worker = f"{getattr(sender.request, 'hostname', None)}:{os.getpid()}"
    now = time.monotonic()
    interval = get_config().worker.heartbeat_interval_seconds
    run = _Run(sender, _fields(sender, task_id, args, kwargs, worker), now, now + interval)
    _runs.add(task_id, run)
    _publish(sender, TaskStarted(**run.fields))


def _task_succeeded(sender: Task | None = None, **_: Any) -> None:
    run = _runs.get(sender.request.id) if sender is not None else None
    if run is not None:
        _publish(run.task, TaskSucceeded(**run.fields, runtime=time.monotonic() - run.started))


def _task_failed(
    sender: Task | None = None,
    task_id: str = "",
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    run = _runs.get(task_id)
    runtime = time.monotonic() - run.started if run is not None else None
    if run is None and isinstance(sender, Task):
        # Told by the worker's main process (hard time limit, lost pool process): no run here.
        run = _Run(sender, _fields(sender, task_id, args, kwargs, None), 0.0, 0.0)
    if run is not None:
        kind = type(exception).__name__ if exception is not None else "unknown"
        message = str(exception)[:500] if exception is not None else None
        _publish(run.task, TaskFailed(**run.fields, exception=kind, message=message, runtime=runtime))


def _task_ended(sender: Task | None = None, task_id: str = "", state: str | None = None, **_: Any) -> None:
    run = _runs.pop(task_id)
    if run is not None and state == states.IGNORED:
        _publish(run.task, TaskDropped(**run.fields))


def _configure_logging(**_: Any) -> None:
    settings = get_config().common
    configure_logging(settings.log_level, settings.log_format)


def _prepare_pool(**_: Any) -> None:
    metrics.prepare_multiprocess()
    preload_reading()  # once, before the pool forks: no job pays for importing `datasets` (about 2 s)


def _start_worker_services(sender: Any = None, **_: Any) -> None:
    reaper = Reaper()
    reaper.start()
    _running["reaper"] = reaper
    # The kept cache counts repaired once per worker start (off by the writes a crash interrupted).
    threading.Thread(target=_recount_cache_entries, name="stepcache-recount", daemon=True).start()
    settings = get_config().worker
    metrics_url = None
    if settings.metrics_port:
        queue = get_queue()
        live = metrics.LiveCollector(queue.limiter.overview, cache_counts.kept_counts)
        try:
            _running["metrics"] = metrics.serve(settings.metrics_port, settings.metrics_host, live=live)
            metrics_url = registry.metrics_url(settings.metrics_host, settings.metrics_port)
        except OSError as error:
            logger.warning("metrics not served on %s:%s: %s", settings.metrics_host, settings.metrics_port, error)
    describe = functools.partial(_worker_record, sender, metrics_url, datetime.now(UTC))
    _running["registration"] = registry.Registration(describe).start()


def _worker_record(consumer: Any, metrics_url: str | None, started_at: datetime) -> registry.ProcessRecord:
    """The worker's record, read from its consumer at each renewal (its queues may have changed): its graph
    queues apart from the queues of the user's steps it consumes (tasks/routing.py)."""
    consumed = {queue.name for queue in getattr(getattr(consumer, "task_consumer", None), "queues", None) or ()}
    own = set(step_queues(consumer.app, consumed)) & consumed if consumer is not None else set()
    return registry.this_process(
        registry.Role.WORKER,
        started_at,
        node=getattr(consumer, "hostname", None),
        queues=sorted(consumed - own),
        concurrency=getattr(getattr(consumer, "controller", None), "concurrency", None),
        steps=known_steps(consumer.app) if consumer is not None else (),
        step_queues=sorted(own),
        metrics_url=metrics_url,
    )


def _recount_cache_entries() -> None:
    try:
        cache.recount_entries()
    except Exception:
        logger.exception("the cache entries could not be counted again")


def _stop_worker_services(**_: Any) -> None:
    registration = _running.pop("registration", None)
    if registration is not None:
        registration.stop()
    reaper = _running.pop("reaper", None)
    if reaper is not None:
        reaper.stop()
    server = _running.pop("metrics", None)
    if server is not None:
        server.shutdown()


def _forget_pool_process(pid: int | None = None, **_: Any) -> None:
    metrics.mark_process_dead(pid or os.getpid())


def _revoked(sender: Any = None, request: Any = None, terminated: bool = False, signum: Any = None, **_: Any) -> None:
    if request is None:
        return
    if isinstance(sender, Task):
        worker = getattr(request, "hostname", None)
        fields = _fields(sender, request.id, request.args, request.kwargs, worker)
        _publish(sender, TaskRevoked(**fields, terminated=terminated, signal=str(signum) if signum else None))
    if terminated:
        # Its process is gone: the attempt ends as cancelled under the killed message's own token.
        # (Revoked before it ran, it never held a started lease: cancel() handled its slot.)
        end_delivered_attempt(sender, request.id, request.args, request.kwargs, request, CANCELLED)


def _retried(sender: Task | None = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    logger.info("task %s retried: %s", getattr(request, "id", None), reason)
    run = _runs.get(getattr(request, "id", ""))
    if run is not None:
        _publish(run.task, TaskRetried(**run.fields, reason=str(reason)[:500] if reason is not None else None))


def _rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
    logger.warning("a message was rejected: %s", exc)


setup_logging.connect(_configure_logging)
worker_init.connect(_prepare_pool)
worker_ready.connect(_start_worker_services)
worker_shutdown.connect(_stop_worker_services)
worker_process_shutdown.connect(_forget_pool_process)
task_prerun.connect(_task_started)
task_success.connect(_task_succeeded)
task_failure.connect(_task_failed)
task_postrun.connect(_task_ended)
task_revoked.connect(_revoked)
task_retry.connect(_retried)
task_rejected.connect(_rejected)

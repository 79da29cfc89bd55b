"""The one module that knows Celery's signal names: it translates them into stepcache's hooks.

A job's own process confirms its lease, writes the cache and releases the slot (tasks/step_task.py),
because only there can a job be kept from running. What the job's process cannot do, because it is gone
or because it is not a job's business, happens here:

- setup_logging: stepcache's logging (level and format from COMMON_LOG_*), instead of Celery's;
- worker_init, worker_ready, worker_shutdown (main process): the metrics directory for the pool, the
  reaper thread and the metrics HTTP server;
- worker_process_shutdown: a pool process's metrics bookkeeping;
- task_failure with TimeLimitExceeded (main process, after the hard limit killed the job's process):
  cache JobManagerExceededMaximumDurationError, end the job, free its slot;
- task_revoked of a terminated job (main process): end it as cancelled, free its slot;
- task_retry, task_rejected: logged (stepcache's steps neither retry nor reject; a user's code might).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery.signals import (
    setup_logging,
    task_failure,
    task_rejected,
    task_retry,
    task_revoked,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from common import cache, metrics
from common.config import get_config
from common.exceptions import JobManagerExceededMaximumDurationError, StepcacheError
from common.logging import configure_logging
from common.queue.queue import Outcome
from tasks.queue import PRIORITY_HEADER, TOKEN_HEADER, get_queue
from tasks.reaper import Reaper

logger = logging.getLogger(__name__)
_running: dict[str, Any] = {}


def _configure_logging(**_: Any) -> None:
    settings = get_config().common
    configure_logging(settings.log_level, settings.log_format)


def _prepare_pool(**_: Any) -> None:
    metrics.prepare_multiprocess()


def _start_worker_services(**_: Any) -> None:
    reaper = Reaper()
    reaper.start()
    _running["reaper"] = reaper
    port = get_config().worker.metrics_port
    if port:
        queue = get_queue()
        live = metrics.LiveCollector(queue.counts, cache.count_by_status)
        try:
            _running["metrics"] = metrics.serve(port, live)
        except OSError as error:
            logger.warning("metrics not served on port %s: %s", port, error)


def _stop_worker_services(**_: Any) -> None:
    reaper = _running.pop("reaper", None)
    if reaper is not None:
        reaper.stop()
    server = _running.pop("metrics", None)
    if server is not None:
        server.shutdown()


def _forget_pool_process(pid: int | None = None, **_: Any) -> None:
    metrics.mark_process_dead(pid or os.getpid())


def _step_job(sender: Any, job_id: str, args: Any, kwargs: Any, priority: str | None) -> Any:
    """The job of a step task's message, or None for a task that is not a step."""
    from tasks.step_task import StepTask, message_payload

    if not isinstance(sender, StepTask):
        return None
    try:
        return message_payload(sender.name, job_id, args, kwargs, priority)
    except StepcacheError:
        return None


def _hard_time_limit(
    sender: Any = None,
    task_id: str = "",
    exception: Any = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    if not isinstance(exception, TimeLimitExceeded):
        return  # an ordinary failure: the job's own process handled it
    payload = _step_job(sender, task_id, args, kwargs, None)
    if payload is None:
        return
    queue = get_queue()
    token = queue.limiter.lease_token(payload.namespace, payload.job_id)
    error = JobManagerExceededMaximumDurationError(
        f"the job was killed after {get_config().worker.max_job_duration_seconds:.0f}s and a grace period"
    )
    cache.upsert_error(
        payload.step,
        payload.dataset,
        error,
        config=payload.config,
        split=payload.split,
    )
    if token is not None:
        queue.finish(payload, token, Outcome(error.http_status, error.error_code, error.message))
    queue.enqueue_next(payload, None, error)
    metrics.job_finished(payload.step, "error", None)


def _revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    if not terminated or request is None:
        return  # revoked before it ran: it never held a started lease, cancel() handled its slot
    payload = _step_job(sender, request.id, request.args, request.kwargs, getattr(request, PRIORITY_HEADER, None))
    if payload is None:
        return
    queue = get_queue()
    queue.ledger.cancel([payload.job_id])
    token = getattr(request, TOKEN_HEADER, None)  # the killed attempt's own lease, not a newer one
    if token:
        queue.release(payload, token)  # its process is gone: the slot can go to the next job


def _retried(request: Any = None, reason: Any = None, **_: Any) -> None:
    logger.info("task %s retried: %s", getattr(request, "id", None), reason)


def _rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
    logger.warning("a message was rejected: %s", exc)


setup_logging.connect(_configure_logging)
worker_init.connect(_prepare_pool)
worker_ready.connect(_start_worker_services)
worker_shutdown.connect(_stop_worker_services)
worker_process_shutdown.connect(_forget_pool_process)
task_failure.connect(_hard_time_limit)
task_revoked.connect(_revoked)
task_retry.connect(_retried)
task_rejected.connect(_rejected)

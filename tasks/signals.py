"""The one module that knows Celery's signal names: it translates them into stepcache's hooks.

A job's own process confirms its lease and ends its attempt through the one way out
(common/lifecycle.py), because only there can a job be kept from running. What the job's process cannot
do, because it is gone or because it is not a job's business, happens here:

- setup_logging: stepcache's logging (level and format from COMMON_LOG_*), instead of Celery's;
- worker_init, worker_ready, worker_shutdown (main process): the metrics directory for the pool, the
  reaper thread and the metrics HTTP server;
- worker_process_shutdown: a pool process's metrics bookkeeping;
- task_revoked of a terminated job (main process): its attempt ends as cancelled, through the one way
  out, under the killed message's own token (the hard time limit does the same from the step's
  Request, tasks/step_task.py, which alone can keep Celery from storing a stale attempt's FAILURE);
- task_retry, task_rejected: logged (stepcache's steps neither retry nor reject; a user's code might).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import (
    setup_logging,
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
from common.lifecycle import CANCELLED
from common.logging import configure_logging
from tasks.queue import get_queue
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


def _revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    if not terminated or request is None:
        return  # revoked before it ran: it never held a started lease, cancel() handled its slot
    from tasks.step_task import end_delivered_attempt

    # Its process is gone: the attempt ends as cancelled under the killed message's own token.
    end_delivered_attempt(sender, request.id, request.args, request.kwargs, request, CANCELLED)


def _retried(request: Any = None, reason: Any = None, **_: Any) -> None:
    logger.info("task %s retried: %s", getattr(request, "id", None), reason)


def _rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
    logger.warning("a message was rejected: %s", exc)


setup_logging.connect(_configure_logging)
worker_init.connect(_prepare_pool)
worker_ready.connect(_start_worker_services)
worker_shutdown.connect(_stop_worker_services)
worker_process_shutdown.connect(_forget_pool_process)
task_revoked.connect(_revoked)
task_retry.connect(_retried)
task_rejected.connect(_rejected)

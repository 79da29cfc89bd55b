"""This process's Queue and Lifecycle, publishing through the Celery app."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from common.config import AppConfig, get_config
from common.lifecycle import Lifecycle
from common.processing_graph import get_processing_graph
from common.queue import Dispatch, Queue

TOKEN_HEADER = "stepcache_token"
PRIORITY_HEADER = "stepcache_priority"
_current: tuple[AppConfig, Lifecycle] | None = None
_lock = threading.Lock()


class CeleryDispatcher:
    """Publishes a leased job as a Celery message to its step's queue, its lease token in a header."""

    def publish(self, dispatch: Dispatch) -> None:
        from tasks import app

        job = dispatch.payload
        kwargs = {name: value for name, value in (("config", job.config), ("split", job.split)) if value is not None}
        app.send_task(
            job.step,
            args=[job.dataset],
            kwargs=kwargs,
            task_id=job.job_id,
            queue=get_processing_graph().get_step(job.step).queue.value,
            priority=job.priority.celery_priority,
            headers={TOKEN_HEADER: dispatch.token, PRIORITY_HEADER: job.priority.value},
            # The worker's own WORKER_MAX_JOB_DURATION_SECONDS decides, not the publisher's settings.
            time_limit=None,
            soft_time_limit=None,
        )

    def revoke(self, job_ids: Sequence[str]) -> None:
        from tasks import app

        app.control.revoke(list(job_ids), terminate=True, signal="SIGTERM")


def get_lifecycle() -> Lifecycle:
    """The Lifecycle of this process's settings (rebuilt when the settings are re-read, as tests do)."""
    global _current
    settings = get_config()
    with _lock:
        if _current is None or _current[0] is not settings:
            _current = (settings, Lifecycle(Queue.from_config(CeleryDispatcher())))
        return _current[1]


def get_queue() -> Queue:
    """The Queue of this process's settings."""
    return get_lifecycle().queue

"""The Queue and Lifecycle of a Celery app (the current one unless told), publishing through it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from celery import Celery, current_app
from celery import _state as celery_state

from common.config import AppConfig, get_config
from common.lifecycle import Lifecycle
from common.queue import Dispatch, Queue
from tasks.capacity import CeleryCapacity
from tasks.routing import destination

TOKEN_HEADER = "stepcache_token"
PRIORITY_HEADER = "stepcache_priority"
NAMESPACE_HEADER = "stepcache_namespace"  # whose lease a reserved message holds (tasks/capacity.py)
BORROWED_PRIORITY = 9  # the last of the broker's priority steps (celeryconfig.py): after every job's own
_lifecycles: weakref.WeakKeyDictionary[Celery, tuple[AppConfig, Lifecycle]] = weakref.WeakKeyDictionary()
_apps: list[weakref.ref[Celery]] = []  # stepcache's apps (create_app), oldest first
_lock = threading.Lock()


def remember_app(app: Celery) -> None:
    with _lock:
        _apps.append(weakref.ref(app))


def stepcache_apps() -> list[Celery]:
    """The apps create_app built that are still alive, oldest first."""
    with _lock:
        return [app for ref in _apps if (app := ref()) is not None]


def stepcache_app(app: Celery | None = None) -> Celery:
    """`app`, else the current app if it is one of stepcache's, else the process's default app (the latest
    stepcache app built, unless another was made the default since): Celery's current app is per thread,
    and another thread (or a plain Celery() built since) has another one."""
    if app is not None:
        return app
    current = current_app._get_current_object()
    apps = stepcache_apps()
    if current in apps or not apps:
        return current
    default = celery_state.default_app  # create_app makes each new app the process's default
    return default if default in apps else apps[-1]


class CeleryDispatcher:
    """Publishes a leased job as a Celery message to its step's queue, its lease token in a header."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, dispatch: Dispatch, queue: str | None = None) -> None:
        """Publish to `queue`, by default the step's (tasks/routing.py)."""
        job = dispatch.payload
        kwargs = {name: value for name, value in (("config", job.config), ("split", job.split)) if value is not None}
        headers = {TOKEN_HEADER: dispatch.token, PRIORITY_HEADER: job.priority.value, NAMESPACE_HEADER: job.namespace}
        self.app.send_task(
            job.step,
            args=[job.dataset],
            kwargs=kwargs,
            task_id=job.job_id,
            queue=queue or destination(job.step),
            # A borrowed slot's message comes after every other: a namespace under its limit goes first.
            priority=BORROWED_PRIORITY if dispatch.borrowed else job.priority.celery_priority,
            headers=headers,
            # The worker's own WORKER_MAX_JOB_DURATION_SECONDS decides, not the publisher's settings.
            time_limit=None,
            soft_time_limit=None,
            # A job is not its publisher's child: the task that ended before it keeps no result of it alive.
            add_to_parent=False,
        )

    def revoke(self, job_ids: Sequence[str]) -> None:
        self.app.control.revoke(list(job_ids), terminate=True, signal="SIGTERM")


def get_lifecycle(app: Celery | None = None) -> Lifecycle:
    """The Lifecycle of `app` (by default the current stepcache app: see stepcache_app) and this process's
    settings (rebuilt when the settings are re-read, as tests do)."""
    app = stepcache_app(app)
    settings = get_config()
    with _lock:
        current = _lifecycles.get(app)
        if current is None or current[0] is not settings:
            current = _lifecycles[app] = (
                settings,
                Lifecycle(Queue.from_config(CeleryDispatcher(app), CeleryCapacity(app))),
            )
        return current[1]


def get_queue(app: Celery | None = None) -> Queue:
    """The Queue of `app` (by default the current stepcache app)."""
    return get_lifecycle(app).queue

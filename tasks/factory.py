"""`create_app(settings)`: stepcache's Celery app, the one way it is built (`tasks.app` is the default one).

The default app takes its settings from `celeryconfig.py` (or the module CELERY_CONFIG_MODULE names, which
may import it and change some), and refuses a configuration that changes what the limiter relies on
(celeryconfig.PROTECTED) with one line; an app built with explicit settings (tests, embedding) takes
Celery's settings for those. Either way it has a task per step of the processing graph.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from celery import Celery

import tasks.signals  # noqa: F401  (connects the signal handlers, once per process)
from celeryconfig import PROTECTED, celery_settings
from common.config import AppConfig, exit_with, get_config_or_exit
from common.processing_graph import get_processing_graph
from tasks.routing import StepQueues, step_queue
from tasks.steps import register_tasks


def route_step(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str]:
    """Each step goes to its queue (tasks/routing.py: `light` or `heavy`, or a user's step's own); other
    tasks to the default queue."""
    graph = get_processing_graph()
    return {"queue": step_queue(graph.get_step(name))} if name in graph else {}


def create_app(settings: AppConfig | None = None) -> Celery:
    """A Celery app with a task per step of the processing graph (and per step registered later) and
    stepcache's signal handlers: Celery's settings for `settings`, or else from CELERY_CONFIG_MODULE
    (default `celeryconfig`); a bad value exits with one line."""
    app = Celery("stepcache")
    for name in (settings or get_config_or_exit()).common.import_modules:  # the user's steps (COMMON_IMPORTS)
        try:
            importlib.import_module(name)
        except ImportError as error:
            exit_with(f"COMMON_IMPORTS names {name}, which cannot be imported: {error}")
    if settings is not None:
        app.conf.update(celery_settings(settings))
    else:
        module = os.environ.get("CELERY_CONFIG_MODULE", "celeryconfig")
        try:
            app.config_from_object(module, force=True)
            changed = {name: app.conf[name] for name, value in PROTECTED.items() if app.conf[name] != value}
        except ImportError as error:
            exit_with(f"CELERY_CONFIG_MODULE={module} cannot be imported: {error}")
        if changed:
            name, value = next(iter(changed.items()))
            needed = PROTECTED[name]
            exit_with(f"{module} sets {name}={value!r}: stepcache's limiter needs {needed!r} (celeryconfig.PROTECTED)")
    register_tasks(app)
    app.steps["worker"].add(StepQueues)  # a worker consumes the queues of the user's steps it knows
    app.set_default()  # the app of this process's other threads too (Celery's current app is per thread)
    return app

"""The one module that knows Celery's signal names: it translates them into stepcache's hooks."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, worker_ready, worker_shutdown

from common.config import get_config
from common.logging import configure_logging
from tasks.reaper import Reaper

_reapers: dict[int, Reaper] = {}


def _configure_logging(**_: Any) -> None:
    settings = get_config().common
    configure_logging(settings.log_level, settings.log_format)


def _start_reaper(sender: Any = None, **_: Any) -> None:
    reaper = Reaper()
    _reapers[id(sender)] = reaper
    reaper.start()


def _stop_reaper(sender: Any = None, **_: Any) -> None:
    reaper = _reapers.pop(id(sender), None)
    if reaper is not None:
        reaper.stop()


setup_logging.connect(_configure_logging)
worker_ready.connect(_start_reaper)
worker_shutdown.connect(_stop_reaper)

"""Progress reports from inside a step: `job.progress.update(current, total, message)`.

A step only knows this interface; the worker decides where reports go (Celery's PROGRESS state,
which Flower and `AsyncResult.info` show).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

ProgressMeta = dict[str, Any]


DEFAULT_MIN_INTERVAL_SECONDS = 0.5


class Progress:
    """Reports how far a step got; each report is a dict with current, total, fraction and message.

    Reports are throttled to one per `min_interval` seconds; the first and the last (current == total)
    always go through, so a follower sees a job start moving and reach its end.
    """

    def __init__(
        self, report: Callable[[ProgressMeta], None], min_interval: float = DEFAULT_MIN_INTERVAL_SECONDS
    ) -> None:
        self._report = report
        self.min_interval = min_interval
        self.last: ProgressMeta | None = None
        self._reported_at: float | None = None

    def update(self, current: int | float, total: int | float, message: str | None = None) -> None:
        if total <= 0 or current < 0:
            raise ValueError(f"progress needs 0 <= current and 0 < total, got {current}/{total}")
        meta: ProgressMeta = {
            "current": current,
            "total": total,
            "fraction": min(1.0, current / total),
            "message": message,
        }
        self.last = meta
        now = time.monotonic()
        if self._reported_at is None or now - self._reported_at >= self.min_interval or current >= total:
            self._reported_at = now
            self._report(meta)

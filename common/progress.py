"""Progress reports from inside a step: `job.progress.update(current, total, message)`.

A step only knows this interface; the worker decides where reports go (Celery's PROGRESS state,
which Flower and `AsyncResult.info` show).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ProgressMeta = dict[str, Any]


class Progress:
    """Reports how far a step got; each report is a dict with current, total, fraction and message."""

    def __init__(self, report: Callable[[ProgressMeta], None]) -> None:
        self._report = report
        self.last: ProgressMeta | None = None

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
        self._report(meta)

"""Waiting for a state that no event announces (a ledger status, an HTTP answer): poll, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(condition: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.05) -> T:
    """The first truthy value `condition` returns; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(every)


def past_grace() -> None:
    """Sleep until the outbox records and journal entries made so far are older than the reaper's grace
    (their caller is taken for gone after it)."""
    from common import lifecycle
    from common.config import get_config

    grace = max(getattr(lifecycle, "OUTBOX_GRACE_MIN_SECONDS", 0), 2 * get_config().worker.heartbeat_interval_seconds)
    time.sleep(grace + 0.1)

"""The reaper: a safety net in every worker's main process that takes back expired leases.

Each worker runs one thread that calls `Lifecycle.reap()` every heartbeat interval; a Redis lock makes
one of them do it at a time. Slots freed by finished jobs never wait for it: they are promoted by the
release itself.
"""

from __future__ import annotations

import logging
import threading

from common.config import get_config
from tasks.queue import get_lifecycle

logger = logging.getLogger(__name__)


class Reaper:
    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval if interval is not None else get_config().worker.heartbeat_interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="stepcache-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                report = get_lifecycle().reap()
                if report is not None and (report.crashed or report.requeued):
                    logger.warning("reaper: requeued %s, failed as crashed %s", report.requeued, report.crashed)
            except Exception:
                logger.exception("reaper pass failed")

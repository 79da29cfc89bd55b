"""A running job's heartbeat: a thread that renews its lease and stamps the ledger every interval.

It never blocks the step (it runs beside it), stops with the job, and stops for good when it finds the
lease gone (the job was cancelled or reaped): a heartbeat never brings a finished job back.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from common.config import get_config
from common.queue import JobPayload, Queue

logger = logging.getLogger(__name__)


class Heartbeat:
    """`with Heartbeat(queue, payload, token):` beats while the block runs."""

    def __init__(self, queue: Queue, payload: JobPayload, token: str, interval: float | None = None) -> None:
        self.queue = queue
        self.payload = payload
        self.token = token
        self.interval = interval if interval is not None else get_config().worker.heartbeat_interval_seconds
        self.beats = 0
        self.lease_lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{payload.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.queue.heartbeat(self.payload, self.token):
                    self.lease_lost = True
                    logger.warning("job %s lost its lease; heartbeats stop", self.payload.job_id)
                    return
                self.beats += 1
            except Exception:
                # A missed beat is not fatal: the lease tolerates WORKER_MAX_MISSING_HEARTBEATS of them.
                logger.exception("heartbeat of job %s failed", self.payload.job_id)

"""A running attempt's heartbeat: a thread that renews its lease every interval, beside the step (and
another that records the start, so the step starts at once).

Renewing is a Redis call only: it never waits on MongoDB. The ledger's `last_heartbeat` and the
heartbeat event are written from a second thread, one at a time; a write that hangs (MongoDB stalled)
skips the beats that come meanwhile instead of delaying the lease. The thread keeps beating until the
job's end is recorded, so a slow end (MongoDB retrying) keeps its lease; it stops for good once it
finds the lease gone (the job was cancelled and ended, or reaped): a heartbeat never brings a job back.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from common.config import get_config
from common.lifecycle import Attempt, Lifecycle
from common.queue.limiter import LeaseState

logger = logging.getLogger(__name__)


class AttemptStopped(BaseException):
    """Raised inside a step whose attempt lost its lease; not an Exception, so the step cannot swallow it."""


class Heartbeat:
    """`with Heartbeat(lifecycle, attempt):` beats while the block runs."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        attempt: Attempt,
        interval: float | None = None,
        on_start: Callable[[], object] = lambda: None,
    ) -> None:
        self.lifecycle = lifecycle
        self.attempt = attempt
        self.on_start = on_start  # run beside the step, in a thread of its own (the start's records)
        self._started = threading.Event()
        self.interval = interval if interval is not None else get_config().worker.heartbeat_interval_seconds
        self.beats = 0
        self.lease_lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"heartbeat-{attempt.payload.job_id}", daemon=True)
        self._ledger_beat: threading.Thread | None = None
        self._lock = threading.Lock()
        self._interruptible: int | None = None  # the thread to stop if the lease is lost

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        # Its own thread: the start's records wait on MongoDB, the renewals never do.
        threading.Thread(target=self._record_start, name="start-record", daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def wait_started(self) -> None:
        """Until the start is recorded: what the attempt tells next (progress, its end) comes after it."""
        self._started.wait()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """While the block runs, a lost lease raises AttemptStopped in this thread."""
        thread = threading.get_ident()
        with self._lock:
            if self.lease_lost:
                raise AttemptStopped()
            self._interruptible = thread
        try:
            yield
        finally:
            with self._lock:
                self._interruptible = None
                _raise_in(thread, None)  # drop a stop that was not delivered yet: the block is over

    def _record_start(self) -> None:
        try:
            self.on_start()
        except Exception:
            logger.exception("could not record the start of job %s", self.attempt.payload.job_id)
        finally:
            self._started.set()

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                state = self.lifecycle.renew(self.attempt)
            except Exception:
                # A missed beat is not fatal: the lease tolerates WORKER_MAX_MISSING_HEARTBEATS of them.
                logger.exception("heartbeat of job %s failed", self.attempt.payload.job_id)
                continue
            if state == LeaseState.LOST:
                logger.warning("job %s lost its lease; its step is stopped", self.attempt.payload.job_id)
                self._stop_step()
                return
            self.beats += 1
            if state == LeaseState.RUNNING and (self._ledger_beat is None or not self._ledger_beat.is_alive()):
                self._ledger_beat = threading.Thread(target=self._beat, name="ledger-heartbeat", daemon=True)
                self._ledger_beat.start()

    def _stop_step(self) -> None:
        """Stop the step now and at every interval until it is out of its interruptible block."""
        while True:
            with self._lock:
                self.lease_lost = True
                if self._interruptible is None:
                    return
                _raise_in(self._interruptible, AttemptStopped)
            if self._stop.wait(self.interval):
                return

    def _beat(self) -> None:
        try:
            self.lifecycle.beat(self.attempt)
        except Exception:
            logger.exception("could not stamp the heartbeat of job %s", self.attempt.payload.job_id)


def _raise_in(thread: int, error: type[BaseException] | None) -> None:
    """Raise `error` in `thread` at its next Python instruction (None: cancel one not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), None if error is None else ctypes.py_object(error)
    )

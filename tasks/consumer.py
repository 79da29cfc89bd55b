"""The worker's consumer: what a worker does with a step's message it cannot run (celeryconfig's
`worker_consumer`).

Celery's own consumer logs an unregistered task with its whole body, stores FAILURE and drops the
message: the job's lease then holds its namespace's slot until it lapses, and the job goes back to the
same queue, where the same worker may take it again. A step's message (it carries a lease token) is
never held here instead (tasks/routing.py):

- when a live worker consumes the step's own queue (tasks/routing.py), the message goes there (one line
  logged, nothing stored);
- otherwise the job ends at once through the one way out (common/lifecycle.py) with a typed
  StepNotKnownError: cached, in the ledger, its slot to the next job of the namespace, and FAILURE in
  Celery's results.

Any other unregistered task is Celery's, as before.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message

from common.exceptions import StepcacheError, StepNotKnownError
from common.lifecycle import Outcome
from common.queue import Dispatch
from tasks.queue import PRIORITY_HEADER, TOKEN_HEADER, CeleryDispatcher, get_lifecycle
from tasks.routing import live_step_queue
from tasks.step_task import message_payload

logger = logging.getLogger(__name__)


class StepConsumer(Consumer):  # type: ignore[misc]
    def on_unknown_task(self, body: Any, message: Message, exc: BaseException) -> None:
        headers = message.headers or {}
        if not headers.get(TOKEN_HEADER):
            super().on_unknown_task(body, message, exc)  # not a step's message
            return
        try:
            self._route_or_end(message, headers)
        except Exception:
            # Its lease lapses and the reaper dispatches the job anew (the registry may know better then).
            logger.exception("could not pass on or end the message of step %s", headers.get("task"))
        message.ack()  # type: ignore[no-untyped-call]

    def _route_or_end(self, message: Message, headers: dict[str, Any]) -> None:
        step, job_id, token = headers["task"], headers["id"], headers[TOKEN_HEADER]
        args, kwargs, _ = message.decode()  # type: ignore[no-untyped-call]
        try:
            payload = message_payload(step, job_id, args, kwargs, headers.get(PRIORITY_HEADER))
        except StepcacheError as bad:
            logger.warning("dropping message %s of unknown step %s: %s", job_id, step, bad)
            return
        queue = live_step_queue(step)
        arrived_on = (message.delivery_info or {}).get("routing_key")
        if queue is not None and queue != arrived_on:
            CeleryDispatcher(self.app).publish(Dispatch(payload, token), queue=queue)
            logger.info("job %s: this worker does not know step %s; passed on to queue %s", job_id, step, queue)
            return
        error = StepNotKnownError(
            f"no live worker knows step {step!r}: start one that imports the module defining it "
            "(celery -A tasks worker -I <module>, or make run ARGS='--import <module>')"
        )
        lifecycle = get_lifecycle(self.app)
        worker = f"{self.hostname}:{os.getpid()}"
        attempt = lifecycle.start(payload, token, delivery=uuid.uuid4().hex, worker=worker)
        if attempt is None:
            return  # a stale or cancelled job's message: nothing to end
        lifecycle.record_start(attempt, worker)
        if lifecycle.end(attempt, Outcome.failure(error)):
            self.app.backend.mark_as_failure(job_id, error)
            logger.warning("job %s ended: %s", job_id, error)

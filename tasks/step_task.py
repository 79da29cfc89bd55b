"""The Celery task of a processing step.

Calling it (`step.delay(dataset, config=None, split=None)` or `step.apply_async(args, kwargs,
priority="high")`) does not publish a message: it validates the input and hands the job to the limiter
(one Redis script; the ledger follows), which publishes it when its namespace has a free slot. It
returns the job's `AsyncResult`, whose id is the job id.

On a worker, the message runs only if its lease token still holds a lease (`Queue.start`); the step's
function then gets a :class:`StepJob` and returns content or raises a typed error. Either lands in the
cache, the end is journaled for the ledger, and the slot goes to the next waiting job of the namespace.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any, ClassVar

from celery import Task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.worker.request import Request

from common import cache
from common.config import get_config
from common.exceptions import (
    CacheableError,
    ContentNotStorableError,
    InvalidArgumentsError,
    InvalidInputError,
    InvalidStepSpecError,
    JobLeaseLostError,
    JobManagerExceededMaximumDurationError,
    StepcacheError,
    StepNotImplementedError,
    UnexpectedError,
)
from common.lifecycle import Attempt, Lifecycle, Outcome
from common.logging import job_context
from common.names import validate_key
from common.processing_graph import ProcessingStep
from common.progress import Progress, ProgressMeta
from common.queue import JobPayload, Priority
from common.queue.queue import JobInput
from tasks.heartbeat import AttemptStopped, Heartbeat
from tasks.queue import PRIORITY_HEADER, TOKEN_HEADER, get_lifecycle, get_queue

logger = logging.getLogger(__name__)
PROGRESS_STATE = "PROGRESS"
STEP_ARGUMENTS = ("dataset", "config", "split")


@dataclass
class StepJob:
    """What a step's function gets: the job's input, a progress reporter, and the dataset's revision
    (looked up in the dataset's source the first time a step asks for it)."""

    job_id: str | None
    step: str
    dataset: str
    config: str | None
    split: str | None
    progress: Progress
    known_revision: str | None = None

    def previous_step(self, kind: str, config: str | None = None, split: str | None = None) -> dict[str, Any]:
        """The content of a parent step's successful response (a typed error otherwise); this job's
        revision is then the one that response was computed at."""
        entry = cache.get_previous_step_response(kind, self.dataset, config, split)
        if self.known_revision is None:
            self.known_revision = entry.dataset_git_revision
        return entry.content

    @property
    def revision(self) -> str:
        if self.known_revision is None:
            from common.sources import get_source

            self.known_revision = get_source().revision(self.dataset)
        return self.known_revision


StepFunction = Callable[[StepJob], Mapping[str, Any]]


def bind_step_arguments(args: Any, kwargs: Any) -> tuple[Any, Any, Any]:
    """(dataset, config, split) from a call's args and kwargs, refusing anything else or non-JSON."""
    args, kwargs = list(args or ()), dict(kwargs or {})
    try:
        json.dumps([args, kwargs])
    except (TypeError, ValueError) as error:
        raise InvalidArgumentsError(f"step arguments must be JSON: {error}") from None
    if len(args) > len(STEP_ARGUMENTS):
        raise InvalidArgumentsError(f"a step takes at most {len(STEP_ARGUMENTS)} arguments: {STEP_ARGUMENTS}")
    bound = dict(zip(STEP_ARGUMENTS, args, strict=False))
    for name, value in kwargs.items():
        if name not in STEP_ARGUMENTS or name in bound:
            raise InvalidArgumentsError(f"unexpected or repeated argument {name!r}; a step takes {STEP_ARGUMENTS}")
        bound[name] = value
    if "dataset" not in bound:
        raise InvalidArgumentsError("a step needs a dataset")
    return bound["dataset"], bound.get("config"), bound.get("split")


def message_payload(step: str, job_id: str, args: Any, kwargs: Any, priority: str | None) -> JobPayload:
    """The job a step's message is about, from the message's arguments and headers."""
    dataset, config, split = bind_step_arguments(args, kwargs)
    return JobPayload.of(job_id, step, dataset, config, split, Priority(priority or Priority.NORMAL))


class StepTask(Task):  # type: ignore[misc]
    """A processing step as a Celery task; `step` and `function` are set per step and app by tasks.steps."""

    step: ClassVar[ProcessingStep]
    function: ClassVar[StepFunction | None] = None
    # Options a caller may pass to apply_async; anything else (countdown, eta, queue...) would bypass
    # the limiter's decisions, so it is refused.
    CALL_OPTIONS: ClassVar[frozenset[str]] = frozenset({"priority"})

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> AsyncResult:
        unknown = set(options) - self.CALL_OPTIONS
        if task_id is not None or unknown:
            raise InvalidArgumentsError(
                f"a step is scheduled by stepcache's limiter; unsupported options: "
                f"{sorted(unknown | ({'task_id'} if task_id else set()))}"
            )
        dataset, config, split = bind_step_arguments(args, kwargs)
        priority = options.get("priority") or Priority.NORMAL
        job = get_queue(self.app).enqueue(self.name, dataset, config, split, priority=priority)
        return self.AsyncResult(job.job_id)

    def delay_many(self, inputs: Iterable[Any], priority: object = Priority.NORMAL) -> list[AsyncResult]:
        """Enqueue many jobs of this step in one bulk operation per store (the ledger, Redis): each input is
        a dataset name, a (dataset, config, split) sequence or a mapping of those arguments. A bad input
        raises a typed error and nothing is enqueued."""
        items = []
        for item in inputs:
            if isinstance(item, str):
                args, kwargs = [item], {}
            elif isinstance(item, Mapping):
                args, kwargs = [], dict(item)
            else:
                args, kwargs = list(item), {}
            items.append(JobInput(self.name, *bind_step_arguments(args, kwargs)))
        jobs = get_queue(self.app).enqueue_many(items, priority=priority)
        return [self.AsyncResult(job.job_id) for job in jobs]

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """`step.delay(dataset, config=None, split=None, priority="normal")`."""
        priority = kwargs.pop("priority", None)
        return self.apply_async(args, kwargs, **({"priority": priority} if priority is not None else {}))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        dataset, config, split = bind_step_arguments(args, kwargs)
        request = self.request
        token = getattr(request, TOKEN_HEADER, None)
        if request.called_directly:
            # A plain function call computes the content here, outside the queue and the cache.
            return self._compute(StepJob(None, self.name, dataset, config, split, Progress(lambda meta: None)))
        if not token:
            logger.warning("dropping message %s of %s without a lease token", request.id, self.name)
            raise Ignore()
        payload = message_payload(self.name, request.id, args, kwargs, getattr(request, PRIORITY_HEADER, None))
        return self._run_job(payload, token)

    def _run_job(self, payload: JobPayload, token: str) -> dict[str, Any]:
        lifecycle = get_lifecycle(self.app)
        worker = f"{self.request.hostname}:{os.getpid()}"
        attempt = lifecycle.start(payload, token, delivery=uuid.uuid4().hex, worker=worker)
        if attempt is None:
            raise Ignore()  # a redelivered, stale or cancelled job's message: acknowledged, not run, no state
        # Celery's own STARTED (task_track_started) would be stored before the lease is confirmed.
        self.update_state(state=states.STARTED, meta={"pid": os.getpid(), "hostname": self.request.hostname})
        started = time.monotonic()
        # The start's records (the ledger, its event) are written beside the step: it starts at once.
        recording = partial(lifecycle.record_start, attempt, worker)
        with (
            job_context(payload.job_id, self.name, payload.dataset),
            Heartbeat(lifecycle, attempt, on_start=recording) as heartbeat,
        ):
            progress = Progress(lambda meta: self._report_progress(lifecycle, attempt, meta, heartbeat))
            job = StepJob(payload.job_id, self.name, payload.dataset, payload.config, payload.split, progress)
            try:
                with heartbeat.interruptible():
                    content = self._compute(job)
                outcome = Outcome.success(content, time.monotonic() - started, job.known_revision)
            except (JobLeaseLostError, AttemptStopped):
                outcome = None
            except Exception as raised:
                outcome = Outcome.failure(_as_cacheable(raised), time.monotonic() - started, job.known_revision)
            heartbeat.wait_started()
            if outcome is None or not lifecycle.end(attempt, outcome):
                # Another attempt may hold the slot now: this one wrote nothing and leaves the rest to it.
                logger.warning("job %s lost its lease while it ran; it ends without a response", payload.job_id)
                raise Ignore()
        if outcome.error is not None:
            raise outcome.error
        return {
            "kind": self.name,
            "dataset": payload.dataset,
            "config": payload.config,
            "split": payload.split,
            "http_status": HTTPStatus.OK,
        }

    def _report_progress(
        self, lifecycle: Lifecycle, attempt: Attempt, meta: ProgressMeta, heartbeat: Heartbeat
    ) -> None:
        """Where a step's progress goes: Celery's PROGRESS state in the result backend (AsyncResult.info),
        a `task-progress` Celery event (Flower), the cache entry's progress (when there is one from an
        earlier run), and a job.progress event. An attempt that lost its lease stops here, at its next
        report."""
        heartbeat.wait_started()
        if heartbeat.lease_lost or not lifecycle.progress(attempt, meta):
            raise JobLeaseLostError("the job's lease was taken back while it ran")
        self.update_state(state=PROGRESS_STATE, meta=meta)
        # Flower's state sets a custom `task-<x>` event's state to "<X>" (PROGRESS, until SUCCESS or
        # FAILURE wins) and keeps its fields on the task, but its API and task page list only Celery's
        # own task fields: the meta goes in `result` (as AsyncResult.result has it), then also as fields.
        try:
            self.send_event("task-progress", result=json.dumps(meta, default=str), **meta)
        except Exception:  # monitoring only: a lost event never fails the step
            logger.warning("could not send the task-progress event of %s", self.request.id, exc_info=True)

    def _compute(self, job: StepJob) -> Mapping[str, Any]:
        function = type(self).function
        if function is None:
            raise StepNotImplementedError(f"step {self.name!r} has no function")
        content = function(job)
        if not isinstance(content, Mapping):
            raise ContentNotStorableError(f"step {self.name!r} returned {type(content).__name__}, not a mapping")
        if self.step.fan_out is not None:
            # What its children are planned from must be names they can be enqueued with.
            try:
                for name in self.step.names_in(content):
                    validate_key(job.dataset, *((name, None) if job.config is None else (job.config, name)))
            except (InvalidStepSpecError, InvalidInputError) as error:
                raise ContentNotStorableError(f"step {self.name!r} fans out (fan_out) to bad names: {error}") from None
        return content


def end_delivered_attempt(task: Any, job_id: str, args: Any, kwargs: Any, headers: Any, outcome: Outcome) -> bool:
    """End, from the worker's main process, the attempt of a message whose process is gone (hard time
    limit, revoke with terminate): the one way out, under that message's own lease token, so that a
    newer attempt of the job is never touched. False when the attempt was stale, or not a step's."""
    token = _header(headers, TOKEN_HEADER)
    if not isinstance(task, StepTask) or not token:
        return False
    try:
        payload = message_payload(task.name, job_id, args, kwargs, _header(headers, PRIORITY_HEADER))
    except StepcacheError:
        return False
    return get_lifecycle(task.app).end(Attempt(payload, token), outcome)


def _header(headers: Any, name: str) -> Any:
    return headers.get(name) if isinstance(headers, Mapping) else getattr(headers, name, None)


class StepRequest(Request):  # type: ignore[misc]
    """A step's request in the worker's main process: when the hard time limit killed its process, the
    attempt ends through the one way out before Celery stores FAILURE, which it stores only if that
    attempt was the job's current one (a stale attempt changes no state)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            error = JobManagerExceededMaximumDurationError(
                f"the job was killed after {get_config().worker.max_job_duration_seconds:.0f}s and a grace period"
            )
            try:
                ended = end_delivered_attempt(
                    self.task, self.id, self.args, self.kwargs, self._request_dict, Outcome.failure(error)
                )
            except Exception:
                logger.exception("could not end job %s after its hard time limit; the reaper will", self.id)
                ended = True
            self._stepcache_stale = not ended
        super().on_timeout(soft, timeout)

    @property
    def store_errors(self) -> bool:
        return not getattr(self, "_stepcache_stale", False) and bool(super().store_errors)


StepTask.Request = StepRequest


def _as_cacheable(error: BaseException) -> CacheableError:
    if isinstance(error, CacheableError):
        return error
    if isinstance(error, SoftTimeLimitExceeded):
        return JobManagerExceededMaximumDurationError("the job exceeded its maximum duration", cause=error)
    # Its type only: its text may name anything of the machine (paths, hosts, URLs of the stores); the cause
    # keeps it, in the entry's details (never served).
    return UnexpectedError(f"unexpected error: {type(error).__name__}", cause=error)

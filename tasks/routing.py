"""Where a step's message goes, when not every worker knows every step.

A built-in step's message goes to its graph queue (`light` or `heavy`): every worker knows the built-in
steps. A user's own step is known only where its module is imported (`-I mysteps`), so it has a queue of
its own, `<graph queue>.<step>` (`light.dataset-row-count`), which a worker consumes when it knows the
step and consumes its graph queue (a `-Q heavy` worker never takes a light step): as Celery routes a task
to the workers able to run it. Every worker's registry record lists the steps it can run and the step
queues it consumes (common/registry.py), so

- a process publishes a job of a user's step to that step's queue when a live worker consumes it (the
  knowers share it: whichever is free takes the next message; one that stops stops consuming it), else
  to the default queue, whose worker ends the job at once with a typed error (tasks/consumer.py) unless
  it knows the step (a worker not registered yet);
- a worker that receives a message of a step it does not know (from an older publisher, or published
  before the step's queue had a consumer) passes it on to the step's queue when one has a live consumer,
  or ends the job at once with StepNotKnownError, through the one way out.

A message passed on keeps its lease token: one delivery per token starts (confirm.lua), and a message
whose queue lost its consumers is the reaper's, like any other (its lease lapses, the job is dispatched
again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection

from celery import Celery, bootsteps

from common.processing_graph import DEFAULT_STEPS, ProcessingStep, QueueName, get_processing_graph
from common.registry import ProcessRecord, Role, get_registry

BUILTIN_STEPS = frozenset(step.name for step in DEFAULT_STEPS)
LIVE_QUEUES_SECONDS = 1.0  # how long a process trusts its last read of the step queues the workers consume
_live: tuple[float, list[ProcessRecord]] = (0.0, [])
_lock = threading.Lock()


def known_steps(app: Celery) -> list[str]:
    """The steps `app` can run: its step tasks (tasks.step_task.StepTask: a `step` of the graph) that have a
    function."""
    return sorted(
        name
        for name, task in app.tasks.items()
        if isinstance(getattr(task, "step", None), ProcessingStep) and getattr(task, "function", None)
    )


def step_queue(step: ProcessingStep) -> str:
    """The queue of a step's messages: its graph queue for a built-in step, its own for a user's."""
    return step.queue.value if step.name in BUILTIN_STEPS else f"{step.queue.value}.{step.name}"


def step_queues(app: Celery, consumed: Collection[str]) -> list[str]:
    """The queues of the user's steps `app` can run whose graph queue is among `consumed`."""
    graph = get_processing_graph()
    steps = [graph.get_step(name) for name in known_steps(app) if name in graph and name not in BUILTIN_STEPS]
    return sorted(step_queue(step) for step in steps if step.queue.value in consumed)


def live_workers() -> list[ProcessRecord]:
    """The live workers' registry records, read at most once a second (LIVE_QUEUES_SECONDS)."""
    global _live
    with _lock:
        read_at, records = _live
        if time.monotonic() - read_at >= LIVE_QUEUES_SECONDS:
            records = [record for record in get_registry().live() if record.role == Role.WORKER]
            _live = (time.monotonic(), records)
    return records


def live_step_queue(step: str) -> str | None:
    """The queue of `step` that a live worker consumes, or None."""
    queues = {queue.partition(".")[2]: queue for record in live_workers() for queue in record.step_queues}
    return queues.get(step)


def destination(step: str) -> str:
    """Where to publish a job of `step` from this process (see the module)."""
    graph = get_processing_graph()
    if step in BUILTIN_STEPS and step in graph:
        return graph.get_step(step).queue.value
    return live_step_queue(step) or QueueName.LIGHT.value


class StepQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker consumes the queues of the user's steps it knows (after `-I` imported them), for the graph
    queues it consumes."""

    def __init__(self, worker: object, **kwargs: object) -> None:
        super().__init__(worker, **kwargs)
        app: Celery = worker.app  # type: ignore[attr-defined]
        queues = app.amqp.queues
        for name in step_queues(app, set(queues.consume_from)):
            queues.select_add(name)

"""Where a step's message goes when not every worker knows every step.

A step's message goes to its graph queue (`light` or `heavy`), which every worker consumes unless told
otherwise. But a user's own step is known only where its module is imported (`-I mysteps`), so workers
may differ. Every worker's registry record lists the steps it can run (common/registry.py), and every
worker also consumes a queue of its own (Celery's `worker_direct`: `<node>.dq2`). So a message can
always be sent where it will run:

- a process that publishes a job of a step its own graph does not have sends the message to the
  direct queue of a live worker that knows the step, or, when none does, to the default queue;
- a worker that receives a message of a step it does not know passes it on to the direct queue of
  a live worker that knows it, or ends the job at once with a typed error (tasks/consumer.py).

A message passed on keeps its lease token: one delivery per token starts (confirm.lua), and a message
lost with its worker is the reaper's, like any other (its lease lapses and the job is dispatched anew).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection

from celery import Celery
from celery.utils.nodenames import worker_direct
from kombu.entity import Queue as BrokerQueue

from common.processing_graph import QueueName, get_processing_graph
from common.registry import get_registry

logger = logging.getLogger(__name__)
# The workers that passed a message on, in its headers: none of them gets it again.
PASSED_ON_HEADER = "stepcache_passed_on_by"
MAX_PASSES = 3  # a message passed on this many times ends (registry records that lie, or a loop)


def known_steps(app: Celery) -> list[str]:
    """The steps `app` can run: its step tasks that have a function."""
    from tasks.step_task import StepTask  # (tasks.step_task imports tasks.queue, which imports this module)

    return sorted(name for name, task in app.tasks.items() if isinstance(task, StepTask) and task.function)


def worker_knowing(step: str, excluded: Collection[str] = ()) -> str | None:
    """The node name of a live worker that knows `step` and is not in `excluded` (one at random: the load
    spreads), or None."""
    nodes = [record.node for record in get_registry().workers_knowing(step) if record.node not in excluded]
    return random.choice([node for node in nodes if node]) if nodes else None


def destination(step: str) -> str | BrokerQueue:
    """Where to publish a job of `step` from this process: its graph queue when this process's graph has
    the step; else the direct queue of a live worker that knows it; else the default queue (its worker
    ends the job with a typed error, or passes it on to a worker that registered meanwhile)."""
    graph = get_processing_graph()
    if step in graph:
        return graph.get_step(step).queue.value
    node = worker_knowing(step)
    if node is None:
        logger.warning("no live worker knows step %r: its job goes to the default queue", step)
        return QueueName.LIGHT.value
    queue: BrokerQueue = worker_direct(node)
    return queue

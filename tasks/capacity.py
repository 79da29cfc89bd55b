"""The fleet's idle capacity per Celery queue, for borrowing (common/queue/borrowing.py).

The slots come from the workers' own registrations (common/registry.py: each worker's queues and
concurrency; a worker that joins or dies counts within COMMON_REGISTRY_TTL_SECONDS). What uses them comes
from the broker, in one script: the messages waiting in each queue (its priority lists) and the messages
workers reserved (kombu's `unacked` hash, by routing key: with acks_late and a prefetch multiplier of 1,
a reserved message is a running job, or one about to run). A queue's workers may consume other queues
too (one `celery -A tasks worker` takes `light` and `heavy`): their slots are shared, so what waits or
runs in any of those queues uses them.

Counted this way, a message published a moment ago that no worker took yet is not idle capacity: a
newcomer's job waiting for a slot is seen, and nothing is borrowed over it.
"""

from __future__ import annotations

from celery import Celery

from common.processing_graph import QueueName, get_processing_graph
from tasks.routing import destination, live_workers

# KEYS[1] kombu's unacked hash, then each queue's priority lists (ARGV[1] per queue); ARGV[2..] the queues.
# Returns {waiting, reserved} per queue.
BROKER_LOAD = """local per = tonumber(ARGV[1])
local reserved = {}
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  local _, _, routing_key = string.find(value, '"([^"]*)"%]$')
  if routing_key then reserved[routing_key] = (reserved[routing_key] or 0) + 1 end
end
local load = {}
for i = 2, #ARGV do
  local waiting = 0
  for j = 1, per do waiting = waiting + redis.call('LLEN', KEYS[1 + (i - 2) * per + j]) end
  load[#load + 1] = waiting
  load[#load + 1] = reserved[ARGV[i]] or 0
end
return load"""


class CeleryCapacity:
    """common.queue.borrowing.Capacity, for the workers of a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def queues(self) -> tuple[dict[str, str], str]:
        default = QueueName.LIGHT.value
        steps = {step.name: destination(step.name) for step in get_processing_graph().steps}
        return {step: queue for step, queue in steps.items() if queue != default}, default

    def idle(self, freeing: str | None = None) -> dict[str, int]:
        workers = [worker for worker in live_workers() if worker.concurrency]
        consumed = {worker.process_id: {*worker.queues, *worker.step_queues} for worker in workers}
        queues = sorted({queue for names in consumed.values() for queue in names})
        if not queues:
            return {}
        load = self._load(queues)
        idle = {}
        for queue in queues:
            consumers = [worker for worker in workers if queue in consumed[worker.process_id]]
            pool = {name for worker in consumers for name in consumed[worker.process_id]}
            slots = sum(worker.concurrency or 0 for worker in consumers)
            used = sum(load[name] for name in pool) - (1 if freeing in pool else 0)
            idle[queue] = max(0, slots - used)
        return idle

    def _load(self, queues: list[str]) -> dict[str, int]:
        """Messages waiting in or reserved from each queue (one script on the broker)."""
        with self.app.pool.acquire(block=True) as connection:
            channel = connection.default_channel
            lists = [channel._q_for_pri(queue, priority) for queue in queues for priority in channel.priority_steps]
            keys = [channel.unacked_key, *lists]
            per = len(channel.priority_steps)
            reply = channel.client.eval(BROKER_LOAD, len(keys), *keys, per, *queues)
        return {queue: int(reply[2 * i]) + int(reply[2 * i + 1]) for i, queue in enumerate(queues)}

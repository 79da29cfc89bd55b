"""The fleet's idle worker slots, for borrowing (common/queue/borrowing.py).

The slots come from the workers' own registrations (common/registry.py: each worker's queues and
concurrency; a worker that joins or dies counts within COMMON_REGISTRY_TTL_SECONDS). Workers that share a
queue share their slots: the queues they consume form a *pool* (one `celery -A tasks worker` consumes
`light`, `heavy` and the queues of the user's steps it knows: one pool; a `-Q light` and a `-Q heavy`
fleet: two), and a pool's idle slots are its slots less what uses them, read from the broker in one script:

- the messages waiting in its queues (every priority list), a newcomer's included: nothing is borrowed
  over a job that waits for a slot;
- the messages workers reserved (kombu's `unacked` hash; with acks_late and a prefetch multiplier of 1, a
  running job or one about to run) whose job still holds that lease: a message a dead worker had reserved
  stays in `unacked` until the broker's visibility timeout, but its job's lease lapsed, so its slot is not
  counted against the living workers. A reserved message that is not a step's (a plain Celery task)
  always counts.

While no namespace's own job waits in a pool, borrowers may also keep BORROW_AHEAD_PER_SLOTS borrowed
messages waiting in its queues (one per four slots, at least one): they wait in the broker's last
priority list, after any job a namespace under its limit publishes later, and a slot that frees takes one
at once instead of waiting for the next borrow (the borrow that follows an end comes after its slot is
free).
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from common.config import get_config
from common.processing_graph import QueueName, get_processing_graph
from common.queue.borrowing import Measure
from common.queue.limiter import namespace_key
from common.redis_connection import as_text, get_redis
from tasks.routing import destination, live_workers

BORROW_AHEAD_PER_SLOTS = 4  # a borrowed message may wait ahead per this many slots of a pool (at least one)

# KEYS[1] kombu's unacked hash, then each queue's priority lists (ARGV[1] per queue, the borrowed one last);
# ARGV[2..] the queues. Returns, per queue, {waiting in its own lists, waiting borrowed, reserved messages
# of no step}, then the reserved messages of steps, each as {queue, namespace, job, lease token}.
BROKER_LOAD = """local per = tonumber(ARGV[1])
local index = {}
for i = 2, #ARGV do index[ARGV[i]] = i - 1 end
local plain, steps = {}, {}
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  local _, _, queue = string.find(value, '"([^"]*)"%]$')
  if queue and index[queue] then
    local _, _, token = string.find(value, '"stepcache_token": "(%d+)"')
    local _, _, namespace = string.find(value, '"stepcache_namespace": "([^"]+)"')
    local _, _, job = string.find(value, '[{,] "id": "([^"]+)"')
    if token and namespace and job then
      steps[#steps + 1] = {queue, namespace, job, token}
    else
      plain[queue] = (plain[queue] or 0) + 1
    end
  end
end
local load = {}
for i = 2, #ARGV do
  local waiting = 0
  for j = 1, per - 1 do waiting = waiting + redis.call('LLEN', KEYS[1 + (i - 2) * per + j]) end
  load[#load + 1] = {waiting, redis.call('LLEN', KEYS[1 + (i - 1) * per]), plain[ARGV[i]] or 0}
end
return {load, steps}"""


@dataclass(frozen=True)
class Pools:
    """The live workers' pools: each queue's pool, and each pool's slots."""

    of_queue: dict[str, str]
    slots: dict[str, int]


def pools() -> Pools:
    """Queues that a worker consumes together are one pool (transitively); a pool's name is its queues'."""
    workers = [worker for worker in live_workers() if worker.concurrency]
    parent: dict[str, str] = {}

    def root(queue: str) -> str:
        while parent.setdefault(queue, queue) != queue:
            queue = parent[queue]
        return queue

    for worker in workers:
        queues = [*worker.queues, *worker.step_queues]
        for queue in queues[1:]:
            parent[root(queue)] = root(queues[0])
    members: dict[str, list[str]] = {}
    for queue in list(parent):
        members.setdefault(root(queue), []).append(queue)
    name = {top: ",".join(sorted(queues)) for top, queues in members.items()}
    of_queue = {queue: name[root(queue)] for queue in parent}
    slots: dict[str, int] = {}
    for worker in workers:
        queues = [*worker.queues, *worker.step_queues]
        if queues:
            pool = of_queue[queues[0]]
            slots[pool] = slots.get(pool, 0) + (worker.concurrency or 0)
    return Pools(of_queue, slots)


class CeleryCapacity:
    """common.queue.borrowing.Capacity, for the workers of a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def measure(self) -> Measure:
        fleet = pools()
        default = QueueName.LIGHT.value
        steps = {step.name: destination(step.name) for step in get_processing_graph().steps}
        default_pool = fleet.of_queue.get(default, "")
        pool_of_step = {step: fleet.of_queue.get(queue, "") for step, queue in steps.items() if queue != default}
        used, waiting = self._used(fleet) if fleet.slots else ({}, {})
        idle = {}
        for pool, slots in fleet.slots.items():
            ahead = 0 if waiting.get(pool) else max(1, slots // BORROW_AHEAD_PER_SLOTS)
            idle[pool] = slots + ahead - used.get(pool, 0)
        return Measure({pool: slots for pool, slots in idle.items() if slots > 0}, pool_of_step, default_pool)

    def _used(self, fleet: Pools) -> tuple[dict[str, int], dict[str, int]]:
        """Per pool: the messages waiting in its queues and the reserved ones whose job holds that lease; and
        the namespaces' own messages waiting (not borrowed)."""
        queues = sorted(fleet.of_queue)
        with self.app.pool.acquire(block=True) as connection:
            channel = connection.default_channel
            lists = [channel._q_for_pri(queue, priority) for queue in queues for priority in channel.priority_steps]
            keys = [channel.unacked_key, *lists]
            load, reserved = channel.client.eval(BROKER_LOAD, len(keys), *keys, len(channel.priority_steps), *queues)
        used: dict[str, int] = {}
        own: dict[str, int] = {}
        for queue, (waiting, borrowed, plain) in zip(queues, load, strict=True):
            pool = fleet.of_queue[queue]
            used[pool] = used.get(pool, 0) + int(waiting) + int(borrowed) + int(plain)
            own[pool] = own.get(pool, 0) + int(waiting)
        if reserved:
            pipe = get_redis(get_config().queue.redis_url).pipeline(transaction=False)  # the limiter's Redis
            for _, namespace, job, _ in reserved:
                pipe.hget(namespace_key(as_text(namespace), "leases"), as_text(job))
            for (queue, _, _, token), lease in zip(reserved, pipe.execute(), strict=True):
                if lease is not None and as_text(lease)[2:] == as_text(token):
                    pool = fleet.of_queue[as_text(queue)]
                    used[pool] = used.get(pool, 0) + 1
        return used, own

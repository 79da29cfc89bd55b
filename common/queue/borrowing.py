"""Borrowing idle capacity: work-conserving fairness on top of the hard limit.

A namespace's limit (QUEUE_MAX_JOBS_PER_NAMESPACE, or its override) is the number of slots it always
gets. A namespace that may borrow (QUEUE_BORROW, or its policy: `python -m tasks limits policy`), at its
limit with jobs waiting, is a *borrower*: it may lease more slots, up to its ceiling, but only with
capacity of the fleet that no other job waits for. Every script that leaves a namespace wanting to borrow
says so (admit, end, reap: `wants` in scripts/prelude.lua), and the caller then calls
:meth:`Borrowers.borrow`:

1. the namespace joins the borrowers (a sorted set, scored by borrowed slots per unit of weight: the
   fewest first), and the first MAX_BORROWERS are read (one round trip);
2. the idle capacity of each Celery queue is measured (:class:`Capacity`: the workers' registrations say
   how many slots the fleet has, the broker how many messages wait or are reserved);
3. each idle slot goes to the borrower with the fewest borrowed slots per unit of weight, and the
   borrowers' scripts lease them (borrow.lua: one round trip), each recording its dispatches as `promote`
   does; the caller publishes them.

A newcomer namespace is under its limit: its jobs are dispatched at once, as always, and wait in the
broker's queue, where the next freed worker takes them; a borrower whose job ends finds that message
waiting, so no capacity is idle and it leases nothing more. Borrowed jobs are never taken back: they end
as every job ends, and their slots go to the namespaces under their limit first.

The sorted set is a hint, never the truth: a namespace it names that no longer wants to borrow leases
nothing and leaves it; one it lost (a crash between the script and the set, a Redis that rolled back) is
named again by its next admit, end or the reaper's next pass.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from typing import Protocol

from common.constants import REDIS_PREFIX
from common.queue.limiter import NamespaceLimiter, Record, Wants
from common.redis_connection import as_text

logger = logging.getLogger(__name__)
# ":" is in no namespace: the set never shares a hash tag with one.
BORROWERS_KEY = f"{REDIS_PREFIX}:{{:borrowing}}:borrowers"
WEIGHTS_KEY = f"{REDIS_PREFIX}:{{:borrowing}}:weights"
MAX_BORROWERS = 100  # the borrowers considered at once, the fewest borrowed slots per weight first


class Capacity(Protocol):
    """The fleet's capacity, as Celery runs it (tasks/capacity.py)."""

    def idle(self, freeing: str | None = None) -> dict[str, int]:
        """Idle slots per queue: slots of the live workers that consume it, less the messages that wait in
        it or that workers reserved; `freeing`: the queue of a job that is ending (its slot is about to
        be free)."""
        ...

    def queues(self) -> tuple[dict[str, str], str]:
        """The queue of every step not on the default queue, and the default queue."""
        ...


class Borrowers:
    def __init__(self, limiter: NamespaceLimiter, capacity: Capacity) -> None:
        self.limiter = limiter
        self.capacity = capacity

    def borrow(self, wanting: Mapping[str, Wants], ending_step: str | None = None) -> list[Record]:
        """Lease the fleet's idle slots to the borrowers (see the module); the dispatch records, which the
        caller applies. `wanting`: namespace -> (borrowed slots per weight, weight); `ending_step`: the step
        of the job whose end called it (its slot is about to be free)."""
        redis = self.limiter.redis
        pipe = redis.pipeline(transaction=False)
        if wanting:
            pipe.zadd(BORROWERS_KEY, {namespace: score for namespace, (score, _) in wanting.items()})
            pipe.hset(WEIGHTS_KEY, mapping={namespace: weight for namespace, (_, weight) in wanting.items()})
        pipe.zrange(BORROWERS_KEY, 0, MAX_BORROWERS - 1, withscores=True)
        pipe.hgetall(WEIGHTS_KEY)
        *_, ranked, weights = pipe.execute()
        if not ranked:
            return []
        queue_of, default_queue = self.capacity.queues()
        freeing = queue_of.get(ending_step, default_queue) if ending_step is not None else None
        idle = {queue: slots for queue, slots in self.capacity.idle(freeing).items() if slots > 0}
        if not idle:
            return []
        weight_of = {as_text(namespace): float(weight) for namespace, weight in weights.items()}
        heap = [(float(score), as_text(namespace)) for namespace, score in ranked]
        heapq.heapify(heap)
        slots: dict[str, int] = {}
        for _ in range(sum(idle.values())):
            score, namespace = heapq.heappop(heap)
            slots[namespace] = slots.get(namespace, 0) + 1
            heapq.heappush(heap, (score + 1 / weight_of.get(namespace, 1.0), namespace))
        replies = self.limiter.borrow(slots, idle, queue_of, default_queue)
        pipe = redis.pipeline(transaction=False)
        done = [namespace for namespace, (_, wants) in replies.items() if wants is None]
        if done:
            pipe.zrem(BORROWERS_KEY, *done)
            pipe.hdel(WEIGHTS_KEY, *done)
        still = {namespace: wants for namespace, (_, wants) in replies.items() if wants is not None}
        if still:
            pipe.zadd(BORROWERS_KEY, {namespace: score for namespace, (score, _) in still.items()})
        pipe.execute()
        return [record for dispatched, _ in replies.values() for record in dispatched]

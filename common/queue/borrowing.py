"""Borrowing idle capacity: work-conserving fairness on top of the hard limit.

A namespace's limit (QUEUE_MAX_JOBS_PER_NAMESPACE, or its override) is the number of slots it always
gets. A namespace that may borrow (QUEUE_BORROW, or its policy: `python -m tasks limits policy`), at its
limit with jobs waiting, is a *borrower*: it may lease more slots, up to its ceiling, but only with
capacity of the fleet that no other job waits for. Every script that leaves a namespace wanting to borrow
says so (admit, end, reap: `wants` in scripts/prelude.lua), and the caller then calls
:meth:`Borrowers.borrow`:

1. the namespace joins the borrowers (a sorted set, scored by slots held per unit of weight: the
   fewest first), and the first MAX_BORROWERS are read (one round trip);
2. under the fleet's borrowing lock (one borrower at a time measures and leases, so two never lease the
   same idle slot), the idle slots of each pool of workers are measured (:class:`Capacity`: the workers'
   registrations say how many slots a pool has, the broker how many messages wait or are reserved);
3. each idle slot goes to the borrower with the fewest slots held per unit of weight; the borrowers'
   scripts lease them one after the other (borrow.lua), each taking from what the ones before it left
   and recording its dispatches as `promote` does; they are published, and the lock released.

A newcomer namespace is under its limit: its jobs are dispatched at once, as always. A borrowed job's
message goes to the broker's last priority list, after every namespace's own jobs, so a newcomer's job
takes the next worker slot that frees even when it arrives after a borrowed one; and a borrower whose job
ends finds the newcomer's message waiting, so no slot is idle and it leases nothing more. Borrowed jobs
are never taken back: they end as every job ends.

The sorted set is a hint, never the truth: a namespace it names that no longer wants to borrow leases
nothing and leaves it; one it lost (a crash between the script and the set, a Redis that rolled back) is
named again by its next admit, end or the reaper's next pass.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import LockError

from common.constants import REDIS_PREFIX
from common.queue.limiter import NamespaceLimiter, Record, Wants
from common.redis_connection import as_text

logger = logging.getLogger(__name__)
# ":" is in no namespace: these keys never share a hash tag with one.
BORROWERS_KEY = f"{REDIS_PREFIX}:{{:borrowing}}:borrowers"
WEIGHTS_KEY = f"{REDIS_PREFIX}:{{:borrowing}}:weights"
LOCK_KEY = f"{REDIS_PREFIX}:{{:borrowing}}:lock"
LOCK_SECONDS = 10.0  # a borrower that died holding the lock holds it this long at most
LOCK_WAIT_SECONDS = 2.0  # a borrower waits this long for another to be done, then leaves it to the next
MAX_BORROWERS = 100  # the borrowers considered at once, the fewest slots held per weight first


@dataclass(frozen=True)
class Measure:
    """The fleet's idle slots per pool of workers, the pool of each step whose pool is not the default
    one, and the default pool (of every other step; "" when no worker consumes its queue)."""

    idle: dict[str, int]
    pool_of_step: dict[str, str]
    default_pool: str


class Capacity(Protocol):
    """The fleet's capacity, as Celery runs it (tasks/capacity.py)."""

    def measure(self) -> Measure:
        """The idle slots now."""
        ...


class Borrowers:
    def __init__(self, limiter: NamespaceLimiter, capacity: Capacity) -> None:
        self.limiter = limiter
        self.capacity = capacity

    def borrow(
        self,
        wanting: Mapping[str, Wants],
        apply: Callable[[list[Record]], None],
    ) -> int:
        """Lease the fleet's idle slots to the borrowers and have `apply` publish them, under the lock (see
        the module); how many slots were leased. `wanting`: namespace -> (slots held per weight,
        weight)."""
        redis = self.limiter.redis
        pipe = redis.pipeline(transaction=False)
        if wanting:
            pipe.zadd(BORROWERS_KEY, {namespace: score for namespace, (score, _) in wanting.items()})
            pipe.hset(WEIGHTS_KEY, mapping={namespace: weight for namespace, (_, weight) in wanting.items()})
        pipe.zrange(BORROWERS_KEY, 0, MAX_BORROWERS - 1, withscores=True)
        pipe.hgetall(WEIGHTS_KEY)
        *_, ranked, weights = pipe.execute()
        if not ranked:
            return 0
        lock = redis.lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking_timeout=LOCK_WAIT_SECONDS)
        if not lock.acquire():
            logger.info("another process is leasing idle slots; it or the next end serves these borrowers")
            return 0
        try:
            return self._lease(ranked, {as_text(n): float(w) for n, w in weights.items()}, apply)
        finally:
            try:
                lock.release()
            except LockError:
                logger.warning("the borrowing lock expired while its holder leased: two may have leased at once")

    def _lease(
        self,
        ranked: list[tuple[bytes, float]],
        weight_of: Mapping[str, float],
        apply: Callable[[list[Record]], None],
    ) -> int:
        measure = self.capacity.measure()
        idle = dict(measure.idle)
        if not idle:
            return 0
        # Each idle slot to the borrower with the fewest slots held per weight (a slot raises it 1/weight).
        original = {as_text(namespace): float(score) for namespace, score in ranked}
        heap = [(score, namespace) for namespace, score in original.items()]
        heapq.heapify(heap)
        slots: dict[str, int] = {}
        for _ in range(sum(idle.values())):
            score, namespace = heapq.heappop(heap)
            slots[namespace] = slots.get(namespace, 0) + 1
            heapq.heappush(heap, (score + 1 / weight_of.get(namespace, 1.0), namespace))
        leased, done, still = 0, [], {}
        for namespace in sorted(slots, key=lambda name: original[name]):
            if not any(idle.values()):
                break
            args = (idle, measure.pool_of_step, measure.default_pool)
            dispatched, wants = self.limiter.borrow({namespace: slots[namespace]}, *args)[namespace]
            for record in dispatched:
                if record.borrowed:
                    pool = measure.pool_of_step.get(record.payload.step, measure.default_pool)
                    idle[pool] = idle.get(pool, 0) - 1
                    leased += 1
            apply(dispatched)
            if wants is None:
                done.append(namespace)
            else:
                still[namespace] = wants[0]
        pipe = self.limiter.redis.pipeline(transaction=False)
        if done:
            pipe.zrem(BORROWERS_KEY, *done)
            pipe.hdel(WEIGHTS_KEY, *done)
        if still:
            pipe.zadd(BORROWERS_KEY, still)
        pipe.execute()
        return leased


class Coalescing:
    """Calls `run` with what `submit` gathered, in a thread of this process (started when first needed, in
    each process: a forked one has no threads); what comes while it runs is merged into its next call."""

    def __init__(self, run: Callable[[Mapping[str, Wants]], None], name: str) -> None:
        self.run = run
        self.name = name
        self._new_process()

    def _new_process(self) -> None:
        """State of this process's own (a forked one inherits its parent's, perhaps with the lock held)."""
        self.pid = os.getpid()
        self.pending: dict[str, Wants] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def submit(self, wanting: Mapping[str, Wants]) -> None:
        if self.pid != os.getpid():
            self._new_process()
        with self.lock:
            self.pending.update(wanting)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self.thread.start()
        self.wake.set()

    def _loop(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            with self.lock:
                wanting, self.pending = self.pending, {}
            if wanting:
                self.run(wanting)

"""Borrowing idle capacity (common/queue/borrowing.py), in the limiter's scripts, on one Redis and on a
Redis Cluster. The capacity is given (the fleet's measure is tasks/capacity.py, with real workers in
tests/test_borrowing_workers.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from common.config import get_config
from common.processing_graph import QueueName, get_processing_graph
from common.queue import Queue
from common.queue.borrowing import BORROWERS_KEY, Measure
from common.queue.ledger import Ledger
from common.queue.limiter import NamespaceLimiter, Policy, namespace_key
from common.redis_connection import get_redis
from tests.conftest import Stores
from tests.test_queue import Jobs, RecordingDispatcher, run

pytestmark = pytest.mark.redis_topologies
HEAVY_STEP = "config-parquet-and-info"


class GivenCapacity:
    """A fleet of so many slots per queue (each queue its own pool of workers); the jobs holding a lease
    (dispatched or started) use them."""

    def __init__(self, shared: bool = False, **slots: int) -> None:
        self.slots = slots
        self.shared = shared  # one pool: every worker consumes every queue
        self.limiter: NamespaceLimiter | None = None

    def measure(self) -> Measure:
        graph = get_processing_graph()
        default = QueueName.LIGHT.value
        pool_of_step = {step.name: step.queue.value for step in graph.steps if step.queue.value != default}
        used: dict[str, int] = {}
        assert self.limiter is not None
        redis = self.limiter.redis
        for namespace in self.limiter.namespaces():
            for job in redis.hkeys(namespace_key(namespace, "leases")):
                step = json.loads(redis.hget(namespace_key(namespace, "jobs"), job))[0]
                queue = pool_of_step.get(step, default)
                used[queue] = used.get(queue, 0) + 1
        if self.shared:
            idle = {"all": sum(self.slots.values()) - sum(used.values())}
            return Measure({"all": idle["all"]} if idle["all"] > 0 else {}, dict.fromkeys(pool_of_step, "all"), "all")
        idle = {queue: slots - used.get(queue, 0) for queue, slots in self.slots.items()}
        return Measure({queue: n for queue, n in idle.items() if n > 0}, pool_of_step, default)


def make(capacity: GivenCapacity, limit: int = 1, borrow: bool = True) -> tuple[Jobs, RecordingDispatcher]:
    dispatcher = RecordingDispatcher()
    settings = get_config()
    limiter = NamespaceLimiter(
        get_redis(settings.queue.redis_url),
        default_limit=limit,
        started_ttl_seconds=60,
        queued_ttl_seconds=3600,
        max_attempts=2,
        default_borrow=borrow,
    )
    capacity.limiter = limiter
    return Jobs(Queue(dispatcher, Ledger(), limiter, capacity=capacity)), dispatcher


@pytest.fixture
def fleet(stores: Stores) -> Iterator[GivenCapacity]:
    yield GivenCapacity(light=4, heavy=1)


def enqueue(q: Jobs, namespace: str, count: int, step: str = "dataset-config-names") -> None:
    for i in range(count):
        q.enqueue(step, f"{namespace}/ds{i}")


def test_a_namespace_at_its_limit_borrows_the_idle_slots(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet)
    enqueue(q, "org", 6)
    assert len(dispatcher.take()) == 4  # its limit, and the 3 slots left idle
    overview = q.limiter.overview()["org"]
    assert (overview.queued, overview.waiting, overview.borrowed) == (4, 2, 3)


def test_borrowing_off_is_the_hard_cap(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet, borrow=False)
    enqueue(q, "org", 6)
    assert len(dispatcher.take()) == 1
    assert q.limiter.overview()["org"].borrowed == 0
    assert not get_redis(get_config().queue.redis_url).exists(BORROWERS_KEY)


def test_a_namespace_policy_overrides_the_default(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet, borrow=False)
    q.set_policy("lender", Policy(borrow=True))
    enqueue(q, "lender", 6)
    assert len(dispatcher.take()) == 4
    q, dispatcher = make(fleet, borrow=True)
    q.set_policy("strict", Policy(borrow=False))
    enqueue(q, "strict", 6)
    assert len(dispatcher.take()) == 1


def test_a_ceiling_is_never_passed(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet)
    q.set_policy("org", Policy(ceiling=2))
    enqueue(q, "org", 6)
    assert len(dispatcher.take()) == 2
    q.set_policy("org", Policy(ceiling=3))  # raised: it borrows at once
    assert len(dispatcher.take()) == 1
    assert q.limiter.overview()["org"].queued == 3
    q.set_policy("org", Policy(ceiling=10))
    assert len(dispatcher.take()) == 1  # the fleet's 4 light slots are all used


def test_a_paused_namespace_never_borrows(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet)
    q.set_limit("org", 0)
    enqueue(q, "org", 3)
    assert dispatcher.take() == []


def test_without_idle_capacity_nothing_is_borrowed(stores: Stores) -> None:
    q, dispatcher = make(GivenCapacity(light=2, heavy=0))
    enqueue(q, "busy", 1)
    enqueue(q, "org", 6)
    assert len(dispatcher.take()) == 2  # one each: the second slot is org's by its limit


def test_the_jobs_of_a_queue_without_idle_capacity_keep_their_place(stores: Stores) -> None:
    fleet = GivenCapacity(light=4, heavy=0)
    q, dispatcher = make(fleet)
    q.set_limit("org", 0)  # paused while it fills: the order is the enqueue order
    q.enqueue("dataset-config-names", "org/first")
    q.enqueue(HEAVY_STEP, "org/heavy", "default")
    enqueue(q, "org", 4)
    q.set_limit("org", 1)
    assert [d.payload.dataset for d in dispatcher.take()] == ["org/first"]
    q.borrow({"org": (0.0, 1.0)})  # the heavy queue has no idle slot: the light jobs behind it borrow
    borrowed = [d.payload for d in dispatcher.take()]
    assert len(borrowed) == 3 and {p.step for p in borrowed} == {"dataset-config-names"}
    fleet.slots = {"light": 4, "heavy": 1}
    q.borrow({"org": (3.0, 1.0)})
    assert [d.payload.step for d in dispatcher.take()] == [HEAVY_STEP]  # still first in line


def test_idle_slots_go_to_the_borrowers_by_weight(stores: Stores) -> None:
    fleet = GivenCapacity(light=0, heavy=0)
    q, dispatcher = make(fleet)
    q.set_policy("big", Policy(weight=3))
    enqueue(q, "small", 20)
    enqueue(q, "big", 20)
    assert len(dispatcher.take()) == 2  # their limits, guaranteed; nothing idle
    fleet.slots = {"light": 10, "heavy": 0}  # a worker joined
    q.reap()  # the reaper's next pass finds the borrowers, and the slots of the worker that joined
    borrowed: dict[str, int] = {}
    for dispatch in dispatcher.take():
        borrowed[dispatch.payload.namespace] = borrowed.get(dispatch.payload.namespace, 0) + 1
    held = {namespace: 1 + count for namespace, count in borrowed.items()}  # their limits, and what they borrowed
    assert sum(borrowed.values()) == 8 and abs(held["small"] / 1 - held["big"] / 3) < 1  # slots held per weight


def test_a_borrower_that_no_longer_wants_leaves_the_set(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet)
    enqueue(q, "org", 2)
    assert len(dispatcher.take()) == 2
    redis = get_redis(get_config().queue.redis_url)
    assert redis.zscore(BORROWERS_KEY, "org") is None  # nothing waits: it wants nothing
    enqueue(q, "other", 6)
    for dispatch in dispatcher.take():
        run(q, dispatch)
    assert redis.zcard(BORROWERS_KEY) <= 1


def test_bad_policies_are_typed_errors_and_change_nothing(fleet: GivenCapacity) -> None:
    from common.exceptions import InvalidInputError

    q, _ = make(fleet)
    q.set_policy("org", Policy(weight=2))
    for bad in (Policy(weight=0), Policy(weight=-1), Policy(weight=1e9), Policy(ceiling=-1)):
        with pytest.raises(InvalidInputError):
            q.set_policy("org", bad)
    assert q.limiter.policy("org") == Policy(weight=2)
    q.set_policy("org", None)
    assert q.limiter.policy("org") == Policy()


def test_borrowers_of_one_pool_share_its_idle_slots_and_never_lease_more(stores: Stores) -> None:
    fleet = GivenCapacity(shared=True, light=0, heavy=0)
    q, dispatcher = make(fleet)
    enqueue(q, "a", 5)
    enqueue(q, "b", 5)
    q.enqueue(HEAVY_STEP, "b/heavy", "default")
    assert len(dispatcher.take()) == 2  # their limits
    fleet.slots = {"light": 2, "heavy": 1}  # one worker of 3 slots consuming both queues: 1 idle
    q.reap()
    borrowed = dispatcher.take()
    assert len(borrowed) == 1 and all(d.borrowed for d in borrowed)


def test_borrowers_at_once_lease_an_idle_slot_once(stores: Stores) -> None:
    fleet = GivenCapacity(light=2, heavy=0)
    q, dispatcher = make(fleet, borrow=False)
    enqueue(q, "org", 6)
    q.limiter.default_borrow = True
    assert len(dispatcher.take()) == 1
    barrier = threading.Barrier(4)

    def borrow() -> None:
        barrier.wait()
        q.borrow({"org": (0.0, 1.0)})

    threads = [threading.Thread(target=borrow) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(dispatcher.take()) == 1  # the one idle slot, once
    assert q.limiter.overview()["org"].borrowed == 1


def test_a_ceiling_below_the_limit_bounds_the_limit_too(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet, limit=3)
    q.set_policy("org", Policy(ceiling=1))
    enqueue(q, "org", 4)
    assert len(dispatcher.take()) == 1


def test_a_borrowed_dispatch_left_behind_is_published_borrowed_by_the_reaper(fleet: GivenCapacity) -> None:
    q, dispatcher = make(fleet)
    q.dispatcher.publish = lambda dispatch: (_ for _ in ()).throw(ConnectionError("broker down"))  # type: ignore[method-assign]
    enqueue(q, "org", 3)  # the dispatches fail: the jobs wait again (unlease), none is lost
    q.dispatcher.publish = RecordingDispatcher.publish.__get__(dispatcher)  # type: ignore[method-assign]
    q.reap()
    published = dispatcher.take()
    assert len(published) == 3 and [d.borrowed for d in published].count(True) == 2


def test_an_outbox_record_says_whether_its_dispatch_is_borrowed() -> None:
    from common.queue.limiter import Record

    payload = '["dataset-config-names", "org/ds", null, null, 1]'
    borrowed = Record.parse(f"dispatch|5|5|7|0|borrowed||{payload}", "job")
    own = Record.parse(f"dispatch|5|5|7|0|||{payload}", "job")
    assert (borrowed.borrowed, borrowed.ending, borrowed.dispatch.borrowed) == (True, None, True)
    assert (own.borrowed, own.dispatch.borrowed) == (False, False)

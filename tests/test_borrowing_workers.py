"""Borrowing idle capacity with real `celery -A tasks worker` processes: the fleet's capacity is what the
workers registered, its use what the broker holds (tasks/capacity.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from common.queue.limiter import Policy
from tasks.capacity import pools
from tasks.queue import get_queue
from tests import sample_steps
from tests.conftest import Stores, use_settings
from tests.test_limiter_workers import executions, max_overlap, wait_until_all_ended
from tests.waiting import eventually
from tests.workers import sample_worker

pytestmark = pytest.mark.slow


@pytest.fixture
def env(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    yield use_settings(
        monkeypatch,
        {
            **stores.env(),
            "QUEUE_MAX_JOBS_PER_NAMESPACE": "1",
            "QUEUE_BORROW": "true",
            "COMMON_REGISTRY_TTL_SECONDS": "1.5",
            "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.3",
            "WORKER_MAX_MISSING_HEARTBEATS": "3",
            "WORKER_QUEUED_LEASE_SECONDS": "5",
            "TEST_SLEEP_SECONDS": "0.4",
        },
    )


def enqueue(namespace: str, count: int) -> list[str]:
    return [sample_steps.test_sleep.delay(f"{namespace}/ds{i}").id for i in range(count)]


def overlap(stores: Stores, job_ids: list[str]) -> int:
    runs = executions(stores)
    return max_overlap([(run["start"], run["end"]) for job in job_ids for run in runs[job] if "end" in run])


def registered_slots() -> int:
    return sum(pools().slots.values())


def running(namespace: str) -> int:
    counts = get_queue().limiter.counts(namespace)
    return counts.started


def test_a_namespace_alone_borrows_every_idle_slot_and_no_more(
    stores: Stores, celery_app: Celery, env: dict[str, str], tmp_path: Path
) -> None:
    with sample_worker("w1", env, tmp_path, concurrency=4):
        eventually(lambda: registered_slots() == 4, "the worker's registration", timeout=30)
        jobs = enqueue("org", 24)
        wait_until_all_ended(jobs)
    assert overlap(stores, jobs) == 4  # its limit is 1: 3 slots borrowed, none past the worker's 4


def test_a_ceiling_is_never_passed(stores: Stores, celery_app: Celery, env: dict[str, str], tmp_path: Path) -> None:
    get_queue().set_policy("org", Policy(ceiling=2))
    with sample_worker("w1", env, tmp_path, concurrency=4):
        jobs = enqueue("org", 16)
        wait_until_all_ended(jobs)
    assert overlap(stores, jobs) == 2


def test_borrowed_slots_go_first_to_a_newcomer(
    stores: Stores, celery_app: Celery, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = use_settings(monkeypatch, {**env, "TEST_SLEEP_SECONDS": "1.0"})
    with sample_worker("w1", env, tmp_path, concurrency=4):
        backlog = enqueue("big", 40)
        eventually(lambda: running("big") == 4, "the backlog borrowing every slot", timeout=30)
        time.sleep(0.3)
        asked = time.time()
        (newcomer,) = enqueue("new", 1)
        wait_until_all_ended([newcomer], timeout=30)
        get_queue().cancel_jobs("big", backlog)
    (run,) = executions(stores)[newcomer]
    assert run["start"] - asked <= 1.0 + 0.5  # within one job's duration: the next slot freed is its


def test_the_capacity_follows_the_workers_that_join_and_die(
    stores: Stores, celery_app: Celery, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = use_settings(monkeypatch, {**env, "TEST_SLEEP_SECONDS": "0.5"})
    with sample_worker("w1", env, tmp_path, concurrency=2):
        jobs = enqueue("org", 200)
        eventually(lambda: running("org") == 2, "org borrowing the first worker's second slot", timeout=30)
        joined = sample_worker("w2", env, tmp_path, concurrency=2).start()
        eventually(lambda: running("org") == 4, "org borrowing the slots of the worker that joined", timeout=30)
        joined.kill()
        # Its jobs come back when their leases lapse; the capacity it had is gone with its registration, and
        # the messages it had reserved (in the broker until its visibility timeout) no longer count.
        time.sleep(3)
        eventually(lambda: running("org") <= 2, "the dead worker's slots no longer borrowed", timeout=30)
        seen = []
        for _ in range(40):
            seen.append(running("org"))
            time.sleep(0.1)
        leases = get_queue().limiter.redis.hgetall("stepcache:{org}:leases")
        assert max(seen) == 2, (seen, leases)  # the survivor's two slots, both used, and no more
        get_queue().cancel_jobs("org", jobs)

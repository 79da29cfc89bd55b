"""The limiter's promises with real `celery -A tasks worker` processes (SIGKILLed where that is the point)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from common.queue import Job, JobStatus
from tasks.queue import get_queue
from tests import sample_steps
from tests.conftest import Stores, use_settings
from tests.waiting import eventually
from tests.workers import sample_worker

pytestmark = pytest.mark.slow
RESULT_TIMEOUT = 180


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at the same instant as a start comes first)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def executions(stores: Stores) -> dict[str, list[dict[str, float]]]:
    """job id -> its runs, each {"start": t, "end": t} as the step recorded it in its worker process
    (a run killed before its end has no "end")."""
    runs: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for line in redis.Redis.from_url(stores.redis_url).lrange(sample_steps.EXECUTIONS_KEY, 0, -1):
        event, job_id, _dataset, at, pid = line.decode().split()
        runs[(job_id, pid)][event] = float(at)
    recorded: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (job_id, _pid), run in sorted(runs.items(), key=lambda item: item[1]["start"]):
        recorded[job_id].append(run)
    return recorded


def wait_until_all_ended(job_ids: list[str], timeout: float = RESULT_TIMEOUT) -> list[Job]:
    ledger = get_queue().ledger

    def ended() -> list[Job] | None:
        jobs = [ledger.get(job_id) for job_id in job_ids]
        done = [job for job in jobs if job is not None and job.status.is_terminal]
        return done if len(done) == len(job_ids) else None

    try:
        return eventually(ended, "every job ending", timeout=timeout, every=0.2)
    except AssertionError:
        jobs = [ledger.get(job_id) for job_id in job_ids]
        raise AssertionError(f"not every job ended: {[(j.status, j.attempts, j.worker) for j in jobs if j]}") from None


@pytest.fixture
def worker_env(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = {
        **stores.env(),
        "QUEUE_MAX_JOBS_PER_NAMESPACE": "2",
        "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.3",
        "WORKER_MAX_MISSING_HEARTBEATS": "2",
        "TEST_SLEEP_SECONDS": "0.05",
        "WORKER_QUEUED_LEASE_SECONDS": "5",
    }
    yield use_settings(monkeypatch, env)


def test_no_namespace_ever_runs_more_than_its_limit_and_every_job_succeeds(
    stores: Stores, celery_app: Celery, worker_env: dict[str, str], tmp_path: Path
) -> None:
    with sample_worker("w1", worker_env, tmp_path), sample_worker("w2", worker_env, tmp_path):
        results = [sample_steps.test_sleep.delay(f"ns{i % 10}/ds{i}") for i in range(200)]
        for result in results:
            result.get(timeout=RESULT_TIMEOUT)
    jobs = wait_until_all_ended([r.id for r in results])
    assert {job.status for job in jobs} == {JobStatus.SUCCESS}
    by_namespace: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for job in jobs:
        assert job.started_at is not None and job.finished_at is not None
        by_namespace[job.namespace].append((job.started_at.timestamp(), job.finished_at.timestamp()))
    assert len(by_namespace) == 10
    assert max(max_overlap(intervals) for intervals in by_namespace.values()) <= 2
    assert max_overlap([i for intervals in by_namespace.values() for i in intervals]) >= 2  # ran in parallel
    recorded = executions(stores)
    assert len(recorded) == 200
    step_intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for job in jobs:
        (run,) = recorded[job.job_id]
        step_intervals[job.namespace].append((run["start"], run["end"]))
    assert max(max_overlap(intervals) for intervals in step_intervals.values()) <= 2


def test_a_killed_worker_gives_its_slots_back_and_its_jobs_run_again_within_the_limit(
    stores: Stores, celery_app: Celery, worker_env: dict[str, str], tmp_path: Path
) -> None:
    # A worker killed between promoting a job and publishing its message (or holding a prefetched one)
    # leaves a dispatched lease with no live message: it comes back after WORKER_QUEUED_LEASE_SECONDS.
    env = {**worker_env, "TEST_SLEEP_SECONDS": "1.0"}
    survivor = sample_worker("survivor", env, tmp_path).start()
    victim = sample_worker("victim", env, tmp_path).start()
    try:
        results = [sample_steps.test_sleep.delay(f"ns{i % 4}/ds{i}") for i in range(24)]
        ledger = get_queue().ledger
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not any((job.worker or "").startswith("victim") for job in ledger.jobs(statuses=[JobStatus.STARTED])):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim.kill()
        killed_at = time.time()
        jobs = wait_until_all_ended([r.id for r in results])
    finally:
        victim.stop()
        survivor.stop()
    assert {job.status for job in jobs} == {JobStatus.SUCCESS}  # none lost: each re-ran on the survivor
    rerun = [job for job in jobs if job.attempts > 1]
    assert rerun, "the victim was running jobs when it was killed"
    assert all(job.worker and job.worker.startswith("survivor") for job in rerun)
    # The limit held across the crash: a killed run counts as running until the kill.
    recorded = executions(stores)
    by_namespace: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for job in jobs:
        for run in recorded[job.job_id]:
            by_namespace[job.namespace].append((run["start"], run.get("end", killed_at)))
    assert max(max_overlap(intervals) for intervals in by_namespace.values()) <= 2
    assert "ns0" not in get_queue().counts()  # every slot back, and no key left for the idle namespace


def test_one_job_of_another_namespace_does_not_wait_behind_a_long_backlog(
    stores: Stores, celery_app: Celery, worker_env: dict[str, str], tmp_path: Path
) -> None:
    backlog = [sample_steps.test_noop.delay(f"big/ds{i}") for i in range(2000)]
    queue = get_queue()
    with sample_worker("w1", worker_env, tmp_path):
        small = sample_steps.test_noop.delay("small/ds")
        small.get(timeout=RESULT_TIMEOUT)
        job = queue.job(small.id)
        assert job is not None and job.started_at is not None
        big_started_meanwhile = [
            other
            for other in queue.jobs(statuses=[JobStatus.SUCCESS, JobStatus.STARTED])
            if other.namespace == "big"
            and other.started_at is not None
            and job.created_at < other.started_at < job.started_at
        ]
    assert queue.counts()["big"].waiting > 1000  # the backlog was still there
    # Whatever the backlog, the broker held at most the namespace's limit (2) of its jobs, so the
    # small job started behind at most those and the ones already running on the 4 worker slots.
    assert len(big_started_meanwhile) <= 2 + 4
    assert len(backlog) == 2000

"""A step not every worker knows (tests/own_steps.py, imported by some workers only): its jobs run on a
worker that knows it, or end at once with a typed error when none does; the namespace is never held."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery, states

from common import cache
from common.queue import Job, JobStatus
from common.registry import ProcessRecord, get_registry
from tasks import routing
from tasks.embedded import ROOT, WorkerProcess
from tests import own_steps, sample_steps
from tests.conftest import Stores, use_settings
from tests.test_limiter_workers import wait_until_all_ended
from tests.waiting import eventually

SLEEP_SECONDS = 0.3
# Far longer than a job: a slot held by a message nobody runs shows as a gap this long.
LEASE_SECONDS = 60


def worker(name: str, env: dict[str, str], log_dir: Path, knows: bool, queues: str | None = None) -> WorkerProcess:
    modules = ["tests.sample_steps", *(["tests.own_steps"] if knows else [])]
    return WorkerProcess(name, env, log_dir / f"worker-{name}.log", concurrency=2, queues=queues, include=modules)


@pytest.fixture
def env(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return use_settings(
        monkeypatch,
        {
            **stores.env(),
            "QUEUE_MAX_JOBS_PER_NAMESPACE": "1",
            "TEST_SLEEP_SECONDS": str(SLEEP_SECONDS),
            "WORKER_QUEUED_LEASE_SECONDS": str(LEASE_SECONDS),
            "COMMON_REGISTRY_TTL_SECONDS": "3",
            "WORKER_METRICS_PORT": "0",
        },
    )


def by_node(count: int) -> dict[str, ProcessRecord] | None:
    found = {record.node: record for record in get_registry().live() if record.node}
    return found if len(found) == count else None


def gaps(jobs: list[Job]) -> list[float]:
    """The idle time between one job's end and the next one's start, in a namespace of limit 1."""
    ordered = sorted(jobs, key=lambda job: job.started_at.timestamp() if job.started_at else 0.0)
    return [
        later.started_at.timestamp() - earlier.finished_at.timestamp()
        for earlier, later in itertools.pairwise(ordered)
        if earlier.finished_at is not None and later.started_at is not None
    ]


@pytest.mark.slow
def test_every_job_of_a_step_ends_on_a_worker_that_knows_it_and_the_namespace_is_never_held(
    stores: Stores, celery_app: Celery, env: dict[str, str], tmp_path: Path
) -> None:
    # The step is a heavy one: only the worker that knows it and consumes `heavy` consumes its queue
    # (heavy.test-own-sleep); the other consumes `light` (and light.test-sleep: it knows test-sleep).
    knows = worker("knows", env, tmp_path, knows=True, queues="heavy")
    lacks = worker("lacks", env, tmp_path, knows=False, queues="light")
    with knows, lacks:
        records = eventually(lambda: by_node(2), "both workers' records")
        assert "test-own-sleep" in records[knows.nodename].steps
        assert "test-own-sleep" not in records[lacks.nodename].steps
        assert "test-sleep" in records[lacks.nodename].steps
        assert records[knows.nodename].step_queues == ("heavy.test-own-sleep",)
        assert records[lacks.nodename].queues == ("light",)
        # This process publishes its first job as one unaware of the step's queue would (an older version),
        # to `light`: the worker there does not know the step and passes the message on to its queue.
        routing._live = (time.monotonic() + 60, {})
        # One namespace, limit 1: the steps alternate, so each worker ends jobs that dispatch the other step.
        results = []
        for i in range(8):
            results.append(own_steps.test_own_sleep.delay(f"other/own{i}"))
            routing._live = (0.0, {})  # the rest, as this process routes them: to the step's queue
            results.append(sample_steps.test_sleep.delay(f"other/plain{i}"))
        jobs = wait_until_all_ended([result.id for result in results], timeout=LEASE_SECONDS - 10)
    assert {job.status for job in jobs} == {JobStatus.SUCCESS}
    own = [job for job in jobs if job.step == "test-own-sleep"]
    assert all(job.worker and job.worker.startswith(f"{knows.nodename}:") for job in own), [j.worker for j in own]
    assert max(gaps(jobs)) < 5, gaps(jobs)  # a held slot would wait for its lease: LEASE_SECONDS
    assert all(result.state == states.SUCCESS for result in results)
    passed_on = (tmp_path / "worker-lacks.log").read_text().count("does not know step test-own-sleep; passed on to")
    print(f"{len(own)} jobs of a step one worker of two knows: all ran there; {passed_on} passed on by the other")
    assert passed_on >= 1  # the first, published by this process to `light`
    assert "Received unregistered task" not in (tmp_path / "worker-lacks.log").read_text()


@pytest.mark.slow
def test_a_step_no_live_worker_knows_ends_at_once_with_a_typed_error(
    stores: Stores, celery_app: Celery, env: dict[str, str], tmp_path: Path
) -> None:
    with worker("lacks", env, tmp_path, knows=False):
        unknown = own_steps.test_own_sleep.delay("solo/own")
        plain = sample_steps.test_sleep.delay("solo/plain")
        jobs = {job.step: job for job in wait_until_all_ended([unknown.id, plain.id], timeout=LEASE_SECONDS - 10)}
    assert jobs["test-own-sleep"].status == JobStatus.ERROR
    assert jobs["test-own-sleep"].error_code == "StepNotKnownError"
    assert jobs["test-sleep"].status == JobStatus.SUCCESS
    entry = cache.get_response("test-own-sleep", "solo/own")
    assert (entry.http_status, entry.error_code) == (501, "StepNotKnownError")
    assert "no live worker knows step 'test-own-sleep'" in str(entry.content["error"])
    assert unknown.state == states.FAILURE
    log = (tmp_path / "worker-lacks.log").read_text()
    assert "Received unregistered task" not in log and "Traceback" not in log


def command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tasks", *args]
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_workers_and_top_show_the_steps_each_worker_knows(
    stores: Stores, celery_app: Celery, env: dict[str, str], tmp_path: Path
) -> None:
    with worker("knows", env, tmp_path, knows=True), worker("lacks", env, tmp_path, knows=False) as lacks:
        eventually(lambda: by_node(2), "both workers' records")
        listed, top = command(env, "workers"), command(env, "top", "--once")
    knows_line = f"{lacks.nodename.replace('lacks', 'knows')} also knows: test-own-sleep"
    for shown in (listed, top):
        assert shown.returncode == 0, shown.stderr
        assert "every worker knows " in shown.stdout and knows_line in shown.stdout, shown.stdout

"""A job's life as operators and other services see it: progress, events, crashes, time limits, metrics.

Real `celery -A tasks worker` processes (and a real Flower), the real Redis and MongoDB-protocol server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from common import cache
from common.config import get_config
from common.event_bus import EventBus
from common.events import EventType
from common.queue import JobStatus
from common.redis_connection import get_redis
from tasks.embedded import ROOT, free_port
from tasks.queue import get_queue
from tests import sample_steps
from tests.conftest import Stores, use_settings
from tests.test_metrics import connects, non_loopback_address
from tests.waiting import eventually
from tests.workers import sample_worker

pytestmark = pytest.mark.slow
TIMEOUT = 60.0


@pytest.fixture
def env(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    values = {
        **stores.env(),
        "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.3",
        "WORKER_MAX_MISSING_HEARTBEATS": "2",
        "WORKER_METRICS_PORT": "0",
        "TEST_SLEEP_SECONDS": "3",
    }
    yield use_settings(monkeypatch, values)


def test_a_running_step_shows_progress_in_its_result_and_in_flowers_api(
    env: dict[str, str], celery_app: Celery, tmp_path: Path
) -> None:
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=(tmp_path / "flower.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with sample_worker("w", env, tmp_path):
            result = sample_steps.test_sleep.delay("org/ds")
            eventually(lambda: result.state == "PROGRESS", what="PROGRESS state")
            assert {"current", "total", "fraction", "message"} <= set(result.info)
            assert result.info["total"] == 5

            def flower_result() -> dict[str, Any] | None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task/result/{result.id}", timeout=5) as r:
                        answer: dict[str, Any] = json.load(r)
                        return answer if answer.get("state") == "PROGRESS" else None
                except OSError:
                    return None

            # Flower's result API shows the state while the task runs (its meta only once it is ready).
            shown = eventually(flower_result, what="Flower showing PROGRESS")
            assert shown["task-id"] == result.id
            result.get(timeout=TIMEOUT)
            assert result.state == "SUCCESS"
    finally:
        flower.terminate()
        flower.wait(timeout=20)


def test_one_jobs_events_arrive_in_order(env: dict[str, str], celery_app: Celery, tmp_path: Path) -> None:
    bus = EventBus(get_redis(get_config().queue.redis_url))
    start = bus.last_id()
    with sample_worker("w", {**env, "TEST_SLEEP_SECONDS": "1.5"}, tmp_path):
        ok = sample_steps.test_sleep.delay("org/ok")
        failing = sample_steps.test_fail.delay("org/bad")
        ok.get(timeout=TIMEOUT)
        with pytest.raises(sample_steps.SampleStepError):
            failing.get(timeout=TIMEOUT)
    events = [event for _, event in bus.read(start, count=10_000)]

    def types(job_id: str, family: tuple[str, ...] = ("job.", "cache.")) -> list[str]:
        return [e.type for e in events if e.job_id == job_id and e.type.startswith(family)]

    ok_types = types(ok.id)
    assert ok_types[:2] == [EventType.JOB_QUEUED, EventType.JOB_STARTED]
    assert ok_types[-2:] == [EventType.CACHE_UPDATED, EventType.JOB_SUCCEEDED]
    assert set(ok_types[2:-2]) == {EventType.JOB_PROGRESS} and len(ok_types[2:-2]) >= 2
    assert types(failing.id) == [
        EventType.JOB_QUEUED,
        EventType.JOB_STARTED,
        EventType.CACHE_UPDATED,
        EventType.JOB_FAILED,
    ]
    # Celery's signals tell the task's run beside the job's story: started, heartbeats, then its end.
    ok_task = types(ok.id, ("task.",))
    assert ok_task[0] == EventType.TASK_STARTED and ok_task[-1] == EventType.TASK_SUCCEEDED
    assert EventType.TASK_HEARTBEAT in ok_task
    assert types(failing.id, ("task.",))[0] == EventType.TASK_STARTED
    assert types(failing.id, ("task.",))[-1] == EventType.TASK_FAILED
    failed = next(e for e in events if e.job_id == failing.id and e.type == EventType.JOB_FAILED)
    assert failed.error_code == "SampleStepError"  # type: ignore[attr-defined]


def test_follow_shows_a_late_follower_everything_and_ends_with_the_status(
    env: dict[str, str], celery_app: Celery, tmp_path: Path
) -> None:
    with sample_worker("w", env, tmp_path):
        result = sample_steps.test_sleep.delay("org/ds")
        eventually(lambda: result.state == "PROGRESS", what="PROGRESS state")
        follower = subprocess.run(
            [sys.executable, "-m", "tasks", "follow", result.id],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert follower.returncode == 0, follower.stderr
    assert "test-sleep org/ds: started" in follower.stdout
    assert "100% slept 5/5" in follower.stdout  # piped: one plain line per change of the bar
    assert follower.stdout.rstrip().endswith("succeeded")
    unknown = subprocess.run(
        [sys.executable, "-m", "tasks", "follow", "no-such-job"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "no job" in unknown.stderr


def test_a_killed_workers_job_is_cached_as_crashed_within_the_lease_ttl_and_its_slot_promoted(
    env: dict[str, str], celery_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_env = {**env, "WORKER_MAX_ATTEMPTS": "1", "TEST_SLEEP_SECONDS": "30"}
    monkeypatch.setenv("WORKER_MAX_ATTEMPTS", "1")
    get_config.cache_clear()
    queue = get_queue()
    victim = sample_worker("victim", crash_env, tmp_path).start()
    try:
        doomed = sample_steps.test_sleep.delay("org/doomed")
        eventually(lambda: doomed.state == "PROGRESS", what="the doomed job running")
        victim.kill()
        killed_at = time.monotonic()
        with sample_worker("survivor", {**crash_env, "TEST_SLEEP_SECONDS": "0.05"}, tmp_path):
            behind = sample_steps.test_sleep.delay("org/behind")  # same namespace, limit 1: waits for the slot
            job = eventually(
                lambda: (j := queue.job(doomed.id)) is not None and j.status.is_terminal and j,
                what="the crashed job ending",
            )
            noticed_after = time.monotonic() - killed_at
            behind.get(timeout=TIMEOUT)
    finally:
        victim.stop()
    assert job.status == JobStatus.ERROR and job.error_code == "JobManagerCrashedError"
    entry = cache.get_response("test-sleep", "org/doomed")
    assert (entry.http_status, entry.error_code) == (500, "JobManagerCrashedError")
    lease_ttl = get_config().worker.lease_ttl_seconds
    # The lease expires lease_ttl after the last heartbeat; the survivor's reaper passes every interval,
    # and the survivor itself needs a few seconds to start.
    assert noticed_after < lease_ttl + 15, noticed_after


def test_a_slow_step_hits_the_soft_limit_and_its_error_is_cached(
    env: dict[str, str], celery_app: Celery, tmp_path: Path
) -> None:
    limits = {
        "WORKER_MAX_JOB_DURATION_SECONDS": "1",
        "WORKER_HARD_LIMIT_GRACE_SECONDS": "1.5",
        "TEST_SLEEP_SECONDS": "10",
    }
    with sample_worker("w", {**env, **limits}, tmp_path):
        slow = sample_steps.test_sleep.delay("org/slow")
        with pytest.raises(Exception, match="maximum duration"):
            slow.get(timeout=TIMEOUT)
        stubborn = sample_steps.test_stubborn.delay("other/stubborn")
        with pytest.raises(Exception, match=r"TimeLimitExceeded|Hard time limit"):
            stubborn.get(timeout=TIMEOUT)
        queue = get_queue()
        # Its slot comes back, and the idle namespace is no longer listed at all.
        eventually(lambda: "other" not in queue.counts(), what="the killed job's slot coming back")
    entry = cache.get_response("test-sleep", "org/slow")
    assert (entry.http_status, entry.error_code) == (500, "JobManagerExceededMaximumDurationError")
    killed = cache.get_response("test-stubborn", "other/stubborn")
    assert killed.error_code == "JobManagerExceededMaximumDurationError"
    job = queue.job(stubborn.id)
    assert job is not None and job.status == JobStatus.ERROR


def test_a_worker_serves_metrics_of_all_its_processes(env: dict[str, str], celery_app: Celery, tmp_path: Path) -> None:
    port = free_port()
    # Its own metrics directory: this test process may have counted jobs of its own in an inherited one.
    metrics_env = {"WORKER_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    (tmp_path / "metrics").mkdir()
    with sample_worker("w", {**env, **metrics_env}, tmp_path):
        for i in range(3):
            sample_steps.test_noop.delay(f"org/ds{i}").get(timeout=TIMEOUT)
        with pytest.raises(sample_steps.SampleStepError):
            sample_steps.test_fail.delay("org/bad").get(timeout=TIMEOUT)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        elsewhere = non_loopback_address()
        assert elsewhere is None or not connects(elsewhere, port)  # WORKER_METRICS_HOST: loopback by default
    assert 'stepcache_jobs_finished_total{status="success",step="test-noop"} 3.0' in text
    assert 'stepcache_jobs_finished_total{status="error",step="test-fail"} 1.0' in text
    assert 'stepcache_job_duration_seconds_count{step="test-noop"} 3.0' in text
    assert 'stepcache_cache_entries{error_code="SampleStepError",http_status="500",kind="test-fail"} 1.0' in text
    assert "stepcache_leases_in_use 0.0" in text

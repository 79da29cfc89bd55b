"""Steps the tests register, the way a user adds their own (`celery -A tasks worker -I tests.sample_steps`).

They are roots of the graph, outside the default steps. Each records its start and end in Redis, from
the worker's process, so tests can check what ran where and when without trusting the ledger alone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from common.config import get_config
from common.exceptions import CacheableError
from common.processing_graph import InputType, ProcessingStep, register_step
from common.redis_connection import connect
from tasks.steps import StepJob, add_step, step

EXECUTIONS_KEY = "test:executions"


class SampleStepError(CacheableError):
    """A typed error raised by the `test-fail` step."""


def _record(job: StepJob, event: str) -> None:
    client = connect(get_config().queue.redis_url.get_secret_value())
    client.rpush(EXECUTIONS_KEY, f"{event} {job.job_id} {job.dataset} {time.time()} {os.getpid()}")
    client.close()


@step("test-noop", input_type="dataset", fan_out="configs")  # lists none: test-config-echo runs when asked
def test_noop(job: StepJob) -> dict[str, Any]:
    return {"dataset": job.dataset}


@step("test-sleep", input_type="dataset")
def test_sleep(job: StepJob) -> dict[str, Any]:
    """Sleeps TEST_SLEEP_SECONDS (default 0.05), reporting progress, recording start and end."""
    _record(job, "start")
    duration = float(os.environ.get("TEST_SLEEP_SECONDS", "0.05"))
    steps = 5
    for i in range(steps):
        time.sleep(duration / steps)
        job.progress.update(i + 1, steps, f"slept {i + 1}/{steps}")
    _record(job, "end")
    return {"dataset": job.dataset, "slept": duration}


@step("test-fail", input_type="dataset")
def test_fail(job: StepJob) -> dict[str, Any]:
    raise SampleStepError(f"{job.dataset} cannot be processed")


@step("test-config-echo", input_type="config", parents=["test-noop"])
def test_config_echo(job: StepJob) -> dict[str, Any]:
    return {"config": job.config}


@step("test-stubborn", input_type="dataset")
def test_stubborn(job: StepJob) -> dict[str, Any]:
    """Ignores the soft time limit and keeps sleeping, so that the hard limit has to kill it."""
    _record(job, "start")
    deadline = time.monotonic() + float(os.environ.get("TEST_SLEEP_SECONDS", "0.05"))
    while time.monotonic() < deadline:
        try:
            time.sleep(deadline - time.monotonic())
        except SoftTimeLimitExceeded:
            _record(job, "soft-limit")
    _record(job, "end")
    return {}


test_unimplemented = add_step(register_step(ProcessingStep("test-unimplemented", InputType.DATASET)), None)


def _steal_own_lease_then_tick(job: StepJob, report_progress: bool) -> dict[str, Any]:
    """Takes its own lease away (as a reaper would after missed heartbeats), then keeps ticking."""
    from common.queue.limiter import namespace_key

    _record(job, "start")
    client = connect(get_config().queue.redis_url.get_secret_value())
    client.hdel(namespace_key(job.dataset.split("/")[0], "leases"), job.job_id or "")
    client.close()
    for i in range(50):
        time.sleep(0.1)
        _record(job, "tick")
        if report_progress:
            job.progress.update(i + 1, 50)
    _record(job, "end")  # never reached: the job stops soon after its heartbeat saw the loss
    return {}


@step("test-lease-thief", input_type="dataset")
def test_lease_thief(job: StepJob) -> dict[str, Any]:
    """Loses its lease, then keeps reporting progress: it stops at a report."""
    return _steal_own_lease_then_tick(job, report_progress=True)


@step("test-silent-lease-thief", input_type="dataset")
def test_silent_lease_thief(job: StepJob) -> dict[str, Any]:
    """Loses its lease, then computes without a word: its heartbeat stops it."""
    return _steal_own_lease_then_tick(job, report_progress=False)


@step("test-bad-fan-out", input_type="dataset", fan_out="configs")
def test_bad_fan_out(job: StepJob) -> dict[str, Any]:
    """Lists what TEST_CONFIGS (JSON) says where its fan_out says configs are: numbers, bad names..."""
    return {"configs": json.loads(os.environ.get("TEST_CONFIGS", "[1, 2]"))}

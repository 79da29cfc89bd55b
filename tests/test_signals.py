"""Celery's signals tell every task's run on the event stream: a plain task of the app as much as a step."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from common.config import get_config
from common.event_bus import EventBus
from common.events import EventType, TaskEvent, TaskFailed, TaskHeartbeat, TaskSucceeded
from common.redis_connection import get_redis
from tests.conftest import Stores, use_settings
from tests.waiting import eventually


class PlainError(Exception):
    pass


def test_a_plain_task_added_to_the_app_emits_started_heartbeat_and_completion_events(
    stores: Stores, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, {**stores.env(), "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})

    @celery_app.task(name="test-signals.plain-add")
    def plain_add(x: int, y: int) -> int:
        time.sleep(0.7)
        return x + y

    @celery_app.task(name="test-signals.plain-fail")
    def plain_fail() -> None:
        raise PlainError("plain failure")

    bus = EventBus(get_redis(get_config().queue.redis_url))
    start = bus.last_id()
    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30):
        ok = plain_add.delay(2, 3)
        failing = plain_fail.delay()
        assert ok.get(timeout=30) == 5
        with pytest.raises(PlainError):
            failing.get(timeout=30, propagate=True)

        def events_of(task_id: str) -> list[TaskEvent]:
            return [e for _, e in bus.read(start, count=10_000) if isinstance(e, TaskEvent) and e.task_id == task_id]

        ok_events = eventually(
            lambda: (found := events_of(ok.id)) and found[-1].type == EventType.TASK_SUCCEEDED and found,
            "the plain task's completion event",
        )
        failed_events = eventually(
            lambda: (found := events_of(failing.id)) and found[-1].type == EventType.TASK_FAILED and found,
            "the plain task's failure event",
        )
    assert ok_events[0].type == EventType.TASK_STARTED and ok_events[0].task == "test-signals.plain-add"
    assert ok_events[0].worker and ok_events[0].job_id is None and ok_events[0].dataset is None
    assert any(isinstance(e, TaskHeartbeat) for e in ok_events)
    succeeded = ok_events[-1]
    assert isinstance(succeeded, TaskSucceeded) and succeeded.runtime is not None and succeeded.runtime >= 0.7
    failed = failed_events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.exception == "PlainError" and failed.message == "plain failure"
    # (A loaded machine may let a heartbeat in, 0.2 s apart, before the failure.)
    told = [e.type for e in failed_events if e.type != EventType.TASK_HEARTBEAT]
    assert told == [EventType.TASK_STARTED, EventType.TASK_FAILED]


def test_a_step_task_event_carries_its_jobs_key(stores: Stores, celery_worker: Any) -> None:
    from tests import sample_steps

    bus = EventBus(get_redis(get_config().queue.redis_url))
    start = bus.last_id()
    result = sample_steps.test_noop.delay("org/signals")
    result.get(timeout=30)
    events = eventually(
        lambda: [
            e
            for _, e in bus.read(start, count=10_000)
            if isinstance(e, TaskEvent) and e.task_id == result.id and e.type == EventType.TASK_SUCCEEDED
        ],
        "the step's task.succeeded",
    )
    assert (events[0].job_id, events[0].step, events[0].dataset, events[0].namespace) == (
        result.id,
        "test-noop",
        "org/signals",
        "org",
    )


def test_a_stale_attempts_started_never_hides_a_stored_success(celery_app: Celery) -> None:
    task = celery_app.tasks["dataset-config-names"]
    task.push_request(id="job-started", hostname="w")
    try:
        task.update_state(state="STARTED", meta={"pid": 1})
        assert celery_app.AsyncResult("job-started").state == "STARTED"
        task.backend.store_result("job-started", {"config_names": []}, "SUCCESS")
        task.update_state(state="STARTED", meta={"pid": 2})  # a stale attempt's late STARTED
        assert celery_app.AsyncResult("job-started").state == "SUCCESS"
    finally:
        task.pop_request()

"""Step tasks through Celery's in-process worker, against the real Redis broker and MongoDB."""

from __future__ import annotations

import json
import time

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from common import cache
from common.exceptions import (
    CachedResponseNotFoundError,
    ContentNotStorableError,
    InvalidArgumentsError,
    InvalidDatasetNameError,
    MissingStepInputError,
)
from common.queue import JobStatus
from common.queue.ledger import jobs_collection
from tasks import steps
from tasks.queue import get_queue
from tests import sample_steps
from tests.conftest import Stores

RESULT_TIMEOUT = 30


def test_every_step_of_the_graph_is_a_task_named_after_it(celery_app: Celery) -> None:
    assert steps.dataset_config_names.name == "dataset-config-names"
    assert steps.split_descriptive_statistics.name == "split-descriptive-statistics"
    # The module's names are the current app's tasks (a test's or `run`'s app as much as tasks.app).
    assert celery_app.tasks["config-parquet-and-info"] is steps.config_parquet_and_info._get_current_object()
    assert steps.get_step_task("test-noop") is sample_steps.test_noop._get_current_object()
    assert steps.get_step_task("test-noop", celery_app) is celery_app.tasks["test-noop"]


def test_a_user_step_runs_through_the_queue_and_lands_in_the_cache(stores: Stores, celery_worker: object) -> None:
    result = sample_steps.test_noop.delay("org/ds")
    assert isinstance(result, AsyncResult)
    assert result.get(timeout=RESULT_TIMEOUT)["http_status"] == 200
    assert cache.get_response("test-noop", "org/ds").content == {"dataset": "org/ds"}
    job = get_queue().job(result.id)
    assert job is not None and job.status == JobStatus.SUCCESS
    assert job.started_at is not None and job.finished_at is not None and job.worker
    counts = get_queue().counts()  # the namespace is unlisted once a reaper pass found it idle
    assert "org" not in counts or counts["org"].running == 0


def test_a_typed_error_is_cached_with_its_code_and_the_task_fails(stores: Stores, celery_worker: object) -> None:
    result = sample_steps.test_fail.apply_async(["org/ds"], priority="high")
    with pytest.raises(sample_steps.SampleStepError):
        result.get(timeout=RESULT_TIMEOUT)
    assert result.state == "FAILURE"
    entry = cache.get_response("test-fail", "org/ds")
    assert (entry.http_status, entry.error_code) == (500, "SampleStepError")
    job = get_queue().job(result.id)
    assert job is not None and job.status == JobStatus.ERROR and job.error_code == "SampleStepError"


def test_a_step_without_a_function_caches_a_not_implemented_error(stores: Stores, celery_worker: object) -> None:
    result = sample_steps.test_unimplemented.delay("org/ds")
    with pytest.raises(Exception, match="has no function"):
        result.get(timeout=RESULT_TIMEOUT)
    assert cache.get_response("test-unimplemented", "org/ds").http_status == 501


def test_a_config_step_gets_its_config(stores: Stores, celery_worker: object) -> None:
    sample_steps.test_config_echo.delay("org/ds", config="default").get(timeout=RESULT_TIMEOUT)
    assert cache.get_response("test-config-echo", "org/ds", "default").content == {"config": "default"}


def test_the_same_message_delivered_twice_runs_once(stores: Stores, celery_worker: object, celery_app: Celery) -> None:
    queue = get_queue()
    queue.set_limit("org", 0)
    result = sample_steps.test_sleep.delay("org/ds")
    queue.set_limit("org", None)  # dispatches the job's message...
    dispatch_token = queue.limiter.lease_token("org", result.id)
    assert dispatch_token is not None
    # ...and the broker delivers the very same message a second time.
    from tasks.queue import CeleryDispatcher

    job = queue.job(result.id)
    assert job is not None
    from common.queue import Dispatch

    CeleryDispatcher(celery_app).publish(Dispatch(job.payload(), dispatch_token.split(":", 1)[-1]))
    result.get(timeout=RESULT_TIMEOUT)
    client = redis.Redis.from_url(stores.redis_url)
    executions = [e.decode() for e in client.lrange(sample_steps.EXECUTIONS_KEY, 0, -1)]
    assert sum(1 for e in executions if e.startswith("start")) == 1
    assert get_queue().job(result.id).attempts == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: sample_steps.test_noop.delay("bad name"), InvalidDatasetNameError),
        (lambda: sample_steps.test_noop.delay("org/ds", config="c"), MissingStepInputError),
        (lambda: sample_steps.test_config_echo.delay("org/ds"), MissingStepInputError),
        (lambda: sample_steps.test_noop.delay("org/ds", object()), InvalidArgumentsError),
        (lambda: sample_steps.test_noop.delay(dataset={"not": "a name"}), InvalidDatasetNameError),
        (lambda: sample_steps.test_noop.delay("org/ds", colour="red"), InvalidArgumentsError),
        (lambda: sample_steps.test_noop.apply_async(["org/ds"], countdown=10), InvalidArgumentsError),
        (lambda: sample_steps.test_noop.apply_async(["org/ds"], priority=9), InvalidArgumentsError),
    ],
)
def test_bad_calls_are_refused_before_anything_is_written(stores: Stores, call: object, error: type) -> None:
    with pytest.raises(error):
        call()  # type: ignore[operator]
    assert redis.Redis.from_url(stores.redis_url).dbsize() == 0
    # The test's ledger, whatever app another test left current (it asks for none).
    assert jobs_collection().count_documents({}) == 0


def test_only_json_crosses_the_broker(celery_app: Celery) -> None:
    assert celery_app.conf.accept_content == ["json"]
    assert celery_app.conf.task_serializer == "json"
    assert json.dumps(celery_app.conf.result_accept_content) == '["json"]'


@pytest.mark.parametrize("step", ["test-lease-thief", "test-silent-lease-thief"])
def test_a_job_that_lost_its_lease_stops_and_writes_nothing_whether_it_reports_progress_or_not(
    step: str, stores: Stores, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.contrib.testing.worker import start_worker

    from common.config import get_config

    monkeypatch.setenv("WORKER_HEARTBEAT_INTERVAL_SECONDS", "0.1")
    get_config.cache_clear()
    client = redis.Redis.from_url(stores.redis_url)

    def ticks() -> int:
        return sum(1 for e in client.lrange(sample_steps.EXECUTIONS_KEY, 0, -1) if e.startswith(b"tick"))

    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False, queues=["light"]):
        celery_app.tasks[step].delay("org/ds")
        deadline, seen, still_since = time.monotonic() + RESULT_TIMEOUT, -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:  # until the step has stopped ticking for a second
            assert time.monotonic() < deadline
            if ticks() != seen:
                seen, still_since = ticks(), time.monotonic()
            time.sleep(0.05)
    executions = client.lrange(sample_steps.EXECUTIONS_KEY, 0, -1)
    assert any(e.startswith(b"start") for e in executions)
    assert seen < 10  # it stopped soon after its heartbeat saw the lease gone
    assert not any(e.startswith(b"end") for e in executions)
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response(step, "org/ds")


@pytest.mark.parametrize("configs", ["[1, 2]", '["fine", "../escape"]', '["a/b"]'])
def test_content_that_does_not_list_names_at_the_fan_out_is_a_typed_cached_error(
    stores: Stores, celery_worker: object, monkeypatch: pytest.MonkeyPatch, configs: str
) -> None:
    monkeypatch.setenv("TEST_CONFIGS", configs)
    result = sample_steps.test_bad_fan_out.delay("org/ds")
    with pytest.raises(ContentNotStorableError):
        result.get(timeout=RESULT_TIMEOUT)
    entry = cache.get_response("test-bad-fan-out", "org/ds")
    assert entry.error_code == "ContentNotStorableError" and "fan_out" in entry.content["error"]
    assert get_queue().jobs("org/ds", [JobStatus.WAITING, JobStatus.QUEUED]) == []  # no children


def test_a_step_sent_from_another_thread_or_after_a_plain_celery_app_goes_through_stepcaches_app(
    stores: Stores, celery_worker: object, celery_app: Celery
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    Celery("someone-elses", broker="memory://")  # becomes this thread's current app
    with ThreadPoolExecutor(1) as pool:  # a thread whose current app is Celery's fallback
        job_id = pool.submit(lambda: sample_steps.test_noop.delay("org/thread").id).result()
    assert get_queue().jobs("org/thread")[0].job_id == job_id
    assert sample_steps.test_noop.delay("org/main").get(timeout=RESULT_TIMEOUT)["http_status"] == 200
    assert celery_app.AsyncResult(job_id).get(timeout=RESULT_TIMEOUT)["http_status"] == 200

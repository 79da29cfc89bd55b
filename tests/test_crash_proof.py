"""Crash-proof: one case per way the first system lost or corrupted work (issue "crash-proof"), each
reproduced against the real Redis and MongoDB-protocol server, driving the queue and the lifecycle as
workers would (tests/test_queue.py's `Jobs`), or with real workers where Celery itself is in play."""

from __future__ import annotations

import io
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery

from common import cache
from common.exceptions import JobManagerExceededMaximumDurationError
from common.lifecycle import Attempt, Outcome
from common.queue import Dispatch, JobStatus
from common.queue.epoch import EPOCH_KEY
from common.queue.ledger import JournalEntry, Ledger
from common.queue.limiter import ACTIVE_KEY, Ending
from tasks import cli
from tasks.embedded import start_mongo
from tasks.queue import CeleryDispatcher, get_lifecycle, get_queue
from tasks.step_task import end_delivered_attempt
from tests import sample_steps
from tests.conftest import Stores, use_settings
from tests.test_queue import SUCCESS, make_queue, stale_and_current
from tests.waiting import eventually
from tests.workers import sample_worker

ROOT_STEP = "dataset-config-names"


def test_1_a_stale_attempt_that_raises_after_the_current_one_succeeded_writes_nothing(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    stale, current = stale_and_current(q, dispatcher)
    assert q.end(current, Outcome.success({"config_names": [{"dataset": "org/ds", "config": "default"}]}))
    entry = cache.get_response(ROOT_STEP, "org/ds")
    children = cache.get_dataset_responses("org/ds")
    job = q.job(current.payload.job_id)

    assert not q.end(stale, Outcome.failure(JobManagerExceededMaximumDurationError("soft time limit")))
    assert cache.get_response(ROOT_STEP, "org/ds") == entry  # not overwritten
    assert cache.get_dataset_responses("org/ds") == children  # no ParentStepFailedError for the descendants
    assert q.job(current.payload.job_id) == job
    assert entry.fence == job.fence  # type: ignore[union-attr]  # written by the attempt that ended the job


def test_2_the_hard_time_limit_of_a_stale_attempt_leaves_the_current_one_alone(
    stores: Stores, celery_app: Celery
) -> None:
    lifecycle = get_lifecycle()
    queue = lifecycle.queue
    queue.set_limit("org", 0)
    result = sample_steps.test_noop.delay("org/ds")
    queue.set_limit("org", None)
    token = queue.limiter.lease_token("org", result.id)
    assert token is not None
    payload = queue.job(result.id).payload()  # type: ignore[union-attr]
    lifecycle.limiter.started_ttl_ms = 0
    assert lifecycle.start(payload, token, "killed-later")
    lifecycle.reap()
    lifecycle.limiter.started_ttl_ms = 60_000
    current_token = queue.limiter.lease_token("org", result.id)
    assert current_token is not None and current_token != token
    current = lifecycle.start(payload, current_token, "running-elsewhere")
    assert current is not None
    lifecycle.record_start(current, "running-elsewhere")

    timeout = Outcome.failure(JobManagerExceededMaximumDurationError("killed"))
    task = celery_app.tasks["test-noop"]
    assert not end_delivered_attempt(task, result.id, ["org/ds"], {}, {"stepcache_token": token}, timeout)
    assert queue.counts()["org"].started == 1  # the current attempt keeps its slot
    assert queue.job(result.id).status == JobStatus.STARTED  # type: ignore[union-attr]
    assert cache.get_dataset_responses("org/ds") == []
    # Its own killed message ends it, as the one way out does for any ending.
    assert end_delivered_attempt(task, result.id, ["org/ds"], {}, {"stepcache_token": current_token}, timeout)
    assert cache.get_response("test-noop", "org/ds").error_code == "JobManagerExceededMaximumDurationError"


def test_3_a_late_start_of_a_stale_attempt_does_not_take_the_ledger_back(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    stale, current = stale_and_current(q, dispatcher)
    job_id = current.payload.job_id
    assert q.job(job_id).lease_token == current.token  # type: ignore[union-attr]
    # attempt 1 confirmed before it stalled; its journal entry is written only now (by a slow writer)
    late = JournalEntry(
        JobStatus.STARTED, stale.fence, datetime.now(UTC), stale.payload, 1, stale.token, "w1", None, None, False
    )
    q.ledger.write([late])
    assert q.job(job_id).lease_token == current.token  # type: ignore[union-attr]
    assert q.end(current, SUCCESS)
    assert q.job(job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]


def test_4_a_crash_the_reaper_could_not_record_is_recorded_by_its_next_pass(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1"})
    q, dispatcher = make_queue(limit=1, max_attempts=1)
    job = q.enqueue(ROOT_STEP, "org/ds")
    (dispatch,) = dispatcher.take()
    assert q.start(dispatch.payload, dispatch.token, "w")
    q.limiter.started_ttl_ms = 0
    q.renew(Attempt(dispatch.payload, dispatch.token))  # the lease expires now
    q.journal.flush_all()
    real_write = Ledger.write

    def mongo_down(self: Ledger, *args: object, **kwargs: object) -> None:
        raise ConnectionError("MongoDB is down")

    monkeypatch.setattr(Ledger, "write", mongo_down)
    report = q.reap()
    assert report is not None and report.crashed == [job.job_id]
    assert q.ledger.get(job.job_id).status == JobStatus.STARTED  # type: ignore[union-attr]
    monkeypatch.setattr(Ledger, "write", real_write)
    time.sleep(1.05)  # older than the grace
    q.reap()  # the record stayed in the outbox: this pass applies it
    assert q.job(job.job_id).status == JobStatus.ERROR  # type: ignore[union-attr]
    assert cache.get_response(ROOT_STEP, "org/ds").error_code == "JobManagerCrashedError"
    assert cache.get_response("dataset-is-valid", "org/ds").error_code == "ParentStepFailedError"


def test_4_an_end_whose_effects_were_lost_is_finished_by_the_reaper_with_its_next_steps(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1"})
    q, dispatcher = make_queue(limit=1)
    first = q.enqueue(ROOT_STEP, "org/a")
    waiting = q.enqueue(ROOT_STEP, "org/b")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w")
    assert attempt is not None
    content = {"config_names": [{"dataset": "org/a", "config": "default"}]}
    fence = q.limiter.renew("org", first.job_id, dispatch.token, fence=True).fence
    cache.upsert_response(ROOT_STEP, "org/a", content, fence=fence)
    ended = q.limiter.end(dispatch.payload, dispatch.token, fence, Ending.SUCCESS, None)
    assert ended.record is not None and [d.payload.job_id for d in ended.dispatched] == [waiting.job_id]
    # ...and the process died here: no ledger, no children, no message for the promoted job.
    again = q.limiter.end(dispatch.payload, dispatch.token, fence, Ending.SUCCESS, None)
    assert again.record == ended.record  # a retried end (its reply lost) gets the recorded end back
    assert dispatcher.take() == []
    time.sleep(1.05)  # older than the grace: its caller is not coming back
    q.reap()
    assert q.job(first.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    assert [d.payload.job_id for d in dispatcher.take()] == [waiting.job_id]
    children = {job.step for job in q.jobs("org/a", [JobStatus.WAITING])}
    assert "config-split-names" in children


def test_4_every_script_answers_a_repeated_call_as_the_first(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    job = q.enqueue(ROOT_STEP, "org/ds")
    admitted, _ = q.limiter.admit(job.payload())
    assert not admitted  # admit is idempotent
    (dispatch,) = dispatcher.take()
    first = q.limiter.confirm("org", job.job_id, dispatch.token, "delivery-1")
    assert q.limiter.confirm("org", job.job_id, dispatch.token, "delivery-1") == first  # its answer was lost
    assert not q.limiter.confirm("org", job.job_id, dispatch.token, "delivery-2").run  # a redelivery
    cancellation = q.limiter.cancel("org", [job.job_id])
    records, started = cancellation.records, cancellation.started
    assert started == [job.job_id] and records == []
    assert q.limiter.cancel("org", [job.job_id]).started == [job.job_id]


@pytest.mark.slow
def test_5_a_stalled_mongodb_does_not_get_running_jobs_reaped(
    stores: Stores, celery_app: Celery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mongo = start_mongo()
    try:
        env = use_settings(
            monkeypatch,
            {
                **stores.env(),
                "QUEUE_MONGO_URL": mongo.url,
                "CACHE_MONGO_URL": mongo.url,
                "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.3",
                "WORKER_MAX_MISSING_HEARTBEATS": "2",
                "WORKER_METRICS_PORT": "0",
                "TEST_SLEEP_SECONDS": "6",
            },
        )
        with sample_worker("w", env, tmp_path):
            result = sample_steps.test_sleep.delay("org/ds")
            eventually(lambda: get_queue().job(result.id).status == JobStatus.STARTED, "started")  # type: ignore[union-attr]
            os.kill(mongo.process.pid, signal.SIGSTOP)  # longer than the lease TTL (0.9 s)
            time.sleep(3)
            os.kill(mongo.process.pid, signal.SIGCONT)
            result.get(timeout=60)
        job = get_queue().job(result.id)
        assert job is not None and job.status == JobStatus.SUCCESS and job.attempts == 1
        client = redis.Redis.from_url(stores.redis_url)
        starts = [e for e in client.lrange(sample_steps.EXECUTIONS_KEY, 0, -1) if e.startswith(b"start")]
        assert len(starts) == 1  # never run a second time
    finally:
        os.kill(mongo.process.pid, signal.SIGCONT)
        mongo.stop()


def test_6_a_stale_message_does_not_flip_a_finished_task_back_to_started(
    stores: Stores, celery_worker: object, celery_app: Celery
) -> None:
    result = sample_steps.test_fail.delay("org/ds")
    with pytest.raises(sample_steps.SampleStepError):
        result.get(timeout=30)
    job = get_queue().job(result.id)
    assert job is not None and job.lease_token is not None
    CeleryDispatcher(celery_app).publish(Dispatch(job.payload(), job.lease_token))  # the same message, redelivered
    eventually(lambda: get_redis_llen_of_acked(stores), "the redelivered message handled", timeout=10)
    assert result.state == "FAILURE"
    with pytest.raises(sample_steps.SampleStepError):
        result.get(timeout=5)  # returns at once, as the README's example expects


def get_redis_llen_of_acked(stores: Stores) -> bool:
    """The broker holds no message of the light queue any more: the redelivered one was consumed."""
    return redis.Redis.from_url(stores.redis_url).llen("light") == 0


def test_7_an_idle_namespace_keeps_no_key_and_the_reaper_does_not_visit_it(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=2)
    for i in range(3):
        q.enqueue("test-noop", f"ns{i}/ds")
    for dispatch in dispatcher.take():
        attempt = q.start(dispatch.payload, dispatch.token, "w")
        assert attempt is not None and q.end(attempt, SUCCESS)
    q.reap()
    client = redis.Redis.from_url(stores.redis_url)
    eventually(lambda: not client.keys("stepcache:{ns*"), "the namespaces' keys gone", timeout=5)
    assert client.smembers(ACTIVE_KEY) == set()
    q.set_limit("ns0", 3)  # an override is configuration: it stays, and the namespace is still not active
    q.reap()
    assert client.keys("stepcache:{ns*") == [b"stepcache:{ns0}:limit"]
    assert q.limiter.overrides() == {"ns0": 3}


def test_7_a_requeued_job_keeps_its_place_in_line(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1, started_ttl=0)
    first = q.enqueue(ROOT_STEP, "org/first")
    q.enqueue(ROOT_STEP, "org/second")
    (dispatch,) = dispatcher.take()
    assert q.start(dispatch.payload, dispatch.token, "w")
    q.reap()  # its worker died: it waits again, ahead of the younger job
    assert [d.payload.job_id for d in dispatcher.take()] == [first.job_id]


def test_8_after_redis_lost_its_data_a_running_attempt_survives_and_ends_once(
    stores: Stores, celery_worker: object
) -> None:
    client = redis.Redis.from_url(stores.redis_url)
    get_lifecycle().redis_kept_its_data()  # the system ran a while: Redis has its epoch marker
    os.environ["TEST_SLEEP_SECONDS"] = "1.5"
    try:
        result = sample_steps.test_sleep.delay("org/ds")
        eventually(lambda: get_queue().job(result.id).status == JobStatus.STARTED, "started")  # type: ignore[union-attr]
        client.flushall()  # a restart without persistence
        assert result.get(timeout=30)["http_status"] == 200
    finally:
        del os.environ["TEST_SLEEP_SECONDS"]
    job = get_queue().job(result.id)
    assert job is not None and job.status == JobStatus.SUCCESS and job.attempts == 1
    assert client.exists(EPOCH_KEY)  # repaired, and marked again
    assert cache.get_response("test-sleep", "org/ds").fence == job.fence


def test_8_reconcile_is_a_command(stores: Stores) -> None:
    get_queue().enqueue(ROOT_STEP, "org/ds")
    get_queue().journal.flush_all()  # the ledger caught up (within QUEUE_LEDGER_LAG_SECONDS)
    redis.Redis.from_url(stores.redis_url).flushall()
    out = io.StringIO()
    assert cli.reconcile(out) == cli.EXIT_OK
    assert out.getvalue() == "1 job(s) took the ledger's state\n"
    assert cli.main(["reconcile"]) == cli.EXIT_OK

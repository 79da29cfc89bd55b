"""`step.delay_many`: many jobs in one bulk operation per store, with the same validation and dedupe as delay."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from common.exceptions import InvalidDatasetNameError, MissingStepInputError
from common.queue import JobStatus, Priority
from common.queue.ledger import Ledger
from tasks.queue import get_queue
from tests import sample_steps
from tests.conftest import Stores

RESULT_TIMEOUT = 30


def test_ten_thousand_jobs_in_one_bulk_insert_and_one_redis_round_trip(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = get_queue()
    namespaces = [f"bulk{i}" for i in range(50)]
    for namespace in namespaces:
        queue.set_limit(namespace, 0)  # paused: every job parks, none is published
    inserts: list[int] = []
    real_insert = Ledger._insert_many

    def counted_insert(self: Ledger, documents: list[dict[str, Any]]) -> None:
        inserts.append(len(documents))
        real_insert(self, documents)

    monkeypatch.setattr(Ledger, "_insert_many", counted_insert)
    client = redis.Redis.from_url(stores.redis_url)
    before = int(client.info("stats")["total_commands_processed"])
    began = time.perf_counter()
    results = sample_steps.test_noop.delay_many(f"{namespaces[i % 50]}/ds{i}" for i in range(10_000))
    elapsed = time.perf_counter() - began
    commands = int(client.info("stats")["total_commands_processed"]) - before
    print(f"delay_many: 10,000 jobs in {elapsed:.2f}s ({10_000 / elapsed:.0f}/s), {commands} Redis commands")
    assert len(results) == 10_000 and len({result.id for result in results}) == 10_000
    assert inserts == [10_000]
    assert queue.limiter.overview(namespaces)["bulk7"].waiting == 200
    assert sum(overview.waiting for overview in queue.limiter.overview(namespaces).values()) == 10_000
    assert len(queue.jobs(statuses=[JobStatus.WAITING])) == 10_000


def test_delay_many_dedupes_like_delay_and_refuses_bad_input_before_writing(stores: Stores) -> None:
    queue = get_queue()
    queue.set_limit("org", 0)
    first = sample_steps.test_noop.delay("org/a")
    results = sample_steps.test_noop.delay_many(["org/a", "org/b", {"dataset": "org/b"}, ("org/c",)])
    ids = [result.id for result in results]
    assert ids[0] == first.id  # the pending twin
    assert ids[1] == ids[2]  # a twin within the batch
    assert len(queue.jobs()) == 3
    for bad, error in [(["org/d", "not a/valid/name"], InvalidDatasetNameError), (["org/e", 42], Exception)]:
        with pytest.raises(error):
            sample_steps.test_noop.delay_many(bad)
    with pytest.raises(MissingStepInputError):
        sample_steps.test_config_echo.delay_many(["org/f"])
    assert len(queue.jobs()) == 3  # nothing of a refused batch was written


def test_delay_many_jobs_run_through_workers(stores: Stores, worker: object) -> None:
    results = sample_steps.test_noop.delay_many([f"team{i % 2}/ds{i}" for i in range(6)], priority="high")
    assert [result.get(timeout=RESULT_TIMEOUT)["http_status"] for result in results] == [200] * 6
    assert {job.priority for job in get_queue().jobs()} == {"high"}


def test_a_job_recorded_but_never_admitted_is_admitted_by_the_next_reaper_pass(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    from common.lifecycle import ADMIT_GRACE
    from common.queue.queue import JobInput, new_job
    from tasks.queue import get_lifecycle

    lifecycle = get_lifecycle()
    lifecycle.queue.set_limit("lost", 0)
    lifecycle.queue.check_epoch()  # Redis is marked: what follows is not a repair after a data loss
    # The enqueuing process died between its ledger insert and its admission (as a SIGKILL would leave it).
    job = new_job(JobInput("test-noop", "lost/ds"), Priority.NORMAL, None)
    job = job.model_copy(update={"created_at": datetime.now(UTC) - ADMIT_GRACE - timedelta(seconds=1)})
    lifecycle.ledger.create(job)
    assert lifecycle.limiter.known([job.payload()]) == [False]
    report = lifecycle.reap()
    assert report is not None and report.admitted == 1
    assert lifecycle.limiter.known([job.payload()]) == [True]
    assert lifecycle.limiter.overview(["lost"])["lost"].waiting == 1
    again = lifecycle.reap()
    assert again is not None and again.admitted == 0  # each job is looked at once


def test_the_reaper_never_admits_again_a_job_whose_cancel_is_left_to_apply(stores: Stores) -> None:
    from datetime import UTC, datetime

    from common.lifecycle import ADMIT_GRACE
    from tasks.queue import get_lifecycle

    lifecycle = get_lifecycle()
    queue = lifecycle.queue
    queue.check_epoch()
    queue.set_limit("gone", 0)
    job = queue.enqueue("test-noop", "gone/ds")
    # Cancelled in Redis, but its process died before the ledger learnt it: the record waits in the outbox.
    cancelled, _, _ = queue.limiter.cancel("gone", [job.job_id])
    assert [record.kind for record in cancelled] == ["cancel"]
    queue.ledger.collection.update_one(
        {"_id": job.job_id}, {"$set": {"created_at": datetime.now(UTC) - 2 * ADMIT_GRACE}}
    )
    assert queue.limiter.known([job.payload()]) == [True]  # its record is there
    report = lifecycle.reap()
    assert report is not None and report.admitted == 0
    assert queue.limiter.admit(job.payload()) == (False, [])  # the script refuses it too
    assert queue.limiter.overview(["gone"])["gone"].waiting == 0

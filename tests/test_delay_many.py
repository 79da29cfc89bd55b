"""`step.delay_many`: many jobs in one bulk operation per store, with the same validation and dedupe as delay."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import redis

from common.exceptions import InvalidDatasetNameError, MissingStepInputError
from common.queue import JobStatus
from common.queue.journal import WRITE_BATCH
from common.queue.ledger import JournalEntry, Ledger
from tasks.queue import get_queue
from tests import sample_steps
from tests.conftest import Stores
from tests.waiting import past_grace

RESULT_TIMEOUT = 30


def test_ten_thousand_jobs_in_one_redis_round_trip_and_one_bulk_write_to_the_ledger(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = get_queue()
    namespaces = [f"bulk{i}" for i in range(50)]
    for namespace in namespaces:
        queue.set_limit(namespace, 0)  # paused: every job parks, none is published
    writes: list[int] = []
    real_write = Ledger.write

    def counted_write(self: Ledger, entries: Sequence[JournalEntry]) -> None:
        writes.append(len(entries))
        real_write(self, entries)

    monkeypatch.setattr(Ledger, "write", counted_write)
    client = redis.Redis.from_url(stores.redis_url)
    before = int(client.info("stats")["total_commands_processed"])
    began = time.perf_counter()
    results = sample_steps.test_noop.delay_many(f"{namespaces[i % 50]}/ds{i}" for i in range(10_000))
    elapsed = time.perf_counter() - began
    commands = int(client.info("stats")["total_commands_processed"]) - before
    print(f"delay_many: 10,000 jobs in {elapsed:.2f}s ({10_000 / elapsed:.0f}/s), {commands} Redis commands")
    assert len(results) == 10_000 and len({result.id for result in results}) == 10_000
    assert queue.limiter.overview(namespaces)["bulk7"].waiting == 200
    assert sum(overview.waiting for overview in queue.limiter.overview(namespaces).values()) == 10_000
    assert len(queue.jobs(statuses=[JobStatus.WAITING])) == 10_000
    # The journal's writer (its thread, or the read above) wrote them in bulk writes of WRITE_BATCH.
    assert sum(writes) == 10_000 and max(writes) <= WRITE_BATCH and len(writes) <= 10_000 // WRITE_BATCH + 1, writes


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


def test_delay_many_jobs_run_through_workers(stores: Stores, celery_worker: object) -> None:
    results = sample_steps.test_noop.delay_many([f"team{i % 2}/ds{i}" for i in range(6)], priority="high")
    assert [result.get(timeout=RESULT_TIMEOUT)["http_status"] for result in results] == [200] * 6
    assert {job.priority for job in get_queue().jobs()} == {"high"}


def test_what_a_killed_process_journaled_is_written_to_the_ledger_by_the_next_reaper_pass(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.queue import get_lifecycle

    lifecycle = get_lifecycle()
    queue = lifecycle.queue
    # The enqueuing process is SIGKILLed before its writer thread runs: only Redis knows the job.
    monkeypatch.setattr(queue.limiter, "on_journal", lambda namespaces: None)
    queue.set_limit("lost", 0)
    job = queue.enqueue("test-noop", "lost/ds")
    time.sleep(0.3)
    assert queue.ledger.get(job.job_id) is None
    assert queue.enqueue("test-noop", "lost/ds").job_id == job.job_id  # dedupe is Redis': no wait for the ledger
    lifecycle.reap()
    assert queue.ledger.get(job.job_id) is None  # younger than the grace: its writer may be writing it now
    past_grace()
    assert lifecycle.reap() is not None
    recorded = queue.ledger.get(job.job_id)
    assert recorded is not None and recorded.status == JobStatus.WAITING and recorded.step == "test-noop"
    assert queue.limiter.journals({"lost": 10})[0] == {}


def test_a_job_with_a_cancel_left_to_apply_is_not_admitted_again(stores: Stores) -> None:
    queue = get_queue()
    queue.set_limit("gone", 0)
    job = queue.enqueue("test-noop", "gone/ds")
    cancelled = queue.limiter.cancel("gone", [job.job_id]).records  # its process died before applying it
    assert [record.kind for record in cancelled] == ["cancel"]
    assert queue.limiter.admit(job.payload()) == (False, [])  # the script refuses it
    assert queue.limiter.overview(["gone"])["gone"].waiting == 0
    assert queue.job(job.job_id).status == JobStatus.CANCELLED  # type: ignore[union-attr]

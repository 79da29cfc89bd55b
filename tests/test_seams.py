"""Crash-proof at the seams (issue 21): one test per case, each failing before the change and passing after,
against a real redis-server (restarted from its own RDB snapshot for the rollback) and SecantusDB, driving
the queue and the lifecycle as workers do (tests/test_queue.py's `Jobs`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common import cache
from common.exceptions import CachedResponseNotFoundError
from common.lifecycle import Attempt, Lifecycle, Outcome
from common.queue import JobStatus
from common.queue.jobs import Priority
from common.queue.ledger import JournalEntry
from common.queue.limiter import FENCE_EPOCH_MS, RANK_WEIGHT, LeaseState, namespace_key
from tests.conftest import Stores, use_settings
from tests.redis_servers import SnapshotRedis
from tests.test_queue import SUCCESS, Jobs, RecordingDispatcher, make_queue
from tests.waiting import past_grace

ROOT = "dataset-config-names"
CHILD = "config-split-names"


def content(dataset: str, *configs: str) -> dict[str, Any]:
    return {"config_names": [{"dataset": dataset, "config": config} for config in configs]}


@pytest.fixture
def fast(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Stores:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})
    return stores


def run(q: Jobs, dispatcher: RecordingDispatcher, outcome: Outcome = SUCCESS) -> list[str]:
    """Start and end every dispatched job (and those their ends dispatch), as workers would."""
    ran = []
    while dispatches := dispatcher.take():
        for dispatch in dispatches:
            attempt = q.start(dispatch.payload, dispatch.token, "w")
            assert attempt is not None
            assert q.end(attempt, outcome)
            ran.append(dispatch.payload.job_id)
    return ran


def keys_of(q: Jobs, dataset: str) -> list[tuple[str, str | None, str | None]]:
    return sorted((job.step, job.config or "", job.split or "") for job in q.jobs(dataset))  # type: ignore[misc]


# --- 1. Redis restarts from its RDB snapshot -------------------------------------------------------


@pytest.fixture
def snapshot_redis(fast: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SnapshotRedis]:
    server = SnapshotRedis(tmp_path / "redis")
    use_settings(monkeypatch, {"QUEUE_REDIS_URL": server.url})
    try:
        yield server
    finally:
        server.stop()


def test_1_a_redis_restarted_from_its_snapshot_is_repaired_from_the_ledger(snapshot_redis: SnapshotRedis) -> None:
    q, dispatcher = make_queue(limit=1)
    assert not q.redis_kept_its_data()  # a new Redis: marked
    q.enqueue(ROOT, "done/ds")
    (done,) = dispatcher.take()
    done_attempt = q.start(done.payload, done.token, "w0")
    assert done_attempt is not None
    snapshot_redis.save()  # Redis' own persistence: the snapshot knows `done` as started, and its marker
    q.enqueue(ROOT, "org/running")
    q.enqueue(ROOT, "org/waiting")
    (running,) = dispatcher.take()
    attempt = q.start(running.payload, running.token, "w1")
    assert attempt is not None
    assert q.end(done_attempt, Outcome.success(content("done/ds", "a")))  # its child is enqueued
    children = keys_of(q, "done/ds")
    dispatcher.take()
    q.journal.flush_all()  # the ledger caught up, as it does within QUEUE_LEDGER_LAG_SECONDS
    snapshot_redis.kill_and_restart()  # SIGKILL, then back from the snapshot

    # The running attempt asks for its lease: the rollback is found and repaired, and its lease is back.
    assert q.renew(attempt) == LeaseState.RUNNING
    client = redis.Redis.from_url(snapshot_redis.url)
    for job in q.ledger.unfinished():  # every unfinished job of the ledger is known to Redis again
        assert client.hexists(namespace_key(job.namespace, "jobs"), job.job_id), job
    # The job that had ended is never run again: its snapshot lease is gone, its message finds nothing.
    assert q.start(done.payload, done.token, "redelivered") is None
    assert q.job(done.payload.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    q.reap()
    past_grace()
    q.reap()  # what the snapshot left to apply, applied again: its children are not enqueued twice
    assert keys_of(q, "done/ds") == children
    assert q.end(attempt, SUCCESS)
    assert q.job(running.payload.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    run(q, dispatcher)
    assert q.job(q.jobs("org/waiting")[0].job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]


def test_1_a_rollback_on_a_redis_where_nothing_happens_is_found_by_the_reapers_pass(
    snapshot_redis: SnapshotRedis,
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    snapshot_redis.save()
    job = q.enqueue(ROOT, "org/ds")
    q.journal.flush_all()
    snapshot_redis.kill_and_restart()
    q.reap()  # one pass
    assert redis.Redis.from_url(snapshot_redis.url).hexists(namespace_key("org", "jobs"), job.job_id)
    assert [dispatch.payload.job_id for dispatch in dispatcher.take()][-1] == job.job_id


# --- 2. Redis restarts empty between a worker's confirm and its start's ledger write ----------------


def test_2_a_start_redis_forgot_before_it_was_durable_does_not_run_beside_its_redispatch(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    q.journal.flush_all()  # the ledger says queued
    real_flush = q.queue.journal.flush

    def restart_empty_first(*args: Any, **kwargs: Any) -> list[str]:
        monkeypatch.setattr(q.queue.journal, "flush", real_flush)
        fast.redis().flushall()  # between confirm and the start's write
        return real_flush(*args, **kwargs)

    monkeypatch.setattr(q.queue.journal, "flush", restart_empty_first)
    assert q.start(first.payload, first.token, "w1") is None  # it does not run
    (second,) = dispatcher.take()  # the repair dispatched it again
    current = q.start(second.payload, second.token, "w2")
    assert current is not None and q.counts()["org"].started == 1
    assert q.end(current, SUCCESS)


def test_2_a_durable_start_keeps_its_lease_when_redis_restarts_empty_and_is_not_dispatched_again(
    fast: Stores,
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    attempt = q.start(first.payload, first.token, "w1")
    assert attempt is not None
    fast.redis().flushall()
    q.reap()
    assert dispatcher.take() == []  # the ledger said started: its lease came back, no second attempt
    assert q.renew(attempt) == LeaseState.RUNNING and q.counts()["org"].started == 1
    assert q.end(attempt, SUCCESS)


# --- 3. An end applied twice runs its children once ------------------------------------------------


def test_3_an_end_applied_again_after_its_children_ran_enqueues_none_twice(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=4)
    q.enqueue(ROOT, "org/ds")
    (root,) = dispatcher.take()
    attempt = q.start(root.payload, root.token, "w1")
    assert attempt is not None
    limiter = type(q.limiter)
    real_add_applied = limiter.add_applied
    # The process dies after enqueue_next and before the END record is dropped.
    monkeypatch.setattr(limiter, "add_applied", lambda *args: None)
    monkeypatch.setattr(limiter, "applied", lambda *args: False)
    assert q.end(attempt, Outcome.success(content("org/ds", "a", "b")))
    monkeypatch.setattr(limiter, "add_applied", real_add_applied)
    monkeypatch.undo()
    use_settings(monkeypatch, {**fast.env(), "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})
    run(q, dispatcher, Outcome.success({"splits": []}))  # its children start and end
    before = keys_of(q, "org/ds")
    past_grace()
    q.reap()  # the reaper applies the record again
    q.reap()
    assert keys_of(q, "org/ds") == before
    assert dispatcher.take() == []


# --- 4. A stale attempt's cache write is refused where it lands ------------------------------------


def test_4_an_attempt_paused_past_its_lease_after_its_fence_writes_nothing(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    stale = q.start(first.payload, first.token, "w1")
    assert stale is not None
    real_upsert = cache.upsert_response
    current: list[Attempt] = []

    def paused(*args: Any, **kwargs: Any) -> bool:
        # SIGSTOP after its fence: its lease lapses, attempt 2 starts, then it goes on and writes.
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        q.limiter.started_ttl_ms = 0
        q.renew(stale)
        q.reap()
        q.limiter.started_ttl_ms = 60_000
        (second,) = dispatcher.take()
        attempt = q.start(second.payload, second.token, "w2")
        assert attempt is not None
        current.append(attempt)
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", paused)
    assert not q.end(stale, Outcome.success(content("org/ds", "stale")))
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response(ROOT, "org/ds")  # refused where it lands
    q.cancel("org/ds", revoke_started=True)
    assert q.end(current[0], Outcome.success(content("org/ds", "late")))  # ends as cancelled
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response(ROOT, "org/ds")
    assert q.jobs("org/ds")[0].status == JobStatus.CANCELLED


# --- 5. A delete racing a job's end leaves the dataset deleted -------------------------------------


def test_5_a_delete_between_an_attempts_fence_and_its_write_leaves_the_dataset_deleted(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    real_upsert = cache.upsert_response

    def deleted_first(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        q.cancel("org/ds", revoke_started=True)  # the webhook's delete: cancel, then remove the entries
        cache.delete_dataset_responses("org/ds")
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", deleted_first)
    q.end(attempt, Outcome.success(content("org/ds", "a", "b")))
    past_grace()
    q.reap()
    assert cache.cache_collection().count_documents({"dataset": "org/ds"}) == 0
    assert [(job.step, job.status) for job in q.jobs("org/ds")] == [(ROOT, JobStatus.CANCELLED)]
    assert dispatcher.take() == []


# --- 6. A next step is never lost: an end's effects are pending in the ledger until applied --------


def test_6_an_end_in_the_ledger_whose_effects_redis_lost_before_they_were_applied_gets_its_children(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=2)
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (root,) = dispatcher.take()
    attempt = q.start(root.payload, root.token, "w1")
    assert attempt is not None
    monkeypatch.setattr(Lifecycle, "apply", lambda *args, **kwargs: False)  # killed before it applies
    assert q.end(attempt, Outcome.success(content("org/ds", "a")))
    monkeypatch.undo()
    use_settings(monkeypatch, {**fast.env(), "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})
    q.journal.flush_all()  # the ledger says success
    fast.redis().flushall()  # then Redis restarts empty: its END record is gone
    q.reap()  # the repair gives the pending end back
    past_grace()
    q.reap()
    assert (CHILD, "a", "") in keys_of(q, "org/ds")


def test_6_children_admitted_but_not_in_the_ledger_when_redis_lost_them_are_enqueued_again(
    fast: Stores,
) -> None:
    q, dispatcher = make_queue(limit=2)
    q.redis_kept_its_data()
    q.limiter.on_journal = lambda namespaces: None  # the writer below only
    q.enqueue(ROOT, "org/ds")
    (root,) = dispatcher.take()
    attempt = q.start(root.payload, root.token, "w1")
    assert attempt is not None
    assert q.end(attempt, Outcome.success(content("org/ds", "a")))  # applied: children admitted, record dropped
    client = fast.redis()
    raw = client.lrange(namespace_key("org", "journal"), 0, -1)
    entries = [JournalEntry.parse(entry) for entry in raw]
    end = next(i for i, entry in enumerate(entries) if entry.status == JobStatus.SUCCESS)
    q.ledger.write(entries[: end + 1])  # a writer wrote up to the parent's end, not its children's
    client.flushall()
    q.reap()
    past_grace()
    q.reap()
    keys = keys_of(q, "org/ds")
    assert (CHILD, "a", "") in keys and len(keys) == len(set(keys))  # each child once


# --- 7. Fences survive a clock going backwards; low priorities age ----------------------------------


def test_7_an_entry_written_under_a_clock_far_ahead_does_not_refuse_newer_results(fast: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    # An earlier job wrote it while Redis' clock was a day ahead (then a failover to a replica behind it).
    ahead = (int(time.time() * 1000) - FENCE_EPOCH_MS + 86_400_000) * 1000
    cache.claim_entry(ROOT, "org/ds", None, None, cache.Writer("earlier-job", ahead))
    cache.upsert_response(ROOT, "org/ds", {"config_names": []}, fence=ahead + 1, writer=cache.Writer("earlier-job"))
    q.enqueue(ROOT, "org/ds")
    run(q, dispatcher, Outcome.success(content("org/ds", "new")))
    assert cache.get_response(ROOT, "org/ds").content == content("org/ds", "new")


def test_7_a_repair_makes_the_namespaces_fences_go_on_past_the_ledgers(fast: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    job = q.enqueue(ROOT, "org/ds")
    q.journal.flush_all()
    ahead = q.job(job.job_id).fence + 86_400 * 10**6  # type: ignore[union-attr]  # from a clock a day ahead
    q.ledger.collection.update_one({"_id": job.job_id}, {"$set": {"fence": ahead}})
    fast.redis().flushall()
    q.reap()
    dispatch = dispatcher.take()[-1]  # dispatched again after the repair
    assert int(dispatch.token) > ahead


def test_7_a_low_priority_job_that_waited_long_enough_goes_before_a_new_high_one(fast: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/busy")  # takes the only slot
    (busy,) = dispatcher.take()
    old = q.enqueue(ROOT, "org/old", priority=Priority.LOW)
    recent = q.enqueue(ROOT, "org/recent", priority=Priority.LOW)
    client = fast.redis()
    waiting = namespace_key("org", "waiting")
    hour = 3_600 * 10**6  # fences are microseconds
    for job_id, waited in ((old.job_id, 3 * hour), (recent.job_id, hour)):
        score = client.zscore(waiting, job_id)
        assert score is not None
        client.zadd(waiting, {job_id: score - waited})  # admitted that long ago
    high = q.enqueue(ROOT, "org/high", priority=Priority.HIGH)
    order = []
    attempt = q.start(busy.payload, busy.token, "w")
    assert attempt is not None and q.end(attempt, SUCCESS)
    for _ in range(3):
        (dispatch,) = dispatcher.take()
        order.append(dispatch.payload.job_id)
        attempt = q.start(dispatch.payload, dispatch.token, "w")
        assert attempt is not None and q.end(attempt, SUCCESS)
    # Two ranks below, three hours waited: it runs first; one hour waited is not enough.
    assert order == [old.job_id, high.job_id, recent.job_id]
    assert 10 * hour < RANK_WEIGHT  # ranks apart in the zset; aging is the promotion's


def test_the_journal_entry_of_an_applied_end_reads_back(fast: Stores) -> None:
    entry = JournalEntry.parse(json.dumps(["applied", "5", "0", "job", "0", "", "", "", "", '["s","o/d",null,null,1]']))
    assert entry.status is None and entry.fence == 5

"""Crash-proof at the seams (issue 21): one test per case, each failing before the change and passing after,
against a real redis-server (restarted from its own RDB snapshot for the rollback) and SecantusDB, driving
the queue and the lifecycle as workers do (tests/test_queue.py's `Jobs`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo.errors import AutoReconnect

from common import cache, orchestrator
from common.exceptions import CachedResponseNotFoundError
from common.lifecycle import Attempt, Lifecycle, Outcome
from common.queue import JobStatus
from common.queue import queue as queue_module
from common.queue.jobs import Priority
from common.queue.ledger import JournalEntry, Ledger
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


def before_the_write(monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], object]) -> None:
    """The next cache write runs `meanwhile` first: what happens while its attempt is paused between its
    fence and its write (a GC pause, SIGSTOP)."""
    real_upsert = cache.upsert_response

    def paused(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        meanwhile()
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", paused)


def lapse(q: Jobs, attempt: Attempt) -> None:
    """The attempt's lease lapses and the reaper's pass takes it back."""
    q.limiter.started_ttl_ms = 0
    q.renew(attempt)
    q.reap()
    q.limiter.started_ttl_ms = 60_000


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


def test_2_a_start_redis_forgot_and_another_process_repaired_before_its_write_does_not_run_beside_its_redispatch(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    other, elsewhere = make_queue(limit=1)  # another process, whose reaper repairs first
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    q.journal.flush_all()  # the ledger says queued
    real_record_start = q.ledger.record_start

    def restart_empty_and_repair_first(*args: Any) -> bool:
        monkeypatch.setattr(q.ledger, "record_start", real_record_start)
        fast.redis().flushall()  # between confirm and the start's write
        other.reap()  # the repair reads the ledger (queued) and dispatches the job anew
        return real_record_start(*args)

    monkeypatch.setattr(q.ledger, "record_start", restart_empty_and_repair_first)
    assert q.start(first.payload, first.token, "w1") is None  # it does not run: its lease went to another
    (second,) = elsewhere.take()  # dispatched again, once
    current = q.start(second.payload, second.token, "w2")
    assert current is not None and q.counts()["org"].started == 1
    assert q.end(current, SUCCESS)
    assert q.jobs("org/ds")[0].attempts == 1


def test_2_a_start_redis_forgot_before_its_write_keeps_its_lease_once_written(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    q.journal.flush_all()
    real_record_start = q.ledger.record_start

    def restart_empty_first(*args: Any) -> bool:
        monkeypatch.setattr(q.ledger, "record_start", real_record_start)
        fast.redis().flushall()  # between confirm and the start's write, which lands before any repair
        return real_record_start(*args)

    monkeypatch.setattr(q.ledger, "record_start", restart_empty_first)
    attempt = q.start(first.payload, first.token, "w1")
    assert attempt is not None  # its lease asked again after the write: the repair gave it back
    q.reap()
    assert dispatcher.take() == [] and q.counts()["org"].started == 1  # nothing beside it
    assert q.end(attempt, SUCCESS)


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
    current: list[Attempt] = []

    def second_attempt_starts() -> None:
        lapse(q, stale)
        (second,) = dispatcher.take()
        attempt = q.start(second.payload, second.token, "w2")
        assert attempt is not None
        current.append(attempt)

    before_the_write(monkeypatch, second_attempt_starts)
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

    def deleted() -> None:
        q.cancel("org/ds", revoke_started=True)  # cancelled and removed, in either order
        cache.delete_dataset_responses("org/ds")

    before_the_write(monkeypatch, deleted)
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


# --- found in the adversarial review of this change (each reproduced first, then fixed) ------------------


def run_what_runs(q: Jobs, dispatcher: RecordingDispatcher, outcome: Outcome = SUCCESS) -> list[str]:
    """`run`, for the jobs that do start (a stale message does not)."""
    ran = []
    while dispatches := dispatcher.take():
        for dispatch in dispatches:
            attempt = q.start(dispatch.payload, dispatch.token, "w")
            if attempt is not None:
                q.end(attempt, outcome)
                ran.append(dispatch.payload.job_id)
    return ran


def child_jobs(q: Jobs, dataset: str, config: str) -> list[Any]:
    return [job for job in q.jobs(dataset) if job.step == CHILD and job.config == config]


# --- (b) a job the ledger says ended runs again after a rollback ----------------------------------


def test_b_a_message_of_an_ended_job_redelivered_from_the_snapshot_does_not_run_again(
    snapshot_redis: SnapshotRedis,
) -> None:
    """Redis (also Celery's broker) comes back from a snapshot in which the job was queued: its message
    comes back with it. The ledger says the job succeeded: it must never run again."""
    q, dispatcher = make_queue(limit=1)
    assert not q.redis_kept_its_data()
    q.enqueue(ROOT, "done/ds")
    (done,) = dispatcher.take()
    snapshot_redis.save()  # the snapshot: `done` queued under its token
    attempt = q.start(done.payload, done.token, "w0")
    assert attempt is not None
    assert q.end(attempt, Outcome.success(content("done/ds", "a")))
    dispatcher.take()
    q.journal.flush_all()
    assert q.job(done.payload.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    snapshot_redis.kill_and_restart()

    again = q.start(done.payload, done.token, "redelivered")  # the first thing that happens after the restart
    ran_again = again is not None and q.renew(again) == LeaseState.RUNNING
    if again is not None:
        q.end(again, Outcome.success(content("done/ds", "a")))
    children = child_jobs(q, "done/ds", "a")
    assert not ran_again, "a job the ledger says ended was started again (and kept its lease through the repair)"
    assert len(children) == 1, f"its child was enqueued {len(children)} times for one ending"


# --- (a) two attempts at once after a rollback -----------------------------------------------------


def test_a_a_durable_start_is_not_started_again_from_a_snapshot_taken_before_it(
    snapshot_redis: SnapshotRedis,
) -> None:
    """The start is durable (in the ledger) before the step runs; Redis comes back from a snapshot taken
    while the job was queued, with its message. The redelivered message must not start a second attempt
    beside the first (limit 1: two attempts would compute at once until the first one's next heartbeat)."""
    q, dispatcher = make_queue(limit=1)
    assert not q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    snapshot_redis.save()
    first = q.start(dispatch.payload, dispatch.token, "w1")
    assert first is not None
    q.journal.flush_all()
    snapshot_redis.kill_and_restart()
    second = q.start(dispatch.payload, dispatch.token, "w2")
    assert second is None, (
        f"second attempt started (attempt number {second.number}) while the first (number {first.number}, "
        f"durable in the ledger) still runs; the first learns it only at its next renew: "
        f"{q.renew(first)}"
    )


# --- (b) a repair ends a running attempt with an older attempt's fence: the job is never terminal ----


def test_b_an_older_attempts_entry_does_not_end_the_running_attempt_in_a_repair(fast: Stores) -> None:
    """Attempt 1 writes its entry and its worker dies before end.lua; the reaper requeues the job and
    attempt 2 starts (durable). Redis then restarts empty. The repair must give attempt 2 its lease back
    (or end the job in the ledger): not record an end under attempt 1's fence, which the ledger refuses,
    leaving a job the ledger says is started that Redis does not know, forever."""
    q, dispatcher = make_queue(limit=1, max_attempts=3)
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    a1 = q.start(first.payload, first.token, "w1")
    assert a1 is not None
    renewal = q.limiter.renew("org", a1.payload.job_id, a1.token, fence=True, start=a1.fence)
    q._write_cache(a1, Outcome.success(content("org/ds", "one")), renewal.fence)  # then SIGKILL
    q.limiter.started_ttl_ms = 0
    q.renew(a1)
    q.reap()  # requeued: attempts left
    q.limiter.started_ttl_ms = 60_000
    (second,) = dispatcher.take()
    a2 = q.start(second.payload, second.token, "w2")
    assert a2 is not None and a2.number == 2
    q.journal.flush_all()
    fast.redis().flushall()
    q.reap()  # the repair
    past_grace()
    q.reap()
    q.reap()
    job = q.job(a2.payload.job_id)
    assert job is not None
    client = fast.redis()
    known = client.hexists(namespace_key("org", "jobs"), job.job_id)
    assert job.status.is_terminal or known, (
        f"the ledger says {job.status} (fence {job.fence}) and Redis does not know the job; "
        f"attempt 2 renews: {q.renew(a2)}"
    )


# --- (d) a stale attempt's write lands --------------------------------------------------------------


def test_d_a_stale_attempts_write_after_the_reaper_crashed_its_job_is_refused(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt gets its end fence, pauses past its lease; the reaper ends the job as crashed (no
    attempts left) and caches the crash. The attempt resumes and writes: its claim is still its own."""
    q, dispatcher = make_queue(limit=1, max_attempts=1)
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    before_the_write(monkeypatch, lambda: lapse(q, attempt))  # crashed: the crash error is cached
    assert not q.end(attempt, Outcome.success(content("org/ds", "stale")))
    job = q.jobs("org/ds")[0]
    entry = cache.get_response(ROOT, "org/ds")
    assert job.error_code == "JobManagerCrashedError"
    assert entry.error_code == "JobManagerCrashedError", (
        f"the ledger says crashed, the cache holds the stale attempt's {entry.http_status} {entry.content}"
    )


def test_d_a_stale_attempts_write_after_its_requeued_job_was_cancelled_is_refused(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21 case 4, with the cancel before attempt 2 starts: the attempt gets its end fence, pauses
    past its lease, the reaper requeues the job (dispatched again), the job is cancelled while queued,
    then the attempt resumes and writes."""
    q, dispatcher = make_queue(limit=1, max_attempts=3)
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None

    def requeued_then_cancelled() -> None:
        lapse(q, attempt)  # requeued and dispatched again
        q.cancel("org/ds", revoke_started=True)  # before attempt 2 starts

    before_the_write(monkeypatch, requeued_then_cancelled)
    assert not q.end(attempt, Outcome.success(content("org/ds", "stale")))
    assert q.jobs("org/ds")[0].status == JobStatus.CANCELLED
    with pytest.raises(CachedResponseNotFoundError):
        entry = cache.get_response(ROOT, "org/ds")
        pytest.fail(f"a cancelled job's stale attempt wrote {entry.content}")


def test_d_the_webhooks_delete_then_cancel_leaves_the_dataset_deleted(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tasks/api/webhook.py `delete` removes the entries first, then cancels. A job ending between the two:
    its write finds no entry, renews (still running), claims the entry again (an upsert: a placeholder)
    and writes: the deleted dataset has its entry back."""
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    before_the_write(monkeypatch, lambda: cache.delete_dataset_responses("org/ds"))  # webhook.delete, first line
    q.end(attempt, Outcome.success(content("org/ds", "a")))
    q.cancel("org/ds", revoke_started=True)  # webhook.delete, second line
    past_grace()
    q.reap()
    left = list(cache.cache_collection().find({"dataset": "org/ds"}, projection={"_id": False, "content": False}))
    assert left == [], f"the deleted dataset has entries again: {left}"


# --- (c) children enqueued twice for one ending -----------------------------------------------------


def test_c_a_reapplied_end_whose_child_went_to_a_pending_twin_does_not_enqueue_it_again(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ending's child key had a pending twin (a backfill's): admit gave the twin's id, not the derived
    one. The ending process dies before dropping the END record; the twin runs; the reaper applies the
    record again: the derived id is in neither Redis nor the ledger, so the child is admitted again."""
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/ds")
    (root,) = dispatcher.take()
    attempt = q.start(root.payload, root.token, "w1")
    assert attempt is not None
    twin = q.enqueue(CHILD, "org/ds", "a")  # waiting (the slot is taken): pending
    limiter = type(q.limiter)
    monkeypatch.setattr(limiter, "add_applied", lambda *args: None)
    monkeypatch.setattr(limiter, "applied", lambda *args: False)
    assert q.end(attempt, Outcome.success(content("org/ds", "a")))
    monkeypatch.undo()
    use_settings(monkeypatch, {**fast.env(), "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})
    run_what_runs(q, dispatcher, Outcome.success({"splits": []}))  # the twin runs
    assert [job.job_id for job in child_jobs(q, "org/ds", "a")] == [twin.job_id]
    past_grace()
    q.reap()  # the END record applied again
    q.reap()
    run_what_runs(q, dispatcher, Outcome.success({"splits": []}))
    children = child_jobs(q, "org/ds", "a")
    assert len(children) == 1, f"one ending, {len(children)} jobs of its child key: {children}"


# --- (e) the journal's flush lock and the repair lock, taken in opposite orders ----------------------


def test_e_a_repair_and_a_flush_that_finds_redis_emptied_do_not_wait_on_each_other(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread J (the journal's writer) flushes, holding the journal's flush lock; Redis is emptied during
    its ledger write. Meanwhile thread H (a heartbeat that found its lease gone) starts the repair: it takes
    the Redis repair lock, then waits for the flush lock. J then finds the markers changed and repairs
    too (on_repair -> check_epoch -> repair): it waits for the repair lock. Each waits on the other until
    the repair lock's blocking timeout (REPAIR_LOCK_SECONDS, 60 s; 4 s here)."""
    monkeypatch.setattr(queue_module, "REPAIR_LOCK_SECONDS", 4)
    q, _dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    q.limiter.on_journal = lambda namespaces: None  # no background writer: this test's flush only
    q.enqueue(ROOT, "org/ds")
    ledger = q.queue.ledger
    real_write = ledger.write
    client = fast.redis()
    repairer: list[threading.Thread] = []

    def write_then_lose_redis(entries: Any) -> None:
        ledger.write = real_write  # type: ignore[method-assign]
        real_write(entries)
        client.flushall()
        thread = threading.Thread(target=q.queue.repair, daemon=True)
        thread.start()
        repairer.append(thread)
        deadline = time.monotonic() + 5
        while not client.exists(queue_module.REPAIR_LOCK_KEY) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # H is in flush_for_repair, waiting for the flush lock

    ledger.write = write_then_lose_redis  # type: ignore[method-assign]
    began = time.monotonic()
    q.journal.flush_all()
    repairer[0].join(30)
    elapsed = time.monotonic() - began
    assert elapsed < 2, f"the flush and the repair waited on each other for {elapsed:.1f} s"


# --- (f) a generation race between processes -------------------------------------------------------


def test_f_concurrent_journal_writers_never_find_a_rollback(fast: Stores) -> None:
    """Several processes (queues of their own) write their journals at once, many times: a Redis that
    did not roll back is never taken for one (a repair would run)."""
    queues = [make_queue(limit=50)[0] for _ in range(4)]
    queues[0].redis_kept_its_data()
    repairs: list[int] = []
    for q in queues:
        real = q.queue.repair

        def counted(real: Any = real) -> None:
            repairs.append(1)
            real()

        q.queue.repair = counted  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def work(q: Jobs, index: int) -> None:
        try:
            for round_ in range(15):
                q.enqueue(ROOT, f"ns{index}/ds{round_}")
                q.journal.flush_all()
                q.queue.check_epoch(deep=True)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(q, i)) for i, q in enumerate(queues)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert repairs == [], f"{len(repairs)} needless repairs"


# --- (g) readers and bare claims ----------------------------------------------------------------------


def test_g_readers_never_see_a_bare_claim(fast: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    assert cache.cache_collection().count_documents({"dataset": "org/ds"}) == 1  # the placeholder
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response(ROOT, "org/ds")
    assert cache.get_dataset_responses("org/ds") == []
    assert cache.count_by_status() == []
    assert cache.move_dataset_responses("org/ds", "org/other", lambda c: c) == 0
    assert q.end(attempt, Outcome.success(content("org/ds", "a")))
    assert cache.get_response(ROOT, "org/ds").content == content("org/ds", "a")


def test_g_a_cancelled_attempt_leaves_no_placeholder(fast: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job cancelled between its confirm and its claim: the caller ends it as cancelled itself (with an
    outcome), so `_apply_end`'s release of the placeholder (only when outcome is None) never runs."""
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    real_claim = cache.claim_entry

    def cancelled_first(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(cache, "claim_entry", real_claim)
        q.cancel("org/ds", revoke_started=True)
        cache.delete_dataset_responses("org/ds")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(cache, "claim_entry", cancelled_first)
    assert q.start(dispatch.payload, dispatch.token, "w1") is None
    assert q.jobs("org/ds")[0].status == JobStatus.CANCELLED
    left = list(cache.cache_collection().find({"dataset": "org/ds"}, projection={"_id": False}))
    assert left == [], f"a cancelled job's placeholder stays: {left}"


def test_b_a_job_that_ended_after_the_snapshot_is_not_promoted_again_by_an_end_on_the_rolled_back_redis(
    snapshot_redis: SnapshotRedis,
) -> None:
    """No message redelivery needed: limit 2, `long` and `busy` run, `later` waits. Snapshot. busy ends,
    later runs and ends (ledger: success). Redis comes back from the snapshot; the first thing that happens
    is long's end (its lease is in the snapshot): end.lua promotes `later` again, its worker starts it."""
    q, dispatcher = make_queue(limit=2)
    assert not q.redis_kept_its_data()
    q.enqueue(ROOT, "org/long")
    q.enqueue(ROOT, "org/busy")
    q.enqueue(ROOT, "org/later")
    long_, busy = dispatcher.take()
    long_attempt = q.start(long_.payload, long_.token, "w0")
    busy_attempt = q.start(busy.payload, busy.token, "w1")
    assert long_attempt is not None and busy_attempt is not None
    q.journal.flush_all()
    snapshot_redis.save()
    assert q.end(busy_attempt, Outcome.success(content("org/busy")))
    run_what_runs(q, dispatcher, Outcome.success(content("org/later")))
    q.journal.flush_all()
    later = q.jobs("org/later")[0]
    assert later.status == JobStatus.SUCCESS
    snapshot_redis.kill_and_restart()
    assert q.end(long_attempt, Outcome.success(content("org/long")))
    ran = []
    for dispatch in dispatcher.take():
        attempt = q.start(dispatch.payload, dispatch.token, "w9")
        if attempt is not None:
            ran.append((dispatch.payload.dataset, q.renew(attempt)))
    assert ran == [], f"jobs the ledger says ended ran again: {ran}"


# --- found in the second adversarial review ----------------------------------------------------------


def expire(stores: Stores, namespace: str, job_id: str) -> None:
    """The job's lease lapses now (its worker stopped heartbeating)."""
    stores.redis().zadd(namespace_key(namespace, "expiry"), {job_id: 0})


# --- 1. a resync racing a live end brings an ended job back ------------------------------------------


def resync_while_j_runs_and_ends(q: Any, dispatcher: Any) -> str:
    """limit 1: B runs, J waits (the ledger says so). `_resync_all` reads the ledger's unfinished jobs,
    then resyncs them batch by batch; in between (a big repair's seconds, or an operator's `reconcile`
    under live traffic) B ends, J is promoted, starts, succeeds, its END is applied and dropped and the
    writer thread writes its journal. J is unknown to Redis and no longer in its journal: resync.lua
    restores it from the stale read, as waiting. Returns J's id."""
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/b")
    (b,) = dispatcher.take()
    b1 = q.start(b.payload, b.token, "w1")
    assert b1 is not None
    j = q.enqueue(ROOT, "org/j")
    q.journal.flush_all()
    real_unfinished = q.ledger.unfinished

    def j_runs_and_ends_meanwhile() -> list[Any]:
        jobs = real_unfinished()  # B started, J waiting
        assert q.end(b1, Outcome.success(content("org/b")))
        (j_dispatch,) = dispatcher.take()
        j1 = q.start(j_dispatch.payload, j_dispatch.token, "w2")
        assert j1 is not None and q.end(j1, Outcome.success(content("org/j")))
        q.journal.flush_all()  # the writer thread, within QUEUE_LEDGER_LAG_SECONDS
        return jobs

    q.ledger.unfinished = j_runs_and_ends_meanwhile
    q.reconcile()  # the same resync a repair runs
    q.ledger.unfinished = real_unfinished
    assert q.job(j.job_id).status == JobStatus.SUCCESS
    return j.job_id


def test_1_a_job_that_ends_while_a_resync_runs_is_not_brought_back(fast: Stores) -> None:
    """The ghost holds a slot and is dispatched again (its start is refused: the ledger says success), its
    lease lapses, it is requeued, dispatched... until WORKER_MAX_ATTEMPTS; meanwhile an enqueue of its key
    (a webhook's new revision) is deduped to the ghost's id and never runs."""
    q, dispatcher = make_queue(limit=1, max_attempts=3)
    j = resync_while_j_runs_and_ends(q, dispatcher)
    ghost = fast.redis().hexists(namespace_key("org", "jobs"), j)
    again = q.enqueue(ROOT, "org/j")  # a new revision of org/j
    assert not ghost and again.job_id != j, (
        f"the ended job {j} is back in Redis (dispatched again: {[d.payload.job_id for d in dispatcher.take()]}); "
        f"a new enqueue of its key got the ghost's id: {again.job_id == j}"
    )


def test_1_its_crash_overwrites_its_own_success(fast: Stores) -> None:
    """The same ghost with WORKER_MAX_ATTEMPTS=1: its lapsed lease is crashed at once, and the crash write
    takes the job's claim over (its success never released it): the job's successful entry becomes a
    JobManagerCrashedError while the ledger says success."""
    q, dispatcher = make_queue(limit=1, max_attempts=1)
    j = resync_while_j_runs_and_ends(q, dispatcher)
    for dispatch in dispatcher.take():
        assert q.start(dispatch.payload, dispatch.token, "w3") is None  # refused: the ledger says success
    expire(fast, "org", j)
    q.reap()
    entry = cache.get_response(ROOT, "org/j")
    assert entry.is_success, f"J's entry is now {entry.http_status} {entry.error_code}; the ledger says success"


# --- 2. the reaper's release of a requeued job's claims lands after its next attempt claimed -----------


def test_2_the_reapers_late_release_does_not_cancel_the_requeued_jobs_next_attempt(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """limit 2: X and Z run, W (high) waits. X's lease lapses: the reaper requeues X (W gets the slot)
    and then, one MongoDB round trip later, releases X's claims. In between, Z ends in another process:
    end.lua gives X the freed slot, X's attempt 2 starts and claims the (new) entry. The release then
    removes attempt 2's placeholder (`claim.job` is X): attempt 2 finishes, finds no entry, and a healthy
    job ends as cancelled: its result dropped, its children never enqueued."""
    q, dispatcher = make_queue(limit=2, max_attempts=3)
    q.enqueue(ROOT, "org/x")
    q.enqueue(ROOT, "org/z")
    x, z = dispatcher.take()
    x1 = q.start(x.payload, x.token, "w1")
    z1 = q.start(z.payload, z.token, "w2")
    assert x1 is not None and z1 is not None
    q.enqueue(ROOT, "org/w", priority=Priority.HIGH)  # waits
    expire(fast, "org", x.payload.job_id)
    real_release = cache.release_claims
    second: list[Any] = []

    def z_ends_first(job_ids: Any, before: int | None = None) -> None:
        monkeypatch.setattr(cache, "release_claims", real_release)
        if x.payload.job_id in list(job_ids):
            assert q.end(z1, Outcome.success(content("org/z")))  # another worker: X gets Z's slot
            (x2,) = [d for d in dispatcher.take() if d.payload.job_id == x.payload.job_id]
            attempt = q.start(x2.payload, x2.token, "w3")
            assert attempt is not None
            second.append(attempt)
        real_release(job_ids, before)

    monkeypatch.setattr(cache, "release_claims", z_ends_first)
    q.reap()
    assert second, "X was not requeued"
    ended = q.end(second[0], Outcome.success(content("org/x", "a")))
    job = q.job(x.payload.job_id)
    assert job is not None
    assert ended and job.status == JobStatus.SUCCESS, f"X's healthy attempt 2 ended {job.status}"
    assert cache.get_response(ROOT, "org/x").content == content("org/x", "a")


# --- 3. an ending whose dataset was deleted and re-created cancels the re-created dataset's jobs -------


def test_3_an_ending_of_a_deleted_dataset_does_not_cancel_the_jobs_of_its_re_creation(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orchestrator.after_job: when the ending's entry is gone after its plan ran, it cancels *every*
    pending job of the dataset. The dataset was deleted (webhook: entries, then cancel) and created again
    (webhook update: its root job enqueued) while the ending's plan ran: the re-created dataset's job is
    cancelled, and nothing computes the new dataset until someone backfills it."""
    q, dispatcher = make_queue(limit=4)
    q.enqueue(ROOT, "org/ds")
    (root,) = dispatcher.take()
    attempt = q.start(root.payload, root.token, "w1")
    assert attempt is not None
    real_run_plan = orchestrator.run_plan
    recreated: list[Any] = []

    def deleted_and_recreated_meanwhile(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(orchestrator, "run_plan", real_run_plan)
        jobs = real_run_plan(*args, **kwargs)
        cache.delete_dataset_responses("org/ds")  # webhook delete
        q.cancel("org/ds", revoke_started=True)
        recreated.append(q.enqueue(ROOT, "org/ds"))  # webhook update: the dataset exists again
        return jobs

    monkeypatch.setattr(orchestrator, "run_plan", deleted_and_recreated_meanwhile)
    assert q.end(attempt, Outcome.success(content("org/ds", "a")))
    job = q.job(recreated[0].job_id)
    assert job is not None
    assert job.status in (JobStatus.WAITING, JobStatus.QUEUED), (
        f"the re-created dataset's root job is {job.status}: cancelled by the old ending"
    )


# --- 4. a MongoDB outage burns every attempt of jobs that never ran ---------------------------------


def test_4_a_start_that_cannot_be_made_durable_does_not_count_as_an_attempt(
    fast: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start is durable before its step runs; while MongoDB is unreachable it is not, and the message is
    dropped, but confirm.lua counted the attempt. The reaper requeues the lapsed lease, the next start
    fails the same way, and at WORKER_MAX_ATTEMPTS the job ends as crashed (JobManagerCrashedError)
    though no worker crashed and its step never ran: a MongoDB outage of a few lease TTLs (40 s each by
    default) fails every job dispatched during it."""
    q, dispatcher = make_queue(limit=1, max_attempts=3)
    q.enqueue(ROOT, "org/ds")

    def unreachable(*args: Any) -> Any:
        raise AutoReconnect("MongoDB is unreachable")

    monkeypatch.setattr(q.ledger, "get", unreachable)
    monkeypatch.setattr(q.ledger, "record_start", unreachable)
    for _ in range(3):
        dispatches = dispatcher.take()
        if not dispatches:
            break
        (dispatch,) = dispatches
        assert q.start(dispatch.payload, dispatch.token, "w") is None  # not durable: it does not run
        expire(fast, "org", dispatch.payload.job_id)
        q.reap()
    monkeypatch.undo()
    use_settings(monkeypatch, fast.env() | {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})
    run_what_runs(q, dispatcher)
    (job,) = q.jobs("org/ds")
    assert job.status == JobStatus.SUCCESS, f"a job that never ran ended {job.status} {job.error_code}"


def test_an_end_and_its_applied_read_by_a_second_writer_after_the_first_wrote_the_end_leave_nothing_pending(
    stores: Stores,
) -> None:
    """Two processes flush one namespace's journal at once: one read [.., end], the other [.., end, applied].
    The first writes the end; the second's fold of the end and "applied" is refused (the job ended), and
    "applied" must still land, or the ledger calls the end's effects pending for ever (a backfill then
    skips the step, a repair applies them again)."""
    payload = '["s","o/d",null,null,1]'

    def entry(status: str, fence: int) -> JournalEntry:
        return JournalEntry.parse(json.dumps([status, str(fence), "1000", "job", "1", "t", "w", "", "", payload]))

    ledger = Ledger()
    created, end, applied = entry("created", 1), entry("success", 3), entry("applied", 3)
    ledger.write([created, end])
    ledger.write([end, applied])
    job = ledger.get("job")
    assert job is not None and job.status == JobStatus.SUCCESS and job.effects_pending is False
    # The same, when the second writer also read the creation (its insert refused: the first created it).
    ledger.collection.delete_many({})
    ledger.write([created, end])
    ledger.write([created, end, applied])
    job = ledger.get("job")
    assert job is not None and job.effects_pending is False
    # And with a start among them (the update is a pipeline, which reports no refusal).
    ledger.collection.delete_many({})
    started = entry("started", 2)
    ledger.write([created])
    ledger.write([started, end])
    ledger.write([started, end, applied])
    job = ledger.get("job")
    assert job is not None and job.status == JobStatus.SUCCESS and job.effects_pending is False


def test_a_start_is_taken_when_its_write_changes_the_ledger_and_refused_when_it_changes_nothing(stores: Stores) -> None:
    """`record_start` answers from its write, without reading back, when the write created or changed the job
    (taken); a refused write must then change nothing, even on a document that lacks some of the creation's
    facts (one written before a field was added to them)."""
    payload = '["s","o/d",null,null,1]'

    def entry(status: str, fence: int) -> JournalEntry:
        return JournalEntry.parse(json.dumps([status, str(fence), "1000", "job", "1", "t", "w", "", "", payload]))

    ledger = Ledger()
    assert ledger.record_start(entry("started", 2))  # no document yet: created by the start
    assert ledger.record_start(entry("started", 2))  # the same start again: read back, still this one
    assert not ledger.record_start(entry("started", 1))  # an older decision
    assert not ledger.record_start(entry("started", 3))  # over another start, no requeue between them
    ledger.write([entry("success", 4)])
    ledger.collection.update_one({"_id": "job"}, {"$unset": {"revision": "", "age": ""}})
    before = ledger.collection.find_one({"_id": "job"})
    assert not ledger.record_start(entry("started", 5))  # the job ended
    assert ledger.collection.find_one({"_id": "job"}) == before

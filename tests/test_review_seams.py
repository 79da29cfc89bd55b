"""Adversarial review of the issue-21 change (crash-proof at the seams): reproductions against a real
redis-server (restarted from its own RDB snapshot where it matters) and SecantusDB. Each test states the
promise it checks; a failure is a finding."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common import cache
from common.exceptions import CachedResponseNotFoundError
from common.lifecycle import Outcome
from common.queue import JobStatus
from common.queue import queue as queue_module
from common.queue.limiter import LeaseState, namespace_key
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


@pytest.fixture
def snapshot_redis(fast: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SnapshotRedis]:
    server = SnapshotRedis(tmp_path / "redis")
    use_settings(monkeypatch, {"QUEUE_REDIS_URL": server.url})
    try:
        yield server
    finally:
        server.stop()


def run(q: Jobs, dispatcher: RecordingDispatcher, outcome: Outcome = SUCCESS) -> list[str]:
    ran = []
    while dispatches := dispatcher.take():
        for dispatch in dispatches:
            attempt = q.start(dispatch.payload, dispatch.token, "w")
            if attempt is None:
                continue
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
    real_upsert = cache.upsert_response

    def paused(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        q.limiter.started_ttl_ms = 0
        q.renew(attempt)
        q.reap()  # crashed: the crash error is cached
        q.limiter.started_ttl_ms = 60_000
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", paused)
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
    real_upsert = cache.upsert_response

    def paused(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        q.limiter.started_ttl_ms = 0
        q.renew(attempt)
        q.reap()  # requeued and dispatched again
        q.limiter.started_ttl_ms = 60_000
        q.cancel("org/ds", revoke_started=True)  # before attempt 2 starts
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", paused)
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
    real_upsert = cache.upsert_response

    def webhook_deletes_entries_first(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        cache.delete_dataset_responses("org/ds")  # webhook.delete, first line
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", webhook_deletes_entries_first)
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
    run(q, dispatcher, Outcome.success({"splits": []}))  # the twin runs
    assert [job.job_id for job in child_jobs(q, "org/ds", "a")] == [twin.job_id]
    past_grace()
    q.reap()  # the END record applied again
    q.reap()
    run(q, dispatcher, Outcome.success({"splits": []}))
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
    q, dispatcher = make_queue(limit=1)
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
        except BaseException as error:  # noqa: BLE001
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


def test_b_every_unfinished_job_is_known_after_a_rollback_with_activity_before_detection(
    snapshot_redis: SnapshotRedis,
) -> None:
    """A snapshot with a waiting job; after it, that job ran and ended (ledger: success). Redis comes back
    and another job's end (before any detection) promotes the waiting job again: the ledger says ended."""
    q, dispatcher = make_queue(limit=1)
    assert not q.redis_kept_its_data()
    q.enqueue(ROOT, "org/busy")
    q.enqueue(ROOT, "org/later")
    (busy,) = dispatcher.take()
    busy_attempt = q.start(busy.payload, busy.token, "w0")
    assert busy_attempt is not None
    snapshot_redis.save()  # busy started, later waiting
    assert q.end(busy_attempt, Outcome.success(content("org/busy")))
    run(q, dispatcher, Outcome.success(content("org/later")))
    q.journal.flush_all()
    later = q.jobs("org/later")[0]
    assert later.status == JobStatus.SUCCESS
    snapshot_redis.kill_and_restart()
    # busy's worker ended long ago; its snapshot lease expires and the reaper requeues or ends it. Here,
    # a second dispatch of `later` happens as soon as busy's slot frees on the rolled-back Redis.
    ran = []
    q.limiter.started_ttl_ms = 0
    client = redis.Redis.from_url(snapshot_redis.url)
    client.zadd(namespace_key("org", "expiry"), {busy.payload.job_id: 0})
    q.reap()
    q.limiter.started_ttl_ms = 60_000
    for dispatch in dispatcher.take():
        attempt = q.start(dispatch.payload, dispatch.token, "w9")
        if attempt is not None:
            ran.append((dispatch.payload.dataset, q.renew(attempt)))
    assert ran == [], f"jobs the ledger says ended ran again: {ran}"

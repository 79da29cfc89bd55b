"""A stale attempt stopped in its step, and Redis repaired after it lost its data (found by the second
adversarial review of the crash-proof lifecycle; each finding is fixed and its test passes).

Real Redis and MongoDB-protocol server; real Celery workers (in-process threads pool, and a real
`celery -A tasks worker` prefork subprocess that imports this module for its steps). Only our own code is
monkeypatched, to inject a Redis loss or a slow repair at one point. Each test asserts what the promises
say should happen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from common import cache
from common.config import get_config
from common.lifecycle import Outcome
from common.queue import JobStatus
from common.queue.ledger import JournalEntry, Ledger
from common.queue.limiter import LeaseState, namespace_key
from tasks.steps import StepJob, step
from tests import sample_steps
from tests.conftest import Stores, use_settings
from tests.test_queue import Jobs, make_queue
from tests.waiting import past_grace

ROOT = "dataset-config-names"
CONTENT = {"config_names": [{"dataset": "org/ds", "config": "default"}]}


# --- a step of the kind users write: it logs a failure of one item and goes on with the next ---------


STOLEN_KEY = "test:review:stolen"


def _steal_once_then_tick(job: StepJob, swallow: bool) -> dict[str, Any]:
    """The first run takes its own lease away (as a reaper would after missed heartbeats), then processes
    30 items; the reaper requeues the job and the next run (the replacement) just records itself."""
    client = redis.Redis.from_url(_redis_url())
    if not client.sadd(STOLEN_KEY, job.job_id or ""):
        client.close()
        sample_steps._record(job, "replacement")
        return {}
    sample_steps._record(job, "start")
    client.hdel(namespace_key(job.dataset.split("/")[0], "leases"), job.job_id or "")
    client.close()
    for _ in range(30):
        if not swallow:
            time.sleep(0.1)
            sample_steps._record(job, "tick")
            continue
        try:
            time.sleep(0.1)
            sample_steps._record(job, "tick")
        except Exception as error:
            sample_steps._record(job, f"swallowed-{type(error).__name__}")
    sample_steps._record(job, "end")
    return {}


@step("test-swallowing-thief", input_type="dataset")
def review_swallowing_thief(job: StepJob) -> dict[str, Any]:
    return _steal_once_then_tick(job, swallow=True)


@step("test-stopped-silent-thief", input_type="dataset")
def review_silent_thief(job: StepJob) -> dict[str, Any]:
    return _steal_once_then_tick(job, swallow=False)


def _redis_url() -> str:

    return get_config().queue.redis_url.get_secret_value()


def _executions(client: redis.Redis) -> list[str]:
    return [e.decode().split()[0] for e in client.lrange(sample_steps.EXECUTIONS_KEY, 0, -1)]


def _wait_until_quiet(client: redis.Redis, quiet: float = 1.5, timeout: float = 30) -> list[str]:
    """The executions once the step recorded nothing for `quiet` seconds."""
    deadline, seen, still_since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() - still_since < quiet:
        assert time.monotonic() < deadline, _executions(client)
        n = client.llen(sample_steps.EXECUTIONS_KEY)
        if n != seen:
            seen, still_since = n, time.monotonic()
        time.sleep(0.05)
    return _executions(client)


# --- found (fixed): the interrupt: a step with a broad `except Exception` swallows JobLeaseLostError


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_stale_attempt_that_catches_exception_broadly_still_stops(
    pool: str, stores: Stores, celery_app: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from celery.contrib.testing.worker import start_worker

    from tasks.embedded import WorkerProcess

    env = use_settings(
        monkeypatch, {**stores.env(), "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1", "WORKER_METRICS_PORT": "0"}
    )
    client = redis.Redis.from_url(stores.redis_url)
    if pool == "threads":
        running: Any = start_worker(
            celery_app, pool="threads", concurrency=2, perform_ping_check=False, queues=["light"]
        )
    else:
        running = WorkerProcess(
            "r2", env, tmp_path / "worker.log", 2, include=["tests.sample_steps", "tests.test_interrupt_and_repair"]
        )
    with running:
        review_swallowing_thief.delay("org/ds")
        executions = _wait_until_quiet(client)
    ticks = executions.count("tick")
    beside = "replacement" in executions and "tick" in executions[executions.index("replacement") :]
    # Promise 7 / commit 24e8a48: "a stale attempt never computes beside its replacement".
    assert "end" not in executions and ticks < 10, (
        f"{pool}: the stale attempt swallowed its interrupt and computed on: {ticks} ticks after losing its "
        f"lease, {[e for e in executions if e.startswith('swallowed')]}, end={'end' in executions}, "
        f"ticked after its replacement ran: {beside}"
    )


@pytest.mark.slow
def test_the_interrupt_stops_a_silent_stale_attempt_in_a_prefork_worker(
    stores: Stores, celery_app: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tasks.embedded import WorkerProcess

    env = use_settings(
        monkeypatch, {**stores.env(), "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1", "WORKER_METRICS_PORT": "0"}
    )
    client = redis.Redis.from_url(stores.redis_url)
    with WorkerProcess(
        "r2p", env, tmp_path / "worker.log", 2, include=["tests.sample_steps", "tests.test_interrupt_and_repair"]
    ):
        review_silent_thief.delay("org/ds")
        executions = _wait_until_quiet(client)
        # the same pool process then runs the next job normally (no interrupt left pending in it)
        result = sample_steps.test_noop.delay("org/next")
        assert result.get(timeout=30)["http_status"] == 200
    assert "start" in executions and "end" not in executions and executions.count("tick") < 10, executions


# --- found (fixed): Redis restarts between a job's end.lua and its apply: the repair resurrects the ended job


def test_an_end_whose_record_redis_lost_before_its_apply_is_not_brought_back_by_the_repair(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1, max_attempts=1, started_ttl=0.3)
    q.redis_kept_its_data()
    job = q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    q.journal.flush_all()  # the ledger says started (it follows within QUEUE_LEDGER_LAG_SECONDS)
    other, _ = make_queue(limit=1, max_attempts=1, started_ttl=0.3)  # another worker's reaper
    client = redis.Redis.from_url(stores.redis_url)
    real_apply = Jobs.apply

    def redis_restarts_then_apply(records: Any, outcome: Any = None) -> None:
        # end.lua ran (cache written, END record in the outbox); Redis restarts empty before the apply,
        # and another worker's reaper repairs it from the ledger (still "started") meanwhile.
        client.flushall()
        other.reap()
        real_apply(q, records, outcome)

    monkeypatch.setattr(q, "apply", redis_restarts_then_apply)
    assert q.end(attempt, Outcome.success(CONTENT))
    assert q.job(job.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    time.sleep(0.4)  # the restored lease has no heartbeat: it expires
    other.reap()
    entry = cache.get_response(ROOT, "org/ds")
    lease = client.hget("stepcache:{org}:leases", job.job_id)
    problems = []
    if not entry.is_success:
        problems.append(f"the success in the cache was replaced by {entry.error_code} (ledger says success)")
    if lease is not None or client.hexists("stepcache:{org}:jobs", job.job_id):
        problems.append("the ended job is back in Redis")
    assert not problems, problems


# --- found (fixed): Redis loses its data again while the repair runs: the marker is set over a half-repaired Redis


def test_a_flush_during_the_repair_leaves_no_job_unknown_to_redis(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()
    q.enqueue(ROOT, "org/a")
    (a,) = dispatcher.take()
    running = q.start(a.payload, a.token, "w1")
    assert running is not None
    q.enqueue(ROOT, "org/b")  # waits behind a
    q.journal.flush_all()  # the ledger caught up (it follows within QUEUE_LEDGER_LAG_SECONDS)
    client = redis.Redis.from_url(stores.redis_url)
    client.flushall()  # Redis restarts empty
    real_resync = q.limiter.resync
    flushed: list[bool] = []

    def resync(*args: Any) -> int:
        resynced = real_resync(*args)
        if not flushed:  # ... and once more (a failover flapping) while the repair runs
            flushed.append(True)
            client.flushall()
        return resynced

    monkeypatch.setattr(q.limiter, "resync", resync)
    problems = []
    try:
        q.reap()  # the repair (the reaper thread logs what it raises, and goes on)
    except redis.exceptions.LockError as error:
        problems.append(f"the repair raised {type(error).__name__}: the flush took its lock too")
    q.reap()  # and a later pass
    state = q.renew(running)
    unknown = [j.job_id for j in q.ledger.unfinished() if not client.hexists("stepcache:{org}:jobs", j.job_id)]
    counts = q.counts().get("org")
    if state == LeaseState.LOST:
        problems.append("the running attempt a lost its lease for good (it stops; its ledger row stays 'started')")
    if unknown:
        problems.append(f"unfinished in the ledger, unknown to Redis forever (no marker missing): {unknown}")
    if counts is not None and counts.running + (1 if state == LeaseState.LOST else 0) > 1:
        problems.append(f"b was dispatched while a still runs: {counts}")
    assert not problems, problems


# --- found (fixed): a repair longer than its lock: two repairs at once, and the first one raises


def test_a_repair_longer_than_its_lock_is_still_one_at_a_time_and_does_not_fail(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.queue import queue as queue_module

    monkeypatch.setattr(queue_module, "REPAIR_LOCK_SECONDS", 1)  # 60 s in production; a 100k-job backlog
    monkeypatch.setattr(queue_module, "RESYNC_BATCH", 1)  # a round trip per job, each a slow one
    q1, _ = make_queue(limit=1)
    for i in range(6):
        q1.enqueue(ROOT, f"org/ds{i}")
    client = redis.Redis.from_url(stores.redis_url)
    client.flushall()
    active, most, errors = [0], [0], []
    guard = threading.Lock()

    def slow(queue: Jobs) -> None:
        real_resync = queue.limiter.resync
        real_reconcile = queue.queue._resync_all

        def resync(*args: Any) -> int:
            time.sleep(0.3)  # a round trip to a remote Redis, times many batches
            return real_resync(*args)

        def reconcile(keep_alive: Any = None) -> int:  # the repair's resyncs, as Queue._resync_all
            with guard:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                return real_reconcile(keep_alive)  # type: ignore[no-any-return]
            finally:
                with guard:
                    active[0] -= 1

        monkeypatch.setattr(queue.limiter, "resync", resync)
        monkeypatch.setattr(queue.queue, "_resync_all", reconcile)

    q2, _ = make_queue(limit=1)
    slow(q1)
    slow(q2)

    def check(queue: Jobs) -> None:
        try:
            queue.queue.check_epoch()
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")

    first = threading.Thread(target=check, args=(q1,))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=check, args=(q2,))  # an enqueue, a heartbeat or a reaper elsewhere
    second.start()
    first.join()
    second.join()
    assert most[0] == 1 and not errors, f"{most[0]} repairs at once; errors: {errors}"


# --- found (fixed) in the review of the write-behind ledger: a writer that read a journal before Redis lost
#     its data writes it after the repair: a waiting job only the ledger knows, never run nor ended


class HeldLedger(Ledger):
    """A bulk write that takes a while (as 5,000 entries do on SecantusDB): it goes once `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.read = threading.Event()
        self.go = threading.Event()

    def write(self, entries: Sequence[JournalEntry]) -> None:
        self.read.set()
        self.go.wait(10)
        super().write(entries)


def test_a_journal_written_across_a_repair_gives_its_jobs_back_to_redis(stores: Stores) -> None:
    q, _ = make_queue(limit=1)
    q.redis_kept_its_data()
    q.limiter.on_journal = lambda namespaces: None  # only the writer below
    q.enqueue(ROOT, "org/a")  # dispatched
    late = q.enqueue(ROOT, "org/b")  # waiting
    q.journal.ledger = held = HeldLedger()  # e.g. another process's writer thread, slow
    writer = threading.Thread(target=q.journal.flush, args=(["org"],))
    writer.start()
    assert held.read.wait(10)  # it read the journal; its bulk write is under way
    stores.redis().flushall()  # Redis loses its data
    other, _ = make_queue(limit=1)
    other.reap()  # the repair: the ledger has nothing yet
    held.go.set()
    writer.join()  # the late write lands, and sees the repair happened
    assert q.ledger.get(late.job_id) is not None
    assert stores.redis().hexists(namespace_key("org", "jobs"), late.job_id), "the ledger's waiting job is unknown"


# --- found (fixed): a repair that found a started job's end in its cache entry recorded it in the ledger only:
#     its next steps and events were lost


def test_a_repair_gives_back_the_end_a_cache_entry_shows_and_its_next_steps_run(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1, started_ttl=0.5)
    job = q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None  # the ledger says started at once
    # Lifecycle.end up to its cache write, then the worker is SIGKILLed (before the end script):
    renewal = q.limiter.renew(dispatch.payload.namespace, dispatch.payload.job_id, dispatch.token, fence=True)
    q._write_cache(attempt, Outcome.success(CONTENT), renewal.fence)
    stores.redis().flushall()  # then Redis restarts empty
    q.reap()  # the repair records its end again instead of its lease
    past_grace()
    q.reap()  # and applies it, as a record left behind
    assert q.job(job.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    assert "config-split-names" in {j.step for j in q.jobs("org/ds")}, "its next steps never came"
    assert cache.get_response(ROOT, "org/ds").content == CONTENT


# --- found (fixed): a revision (or a worker name) with a '|' made its journal entry unreadable, and blocked
#     the ledger of every namespace written with it


def test_any_revision_goes_through_the_journal(stores: Stores) -> None:
    q, _ = make_queue(limit=1)
    job = q.enqueue(ROOT, "org/ds", revision='main|v2 "quoted" ü')
    other = q.enqueue(ROOT, "other/ds")
    assert q.job(job.job_id).revision == 'main|v2 "quoted" ü'  # type: ignore[union-attr]
    assert q.job(other.job_id) is not None


# --- found (fixed): a job started within the lag lost its queued_at (its start was written first)


def test_a_job_started_within_the_lag_keeps_every_timestamp(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    job = q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    assert q.start(dispatch.payload, dispatch.token, "w1") is not None
    recorded = q.job(job.job_id)
    assert recorded is not None and recorded.status == JobStatus.STARTED and recorded.age is not None
    assert recorded.created_at <= recorded.queued_at <= recorded.started_at  # type: ignore[operator]


# --- found (fixed) in the second review: a write across a repair gave back to Redis a job that ran, ended
#     or was cancelled after the repair (the ledger did not say so yet): an end applied twice, a cancelled
#     job run


def _late_write_across_a_repair(stores: Stores) -> tuple[Jobs, Jobs, Any, HeldLedger, threading.Thread, str]:
    """A's admission is in the ledger; a slow writer has read A's next entry when Redis loses its data,
    and another process repairs Redis (A waits again, and is dispatched there)."""
    client = stores.redis()
    q, _ = make_queue(limit=1)
    q.redis_kept_its_data()
    q.limiter.on_journal = lambda namespaces: None  # only the writers below
    a = q.enqueue(ROOT, "org/a")
    journal = namespace_key("org", "journal")
    q.ledger.write([JournalEntry.parse(client.lindex(journal, 0))])
    client.ltrim(journal, 1, -1)
    q.journal.ledger = held = HeldLedger()
    writer = threading.Thread(target=q.journal.flush, args=(["org"],))
    writer.start()
    assert held.read.wait(10)
    client.flushall()
    other, dispatcher = make_queue(limit=1)
    other.limiter.on_journal = lambda namespaces: None  # its own writer has not written yet
    other.reap()  # the repair: A waits again, and is dispatched
    return q, other, dispatcher, held, writer, a.job_id


def test_a_write_across_a_repair_does_not_end_again_a_job_that_ended_after_it(stores: Stores) -> None:
    q, other, dispatcher, held, writer, job_id = _late_write_across_a_repair(stores)
    (dispatch,) = [d for d in dispatcher.take() if d.payload.job_id == job_id]
    assert other.start(dispatch.payload, dispatch.token, "w2") is not None
    assert other.finish(dispatch.payload, dispatch.token)  # A ended there, its record applied
    held.go.set()
    writer.join()  # the late write sees the repair
    client = stores.redis()
    assert not client.hexists(namespace_key("org", "outbox"), job_id), "A's end recorded a second time"
    assert not client.hexists(namespace_key("org", "jobs"), job_id), "A is back"
    assert q.job(job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]


def test_a_write_across_a_repair_does_not_bring_back_a_job_cancelled_after_it(stores: Stores) -> None:
    q, other, dispatcher, held, writer, job_id = _late_write_across_a_repair(stores)
    assert [d.payload.job_id for d in dispatcher.take()] == [job_id]
    assert [job.job_id for job in other.cancel("org/a")] == [job_id]
    held.go.set()
    writer.join()
    assert not stores.redis().hexists(namespace_key("org", "jobs"), job_id), "the cancelled job is back"
    assert q.job(job_id).status == JobStatus.CANCELLED  # type: ignore[union-attr]


# --- found (fixed): an unreadable journal head made the reaper's script fail, and with it every pass


def test_an_unreadable_journal_entry_is_dropped_and_the_reaper_goes_on(stores: Stores) -> None:
    client = stores.redis()
    q, _ = make_queue(limit=1)
    q.redis_kept_its_data()
    q.limiter.on_journal = lambda namespaces: None  # only the reaper writes
    q.enqueue(ROOT, "org/a")
    q.enqueue(ROOT, "other/b")
    client.lpush(namespace_key("org", "journal"), b"queued|1|1|job|0|||||{}")  # not an entry
    past_grace()
    assert q.reap() is not None
    assert client.llen(namespace_key("org", "journal")) == 0
    assert client.llen(namespace_key("other", "journal")) == 0
    assert len(q.ledger.jobs()) == 2

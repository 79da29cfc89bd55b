"""Races around the one way out, found by an adversarial review of the crash-proof lifecycle: each test
once reproduced a finding (now fixed) or checks an attack that held. Real Redis and MongoDB-protocol
server; only our own code is monkeypatched, to inject a failure or a pause at one point."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from common import cache
from common.cache import Writer
from common.events import EventType
from common.exceptions import CachedResponseNotFoundError
from common.lifecycle import Attempt, Lifecycle, Outcome
from common.queue import JobStatus
from common.queue.ledger import JournalEntry, Ledger
from common.queue.limiter import ACTIVE_KEY, NamespaceLimiter
from common.queue.queue import Queue
from tests.conftest import Stores, use_settings
from tests.test_queue import SUCCESS, Jobs, make_queue, stale_and_current
from tests.waiting import eventually, past_grace

pytestmark = pytest.mark.redis_topologies

ROOT = "dataset-config-names"
CONTENT = {"config_names": [{"dataset": "org/ds", "config": "default"}]}


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
    """The first call of owner.name raises (MongoDB or the process failing there); the next ones work."""
    real = getattr(owner, name)

    def once(self: Any, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(owner, name, real)
        raise ConnectionError(f"{name} failed")

    monkeypatch.setattr(owner, name, once)


def events_after(q: Jobs, position: str) -> list[Any]:
    return [event for _, event in q.events.read(position, count=1000)]


# --- found (fixed): Limit: after Redis lost its data, admissions before the reconcile ignore the started jobs


def test_after_redis_lost_its_data_a_new_job_waits_for_the_running_one_to_get_its_lease_back(
    stores: Stores,
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.redis_kept_its_data()  # the system ran a while: Redis has its epoch marker
    q.enqueue(ROOT, "org/a")
    (a,) = dispatcher.take()
    running = q.start(a.payload, a.token, "w1")
    assert running is not None
    stores.redis().flushall()  # a restart without persistence
    # Before any heartbeat or reaper pass noticed, a caller enqueues another job of the namespace.
    q.enqueue(ROOT, "org/b")
    dispatched = dispatcher.take()
    for dispatch in dispatched:
        q.start(dispatch.payload, dispatch.token, "w2")
    q.reap()  # the repair: the running job gets its lease back
    assert q.renew(running).value == "running"
    # Promise 1: no more than the limit (1) of the namespace execute at once.
    assert q.counts()["org"].started <= 1, f"{q.counts()['org']}: b was leased beside a, over the limit of 1"


# --- found (fixed): Fencing: a stale attempt's progress writes the cache and an event


def test_a_stale_attempts_progress_writes_neither_the_cache_nor_an_event(stores: Stores) -> None:
    q, dispatcher = make_queue(limit=1)
    cache.upsert_response(ROOT, "org/ds", CONTENT, fence=1)  # an earlier run's entry, progress 1.0
    stale, _current = stale_and_current(q, dispatcher)
    position = q.events.last_id()
    q.progress(stale, {"current": 1, "total": 10, "fraction": 0.1, "message": "stale"})
    stale_events = [e for e in events_after(q, position) if e.type == EventType.JOB_PROGRESS]
    entry = cache.get_response(ROOT, "org/ds")
    # Promise 7: an attempt that lost its lease writes nothing.
    assert entry.progress == 1.0, f"the stale attempt set the entry's progress to {entry.progress}"
    assert stale_events == [], "the stale attempt published job.progress"


# --- found (fixed): end.lua gives a stale attempt the reaper's end record as if it were its own


@pytest.mark.parametrize("cancelled", [False, True], ids=["crashed", "cancelled"])
def test_a_stale_attempt_is_not_told_it_ended_when_the_reaper_ended_its_job(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, cancelled: bool
) -> None:
    q, dispatcher = make_queue(limit=1, max_attempts=1)
    job = q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    attempt = q.start(first.payload, first.token, "w1")
    assert attempt is not None
    if cancelled:
        q.cancel("org/ds", revoke_started=True)
    real_upsert = cache.upsert_response

    def paused(*args: Any, **kwargs: Any) -> bool:
        # Stalled after its fence, longer than its lease: the reaper ends the job (crashed / cancelled).
        monkeypatch.setattr(cache, "upsert_response", real_upsert)
        q.limiter.started_ttl_ms = 0
        q.renew(attempt)
        q.limiter.reap(["org"], 0)  # the reaper's script ran; that reaper is still applying its records
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(cache, "upsert_response", paused)
    if cancelled:
        monkeypatch.setattr(q.limiter, "renew", _renew_then_pause(q, attempt, monkeypatch))
    ended = q.end(attempt, Outcome.success(CONTENT))
    status = q.job(job.job_id).status  # type: ignore[union-attr]
    # The attempt did not end the job: the reaper did. StepTask would now return the content and Celery
    # would store SUCCESS for a job the ledger says is error/cancelled.
    assert not ended, f"Lifecycle.end returned True for a stale attempt; the ledger says {status}"


def _renew_then_pause(q: Jobs, attempt: Attempt, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A cancelled attempt writes no cache entry: pause it right after its renew instead."""
    real_renew = NamespaceLimiter.renew.__get__(q.limiter)

    def renew(*args: Any, **kwargs: Any) -> Any:
        renewal = real_renew(*args, **kwargs)
        if kwargs.get("fence"):
            monkeypatch.setattr(q.limiter, "renew", real_renew)
            q.limiter.started_ttl_ms = 0
            real_renew(attempt.payload.namespace, attempt.payload.job_id, attempt.token)
            q.limiter.reap(["org"], 0)  # the reaper's script ran; that reaper is still applying its records
        return renewal

    return renew


# --- found (fixed): A late-applied end whose cache entry was replaced records and announces the wrong outcome


def test_an_error_end_applied_by_the_reaper_after_a_newer_entry_is_recorded_and_told_as_an_error(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1"})
    q, dispatcher = make_queue(limit=2)
    failed = q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    fail_once(monkeypatch, Lifecycle, "enqueue_next")
    from tests.sample_steps import SampleStepError

    assert q.end(attempt, Outcome.failure(SampleStepError("boom")))  # its apply failed: left to the reaper
    # A new job of the same key runs and succeeds meanwhile (a newer cache entry).
    newer = q.enqueue(ROOT, "org/ds")
    assert newer.job_id != failed.job_id
    (again,) = dispatcher.take()
    current = q.start(again.payload, again.token, "w2")
    assert current is not None and q.end(current, Outcome.success(CONTENT))
    position = q.events.last_id()
    past_grace()
    q.reap()
    ended = q.job(failed.job_id)
    assert ended is not None and ended.status == JobStatus.ERROR
    kinds = [(e.type, getattr(e, "error_code", None)) for e in events_after(q, position) if e.job_id == failed.job_id]
    problems = []
    if ended.error_code != "SampleStepError":
        problems.append(f"ledger error_code {ended.error_code!r} (the END record carries SampleStepError)")
    if (EventType.JOB_SUCCEEDED, None) in kinds:
        problems.append(f"the failed job was announced as {kinds}")
    assert not problems, problems


# --- an exception between limiter.end and apply is finished by one reaper pass ----------------------


def test_an_end_whose_apply_failed_is_finished_by_one_pass_after_the_grace(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})
    q, dispatcher = make_queue(limit=1)
    job = q.enqueue(ROOT, "org/ds")
    waiting = q.enqueue(ROOT, "org/other")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    fail_once(monkeypatch, Lifecycle, "enqueue_next")
    assert q.end(attempt, Outcome.success(CONTENT))
    assert [d.payload.job_id for d in dispatcher.take()] == [waiting.job_id]  # the freed slot went on
    assert q.job(job.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]  # the journal had it
    q.reap()  # younger than the grace: its caller might still be applying it
    assert "config-split-names" not in {j.step for j in q.jobs("org/ds")}
    past_grace()
    q.reap()
    assert "config-split-names" in {j.step for j in q.jobs("org/ds")}
    client = stores.redis()
    assert not client.hexists("stepcache:{org}:outbox", job.job_id)


# --- found (fixed): A heartbeat racing the end repairs Redis from the ledger before the end is applied: the ended job
#        is resurrected (its lease restored), then requeued or crashed over its own success ---------------


def test_a_heartbeat_racing_the_end_before_the_first_repair_does_not_bring_the_ended_job_back(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.queue.epoch import EPOCH_KEY

    q, dispatcher = make_queue(limit=1, max_attempts=1, started_ttl=0.2)
    client = stores.redis()
    assert not client.exists(EPOCH_KEY)  # a fresh Redis, before the first reaper pass (or right after a flush)
    job = q.enqueue(ROOT, "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    real_next = Lifecycle.enqueue_next

    def heartbeat_ticks(self: Lifecycle, *args: Any, **kwargs: Any) -> None:
        # The attempt's heartbeat thread beats while the end is applied (end.lua already forgot the job).
        monkeypatch.setattr(Lifecycle, "enqueue_next", real_next)
        q.renew(attempt)
        real_next(self, *args, **kwargs)

    monkeypatch.setattr(Lifecycle, "enqueue_next", heartbeat_ticks)
    assert q.end(attempt, Outcome.success(CONTENT))
    assert q.job(job.job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]
    leases = {k: v for k, v in client.hgetall("stepcache:{org}:leases").items() if k.decode() == job.job_id}
    time.sleep(0.3)
    q.reap()
    entry = cache.get_response(ROOT, "org/ds")
    problems = []
    if leases:
        problems.append(f"the ended job holds a lease again: {leases}")
    if not entry.is_success:
        problems.append(f"its success was overwritten in the cache by {entry.error_code}")
    assert not problems, problems


# --- no key is left behind by any way a job ends --------------------------------------------------


def test_every_way_a_job_ends_leaves_no_namespace_key(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.05"})
    q, dispatcher = make_queue(limit=2, max_attempts=1)
    client = stores.redis()
    for i in range(3):  # waiting and queued jobs, cancelled
        q.enqueue(ROOT, f"a/ds{i}")
    for i in range(3):
        q.cancel(f"a/ds{i}")
    q.enqueue(ROOT, "b/ds")  # started, cancelled, then ends; its blocked twin cancelled
    (owner,) = dispatcher.take()[-1:]
    owner_attempt = q.start(owner.payload, owner.token, "w")
    q.enqueue(ROOT, "b/ds")
    q.cancel("b/ds", revoke_started=True)
    assert owner_attempt is not None and q.end(owner_attempt, SUCCESS)
    q.enqueue(ROOT, "c/ds")  # started, its worker dies: crashed by the reaper
    (crash,) = dispatcher.take()
    assert q.start(crash.payload, crash.token, "w")
    q.limiter.started_ttl_ms = 0
    q.renew(Attempt(crash.payload, crash.token))
    q.reap()
    q.limiter.started_ttl_ms = 60_000
    for _ in range(10):  # everything left (children) runs to its end
        for dispatch in dispatcher.take():
            attempt = q.start(dispatch.payload, dispatch.token, "w")
            if attempt is not None:
                q.end(attempt, Outcome.success({}))
    past_grace()
    q.reap()
    q.reap()
    unfinished = q.ledger.unfinished()

    def keys_left() -> list[str]:
        every_key = client.scan_iter(match="stepcache:*")  # on a cluster, every master's
        # The event stream is global, not a namespace's.
        return sorted(k.decode() for k in every_key if not k.startswith(b"stepcache:events"))

    # A sequence lingers 1 s after its namespace's last journal entry is written (an end's "applied" one
    # may be written by the reaper's last pass).
    eventually(lambda: keys_left() in ([], ["{stepcache}:epoch"]), "no namespace key left", timeout=5)
    assert unfinished == [], unfinished
    assert client.smembers(ACTIVE_KEY) == set()


# --- cache fences --------------------------------------------------------------------------------


def test_a_cache_write_lands_only_while_its_attempts_claim_holds_whatever_the_fences_say(stores: Stores) -> None:
    first, second, other = Writer("job-1", 10), Writer("job-1", 20), Writer("job-2", 5)
    assert not cache.upsert_response(ROOT, "org/ds", {"v": 0}, fence=11, writer=first)  # never claimed: no entry
    assert cache.claim_entry(ROOT, "org/ds", None, None, first)
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response(ROOT, "org/ds")  # a bare claim is no entry to readers
    assert cache.get_dataset_responses("org/ds") == []
    assert cache.upsert_response(ROOT, "org/ds", {"v": 1}, fence=11, writer=first)
    assert cache.claim_entry(ROOT, "org/ds", None, None, second)  # the job's next attempt
    assert cache.claim_entry(ROOT, "org/ds", None, None, second)  # again: nothing changes, read back as its own
    assert not cache.claim_entry(ROOT, "org/ds", None, None, first)  # an older attempt's late claim
    assert not cache.upsert_response(ROOT, "org/ds", {"v": 0}, fence=99, writer=first)  # a newer fence, stale
    cache.update_progress(ROOT, "org/ds", None, None, 0.5, first)
    assert cache.get_response(ROOT, "org/ds").progress == 1.0  # not the stale attempt's
    assert cache.update_progress(ROOT, "org/ds", None, None, 0.5, second)
    assert cache.get_response(ROOT, "org/ds").progress == 0.5
    # Another job's attempt claims it with a smaller fence (a clock that went back): it is its entry now.
    assert cache.claim_entry(ROOT, "org/ds", None, None, other)
    assert not cache.upsert_response(ROOT, "org/ds", {"v": 0}, fence=21, writer=second)
    assert cache.upsert_response(ROOT, "org/ds", {"v": 2}, fence=6, writer=other)
    entry = cache.get_response(ROOT, "org/ds")
    assert (entry.content, entry.fence, entry.job_id) == ({"v": 2}, 6, "job-2")
    cache.release_claims(["job-2"])  # cancelled: its attempt writes nothing more, its entry stays
    assert not cache.upsert_response(ROOT, "org/ds", {"v": 3}, fence=7, writer=other)
    assert cache.get_response(ROOT, "org/ds").content == {"v": 2}
    assert cache.claim_entry(ROOT, "org/other", None, None, other)
    cache.release_claims(["job-2"])  # its bare claim is removed
    assert cache.cache_collection().count_documents({"dataset": "org/other"}) == 0


# --- a cancelled started job killed by a revoke (SIGTERM or SIGKILL) ends at once, not after its lease


@pytest.mark.slow
@pytest.mark.parametrize("signal", ["SIGTERM", "SIGKILL"])
def test_a_cancelled_and_terminated_job_ends_at_once_not_after_its_lease(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, celery_app: Any, signal: str
) -> None:
    from tasks.queue import get_queue
    from tests import sample_steps
    from tests.waiting import eventually
    from tests.workers import sample_worker

    env = use_settings(
        monkeypatch,
        {
            **stores.env(),
            "WORKER_HEARTBEAT_INTERVAL_SECONDS": "1",
            "WORKER_MAX_MISSING_HEARTBEATS": "7",  # lease TTL 8 s
            "WORKER_METRICS_PORT": "0",
            "TEST_SLEEP_SECONDS": "60",
        },
    )
    queue = get_queue()
    with sample_worker("w", env, tmp_path):
        result = sample_steps.test_sleep.delay("org/ds")
        eventually(lambda: result.state == "PROGRESS", "the job running", timeout=30)
        if signal == "SIGTERM":
            queue.cancel("org/ds", revoke_started=True)  # CeleryDispatcher.revoke: terminate, SIGTERM
        else:  # an operator's `celery control revoke --terminate --signal SIGKILL` after the cancel
            assert queue.limiter.cancel("org", [result.id]).started == [result.id]
            celery_app.control.revoke([result.id], terminate=True, signal="SIGKILL")
        cancelled_at = time.monotonic()
        eventually(
            lambda: queue.job(result.id).status == JobStatus.CANCELLED,  # type: ignore[union-attr]
            "the job cancelled",
            timeout=30,
        )
        took = time.monotonic() - cancelled_at
    log = (tmp_path / "worker-w.log").read_text(errors="replace")
    # Its process was killed at once (revoke, terminate): the main process ends the attempt at once, through
    # the one way out (tasks/signals.py _revoked). The slot must not wait for the lease TTL (8 s) + a pass.
    assert took < 4, f"cancelled after {took:.1f}s (lease TTL 8 s): the revoked handler did not end it\n{log[-3000:]}"


# --- lost replies of admit / set_limit / cancel / reap: one pass after the grace finishes them --------


def test_lost_replies_are_finished_by_one_pass_after_the_grace(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.1"})
    q, dispatcher = make_queue(limit=1, queued_ttl=0.05)
    q.redis_kept_its_data()  # not a fresh Redis (see f7b)
    a = q.enqueue(ROOT, "org/a")
    b = q.enqueue(ROOT, "org/b")
    c = q.enqueue(ROOT, "org/c")
    (first,) = dispatcher.take()
    assert first.payload.job_id == a.job_id
    lim = q.limiter
    # cancel's reply lost (and its caller died): b is forgotten, its CANCEL record stays in the outbox
    lim.cancel("org", [b.job_id])
    assert q.job(b.job_id).status == JobStatus.CANCELLED  # type: ignore[union-attr]  # the journal had it
    # a's message is lost, its lease expires; the reaper's script runs, its reply is lost (the reaper died)
    time.sleep(0.06)
    lim.reap(["org"], 10_000)
    assert dispatcher.take() == []
    past_grace()
    q.reap()
    statuses = {j.job_id: j.status for j in q.jobs()}
    assert statuses[b.job_id] == JobStatus.CANCELLED
    sent = [d.payload.job_id for d in dispatcher.take()]
    assert sent == [a.job_id], sent  # requeued at its old place, ahead of c
    assert statuses[c.job_id] == JobStatus.WAITING
    assert not stores.redis().hexists("stepcache:{org}:outbox", b.job_id)


def test_a_cancelled_job_whose_record_is_not_applied_yet_is_not_restored_by_a_repair(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, dispatcher = make_queue(limit=1)
    q.enqueue(ROOT, "org/a")
    b = q.enqueue(ROOT, "org/b")
    dispatcher.take()
    fail_once(monkeypatch, Queue, "_apply")
    q.cancel("org/b")  # cancelled in Redis; its apply failed: the CANCEL record waits for the reaper
    q.reap()  # the first pass on this Redis (no epoch marker yet): "repairs" it from the ledger
    client = stores.redis()
    assert not client.hexists("stepcache:{org}:jobs", b.job_id), "the cancelled job is back in the waiting room"


# --- journal entries written late, twice or out of order never move the ledger back --------------


def test_journal_entries_written_late_twice_or_out_of_order_never_move_the_ledger_back(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[JournalEntry] = []
    real_write = Ledger.write

    def write(self: Ledger, entries: Sequence[JournalEntry]) -> None:
        written.extend(entries)
        real_write(self, entries)

    monkeypatch.setattr(Ledger, "write", write)
    q, dispatcher = make_queue(limit=1, started_ttl=0)
    job = q.enqueue(ROOT, "org/ds")
    (first,) = dispatcher.take()
    assert q.start(first.payload, first.token, "w1") is not None
    q.reap()  # its lease expired: waiting again, then dispatched anew
    (second,) = dispatcher.take()
    q.limiter.started_ttl_ms = 60_000
    current = q.start(second.payload, second.token, "w2")
    assert current is not None
    assert q.end(current, Outcome.success(CONTENT))
    ended = q.job(job.job_id)  # written in order, as the writer does
    # Some were written twice; the children of its success are in the same journal.
    entries = sorted(
        {entry for entry in written if entry.payload.job_id == job.job_id},
        key=lambda e: (e.fence, e.status is None),
    )
    waiting, queued, started, success = JobStatus.WAITING, JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SUCCESS
    applied = None  # the end's effects (its next steps) are applied
    assert [entry.status for entry in entries] == [waiting, queued, started, waiting, queued, started, success, applied]
    assert [entry.created for entry in entries] == [True] + [False] * 7
    assert ended is not None and ended.status == JobStatus.SUCCESS and ended.attempts == 2
    assert ended.worker == "w2" and ended.created_at == entries[0].at
    q.ledger.write(entries[::-1])  # late, twice, newest first
    q.ledger.write(entries[3:] + entries[:3])
    assert q.ledger.get(job.job_id) == ended
    assert q.ledger.effects_pending() == []


# --- one reaper pass over many namespaces requeues and dispatches in all of them --------------------


def test_one_reaper_pass_serves_many_namespaces(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    q, dispatcher = make_queue(limit=1, started_ttl=0)
    n = 450  # more than two rounds of REAP_NAMESPACES_PER_ROUND
    for i in range(n):
        q.enqueue(ROOT, f"ns{i}/a")
        q.enqueue(ROOT, f"ns{i}/b")
    for dispatch in dispatcher.take():
        assert q.start(dispatch.payload, dispatch.token, "w")
    started = time.monotonic()
    report = q.reap()
    took = time.monotonic() - started
    assert report is not None and len(report.requeued) == n
    again = dispatcher.take()
    assert len(again) == n and {d.payload.dataset.endswith("/a") for d in again} == {True}
    counts = q.counts()
    assert all(c.running == 1 for c in counts.values()), took

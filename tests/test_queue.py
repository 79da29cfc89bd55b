"""The Queue with its real ledger (MongoDB) and limiter (Redis), and a dispatcher that records messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any
from unittest.mock import ANY

import pytest
from pymongo import MongoClient

from common import cache
from common.config import get_config
from common.exceptions import (
    CachedResponseNotFoundError,
    InvalidArgumentsError,
    InvalidConfigNameError,
    InvalidDatasetNameError,
    MissingStepInputError,
    UnknownStepError,
)
from common.lifecycle import Attempt, Lifecycle, Outcome, ReapReport
from common.queue import Dispatch, JobPayload, JobStatus, Queue
from common.queue.ledger import Ledger
from common.queue.limiter import LeaseState, NamespaceLimiter, namespace_keys
from common.redis_connection import connect, get_redis
from tests.conftest import Stores, dbsize

pytestmark = pytest.mark.redis_topologies


class RecordingDispatcher:
    def __init__(self) -> None:
        self.published: list[Dispatch] = []
        self.revoked: list[str] = []

    def publish(self, dispatch: Dispatch) -> None:
        self.published.append(dispatch)

    def revoke(self, job_ids: Sequence[str]) -> None:
        self.revoked += job_ids

    def take(self) -> list[Dispatch]:
        taken, self.published = self.published, []
        return taken


class Jobs(Lifecycle):
    """The queue and the lifecycle, driven as a worker would drive them."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    def start(self, payload: JobPayload, token: str, delivery: str) -> Attempt | None:  # type: ignore[override]
        attempt = super().start(payload, token, delivery, worker=delivery)
        if attempt is not None:
            self.record_start(attempt, delivery)
        return attempt

    def finish(self, payload: JobPayload, token: str, outcome: Outcome | None = None) -> bool:
        return self.end(Attempt(payload, token), outcome or SUCCESS)

    def heartbeat(self, payload: JobPayload, token: str) -> bool:
        return self.renew(Attempt(payload, token)) != LeaseState.LOST

    def reap(self) -> ReapReport | None:
        return super().reap()


def make_queue(
    started_ttl: float = 60.0, queued_ttl: float = 3600.0, limit: int = 2, max_attempts: int = 2
) -> tuple[Jobs, RecordingDispatcher]:
    dispatcher = RecordingDispatcher()
    settings = get_config()
    limiter = NamespaceLimiter(
        get_redis(settings.queue.redis_url),
        default_limit=limit,
        started_ttl_seconds=started_ttl,
        queued_ttl_seconds=queued_ttl,
        max_attempts=max_attempts,
    )
    return Jobs(Queue(dispatcher, Ledger(), limiter)), dispatcher


@pytest.fixture
def queue(stores: Stores) -> Iterator[tuple[Jobs, RecordingDispatcher]]:
    yield make_queue()


SUCCESS = Outcome.success({})


def run(queue: Jobs, dispatch: Dispatch) -> None:
    """Start and finish a dispatched job, as a worker would."""
    assert queue.start(dispatch.payload, dispatch.token, "test-worker")
    queue.finish(dispatch.payload, dispatch.token, SUCCESS)


def stale_and_current(q: Jobs, dispatcher: RecordingDispatcher, dataset: str = "org/ds") -> tuple[Attempt, Attempt]:
    """Attempt 1 starts, its lease lapses and the reaper takes it back; attempt 2 starts."""
    q.limiter.started_ttl_ms = 0
    q.enqueue("dataset-config-names", dataset)
    (first,) = dispatcher.take()
    stale = q.start(first.payload, first.token, "w1")
    q.reap()
    q.limiter.started_ttl_ms = 60_000
    (second,) = dispatcher.take()
    current = q.start(second.payload, second.token, "w2")
    assert stale is not None and current is not None and current.number == 2
    return stale, current


def ids(dispatches: Sequence[Dispatch]) -> list[str]:
    return [d.payload.job_id for d in dispatches]


def test_a_namespace_gets_its_limit_of_slots_and_the_rest_wait(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    jobs = [q.enqueue("dataset-config-names", f"org/ds{i}") for i in range(5)]
    other = q.enqueue("dataset-config-names", "other/ds")
    assert ids(dispatcher.take()) == [jobs[0].job_id, jobs[1].job_id, other.job_id]
    counts = q.counts()
    assert (counts["org"].waiting, counts["org"].queued, counts["org"].started) == (3, 2, 0)
    statuses = {job.job_id: job.status for job in q.jobs()}
    assert statuses[jobs[0].job_id] == JobStatus.QUEUED and statuses[jobs[4].job_id] == JobStatus.WAITING


def test_a_freed_slot_promotes_the_next_job_in_the_release_itself(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    jobs = [q.enqueue("dataset-config-names", f"org/ds{i}") for i in range(3)]
    first, _ = dispatcher.take()
    run(q, first)
    # No poll and no reaper: the finish call itself published the next job.
    assert ids(dispatcher.take()) == [jobs[2].job_id]
    assert q.job(jobs[0].job_id).status == JobStatus.SUCCESS  # type: ignore[union-attr]


def test_waiting_jobs_run_by_priority_then_age(queue: tuple[Jobs, RecordingDispatcher]) -> None:
    q, dispatcher = queue
    q.set_limit("org", 0)
    low = q.enqueue("dataset-config-names", "org/low", priority="low")
    normal1 = q.enqueue("dataset-config-names", "org/n1")
    high = q.enqueue("dataset-config-names", "org/high", priority="high")
    normal2 = q.enqueue("dataset-config-names", "org/n2", priority="normal")
    assert dispatcher.take() == []
    q.set_limit("org", 4)
    assert ids(dispatcher.take()) == [high.job_id, normal1.job_id, normal2.job_id, low.job_id]


def test_a_redelivered_message_runs_once(queue: tuple[Jobs, RecordingDispatcher]) -> None:
    q, dispatcher = queue
    q.enqueue("dataset-config-names", "org/ds")
    (dispatch,) = dispatcher.take()
    assert q.start(dispatch.payload, dispatch.token, "w1")
    assert not q.start(dispatch.payload, dispatch.token, "w2")
    q.finish(dispatch.payload, dispatch.token, SUCCESS)
    assert not q.start(dispatch.payload, dispatch.token, "w3")
    assert q.job(dispatch.payload.job_id).attempts == 1  # type: ignore[union-attr]


def test_a_stale_worker_cannot_end_an_attempt_it_no_longer_holds(stores: Stores) -> None:
    q, dispatcher = make_queue(started_ttl=0, limit=1)
    q.enqueue("dataset-config-names", "org/a")
    q.enqueue("dataset-config-names", "org/b")
    (first,) = dispatcher.take()
    assert q.start(first.payload, first.token, "w1")
    report = q.reap()  # the lease (TTL 0) expired: requeued at its place in line, before b, and sent again
    assert report is not None and report.requeued == [first.payload.job_id]
    (again,) = dispatcher.take()
    assert again.payload.dataset == "org/a" and again.token != first.token
    q.limiter.started_ttl_ms = 60_000
    assert q.start(again.payload, again.token, "w2")
    assert not q.heartbeat(first.payload, first.token)
    assert not q.finish(first.payload, first.token, SUCCESS)  # the stale worker ends late: nothing happens
    assert q.counts()["org"].started == 1  # the new attempt still holds its slot
    assert dispatcher.take() == []
    assert q.job(first.payload.job_id).status == JobStatus.STARTED  # type: ignore[union-attr]
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response("dataset-config-names", "org/a")


def test_an_expired_lease_is_requeued_until_attempts_run_out_then_cached_as_crashed(stores: Stores) -> None:
    q, dispatcher = make_queue(started_ttl=0, limit=1)
    job = q.enqueue("dataset-config-names", "org/ds")
    for attempt in (1, 2):
        (dispatch,) = dispatcher.take()
        confirmation = q.start(dispatch.payload, dispatch.token, "w")
        assert confirmation is not None and confirmation.number == attempt
        report = q.reap()
        assert report is not None
    assert report.crashed == [job.job_id]
    assert dispatcher.take() == []
    ended = q.job(job.job_id)
    assert ended is not None and ended.status == JobStatus.ERROR and ended.error_code == "JobManagerCrashedError"
    entry = cache.get_response("dataset-config-names", "org/ds")
    assert entry.error_code == "JobManagerCrashedError" and entry.http_status == 500
    assert "org" not in q.counts()  # nothing left: the namespace is no longer listed
    # Its children are still scheduled: they get an error that says where it came from.
    child = cache.get_response("dataset-is-valid", "org/ds")
    assert child.error_code == "ParentStepFailedError" and "JobManagerCrashedError" in child.content["error"]


def test_a_lost_message_is_dispatched_again_without_counting_an_attempt(stores: Stores) -> None:
    q, dispatcher = make_queue(queued_ttl=0, limit=1)
    q.enqueue("dataset-config-names", "org/ds")
    (lost,) = dispatcher.take()
    report = q.reap()
    assert report is not None and report.requeued == [lost.payload.job_id]
    (again,) = dispatcher.take()
    assert again.token != lost.token
    assert not q.start(lost.payload, lost.token, "w")  # the old message, if it shows up, holds no lease
    assert q.start(again.payload, again.token, "w") == Attempt(again.payload, again.token, 1, ANY)


def test_only_one_reaper_runs_at_a_time(queue: tuple[Jobs, RecordingDispatcher]) -> None:
    q, _ = queue
    lock = q.limiter.redis.lock("stepcache:reaper", timeout=5)
    assert lock.acquire()
    assert q.reap() is None
    lock.release()
    assert q.reap() is not None


def test_an_identical_waiting_job_is_returned_instead_of_a_new_one(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    q.set_limit("org", 0)
    first = q.enqueue("config-split-names", "org/ds", config="c")
    assert q.enqueue("config-split-names", "org/ds", config="c").job_id == first.job_id
    assert q.enqueue("config-split-names", "org/ds", config="d").job_id != first.job_id
    q.set_limit("org", None)
    (dispatch, _) = dispatcher.take()
    assert dispatch.payload.job_id == first.job_id
    assert q.enqueue("config-split-names", "org/ds", config="c").job_id == first.job_id  # queued, not started


def test_an_identical_job_waits_behind_the_started_one(queue: tuple[Jobs, RecordingDispatcher]) -> None:
    q, dispatcher = queue
    q.enqueue("dataset-config-names", "org/ds")
    (dispatch,) = dispatcher.take()
    assert q.start(dispatch.payload, dispatch.token, "w")
    second = q.enqueue("dataset-config-names", "org/ds")
    assert second.job_id != dispatch.payload.job_id
    assert dispatcher.take() == []  # a free slot, but the same key is running
    assert q.enqueue("dataset-config-names", "org/ds").job_id == second.job_id
    q.finish(dispatch.payload, dispatch.token, SUCCESS)
    assert ids(dispatcher.take()) == [second.job_id]


def test_an_override_applies_to_one_namespace_and_zero_pauses_it(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    q.set_limit("big", 3)
    q.set_limit("paused", 0)
    for namespace in ("big", "small", "paused"):
        for i in range(4):
            q.enqueue("dataset-config-names", f"{namespace}/ds{i}")
    running = [d.payload.namespace for d in dispatcher.take()]
    assert (running.count("big"), running.count("small"), running.count("paused")) == (3, 2, 0)
    assert q.get_limit("big") == (3, True) and q.get_limit("small") == (2, False)
    q.set_limit("paused", None)
    assert [d.payload.namespace for d in dispatcher.take()] == ["paused", "paused"]
    with pytest.raises(ValueError, match="0"):
        q.set_limit("small", -1)


def test_cancel_ends_waiting_and_queued_jobs_of_a_dataset_only(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    for config in ("a", "b", "c"):
        q.enqueue("config-split-names", "org/ds", config=config)
    other = q.enqueue("config-split-names", "org/other", config="a")
    queued = dispatcher.take()
    cancelled = q.cancel("org/ds")
    assert len(cancelled) == 3
    assert {j.status for j in q.jobs("org/ds")} == {JobStatus.CANCELLED}
    # The freed slots went to the other dataset's job, and a cancelled job's message does not run.
    assert ids(dispatcher.take()) == [other.job_id]
    assert not q.start(queued[0].payload, queued[0].token, "w")


def test_cancelling_a_started_job_revokes_it_and_keeps_its_slot_until_it_is_gone(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    job = q.enqueue("dataset-config-names", "org/ds")
    (dispatch,) = dispatcher.take()
    assert q.start(dispatch.payload, dispatch.token, "w")
    assert q.cancel("org/ds") == []  # started jobs are left alone unless asked
    assert [j.job_id for j in q.cancel("org/ds", revoke_started=True)] == [job.job_id]
    assert dispatcher.revoked == [job.job_id]
    assert q.counts()["org"].started == 1
    assert q.heartbeat(dispatch.payload, dispatch.token)  # still running: it keeps its slot...
    q.finish(dispatch.payload, dispatch.token, SUCCESS)  # ...until it ends
    assert q.job(job.job_id).status == JobStatus.CANCELLED  # type: ignore[union-attr]
    assert q.limiter.counts("org").running == 0


def test_reconcile_rebuilds_waiting_rooms_and_leases_after_redis_lost_its_data(
    stores: Stores, queue: tuple[Jobs, RecordingDispatcher]
) -> None:
    q, dispatcher = queue
    jobs = [q.enqueue("dataset-config-names", f"org/ds{i}") for i in range(4)]
    started, queued = dispatcher.take()
    assert q.start(started.payload, started.token, "w")
    q.journal.flush_all()  # the ledger caught up (it follows within QUEUE_LEDGER_LAG_SECONDS)
    stores.redis().flushall()
    assert q.counts() == {}
    assert q.reconcile() == 4
    # The started job got its lease back under its own token; the lost queued message is sent again.
    assert q.heartbeat(started.payload, started.token)
    assert ids(dispatcher.take()) == [queued.payload.job_id]
    assert (q.counts()["org"].waiting, q.counts()["org"].running) == (2, 2)
    q.finish(started.payload, started.token, SUCCESS)
    assert ids(dispatcher.take()) == [jobs[2].job_id]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda q: q.enqueue("dataset-config-names", "../etc/passwd"), InvalidDatasetNameError),
        (lambda q: q.enqueue("dataset-config-names", "org/ds{x}"), InvalidDatasetNameError),
        (lambda q: q.enqueue("no-such-step", "org/ds"), UnknownStepError),
        (lambda q: q.enqueue("config-split-names", "org/ds"), MissingStepInputError),
        (lambda q: q.enqueue("dataset-config-names", "org/ds", config="c"), MissingStepInputError),
        (lambda q: q.enqueue("split-first-rows", "org/ds", config="c"), MissingStepInputError),
        (lambda q: q.enqueue("config-split-names", "org/ds", config="a/../../b"), InvalidConfigNameError),
        (lambda q: q.enqueue("dataset-config-names", "org/ds", priority="urgent"), InvalidArgumentsError),
        (lambda q: q.enqueue("dataset-config-names", "org/ds", priority=5), InvalidArgumentsError),
    ],
)
def test_bad_input_is_a_typed_error_and_nothing_is_written(
    stores: Stores, queue: tuple[Jobs, RecordingDispatcher], call: object, error: type[Exception]
) -> None:
    q, dispatcher = queue
    with pytest.raises(error):
        call(q)  # type: ignore[operator]
    assert dbsize(stores.redis()) == 0
    client: MongoClient[dict[str, object]] = MongoClient(stores.mongo_url)
    assert client[stores.queue_database]["jobs"].count_documents({}) == 0
    client.close()
    assert dispatcher.published == []
    with pytest.raises(CachedResponseNotFoundError):
        cache.get_response("dataset-config-names", "org/ds")


def test_every_key_of_a_namespace_shares_one_hash_tag() -> None:
    keys = namespace_keys("org")
    assert all("{org}" in key and key.count("{") == 1 for key in keys)


def test_a_blocked_twin_keeps_waiting_while_its_owner_is_requeued(stores: Stores) -> None:
    q, dispatcher = make_queue(started_ttl=0, limit=2)
    q.enqueue("dataset-config-names", "org/ds")
    (owner,) = dispatcher.take()
    assert q.start(owner.payload, owner.token, "w1")
    twin = q.enqueue("dataset-config-names", "org/ds")
    assert dispatcher.take() == []
    q.reap()  # the owner's worker died: the owner runs again, its twin still waits behind it
    (again,) = dispatcher.take()
    assert again.payload.job_id == owner.payload.job_id
    assert q.start(again.payload, again.token, "w2")
    q.finish(again.payload, again.token, SUCCESS)
    assert ids(dispatcher.take()) == [twin.job_id]


def test_reconcile_keeps_a_twin_blocked_behind_its_started_owner(
    stores: Stores, queue: tuple[Jobs, RecordingDispatcher]
) -> None:
    q, dispatcher = queue
    q.enqueue("dataset-config-names", "org/ds")
    (owner,) = dispatcher.take()
    assert q.start(owner.payload, owner.token, "w")
    twin = q.enqueue("dataset-config-names", "org/ds")
    q.journal.flush_all()  # the ledger caught up (it follows within QUEUE_LEDGER_LAG_SECONDS)
    stores.redis().flushall()
    assert q.reconcile() == 2
    assert dispatcher.take() == []
    q.finish(owner.payload, owner.token, SUCCESS)
    assert ids(dispatcher.take()) == [twin.job_id]


def test_cancelling_a_blocked_twin_forgets_it(queue: tuple[Jobs, RecordingDispatcher]) -> None:
    q, dispatcher = queue
    q.enqueue("dataset-config-names", "org/ds")
    (owner,) = dispatcher.take()
    assert q.start(owner.payload, owner.token, "w")
    twin = q.enqueue("dataset-config-names", "org/ds")
    assert [job.job_id for job in q.cancel("org/ds")] == [twin.job_id]
    q.finish(owner.payload, owner.token, SUCCESS)
    assert dispatcher.take() == []
    assert q.counts()["org"].running == 0 and q.counts()["org"].waiting == 0


def test_a_heartbeat_after_the_job_finished_does_nothing(queue: tuple[Jobs, RecordingDispatcher]) -> None:
    q, dispatcher = queue
    q.enqueue("dataset-config-names", "org/ds")
    (dispatch,) = dispatcher.take()
    run(q, dispatch)
    ended = q.job(dispatch.payload.job_id)
    assert not q.heartbeat(dispatch.payload, dispatch.token)
    assert q.job(dispatch.payload.job_id) == ended  # no resurrection, not even a timestamp
    assert q.limiter.counts("org").running == 0


class FlakyDispatcher(RecordingDispatcher):
    """A broker that refuses the first message."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def publish(self, dispatch: Dispatch) -> None:
        if not self.refused:
            self.refused += 1
            raise ConnectionError("broker unavailable")
        super().publish(dispatch)


def test_a_message_that_could_not_be_published_waits_again_and_the_reaper_sends_it(stores: Stores) -> None:
    q, _ = make_queue(limit=1)
    flaky = FlakyDispatcher()
    q.queue.dispatcher = flaky
    job = q.enqueue("dataset-config-names", "org/ds")
    assert flaky.published == [] and q.counts()["org"].waiting == 1  # not leased: its slot is free
    assert q.job(job.job_id).status == JobStatus.WAITING  # type: ignore[union-attr]
    q.reap()
    assert ids(flaky.take()) == [job.job_id]


def test_a_pending_job_redis_lost_is_restored_before_the_next_identical_call_which_gets_its_id(
    queue: tuple[Jobs, RecordingDispatcher],
) -> None:
    q, dispatcher = queue
    stranded = q.enqueue("dataset-config-names", "org/ds")
    q.journal.flush_all()  # the ledger caught up (it follows within QUEUE_LEDGER_LAG_SECONDS)
    connect(get_config().queue.redis_url.get_secret_value()).flushall()
    dispatcher.take()
    assert q.enqueue("dataset-config-names", "org/ds").job_id == stranded.job_id
    assert ids(dispatcher.take()) == [stranded.job_id]


def test_a_job_whose_worker_died_after_writing_its_response_but_before_ending_is_crashed(stores: Stores) -> None:
    q, dispatcher = make_queue(started_ttl=0, limit=1, max_attempts=1)
    job = q.enqueue("dataset-config-names", "org/ds")
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w")
    assert attempt is not None
    cache.upsert_response("dataset-config-names", "org/ds", {"config_names": []}, fence=attempt.fence)
    report = q.reap()  # the worker died before its end was recorded: the reaper's crash is the job's end
    assert report is not None and report.crashed == [job.job_id]
    entry = cache.get_response("dataset-config-names", "org/ds")
    ended = q.job(job.job_id)
    assert ended is not None and ended.status == JobStatus.ERROR and entry.fence == ended.fence


def test_redis_keeps_a_compact_payload_and_reads_the_old_one(stores: Stores) -> None:
    from common.queue.jobs import JobPayload, Priority

    payload = JobPayload(
        job_id="j1",
        step="config-info",
        dataset="org/ds",
        config="default",
        split=None,
        namespace="org",
        unicity_id="config-info,org/ds,default,",
        priority=Priority.HIGH,
        rank=Priority.HIGH.rank,
    )
    assert payload.compact() == '["config-info","org/ds","default",null,0]'
    assert len(payload.compact()) <= 64  # Redis' compact hash encoding for typical names
    assert JobPayload.from_compact("j1", payload.compact()) == payload
    assert JobPayload.from_compact("j1", payload.model_dump_json()) == payload  # written by older versions

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from common.event_bus import Consumer, EventBus
from common.events import (
    CacheUpdated,
    Event,
    EventType,
    InvalidEventError,
    JobProgress,
    JobQueued,
    parse_event,
)
from tasks.embedded import ROOT
from tests.conftest import Stores
from tests.event_consumer import HANDLED_KEY

pytestmark = pytest.mark.redis_topologies


@pytest.fixture
def client(stores: Stores) -> Iterator[redis.Redis]:
    connection = stores.redis()
    yield connection
    connection.close()


def queued(dataset: str) -> JobQueued:
    return JobQueued(job_id=dataset, step="dataset-config-names", dataset=dataset, namespace=dataset.split("/")[0])


def test_an_event_round_trips_through_json_as_its_own_class() -> None:
    event = JobProgress(step="s", dataset="org/ds", namespace="org", current=1, total=4, fraction=0.25)
    parsed = parse_event(event.model_dump_json())
    assert isinstance(parsed, JobProgress) and parsed == event
    assert parsed.schema_version == 1


def test_an_old_consumer_ignores_fields_and_types_it_does_not_know() -> None:
    newer = queued("org/ds").model_dump(mode="json") | {"schema_version": 2, "colour": "red"}
    assert isinstance(parse_event(newer), JobQueued)
    unknown = parse_event(newer | {"type": "job.teleported"})
    assert type(unknown) is Event and unknown.type == "job.teleported"


def test_garbage_is_a_typed_error() -> None:
    for data in (b"not json", b"[1, 2]", b'{"type": "job.queued"}'):
        with pytest.raises(InvalidEventError):
            parse_event(data)


def test_every_subscriber_sees_every_event_in_order(client: redis.Redis) -> None:
    bus = EventBus(client)
    start = bus.last_id()
    ids = [bus.publish(queued(f"org/ds{i}")) for i in range(5)]
    for _ in range(2):  # two independent readers
        assert [stream_id for stream_id, _ in bus.read(start)] == ids
    assert [event.dataset for _, event in bus.read(ids[2])] == ["org/ds3", "org/ds4"]
    subscription = bus.subscribe(after=start)
    assert [next(subscription)[1].dataset for _ in range(5)] == [f"org/ds{i}" for i in range(5)]


def test_each_event_goes_to_one_consumer_of_a_group_and_every_group_gets_it(client: redis.Redis) -> None:
    bus = EventBus(client)
    seen: dict[str, list[str]] = {"a1": [], "a2": [], "b": []}
    consumers = [Consumer(bus, "a", "a1"), Consumer(bus, "a", "a2"), Consumer(bus, "b", "b")]
    for consumer in consumers:
        consumer.handler("*")(lambda event, name=consumer.name: seen[name].append(event.dataset))
    for i in range(10):
        bus.publish(queued(f"org/ds{i}"))
    consumers[0].run_once(block_ms=10, count=4)
    consumers[1].run_once(block_ms=10, count=100)
    consumers[2].run_once(block_ms=10, count=100)
    assert sorted(seen["a1"] + seen["a2"]) == sorted(seen["b"]) and len(seen["b"]) == 10
    assert len(seen["a1"]) == 4
    assert client.xpending(bus.stream, "a")["pending"] == 0


def test_a_failing_handler_does_not_stop_the_others_and_its_event_is_retried_then_dead_lettered(
    client: redis.Redis,
) -> None:
    bus = EventBus(client)
    consumer = Consumer(bus, "g", "c", max_deliveries=3, claim_idle_ms=0)
    calls = {"good": 0, "bad": 0}

    @consumer.handler(EventType.JOB_QUEUED)
    def bad(event: Event) -> None:
        calls["bad"] += 1
        raise RuntimeError("poison")

    @consumer.handler(EventType.JOB_QUEUED)
    def good(event: Event) -> None:
        calls["good"] += 1

    bus.publish(queued("org/poison"))
    for _ in range(5):
        consumer.run_once(block_ms=10)
    assert calls == {"good": 3, "bad": 3}
    ((_, dead),) = bus.dead_letters()
    assert "delivered more than 3 times" in dead["reason"] and "org/poison" in dead["event"]
    assert client.xpending(bus.stream, "g")["pending"] == 0


def test_an_event_no_handler_takes_is_dead_lettered_not_dropped(client: redis.Redis) -> None:
    bus = EventBus(client)
    consumer = Consumer(bus, "g", "c")
    consumer.handler(EventType.JOB_QUEUED)(lambda event: None)
    bus.publish(CacheUpdated(step="s", dataset="org/ds", namespace="org", http_status=200))
    consumer.run_once(block_ms=10)
    ((_, dead),) = bus.dead_letters()
    assert "no handler" in dead["reason"] and dead["group"] == "g"


def test_trimming_never_drops_what_a_group_has_not_acknowledged(client: redis.Redis) -> None:
    bus = EventBus(client, max_length=10)
    consumer = Consumer(bus, "slow", "c")
    consumer.handler("*")(lambda event: None)
    first = [bus.publish(queued(f"org/early{i}")) for i in range(5)]
    consumer.run_once(block_ms=10, count=2)  # the group acknowledged 2 of them
    for i in range(50):
        bus.publish(queued(f"org/late{i}"))
    bus.trim()
    remaining = [i for i, _ in bus.read("0-0", count=1000)]
    assert remaining[0] == first[2]  # the first unread entry of the group, and everything after it
    consumer.run_once(block_ms=10, count=1000)
    bus.trim()
    assert len(bus.read("0-0", count=1000)) == 10


IDLE_MS = 50  # group_idle_ms of the tests that let a group be abandoned


def pause_longer_than(milliseconds: int) -> None:
    time.sleep(2 * milliseconds / 1000)  # time passing is the one thing here that cannot be awaited


def stream_ids(bus: EventBus) -> list[str]:
    return [stream_id for stream_id, _ in bus.read("0-0", count=1000)]


def test_an_abandoned_group_no_longer_keeps_the_stream_from_being_trimmed_and_a_returning_consumer_resumes(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(client, max_length=10, group_idle_ms=IDLE_MS)
    Consumer(bus, "removed-service", "c")
    for i in range(5):
        bus.publish(queued(f"org/early{i}"))
    client.xreadgroup("removed-service", "c", {bus.stream: ">"}, count=2)  # read, never acknowledged
    late = [bus.publish(queued(f"org/late{i}")) for i in range(50)]
    pause_longer_than(IDLE_MS)
    bus.trim()
    assert stream_ids(bus) == late[-10:]
    warnings = [record for record in caplog.records if "removed-service" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert [group["name"] for group in client.xinfo_groups(bus.stream)] == [b"removed-service"]
    returning = Consumer(bus, "removed-service", "back", claim_idle_ms=0)
    handled: list[str] = []
    returning.handler("*")(lambda event: handled.append(event.dataset))
    while returning.run_once(block_ms=10, count=1000):
        pass
    assert handled == [f"org/late{i}" for i in range(40, 50)]  # what was trimmed is lost to the group
    assert client.xpending(bus.stream, "removed-service")["pending"] == 0


def test_a_lagging_group_whose_consumer_is_still_reading_keeps_what_it_has_not_read_or_acknowledged(
    client: redis.Redis,
) -> None:
    bus = EventBus(client, max_length=10, group_idle_ms=IDLE_MS)
    consumer = Consumer(bus, "slow", "c")

    @consumer.handler("*")
    def fails_on_the_third(event: Event) -> None:
        if event.dataset == "org/early2":
            raise RuntimeError("not yet")

    first = [bus.publish(queued(f"org/early{i}")) for i in range(5)]
    for i in range(50):
        bus.publish(queued(f"org/late{i}"))
    pause_longer_than(IDLE_MS)  # every entry is older than group_idle_ms, the consumer is not idle
    consumer.run_once(block_ms=10, count=3)  # 2 acknowledged, the third pending
    bus.trim()
    assert stream_ids(bus)[0] == first[2]
    assert len(stream_ids(bus)) == 53


def test_a_group_that_never_had_a_consumer_holds_its_entries_only_for_group_idle_ms(client: redis.Redis) -> None:
    Consumer(EventBus(client), "never-ran", "c")  # creates the group; no consumer of it ever reads
    ids = [EventBus(client).publish(queued(f"org/ds{i}")) for i in range(30)]
    EventBus(client, max_length=10).trim()  # the default group_idle_ms: an hour
    assert stream_ids(EventBus(client)) == ids
    pause_longer_than(IDLE_MS)
    EventBus(client, max_length=10, group_idle_ms=IDLE_MS).trim()
    assert stream_ids(EventBus(client)) == ids[-10:]


def test_a_consumer_killed_inside_its_handler_loses_nothing_and_acknowledged_nothing_early(
    stores: Stores, client: redis.Redis
) -> None:
    bus = EventBus(client)
    Consumer(bus, "workers", "setup")  # the group exists before anything is published
    victim = subprocess.Popen(
        [sys.executable, "-m", "tests.event_consumer", stores.redis_url, "workers", "victim"], cwd=ROOT
    )
    try:
        bus.publish(queued("slow/ds"))
        deadline = time.monotonic() + 30
        while b"begin slow/ds victim" not in client.lrange(HANDLED_KEY, 0, -1):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Inside the handler: the event is pending for the victim, not acknowledged.
        assert client.xpending(bus.stream, "workers")["pending"] == 1
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    for i in range(5):
        bus.publish(queued(f"org/ds{i}"))
    survivor = Consumer(bus, "workers", "survivor", claim_idle_ms=0)
    handled: list[str] = []
    survivor.handler("*")(lambda event: handled.append(event.dataset))
    while survivor.run_once(block_ms=10):
        pass
    assert sorted(handled) == sorted(["slow/ds"] + [f"org/ds{i}" for i in range(5)])
    assert client.xpending(bus.stream, "workers")["pending"] == 0

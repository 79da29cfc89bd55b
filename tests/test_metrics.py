"""The worker's metrics (common/metrics.py): where they listen, and what a scrape costs as the cache and the
namespaces grow."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.connection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient, monitoring

from common import cache, mongo
from common.cache_counts import kept_counts
from common.config import get_config
from common.metrics import LiveCollector
from tasks import signals
from tasks.embedded import free_port
from tests.conftest import Stores, use_settings
from tests.test_queue import make_queue


class _CommandRecorder(monitoring.CommandListener):
    def __init__(self) -> None:
        self.thread: int | None = threading.get_ident()
        self.commands: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if threading.get_ident() == self.thread:
            self.commands.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@contextlib.contextmanager
def recording_mongo(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Iterator[_CommandRecorder]:
    """The commands this thread sends to MongoDB meanwhile, through a real client of the settings' URL that
    records them (the process's client for that URL meanwhile)."""
    recorder = _CommandRecorder()
    client: MongoClient[dict[str, Any]] = MongoClient(stores.mongo_url, tz_aware=True, event_listeners=[recorder])
    with monkeypatch.context() as patch:
        patch.setitem(mongo._clients, stores.mongo_url, client)
        yield recorder
    recorder.thread = None  # its own closing is not recorded
    client.close()


@contextlib.contextmanager
def counting_redis_round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many times this thread sends to Redis meanwhile (a pipeline is sent once): [count]."""
    sent = [0]
    thread = threading.get_ident()
    real_send: Any = redis.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == thread:
            sent[0] += 1
        real_send(self, command, check_health)

    with monkeypatch.context() as patch:
        patch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
        yield sent


def scrape(collector: LiveCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def _grow(namespaces: range, entries: range) -> None:
    jobs, _ = make_queue()
    for i in namespaces:
        jobs.set_limit(f"ns{i}", 3)  # a namespace the limiter knows, as one with work would be
    for i in entries:
        cache.upsert_response("split-first-rows", f"org/ds{i // 10}", {"rows": []}, config="c", split=f"s{i % 10}")


def test_a_scrape_costs_the_same_few_round_trips_and_never_reads_the_cache_however_big_they_grow(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, _ = make_queue()
    collector = LiveCollector(jobs.limiter.overview, kept_counts)
    costs: list[tuple[int, list[tuple[str, Any]]]] = []
    # Past the 500 namespaces a round trip used to read, and past a handful of cache entries.
    for namespaces, entries in ((range(3), range(5)), (range(3, 1203), range(5, 305))):
        _grow(namespaces, entries)
        scrape(collector)  # the first use of a collection makes its indexes
        with recording_mongo(stores, monkeypatch) as mongo_commands, counting_redis_round_trips(monkeypatch) as sent:
            samples = scrape(collector)
        costs.append((sent[0], mongo_commands.commands))
        assert samples[("stepcache_namespaces", ())] == namespaces.stop
        entries_label = (("error_code", ""), ("http_status", "200"), ("kind", "split-first-rows"))
        assert samples[("stepcache_cache_entries", entries_label)] == entries.stop
    assert costs[0] == costs[1] == (2, [("find", "cacheCounts")])  # the names, then one pipeline; the counts


def non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def worker_metrics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: dict[str, str]) -> Iterator[Any]:
    """The metrics server a worker's main process starts with these settings (its services started as the
    worker_ready signal starts them, then stopped)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "3600", **settings})
    signals._start_worker_services()
    try:
        yield signals._running["metrics"]
    finally:
        signals._stop_worker_services()


def test_a_worker_serves_its_metrics_on_loopback_unless_told_where(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert get_config().worker.metrics_host == "127.0.0.1"
    port = free_port()
    with worker_metrics(monkeypatch, tmp_path, {"WORKER_METRICS_PORT": str(port)}) as server:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert b"stepcache_cache_entries" in answer.read()
        address = non_loopback_address()
        if address is not None:
            assert not connects(address, port)
    port = free_port()
    settings = {"WORKER_METRICS_PORT": str(port), "WORKER_METRICS_HOST": "0.0.0.0"}
    with worker_metrics(monkeypatch, tmp_path, settings) as server:
        assert server.server_address[0] == "0.0.0.0"
        address = non_loopback_address()
        if address is not None:
            assert connects(address, port)

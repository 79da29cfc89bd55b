"""Prometheus metrics, correct under Celery's prefork pool (prometheus_client's multiprocess mode).

Counters and histograms are written by whichever process runs a job, into files under
PROMETHEUS_MULTIPROC_DIR; the worker's main process serves their sum, plus gauges it reads live from
Redis and MongoDB at scrape time (waiting and running jobs, leases, cache entries). prometheus_client is
imported lazily, only after :func:`prepare_multiprocess` set the directory: it picks its storage when
first imported.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from common.cache import CacheCount
from common.queue.limiter import NamespaceCounts

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600)


def prepare_multiprocess(directory: Path | None = None) -> Path:
    """Set PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory unless given or already set) for this
    process and the children it forks; call it before anything imports prometheus_client."""
    if MULTIPROC_ENV not in os.environ:
        path = directory or Path(tempfile.mkdtemp(prefix="stepcache-metrics-"))
        path.mkdir(parents=True, exist_ok=True)
        os.environ[MULTIPROC_ENV] = str(path)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Imported already (the `celery` command loads Flower's plugin, which imports prometheus_client):
        # metrics made from now on must still go to the shared files.
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return Path(os.environ[MULTIPROC_ENV])


@dataclass(frozen=True)
class _JobMetrics:
    started: Any
    finished: Any
    duration: Any


@cache
def _job_metrics() -> _JobMetrics:
    from prometheus_client import Counter, Histogram

    return _JobMetrics(
        started=Counter("stepcache_jobs_started", "Jobs started, by step", ["step"]),
        finished=Counter("stepcache_jobs_finished", "Jobs finished, by step and status", ["step", "status"]),
        duration=Histogram(
            "stepcache_job_duration_seconds", "How long jobs ran, by step", ["step"], buckets=DURATION_BUCKETS
        ),
    )


def job_started(step: str) -> None:
    _job_metrics().started.labels(step=step).inc()


def job_finished(step: str, status: str, duration: float | None) -> None:
    metrics = _job_metrics()
    metrics.finished.labels(step=step, status=status).inc()
    if duration is not None:
        metrics.duration.labels(step=step).observe(duration)


class LiveCollector:
    """Gauges read at scrape time: jobs per namespace and state, leases in use, cache entries."""

    def __init__(
        self,
        namespace_counts: Callable[[], Mapping[str, NamespaceCounts]],
        cache_counts: Callable[[], Sequence[CacheCount]],
    ) -> None:
        self.namespace_counts = namespace_counts
        self.cache_counts = cache_counts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        waiting = GaugeMetricFamily("stepcache_jobs_waiting", "Jobs waiting for a slot", labels=["namespace"])
        running = GaugeMetricFamily(
            "stepcache_jobs_running",
            "Jobs holding a slot, by state (queued, started)",
            labels=["namespace", "state"],
        )
        leases = GaugeMetricFamily("stepcache_leases_in_use", "Slots leased, all namespaces")
        total = 0
        for namespace, counts in self.namespace_counts().items():
            waiting.add_metric([namespace], counts.waiting)
            running.add_metric([namespace, "queued"], counts.queued)
            running.add_metric([namespace, "started"], counts.started)
            total += counts.queued + counts.started
        leases.add_metric([], total)
        entries = GaugeMetricFamily(
            "stepcache_cache_entries",
            "Cache entries by kind, status and error code",
            labels=["kind", "http_status", "error_code"],
        )
        for count in self.cache_counts():
            entries.add_metric([count.kind, str(count.http_status), count.error_code or ""], count.count)
        yield from (waiting, running, leases, entries)


def serve(port: int, live: LiveCollector | None = None) -> Any:
    """Serve every process's metrics (and the live gauges) over HTTP on `port`; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    if live is not None:
        registry.register(live)
    server, _ = start_http_server(port, registry=registry)
    return server


def mark_process_dead(pid: int) -> None:
    """Forget a dead child's live gauges (prometheus_client's multiprocess bookkeeping)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

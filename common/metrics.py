"""Prometheus metrics, correct under Celery's prefork pool (prometheus_client's multiprocess mode).

Counters and histograms are written by whichever process runs a job, into files under
PROMETHEUS_MULTIPROC_DIR; the worker's main process serves their sum, plus gauges it reads live from
Redis and MongoDB at scrape time (waiting and running jobs, oldest waits and limits of the top
TOP_NAMESPACES namespaces plus their totals over all namespaces, leases, cache entries). A scrape costs a
fixed number of round trips: the limiter's overview (two pipelines) and the kept cache counts (one read
of a small collection, common/cache_counts.py), never a pass over the cache. prometheus_client is
imported lazily, only after :func:`prepare_multiprocess` set the directory: it picks its storage when
first imported.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from common.cache_counts import CacheCount
from common.queue.limiter import NamespaceOverview

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Namespaces with a `namespace` label (the most waiting jobs first): the series stay bounded however many
# namespaces there are; the `*_all` gauges carry the totals over every namespace.
TOP_NAMESPACES = 20
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


_job_metrics_lock = threading.Lock()


@cache
def _job_metrics() -> _JobMetrics:
    # functools.cache lets two threads of a thread pool build them at once: registered twice, refused.
    with _job_metrics_lock:
        return _build_job_metrics()


@cache
def _build_job_metrics() -> _JobMetrics:
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


def top_namespaces(overview: Mapping[str, NamespaceOverview], top: int) -> list[str]:
    """The `top` namespaces with the most waiting jobs (then running, then the longest wait, then by name)."""

    def rank(namespace: str) -> tuple[int, int, float, str]:
        o = overview[namespace]
        return (-o.waiting, -(o.queued + o.started), -(o.oldest_wait or 0.0), namespace)

    return sorted(overview, key=rank)[:top]


class LiveCollector:
    """Gauges read at scrape time: per namespace for the `top` namespaces only (by waiting jobs), totals over
    all namespaces, leases in use, cache entries. `namespaces` is the limiter's `overview`, `cache_counts`
    the kept counts (common.cache_counts.kept_counts)."""

    def __init__(
        self,
        namespaces: Callable[[], Mapping[str, NamespaceOverview]],
        cache_counts: Callable[[], Sequence[CacheCount]],
        top: int = TOP_NAMESPACES,
    ) -> None:
        self.namespaces = namespaces
        self.cache_counts = cache_counts
        self.top = top

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        overview = self.namespaces()
        waiting = GaugeMetricFamily(
            "stepcache_jobs_waiting", "Jobs waiting for a slot (the top namespaces)", labels=["namespace"]
        )
        running = GaugeMetricFamily(
            "stepcache_jobs_running",
            "Jobs holding a slot, by state (queued, started) (the top namespaces)",
            labels=["namespace", "state"],
        )
        oldest = GaugeMetricFamily(
            "stepcache_oldest_wait_seconds",
            "How long the oldest waiting job has waited, 0 when none waits (the top namespaces)",
            labels=["namespace"],
        )
        limit = GaugeMetricFamily(
            "stepcache_namespace_limit", "Slots a namespace may hold (the top namespaces)", labels=["namespace"]
        )
        for namespace in top_namespaces(overview, self.top):
            o = overview[namespace]
            waiting.add_metric([namespace], o.waiting)
            running.add_metric([namespace, "queued"], o.queued)
            running.add_metric([namespace, "started"], o.started)
            oldest.add_metric([namespace], o.oldest_wait or 0.0)
            limit.add_metric([namespace], o.limit)
        yield from (waiting, running, oldest, limit)
        waits = [o.oldest_wait for o in overview.values() if o.oldest_wait is not None]
        totals = {
            "waiting": sum(o.waiting for o in overview.values()),
            "queued": sum(o.queued for o in overview.values()),
            "started": sum(o.started for o in overview.values()),
        }
        waiting_all = GaugeMetricFamily("stepcache_jobs_waiting_all", "Jobs waiting for a slot, all namespaces")
        waiting_all.add_metric([], totals["waiting"])
        running_all = GaugeMetricFamily(
            "stepcache_jobs_running_all", "Jobs holding a slot, by state, all namespaces", labels=["state"]
        )
        running_all.add_metric(["queued"], totals["queued"])
        running_all.add_metric(["started"], totals["started"])
        oldest_all = GaugeMetricFamily(
            "stepcache_oldest_wait_seconds_all", "How long the oldest waiting job of any namespace has waited"
        )
        oldest_all.add_metric([], max(waits, default=0.0))
        known = GaugeMetricFamily("stepcache_namespaces", "Namespaces with work or a limit override")
        known.add_metric([], len(overview))
        leases = GaugeMetricFamily("stepcache_leases_in_use", "Slots leased, all namespaces")
        leases.add_metric([], totals["queued"] + totals["started"])
        yield from (waiting_all, running_all, oldest_all, known, leases)
        entries = GaugeMetricFamily(
            "stepcache_cache_entries",
            "Cache entries by kind, status and error code",
            labels=["kind", "http_status", "error_code"],
        )
        for count in self.cache_counts():
            entries.add_metric([count.kind, str(count.http_status), count.error_code or ""], count.count)
        yield entries


def serve(port: int, address: str, live: LiveCollector | None = None) -> Any:
    """Serve every process's metrics (and the live gauges) over HTTP on `address`:`port`, without
    authentication: `address` is the operator's choice (WORKER_METRICS_HOST, the API's host); returns the
    server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    if live is not None:
        registry.register(live)
    server, _ = start_http_server(port, addr=address, registry=registry)
    return server


def mark_process_dead(pid: int) -> None:
    """Forget a dead child's live gauges (prometheus_client's multiprocess bookkeeping)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

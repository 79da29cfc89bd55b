"""What the benchmarks share: their servers and settings, percentiles, and the promote latency's clock."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from tasks.embedded import EmbeddedServer, WorkerProcess


WORKER_CONCURRENCY = 4  # prefork processes of every benchmark worker


@contextmanager
def bench_worker(env: dict[str, str], log_dir: Path, name: str, **extra_env: str) -> Iterator[WorkerProcess]:
    """A real `celery -A tasks worker` with the benchmark's steps, running while the block runs."""
    from tasks.embedded import WorkerProcess

    process = WorkerProcess(
        name, {**env, **extra_env}, log_dir / f"{name}.log", WORKER_CONCURRENCY, include=["bench.steps"]
    )
    with process:
        yield process


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass
class Servers:
    env: dict[str, str]  # the settings every process of the run gets (this one's environment too)
    servers: list[EmbeddedServer]  # the ones started here, stopped at the end
    mongo_url: str
    embedded_mongo: bool


@contextmanager
def bench_servers(mongo_variables: Sequence[str] = ("BENCH_MONGO_URL",), **extra_env: str) -> Iterator[Servers]:
    """A redis-server and a SecantusDB started here (unless BENCH_REDIS_URL or one of `mongo_variables`
    names one), this process's settings pointed at them, its app built for them and the benchmark's steps
    registered; the run's databases dropped and the servers stopped at the end."""
    from tasks.embedded import start_mongo, start_redis

    servers = []
    redis_url = os.environ.get("BENCH_REDIS_URL")
    if not redis_url:
        servers.append(start_redis())
        redis_url = servers[-1].url
    mongo_url = next((os.environ[name] for name in mongo_variables if os.environ.get(name)), "")
    embedded_mongo = not mongo_url
    if embedded_mongo:
        servers.append(start_mongo())
        mongo_url = servers[-1].url
    run = uuid.uuid4().hex[:8]
    env = {
        "QUEUE_REDIS_URL": redis_url,
        "CACHE_MONGO_URL": mongo_url,
        "QUEUE_MONGO_URL": mongo_url,
        "CACHE_MONGO_DATABASE": f"stepcache_bench_{run}_cache",
        "QUEUE_MONGO_DATABASE": f"stepcache_bench_{run}_queue",
        "QUEUE_MAX_JOBS_PER_NAMESPACE": "2",
        "COMMON_LOG_LEVEL": "WARNING",
        **extra_env,
    }
    os.environ.update(env)
    from common.config import get_config

    get_config.cache_clear()
    from tasks import create_app

    create_app(get_config())  # the current app: what the steps and plain tasks publish through
    import bench.steps  # noqa: F401  (registers the benchmark's steps and tasks)

    try:
        yield Servers(env, servers, mongo_url, embedded_mongo)
    finally:
        from common.mongo import get_database

        settings = get_config()
        client = get_database(settings.cache.mongo_url, "admin").client
        client.drop_database(env["CACHE_MONGO_DATABASE"])
        client.drop_database(env["QUEUE_MONGO_DATABASE"])
        for server in servers:
            server.stop()


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) of a process and of its live descendants (a prefork worker's pool)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class ReleaseWatcher:
    """`with ReleaseWatcher(client, sha) as watcher:` records when Redis ran the script `sha` (MONITOR's
    timestamps): when the `end` script freed a slot."""

    def __init__(self, client: redis.Redis, sha: str) -> None:
        self.client = client
        self.sha = sha
        self.releases: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ReleaseWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.client.ping()  # one more command wakes the watcher up
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                command: dict[str, Any] = monitor.next_command()
                if self.sha in command["command"]:
                    self.releases.append(float(command["time"]))

    def promote_seconds(self, runs: Sequence[tuple[float, float]]) -> list[float]:
        """From the last release before each run's start (but the first) to that start."""
        promote = []
        for start, _ in sorted(runs)[1:]:
            before = [release for release in self.releases if release <= start]
            if before:
                promote.append(start - before[-1])
        return promote


def gaps_seconds(runs: Sequence[tuple[float, float]]) -> list[float]:
    """From each run's end to the next run's start."""
    ordered = sorted(runs)
    return [ordered[k + 1][0] - ordered[k][1] for k in range(len(ordered) - 1)]

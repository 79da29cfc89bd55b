"""How long Redis takes to agree with the ledger again, and what a durable start costs.

    python -m bench.bench_repair        (or `make bench-repair`; about a minute)

It starts its own redis-server (RDB snapshots in a temporary directory, saved on demand) and SecantusDB,
and measures, in this process, driving the queue and the lifecycle as workers do:

(a) a rollback: Redis is SIGKILLed and restarted from a snapshot taken before N jobs were admitted (some of
    them started): the time of the reaper's pass that finds it (generations) and resyncs every job, for
    N = 1,000 and 10,000 over 100 namespaces;
(b) a loss: the same after FLUSHALL (no marker);
(c) a start: `confirm` alone (the limiter's script) against `Lifecycle.start` (confirm, then the start
    written to the ledger, the cache entry claimed and the lease checked, before the step runs), p50/p99.

It prints a table and writes bench/results/repair.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from bench.harness import bench_servers, percentile

RESULTS = Path(__file__).resolve().parent / "results"
NAMESPACES = 100
STEP = "dataset-config-names"


class SnapshotRedis:
    """A redis-server saving RDB snapshots on demand, killed and restarted from the last one."""

    def __init__(self) -> None:
        from tasks.embedded import free_port

        self.directory = Path(tempfile.mkdtemp(prefix="stepcache-bench-rdb-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        arguments += ["--save", "", "--appendonly", "no"]
        process = subprocess.Popen(["redis-server", *arguments], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        return process

    def save(self) -> None:
        with redis.Redis(port=self.port) as client:
            client.save()

    def kill_and_restart(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process = self._start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _lifecycle() -> Any:
    from common.lifecycle import Lifecycle
    from common.queue import Queue
    from common.queue.queue import JobInput

    class Recording:
        def __init__(self) -> None:
            self.published: list[Any] = []

        def publish(self, dispatch: Any) -> None:
            self.published.append(dispatch)

        def revoke(self, job_ids: Any) -> None:
            pass

    dispatcher = Recording()
    return Lifecycle(Queue.from_config(dispatcher)), dispatcher, JobInput


@contextmanager
def _fresh_stores() -> Iterator[SnapshotRedis]:
    """A redis-server, a ledger and a cache of the measure's own (stopped and dropped after): what an
    earlier measure left, its journal writer threads included, stays out."""
    from common import mongo
    from common.config import get_config

    server = SnapshotRedis()
    run = uuid.uuid4().hex[:8]
    names = {
        "QUEUE_REDIS_URL": server.url,
        "QUEUE_MONGO_DATABASE": f"stepcache_bench_{run}_queue",
        "CACHE_MONGO_DATABASE": f"stepcache_bench_{run}_cache",
    }
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    get_config.cache_clear()
    try:
        yield server
    finally:
        client = mongo.get_database(get_config().queue.mongo_url, names["QUEUE_MONGO_DATABASE"]).client
        client.drop_database(names["QUEUE_MONGO_DATABASE"])
        client.drop_database(names["CACHE_MONGO_DATABASE"])
        os.environ.update({name: value for name, value in before.items() if value is not None})
        get_config.cache_clear()
        server.stop()


def _repair(jobs: int, rollback: bool) -> dict[str, Any]:
    with _fresh_stores() as server:
        return _measure_repair(server, jobs, rollback)


def _measure_repair(server: SnapshotRedis, jobs: int, rollback: bool) -> dict[str, Any]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    lifecycle, dispatcher, job_input = _lifecycle()
    queue = lifecycle.queue
    lifecycle.reap()  # marked, generation recorded
    server.save()
    inputs = [job_input(STEP, f"ns{i % NAMESPACES}/ds{i}") for i in range(jobs)]
    queue.enqueue_many(inputs)
    for dispatch in dispatcher.published[: NAMESPACES // 2]:
        lifecycle.start(dispatch.payload, dispatch.token, "bench")
    queue.journal.flush_all()
    if rollback:
        server.kill_and_restart()
    else:
        client.flushall()
    started = time.perf_counter()
    lifecycle.reap()
    took = time.perf_counter() - started
    known = sum(int(client.hlen(f"stepcache:{{ns{i}}}:jobs")) for i in range(NAMESPACES))
    assert known == jobs == len(queue.ledger.unfinished()), (known, jobs, rollback)
    return {"jobs": jobs, "fault": "rollback" if rollback else "loss", "seconds": round(took, 3)}


def _starts(samples: int) -> dict[str, float]:
    with _fresh_stores():
        return _measure_starts(samples)


def _measure_starts(samples: int) -> dict[str, float]:
    lifecycle, dispatcher, job_input = _lifecycle()
    queue = lifecycle.queue
    queue.limiter.redis.flushall()
    queue.enqueue_many([job_input(STEP, f"start{i}/ds") for i in range(2 * samples)])
    dispatches = list(dispatcher.published)
    confirm, start = [], []
    for dispatch in dispatches[:samples]:
        began = time.perf_counter()
        queue.limiter.confirm(dispatch.payload.namespace, dispatch.payload.job_id, dispatch.token, "bench", "w")
        confirm.append(time.perf_counter() - began)
    for dispatch in dispatches[samples:]:
        began = time.perf_counter()
        lifecycle.start(dispatch.payload, dispatch.token, "bench", "w")
        start.append(time.perf_counter() - began)
    return {
        "confirm p50 ms": round(1000 * percentile(confirm, 0.5), 2),
        "confirm p99 ms": round(1000 * percentile(confirm, 0.99), 2),
        "durable start p50 ms": round(1000 * percentile(start, 0.5), 2),
        "durable start p99 ms": round(1000 * percentile(start, 0.99), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1000,10000", help="unfinished jobs per measure, comma-separated")
    sizes = [int(size) for size in parser.parse_args().jobs.split(",")]
    with bench_servers():
        repairs = [_repair(jobs, rollback) for jobs in sizes for rollback in (True, False)]
        starts = _starts(200)
    print("| fault | unfinished jobs | one reaper pass: found and resynced (s) |\n|---|---|---|")
    for row in repairs:
        print(f"| {row['fault']} | {row['jobs']:,} | {row['seconds']} |")
    print("\n| start | p50 (ms) | p99 (ms) |\n|---|---|---|")
    print(f"| confirm only | {starts['confirm p50 ms']} | {starts['confirm p99 ms']} |")
    print(f"| durable start | {starts['durable start p50 ms']} | {starts['durable start p99 ms']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "repair.json").write_text(json.dumps({"repairs": repairs, "starts": starts}, indent=2))


if __name__ == "__main__":
    main()

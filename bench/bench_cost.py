"""The per-job cost: every Redis round trip and MongoDB command of a no-op job, counted.

    python -m bench.bench_cost        (or `make bench-cost`, under a minute)

It starts its own redis-server and SecantusDB, runs Celery's in-process worker (one thread: the same
code as a `celery -A tasks worker` pool process, so the counts are a prefork worker's too) and enqueues
no-op jobs one at a time, each in its own namespace, waiting for each to end. Every Redis round trip (a
command, or a pipeline or script batch sent at once: redis-py's `send_packed_command`) and every MongoDB
command (pymongo's command monitoring) is counted, by the thread that sent it and what it was, and
divided by the number of jobs. Plain Celery's no-op task and its no-op task that upserts its result into
MongoDB run the same way, for comparison.

It prints a table and writes bench/results/cost.json and cost.md.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo import monitoring

from bench.harness import bench_servers

RESULTS = Path(__file__).resolve().parent / "results"


class Counts:
    """Round trips by (thread, what), while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.seen: Counter[tuple[str, str, str]] = Counter()
        self.lock = threading.Lock()

    def add(self, store: str, what: str) -> None:
        if not self.on:
            return
        thread = threading.current_thread().name
        role = "caller" if thread == "MainThread" else re.sub(r"[-_]?\d+", "", thread)
        with self.lock:
            self.seen[(role, store, what)] += 1


COUNTS = Counts()


class MongoCommands(monitoring.CommandListener):
    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        COUNTS.add("mongo", f"{event.command_name} {collection if isinstance(collection, str) else ''}".strip())

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n(?:\$\d+\r\n([^\r]{0,40}))?")


def _redis_what(command: Any) -> str:
    """What a packed command or pipeline was: its command names (EVALSHA: the script's name), in order."""
    chunks = command if isinstance(command, list) else [command]
    data = b"".join(bytes(chunk) for chunk in chunks)[:65536]
    names = []
    for name, argument in COMMAND.findall(data):
        text = name.decode().upper()
        if text == "EVALSHA":
            text = SCRIPT_NAMES.get(argument.decode(errors="replace"), "EVALSHA")
        elif text == "SCRIPT":
            text = f"SCRIPT {argument.decode(errors='replace').upper()}"
        if text not in ("MULTI", "EXEC"):
            names.append(text)
    unique = list(dict.fromkeys(names))
    return "+".join(unique) if len(unique) <= 4 else "+".join(unique[:4]) + f"+... ({len(names)})"


SCRIPT_NAMES: dict[str, str] = {}


@contextmanager
def counting() -> Iterator[None]:
    import redis.connection

    original = redis.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        COUNTS.add("redis", _redis_what(command))
        original(self, command, check_health)  # type: ignore[no-untyped-call]

    redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def measure(name: str, call: Callable[[int], Any], jobs: int) -> dict[str, float]:
    for i in range(3):  # warm up: connections, scripts loaded
        call(-1 - i).get(timeout=60)
    time.sleep(0.5)
    COUNTS.seen.clear()
    COUNTS.on = True
    began = time.perf_counter()
    for i in range(jobs):
        call(i).get(timeout=60)
    elapsed = time.perf_counter() - began
    time.sleep(0.5)  # what the job's end left to background threads (the ledger's writer)
    COUNTS.on = False
    per_job = {" | ".join(key): count / jobs for key, count in sorted(COUNTS.seen.items())}
    return {"per_job": per_job, "seconds_per_job": elapsed / jobs}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    monitoring.register(MongoCommands())
    with bench_servers(QUEUE_MAX_JOBS_PER_NAMESPACE="1", WORKER_HEARTBEAT_INTERVAL_SECONDS="30") as _:
        from celery import current_app
        from celery.contrib.testing.worker import start_worker

        from bench import steps
        from tasks.queue import get_queue

        for script_name, script in get_queue().limiter.scripts.items():
            SCRIPT_NAMES[script.sha] = f"script:{script_name}"
        app = current_app._get_current_object()
        results = {}
        with (
            counting(),
            start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=30),
        ):
            for name, call in {
                "stepcache": lambda i: steps.bench_noop.delay(f"ns{i}/ds{i}"),
                "plain_celery": lambda i: steps.plain_noop.delay(f"ns{i}/ds{i}"),
                "plain_celery_mongo": lambda i: steps.plain_mongo_upsert.delay(f"ns{i}/ds{i}"),
            }.items():
                results[name] = measure(name, call, args.jobs)
    report(results)


def report(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cost.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| run | thread | store | what | per job |", "|---|---|---|---|---|"]
    for name, result in results.items():
        total: Counter[str] = Counter()
        for key, count in result["per_job"].items():
            thread, store, what = key.split(" | ")
            lines.append(f"| {name} | {thread} | {store} | {what} | {count:.2f} |")
            total[store] += count
        lines.append(
            f"| {name} | **total** | | redis {total['redis']:.1f}, mongo {total['mongo']:.1f} "
            f"| {result['seconds_per_job'] * 1000:.1f} ms/job |"
        )
    table = "\n".join(lines)
    (RESULTS / "cost.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

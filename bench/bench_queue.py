"""The queue benchmark: stepcache against plain Celery, on the same Redis broker and worker settings.

    python -m bench.bench_queue        (or `make bench`)

It starts its own redis-server and SecantusDB (unless BENCH_REDIS_URL / BENCH_MONGO_URL are set) and
real `celery -A tasks worker` processes, and measures:

(a) throughput of a no-op step through stepcache vs a plain Celery no-op task, as a ratio;
(b) promote latency: from the end of one job's step to the start of the next job's step in a namespace
    with a limit of 1 (includes the cache write, the ledger, the end script, the broker and the
    worker picking the message up), p50 and p99;
(c) the wait of one job of namespace B enqueued behind a backlog of namespace A, with stepcache, with
    the usual "retry with countdown when over the limit" recipe, and with no limiter at all;
(d) the ledger's lag behind Redis: from `delay()` returning to the job in the ledger, and from its
    result being ready to the ledger saying it succeeded (polled every 2 ms).

It prints a table and writes bench/results/queue.json and bench/results/queue.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import redis

from bench.harness import (
    WORKER_CONCURRENCY,
    ReleaseWatcher,
    bench_servers,
    bench_worker,
    cpu_seconds,
    gaps_seconds,
    percentile,
)

if TYPE_CHECKING:
    from tasks.embedded import EmbeddedServer, WorkerProcess

RESULTS = Path(__file__).resolve().parent / "results"


class Bench:
    def __init__(self, env: dict[str, str], log_dir: Path, servers: list[EmbeddedServer]) -> None:
        self.env = env
        self.log_dir = log_dir
        self.servers = servers
        self.redis = redis.Redis.from_url(env["QUEUE_REDIS_URL"])

    def worker(self, name: str, **extra_env: str) -> AbstractContextManager[WorkerProcess]:
        return bench_worker(self.env, self.log_dir, name, **extra_env)

    def cpu(self, worker: WorkerProcess) -> dict[str, float]:
        """CPU seconds so far: the worker (its pool included), this process (the caller), the servers."""
        assert worker.process is not None
        caller = psutil.Process().cpu_times()
        return {
            "worker": cpu_seconds(worker.process.pid),
            "caller": caller.user + caller.system,
            **{server.name: cpu_seconds(server.process.pid) for server in self.servers},
        }

    def reset(self) -> None:
        """A clean broker, limiter and ledger between measurements."""
        from tasks.queue import get_queue

        self.redis.flushdb()
        get_queue().ledger.collection.delete_many({})

    def starts(self) -> dict[str, float]:
        from bench.steps import STARTS_KEY

        recorded: dict[str, float] = {}
        for line in self.redis.lrange(STARTS_KEY, 0, -1):
            label, at = (line.decode() if isinstance(line, bytes) else line).rsplit(" ", 1)
            recorded.setdefault(label, float(at))
        return recorded

    def throughput(self, jobs: int) -> dict[str, Any]:
        from bench import steps

        rates: dict[str, float] = {}
        delays: dict[str, float] = {}
        calls: dict[str, Callable[[int], Any]] = {
            "plain_celery": lambda i: steps.plain_noop.delay(f"ns{i % 100}/ds{i}"),
            "plain_celery_mongo": lambda i: steps.plain_mongo_upsert.delay(f"ns{i % 100}/ds{i}"),
            "stepcache": lambda i: steps.bench_noop.delay(f"ns{i % 100}/ds{i}"),
        }
        cpu_ms: dict[str, dict[str, float]] = {}
        for name, call in calls.items():
            self.reset()
            with self.worker(f"throughput-{name}") as worker:
                call(-1).get(timeout=60)  # warm up the worker's pool and connections
                before = self.cpu(worker)
                begin = time.perf_counter()
                results = [call(i) for i in range(jobs)]
                delays[name] = jobs / (time.perf_counter() - begin)
                for result in results:
                    result.get(timeout=600)
                rates[name] = jobs / (time.perf_counter() - begin)
                after = self.cpu(worker)
                cpu_ms[name] = {part: (after[part] - before[part]) * 1000 / jobs for part in after}
        self.reset()
        with self.worker("throughput-delay-many"):
            steps.bench_noop.delay("warm/up").get(timeout=60)
            begin = time.perf_counter()
            results = steps.bench_noop.delay_many(f"ns{i % 100}/ds{i}" for i in range(jobs))
            delays["stepcache_delay_many"] = jobs / (time.perf_counter() - begin)
            for result in results:
                result.get(timeout=600)
            # The workers' side alone, once enqueueing is one bulk call.
            rates["stepcache_delay_many"] = jobs / (time.perf_counter() - begin)
        return {
            **rates,
            "ratio": rates["stepcache"] / rates["plain_celery"],
            "ratio_to_mongo": rates["stepcache"] / rates["plain_celery_mongo"],
            "delay_per_s": delays,
            "delay_ratio": delays["stepcache"] / delays["plain_celery"],
            "cpu_ms_per_job": cpu_ms,
        }

    def promote_latency(self, jobs: int) -> dict[str, float]:
        """In a namespace with a limit of 1, from the end script freeing a job's slot (as
        Redis' MONITOR timestamps it) to the next job's step starting; and from one step's end to the next
        step's start (adding the cache write and the ledger update that come before the release)."""
        from bench import steps
        from tasks.queue import get_queue

        self.reset()
        release_sha = get_queue().limiter.scripts["end"].sha
        with self.worker("latency", QUEUE_MAX_JOBS_PER_NAMESPACE="1"):
            with ReleaseWatcher(self.redis, release_sha) as watcher:
                results = [steps.bench_sleep.delay(f"one/ds{i}") for i in range(jobs)]
                for result in results:
                    result.get(timeout=600)
            # Plain Celery's own floor on the same worker: from publishing a message to its task starting.
            celery_floor = []
            for i in range(jobs):
                published = time.time()
                steps.plain_sleep.delay(f"plain/ds{i}").get(timeout=60)
                celery_floor.append((self.starts()[f"plain/ds{i}"] - published) * 1000)
        starts = self.starts()
        runs = [(starts[f"one/ds{i}"], starts[f"end:one/ds{i}"]) for i in range(jobs)]
        step_gaps = [gap * 1000 for gap in gaps_seconds(runs)]
        promote = [seconds * 1000 for seconds in watcher.promote_seconds(runs)]
        return {
            "release_to_start_p50_ms": percentile(promote, 0.5),
            "release_to_start_p99_ms": percentile(promote, 0.99),
            "step_end_to_next_start_p50_ms": percentile(step_gaps, 0.5),
            "step_end_to_next_start_p99_ms": percentile(step_gaps, 0.99),
            "plain_celery_publish_to_start_p50_ms": percentile(celery_floor, 0.5),
            "plain_celery_publish_to_start_p99_ms": percentile(celery_floor, 0.99),
            "samples": len(promote),
        }

    def ledger_lag(self, jobs: int) -> dict[str, float]:
        """How far the ledger follows Redis (QUEUE_LEDGER_LAG_SECONDS), read from MongoDB directly."""
        from bench import steps
        from common.queue import JobStatus
        from tasks.queue import get_queue

        self.reset()
        ledger = get_queue().ledger

        def milliseconds_until(job_id: str, status: JobStatus | None) -> float:
            """Until the ledger has the job (in this status)."""
            began = time.perf_counter()
            while (job := ledger.get(job_id)) is None or (status is not None and job.status != status):
                time.sleep(0.002)
            return (time.perf_counter() - began) * 1000

        created, ended = [], []
        with self.worker("ledger-lag"):
            for i in range(jobs):
                result = steps.bench_noop.delay(f"lag{i % 10}/ds{i}")
                created.append(milliseconds_until(result.id, None))
                result.get(timeout=60)
                ended.append(milliseconds_until(result.id, JobStatus.SUCCESS))
        return {
            "created_p50_ms": percentile(created, 0.5),
            "created_p99_ms": percentile(created, 0.99),
            "created_max_ms": max(created),
            "ended_p50_ms": percentile(ended, 0.5),
            "ended_p99_ms": percentile(ended, 0.99),
            "ended_max_ms": max(ended),
        }

    def fairness(self, backlog: int) -> dict[str, float]:
        """Seconds between enqueueing B's job and its start, behind `backlog` jobs of namespace A."""
        from bench import steps

        waits = {}
        modes: dict[str, Any] = {
            "stepcache": steps.bench_sleep,
            "retry_countdown": steps.retry_sleep,
            "no_limiter": steps.plain_sleep,
        }
        for mode, task in modes.items():
            self.reset()
            with self.worker(f"fairness-{mode}"):
                for i in range(backlog):
                    task.delay(f"a/ds{i}")
                time.sleep(0.5)  # let the workers get into the backlog
                enqueued = time.time()
                task.delay("b/ds").get(timeout=900)
                waits[mode] = self.starts()["b/ds"] - enqueued
        return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs for the throughput run")
    parser.add_argument("--latency-jobs", type=int, default=300, help="jobs for the promote latency run")
    parser.add_argument("--backlogs", type=int, nargs="+", default=[200, 2000], help="namespace A backlogs")
    parser.add_argument("--lag-jobs", type=int, default=200, help="jobs for the ledger lag run")
    args = parser.parse_args()

    with bench_servers() as run, tempfile.TemporaryDirectory(prefix="stepcache-bench-") as logs:
        runner = Bench(run.env, Path(logs), run.servers)
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "worker_concurrency": WORKER_CONCURRENCY,
                "mongo": "SecantusDB" if run.embedded_mongo else run.mongo_url,
            },
            "throughput_jobs_per_s": runner.throughput(args.jobs),
            "promote_latency": runner.promote_latency(args.latency_jobs),
            "fairness_wait_s": {str(backlog): runner.fairness(backlog) for backlog in args.backlogs},
            "ledger_lag": runner.ledger_lag(args.lag_jobs),
        }
    report(results)


def report(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "queue.json").write_text(json.dumps(results, indent=2) + "\n")
    throughput, latency = results["throughput_jobs_per_s"], results["promote_latency"]

    def p50_p99(name: str) -> str:
        return f"{latency[name + '_p50_ms']:.1f} / {latency[name + '_p99_ms']:.1f}"

    lines = [
        "| measure | stepcache | plain Celery | retry-with-countdown | no limiter |",
        "|---|---|---|---|---|",
        f"| no-op throughput (jobs/s) | {throughput['stepcache']:.0f} ({throughput['ratio']:.2f}x; "
        f"{throughput['ratio_to_mongo']:.2f}x of plain + Mongo upsert) | {throughput['plain_celery']:.0f} "
        f"(+ Mongo upsert: {throughput['plain_celery_mongo']:.0f}) | | |",
        f"| `delay()` loop (calls/s) | {throughput['delay_per_s']['stepcache']:.0f} "
        f"({throughput['delay_ratio']:.2f}x) | {throughput['delay_per_s']['plain_celery']:.0f} | | |",
        f"| no-op throughput, enqueued by one `delay_many()` (jobs/s) | {throughput['stepcache_delay_many']:.0f} "
        f"({throughput['stepcache_delay_many'] / throughput['plain_celery_mongo']:.2f}x of plain + Mongo upsert) "
        "| | | |",
        f"| `delay_many()` of the same jobs (jobs/s) | {throughput['delay_per_s']['stepcache_delay_many']:.0f} "
        f"({throughput['delay_per_s']['stepcache_delay_many'] / throughput['delay_per_s']['plain_celery']:.2f}x) "
        "| | | |",
        f"| promote latency: slot freed to next job started, p50 / p99 (ms) | {p50_p99('release_to_start')} | | | |",
        f"| one step's end to the next step's start, p50 / p99 (ms) | {p50_p99('step_end_to_next_start')} | | | |",
        f"| a message published to its task started, p50 / p99 (ms) | | "
        f"{p50_p99('plain_celery_publish_to_start')} | | |",
    ]
    cpu = throughput["cpu_ms_per_job"]
    parts = list(cpu["stepcache"])

    def cpu_of(name: str) -> str:
        return " / ".join(f"{cpu[name][part]:.1f}" for part in parts)

    lines.append(
        f"| CPU ms per job, {' / '.join(parts)} | {cpu_of('stepcache')} | {cpu_of('plain_celery')} "
        f"(+ Mongo upsert: {cpu_of('plain_celery_mongo')}) | | |"
    )
    for backlog, waits in results["fairness_wait_s"].items():
        lines.append(
            f"| B's wait behind {backlog} jobs of A (s) | {waits['stepcache']:.2f} | "
            f"| {waits['retry_countdown']:.2f} | {waits['no_limiter']:.2f} |"
        )
    lag = results["ledger_lag"]
    lines.append(
        f"| the ledger's lag, job created / ended, p50 / p99 / max (ms) | {lag['created_p50_ms']:.0f} / "
        f"{lag['created_p99_ms']:.0f} / {lag['created_max_ms']:.0f}, {lag['ended_p50_ms']:.0f} / "
        f"{lag['ended_p99_ms']:.0f} / {lag['ended_max_ms']:.0f} | | | |"
    )
    table = "\n".join(lines)
    (RESULTS / "queue.md").write_text(table + "\n")
    print(table)
    chart(results)


def chart(results: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'stepcache[bench]'): no chart")
        return
    fairness = results["fairness_wait_s"]
    backlogs = list(fairness)
    modes = ["stepcache", "retry_countdown", "no_limiter"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        left.bar(
            [i + index * width for i in range(len(backlogs))],
            [fairness[b][mode] for b in backlogs],
            width,
            label=mode.replace("_", " "),
        )
    left.set_xticks([i + width for i in range(len(backlogs))], [f"A backlog {b}" for b in backlogs])
    left.set_ylabel("B's wait (s)")
    left.set_yscale("log")
    left.legend()
    left.set_title("One job of B behind a backlog of A")
    throughput = results["throughput_jobs_per_s"]
    right.bar(["plain Celery", "stepcache"], [throughput["plain_celery"], throughput["stepcache"]])
    right.set_ylabel("no-op jobs/s")
    right.set_title(f"Throughput ({throughput['ratio']:.2f}x)")
    figure.tight_layout()
    figure.savefig(RESULTS / "queue.png", dpi=100)


if __name__ == "__main__":
    main()

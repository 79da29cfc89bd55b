"""The API benchmark: a cached `GET /first-rows` through the HTTP API against the same read by pymongo.

    python -m bench.bench_api [--threads 16] [--warmup 2] [--seconds 10] [--workers 1 2]

It starts its own redis-server and SecantusDB (unless BENCH_REDIS_URL / BENCH_MONGO_URL are set), writes
one realistic split-first-rows entry (100 rows of an int, a ~100-character string, a float and a bool,
with their features, as tasks/steps/first_rows.py makes it) through common.cache.upsert_response, and
measures, with --threads client threads for --seconds after a --warmup:

(1) the baseline: pymongo's `find_one` of that document (the API's query: the key fields, without `_id`),
    every thread on the one shared MongoClient;
(2) the API: `python -m tasks api --port <free port>` (one run per --workers value), each thread with its
    own keep-alive HTTP connection (http.client), every answer checked: 200 and the bytes of a body
    that parses to the entry's content;
(3) the ratios API / pymongo of the requests per second and of the p99 latency;
(4) for each run, the CPU time each process spent per measured request (psutil, over the measured
    window): this one (the client threads), SecantusDB, the API (with its uvicorn workers), redis-server.

The API runs with COMMON_LOG_LEVEL=WARNING: its access log (one INFO line per request on stderr) is off,
and API_METRICS_PORT=0 (no metrics server; the request metrics are still counted). The clients, the API
and the database share the machine's cores: the numbers are what this machine does end to end, not what
a server does alone. Timings are never asserted; a wrong answer (not 200, or another body) makes it exit
with status 1, after its report. It prints two tables and writes bench/results/api.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from rich.console import Console
from rich.table import Table

from bench.harness import bench_servers, percentile

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
DATASET, CONFIG, SPLIT = "bench/first-rows", "default", "train"
KIND = "split-first-rows"
ROWS = 100
STARTUP_TIMEOUT_SECONDS = 60.0
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]


def first_rows_content() -> dict[str, Any]:
    """What split-first-rows returns for a split of 4 columns with more than 100 rows."""
    from datasets import Features, Value

    from common.tables import features

    rng = random.Random(0)
    columns = Features(
        {"id": Value("int64"), "text": Value("string"), "score": Value("float64"), "flag": Value("bool")}
    )
    rows = []
    for index in range(ROWS):
        text = ""
        while len(text) < 100:
            text += rng.choice(WORDS) + " "
        row = {"id": index, "text": text[:100].strip(), "score": rng.gauss(0, 1), "flag": index % 3 == 0}
        rows.append({"row_idx": index, "row": row, "truncated_cells": []})
    return {
        "dataset": DATASET,
        "config": CONFIG,
        "split": SPLIT,
        "features": features(columns),
        "rows": rows,
        "truncated": True,
    }


def write_entry() -> dict[str, Any]:
    """The entry written as a worker would write it; its content as the API reads it back."""
    from common import cache

    cache.upsert_response(
        KIND,
        DATASET,
        first_rows_content(),
        config=CONFIG,
        split=SPLIT,
        dataset_git_revision="0" * 40,
        duration=0.5,
        fence=1,
    )
    return cache.get_response(KIND, DATASET, CONFIG, SPLIT).content


def cpu_seconds(pid: int, children: bool) -> float:
    """User and system CPU time of a process, and of its children (uvicorn's workers) with `children`."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *(process.children(recursive=True) if children else [])]:
        with suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def hammer(
    make_call: Callable[[], Callable[[], bool]],
    threads: int,
    warmup: float,
    seconds: float,
    processes: dict[str, tuple[int, bool]],
) -> dict[str, Any]:
    """`threads` threads, each calling its own `make_call()` in a loop for `warmup` + `seconds`; the calls
    that started after the warm-up and ended within the window are measured. A call returns whether its
    answer was right (an exception counts as a wrong answer): every call is checked, the warm-up's too.
    The CPU time the `processes` spent within the window (name: PID and whether its children count) is
    given per measured request."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    calls = [0] * threads
    wrong = [0] * threads
    errors: list[str] = []
    ready = threading.Barrier(threads + 1)
    window: dict[str, float] = {}

    def run(index: int) -> None:
        call = make_call()
        ready.wait()
        start, end = window["start"], window["end"]
        measured = latencies[index]
        while True:
            began = time.perf_counter()
            if began >= end:
                return
            try:
                right = call()
            except Exception as error:  # counted, and the loop goes on
                right = False
                if len(errors) < 5:
                    errors.append(repr(error))
            ended = time.perf_counter()
            calls[index] += 1
            wrong[index] += not right
            if began >= start and ended <= end:
                measured.append(ended - began)

    workers = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(threads)]
    for worker in workers:
        worker.start()
    now = time.perf_counter()
    window["start"], window["end"] = now + warmup, now + warmup + seconds
    ready.wait()
    time.sleep(max(0.0, window["start"] - time.perf_counter()))
    before = {name: cpu_seconds(*process) for name, process in processes.items()}
    time.sleep(max(0.0, window["end"] - time.perf_counter()))
    spent = {name: cpu_seconds(*process) - before[name] for name, process in processes.items()}
    for worker in workers:
        worker.join()
    every = [latency * 1000 for measured in latencies for latency in measured]
    return {
        "requests": len(every),
        "rps": len(every) / seconds,
        "p50_ms": percentile(every, 0.5),
        "p99_ms": percentile(every, 0.99),
        "max_ms": max(every, default=float("nan")),
        "calls_checked": sum(calls),
        "wrong_answers": sum(wrong),
        "errors": errors,
        "cpu_ms_per_request": {name: 1000 * cpu / max(1, len(every)) for name, cpu in spent.items()},
        "cpu_cores_busy": {name: cpu / seconds for name, cpu in spent.items()},
    }


def baseline(
    threads: int, warmup: float, seconds: float, content: dict[str, Any], processes: dict[str, tuple[int, bool]]
) -> dict[str, Any]:
    """pymongo's find_one of the entry, as common.cache.get_response asks it, on the shared client."""
    from common.cache import cache_collection

    collection = cache_collection()  # the API's own client settings (common.mongo)
    key = {"kind": KIND, "dataset": DATASET, "config": CONFIG, "split": SPLIT}

    def make_call() -> Callable[[], bool]:
        def call() -> bool:
            return collection.find_one(key, projection={"_id": False}) is not None

        return call

    document = collection.find_one(key, projection={"_id": False})
    assert document is not None and document["content"] == content
    return hammer(make_call, threads, warmup, seconds, processes)


def get(port: int, target: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@contextmanager
def api_process(env: dict[str, str], log: Path, workers: int) -> Iterator[tuple[int, int]]:
    """`python -m tasks api` on a free port (tasks.run.api starts and stops it), once it answers
    /healthcheck: its port and PID. uvicorn workers it would leave behind are killed by PID."""
    import psutil

    from tasks import run
    from tasks.embedded import free_port

    port = free_port()
    left: list[psutil.Process] = []
    with run.api(env, port, log, workers) as process:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while get_status(port) != 200:
            if process.poll() is not None:
                raise RuntimeError(f"the API exited with {process.returncode}: see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not answer /healthcheck within {STARTUP_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.1)
        try:
            yield port, process.pid
        finally:
            with suppress(psutil.NoSuchProcess):
                left = psutil.Process(process.pid).children(recursive=True)
    for child in left:
        with suppress(psutil.NoSuchProcess):
            child.kill()


def get_status(port: int) -> int | None:
    """The status of GET /healthcheck, or None while nothing answers."""
    try:
        return get(port, "/healthcheck")[0]
    except OSError:
        return None


def through_api(
    env: dict[str, str],
    log: Path,
    workers: int,
    threads: int,
    warmup: float,
    seconds: float,
    content: dict[str, Any],
    processes: dict[str, tuple[int, bool]],
) -> dict[str, Any]:
    """The cached first rows through the API, each thread on its own keep-alive connection."""
    target = "/first-rows?" + urlencode({"dataset": DATASET, "config": CONFIG, "split": SPLIT})
    with api_process(env, log, workers) as (port, pid):
        status, expected = get(port, target)
        if status != 200 or json.loads(expected) != content:
            raise AssertionError(f"GET {target} answered {status}: {expected[:300]!r}")

        def make_call() -> Callable[[], bool]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

            def call() -> bool:
                try:
                    connection.request("GET", target)
                    response = connection.getresponse()
                    body = response.read()
                except (http.client.HTTPException, OSError):
                    connection.close()  # the next request opens a new connection
                    raise
                return response.status == 200 and body == expected

            return call

        measured = hammer(make_call, threads, warmup, seconds, {**processes, "api": (pid, True)})
        measured["body_bytes"] = len(expected)
        measured["log_tail"] = log.read_text(errors="replace").splitlines()[-5:]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="API_WORKERS of each API run")
    args = parser.parse_args()
    console = Console()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stepcache-bench-api-") as scratch_name:
        scratch = Path(scratch_name)
        mirror = scratch / "mirror"
        (mirror / DATASET).mkdir(parents=True)  # public: no .gated nor .private in it
        (scratch / "metrics").mkdir()
        extra = {
            "COMMON_HF_ENDPOINT": mirror.as_uri(),
            "COMMON_HF_CACHE_DIRECTORY": str(scratch / "hf-cache"),
            "API_METRICS_PORT": "0",
            "API_ASSETS_SIGNING_KEY": "bench-assets-signing-key",  # API_WORKERS > 1 must share one
        }
        with bench_servers(**extra) as servers:
            content = write_entry()
            env = {
                **os.environ,
                **servers.env,
                "COMMON_LOG_LEVEL": "WARNING",
                "PROMETHEUS_MULTIPROC_DIR": str(scratch / "metrics"),  # removed with the scratch directory
            }
            results: dict[str, Any] = {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "mongo": "SecantusDB" if servers.embedded_mongo else servers.mongo_url,
                    "load_average_at_start": os.getloadavg(),  # other load on the machine skews everything
                },
                "settings": {
                    "threads": args.threads,
                    "warmup_s": args.warmup,
                    "seconds": args.seconds,
                    "rows": ROWS,
                    "content_bytes": len(json.dumps(content, separators=(",", ":"))),
                },
            }
            # this process (not its children: the servers and the API): the client threads, pymongo's decoding
            processes = {"client": (os.getpid(), False)}
            for server in servers.servers:
                processes[{"SecantusDB": "mongo"}.get(server.name, server.name)] = (server.process.pid, False)
            with console.status(f"pymongo find_one, {args.threads} threads"):
                results["pymongo"] = baseline(args.threads, args.warmup, args.seconds, content, processes)
            for workers in args.workers:
                name = f"api_workers_{workers}"
                with console.status(f"GET /first-rows, API_WORKERS={workers}, {args.threads} threads"):
                    log = scratch / f"{name}.log"
                    measured = through_api(
                        env, log, workers, args.threads, args.warmup, args.seconds, content, processes
                    )
                    results[name] = measured
                results[name]["rps_ratio"] = results[name]["rps"] / results["pymongo"]["rps"]
                results[name]["p99_ratio"] = results[name]["p99_ms"] / results["pymongo"]["p99_ms"]
    results["run_seconds"] = round(time.monotonic() - began, 1)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    report(results, console)
    if any(
        value["wrong_answers"] for value in results.values() if isinstance(value, dict) and "wrong_answers" in value
    ):
        sys.exit(1)


def report(results: dict[str, Any], console: Console) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "api.json").write_text(json.dumps(results, indent=2) + "\n")
    settings = results["settings"]
    table = Table(
        title=f"cached first rows ({settings['rows']} rows, {settings['content_bytes']} bytes of JSON), "
        f"{settings['threads']} client threads, {settings['seconds']:.0f} s, {results['machine']['cpus']} CPUs "
        "(API xN: API_WORKERS=N)"
    )
    for column in ("reader", "req/s", "p50 ms", "p99 ms", "max ms", "wrong", "req/s ratio", "p99 ratio"):
        table.add_column(column, justify="left" if column == "reader" else "right")
    runs = [("pymongo", "pymongo")]
    runs += [(f"API x{key.rsplit('_', 1)[1]}", key) for key in results if key.startswith("api_workers_")]
    for label, key in runs:
        measured = results[key]
        table.add_row(
            label,
            f"{measured['rps']:.0f}",
            f"{measured['p50_ms']:.2f}",
            f"{measured['p99_ms']:.2f}",
            f"{measured['max_ms']:.1f}",
            f"[red]{measured['wrong_answers']}[/red]" if measured["wrong_answers"] else "0",
            f"{measured['rps_ratio']:.2f}x" if "rps_ratio" in measured else "1",
            f"{measured['p99_ratio']:.2f}x" if "p99_ratio" in measured else "1",
        )
    console.print(table)
    names = sorted({name for _, key in runs for name in results[key]["cpu_ms_per_request"]})
    cpu = Table(title="CPU time per measured request (ms), and cores kept busy, by process")
    for column in ("reader", *names):
        cpu.add_column(column, justify="left" if column == "reader" else "right")
    for label, key in runs:
        per_request, busy = results[key]["cpu_ms_per_request"], results[key]["cpu_cores_busy"]
        cpu.add_row(label, *(f"{per_request[name]:.2f} ({busy[name]:.2f})" if name in busy else "-" for name in names))
    console.print(cpu)
    for label, key in runs:
        if results[key]["errors"]:
            console.print(f"[red]{label}: {results[key]['errors']}[/red]")
    loads = results["machine"]["load_average_at_start"][0], results["machine"]["load_average_at_end"][0]
    console.print(f"load average (1 min) at start / end: {loads[0]:.2f} / {loads[1]:.2f}")
    console.print(f"the whole run: {results['run_seconds']} s; written to {RESULTS / 'api.json'}")


if __name__ == "__main__":
    main()

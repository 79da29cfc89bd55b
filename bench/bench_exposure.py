"""What an anonymous client can cost the API: `/healthcheck` while the bounds are all taken.

    python -m bench.bench_exposure [--requests 300] [--seconds 15] [--slow 50] [--other-events 20000]

It starts its own redis-server and SecantusDB (unless BENCH_REDIS_URL / BENCH_MONGO_URL are set), enqueues a
job that waits (no worker runs), publishes --other-events events of other jobs on the event stream (what a
replay used to read), and starts `python -m tasks api` (loopback only). Then:

(1) the baseline: --requests sequential `GET /healthcheck` on one keep-alive connection, spread evenly
    over --seconds, nothing else open;
(2) the load: --slow connections from one client that send their headers one byte every half second
    (reconnecting when the API closes them at API_HEADER_TIMEOUT_SECONDS), and API_EVENTS_MAX_STREAMS
    event streams of the waiting job (API_EVENTS_MAX_STREAMS_PER_CLIENT from each of several 127.0.0.x
    addresses), each a replay from the job's first event; one more stream is checked to be refused (429);
(3) the same --requests `GET /healthcheck` under that load: p50, p99 and max, the ratio to the
    baseline, and the API process's CPU over the window.

Timings are never asserted; it prints a table and writes bench/results/exposure.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.bench_api import api_process, cpu_seconds
from bench.harness import bench_servers, percentile

RESULTS = Path(__file__).resolve().parent / "results"
DATASET = "bench/waiting"
DRIP_SECONDS = 0.5


def healthcheck_latencies(port: int, requests: int, seconds: float) -> list[float]:
    """Milliseconds of each of `requests` sequential GET /healthcheck on one keep-alive connection, one
    every seconds / requests."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: list[float] = []
    began = time.perf_counter()
    try:
        for index in range(requests):
            time.sleep(max(0.0, began + index * seconds / requests - time.perf_counter()))
            started = time.perf_counter()
            connection.request("GET", "/healthcheck")
            response = connection.getresponse()
            response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"/healthcheck answered {response.status}")
    finally:
        connection.close()
    return latencies


@contextmanager
def dripping(port: int, count: int) -> Iterator[dict[str, int]]:
    """`count` connections sending their headers a byte at a time, reopened when the API closes them."""
    stop, counts = threading.Event(), {"closed_by_api": 0}

    def connect() -> socket.socket:  # from one client, not the measuring one: under the per-client cap
        connection = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        connection.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
        return connection

    connections = [connect() for _ in range(count)]

    def drip() -> None:
        while not stop.wait(DRIP_SECONDS):
            for index, connection in enumerate(connections):
                try:
                    connection.sendall(b"x")
                except OSError:
                    counts["closed_by_api"] += 1
                    connection.close()
                    connections[index] = connect()

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join()
        for connection in connections:
            connection.close()


def open_stream(port: int, job_id: str, address: str) -> tuple[int, http.client.HTTPConnection]:
    """An event stream of the job replayed from its first event, from `address`: its status and connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(address, 0))
    connection.request("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "0-0"})
    response = connection.getresponse()
    if response.status != 200:
        response.read()
    return response.status, connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="GET /healthcheck measured, per phase")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each phase lasts")
    parser.add_argument("--slow", type=int, default=50, help="slow-header connections")
    parser.add_argument("--other-events", type=int, default=20_000, help="other jobs' events on the stream")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="stepcache-bench-exposure-") as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "mirror" / DATASET).mkdir(parents=True)
        samples_file = scratch / "mirror" / DATASET / "train.csv"
        samples_file.write_text("id,text\n1,a\n")
        extra = {
            "COMMON_HF_ENDPOINT": (scratch / "mirror").as_uri(),
            "COMMON_HF_CACHE_DIRECTORY": str(scratch / "hf-cache"),
            "API_METRICS_PORT": "0",
        }
        with bench_servers(**extra) as servers:
            from common.config import get_config
            from common.event_bus import EventBus
            from common.events import JobQueued
            from common.redis_connection import get_redis
            from tasks import steps

            settings = get_config().api
            job_id = steps.dataset_config_names.delay(DATASET).id  # no worker: it waits
            bus = EventBus(get_redis(get_config().queue.redis_url))
            other = JobQueued(job_id="other", step="x", dataset="bench/other", namespace="bench")
            for start in range(0, args.other_events, 1_000):
                bus.publish_many([other] * min(1_000, args.other_events - start))
            env = {**os.environ, **servers.env, "COMMON_LOG_LEVEL": "WARNING"}
            with api_process(env, scratch / "api.log", 1) as (port, pid):
                baseline = healthcheck_latencies(port, args.requests, args.seconds)
                per_client = settings.events_max_streams_per_client
                addresses = [f"127.0.0.{10 + i}" for i in range(-(-settings.events_max_streams // per_client))]
                with ExitStack() as open_streams, dripping(port, args.slow) as drips:
                    streams = []
                    for index in range(settings.events_max_streams):
                        status, connection = open_stream(port, job_id, addresses[index // per_client])
                        open_streams.callback(connection.close)
                        streams.append(status)
                    refused, connection = open_stream(port, job_id, "127.0.0.250")
                    connection.close()
                    time.sleep(1.0)  # the streams replay and settle into polling
                    cpu_before, began = cpu_seconds(pid, children=False), time.monotonic()
                    loaded = healthcheck_latencies(port, args.requests, args.seconds)
                    window = time.monotonic() - began
                    cpu_busy = (cpu_seconds(pid, children=False) - cpu_before) / window
                    closed = drips["closed_by_api"]
    results: dict[str, Any] = {
        "settings": {
            "requests": args.requests,
            "seconds": args.seconds,
            "slow_connections": args.slow,
            "other_events": args.other_events,
            "events_max_streams": settings.events_max_streams,
            "events_max_streams_per_client": settings.events_max_streams_per_client,
            "header_timeout_seconds": settings.header_timeout_seconds,
        },
        "streams_open": sum(status == 200 for status in streams),
        "stream_past_the_cap": refused,
        "slow_connections_closed_by_api": closed,
        "baseline": summary(baseline),
        "under_load": summary(loaded),
        "api_cpu_cores_busy_under_load": round(cpu_busy, 3),
    }
    results["p99_ratio"] = round(results["under_load"]["p99_ms"] / results["baseline"]["p99_ms"], 2)
    report(results, console)


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
    }


def report(results: dict[str, Any], console: Console) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exposure.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title="GET /healthcheck, alone and with every bound taken")
    for column in ("phase", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    for phase in ("baseline", "under_load"):
        numbers = results[phase]
        table.add_row(phase, *(f"{numbers[key]:.1f}" for key in ("p50_ms", "p99_ms", "max_ms")))
    console.print(table)
    settings = results["settings"]
    console.print(
        f"{results['streams_open']} event streams open (cap {settings['events_max_streams']}), one more: "
        f"{results['stream_past_the_cap']}; {settings['slow_connections']} slow-header connections "
        f"({results['slow_connections_closed_by_api']} closed by the API meanwhile); "
        f"{settings['other_events']} other events on the stream; API CPU under load "
        f"{results['api_cpu_cores_busy_under_load']:.2f} cores; p99 ratio {results['p99_ratio']:.2f}x"
    )
    with suppress(OSError):
        console.print(f"saved {RESULTS / 'exposure.json'}")


if __name__ == "__main__":
    main()

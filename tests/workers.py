"""Real `celery -A tasks worker` subprocesses for end-to-end and fault tests, with the sample steps."""

from __future__ import annotations

from pathlib import Path

from tasks.embedded import WorkerProcess


def sample_worker(name: str, env: dict[str, str], log_dir: Path, concurrency: int = 4) -> WorkerProcess:
    return WorkerProcess(name, env, log_dir / f"worker-{name}.log", concurrency, include=["tests.sample_steps"])

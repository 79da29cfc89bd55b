"""Records when a job's step function actually runs, for the chaos test (`celery -A tasks worker -I
tests.chaos_recorder`, with CHAOS_RECORD_DIR set).

It wraps `StepTask._compute`, which a worker calls only once the job's lease is confirmed, and appends
`start|end <job_id> <namespace> <pid> <time.time()>` to `<CHAOS_RECORD_DIR>/<pid>.log`, one write per
line. Files, not Redis: the chaos test restarts Redis. A SIGKILLed attempt leaves a start and no end.
CHAOS_STEP_SECONDS (optional) makes every run last that much longer, inside the recorded interval, so
faults land while jobs run. CHAOS_APPLY_SECONDS (optional) makes applying an end (its cache, children and
events) last that much longer, after an `applying` line, so that a fault can kill a process inside it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_DIR_VARIABLE = "CHAOS_RECORD_DIR"
STEP_SECONDS_VARIABLE = "CHAOS_STEP_SECONDS"
APPLY_SECONDS_VARIABLE = "CHAOS_APPLY_SECONDS"


@dataclass
class Run:
    """One attempt of a job's step function in one process; `end` is None when it never ended."""

    job_id: str
    namespace: str
    pid: int
    start: float
    end: float | None = None


def _append(directory: str, event: str, job_id: str, namespace: str) -> None:
    pid = os.getpid()
    line = f"{event} {job_id} {namespace} {pid} {time.time()!r}\n".encode()
    fd = os.open(os.path.join(directory, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def install() -> None:
    """Wrap StepTask._compute (in every process that imports this module with CHAOS_RECORD_DIR set)."""
    directory = os.environ.get(RECORD_DIR_VARIABLE)
    if not directory:
        return
    from common.names import namespace_of
    from tasks.step_task import StepJob, StepTask

    original = StepTask._compute
    if getattr(original, "chaos_recorded", False):
        return
    delay = float(os.environ.get(STEP_SECONDS_VARIABLE, "0"))

    def recorded(self: StepTask, job: StepJob) -> Mapping[str, Any]:
        if job.job_id is None:  # called directly, outside the queue
            return original(self, job)
        namespace = namespace_of(job.dataset)
        _append(directory, "start", job.job_id, namespace)
        try:
            if delay:
                time.sleep(delay)
            return original(self, job)
        finally:
            _append(directory, "end", job.job_id, namespace)

    recorded.chaos_recorded = True  # type: ignore[attr-defined]
    StepTask._compute = recorded  # type: ignore[method-assign]
    _pause_applies(directory, float(os.environ.get(APPLY_SECONDS_VARIABLE, "0")))


def _pause_applies(directory: str, seconds: float) -> None:
    """Applying an end (Lifecycle._apply_end) says so, then waits `seconds` before it does anything."""
    if not seconds:
        return
    from common.lifecycle import Lifecycle

    original = Lifecycle._apply_end

    def paused(self: Lifecycle, record: Any, outcome: Any) -> Any:
        _append(directory, "applying", record.payload.job_id, record.payload.namespace)
        time.sleep(seconds)
        return original(self, record, outcome)

    Lifecycle._apply_end = paused  # type: ignore[method-assign]


def applying(directory: Path, within: float) -> list[int]:
    """The pids that said they began applying an end less than `within` seconds ago (still inside it)."""
    now, pids = time.time(), []
    for path in sorted(directory.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        parts = lines[-1].split() if lines else []
        if len(parts) == 5 and parts[0] == "applying" and now - float(parts[4]) < within:
            pids.append(int(parts[3]))
    return pids


def read_runs(directory: Path) -> list[Run]:
    """Every recorded run, oldest start first. In one process's file a start is closed by the next end
    of the same job; a start followed by anything else (the process was killed, its pid reused) is open.
    A line cut short by a kill is skipped."""
    runs: list[Run] = []
    for path in sorted(directory.glob("*.log")):
        open_run: Run | None = None
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) != 5 or parts[0] not in ("start", "end"):
                continue
            event, job_id, namespace, pid, at = parts
            try:
                moment = float(at)
            except ValueError:
                continue
            if event == "start":
                if open_run is not None:
                    runs.append(open_run)
                open_run = Run(job_id, namespace, int(pid), moment)
            elif open_run is not None and open_run.job_id == job_id:
                open_run.end = moment
                runs.append(open_run)
                open_run = None
        if open_run is not None:
            runs.append(open_run)
    return sorted(runs, key=lambda run: run.start)


install()

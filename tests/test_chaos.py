"""Chaos: ~300 jobs of 10 namespaces through real `celery -A tasks worker` processes while faults hit
them, then the promises, checked from the ledger, the cache, Redis and what the workers recorded.

The test runs its own redis-server (restarted once empty, and once from a snapshot it saved earlier in the
run, on the same port) and its own SecantusDB (SIGSTOPped for longer than a lease), not the session's
servers. Workers reach Redis through a TCP proxy whose connections the test cuts; MongoDB directly.
Faults: SIGKILL of pool processes (the busy ones first), SIGKILL of a pool process inside an end's apply,
SIGKILL of whole workers (each replaced), Mongo paused, Redis restarted empty, Redis restarted from a
snapshot taken mid-run, proxy connections cut, a dataset deleted (as the webhook does) while its jobs run.
Every fault is counted and every invariant printed with its numbers (`pytest -s`).

`.venv/bin/pytest tests/test_chaos.py -m slow -s`; CHAOS_SEED=N replays a fault schedule.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from common import cache, mongo, redis_connection
from common.cache import cache_collection
from common.orchestrator import expected_entries
from common.processing_graph import DEFAULT_STEPS, LEVEL, get_processing_graph
from common.queue import Job, JobStatus
from common.queue.ledger import Ledger, jobs_collection
from common.queue.limiter import Policy
from tasks import samples
from tasks.embedded import EmbeddedServer, WorkerProcess, free_port, start_mongo, start_redis
from tasks.queue import get_queue
from tests.chaos_recorder import (
    APPLY_SECONDS_VARIABLE,
    RECORD_DIR_VARIABLE,
    STEP_SECONDS_VARIABLE,
    Run,
    applying,
    read_runs,
)
from tests.conftest import current_app_for, use_settings
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

LIMIT = 2
# Borrowing idle capacity (common/queue/borrowing.py) is on for every other namespace, up to this ceiling;
# the others keep the hard cap: both modes under the same faults, in one run.
CEILING = 4
NAMESPACES = 6  # with the graph's 24 steps: about 420 jobs, faults landing on running ones throughout
WORKERS = 3
CONCURRENCY = 2
STEP_SECONDS = 0.5  # added to every step, inside its recorded run, so that faults land on running jobs
FAULT_SECONDS = 60.0  # the faults stop after this, after the planned ones, or when every job ended
FAULT_GAP_SECONDS = (0.8, 2.0)
MONGO_PAUSE_SECONDS = 4.0  # > the lease TTL: 0.5 s heartbeat x (3 missing + 1) = 2 s
SETTLE_SECONDS = 90.0  # after the faults: every job must be terminal by then
QUIET_SECONDS = 2.0  # all terminal for this long: no child left to enqueue
STALL_SECONDS = 30.0  # > WORKER_QUEUED_LEASE_SECONDS + a lease TTL: a stuck run does not wait for the deadline
# README "After Redis lost its data": nothing to do, the reaper rebuilds Redis from the ledger. CHAOS_RECONCILE=1
# also calls get_queue().reconcile() right after the restart, as an operator would with older code.
RECONCILE_AFTER_REDIS_RESTART = os.environ.get("CHAOS_RECONCILE", "0") == "1"
PLANNED_FAULTS = ["pool"] * 8 + ["apply"] * 3 + ["worker"] * 2 + ["mongo"] * 2 + ["cut"] * 4 + ["redis", "delete"]
APPLY_SECONDS = 0.3  # an end's apply lasts that much longer: the "apply" fault kills a process inside it
DEFAULT_KINDS = frozenset(step.name for step in DEFAULT_STEPS)
TERMINAL = frozenset({JobStatus.SUCCESS, JobStatus.ERROR, JobStatus.CANCELLED})
SHOWN = 15  # offenders printed per invariant

_clock = {"began": time.monotonic()}  # the test resets it when it begins


def log(message: str) -> None:
    print(f"[chaos {time.monotonic() - _clock['began']:6.1f}s] {message}", flush=True)


# --- processes ---------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc (no dependency, Linux only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(parent) == pid and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def is_dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in ("Z", "X")


def signal_tree(pid: int, signum: int) -> None:
    for child in children_of(pid):
        signal_tree(child, signum)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


class ChaosWorker(WorkerProcess):
    def answers_ping(self) -> bool:
        try:
            return super().answers_ping()
        except Exception:
            return False  # a pooled connection the proxy cut, Redis restarting: ask again


class Fleet:
    """The workers of the test, and when the test SIGKILLed which pid (the end of a killed run)."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self.killed_at: dict[int, list[float]] = defaultdict(list)
        self._names = 0
        self._lock = threading.Lock()

    def _new(self) -> WorkerProcess:
        with self._lock:
            self._names += 1
            name = f"chaos{self._names}"
        return ChaosWorker(
            name, self.env, self.log_dir / f"worker-{name}.log", CONCURRENCY, include=["tests.chaos_recorder"]
        )

    def start(self, count: int) -> None:
        fresh = [self._new() for _ in range(count)]
        with ThreadPoolExecutor(count) as pool:
            started = list(pool.map(_start_or_none, fresh))
        self.workers += [worker for worker in started if worker is not None]
        assert len(started) == count and all(started), "a worker did not start: see the worker logs"

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process is not None and w.process.poll() is None]

    def pool_pids(self) -> list[int]:
        return [pid for worker in self.live() for pid in children_of(worker.process.pid)]  # type: ignore[union-attr]

    def kill_pid(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while not is_dead(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.killed_at[pid].append(time.time())

    def kill_worker(self, worker: WorkerProcess) -> None:
        assert worker.process is not None
        pids = [worker.process.pid, *children_of(worker.process.pid)]
        worker.kill()  # SIGKILL to the process group, and wait for the main process
        deadline = time.monotonic() + 2
        while not all(is_dead(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        now = time.time()
        for pid in pids:
            self.killed_at[pid].append(now)

    def stop_all(self) -> None:
        """Warm shutdown of every worker at once (each SIGKILLed after 20 s)."""
        for worker in self.live():
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()  # type: ignore[union-attr]
        for worker in self.workers:
            worker.stop()


def _start_or_none(worker: WorkerProcess) -> WorkerProcess | None:
    try:
        return worker.start()
    except Exception as error:
        worker.stop()  # started but never answered: not left behind
        log(f"worker {worker.name} did not start: {error}")
        return None


@dataclass
class Servers:
    """The test's own redis-server (restartable on its port) and SecantusDB (pausable)."""

    redis_port: int
    redis: EmbeddedServer
    mongo: EmbeddedServer

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def restart_redis(self, from_snapshot: bool = False) -> None:
        """SIGKILL, then start again on the same port: empty, or from the snapshot saved in its working
        directory (Redis' default persistence, `save`)."""
        snapshot = Path.cwd() / "dump.rdb"
        self.redis.process.kill()
        self.redis.process.wait()
        if not from_snapshot:
            snapshot.unlink(missing_ok=True)
        self.redis = start_redis(port=self.redis_port)

    def save_snapshot(self) -> None:
        with redis.Redis(port=self.redis_port) as client:
            client.save()

    def resume_mongo(self) -> None:
        signal_tree(self.mongo.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume_mongo()  # a stopped process does not act on SIGTERM
        self.mongo.stop()
        self.redis.stop()


def write_mirror(root: Path) -> list[str]:
    """NAMESPACES namespaces; each has a CSV and a JSON Lines dataset (2 splits: 29 jobs each), every other
    one a Parquet dataset too (1 split: 24 jobs): 420 jobs along the default graph for 6 namespaces."""
    datasets = []
    for index in range(NAMESPACES):
        namespace = f"chaos{index}"
        datasets.append(samples.csv_dataset(root, f"{namespace}/csv"))
        datasets.append(samples.jsonl_dataset(root, f"{namespace}/jsonl"))
        if index % 2 == 0:
            datasets.append(samples.parquet_dataset(root, f"{namespace}/parquet"))
    return datasets


# --- faults --------------------------------------------------------------------------------------------


class Faults:
    """A thread that injects the planned faults, in a seeded random order, a second or few apart."""

    def __init__(self, fleet: Fleet, servers: Servers, proxy: TcpProxy, record_dir: Path, seed: int) -> None:
        self.fleet = fleet
        self.servers = servers
        self.proxy = proxy
        self.record_dir = record_dir
        self.random = random.Random(seed)
        self.plan = [kind for kind in PLANNED_FAULTS if kind not in ("redis", "delete")]
        self.random.shuffle(self.plan)
        # Redis restarts in the first half, while jobs run, not after the work is done: first from the
        # snapshot saved at the start (a rollback), later empty; a dataset is deleted while its jobs run.
        first_half = len(self.plan) // 2
        self.plan.insert(self.random.randrange(1, first_half), "rollback")
        self.plan.insert(self.random.randrange(first_half, len(self.plan)), "redis")
        self.plan.insert(self.random.randrange(1, first_half), "delete")
        self.deleted: list[str] = []
        self.skipped: list[str] = []
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.servers.resume_mongo()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        deadline = time.monotonic() + FAULT_SECONDS
        actions: dict[str, Callable[[], None]] = {
            "pool": self.kill_pool_process,
            "worker": self.kill_worker,
            "mongo": self.pause_mongo,
            "cut": self.cut_connections,
            "redis": self.restart_redis,
            "rollback": self.restart_redis_from_snapshot,
            "apply": self.kill_inside_apply,
            "delete": self.delete_dataset,
        }
        self.servers.save_snapshot()  # mid-run: the jobs admitted so far, some of them started
        for index, kind in enumerate(self.plan):
            if self._stop.wait(self.random.uniform(*FAULT_GAP_SECONDS)) or time.monotonic() > deadline:
                self.skipped = self.plan[index:]
                break
            if not Ledger().unfinished():
                self.skipped = self.plan[index:]
                log(f"every job ended before the faults did: {len(self.skipped)} planned faults skipped")
                break
            try:
                actions[kind]()
            except Exception as error:
                self.errors.append(f"{kind}: {type(error).__name__}: {error}")
                log(f"fault {kind} failed: {type(error).__name__}: {error}")

    def kill_pool_process(self) -> None:
        pids = self.fleet.pool_pids()
        busy = {run.pid for run in read_runs(self.record_dir) if run.end is None} & set(pids)
        if not pids:
            return
        pid = self.random.choice(sorted(busy or pids))
        self.fleet.kill_pid(pid)
        self.counts["pool process SIGKILLed" + (" (busy)" if busy else " (idle)")] += 1
        log(f"fault: SIGKILL pool process {pid}{' (running a job)' if busy else ''}")

    def kill_worker(self) -> None:
        live = self.fleet.live()
        if not live:
            return
        victim = self.random.choice(live)
        self.fleet.kill_worker(victim)
        self.counts["worker SIGKILLed and replaced"] += 1
        log(f"fault: SIGKILL worker {victim.name} (whole process group); starting a replacement")
        self.fleet.start(1)

    def pause_mongo(self) -> None:
        signal_tree(self.servers.mongo.process.pid, signal.SIGSTOP)
        log(f"fault: SIGSTOP SecantusDB for {MONGO_PAUSE_SECONDS}s")
        try:
            self._stop.wait(MONGO_PAUSE_SECONDS)
        finally:
            self.servers.resume_mongo()
        self.counts["mongo SIGSTOPped"] += 1

    def cut_connections(self) -> None:
        cut = self.proxy.cut()
        self.counts["proxy cuts"] += 1
        self.counts["connections cut"] += cut
        log(f"fault: cut {cut} Redis connections")

    def kill_inside_apply(self) -> None:
        deadline = time.monotonic() + 5
        pools = set(self.fleet.pool_pids())
        while time.monotonic() < deadline and not self._stop.is_set():
            inside = [pid for pid in applying(self.record_dir, APPLY_SECONDS * 0.8) if pid in pools]
            if inside:
                self.fleet.kill_pid(inside[0])
                self.counts["pool process SIGKILLed inside an end's apply"] += 1
                log(f"fault: SIGKILL pool process {inside[0]} inside an end's apply")
                return
            time.sleep(0.01)

    def delete_dataset(self) -> None:
        busy = Counter(job.dataset for job in Ledger().unfinished())
        if not busy:
            return
        dataset = busy.most_common(1)[0][0]
        cache.delete_dataset_responses(dataset)  # as the webhook's delete: entries, then jobs
        get_queue().cancel(dataset, revoke_started=True)
        self.deleted.append(dataset)
        self.counts["dataset deleted while its jobs ran"] += 1
        log(f"fault: {dataset} deleted (entries removed, jobs cancelled)")

    def restart_redis_from_snapshot(self) -> None:
        self.servers.restart_redis(from_snapshot=True)
        self.counts["redis restarted from a snapshot taken mid-run"] += 1
        log("fault: redis-server SIGKILLed and restarted from its snapshot (a rollback)")

    def restart_redis(self) -> None:
        self.servers.restart_redis()
        self.counts["redis restarted empty"] += 1
        log("fault: redis-server restarted without persistence")
        if RECONCILE_AFTER_REDIS_RESTART:
            restored = get_queue().reconcile()
            log(f"reconcile() after the restart restored {restored} jobs")


# --- invariants ----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    name: str
    ok: bool
    summary: str
    offenders: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.summary}"]
        lines += [f"    {offender}" for offender in self.offenders[:SHOWN]]
        if len(self.offenders) > SHOWN:
            lines.append(f"    ... and {len(self.offenders) - SHOWN} more")
        return "\n".join(lines)


def describe(job: Job, began: float) -> str:
    """One line about a job; its times in seconds since the test began."""
    key = "/".join(part for part in (job.config, job.split) if part)
    times = " ".join(
        f"{name}=+{moment.timestamp() - began:.1f}s"
        for name, moment in (("created", job.created_at), ("queued", job.queued_at), ("started", job.started_at))
        if moment is not None
    )
    return (
        f"{job.job_id} {job.step} {job.dataset} {key} status={job.status} attempts={job.attempts} "
        f"worker={job.worker} {times}"
    )


def wait_until_terminal(ledger: Ledger, timeout: float) -> tuple[list[Job], str]:
    """The ledger's jobs once every one is terminal (and stayed so QUIET_SECONDS), at the deadline, or once
    nothing in the ledger moved (status, attempt, heartbeat) for STALL_SECONDS; and how the wait ended."""
    start = time.monotonic()
    deadline, quiet_since, last_report = start + timeout, None, 0.0
    state: object = None
    moved_at = start
    while True:
        jobs = ledger.jobs()
        pending = [job for job in jobs if job.status not in TERMINAL]
        now = time.monotonic()
        if not pending:
            quiet_since = quiet_since or now
            if now - quiet_since >= QUIET_SECONDS:
                return jobs, f"all terminal after {now - start:.0f}s"
        else:
            quiet_since = None
        fingerprint = {(job.job_id, job.status, job.attempts, job.last_heartbeat) for job in jobs}
        if fingerprint != state:
            state, moved_at = fingerprint, now
        if now > deadline:
            return jobs, f"deadline: waited {timeout:.0f}s"
        if now - moved_at > STALL_SECONDS:
            return jobs, f"stalled: nothing in the ledger moved for {STALL_SECONDS:.0f}s (waited {now - start:.0f}s)"
        if now - last_report > 5:
            last_report = now
            log(f"settling: {len(jobs)} jobs, not terminal: {dict(Counter(str(j.status) for j in pending))}")
        time.sleep(0.5)


def check_terminal(jobs: list[Job], waited: str, began: float) -> Verdict:
    pending = [job for job in jobs if job.status not in TERMINAL]
    statuses = dict(Counter(str(job.status) for job in jobs))
    return Verdict(
        "every job terminal",
        not pending,
        f"{len(jobs)} jobs {statuses}; {len(pending)} not terminal ({waited})",
        [describe(job, began) for job in pending],
    )


def run_end(run: Run, killed_at: dict[int, list[float]], stopped_at: float) -> tuple[float, str]:
    """When a run stopped executing: its recorded end, the test's SIGKILL of its pid, or the workers' stop."""
    if run.end is not None:
        return run.end, "ended"
    kills = [moment for moment in killed_at.get(run.pid, []) if moment >= run.start]
    if kills:
        return min(kills), "killed"
    return stopped_at, "never ended"


def borrows(namespace: str) -> bool:
    return int(namespace.removeprefix("chaos")) % 2 == 1


def cap_of(namespace: str) -> int:
    return CEILING if borrows(namespace) else LIMIT


def check_limit(runs: list[Run], killed_at: dict[int, list[float]], stopped_at: float) -> Verdict:
    by_namespace: dict[str, list[tuple[float, float, Run]]] = defaultdict(list)
    fates: Counter[str] = Counter()
    for run in runs:
        end, fate = run_end(run, killed_at, stopped_at)
        fates[fate] += 1
        by_namespace[run.namespace].append((run.start, end, run))
    offenders, peaks = [], {}
    for namespace, intervals in sorted(by_namespace.items()):
        # An end at the same instant as a start comes first.
        events = sorted(
            [(s, 1, r) for s, _, r in intervals] + [(e, -1, r) for _, e, r in intervals], key=lambda x: x[:2]
        )
        running: set[int] = set()
        peak = 0
        for moment, delta, run in events:
            if delta < 0:
                running.discard(id(run))
                continue
            running.add(id(run))
            peak = max(peak, len(running))
            if len(running) > cap_of(namespace):
                at_once = [r for _, _, r in intervals if id(r) in running]
                offenders.append(
                    f"{namespace}: {len(running)} at {moment:.3f}: "
                    + ", ".join(
                        f"{r.job_id[:8]}@pid{r.pid}[{r.start:.2f}..{run_end(r, killed_at, stopped_at)[0]:.2f}]"
                        for r in at_once
                    )
                )
        peaks[namespace] = peak
    return Verdict(
        f"never more than {LIMIT} jobs of one namespace executing at once ({CEILING} for one that borrows)",
        not offenders,
        f"{len(runs)} recorded runs {dict(fates)}; peak per namespace {peaks}; {len(offenders)} starts over the limit",
        offenders,
    )


def check_fences(job_documents: list[dict[str, Any]], entry_documents: list[dict[str, Any]]) -> list[Verdict]:
    """Every cache entry was written by an ended job (same `fence` as a terminal job of its dataset), and a
    success entry by a job that succeeded."""
    terminal = [doc for doc in job_documents if doc.get("status") in TERMINAL]
    jobs_without = [doc["_id"] for doc in terminal if "fence" not in doc]
    entries_without = [_entry_key(doc) for doc in entry_documents if "fence" not in doc]
    if jobs_without or entries_without:
        summary = (
            f"no `fence` field in {len(entries_without)}/{len(entry_documents)} cache entries and "
            f"{len(jobs_without)}/{len(terminal)} terminal jobs: the lifecycle does not stamp fences yet"
        )
        offenders = [f"entry without fence: {key}" for key in entries_without[:5]]
        offenders += [f"terminal job without fence: {job_id}" for job_id in jobs_without[:5]]
        return [
            Verdict("every cache entry written by an ended job (fence)", False, summary, offenders),
            Verdict("every success entry written by a job that succeeded (fence)", False, "not checkable: see above"),
        ]
    by_fence: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for doc in terminal:
        by_fence[(doc["dataset"], doc["fence"])].append(doc)
    by_id = {doc["_id"]: doc for doc in terminal}
    orphans, wrong = [], []
    successes = 0
    for entry in entry_documents:
        writers = by_fence.get((entry["dataset"], entry["fence"]), [])
        if entry.get("job_id") is not None:  # the job whose attempt wrote it: it ended, under this fence
            writer = by_id.get(entry["job_id"])
            writers = [writer] if writer is not None and writer["fence"] == entry["fence"] else []
        if not writers:
            orphans.append(f"{_entry_key(entry)} fence={entry['fence']}: no terminal job of its dataset has it")
            continue
        if entry.get("http_status") == 200:
            successes += 1
            same_key = [doc for doc in writers if _job_key(doc) == _entry_key(entry)] or writers
            if not any(doc["status"] == JobStatus.SUCCESS for doc in same_key):
                wrong.append(
                    f"{_entry_key(entry)} fence={entry['fence']}: written by "
                    + ", ".join(f"{doc['_id']} ({doc['status']}, {doc.get('error_code')})" for doc in same_key)
                )
    return [
        Verdict(
            "every cache entry written by an ended job (fence)",
            not orphans,
            f"{len(entry_documents)} entries, {len(orphans)} with a fence no terminal job has",
            orphans,
        ),
        Verdict(
            "every success entry written by a job that succeeded (fence)",
            not wrong,
            f"{successes} success entries, {len(wrong)} whose fence is a job that did not succeed",
            wrong,
        ),
    ]


def _entry_key(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')} {doc.get('dataset')} {doc.get('config')} {doc.get('split')}"


def _job_key(doc: dict[str, Any]) -> str:
    return f"{doc.get('step')} {doc.get('dataset')} {doc.get('config')} {doc.get('split')}"


def check_expected_entries(datasets: list[str], jobs: list[Job]) -> Verdict:
    graph = get_processing_graph()
    missing, expected_total = [], 0
    by_key: dict[tuple[str, str, str | None, str | None], list[Job]] = defaultdict(list)
    for job in jobs:
        by_key[(job.step, job.dataset, job.config, job.split)].append(job)
    for dataset in datasets:
        entries = cache.get_dataset_responses(dataset)
        present = {(e.kind, e.config, e.split) for e in entries}
        expected = [k for k in expected_entries(graph, dataset, entries) if k.kind in DEFAULT_KINDS]
        expected_total += len(expected)
        for k in expected:
            if (k.kind, k.config, k.split) not in present:
                ledger = [f"{job.job_id} {job.status}" for job in by_key[(k.kind, k.dataset, k.config, k.split)]]
                missing.append(f"{k.kind} {k.dataset} {k.config} {k.split}: jobs in the ledger {ledger or 'none'}")
    return Verdict(
        "every entry the graph expects exists",
        not missing,
        f"{expected_total} expected entries over {len(datasets)} datasets, {len(missing)} missing",
        missing,
    )


def check_deleted(deleted: list[str]) -> Verdict:
    left = {dataset: cache_collection().count_documents({"dataset": dataset}) for dataset in deleted}
    offenders = [f"{dataset}: {count} entries" for dataset, count in left.items() if count]
    return Verdict(
        "deleted datasets stay deleted",
        not offenders,
        f"{len(deleted)} datasets deleted while their jobs ran; {len(offenders)} with entries again",
        offenders,
    )


def check_children_once(jobs: list[Job]) -> Verdict:
    """Each child key is enqueued once per ending of its parent. Every parent here ends once (crashes end it
    as an error), so a key of a step that is not a fan-in (whose every parent is as fine or coarser) has one
    job, but cancelled ones; a fan-in step is enqueued by each of its parents' endings, deduped or not."""
    graph = get_processing_graph()
    fan_in = {
        step.name
        for step in graph.steps
        if any(LEVEL[graph.get_step(parent).input_type] > LEVEL[step.input_type] for parent in step.parents)
    }
    by_key: dict[tuple[str, str, str | None, str | None], list[Job]] = defaultdict(list)
    for job in jobs:
        if job.step not in fan_in and job.status != JobStatus.CANCELLED:
            by_key[(job.step, job.dataset, job.config, job.split)].append(job)
    offenders = [
        f"{' '.join(str(part) for part in key)}: {[job.job_id for job in twins]}"
        for key, twins in by_key.items()
        if len(twins) > 1
    ]
    return Verdict(
        "each child enqueued once per ending of its parent",
        not offenders,
        f"{len(by_key)} keys of steps that are not fan-ins, {len(offenders)} with more than one job",
        offenders,
    )


def check_redis_keys(redis_url: str, jobs: list[Job]) -> Verdict:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key.decode() for key in client.scan_iter(match="stepcache:{*", count=1000)]
    finally:
        client.close()
    busy = {job.namespace for job in jobs if job.status not in TERMINAL}
    left: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        namespace = key[key.index("{") + 1 : key.index("}")]
        if ":" in namespace:  # not a namespace's: the process registry's (common/registry.py)
            continue
        if namespace not in busy and not key.endswith((":limit", ":policy")):
            left[namespace].append(key)
    return Verdict(
        "no Redis key left for namespaces without unfinished jobs (but :limit, :policy)",
        not left,
        f"{len(keys)} namespace keys; {sum(map(len, left.values()))} left in {len(left)} idle namespaces "
        f"({len(busy)} namespaces still have unfinished jobs)",
        [f"{namespace}: {sorted(found)}" for namespace, found in sorted(left.items())],
    )


# --- the test --------------------------------------------------------------------------------------------


@pytest.mark.timeout(480)
def test_chaos_keeps_every_promise(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    began, began_wall = time.monotonic(), time.time()
    _clock["began"] = began
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    log(f"seed {seed} (CHAOS_SEED={seed} replays this fault order)")
    record_dir = tmp_path / "runs"
    record_dir.mkdir()
    root = tmp_path / "mirror"
    datasets = write_mirror(root)
    verdicts: list[Verdict] = []
    fault_counts: Counter[str] = Counter()
    fault_errors: list[str] = []
    skipped: list[str] = []
    with ExitStack() as stack:
        redis_port = free_port()
        redis_server = start_redis(port=redis_port)
        stack.callback(redis_server.stop)
        mongo_server = start_mongo()
        stack.callback(mongo_server.stop)
        servers = Servers(redis_port, redis_server, mongo_server)
        stack.callback(servers.stop)  # the current redis-server, and Mongo resumed before it stops
        proxy = TcpProxy("127.0.0.1", redis_port).start()
        stack.callback(proxy.stop)
        proxy_url = f"redis://127.0.0.1:{proxy.port}/0"
        env = use_settings(
            clean_env,
            {
                "QUEUE_REDIS_URL": proxy_url,
                "CACHE_MONGO_URL": mongo_server.url,
                "QUEUE_MONGO_URL": mongo_server.url,
                "CACHE_MONGO_DATABASE": "stepcache_chaos_cache",
                "QUEUE_MONGO_DATABASE": "stepcache_chaos_queue",
                "QUEUE_MAX_JOBS_PER_NAMESPACE": str(LIMIT),
                "WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.5",
                "WORKER_MAX_MISSING_HEARTBEATS": "3",
                "WORKER_QUEUED_LEASE_SECONDS": "10",
                "WORKER_MAX_JOB_DURATION_SECONDS": "60",
                "WORKER_METRICS_PORT": "0",
                "COMMON_HF_ENDPOINT": f"file://{root}",
                "ASSETS_STORAGE_DIRECTORY": str(tmp_path / "assets"),
                "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
            },
        )
        stack.callback(redis_connection.close_clients)
        stack.callback(mongo.close_clients)
        stack.enter_context(current_app_for(proxy_url))
        recording = {
            RECORD_DIR_VARIABLE: str(record_dir),
            STEP_SECONDS_VARIABLE: str(STEP_SECONDS),
            APPLY_SECONDS_VARIABLE: str(APPLY_SECONDS),
        }
        fleet = Fleet({**env, **recording}, tmp_path)
        stack.callback(fleet.stop_all)
        fleet.start(WORKERS)
        log(f"{WORKERS} workers up; enqueuing the root step of {len(datasets)} datasets in {NAMESPACES} namespaces")

        queue = get_queue()
        for index in range(NAMESPACES):
            if borrows(f"chaos{index}"):
                queue.set_policy(f"chaos{index}", Policy(borrow=True, ceiling=CEILING))
        for dataset in datasets:
            queue.enqueue("dataset-config-names", dataset)
        faults = Faults(fleet, servers, proxy, record_dir, seed)
        stack.callback(faults.stop)
        faults.start()
        ledger = Ledger()
        while not faults.done():
            jobs = ledger.jobs()
            log(f"faults running: {len(jobs)} jobs {dict(Counter(str(j.status) for j in jobs))}")
            time.sleep(5)
        faults.stop()
        fault_counts, fault_errors, skipped = faults.counts, faults.errors, faults.skipped
        log(f"faults stopped: {dict(fault_counts)}; waiting up to {SETTLE_SECONDS:.0f}s for every job to end")

        jobs, waited = wait_until_terminal(ledger, SETTLE_SECONDS)
        verdicts.append(check_terminal(jobs, waited, began_wall))
        job_documents = list(jobs_collection().find({}))
        entry_documents = list(cache_collection().find({"http_status": {"$exists": True}}, {"content": 0}))
        bare_claims = cache_collection().count_documents({"http_status": {"$exists": False}})
        verdicts += check_fences(job_documents, entry_documents)
        verdicts.append(check_expected_entries([d for d in datasets if d not in faults.deleted], jobs))
        verdicts.append(check_deleted(faults.deleted))
        verdicts.append(check_children_once(jobs))
        verdicts.append(check_redis_keys(servers.redis_url, jobs))
        fleet.stop_all()
        stopped_at = time.time()
        verdicts.insert(1, check_limit(read_runs(record_dir), fleet.killed_at, stopped_at))
        errors = Counter(str(doc.get("error_code")) for doc in entry_documents if doc.get("http_status") != 200)
        attempts = Counter(job.attempts for job in jobs)

    elapsed = time.monotonic() - began
    report = [
        f"chaos run: seed {seed}, {elapsed:.0f}s, {len(jobs)} jobs, {len(datasets)} datasets, {NAMESPACES} namespaces"
        f" (worker logs and run records under {tmp_path})",
        f"faults injected: {dict(fault_counts)}"
        + (f"; planned but skipped (work done): {dict(Counter(skipped))}" if skipped else "")
        + (f"; fault errors: {fault_errors}" if fault_errors else ""),
        f"attempts per job: {dict(sorted(attempts.items()))}; error entries by code: {dict(errors)}; "
        f"bare claims left (attempts that wrote nothing): {bare_claims}",
        *(verdict.text() for verdict in verdicts),
    ]
    print("\n" + "\n".join(report), flush=True)
    problems = [f"the harness could not inject every fault: {fault_errors}"] if fault_errors else []
    problems += [verdict.text() for verdict in verdicts if not verdict.ok]
    if problems:
        pytest.fail(f"{len(problems)} problem(s) under chaos (seed {seed}):\n" + "\n".join(problems), pytrace=False)

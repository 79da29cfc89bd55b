"""The scale benchmark: stepcache's Redis footprint and costs with a million parked jobs.

    python -m bench.bench_scale        (or `make bench-scale`)

It starts its own redis-server and SecantusDB (unless BENCH_REDIS_URL / BENCH_MONGO_URL are set) and real
`celery -A tasks worker -c 4` processes, and measures:

(1) Redis bytes per parked job (waiting, not leased): INFO used_memory before and after parking jobs over
    10,000 namespaces, divided by the jobs parked; and MEMORY USAGE of one namespace's keys, key by key;
(2) the cost of one `NamespaceLimiter.admit` at 0, 100k and 1M parked jobs (p50 / p99 over 2,000 admits),
    into a backlogged namespace (it parks) and into a new one (it leases a slot), and the admit script's
    own time inside Redis (INFO commandstats);
(3) a reaper pass (`Lifecycle.reap`) with 100,000 idle namespaces (a limit override is all they keep)
    and 1,000 active ones (2 started jobs and 8 waiting each), p50 / p99 over 20 passes; and the one pass
    that unlists 100,000 namespaces whose last job just ended;
(4) with 1,000,000 jobs parked over 10,000 namespaces: memory, admit cost, the reaper's pass, and a sample
    drained by a worker for a fixed time (jobs drained, rate) plus the promote latency (slot freed -> the
    namespace's next job started), side by side with the same sample at 0 parked jobs;
(5) fairness with 50 backlogged namespaces: Jain's index of the worker time each namespace got over the
    run's first half, stepcache against plain Celery fed the same way.

The million jobs are parked by a bulk loader: the limiter's own `admit` script, pipelined 1,000 calls at
a time, with no ledger rows (their journal entries are dropped as if the journal's writer had written
them, so Redis holds what it holds at rest). Their namespaces are paused (a limit override of 0), so they
are parked and never leased, as in a namespace whose slots are all taken; the drained sample goes through
the step's `.delay` (limiter, messages, ledger) into namespaces of its own.

It prints a table and writes bench/results/scale.json and bench/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from bench.harness import (
    WORKER_CONCURRENCY,
    ReleaseWatcher,
    Servers,
    bench_servers,
    bench_worker,
    gaps_seconds,
    percentile,
)
from common.lifecycle import Lifecycle
from common.queue import Queue
from common.queue.jobs import JobPayload, Priority
from common.queue.limiter import ACTIVE_KEY, LIMITS_KEY, NamespaceLimiter, namespace_key, namespace_keys
from common.redis_connection import as_text

if TYPE_CHECKING:
    from tasks.embedded import EmbeddedServer

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE = 1000  # commands per round trip of the bulk loader
BULK_STEP = "bench-noop"
TARGET_BYTES_PER_JOB = 300
TARGET_REAP_MS = 50
TARGET_JAIN = 0.99
FLAT_RATIO = 1.25  # "flat": p50 at the largest size within 25% of p50 at 0
LONG_TTL_SECONDS = 86_400.0  # leases made for the reaper's fixture never expire during the run


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    millis = [value * 1000 for value in seconds]
    return {
        "p50_ms": percentile(millis, 0.5),
        "p99_ms": percentile(millis, 0.99),
        "max_ms": max(millis) if millis else float("nan"),
        "samples": len(millis),
    }


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when every value is the same, 1/n when one gets everything."""
    total, squares = sum(values), sum(value * value for value in values)
    return total * total / (len(values) * squares) if squares else float("nan")


def _bulk(*parts: bytes) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + _bulk(*parts)


class RawPipeline:
    """Commands packed by hand and sent PIPELINE at a time on one connection: redis-py's own packing of an
    admit call costs more than Redis' run of the script. An error reply raises."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.connection = client.connection_pool.get_connection()
        self.pending: list[bytes] = []

    def add(self, command: bytes) -> None:
        self.pending.append(command)
        if len(self.pending) >= PIPELINE:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.connection.send_packed_command([b"".join(self.pending)])  # type: ignore[no-untyped-call]
        for _ in self.pending:
            self.connection.read_response()
        self.pending = []

    def __enter__(self) -> RawPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self.client.connection_pool.release(self.connection)


def payload_json(job_id: str, namespace: str, dataset: str) -> str:
    """A bench-noop job's payload as `JobPayload.compact` writes it (checked by `check_payload`)."""
    return f'["{BULK_STEP}","{dataset}",null,null,1]'


def payload(job_id: str, namespace: str, dataset: str) -> JobPayload:
    return JobPayload.of(job_id, BULK_STEP, dataset, None, None, Priority.NORMAL)


def check_payload() -> None:
    job_id = str(uuid.uuid4())
    if payload_json(job_id, "org", "org/ds") != payload(job_id, "org", "org/ds").compact():
        raise RuntimeError("bench_scale.payload_json no longer writes what JobPayload.compact writes")


class BulkLoader:
    """Parks jobs through the limiter's own admit script, pipelined (no ledger rows, no messages); their
    journal entries are dropped, as the journal's writer drops them once written."""

    def __init__(self, client: redis.Redis, limiter: NamespaceLimiter, default_limit: int, queued_ttl_ms: int) -> None:
        self.client = client  # a single Redis (the raw pipeline has no cluster routing), the limiter's
        script = limiter.scripts["admit"]
        self.client.script_load(script.script)
        self.sha = script.sha.encode()
        self.tail = _bulk(str(default_limit).encode(), str(queued_ttl_ms).encode())
        self.heads: dict[str, bytes] = {}
        check_payload()

    def _head(self, namespace: str) -> bytes:
        head = self.heads.get(namespace)
        if head is None:
            keys = [key.encode() for key in namespace_keys(namespace)]
            head = self.heads[namespace] = b"*%d\r\n" % (3 + len(keys) + 4) + _bulk(
                b"EVALSHA", self.sha, str(len(keys)).encode(), *keys
            )
        return head

    def park(self, namespaces: Sequence[str], count: int, first: int = 0, label: str = "ds") -> None:
        """Admit `count` jobs, job i (from `first`) into namespaces[i % len(namespaces)]."""
        with RawPipeline(self.client) as pipe:
            for start in range(0, len(namespaces), PIPELINE):
                pipe.add(_command(b"SADD", ACTIVE_KEY.encode(), *(ns.encode() for ns in namespaces[start:][:PIPELINE])))
            for i in range(first, first + count):
                namespace = namespaces[i % len(namespaces)]
                job_id = str(uuid.uuid4()).encode()
                body = payload_json(job_id.decode(), namespace, f"{namespace}/{label}{i}").encode()
                pipe.add(self._head(namespace) + _bulk(job_id, body) + self.tail)
            for start in range(0, len(namespaces), PIPELINE):
                journals = (namespace_key(ns, "journal").encode() for ns in namespaces[start:][:PIPELINE])
                pipe.add(_command(b"DEL", *journals))


def override_limits(client: redis.Redis, namespaces: Sequence[str], limit: int) -> None:
    """What `set_limit` leaves for a namespace with no job, for many namespaces at once."""
    with RawPipeline(client) as pipe:
        value = str(limit).encode()
        for namespace in namespaces:
            pipe.add(_command(b"SET", namespace_key(namespace, "limit").encode(), value))
        for start in range(0, len(namespaces), PIPELINE):
            pipe.add(_command(b"SADD", LIMITS_KEY.encode(), *(ns.encode() for ns in namespaces[start:][:PIPELINE])))


def forget_namespaces(client: redis.Redis, namespaces: Sequence[str]) -> None:
    with RawPipeline(client) as pipe:
        for namespace in namespaces:
            pipe.add(_command(b"DEL", *(key.encode() for key in namespace_keys(namespace))))
            pipe.add(_command(b"SREM", ACTIVE_KEY.encode(), namespace.encode()))


def evalsha_stats(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


class Bench:
    def __init__(self, env: dict[str, str], log_dir: Path, servers: list[EmbeddedServer], embedded_mongo: bool) -> None:
        self.env = env
        self.log_dir = log_dir
        self.redis = redis.Redis.from_url(env["QUEUE_REDIS_URL"])
        self.servers = servers
        self.embedded_mongo = embedded_mongo

    @property
    def lifecycle(self) -> Lifecycle:
        from tasks.queue import get_lifecycle

        return get_lifecycle()  # rebuilt when the settings change (a fresh SecantusDB)

    @property
    def queue(self) -> Queue:
        return self.lifecycle.queue

    @property
    def limiter(self) -> NamespaceLimiter:
        return self.queue.limiter

    def worker(self, name: str, **extra_env: str) -> AbstractContextManager[object]:
        return bench_worker(self.env, self.log_dir, name, **extra_env)

    def fresh_mongo(self) -> None:
        """A new SecantusDB for the next phase with workers: it slows down with every write it ever took,
        deleted documents and dropped databases included (inserts 1 ms, then 4 ms after three rounds of
        1,000 inserted and deleted), which would make each phase slower than the one before it."""
        if not self.embedded_mongo:
            return
        from common.config import get_config
        from common.mongo import close_clients
        from tasks.embedded import start_mongo

        old = next(server for server in self.servers if server.name == "SecantusDB")
        new = start_mongo()
        self.servers[self.servers.index(old)] = new
        close_clients()
        old.stop()
        for name in ("CACHE_MONGO_URL", "QUEUE_MONGO_URL"):
            self.env[name] = os.environ[name] = new.url
        get_config.cache_clear()

    def reset(self, fresh_mongo: bool = False) -> None:
        """A clean broker, limiter, ledger and cache (on a new SecantusDB when asked); Redis marked as
        holding the ledger's jobs (none)."""
        from common.cache import cache_collection

        if fresh_mongo:
            self.fresh_mongo()
        self.redis.flushdb()
        self.queue.ledger.collection.delete_many({})
        cache_collection().delete_many({})
        self.queue.check_epoch()

    def records(self) -> list[tuple[str, float]]:
        """What the bench steps recorded: (label, time), `end:<dataset>` for a step's end."""
        from bench.steps import STARTS_KEY

        recorded = []
        for line in self.redis.lrange(STARTS_KEY, 0, -1):
            label, at = as_text(line).rsplit(" ", 1)
            recorded.append((label, float(at)))
        return recorded

    def used_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def reap_once(self) -> float:
        """One `Lifecycle.reap()` pass, timed; waits for the lock if a worker's reaper holds it."""
        for _ in range(100):
            begin = time.perf_counter()
            if self.lifecycle.reap() is not None:
                return time.perf_counter() - begin
            time.sleep(0.2)
        raise RuntimeError("the reaper lock stayed taken for 20 s")

    # --- (1) + (2) + (4): memory and admit cost up to a million parked jobs ------------------------------

    def breakdown(self, namespace: str) -> dict[str, Any]:
        """MEMORY USAGE of each of the namespace's keys, and its share of the shared sets."""
        waiting = int(self.redis.zcard(namespace_key(namespace, "waiting")))
        keys: dict[str, Any] = {}
        for key in namespace_keys(namespace):
            if not self.redis.exists(key):
                continue
            size = int(self.redis.memory_usage(key, samples=0) or 0)
            keys[key.rsplit(":", 1)[1]] = {
                "bytes": size,
                "bytes_per_job": size / waiting if waiting else None,
                "encoding": as_text(self.redis.object("encoding", key) or b""),
            }
        total = sum(entry["bytes"] for entry in keys.values())
        active_bytes = int(self.redis.memory_usage(ACTIVE_KEY, samples=0) or 0)
        active_members = int(self.redis.scard(ACTIVE_KEY)) or 1
        return {
            "namespace": namespace,
            "jobs": waiting,
            "keys": keys,
            "total_bytes": total,
            "bytes_per_job": total / waiting if waiting else None,
            "active_set_bytes_per_namespace": active_bytes / active_members,
        }

    def admit_probe(self, namespaces: Sequence[str], admits: int, label: str) -> dict[str, Any]:
        """`admits` timed `NamespaceLimiter.admit` calls, round robin over `namespaces`."""
        payloads = [
            payload(str(uuid.uuid4()), namespaces[i % len(namespaces)], f"{namespaces[i % len(namespaces)]}/{label}{i}")
            for i in range(admits)
        ]
        calls, usec = evalsha_stats(self.redis)
        times = []
        for job in payloads:
            begin = time.perf_counter()
            self.limiter.admit(job)
            times.append(time.perf_counter() - begin)
        after_calls, after_usec = evalsha_stats(self.redis)
        return {**summary_ms(times), "script_us_in_redis": (after_usec - usec) / max(1, after_calls - calls)}

    def scale(self, sizes: Sequence[int], namespaces: int, probe_admits: int, passes: int) -> dict[str, Any]:
        self.reset()
        names = [f"org{k:05d}" for k in range(namespaces)]
        # Paused: admit parks and never leases, as in a namespace whose slots are all taken.
        override_limits(self.redis, names, 0)
        loader = BulkLoader(self.redis, self.limiter, self.limiter.default_limit, self.limiter.queued_ttl_ms)
        baseline = self.used_memory()
        probe_width = min(100, namespaces // max(1, len(sizes) + 1))
        loaded = probed = 0
        by_size: dict[str, Any] = {}
        for index, size in enumerate(sorted(sizes)):
            begin = time.perf_counter()
            loader.park(names, size - loaded, first=loaded)
            seconds = time.perf_counter() - begin
            if size > loaded:
                print(f"  parked {size - loaded:,} jobs in {seconds:.0f} s ({(size - loaded) / seconds:,.0f}/s)")
            loaded = size
            parked = loaded + probed
            used = self.used_memory()
            entry: dict[str, Any] = {
                "parked": parked,
                "load_seconds": seconds,
                "used_memory_bytes": used,
                "bytes_per_parked_job": (used - baseline) / parked if parked else None,
                "breakdown": self.breakdown(names[-1]) if parked else None,
            }
            # Probe namespaces are a different slice of the paused ones at each size (never the breakdown's).
            probe_names = names[index * probe_width : (index + 1) * probe_width]
            entry["admit_backlogged"] = self.admit_probe(probe_names, probe_admits, f"probe{size}-")
            probed += probe_admits
            fresh = [f"new{size}-{i}" for i in range(probe_admits)]
            entry["admit_new_namespace"] = self.admit_probe(fresh, probe_admits, "ds")
            forget_namespaces(self.redis, fresh)
            by_size[str(size)] = entry
            print(
                f"  {parked:,} parked: {entry['bytes_per_parked_job'] or 0:.0f} B/job, admit p50 "
                f"{entry['admit_backlogged']['p50_ms']:.2f} ms / new namespace "
                f"{entry['admit_new_namespace']['p50_ms']:.2f} ms"
            )
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zcard(namespace_key(name, "waiting"))
            pipe.hlen(namespace_key(name, "leases"))
        counts = pipe.execute()
        checked = {"waiting": sum(counts[0::2]), "leased": sum(counts[1::2])}
        _, usec = evalsha_stats(self.redis)
        reap = [self.reap_once() for _ in range(passes)]
        redis_ms = (evalsha_stats(self.redis)[1] - usec) / 1000 / max(1, passes)
        print(f"  reaper pass over {namespaces:,} backlogged namespaces: p50 {percentile(reap, 0.5) * 1000:.0f} ms")
        return {
            "namespaces": namespaces,
            "baseline_used_memory_bytes": baseline,
            "sizes": by_size,
            "checked": checked,
            "reap_pass": {
                **summary_ms(reap),
                "scripts_ms_in_redis": redis_ms,
                "active_namespaces": int(self.redis.scard(ACTIVE_KEY)),
            },
        }

    # --- (4): a sample drained by a worker, and the promote latency -----------------------------------

    def promote_latency(self, jobs: int) -> dict[str, Any]:
        """In a namespace with a limit of 1: from the end script freeing a job's slot (as Redis' MONITOR
        timestamps it) to the next job's step starting (as in bench_queue)."""
        from bench import steps

        self.queue.set_limit("latency", 1)
        with ReleaseWatcher(self.redis, self.limiter.scripts["end"].sha) as watcher:
            time.sleep(0.2)
            results = [steps.bench_sleep.delay(f"latency/ds{i}") for i in range(jobs)]
            for result in results:
                result.get(timeout=600)
        recorded = dict(self.records())
        runs = [(recorded[f"latency/ds{i}"], recorded[f"end:latency/ds{i}"]) for i in range(jobs)]
        gaps, promote = gaps_seconds(runs), watcher.promote_seconds(runs)
        return {"release_to_start": summary_ms(promote), "step_end_to_next_start": summary_ms(gaps)}

    def drain(self, namespaces: int, jobs: int, seconds: float) -> dict[str, Any]:
        """Enqueue `jobs` through `.delay` into paused namespaces, unpause them, and count what the worker
        ends in `seconds`."""
        from bench import steps

        names = [f"drain{k:03d}" for k in range(namespaces)]
        for name in names:
            self.queue.set_limit(name, 0)
        begin = time.perf_counter()
        for i in range(jobs):
            steps.bench_sleep.delay(f"{names[i % namespaces]}/ds{i}")
        enqueue_rate = jobs / (time.perf_counter() - begin)
        start = time.time()
        for name in names:
            self.queue.set_limit(name, None)
        time.sleep(max(0.0, start + seconds - time.time()))
        ends = [at for label, at in self.records() if label.startswith("end:drain") and start <= at <= start + seconds]
        return {
            "sample_jobs": jobs,
            "sample_namespaces": namespaces,
            "seconds": seconds,
            "drained": len(ends),
            "jobs_per_s": len(ends) / seconds,
            "delay_per_s": enqueue_rate,
            "sample_exhausted": len(ends) >= jobs,
        }

    def drain_session(self, name: str, latency_jobs: int, namespaces: int, jobs: int, seconds: float) -> dict[str, Any]:
        self.fresh_mongo()
        with self.worker(name, BENCH_SLEEP_SECONDS="0"):
            latency = self.promote_latency(latency_jobs)
            drained = self.drain(namespaces, jobs, seconds)
        print(
            f"  {name}: promote p50 / p99 {latency['release_to_start']['p50_ms']:.1f} / "
            f"{latency['release_to_start']['p99_ms']:.1f} ms, drained {drained['drained']:,} jobs in "
            f"{seconds:.0f} s ({drained['jobs_per_s']:.1f}/s)"
        )
        return {"promote_latency": latency, "drain": drained}

    # --- (3): the reaper with many idle namespaces ----------------------------------------------------

    def reaper(self, idle: int, active: int, jobs_per_active: int, passes: int) -> dict[str, Any]:
        self.reset()
        idle_names = [f"idle{k:06d}" for k in range(idle)]
        active_names = [f"busy{k:04d}" for k in range(active)]
        override_limits(self.redis, idle_names, 1)
        # Active: two started jobs (leases that outlive the run) and the rest waiting, in each namespace.
        setup = NamespaceLimiter(self.redis, 2, LONG_TTL_SECONDS, LONG_TTL_SECONDS, self.limiter.max_attempts)
        BulkLoader(self.redis, setup, 2, int(LONG_TTL_SECONDS * 1000)).park(active_names, active * jobs_per_active)
        pipe = self.redis.pipeline(transaction=False)
        for name in active_names:
            pipe.hgetall(namespace_key(name, "leases"))
        leases = pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for name, held in zip(active_names, leases, strict=True):
            for job, lease in held.items():
                setup.scripts["confirm"](
                    keys=namespace_keys(name),
                    args=[job, as_text(lease)[2:], uuid.uuid4().hex, int(LONG_TTL_SECONDS * 1000)],
                    client=pipe,
                )
        started = sum(1 for reply in pipe.execute() if as_text(reply[0]) == "run")
        self.redis.delete(*(namespace_key(name, "journal") for name in active_names))  # as if written
        # Namespaces whose last job just ended are still listed until a pass finds them idle.
        with RawPipeline(self.redis) as raw:
            for begin in range(0, idle, PIPELINE):
                raw.add(_command(b"SADD", ACTIVE_KEY.encode(), *(ns.encode() for ns in idle_names[begin:][:PIPELINE])))
        listed = int(self.redis.scard(ACTIVE_KEY))
        first = self.reap_once()
        remaining = int(self.redis.scard(ACTIVE_KEY))
        _, usec = evalsha_stats(self.redis)
        times = [self.reap_once() for _ in range(passes)]
        redis_ms = (evalsha_stats(self.redis)[1] - usec) / 1000 / max(1, passes)
        result: dict[str, Any] = {
            "idle_namespaces": idle,
            "active_namespaces": active,
            "jobs_per_active_namespace": jobs_per_active,
            "started_jobs": started,
            "pass": {**summary_ms(times), "scripts_ms_in_redis": redis_ms},
            "unlisting_pass": {"seconds": first, "listed_before": listed, "listed_after": remaining},
            "keys": int(self.redis.dbsize()),
        }
        print(
            f"  reaper pass with {idle:,} idle and {active:,} active namespaces: p50 / p99 "
            f"{result['pass']['p50_ms']:.1f} / {result['pass']['p99_ms']:.1f} ms; unlisting {listed - remaining:,} "
            f"just-idle namespaces: {first:.1f} s"
        )
        return result

    # --- (5): fairness with 50 backlogged namespaces --------------------------------------------------

    def fairness(self, namespaces: int, jobs: int, sleep: float) -> dict[str, Any]:
        """Every namespace's backlog enqueued one namespace after the other before the worker starts (the
        worst order for a FIFO broker); Jain's index of worker time per namespace over the first half."""
        from bench import steps

        modes: dict[str, Any] = {"stepcache": steps.bench_sleep, "plain_celery": steps.plain_sleep}
        result: dict[str, Any] = {"namespaces": namespaces, "jobs_per_namespace": jobs, "step_seconds": sleep}
        for mode, task in modes.items():
            self.reset(fresh_mongo=mode == "stepcache")
            names = [f"fair{k:02d}" for k in range(namespaces)]
            pending = [task.delay(f"{name}/ds{j}") for name in names for j in range(jobs)]
            with self.worker(f"fairness-{mode}", BENCH_SLEEP_SECONDS=str(sleep)):
                for handle in pending:
                    handle.get(timeout=1800)
            recorded = dict(self.records())
            intervals: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for name in names:
                for j in range(jobs):
                    start = recorded[f"{name}/ds{j}"]
                    # plain_sleep records no end: its run is its sleep
                    intervals[name].append((start, recorded.get(f"end:{name}/ds{j}", start + sleep)))
            first = min(start for runs in intervals.values() for start, _ in runs)
            last = max(end for runs in intervals.values() for _, end in runs)
            half = first + (last - first) / 2
            shares = [
                sum(max(0.0, min(end, half) - start) for start, end in intervals[name] if start < half)
                for name in names
            ]
            result[mode] = {
                "jain_first_half": jain(shares),
                "run_seconds": last - first,
                "worker_seconds_first_half_min": min(shares),
                "worker_seconds_first_half_max": max(shares),
                "namespaces_served_first_half": sum(1 for share in shares if share > 0),
            }
            if mode == "stepcache":
                result["idle_after_end"] = self.idle_after_end(names)
            print(f"  fairness {mode}: J = {result[mode]['jain_first_half']:.4f} over {last - first:.1f} s")
        return result

    def idle_after_end(self, names: Iterable[str]) -> dict[str, int]:
        """What Redis keeps of namespaces whose jobs all ended, after a reaper pass (and the sequence's linger)."""
        self.reap_once()
        time.sleep(1.5)  # an idle namespace's sequence key lingers a second (prelude.lua SEQUENCE_LINGER_MS)
        names = list(names)
        keys = sum(1 for name in names for _ in self.redis.scan_iter(match=f"stepcache:{{{name}}}:*", count=1000))
        listed = sum(1 for name in names if self.redis.sismember(ACTIVE_KEY, name))
        return {"namespaces": len(names), "keys_left": keys, "still_listed": listed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", nargs="+", default=["fairness", "reaper", "scale"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000], help="parked jobs")
    parser.add_argument("--namespaces", type=int, default=10_000, help="namespaces the parked jobs are spread over")
    parser.add_argument("--probe-admits", type=int, default=2000, help="timed admits at each size")
    parser.add_argument("--scale-reaper-passes", type=int, default=5, help="reaper passes timed at the largest size")
    parser.add_argument("--idle-namespaces", type=int, default=100_000)
    parser.add_argument("--active-namespaces", type=int, default=1000)
    parser.add_argument("--jobs-per-active", type=int, default=10, help="2 started, the rest waiting")
    parser.add_argument("--reaper-passes", type=int, default=20)
    parser.add_argument("--drain-seconds", type=float, default=60.0)
    parser.add_argument("--drain-namespaces", type=int, default=100)
    parser.add_argument("--drain-jobs", type=int, default=4000, help="the sample enqueued through .delay")
    parser.add_argument("--latency-jobs", type=int, default=200, help="jobs in the limit-1 latency namespace")
    parser.add_argument("--no-baseline-drain", action="store_true", help="skip the drain at 0 parked jobs")
    parser.add_argument("--fair-namespaces", type=int, default=50)
    parser.add_argument("--fair-jobs", type=int, default=40, help="jobs per namespace")
    parser.add_argument("--fair-sleep", type=float, default=0.02, help="seconds each fairness job sleeps")
    args = parser.parse_args()

    logging.getLogger("common.queue.queue").setLevel(logging.ERROR)  # "Redis lost its data" after each reset
    with bench_servers(("BENCH_MONGO_URL", "TEST_MONGO_URL"), WORKER_METRICS_PORT="0") as run:
        results = measure(args, run)
    report(results)


def measure(args: argparse.Namespace, run: Servers) -> dict[str, Any]:
    embedded_mongo, mongo_url, env = run.embedded_mongo, run.mongo_url, run.env
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "redis": "",
            "worker_concurrency": WORKER_CONCURRENCY,
            "mongo": "SecantusDB (a new one for each phase with workers)" if embedded_mongo else mongo_url,
        },
        "parameters": vars(args),
    }
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stepcache-bench-scale-") as logs:
        runner = Bench(env, Path(logs), run.servers, embedded_mongo)
        results["machine"]["redis"] = runner.redis.info("server")["redis_version"]
        steps: dict[str, Callable[[], Any]] = {
            "fairness": lambda: runner.fairness(args.fair_namespaces, args.fair_jobs, args.fair_sleep),
            "reaper": lambda: runner.reaper(
                args.idle_namespaces, args.active_namespaces, args.jobs_per_active, args.reaper_passes
            ),
        }
        for phase, run_phase in steps.items():
            if phase in args.phases:
                print(f"{phase}...")
                results[phase] = run_phase()
        if "scale" in args.phases:
            print("scale...")
            drains = {}
            if not args.no_baseline_drain:
                runner.reset()
                drains["0"] = runner.drain_session(
                    "drain-0", args.latency_jobs, args.drain_namespaces, args.drain_jobs, args.drain_seconds
                )
            results["scale"] = runner.scale(args.sizes, args.namespaces, args.probe_admits, args.scale_reaper_passes)
            drains[str(max(args.sizes))] = runner.drain_session(
                "drain-parked", args.latency_jobs, args.drain_namespaces, args.drain_jobs, args.drain_seconds
            )
            results["scale"]["drain_by_parked"] = drains
            results["scale"]["used_memory_after_drain_bytes"] = runner.used_memory()
    results["run_seconds"] = time.monotonic() - began
    return results


def _verdict(met: bool, detail: str) -> str:
    return f"{'met' if met else 'missed'} ({detail})"


def report(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| measure | result | target |", "|---|---|---|"]

    def row(measure: str, result: str, target: str = "") -> None:
        lines.append(f"| {measure} | {result} | {target} |")

    def p50_p99(entry: dict[str, Any]) -> str:
        return f"{entry['p50_ms']:.2f} / {entry['p99_ms']:.2f}"

    scale = results.get("scale")
    if scale:
        sizes = scale["sizes"]
        largest = max(sizes, key=int)
        for entry in sizes.values():
            if entry["bytes_per_parked_job"] is None:
                continue
            per_job = entry["bytes_per_parked_job"]
            jobs_per_ns = entry["parked"] / scale["namespaces"]
            row(
                f"Redis bytes per parked job, {entry['parked']:,} parked over {scale['namespaces']:,} namespaces "
                f"(~{jobs_per_ns:.0f} per namespace; INFO used_memory)",
                f"{per_job:.0f}",
                _verdict(per_job <= TARGET_BYTES_PER_JOB, f"≤ {TARGET_BYTES_PER_JOB}; {per_job / 300 - 1:+.0%}"),
            )
        for kind, what in (
            ("admit_backlogged", "into a backlogged namespace (parks)"),
            ("admit_new_namespace", "into a new namespace (leases a slot)"),
        ):
            cells = " · ".join(f"{int(size):,}: {p50_p99(entry[kind])}" for size, entry in sizes.items())
            ratio = sizes[largest][kind]["p50_ms"] / sizes[min(sizes, key=int)][kind]["p50_ms"]
            row(
                f"`NamespaceLimiter.admit` {what}, p50 / p99 (ms) by parked jobs",
                cells,
                _verdict(ratio <= FLAT_RATIO, f"flat: p50 at {int(largest):,} is {ratio:.2f}x the one at 0"),
            )
            inside = " · ".join(
                f"{int(size):,}: {entry[kind]['script_us_in_redis']:.0f}" for size, entry in sizes.items()
            )
            row(f"  the admit script inside Redis (µs per call, INFO commandstats), {what}", inside)
        reap = scale["reap_pass"]
        row(
            f"reaper pass with {int(largest):,} parked ({reap['active_namespaces']:,} backlogged namespaces), "
            "p50 / p99 (ms)",
            f"{p50_p99(reap)} ({reap['scripts_ms_in_redis']:.0f} ms of it in Redis' scripts)",
            _verdict(reap["p99_ms"] <= TARGET_REAP_MS, f"≤ {TARGET_REAP_MS} ms (the target is for 1,000 active)"),
        )
        for parked, session in scale["drain_by_parked"].items():
            drain, latency = session["drain"], session["promote_latency"]
            row(
                f"drained by one worker -c {WORKER_CONCURRENCY} in {drain['seconds']:.0f} s with {int(parked):,} "
                f"parked (sample: {drain['sample_jobs']:,} no-op jobs over {drain['sample_namespaces']} namespaces "
                "via .delay)",
                f"{drain['drained']:,} jobs, {drain['jobs_per_s']:.1f} jobs/s"
                + (" (sample exhausted)" if drain["sample_exhausted"] else ""),
            )
            row(
                f"promote latency with {int(parked):,} parked: slot freed to next job started, p50 / p99 (ms; "
                f"{latency['release_to_start']['samples']} promotions, limit 1)",
                p50_p99(latency["release_to_start"]),
                "p99 ≤ 20 ms (issue 12's latency target)",
            )
            row(
                f"  one step's end to the next step's start with {int(parked):,} parked, p50 / p99 (ms)",
                p50_p99(latency["step_end_to_next_start"]),
            )
    reaper = results.get("reaper")
    if reaper:
        pass_ = reaper["pass"]
        row(
            f"reaper pass with {reaper['idle_namespaces']:,} idle and {reaper['active_namespaces']:,} active "
            f"namespaces ({reaper['jobs_per_active_namespace']} jobs each, 2 started), p50 / p99 (ms, "
            f"{pass_['samples']} passes)",
            f"{p50_p99(pass_)} ({pass_['scripts_ms_in_redis']:.0f} ms of it in Redis' scripts)",
            _verdict(pass_["p99_ms"] <= TARGET_REAP_MS, f"≤ {TARGET_REAP_MS} ms; p99 {pass_['p99_ms'] / 50 - 1:+.0%}"),
        )
        unlisting = reaper["unlisting_pass"]
        row(
            f"the one pass that unlists {unlisting['listed_before'] - unlisting['listed_after']:,} namespaces "
            "whose last job just ended (s)",
            f"{unlisting['seconds']:.2f}",
        )
    fairness = results.get("fairness")
    if fairness:
        stepcache, plain = fairness["stepcache"], fairness["plain_celery"]
        row(
            f"Jain's index of worker time per namespace, first half of the run ({fairness['namespaces']} namespaces x "
            f"{fairness['jobs_per_namespace']} jobs of {fairness['step_seconds'] * 1000:.0f} ms, limit 2, "
            "enqueued namespace after namespace)",
            f"{stepcache['jain_first_half']:.4f} (plain Celery: {plain['jain_first_half']:.4f}, "
            f"{plain['namespaces_served_first_half']} namespaces served)",
            _verdict(stepcache["jain_first_half"] >= TARGET_JAIN, f"≥ {TARGET_JAIN}"),
        )
        idle = fairness["idle_after_end"]
        row(
            "keys left in Redis by namespaces whose jobs all ended (after a reaper pass)",
            f"{idle['keys_left']} keys for {idle['namespaces']} namespaces, {idle['still_listed']} still listed",
        )
    table = "\n".join(lines)
    breakdown = _breakdown_table(results)
    (RESULTS / "scale.md").write_text(table + "\n" + ("\n" + breakdown + "\n" if breakdown else ""))
    print(table)
    if breakdown:
        print()
        print(breakdown)


def _breakdown_table(results: dict[str, Any]) -> str:
    scale = results.get("scale")
    if not scale:
        return ""
    sizes = scale["sizes"]
    entry = sizes[max(sizes, key=int)]
    breakdown = entry["breakdown"]
    if not breakdown:
        return ""
    lines = [
        f"Where the bytes go: MEMORY USAGE of namespace {breakdown['namespace']}'s keys ({breakdown['jobs']} parked "
        f"jobs) with {entry['parked']:,} parked",
        "",
        "| key | encoding | bytes | bytes per job |",
        "|---|---|---|---|",
    ]
    for name, key in breakdown["keys"].items():
        per_job = key["bytes_per_job"] or 0.0
        lines.append(f"| {name} | {key['encoding']} | {key['bytes']:,} | {per_job:.0f} |")
    shared = breakdown["active_set_bytes_per_namespace"]
    lines.append(f"| (its member of {ACTIVE_KEY}) | | {shared:.0f} | {shared / max(1, breakdown['jobs']):.1f} |")
    lines.append(f"| total | | {breakdown['total_bytes']:,} | {breakdown['bytes_per_job'] or 0.0:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

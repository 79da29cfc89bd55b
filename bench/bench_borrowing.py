"""Work-conserving fairness: borrowing idle capacity against the hard cap, in one run.

    python -m bench.bench_borrowing        (or `make bench-borrowing`, about 4 minutes)

It starts its own redis-server and SecantusDB (unless BENCH_REDIS_URL / BENCH_MONGO_URL are set) and real
`celery -A tasks worker` processes running `bench-sleep` (BENCH_SLEEP_SECONDS, 0.25 s here), and measures,
from the ledger's start and end of every job (the time a job holds a worker slot):

(a) the idle-worker share while jobs wait: one namespace with 10,000 waiting jobs, limit 1, one worker of
    4 slots, over a window: the hard cap (QUEUE_BORROW=false) against borrowing (true);
(b) a newcomer: while that namespace borrows every slot, another namespace enqueues one job; its wait
    until it starts, in job durations (several trials);
(c) weights: backlogged namespaces with weights 1, 2 and 4, limit 1, borrowing, over a window: each one's
    share of the started jobs against its weight's share, and Jain's index over the weight-normalised
    shares; once with 50 namespaces on 4 slots (the issue's target: every slot is some namespace's by its
    limit, none is idle to borrow), once with 6 namespaces on 16 slots (10 slots to borrow);
(d) slots over time: namespace A's backlog alone, then B's arriving (the picture in the README).

It prints a table and writes bench/results/borrowing.json, borrowing.md and borrowing.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from bench.harness import bench_servers, percentile

RESULTS = Path(__file__).resolve().parent / "results"
SLEEP_SECONDS = 0.25
WARM_UP_SECONDS = 1.0  # of each window, left out: the worker's first jobs


class Bench:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir

    def settings(self, borrow: bool) -> dict[str, str]:
        """This process's settings (it enqueues, and its scripts borrow too) and the workers'."""
        from common.config import get_config

        env = {
            **self.env,
            "QUEUE_MAX_JOBS_PER_NAMESPACE": "1",
            "QUEUE_BORROW": "true" if borrow else "false",
            "COMMON_REGISTRY_TTL_SECONDS": "3",
            "BENCH_SLEEP_SECONDS": str(SLEEP_SECONDS),
        }
        os.environ.update(env)
        get_config.cache_clear()
        return env

    def reset(self) -> None:
        import redis

        from tasks.queue import get_queue

        redis.Redis.from_url(self.env["QUEUE_REDIS_URL"]).flushdb()
        get_queue().ledger.collection.delete_many({})

    @contextmanager
    def worker(self, name: str, env: dict[str, str], concurrency: int) -> Iterator[None]:
        from tasks.capacity import pools
        from tasks.embedded import WorkerProcess

        with WorkerProcess(name, env, self.log_dir / f"{name}.log", concurrency, include=["bench.steps"]):
            deadline = time.monotonic() + 30
            while sum(pools().slots.values()) < concurrency:  # its registration
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} never registered its {concurrency} slots")
                time.sleep(0.1)
            yield

    def runs(self) -> list[tuple[str, float, float | None]]:
        """(namespace, started, finished) of every job that started, from the ledger."""
        from tasks.queue import get_queue

        queue = get_queue()
        queue.journal.flush_all()
        documents = queue.ledger.collection.find(
            {"started_at": {"$ne": None}}, {"namespace": 1, "started_at": 1, "finished_at": 1}
        )
        return [
            (
                document["namespace"],
                document["started_at"].timestamp(),
                document["finished_at"].timestamp() if document.get("finished_at") else None,
            )
            for document in documents
        ]

    def backlog(self, namespace: str, jobs: int) -> None:
        """Enqueue the jobs a thousand at a time, each thousand in the ledger before the next (SecantusDB
        takes one bulk write of 10,000 new jobs in more than the client's 10 s socket timeout)."""
        from common.queue.queue import JobInput
        from tasks.queue import get_queue

        queue = get_queue()
        for start in range(0, jobs, 1000):
            inputs = [JobInput("bench-sleep", f"{namespace}/ds{i}") for i in range(start, min(jobs, start + 1000))]
            queue.enqueue_many(inputs)
            for attempt in range(3):  # a write SecantusDB timed out is written again (idempotent)
                try:
                    queue.journal.flush_all()
                    break
                except PyMongoError:
                    if attempt == 2:
                        raise

    def stop(self, namespaces: Sequence[str]) -> None:
        """Pause the namespaces (one Redis call each, where cancelling thousands of jobs writes them all to
        the ledger): nothing more starts, and the next reset drops what waits."""
        from tasks.queue import get_queue

        for namespace in namespaces:
            get_queue().set_limit(namespace, 0)

    def idle_share(self, borrow: bool, window: float) -> dict[str, float]:
        self.reset()
        env = self.settings(borrow)
        self.backlog("one", 10_000)  # waiting before the worker comes: its first pass finds them
        with self.worker(f"idle-{'borrow' if borrow else 'hard'}", env, 4):
            began = time.time()
            time.sleep(window)
            ended = time.time()
            self.stop(["one"])
        start = began + WARM_UP_SECONDS
        busy = sum(
            max(0.0, min(finished or ended, ended) - max(started, start)) for _, started, finished in self.runs()
        )
        return {"idle_share": 1 - busy / (4 * (ended - start)), "window_s": ended - start}

    def newcomer(self, trials: int) -> dict[str, float]:
        from tasks.queue import get_queue

        self.reset()
        env = self.settings(True)
        waits = []
        self.backlog("big", 2_000)
        with self.worker("newcomer", env, 4):
            time.sleep(2)
            for trial in range(trials):
                asked = time.time()
                job = get_queue().enqueue("bench-sleep", f"new{trial}/ds")
                deadline = time.monotonic() + 30
                while (found := get_queue().ledger.get(job.job_id)) is None or found.started_at is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the newcomer's job never started")
                    get_queue().journal.flush_all()
                    time.sleep(0.01)
                waits.append(found.started_at.timestamp() - asked)
                time.sleep(SLEEP_SECONDS * 2)
            self.stop(["big"])
        durations = [wait / SLEEP_SECONDS for wait in waits]
        return {
            "wait_p50_s": percentile(waits, 0.5),
            "wait_max_s": max(waits),
            "wait_p50_job_durations": percentile(durations, 0.5),
            "wait_max_job_durations": max(durations),
            "trials": trials,
        }

    def weights(self, namespaces: int, slots: int, window: float) -> dict[str, Any]:
        from common.queue.limiter import Policy
        from tasks.queue import get_queue

        self.reset()
        env = self.settings(True)
        weight_of = {f"w{i:02d}": (1, 2, 4)[i % 3] for i in range(namespaces)}
        for namespace, weight in weight_of.items():
            get_queue().set_policy(namespace, Policy(weight=weight))
        for namespace in weight_of:
            self.backlog(namespace, 4_000 // namespaces)
        with self.worker(f"weights-{namespaces}", env, slots):
            began = time.time()
            time.sleep(window)
            ended = time.time()
            self.stop(list(weight_of))
        start = began + WARM_UP_SECONDS
        started = Counter(namespace for namespace, at, _ in self.runs() if start <= at <= ended)
        total, weights = sum(started.values()), sum(weight_of.values())
        shares = {namespace: started[namespace] / total for namespace in weight_of}
        relative = {namespace: shares[namespace] / (weight_of[namespace] / weights) for namespace in weight_of}
        normalised = [shares[namespace] / weight_of[namespace] for namespace in weight_of]
        jain = sum(normalised) ** 2 / (len(normalised) * sum(x * x for x in normalised))
        by_weight = {
            str(weight): sum(started[n] for n, w in weight_of.items() if w == weight) / total for weight in (1, 2, 4)
        }
        return {
            "namespaces": namespaces,
            "slots": slots,
            "started": total,
            "worst_share_error": max(abs(value - 1) for value in relative.values()),
            "jain_weight_normalised": jain,
            "share_by_weight": by_weight,
            "target_share_by_weight": {
                str(weight): sum(w for w in weight_of.values() if w == weight) / weights for weight in (1, 2, 4)
            },
        }

    def picture(self, seconds: float) -> dict[str, Any]:
        """A's backlog alone, then B's arriving at a third of the run: the slots each holds over time."""
        from tasks.queue import get_queue

        self.reset()
        env = self.settings(True)
        get_queue().set_limit("b", 0)  # b's jobs are there, paused: they "arrive" when it is resumed
        self.backlog("a", 500)
        self.backlog("b", 500)
        with self.worker("picture", env, 4):
            began = time.time()
            time.sleep(seconds / 3)
            get_queue().set_limit("b", None)
            b_at = time.time() - began
            time.sleep(2 * seconds / 3)
            ended = time.time()
            self.stop(["a", "b"])
        runs = self.runs()
        times = [i * 0.1 for i in range(int((ended - began) / 0.1))]
        series = {
            namespace: [sum(1 for n, s, f in runs if n == namespace and s <= began + t < (f or ended)) for t in times]
            for namespace in ("a", "b")
        }
        return {"times_s": times, "slots": series, "b_arrives_s": b_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=15.0, help="seconds of each measured window")
    parser.add_argument("--trials", type=int, default=10, help="newcomer trials")
    args = parser.parse_args()
    with bench_servers() as run, tempfile.TemporaryDirectory(prefix="stepcache-bench-") as logs:
        runner = Bench(run.env, Path(logs))
        results: dict[str, Any] = {"sleep_s": SLEEP_SECONDS}
        RESULTS.mkdir(exist_ok=True)
        partial = RESULTS / "borrowing.partial.json"  # each measure as it is taken

        def keep(name: str, value: Any) -> None:
            results[name] = value
            partial.write_text(json.dumps(results, indent=2) + "\n")

        keep("idle", {"hard_cap": runner.idle_share(False, args.window)})
        keep("idle", {**results["idle"], "borrowing": runner.idle_share(True, args.window)})
        keep("newcomer", runner.newcomer(args.trials))
        keep("weights", [runner.weights(50, 4, args.window)])
        keep("weights", [*results["weights"], runner.weights(6, 16, args.window)])
        keep("picture", runner.picture(args.window))
    report(results)


def report(results: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "borrowing.json").write_text(json.dumps(results, indent=2) + "\n")
    idle, newcomer = results["idle"], results["newcomer"]
    lines = [
        "| measure | hard cap | borrowing | target |",
        "|---|---|---|---|",
        f"| idle-worker share, 1 namespace x 10,000 jobs, limit 1, 4 slots | {idle['hard_cap']['idle_share']:.1%} "
        f"| {idle['borrowing']['idle_share']:.1%} | ~75 % / <= 5 % |",
        f"| a newcomer's one job, wait to start while another borrows every slot: p50 / max "
        f"(job durations of {results['sleep_s']} s) | | {newcomer['wait_p50_job_durations']:.2f} / "
        f"{newcomer['wait_max_job_durations']:.2f} | <= 1 |",
    ]
    for weights in results["weights"]:
        shares = " / ".join(
            f"{weights['share_by_weight'][w]:.1%} ({weights['target_share_by_weight'][w]:.1%})" for w in ("1", "2", "4")
        )
        lines.append(
            f"| weights 1, 2, 4: {weights['namespaces']} namespaces on {weights['slots']} slots: started share by "
            f"weight (target); worst namespace's error; Jain | | {shares}; {weights['worst_share_error']:.0%}; "
            f"{weights['jain_weight_normalised']:.3f} | <= 5 %; >= 0.99 |"
        )
    table = "\n".join(lines)
    picture = ascii_picture(results["picture"])
    (RESULTS / "borrowing.md").write_text(table + "\n\n```\n" + picture + "\n```\n")
    print(table + "\n\n" + picture)
    chart(results["picture"])


def ascii_picture(picture: dict[str, Any], columns: int = 60) -> str:
    """The slots each namespace holds over time, as text: a row per slot, a column per time step, `a` or
    `b` for the namespace holding the slot (a's at the bottom), `.` for an idle one."""
    times: Sequence[float] = picture["times_s"]
    a, b = picture["slots"]["a"], picture["slots"]["b"]
    step = max(1, len(times) // columns)
    samples = range(0, len(times) - step + 1, step)
    slots = 4
    rows = []
    for slot in range(slots, 0, -1):
        cells = []
        for i in samples:
            held_a, held_b = round(sum(a[i : i + step]) / step), round(sum(b[i : i + step]) / step)
            cells.append("a" if slot <= held_a else "b" if slot <= held_a + held_b else ".")
        rows.append(f"slot {slot} |{''.join(cells)}")
    arrives = int(picture["b_arrives_s"] / (times[1] - times[0]) / step) if len(times) > 1 else 0
    rows.append("        " + " " * arrives + "^ b's jobs arrive")
    rows.append(f"        0 s{' ' * (len(samples) - 8)}{times[-1]:.0f} s")
    return "\n".join(rows)


def chart(picture: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'stepcache[bench]'): no chart")
        return
    figure, axes = plt.subplots(figsize=(8, 3))
    times: Sequence[float] = picture["times_s"]
    axes.stackplot(times, picture["slots"]["a"], picture["slots"]["b"], labels=["namespace a", "namespace b"])
    axes.axvline(picture["b_arrives_s"], color="black", linestyle="--", linewidth=1)
    axes.text(picture["b_arrives_s"], 4.1, " b's jobs arrive", fontsize=8)
    axes.set_xlabel("seconds")
    axes.set_ylabel("worker slots held")
    axes.set_ylim(0, 4.6)
    axes.set_title("Limit 1 each, 4 slots, borrowing on")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(RESULTS / "borrowing.png", dpi=100)


if __name__ == "__main__":
    main()

"""Real-size data: a 2 GB CSV split and a 20,000-image folder through the steps, in real workers.

For each dataset, the steps run in fresh `celery -A tasks worker` processes (one pool process, one queue,
so each measured step is the only heavy thing its process did): split-first-rows, then
config-parquet-and-info, then split-descriptive-statistics. Each step's wall time is its job's run time
in the ledger; its peak RSS is the VmHWM of the worker's pool process when the step's cache entry
appears. The baseline is a naive full read in a fresh process, as the steps did before they streamed:
the whole split read into one Arrow table (then its first 100 rows taken, or written to Parquet, or its
columns described in memory).

    python -m bench.bench_data [--csv-gb 2] [--images 20000] [--data-dir DIR]

The generated data stays in --data-dir (default: BENCH_DATA_DIR or /tmp/stepcache-bench-data), reused by
the next run. Targets (issue 13): first rows under 1 s whatever the split's size; peak RSS under 500 MB per
process. It prints a table and writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.harness import bench_servers

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = {"csv": "bench/bigcsv", "images": "bench/images"}
LABELS = [f"class{i}" for i in range(10)]
STEPS = (  # in the graph's order; config-parquet (light, not measured) comes before the statistics
    ("split-first-rows", "light", "train"),
    ("config-parquet-and-info", "heavy", None),
    ("config-parquet", "light", None),
    ("split-descriptive-statistics", "heavy", "train"),
)
MEASURED = ("split-first-rows", "config-parquet-and-info", "split-descriptive-statistics")
TIMEOUT_SECONDS = 3600.0


def write_csv(path: Path, gigabytes: float) -> None:
    """id, text of varying length, score, flag, category: about 100 bytes a row. One row in 1,000 (`id % 1000
    == 500`) has the rare word `zyzzyva` at the end of its text: what bench_rows searches. A file written
    before that word was (no hidden marker `.<name>.v2` beside it: a hidden file, which `datasets` does not
    read as data) is written again."""
    marker = path.with_name(f".{path.name}.v2")
    if path.exists() and path.stat().st_size >= gigabytes * 1e9 and marker.exists():
        return
    marker.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    temporary = path.with_suffix(".tmp")
    with temporary.open("w") as file:
        file.write("id,text,score,flag,category\n")
        row = 0
        while file.tell() < gigabytes * 1e9:
            lines = []
            for _ in range(100_000):
                text = " ".join(rng.choices(words, k=rng.randint(3, 12)))
                if row % 1000 == 500:
                    text += " zyzzyva"
                lines.append(f"{row},{text},{rng.gauss(0, 1):.6f},{row % 3 == 0},{rng.choice(LABELS)}\n")
                row += 1
            file.write("".join(lines))
    temporary.rename(path)
    marker.write_text("one row in 1,000 ends with zyzzyva\n")


def write_images(directory: Path, count: int) -> None:
    """count small PNGs (64x64, random noise), in label folders: an image folder with a ClassLabel."""
    from PIL import Image

    done = directory / ".complete"
    if done.exists() and int(done.read_text()) >= count:
        return
    rng = random.Random(0)
    for index in range(count):
        path = directory / "train" / LABELS[index % len(LABELS)] / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        output = io.BytesIO()
        Image.frombytes("RGB", (64, 64), rng.randbytes(64 * 64 * 3)).save(output, format="PNG")
        path.write_bytes(output.getvalue())
    done.write_text(str(count))


def peak_rss_mb(pid: int) -> float:
    """A process's VmHWM (peak resident set), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def pool_peak_rss_mb(worker_pid: int) -> float:
    """The highest VmHWM (peak resident set) among the worker's pool processes."""
    import psutil

    return max(peak_rss_mb(child.pid) for child in psutil.Process(worker_pid).children(recursive=True))


def data_arguments(parser: argparse.ArgumentParser) -> None:
    """--csv-gb, --images and --data-dir: the data bench_data writes (and keeps for the next run)."""
    parser.add_argument("--csv-gb", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=20_000)
    default_dir = os.environ.get("BENCH_DATA_DIR", str(Path(tempfile.gettempdir()) / "stepcache-bench-data"))
    parser.add_argument("--data-dir", type=Path, default=Path(default_dir))


def run_step(
    env: dict[str, str], log_dir: Path, dataset: str, step: str, queue: str, split: str | None
) -> dict[str, Any]:
    """Start a fresh worker on `queue` and wait for the step's entry (the graph enqueued the step when its
    parents ended); report its run time and the worker's peak RSS at that moment."""
    from common import cache
    from common.exceptions import CachedResponseNotFoundError
    from tasks.embedded import WorkerProcess
    from tasks.queue import get_queue

    log = log_dir / f"{step}-{dataset.replace('/', '-')}.log"
    with WorkerProcess(f"bench-{step}", env, log, 1, queue) as worker:
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            try:
                entry = cache.get_response(step, dataset, "default", split)
                break
            except CachedResponseNotFoundError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{step} of {dataset} did not end (see {log})") from None
                time.sleep(0.2)
        assert worker.process is not None
        peak = pool_peak_rss_mb(worker.process.pid)
    job = next(j for j in get_queue().jobs(dataset) if j.step == step)
    assert job.started_at is not None and job.finished_at is not None
    return {
        "seconds": round((job.finished_at - job.started_at).total_seconds(), 3),
        "peak_rss_mb": round(peak, 1),
        "http_status": entry.http_status,
        "error_code": entry.error_code,
        "partial": entry.content.get("partial") if isinstance(entry.content, dict) else None,
    }


def resolution_seconds(dataset: str) -> float:
    """The run time of dataset-config-names: the first step, which resolves the repository (its configs and
    data files) for every step after it (common/dataset_modules.py)."""
    from tasks.queue import get_queue

    job = next(j for j in get_queue().jobs(dataset) if j.step == "dataset-config-names")
    assert job.started_at is not None and job.finished_at is not None
    return round((job.finished_at - job.started_at).total_seconds(), 3)


NAIVE = """
import json, resource, sys, time
import numpy as np, pyarrow as pa, pyarrow.csv as pacsv, pyarrow.parquet as pq
from pathlib import Path
kind, path, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
started = time.monotonic()
if kind == "csv":
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=64 << 20))
else:
    files = sorted(path.rglob("*.png"))
    table = pa.table({"image": pa.array([f.read_bytes() for f in files]), "label": [f.parent.name for f in files]})
rows = table.slice(0, 100).to_pylist()
first_rows = time.monotonic() - started
pq.write_table(table, out)
parquet = time.monotonic() - started
for name in table.column_names:
    column = table.column(name)
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        data = np.asarray(column.to_numpy(), dtype=float)
        np.median(data), np.histogram(data, bins=10), data.mean(), data.std()
statistics = time.monotonic() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"first_rows_seconds": first_rows, "parquet_seconds": parquet - first_rows,
                  "statistics_seconds": statistics - parquet, "peak_rss_mb": peak}))
"""


ENGINES = {  # the same statistics of the numeric columns of a Parquet file, by other engines
    "duckdb": """
import duckdb, sys
path, columns = sys.argv[1], sys.argv[2].split(",")
connection = duckdb.connect()
for c in columns:
    connection.execute(f'select count("{c}"), min("{c}"), max("{c}"), avg("{c}"), median("{c}"), '
                       f'stddev_samp("{c}") from read_parquet(?)', [path]).fetchall()
""",
    "stepcache": """
import sys
from common.progress import Progress
from tasks.steps.statistics import describe
describe(sys.argv[1], Progress(lambda meta: None), sys.argv[2].split(","))
""",
    "polars": """
import polars as pl, sys
path, columns = sys.argv[1], sys.argv[2].split(",")
frame = pl.scan_parquet(path)
for c in columns:
    column = pl.col(c)
    frame.select(column.count().alias("count"), column.min().alias("min"), column.max().alias("max"),
                 column.mean().alias("mean"), column.median().alias("median"), column.std().alias("std"),
                 ).collect(engine="streaming")
""",
}
MEASURED_RUN = """
import resource, sys, time
started = time.monotonic()
exec(sys.argv.pop(1))  # the engine's code; it reads its arguments from sys.argv[1:]
print(time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def engines(parquet: Path, columns: list[str]) -> dict[str, Any]:
    """Seconds and peak RSS of duckdb and polars (streaming) computing the numeric columns' statistics."""
    measured: dict[str, Any] = {}
    for name, code in ENGINES.items():
        done = subprocess.run(
            [sys.executable, "-c", MEASURED_RUN, code, str(parquet), ",".join(columns)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            measured[name] = {"failed": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
            continue
        seconds, peak = done.stdout.strip().splitlines()[-1].split()  # its last line: what it measured
        measured[name] = {"seconds": round(float(seconds), 3), "peak_rss_mb": round(float(peak), 1)}
    return measured


def naive(kind: str, path: Path, scratch: Path) -> dict[str, Any]:
    """The naive full read, in a fresh process (it may be killed by the OOM killer: then that is said)."""
    done = subprocess.run(
        [sys.executable, "-c", NAIVE, kind, str(path), str(scratch / f"naive-{kind}.parquet")],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return {key: round(value, 3) for key, value in json.loads(done.stdout).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(parser)
    arguments = parser.parse_args()
    mirror = arguments.data_dir / "mirror"
    console = Console()
    with console.status("writing the data (kept for the next run)"):
        write_csv(mirror / DATASETS["csv"] / "train.csv", arguments.csv_gb)
        write_images(mirror / DATASETS["images"], arguments.images)
    results: dict[str, Any] = {"csv_bytes": (mirror / DATASETS["csv"] / "train.csv").stat().st_size}
    results["image_count"] = arguments.images
    with tempfile.TemporaryDirectory(prefix="stepcache-bench-data-") as scratch_name:
        scratch = Path(scratch_name)
        extra = {
            "COMMON_HF_ENDPOINT": str(mirror),
            "WORKER_PARQUET_DIRECTORY": str(scratch / "parquet"),
            "ASSETS_STORAGE_DIRECTORY": str(scratch / "assets"),
            "COMMON_HF_CACHE_DIRECTORY": str(scratch / "hf-cache"),  # cold: nothing resolved before the run
            "WORKER_PARQUET_MAX_BYTES": str(10**11),  # convert everything: the point is the whole split
            "WORKER_MAX_JOB_DURATION_SECONDS": str(TIMEOUT_SECONDS),
            "WORKER_HEARTBEAT_INTERVAL_SECONDS": "5",
        }
        with bench_servers(**extra) as servers:
            from tasks.steps import dataset_config_names

            for kind, dataset in DATASETS.items():
                dataset_config_names.delay(dataset)  # caches config-names and split-names on the way
                with console.status(f"{dataset}: the steps"):
                    results[kind] = {
                        step: run_step(servers.env, scratch, dataset, step, queue, split)
                        for step, queue, split in STEPS
                    }
                    results[kind]["resolution_seconds"] = resolution_seconds(dataset)
                with console.status(f"{dataset}: the naive full read"):
                    path = mirror / dataset / ("train.csv" if kind == "csv" else "train")
                    results[kind]["naive"] = naive(kind, path, scratch)
            with console.status("the statistics by duckdb and polars"):
                parquet = next((scratch / "parquet" / DATASETS["csv"]).rglob("*.parquet"))
                results["csv"]["engines"] = engines(parquet, ["id", "score"])
    report(results, console)


def report(results: dict[str, Any], console: Console) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"{results['csv_bytes'] / 1e9:.2f} GB CSV split, {results['image_count']} images")
    for column in ("dataset", "step", "seconds", "peak RSS (MB)", "naive seconds", "naive peak RSS (MB)"):
        table.add_column(column)
    for kind in DATASETS:
        naive_run = results[kind]["naive"]
        for step in MEASURED:
            measured = results[kind][step]
            key = {"split-first-rows": "first_rows", "config-parquet-and-info": "parquet"}.get(step, "statistics")
            table.add_row(
                kind,
                step
                + (" (partial)" if measured["partial"] else "")
                + ("" if measured["http_status"] == 200 else f" {measured['error_code']}"),
                f"{measured['seconds']:.2f}",
                f"{measured['peak_rss_mb']:.0f}",
                str(naive_run.get(f"{key}_seconds", naive_run.get("failed"))),
                f"{naive_run['peak_rss_mb']:.0f}" if "peak_rss_mb" in naive_run else "-",
            )
    console.print(table)
    for kind in DATASETS:
        console.print(
            f"{kind}: dataset-config-names (resolves the repository once) {results[kind]['resolution_seconds']} s"
        )
    engines_table = Table(
        title="the CSV split's numeric statistics (2 columns): stepcache's and other engines' on the same Parquet file"
    )
    for column in ("engine", "seconds", "peak RSS (MB)"):
        engines_table.add_column(column)
    for name, measured in results["csv"]["engines"].items():
        failed = measured.get("failed")
        engines_table.add_row(
            name, failed or f"{measured['seconds']:.2f}", "-" if failed else f"{measured['peak_rss_mb']:.0f}"
        )
    console.print(engines_table)


if __name__ == "__main__":
    main()

"""config-parquet-and-info and what derives from it: config-parquet, config-info, config-size,
dataset-size.

config-parquet-and-info streams each split of the config into a Parquet file under
WORKER_PARQUET_DIRECTORY, at `<dataset>/--/<revision>/--/<config>/<split>/0000.parquet`, in batches (memory
stays bounded whatever the split's size), image and audio bytes inside. It stops a split once
WORKER_PARQUET_MAX_BYTES of Arrow data are converted: the split's file then holds its first rows, the
response says `partial: true`, and each split says how many rows and bytes were read. A file's `path` in
the response is relative to WORKER_PARQUET_DIRECTORY (`parquet_file` finds it): no answer names a directory
of a worker's disk.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from common.cache import get_dataset_responses
from common.config import get_config
from common.names import validate_key
from common.reading import Split
from common.tables import features
from tasks.step_task import StepJob
from tasks.steps.configs import job_split_names, open_job_split

BATCH_ROWS = 10_000
MEDIA_BATCH_ROWS = 100  # a batch of images or audio files holds their bytes


def parquet_path(dataset: str, revision: str, config: str, split: str) -> Path:
    dataset, config, split = validate_key(dataset, config, split)  # type: ignore[assignment]
    return get_config().worker.parquet_path / dataset / "--" / revision / "--" / config / split / "0000.parquet"


def stored_path(path: Path) -> str:
    """The path a response holds: relative to WORKER_PARQUET_DIRECTORY."""
    return path.relative_to(get_config().worker.parquet_path).as_posix()


def parquet_file(path: str) -> Path:
    """The file a response's `path` names (an entry written before paths were relative holds an absolute
    one: it stays as it is)."""
    return get_config().worker.parquet_path / path


def convert(
    split: Split, path: Path, max_bytes: int, converted_so_far: Callable[[int, int], None] | None = None
) -> tuple[int, int, bool]:
    """Write the split to `path` in batches, until `max_bytes` of Arrow data are converted; returns the
    rows and bytes converted, and whether the split has more (partial). `converted_so_far(rows, bytes)` is
    told after each batch. The file appears whole or not at all."""
    rows, converted, partial = 0, 0, False
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # attempts may overlap
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    try:
        batches = split.batches(MEDIA_BATCH_ROWS if split.has_media else BATCH_ROWS)
        for batch in batches:
            if converted >= max_bytes:
                partial = True
                break
            if converted + batch.nbytes > max_bytes:  # the cap falls inside this batch: keep its rows up to it
                rows_left = max(1, int(batch.num_rows * (max_bytes - converted) / batch.nbytes))
                partial, batch = rows_left < batch.num_rows, batch.slice(0, rows_left)
            table = split.embed(batch)
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows, converted = rows + table.num_rows, converted + table.nbytes
            if converted_so_far is not None:
                converted_so_far(rows, converted)
            if partial:
                break
        if writer is None:  # no rows: an empty file with the split's columns
            writer = pq.ParquetWriter(temporary, split.features.arrow_schema)
        writer.close()
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return rows, converted, partial


def partial_progress(
    job: StepJob, index: int, count: int, name: str, split: Split, max_bytes: int
) -> Callable[[int, int], None]:
    """How the conversion of split `index` of `count` reports as it goes: the share of the split done, by
    rows when the dataset's card says how many there are, else by bytes against the data files' stored
    size (or the cap, if smaller), never 100% before its end; the rows and bytes so far in the message."""
    expected_rows, stored = split.expected_size()
    expected_bytes = min(stored, max_bytes) if stored else None

    def report(rows: int, converted: int) -> None:
        done = f"{rows:,} rows, {_megabytes(converted)}"
        if expected_rows:
            share, done = rows / expected_rows, f"{rows:,} of {expected_rows:,} rows, {_megabytes(converted)}"
        elif expected_bytes:  # Arrow data is often larger than its files (compressed, or numbers as text)
            share, done = converted / expected_bytes, f"{done} of Arrow data from {_megabytes(expected_bytes)} of files"
        else:
            share = 0.0
        job.progress.update(index + min(share, 0.99), count, f"converting {name}: {done}")

    return report


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def config_parquet_and_info(job: StepJob) -> dict[str, Any]:
    assert job.config is not None
    max_bytes = get_config().worker.parquet_max_bytes
    parquet_files, splits, described = [], {}, None
    names = job_split_names(job)
    job.progress.update(0, max(1, len(names)), f"{len(names)} split(s) to convert")
    for index, name in enumerate(names):
        split = open_job_split(job, name)
        path = parquet_path(job.dataset, job.revision, job.config, name)
        progress = partial_progress(job, index, len(names), name, split, max_bytes)
        rows, converted, partial = convert(split, path, max_bytes, progress)
        size = path.stat().st_size
        parquet_files.append(
            {
                "dataset": job.dataset,
                "config": job.config,
                "split": name,
                "filename": path.name,
                "path": stored_path(path),
                "size": size,
            }
        )
        splits[name] = {"name": name, "num_examples": rows, "num_bytes": converted, "partial": partial}
        described = described or features(split.features)
        job.progress.update(index + 1, len(names), f"converted {name}: {rows} rows" + (" (partial)" if partial else ""))
    return {
        "parquet_files": parquet_files,
        "dataset_info": {
            "config_name": job.config,
            "features": described or [],
            "splits": splits,
            "download_size": sum(file["size"] for file in parquet_files),
            "dataset_size": sum(split["num_bytes"] for split in splits.values()),
        },
        "partial": any(split["partial"] for split in splits.values()),
    }


def _parent(job: StepJob) -> dict[str, Any]:
    return job.previous_step("config-parquet-and-info", job.config)


def config_parquet(job: StepJob) -> dict[str, Any]:
    parent = _parent(job)
    job.progress.update(1, 1, f"{len(parent['parquet_files'])} Parquet file(s)")  # nothing to iterate over
    return {"parquet_files": parent["parquet_files"], "partial": parent.get("partial", False)}


def config_info(job: StepJob) -> dict[str, Any]:
    parent = _parent(job)
    job.progress.update(1, 1, f"{len(parent['dataset_info']['splits'])} split(s)")  # nothing to iterate over
    return {"dataset_info": parent["dataset_info"], "partial": parent.get("partial", False)}


def config_size(job: StepJob) -> dict[str, Any]:
    parent = _parent(job)
    info, files = parent["dataset_info"], parent["parquet_files"]
    num_columns = len(info["features"])
    splits = []
    for index, (name, split) in enumerate(info["splits"].items()):
        splits.append(
            {
                "dataset": job.dataset,
                "config": job.config,
                "split": name,
                "num_rows": split["num_examples"],
                "num_bytes_memory": split["num_bytes"],
                "num_columns": num_columns,
                "num_bytes_parquet_files": sum(f["size"] for f in files if f["split"] == name),
            }
        )
        job.progress.update(index + 1, len(info["splits"]), f"split {name}")
    return {
        "size": {
            "config": {
                "dataset": job.dataset,
                "config": job.config,
                "num_columns": num_columns,
                **{
                    key: sum(s[key] for s in splits)
                    for key in ("num_rows", "num_bytes_memory", "num_bytes_parquet_files")
                },
            },
            "splits": splits,
        },
        "partial": parent.get("partial", False),
    }


def dataset_size(job: StepJob) -> dict[str, Any]:
    """Sums the configs' sizes; lists the configs whose size is missing or failed (then partial)."""
    configs = [c["config"] for c in job.previous_step("dataset-config-names")["config_names"]]
    sizes = {e.config: e for e in get_dataset_responses(job.dataset) if e.kind == "config-size"}
    job.progress.update(1, 1, f"{len(configs)} config(s)")  # one read of the cache: the end
    done = [sizes[c].content["size"] for c in configs if c in sizes and sizes[c].is_success]
    failed = [c for c in configs if c in sizes and not sizes[c].is_success]
    pending = [c for c in configs if c not in sizes]
    totals = {
        key: sum(size["config"][key] for size in done)
        for key in ("num_rows", "num_bytes_memory", "num_bytes_parquet_files")
    }
    return {
        "size": {
            "dataset": {"dataset": job.dataset, **totals},
            "configs": [size["config"] for size in done],
            "splits": [split for size in done for split in size["splits"]],
        },
        "pending": pending,
        "failed": failed,
        "partial": bool(pending or failed),
    }

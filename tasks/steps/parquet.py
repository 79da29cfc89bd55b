"""config-parquet-and-info and what derives from it: config-parquet, config-info, config-size,
dataset-size.

config-parquet-and-info writes each split of the config as a Parquet file under
WORKER_PARQUET_DIRECTORY, at `<dataset>/--/<revision>/--/<config>/<split>/0000.parquet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from common.cache import get_dataset_responses
from common.config import get_config
from common.names import validate_key
from common.tables import features, read_split
from tasks.step_task import StepJob
from tasks.steps.configs import config_layout


def parquet_path(dataset: str, revision: str, config: str, split: str) -> Path:
    dataset, config, split = validate_key(dataset, config, split)  # type: ignore[assignment]
    return get_config().worker.parquet_path / dataset / "--" / revision / "--" / config / split / "0000.parquet"


def config_parquet_and_info(job: StepJob) -> dict[str, Any]:
    assert job.config is not None
    parquet_files, splits, schema = [], {}, None
    layout = config_layout(job)
    total = 2 * len(layout)  # per split: its files read, then its Parquet file written
    job.progress.update(0, total, f"{len(layout)} split(s) to convert")
    for index, (split, files) in enumerate(layout.items()):
        table = read_split(files)
        job.progress.update(2 * index + 1, total, f"read {len(files.files)} file(s) of {split}")
        path = parquet_path(job.dataset, job.revision, job.config, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        size = path.stat().st_size
        parquet_files.append(
            {
                "dataset": job.dataset,
                "config": job.config,
                "split": split,
                "filename": path.name,
                "path": str(path),
                "size": size,
            }
        )
        splits[split] = {"name": split, "num_examples": table.num_rows, "num_bytes": table.nbytes}
        schema = schema or table.schema
        job.progress.update(2 * index + 2, total, f"converted {split}")
    assert schema is not None
    return {
        "parquet_files": parquet_files,
        "dataset_info": {
            "config_name": job.config,
            "features": features(schema),
            "splits": splits,
            "download_size": sum(file["size"] for file in parquet_files),
            "dataset_size": sum(split["num_bytes"] for split in splits.values()),
        },
        "partial": False,
    }


def _parent(job: StepJob) -> dict[str, Any]:
    return job.previous_step("config-parquet-and-info", job.config)


def config_parquet(job: StepJob) -> dict[str, Any]:
    parquet_files = _parent(job)["parquet_files"]
    job.progress.update(1, 1, f"{len(parquet_files)} Parquet file(s)")  # nothing to iterate over: the end
    return {"parquet_files": parquet_files, "partial": False}


def config_info(job: StepJob) -> dict[str, Any]:
    dataset_info = _parent(job)["dataset_info"]
    job.progress.update(1, 1, f"{len(dataset_info['splits'])} split(s)")  # nothing to iterate over: the end
    return {"dataset_info": dataset_info, "partial": False}


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
        "partial": False,
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

"""config-parquet-and-info and what derives from it: config-parquet, config-info, config-size,
dataset-size.

config-parquet-and-info streams each split of the config into a Parquet file under
WORKER_PARQUET_DIRECTORY, at `<dataset>/--/<revision>/--/<config>/<split>/0000.parquet`, in batches (memory
stays bounded whatever the split's size), image and audio bytes inside. It stops a split once
WORKER_PARQUET_MAX_BYTES of Arrow data are converted: the split's file then holds its first rows, the
response says `partial: true`, and each split says how many rows and bytes were read. A file's `path` in
the response is relative to WORKER_PARQUET_DIRECTORY (`parquet_file` finds it): no answer names a directory
of a worker's disk.

Its `dataset_info` is the config's `datasets.DatasetInfo` in the viewer's words (features as
`Features.to_dict()` gives them, splits' `num_examples` and `num_bytes` as converted, `download_size` the
original files' bytes); its `conversion` says of each split whether it was cut, its original files' bytes
and its estimated rows (for a cut split, from the card or from the bytes read: `estimated_num_rows`).
config-size and dataset-size are the viewer's ConfigSizeResponse and DatasetSizeResponse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.cache import get_dataset_responses
from common.config import get_config
from common.reading import Split
from common.storage import SplitFiles, split_files, written_whole
from common.tables import features_dict
from tasks.step_task import StepJob
from tasks.steps.configs import job_split_names, open_job_split

BATCH_ROWS = 10_000
MEDIA_BATCH_ROWS = 100  # a batch of images or audio files holds their bytes


PARQUET_FILE = "0000.parquet"


def parquet_path(dataset: str, revision: str, config: str, split: str) -> Path:
    return split_files().path(SplitFiles.key(dataset, revision, config, split, PARQUET_FILE))


def stored_path(path: Path) -> str:
    """The path a response holds: relative to WORKER_PARQUET_DIRECTORY."""
    return split_files().relative(path)


def parquet_file(path: str) -> Path:
    """The file a response's `path` names (an entry written before paths were relative holds an absolute
    one: it stays as it is)."""
    return split_files().path(path)


def convert(
    split: Split,
    path: Path,
    max_bytes: int,
    converted_so_far: Callable[[int, int], None] | None = None,
    max_row_group_bytes: int = 8_000_000,
) -> tuple[int, int, bool]:
    """Write the split to `path` in batches, until `max_bytes` of Arrow data are converted; returns the
    rows and bytes converted, and whether the split has more (partial). `converted_so_far(rows, bytes)` is
    told after each batch. The file appears whole or not at all. Its row groups hold BATCH_ROWS rows
    (MEDIA_BATCH_ROWS for images and audio), fewer when that would be more than `max_row_group_bytes`."""
    rows, converted, partial = 0, 0, False
    writer: pq.ParquetWriter | None = None
    with written_whole(path) as temporary:
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
            writer.write_table(table.cast(writer.schema), row_group_size=row_group_rows(table, max_row_group_bytes))
            rows, converted = rows + table.num_rows, converted + table.nbytes
            if converted_so_far is not None:
                converted_so_far(rows, converted)
            if partial:
                break
        if writer is None:  # no rows: an empty file with the split's columns
            writer = pq.ParquetWriter(temporary, split.features.arrow_schema)
        writer.close()
    return rows, converted, partial


def row_group_rows(table: pa.Table, max_bytes: int) -> int:
    """The rows of the table's row groups: all of them, or fewer, so that a group holds at most `max_bytes`
    of Arrow data (rows of big cells, images, audio): a reader of any 100 rows reads a bounded number of
    bytes (at least one row a group)."""
    rows: int = table.num_rows
    if table.nbytes <= max_bytes or rows <= 1:
        return max(1, rows)
    return max(1, int(rows * max_bytes / table.nbytes))


def partial_progress(
    job: StepJob, index: int, count: int, name: str, expected: tuple[int | None, int | None], max_bytes: int
) -> Callable[[int, int], None]:
    """How the conversion of split `index` of `count` reports as it goes: the share of the split done, by
    rows when the dataset's card says how many there are, else by bytes against the data files' stored
    size (or the cap, if smaller), never 100% before its end; the rows and bytes so far in the message."""
    expected_rows, stored = expected  # (Split.expected_size)
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
    """{"parquet_files", "dataset_info", "conversion", "partial"}: `dataset_info` is the config's
    `datasets.DatasetInfo` as the viewer gives it (what `DatasetInfo.from_dict` reads back), `conversion` says
    of each split whether it was cut (`partial`), its original files' bytes and its estimated rows."""
    assert job.config is not None
    settings = get_config().worker
    max_bytes = settings.parquet_max_bytes
    parquet_files, splits, conversion = [], {}, {}
    described: dict[str, Any] = {}
    builder: Any = None
    names = job_split_names(job)
    job.progress.update(0, max(1, len(names)), f"{len(names)} split(s) to convert")
    for index, name in enumerate(names):
        split = open_job_split(job, name)
        path = parquet_path(job.dataset, job.revision, job.config, name)
        card_rows, original_bytes = expected = split.expected_size()
        progress = partial_progress(job, index, len(names), name, expected, max_bytes)
        before = bytes_read()
        rows, converted, partial = convert(split, path, max_bytes, progress, settings.parquet_row_group_max_bytes)
        after = bytes_read()
        size = path.stat().st_size
        parquet_files.append(
            {
                "dataset": job.dataset,
                "config": job.config,
                "split": name,
                "filename": path.name,
                "path": stored_path(path),
                "size": size,
                "partial": partial,  # stepcache's: this split's file holds its first rows only
            }
        )
        builder = builder or split.builder
        splits[name] = {
            "name": name,
            "num_bytes": converted,
            "num_examples": rows,
            "dataset_name": split.builder.dataset_name,
        }
        read = after - before if before is not None and after is not None else None
        conversion[name] = {
            "partial": partial,
            "num_bytes_original_files": original_bytes,
            "estimated_num_rows": estimated_num_rows(rows, partial, card_rows, original_bytes, read),
            # what a reader of any 100 rows reads at most: a row group of these rows or bytes (config-parquet-metadata)
            "row_group_max_rows": MEDIA_BATCH_ROWS if split.has_media else BATCH_ROWS,
            "row_group_max_bytes": settings.parquet_row_group_max_bytes,
        }
        described = described or features_dict(split.features)  # a split without rows tells no features
        job.progress.update(index + 1, len(names), f"converted {name}: {rows} rows" + (" (partial)" if partial else ""))
    return {
        "parquet_files": parquet_files,
        "dataset_info": dataset_info(job.config, builder, described, splits, conversion),
        "conversion": conversion,
        "partial": any(split["partial"] for split in conversion.values()),
    }


def bytes_read() -> int | None:
    """The bytes this process has read so far, from files, pipes and sockets alike (Linux's `rchar`), or None
    where the system does not say. A worker process runs one job at a time: what a conversion reads is
    mostly its data files, over HTTP or from a disk."""
    try:
        with open("/proc/self/io", "rb") as counters:
            for line in counters:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimated_num_rows(
    rows: int, partial: bool, card_rows: int | None, original_bytes: int | None, read: int | None
) -> int | None:
    """The split's rows: those converted, when the whole split was; else those the dataset's card says it
    has, or else, as the viewer estimates them, the rows converted times the original files' bytes over the
    bytes the conversion read of them (at least the rows converted); None when nothing tells."""
    if not partial:
        return rows
    if card_rows:
        return max(card_rows, rows)
    if original_bytes and read:
        return max(rows, int(rows * original_bytes / read))
    return None


def dataset_info(
    config: str,
    builder: Any,
    features: dict[str, Any],
    splits: dict[str, dict[str, Any]],
    conversion: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The config's `datasets.DatasetInfo` as a dict (the viewer's InfoResponse `dataset_info`): the builder's
    description, citation, homepage, license, name and version, the features (`Features.to_dict()`), the
    splits as converted, `download_size` the original files' bytes (None when a split's are not known) and
    `dataset_size` the Arrow bytes converted."""
    info = builder.info if builder is not None else None
    originals = [split["num_bytes_original_files"] for split in conversion.values()]
    return {
        "description": getattr(info, "description", None) or "",
        "citation": getattr(info, "citation", None) or "",
        "homepage": getattr(info, "homepage", None) or "",
        "license": getattr(info, "license", None) or "",
        "features": features,
        "builder_name": builder.name if builder is not None else None,
        "dataset_name": builder.dataset_name if builder is not None else None,
        "config_name": config,
        "version": _version(builder.config.version if builder is not None else None),
        "splits": splits,
        "download_size": sum(originals) if originals and all(isinstance(o, int) for o in originals) else None,
        "dataset_size": sum(split["num_bytes"] for split in splits.values()),
    }


def _version(version: Any) -> dict[str, Any] | None:
    from datasets import Version

    if version is None:
        return None
    version = version if isinstance(version, Version) else Version(str(version))
    return {"version_str": version.version_str, "major": version.major, "minor": version.minor, "patch": version.patch}


def _parent(job: StepJob) -> dict[str, Any]:
    return job.previous_step("config-parquet-and-info", job.config)


def config_parquet(job: StepJob) -> dict[str, Any]:
    parent = _parent(job)
    job.progress.update(1, 1, f"{len(parent['parquet_files'])} Parquet file(s)")  # nothing to iterate over
    return {"parquet_files": parent["parquet_files"], "partial": parent.get("partial", False)}


def config_info(job: StepJob) -> dict[str, Any]:
    parent = _parent(job)
    job.progress.update(1, 1, f"{len(parent['dataset_info']['splits'])} split(s)")  # nothing to iterate over
    # `conversion` (stepcache's): which splits were cut, beside the viewer's fields
    conversion = parent.get("conversion", {})
    return {"dataset_info": parent["dataset_info"], "conversion": conversion, "partial": parent.get("partial", False)}


def config_size(job: StepJob) -> dict[str, Any]:
    """The viewer's ConfigSizeResponse: the config's and each split's rows, columns and bytes (in memory, in
    the Parquet files, in the original files when known) and estimated rows (the rows, when a split was
    converted whole; None when a cut split's cannot be estimated)."""
    parent = _parent(job)
    info, files = parent["dataset_info"], parent["parquet_files"]
    conversion = parent.get("conversion")
    num_columns = len(info["features"])
    splits = []
    for index, (name, split) in enumerate(info["splits"].items()):
        # (an entry of before `conversion`: its splits said whether they were cut)
        converted = (conversion or {}).get(name) or {"partial": bool(split.get("partial", False))}
        partial = bool(converted.get("partial", False))
        original = converted.get("num_bytes_original_files")
        splits.append(
            {
                "dataset": job.dataset,
                "config": job.config,
                "split": name,
                **({"num_bytes_original_files": original} if isinstance(original, int) else {}),
                "num_bytes_parquet_files": sum(f["size"] for f in files if f["split"] == name),
                "num_bytes_memory": split["num_bytes"],
                "num_rows": split["num_examples"],
                "num_columns": num_columns,
                "estimated_num_rows": converted.get("estimated_num_rows", None if partial else split["num_examples"]),
                "partial": partial,
            }
        )
        job.progress.update(index + 1, len(info["splits"]), f"split {name}")
    original = info.get("download_size") if conversion is not None else None
    return {
        "size": {
            "config": {
                "dataset": job.dataset,
                "config": job.config,
                **({"num_bytes_original_files": original} if isinstance(original, int) else {}),
                **_sums(splits),
                "num_columns": num_columns,
                "estimated_num_rows": _estimate(splits),
            },
            "splits": splits,
        },
        "partial": parent.get("partial", False),
    }


SUMMED = ("num_bytes_parquet_files", "num_bytes_memory", "num_rows")


def _sums(sizes: list[dict[str, Any]]) -> dict[str, int]:
    return {key: sum(size[key] for size in sizes) for key in SUMMED}


def _estimate(sizes: list[dict[str, Any]]) -> int | None:
    """The sum of the estimated rows, when each is known."""
    estimates = [size.get("estimated_num_rows") for size in sizes]
    return sum(e for e in estimates if e is not None) if estimates and None not in estimates else None


def dataset_size(job: StepJob) -> dict[str, Any]:
    """The viewer's DatasetSizeResponse: the configs' sizes summed; `pending` and `failed` list the
    config-size jobs of the configs whose size is missing or failed (then partial, as when a config was cut)."""
    configs = [c["config"] for c in job.previous_step("dataset-config-names")["config_names"]]
    sizes = {e.config: e for e in get_dataset_responses(job.dataset) if e.kind == "config-size"}
    job.progress.update(1, 1, f"{len(configs)} config(s)")  # one read of the cache: the end
    done = [sizes[c].content for c in configs if c in sizes and sizes[c].is_success]
    failed = [c for c in configs if c in sizes and not sizes[c].is_success]
    pending = [c for c in configs if c not in sizes]
    totals = [content["size"]["config"] for content in done]
    originals = [total.get("num_bytes_original_files") for total in totals]

    def jobs(names: list[str]) -> list[dict[str, Any]]:
        return [{"kind": "config-size", "dataset": job.dataset, "config": name, "split": None} for name in names]

    return {
        "size": {
            "dataset": {
                "dataset": job.dataset,
                **({"num_bytes_original_files": sum(originals)} if all(isinstance(o, int) for o in originals) else {}),
                **_sums(totals),
                "estimated_num_rows": _estimate(totals),
            },
            "configs": totals,
            "splits": [split for content in done for split in content["size"]["splits"]],
        },
        "pending": jobs(pending),
        "failed": jobs(failed),
        "partial": bool(pending or failed) or any(content.get("partial", False) for content in done),
    }

"""config-parquet-metadata and split-duckdb-index: what /rows, /search and /filter read a split with.

config-parquet-metadata keeps, for each Parquet file of the config (its `parquet_files_metadata`, as the
viewer's step of that name), the file's rows and its row groups' rows and bytes (`row_groups`:
`[[num_rows, total_byte_size], ...]`, in order), and the config's features (`Features.to_dict()`): /rows
picks the row groups that hold a page's rows from it, and reads only those.

split-duckdb-index builds the split's DuckDB index (common.split_index: its rows, and the words of its
string columns) from its Parquet file, as a file beside it (common.storage), its first rows only when the
Parquet data is more than WORKER_DUCKDB_INDEX_MAX_BYTES (`partial`), within WORKER_DUCKDB_MEMORY_LIMIT_BYTES
and WORKER_DUCKDB_THREADS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from common.config import get_config
from common.exceptions import SplitNotFoundError
from common.rows import with_sampling_rates
from common.split_index import build_index
from common.storage import SplitFiles, split_files
from common.tables import features_dict, features_of
from tasks.step_task import StepJob
from tasks.steps.parquet import parquet_file

INDEX_FILE = "index.duckdb"
FILE_FIELDS = ("dataset", "config", "split", "filename", "path", "size", "partial")


def config_parquet_metadata(job: StepJob) -> dict[str, Any]:
    """{"parquet_files_metadata": [{dataset, config, split, filename, path, size, partial, num_rows, row_groups}],
    "features", "partial"} (a file's `partial`: it holds the split's first rows only)."""
    parent = job.previous_step("config-parquet", job.config)
    files = parent["parquet_files"]
    described: dict[str, Any] = {}
    metadata = []
    for index, file in enumerate(files):
        path = parquet_file(file["path"])
        footer = pq.read_metadata(path)
        groups = [footer.row_group(group) for group in range(footer.num_row_groups)]
        metadata.append(
            {
                **{field: file.get(field) for field in FILE_FIELDS},
                "num_rows": footer.num_rows,
                "row_groups": [[group.num_rows, group.total_byte_size] for group in groups],
            }
        )
        described = described or described_features(path, footer)
        job.progress.update(index + 1, len(files), f"read the footer of {file['split']}'s file")
    return {"parquet_files_metadata": metadata, "features": described, "partial": bool(parent.get("partial", False))}


def described_features(path: Path, footer: pq.FileMetaData) -> dict[str, Any]:
    """The features the file's schema carries, each Audio feature with the sampling rate its first files'
    headers give when it does not say (the viewer's FeatureItem has one), as first rows' features."""
    described = features_dict(features_of(footer.schema.to_arrow_schema()))
    audio = [name for name, kind in described.items() if isinstance(kind, dict) and kind.get("_type") == "Audio"]
    if not audio or not footer.num_row_groups:
        return described
    first = pq.ParquetFile(path, metadata=footer).read_row_group(0, columns=audio).slice(0, 100).to_pylist()
    listed = [{"name": name, "type": kind} for name, kind in described.items()]
    return {item["name"]: item["type"] for item in with_sampling_rates(listed, first)}


def split_duckdb_index(job: StepJob) -> dict[str, Any]:
    """{"path", "size", "num_rows", "num_rows_total", "indexed_columns", "features", "partial"}: the split's index file
    (`path` relative to the storage, as the Parquet files'), the rows indexed of the split's `num_rows_total`
    (the rows of its Parquet file), the string columns whose words /search finds, and whether rows are left
    out (by the index's cap, or because the Parquet file holds the split's first rows only). A split without
    columns has no index file (`path` null)."""
    assert job.config is not None and job.split is not None
    parent = job.previous_step("config-parquet-metadata", job.config)
    files = [file for file in parent["parquet_files_metadata"] if file.get("split") == job.split]
    if not files:
        raise SplitNotFoundError(f"the config's Parquet files have no file of split {job.split!r}")
    settings = get_config().worker
    storage = split_files()
    key = SplitFiles.key(job.dataset, job.revision, job.config, job.split, INDEX_FILE)
    job.progress.update(0, 1, f"indexing {sum(file['num_rows'] for file in files):,} rows")
    if not pq.read_schema(parquet_file(files[0]["path"])).names:  # no column (an empty CSV file): nothing to find
        nothing: dict[str, Any] = {"path": None, "size": 0, "num_rows": 0, "num_rows_total": 0, "indexed_columns": []}
        return {**nothing, "features": {}, "partial": False}
    built = build_index(
        [parquet_file(file["path"]) for file in files],
        storage.path(key),
        settings.duckdb_index_max_bytes,
        settings.duckdb_memory_limit_bytes,
        settings.duckdb_threads,
    )
    job.progress.update(1, 1, f"indexed {built['num_rows']:,} rows")
    return {
        "path": key,
        "size": built["size"],
        "num_rows": built["num_rows"],
        "num_rows_total": built["num_rows_total"],
        "indexed_columns": built["indexed_columns"],
        "features": parent["features"],
        "partial": bool(built["partial"] or any(file.get("partial") for file in files)),
    }

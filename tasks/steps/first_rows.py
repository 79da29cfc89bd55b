"""split-first-rows: the features and the first rows of a split, fitted to WORKER_FIRST_ROWS_MAX_BYTES.

Image and audio cells are written to the asset storage and replaced by their URLs. When the rows are too
big, the longest cells are truncated (their names listed in the row's `truncated_cells`) and, if that is
not enough, rows are dropped from the end (`truncated` is then true).
"""

from __future__ import annotations

import json
from typing import Any

from common.assets import CellLocation, store_audio, store_image
from common.config import get_config
from common.exceptions import SplitNotFoundError, TooManyColumnsError
from common.tables import column_kind, features, read_split
from tasks.step_task import StepJob
from tasks.steps.configs import config_layout

MAX_ROWS = 100


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def _cell(value: Any, kind: str, location: CellLocation) -> Any:
    if value is None:
        return None
    if kind == "image":
        return store_image(location, value)
    if kind == "audio":
        return store_audio(location, value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def _truncate(rows: list[dict[str, Any]], max_bytes: int, min_cell_bytes: int) -> bool:
    """Fit the rows into max_bytes; True when rows had to be dropped."""
    if _size(rows) <= max_bytes:
        return False
    for row in rows:
        for name, value in row["row"].items():
            if isinstance(value, str) and len(value.encode()) > min_cell_bytes:
                row["row"][name] = value.encode()[:min_cell_bytes].decode(errors="ignore")
                row["truncated_cells"].append(name)
    dropped = False
    while len(rows) > 1 and _size(rows) > max_bytes:
        rows.pop()
        dropped = True
    return dropped


def split_first_rows(job: StepJob) -> dict[str, Any]:
    assert job.config is not None and job.split is not None
    splits = config_layout(job)
    if job.split not in splits:
        raise SplitNotFoundError(f"config {job.config!r} has no split {job.split!r}; it has {sorted(splits)}")
    settings = get_config().worker
    files = splits[job.split].files
    job.progress.update(0, 1, f"reading {len(files)} file(s) of split {job.split}")
    table = read_split(splits[job.split])
    if table.num_columns > settings.first_rows_max_columns:
        raise TooManyColumnsError(
            f"the split has {table.num_columns} columns, more than WORKER_FIRST_ROWS_MAX_COLUMNS="
            f"{settings.first_rows_max_columns}"
        )
    kinds = [column_kind(field) for field in table.schema]
    rows = []
    records = table.slice(0, MAX_ROWS).to_pylist()
    for index, record in enumerate(records):
        row = {}
        for column_index, (name, value) in enumerate(record.items()):
            location = CellLocation(job.dataset, job.revision, job.config, job.split, index, name, column_index)
            row[name] = _cell(value, kinds[column_index], location)
        rows.append({"row_idx": index, "row": row, "truncated_cells": []})
        # one row at a time: image and audio cells are written to the asset storage
        job.progress.update(index + 1, len(records) + 1, f"row {index + 1} of {len(records)}")
    truncated = _truncate(rows, settings.first_rows_max_bytes, settings.first_rows_min_cell_bytes)
    job.progress.update(1, 1, f"{len(rows)} rows")
    return {
        "dataset": job.dataset,
        "config": job.config,
        "split": job.split,
        "features": features(table.schema),
        "rows": rows,
        "truncated": truncated or table.num_rows > MAX_ROWS,
    }

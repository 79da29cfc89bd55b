"""split-first-rows: the features and the first rows of a split, read in streaming mode.

Only the first WORKER_FIRST_ROWS_MAX_ROWS rows are read (plus one, to know whether there are more), and
only their media files are fetched. Image and audio cells are written to the asset storage and replaced by
their URLs. A string cell longer than WORKER_FIRST_ROWS_MAX_CELL_BYTES is cut there; when the rows are
still too big for WORKER_FIRST_ROWS_MAX_BYTES, the longest cells are cut to WORKER_FIRST_ROWS_MIN_CELL_BYTES
and, if that is not enough, rows are dropped from the end. Cut cells are named in the row's
`truncated_cells`; `truncated` says the split has more rows than the response.

The features are `datasets`'s (`Features.to_dict()`), as the viewer lists them; an Audio feature that does
not say its sampling rate gets the one its first file's header gives (the viewer's FeatureItem has one).
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from common.assets import CellLocation, store_audio, store_image
from common.config import get_config
from common.exceptions import DatasetGenerationError, TooManyColumnsError
from common.redaction import redact
from common.tables import audio_header, column_kind, features
from tasks.step_task import StepJob
from tasks.steps.configs import open_job_split


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def _cell(value: Any, kind: str, location: CellLocation) -> Any:
    if value is None:
        return None
    if kind in ("image", "audio"):
        data = value.get("bytes") if isinstance(value, dict) else None
        if data is None:
            return None
        if kind == "audio":
            return store_audio(location, data)
        try:
            return store_image(location, data)
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # not an image, truncated, a bomb
            raise DatasetGenerationError(
                redact(f"row {location.row}, column {location.column!r}: not a readable image ({error})"), error
            ) from error
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def _with_sampling_rates(described: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The features, each Audio column's with a `sampling_rate`: its own, or else that of the header of
    its first file among the rows (none when no row has a file it can read)."""
    for item in described:
        feature = item["type"]
        if not isinstance(feature, dict) or feature.get("_type") != "Audio" or feature.get("sampling_rate"):
            continue
        for record in records:
            cell = record.get(item["name"])
            data = cell.get("bytes") if isinstance(cell, dict) else None
            rate = audio_header(data).sampling_rate if isinstance(data, bytes) else None
            if rate:
                item["type"] = {"sampling_rate": rate, **feature}
                break
    return described


def _cut(row: dict[str, Any], max_cell_bytes: int) -> None:
    """Cut the row's string cells longer than max_cell_bytes, naming them in truncated_cells."""
    for name, value in row["row"].items():
        if isinstance(value, str) and len(value.encode()) > max_cell_bytes:
            row["row"][name] = value.encode()[:max_cell_bytes].decode(errors="ignore")
            if name not in row["truncated_cells"]:
                row["truncated_cells"].append(name)


def _truncate(rows: list[dict[str, Any]], max_bytes: int, min_cell_bytes: int) -> bool:
    """Fit the rows into max_bytes; True when rows had to be dropped."""
    if _size(rows) <= max_bytes:
        return False
    for row in rows:
        _cut(row, min_cell_bytes)
    dropped = False
    while len(rows) > 1 and _size(rows) > max_bytes:
        rows.pop()
        dropped = True
    return dropped


def split_first_rows(job: StepJob) -> dict[str, Any]:
    assert job.config is not None and job.split is not None
    settings = get_config().worker
    split = open_job_split(job)
    if len(split.features) > settings.first_rows_max_columns:
        raise TooManyColumnsError(
            f"the split has {len(split.features)} columns, more than WORKER_FIRST_ROWS_MAX_COLUMNS="
            f"{settings.first_rows_max_columns}"
        )
    job.progress.update(0, 1, f"reading the first rows of split {job.split}")
    first = next(split.batches(settings.first_rows_max_rows + 1), None)  # nothing after it is read
    more = first is not None and first.num_rows > settings.first_rows_max_rows
    records = split.embed(first.slice(0, settings.first_rows_max_rows)).to_pylist() if first is not None else []
    kinds = {name: column_kind(feature) for name, feature in split.features.items()}
    rows = []
    for index, record in enumerate(records):
        row = {}
        for column_index, (name, value) in enumerate(record.items()):
            location = CellLocation(job.dataset, job.revision, job.config, job.split, index, name, column_index)
            row[name] = _cell(value, kinds.get(name, "other"), location)
        rows.append({"row_idx": index, "row": row, "truncated_cells": []})
        _cut(rows[-1], settings.first_rows_max_cell_bytes)
        # one row at a time: image and audio cells are written to the asset storage
        job.progress.update(index + 1, len(records) + 1, f"row {index + 1} of {len(records)}")
    dropped = _truncate(rows, settings.first_rows_max_bytes, settings.first_rows_min_cell_bytes)
    job.progress.update(1, 1, f"{len(rows)} rows")
    return {
        "dataset": job.dataset,
        "config": job.config,
        "split": job.split,
        "features": _with_sampling_rates(features(split.features), records),
        "rows": rows,
        "truncated": dropped or more,
    }

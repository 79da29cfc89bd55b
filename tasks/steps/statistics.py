"""split-descriptive-statistics: per-column statistics of a split, computed from its Parquet file.

Every column: nulls (count and proportion). Numbers: min, max, mean, median, std and a histogram.
Strings: the same statistics over their lengths. Booleans and class labels: frequencies.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.exceptions import SplitNotFoundError
from common.tables import NAMES_KEY, column_kind
from tasks.step_task import StepJob

HISTOGRAM_BINS = 10


def _numbers(values: pa.ChunkedArray) -> dict[str, Any]:
    data = np.asarray(values.drop_null().to_numpy(zero_copy_only=False), dtype=float)
    if data.size == 0:
        return {"min": None, "max": None, "mean": None, "median": None, "std": None, "histogram": None}
    counts, edges = np.histogram(data, bins=min(HISTOGRAM_BINS, max(1, len(np.unique(data)))))
    return {
        "min": float(data.min()),
        "max": float(data.max()),
        "mean": float(data.mean()),
        "median": float(np.median(data)),
        "std": float(data.std(ddof=1)) if data.size > 1 else 0.0,
        "histogram": {"hist": counts.tolist(), "bin_edges": edges.tolist()},
    }


def _frequencies(values: pa.ChunkedArray, names: list[str] | None = None) -> dict[str, Any]:
    counted = pc.value_counts(values.drop_null()).to_pylist()
    frequencies = {(names[c["values"]] if names else str(c["values"]).lower()): c["counts"] for c in counted}
    return {"n_unique": len(frequencies), "frequencies": frequencies}


def column_statistics(field: pa.Field, values: pa.ChunkedArray) -> dict[str, Any] | None:
    kind = column_kind(field)
    nulls = values.null_count
    statistics: dict[str, Any] = {
        "nan_count": nulls,
        "nan_proportion": round(nulls / len(values), 5) if len(values) else 0,
    }
    if kind == "number":
        statistics |= _numbers(values)
    elif kind == "string":
        statistics |= _numbers(pc.utf8_length(values))
    elif kind == "bool":
        statistics |= _frequencies(values)
    elif kind == "class_label":
        statistics |= _frequencies(values, json.loads((field.metadata or {})[NAMES_KEY]))
    else:
        return None
    return {"column_name": field.name, "column_type": kind, "column_statistics": statistics}


def split_descriptive_statistics(job: StepJob) -> dict[str, Any]:
    assert job.config is not None and job.split is not None
    files = job.previous_step("config-parquet", job.config)["parquet_files"]
    paths = [f["path"] for f in files if f["split"] == job.split]
    if not paths:
        raise SplitNotFoundError(f"config {job.config!r} has no Parquet file for split {job.split!r}")
    job.progress.update(0, 1, f"reading {len(paths)} Parquet file(s)")
    table = pa.concat_tables([pq.read_table(path) for path in paths])
    columns = []
    for index, field in enumerate(table.schema):
        columns.append(column_statistics(field, table.column(field.name)))
        job.progress.update(index + 1, table.num_columns, f"column {field.name}")
    return {
        "num_examples": table.num_rows,
        "statistics": [c for c in columns if c is not None],
        "partial": False,
    }

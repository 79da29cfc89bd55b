"""split-descriptive-statistics: per-column statistics of a split, computed from its Parquet file in batches.

Every column: nulls (count and proportion; NaN and infinite numbers count as nulls). Numbers: min, max,
mean, median, std and a histogram. Strings: the same statistics over their lengths. Booleans and class
labels: frequencies.

Memory stays bounded whatever the split's size: the file is read in batches of BATCH_ROWS rows, the
columns it needs only. A first pass gives counts, extremes, mean and variance (merged batch by batch,
Chan's formulas) and frequencies; a second pass the histogram and the bin that holds the median; further
passes narrow that bin until it holds at most MEDIAN_MAX_VALUES values, which are kept and sorted. The
median is exact. A split whose numbers fit in KEEP_MAX_VALUES is read once: its numbers are kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.exceptions import SplitNotFoundError
from common.progress import Progress
from common.tables import column_kind, features_of
from tasks.step_task import StepJob
from tasks.steps.parquet import parquet_file

HISTOGRAM_BINS = 10
BATCH_ROWS = 65_536
MEDIAN_BINS = 4096
MEDIAN_MAX_VALUES = 1_000_000
KEEP_MAX_VALUES = 4_000_000  # 32 MB of floats: a small split's numbers are kept, and read once
NUMERIC_KINDS = ("number", "string")


@dataclass
class Moments:
    """Count, extremes, mean and sum of squared deviations of the values seen so far."""

    count: int = 0
    low: float = np.inf
    high: float = -np.inf
    mean: float = 0.0
    squares: float = 0.0

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        mean = float(values.mean())
        squares = float(((values - mean) ** 2).sum())
        total = self.count + values.size
        delta = mean - self.mean
        self.squares += squares + delta * delta * self.count * values.size / total
        self.mean += delta * values.size / total
        self.count = total
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))


@dataclass
class Column:
    name: str
    kind: str
    names: list[str] | None = None  # a class label's
    integer: bool = False  # a number column of an integer type: its histogram's bins are integers
    rows: int = 0
    nulls: int = 0
    moments: Moments = field(default_factory=Moments)
    frequencies: Counter[Any] = field(default_factory=Counter)
    kept: list[np.ndarray] | None = None  # every value, when the split's numbers fit in KEEP_MAX_VALUES

    def add(self, values: pa.Array) -> None:
        """Count a batch of the column's values (the first pass)."""
        self.rows += len(values)
        self.nulls += values.null_count
        if self.kind in NUMERIC_KINDS:
            numbers = _numbers(self.kind, values)
            self.nulls += len(values) - values.null_count - numbers.size  # NaN and infinities
            self.moments.add(numbers)
            if self.kept is not None:
                self.kept.append(numbers)
        else:
            self.frequencies.update({c["values"]: c["counts"] for c in pc.value_counts(values.drop_null()).to_pylist()})


def _numbers(kind: str, values: pa.Array) -> np.ndarray:
    """The column's values as floats (a string's are its lengths), nulls, NaN and infinities left out."""
    values = values.drop_null()
    if kind == "string":
        values = pc.utf8_length(values)
    numbers = np.asarray(values.to_numpy(zero_copy_only=False), dtype=float)
    finite: np.ndarray = numbers[np.isfinite(numbers)]
    return finite


def _numeric_batches(path: str, column: Column) -> Iterator[np.ndarray]:
    if column.kept is not None:
        yield from column.kept
        return
    for batch in _batches(path, [column.name]):
        yield _numbers(column.kind, batch.column(0))


def _median(path: str, column: Column) -> float:
    """The exact median: the middle value, or the mean of the two middle ones."""
    count = column.moments.count
    lower = _select(path, column, (count - 1) // 2)
    if count % 2:
        return lower
    # The upper middle value, in one pass: the lower one again, or else the smallest value above it.
    at_most, above = 0, np.inf
    for values in _numeric_batches(path, column):
        at_most += int((values <= lower).sum())
        bigger = values[values > lower]
        if bigger.size:
            above = min(above, float(bigger.min()))
    upper = lower if at_most > count // 2 else above
    return float(np.mean([lower, upper]))


def _select(path: str, column: Column, rank: int) -> float:
    """The value of 0-based `rank` among the column's sorted values, from passes that narrow a range holding
    it until that range's values fit in MEDIAN_MAX_VALUES.

    Each pass counts, exactly, the values under the range and, by bin, those inside it; the next range is
    the bin holding the rank (widened by a rounding step). A range that stops shrinking holds a few
    distinct values (ties, or neighbouring floats): they are counted by value instead. (When a small
    split's values are kept in memory, the passes are over them.)"""
    low, high = column.moments.low, column.moments.high
    while True:
        below, counts, extremes = 0, np.zeros(MEDIAN_BINS, dtype=np.int64), [np.inf, -np.inf]
        for values in _numeric_batches(path, column):
            below += int((values < low).sum())
            inside = values[(values >= low) & (values <= high)]
            if inside.size:
                scaled = (inside - low) * (MEDIAN_BINS / (high - low)) if high > low else np.zeros(inside.size)
                counts += np.bincount(np.minimum(scaled.astype(np.int64), MEDIAN_BINS - 1), minlength=MEDIAN_BINS)
                extremes = [min(extremes[0], inside.min()), max(extremes[1], inside.max())]
        if extremes[0] == extremes[1]:  # one value in the range: the one at the rank
            return float(extremes[0])
        index = int(np.searchsorted(below + np.cumsum(counts), rank, side="right"))
        width = (high - low) / MEDIAN_BINS
        narrowed = (np.nextafter(low + index * width, -np.inf), np.nextafter(low + (index + 1) * width, np.inf))
        narrowed = (max(narrowed[0], low), min(narrowed[1], high))
        if int(counts[index]) <= MEDIAN_MAX_VALUES or narrowed == (low, high):
            break
        low, high = narrowed
    if narrowed == (low, high):  # it stopped shrinking: few distinct values, counted by value
        tally: Counter[float] = Counter()
        for values in _numeric_batches(path, column):
            distinct, times = np.unique(values[(values >= low) & (values <= high)], return_counts=True)
            tally.update(dict(zip(distinct.tolist(), times.tolist(), strict=True)))
        position = below
        for value in sorted(tally):
            position += tally[value]
            if position > rank:
                return float(value)
    low, high = narrowed
    below, kept = 0, []
    for values in _numeric_batches(path, column):
        below += int((values < low).sum())
        kept.append(values[(values >= low) & (values <= high)])
    return float(np.sort(np.concatenate(kept))[rank - below])


def _histogram(path: str, column: Column) -> dict[str, list[Any]]:
    low, high = column.moments.low, column.moments.high
    bins = HISTOGRAM_BINS
    if column.integer or column.kind == "string":  # lengths are integers too
        bins = max(1, min(HISTOGRAM_BINS, int(high - low) + 1))
    edges = np.linspace(low, high, bins + 1) if high > low else np.array([low, high])
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    for values in _numeric_batches(path, column):
        counts += np.histogram(values, bins=edges)[0]
    return {"hist": counts.tolist(), "bin_edges": edges.tolist()}


def _statistics(path: str, column: Column) -> dict[str, Any]:
    statistics: dict[str, Any] = {
        "nan_count": column.nulls,
        "nan_proportion": round(column.nulls / column.rows, 5) if column.rows else 0,
    }
    if column.kind in NUMERIC_KINDS:
        moments = column.moments
        if moments.count == 0:
            return statistics | dict.fromkeys(("min", "max", "mean", "median", "std", "histogram"))
        return statistics | {
            "min": moments.low,
            "max": moments.high,
            "mean": moments.mean,
            "median": _median(path, column),
            "std": float(np.sqrt(moments.squares / (moments.count - 1))) if moments.count > 1 else 0.0,
            "histogram": _histogram(path, column),
        }
    names = column.names
    if names is None:
        frequencies = {str(k).lower(): n for k, n in column.frequencies.items()}
        return statistics | {"n_unique": len(frequencies), "frequencies": frequencies}
    # A class label: -1 (or any value that names no class) is "no label", as in unlabelled test splits.
    frequencies = {names[k]: n for k, n in column.frequencies.items() if 0 <= k < len(names)}
    unlabelled = sum(n for k, n in column.frequencies.items() if not 0 <= k < len(names))
    return statistics | {
        "no_label_count": unlabelled,
        "no_label_proportion": round(unlabelled / column.rows, 5) if column.rows else 0,
        "n_unique": len(frequencies),
        "frequencies": frequencies,
    }


def split_descriptive_statistics(job: StepJob) -> dict[str, Any]:
    assert job.config is not None and job.split is not None
    parent = job.previous_step("config-parquet", job.config)
    files = [f for f in parent["parquet_files"] if f["split"] == job.split]
    if not files:
        raise SplitNotFoundError(f"config {job.config!r} has no Parquet file for split {job.split!r}")
    return describe(str(parquet_file(files[0]["path"])), job.progress) | {"partial": bool(parent.get("partial", False))}


def describe(path: str, progress: Progress, only: list[str] | None = None) -> dict[str, Any]:
    """{"num_examples", "statistics"} of a Parquet file (of its columns named in `only`), read in batches."""
    features = features_of(pq.read_schema(path))
    columns = [Column(name, column_kind(f)) for name, f in features.items() if only is None or name in only]
    for column in columns:
        feature = features[column.name]
        if column.kind == "class_label":
            column.names = list(feature.names)
        column.integer = column.kind == "number" and str(feature.dtype).startswith(("int", "uint"))
    columns = [c for c in columns if c.kind in (*NUMERIC_KINDS, "bool", "class_label")]
    total = pq.ParquetFile(path).metadata.num_rows
    steps = max(1, total + len(columns))  # every row read, then every column's passes
    progress.update(0, steps, f"reading {total} rows")
    numeric = [c for c in columns if c.kind in NUMERIC_KINDS]
    if total * len(numeric) <= KEEP_MAX_VALUES:
        for column in numeric:
            column.kept = []
    read = 0
    for batch in _batches(path, [c.name for c in columns]):
        for column in columns:
            column.add(batch.column(column.name))
        read += batch.num_rows
        progress.update(read, steps, f"read {read} of {total} rows")
    statistics = []
    for index, column in enumerate(columns):
        statistics.append(
            {"column_name": column.name, "column_type": column.kind, "column_statistics": _statistics(path, column)}
        )
        progress.update(total + index + 1, steps, f"column {column.name}")
    return {"num_examples": total, "statistics": statistics}


def _batches(path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's batches, the given columns only, without buffering whole row groups ahead."""
    batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path, pre_buffer=False).iter_batches(
        batch_size=BATCH_ROWS, columns=columns
    )
    return batches

"""split-descriptive-statistics: per-column statistics of a split, computed from its Parquet file in batches,
in the dataset viewer's vocabulary.

Each column gets a `column_type`, as the viewer names them, and the viewer's statistics for it:

- `int`, `float`: nulls (count and proportion; NaN and infinite numbers count as nulls), min, max, mean,
  median, std (rounded to 5 decimals) and a histogram of 10 bins (an integer column's bins are integers:
  their width is ceil((max - min + 1) / 10), so there may be fewer);
- `string_label`: a string column with few distinct values, as the viewer tells them (at most 10, or at
  most 1,000 and at most a fifth of the rows, null counting as a value): the frequency of each;
- `string_text`: any other string column: the statistics of an integer column, over the strings' lengths;
- `bool`: frequencies (`"False"`, `"True"`); `class_label`: the frequency of every class (0 included) and,
  as `no_label_count`, the rows whose value names no class (-1, as in unlabelled test splits);
- `list`: the statistics of an integer column over the lists' lengths;
- `image`: over the images' widths (read from their headers); `audio`: over the durations the files'
  headers give (WAV, FLAC, Ogg, MP3: common.tables.audio_header), in seconds; an image or audio file
  whose header cannot be read counts as null;
- `datetime` (a timestamp column): min, max, mean and median as dates, std as a duration, and a histogram
  whose bin edges are dates.

Other columns (structs, binary, strings holding dates...) are left out.

Memory stays bounded whatever the split's size: the file is read in batches of BATCH_ROWS rows (image and
audio columns MEDIA_BATCH_ROWS at a time, one column at a time), the columns it needs only. A first pass
gives counts, extremes, mean and variance (merged batch by batch, Chan's formulas) and frequencies (a
string column's only while it may still be a label: at most MAX_NUM_STRING_LABELS distinct values, of
STRING_LABELS_MAX_BYTES in all); a second pass the histogram and the bin that holds the median; further
passes narrow that bin until it holds at most MEDIAN_MAX_VALUES values, which are kept and sorted. The
median is exact. A split whose numbers fit in KEEP_MAX_VALUES is read once: its numbers are kept. Image
widths and audio durations are read once: kept, or else written to a temporary file the later passes read.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.exceptions import SplitNotFoundError
from common.progress import Progress
from common.reading import feature_type
from common.tables import audio_header, features_of
from tasks.step_task import StepJob
from tasks.steps.parquet import parquet_file

HISTOGRAM_BINS = 10
DECIMALS = 5
BATCH_ROWS = 65_536
MEDIA_BATCH_ROWS = 100  # a batch of images or audio files holds their bytes
MEDIAN_BINS = 4096
MEDIAN_MAX_VALUES = 1_000_000
KEEP_MAX_VALUES = 4_000_000  # 32 MB of floats: a small split's numbers are kept, and read once
# The viewer's categorical strings: at most MAX_NUM_STRING_LABELS distinct values and at most
# MAX_PROPORTION_STRING_LABELS of the rows, or at most HISTOGRAM_BINS distinct values whatever the rows.
MAX_PROPORTION_STRING_LABELS = 0.2
MAX_NUM_STRING_LABELS = 1000
STRING_LABELS_MAX_BYTES = 16_000_000  # the distinct values kept while counting them; past it: string_text
NUMERIC_KINDS = ("int", "float", "string", "list", "image", "audio", "datetime")  # described by numbers
INTEGER_KINDS = ("int", "string", "list", "image")  # whose numbers are integers: integer bins
MEDIA_KINDS = ("image", "audio")
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
FLOAT_DTYPES = ("float16", "float32", "float64")
STRING_DTYPES = ("string", "large_string")


def kind_of(feature: Any, arrow_type: pa.DataType) -> str | None:
    """The column's kind (the viewer's column types, `string` before it is told label or text), or None
    for a column not described."""
    kind = feature_type(feature)
    if kind == "ClassLabel":
        return "class_label"
    if kind in ("Image", "Audio"):
        return kind.lower()
    if isinstance(feature, (list, tuple)) or kind in ("List", "LargeList", "Sequence"):
        is_list = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
        return "list" if is_list or pa.types.is_fixed_size_list(arrow_type) else None
    if kind != "Value":
        return None
    dtype = str(feature.dtype)
    if dtype in INTEGER_DTYPES:
        return "int"
    if dtype in FLOAT_DTYPES:
        return "float"
    if dtype in STRING_DTYPES:
        return "string"
    if dtype == "bool":
        return "bool"
    if dtype.startswith("timestamp"):
        return "datetime"
    return None


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
    kind: str  # see kind_of
    names: list[str] | None = None  # a class label's
    timezone: str | None = None  # a datetime's
    rows: int = 0
    nulls: int = 0
    moments: Moments = field(default_factory=Moments)
    frequencies: Counter[Any] | None = field(default_factory=Counter)  # a string's: None once it is text
    labels_bytes: int = 0  # the bytes of a string column's distinct values counted so far
    kept: list[np.ndarray] | None = None  # every number, when the split's numbers fit in KEEP_MAX_VALUES
    spilled: IO[bytes] | None = None  # or else, for images and audio, the file they are written to

    def add(self, values: pa.Array) -> None:
        """Count a batch of the column's values (the first pass)."""
        self.rows += len(values)
        self.nulls += values.null_count
        if self.kind in NUMERIC_KINDS:
            numbers = _numbers(self.kind, values)
            self.nulls += len(values) - values.null_count - numbers.size  # NaN, infinities, unreadable files
            self.moments.add(numbers)
            if self.kept is not None:
                self.kept.append(numbers)
            elif self.spilled is not None:
                self.spilled.write(numbers.astype(np.float64).tobytes())
        if self.kind in ("bool", "class_label", "string") and self.frequencies is not None:
            counts = {c["values"]: c["counts"] for c in pc.value_counts(values.drop_null()).to_pylist()}
            if self.kind == "string":
                new = [value for value in counts if value not in self.frequencies]
                self.labels_bytes += sum(len(value.encode()) for value in new)
                if len(self.frequencies) + len(new) > MAX_NUM_STRING_LABELS or self.labels_bytes > (
                    STRING_LABELS_MAX_BYTES
                ):
                    self.frequencies = None  # too many distinct values for a label: a text
                    return
            self.frequencies.update(counts)

    @property
    def integer(self) -> bool:
        return self.kind in INTEGER_KINDS

    def is_label(self) -> bool:
        """A string column the viewer takes for a category (`string_label`)."""
        if self.kind != "string" or self.frequencies is None:
            return False
        distinct = len(self.frequencies) + (1 if self.nulls else 0)  # null is a value here, as for the viewer
        small = distinct <= MAX_NUM_STRING_LABELS and distinct <= MAX_PROPORTION_STRING_LABELS * self.rows
        return small or distinct <= HISTOGRAM_BINS


def _numbers(kind: str, values: pa.Array) -> np.ndarray:
    """The numbers the column is described by (a string's or a list's lengths, an image's widths, an audio
    file's durations, a date's seconds since 1970) as floats, nulls, NaN and infinities left out."""
    values = values.drop_null()
    if kind == "string":
        values = pc.utf8_length(values)
    elif kind == "list":
        values = pc.list_value_length(values)
    elif kind == "datetime":
        unit = {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[values.type.unit]
        values = pc.multiply(values.cast(pa.int64()).cast(pa.float64()), unit)
    elif kind in MEDIA_KINDS:
        measure = _width if kind == "image" else _duration
        values = pa.array([measure(cell) for cell in values.to_pylist()], pa.float64())
    numbers = np.asarray(values.to_numpy(zero_copy_only=False), dtype=float)
    finite: np.ndarray = numbers[np.isfinite(numbers)]
    return finite


def _media_bytes(cell: Any) -> bytes | None:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    return data if isinstance(data, bytes) else None


def _width(cell: Any) -> float:
    """The image's width, from its header (NaN when it is not a readable image)."""
    from PIL import Image

    data = _media_bytes(cell)
    if data is None:
        return math.nan
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: nothing is decoded
            return float(image.size[0])
    except Exception:  # not an image, truncated, a decompression bomb
        return math.nan


def _duration(cell: Any) -> float:
    data = _media_bytes(cell)
    duration = audio_header(data).duration if data is not None else None
    return math.nan if duration is None else float(duration)


def _numeric_batches(path: str, column: Column) -> Iterator[np.ndarray]:
    if column.kept is not None:
        yield from column.kept
        return
    if column.spilled is not None:
        column.spilled.seek(0)
        while chunk := column.spilled.read(BATCH_ROWS * 8):
            yield np.frombuffer(chunk, dtype=np.float64)
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


def bin_edges(low: float, high: float, integer: bool) -> list[float]:
    """The viewer's histogram bins: 10 of the same width from min to max; an integer column's are integers
    of width ceil((max - min + 1) / 10), the last one ending at max (so there may be fewer). One value:
    [min, max]."""
    if low == high:
        return [low, high]
    if integer:
        width = math.ceil((high - low + 1) / HISTOGRAM_BINS)
        edges = [float(edge) for edge in range(int(low), math.ceil(high), width)]
    else:
        edges = [low + index * (high - low) / HISTOGRAM_BINS for index in range(HISTOGRAM_BINS)]
    return [*edges, high] if edges[-1] != high else edges


def _histogram(path: str, column: Column, shift: float = 0.0) -> tuple[list[int], list[float]]:
    """The counts of the column's values in each bin (a bin holds its lower edge, the last one both), and
    the edges; with `shift`, of the values minus it (a date's seconds since the first one)."""
    low, high = column.moments.low - shift, column.moments.high - shift
    edges = bin_edges(low, high, column.integer or column.kind == "datetime")
    if len(edges) == 2 and edges[0] == edges[1]:
        return [column.moments.count], edges
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    for values in _numeric_batches(path, column):
        counts += np.histogram(values - shift, bins=edges)[0]
    return counts.tolist(), edges


def _rounded(value: float) -> float:
    return round(float(value), DECIMALS)


def _proportion(count: int, rows: int) -> float:
    return round(count / rows, DECIMALS) if count and rows else 0.0


def _numeric_statistics(path: str, column: Column) -> dict[str, Any]:
    moments = column.moments
    statistics: dict[str, Any] = {"nan_count": column.nulls, "nan_proportion": _proportion(column.nulls, column.rows)}
    if moments.count == 0:
        return statistics | dict.fromkeys(("min", "max", "mean", "median", "std", "histogram"))
    std = float(np.sqrt(moments.squares / (moments.count - 1))) if moments.count > 1 else 0.0
    if column.kind == "datetime":
        return statistics | _dates(path, column, std)
    integer = column.integer
    hist, edges = _histogram(path, column)
    return statistics | {
        "min": int(moments.low) if integer else _rounded(moments.low),
        "max": int(moments.high) if integer else _rounded(moments.high),
        "mean": _rounded(moments.mean),
        "median": _rounded(_median(path, column)),
        "std": _rounded(std),
        "histogram": {
            "hist": hist,
            "bin_edges": [int(edge) for edge in edges] if integer else [_rounded(edge) for edge in edges],
        },
    }


def _dates(path: str, column: Column, std: float) -> dict[str, Any]:
    """A datetime column's statistics: dates (`%Y-%m-%d %H:%M:%S`, with the offset when the column has a
    time zone other than UTC), std as a duration, and the histogram of the seconds since the first date."""
    moments = column.moments
    hist, edges = _histogram(path, column, shift=moments.low)
    return {
        "min": _date(moments.low, column.timezone),
        "max": _date(moments.high, column.timezone),
        "mean": _date(moments.mean, column.timezone),
        "median": _date(_median(path, column), column.timezone),
        "std": str(timedelta(seconds=std)),
        "histogram": {"hist": hist, "bin_edges": [_date(moments.low + edge, column.timezone) for edge in edges]},
    }


def _date(seconds: float, timezone: str | None) -> str:
    moment = pa.scalar(round(seconds * 1e6), pa.timestamp("us", timezone)).as_py()
    offset = moment.utcoffset()
    return str(moment.strftime("%Y-%m-%d %H:%M:%S" if offset is None or not offset else "%Y-%m-%d %H:%M:%S%z"))


def _statistics(path: str, column: Column) -> dict[str, Any]:
    if column.kind in NUMERIC_KINDS and not column.is_label():
        return _numeric_statistics(path, column)
    statistics: dict[str, Any] = {"nan_count": column.nulls, "nan_proportion": _proportion(column.nulls, column.rows)}
    frequencies = column.frequencies or Counter()
    if column.kind == "bool":
        return statistics | {"frequencies": {str(value): frequencies[value] for value in sorted(frequencies)}}
    if column.kind == "string":  # a label
        ordered = sorted(frequencies.items(), key=lambda item: (-item[1], item[0]))
        return statistics | {
            "no_label_count": 0,
            "no_label_proportion": 0.0,
            "n_unique": len(ordered),
            "frequencies": dict(ordered),
        }
    # A class label: -1 (or any value that names no class) is "no label", as in unlabelled test splits.
    names = column.names or []
    unlabelled = sum(n for k, n in frequencies.items() if not 0 <= k < len(names))
    return statistics | {
        "no_label_count": unlabelled,
        "no_label_proportion": _proportion(unlabelled, column.rows),
        "n_unique": len(names),
        "frequencies": {name: frequencies.get(index, 0) for index, name in enumerate(names)},
    }


def column_type(column: Column) -> str:
    """The viewer's `column_type` of a described column."""
    if column.kind == "string":
        return "string_label" if column.is_label() else "string_text"
    return column.kind


def split_descriptive_statistics(job: StepJob) -> dict[str, Any]:
    assert job.config is not None and job.split is not None
    parent = job.previous_step("config-parquet", job.config)
    files = [f for f in parent["parquet_files"] if f["split"] == job.split]
    if not files:
        raise SplitNotFoundError(f"config {job.config!r} has no Parquet file for split {job.split!r}")
    return describe(str(parquet_file(files[0]["path"])), job.progress) | {"partial": bool(parent.get("partial", False))}


def describe(path: str, progress: Progress, only: list[str] | None = None) -> dict[str, Any]:
    """{"num_examples", "statistics"} of a Parquet file (of its columns named in `only`), read in batches;
    the columns in the order of their names, as the viewer lists them."""
    schema = pq.read_schema(path)
    features = features_of(schema)
    columns = []
    for name, feature in features.items():
        kind = kind_of(feature, schema.field(name).type)
        if kind is None or (only is not None and name not in only):
            continue
        column = Column(name, kind, frequencies=Counter() if kind in ("bool", "class_label", "string") else None)
        if kind == "class_label":
            column.names = list(feature.names)
        if kind == "datetime":
            column.timezone = schema.field(name).type.tz
        columns.append(column)
    total = pq.ParquetFile(path).metadata.num_rows
    media = [c for c in columns if c.kind in MEDIA_KINDS]
    steps = max(1, total * (1 + len(media)) + len(columns))  # every row read, then every column's passes
    progress.update(0, steps, f"reading {total} rows")
    numeric = [c for c in columns if c.kind in NUMERIC_KINDS]
    with contextlib.ExitStack() as stack:
        for column in numeric:
            if total * len(numeric) <= KEEP_MAX_VALUES:
                column.kept = []
            elif column.kind in MEDIA_KINDS:  # read once: their files are not read again
                column.spilled = stack.enter_context(tempfile.TemporaryFile())
        read = 0
        others = [c for c in columns if c.kind not in MEDIA_KINDS]
        for batch in _batches(path, [c.name for c in others]) if others else ():
            for column in others:
                column.add(batch.column(column.name))
            read += batch.num_rows
            progress.update(read, steps, f"read {read} of {total} rows")
        for column in media:
            for batch in _batches(path, [column.name], MEDIA_BATCH_ROWS):
                column.add(batch.column(0))
                read += batch.num_rows
                progress.update(read, steps, f"column {column.name}: read {column.rows} of {total} rows")
        statistics = []
        for index, column in enumerate(sorted(columns, key=lambda c: c.name)):
            statistics.append(
                {
                    "column_name": column.name,
                    "column_type": column_type(column),
                    "column_statistics": _statistics(path, column),
                }
            )
            progress.update(total * (1 + len(media)) + index + 1, steps, f"column {column.name}")
    return {"num_examples": total, "statistics": statistics}


def _batches(path: str, columns: list[str], rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The file's batches, the given columns only, without buffering whole row groups ahead."""
    batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path, pre_buffer=False).iter_batches(
        batch_size=rows, columns=columns
    )
    return batches

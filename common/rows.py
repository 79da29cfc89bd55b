"""Rows as the viewer shows them: `{"row_idx", "row", "truncated_cells"}`, for /first-rows, /rows, /search, /filter.

An image or audio cell becomes the URL of an asset file (common.assets), written on its first read and
reused after (its path names the row and column: the same cell of /first-rows and /rows is one file). A
binary cell becomes `<N bytes>`. A string cell longer than `max_cell_bytes` is cut there; rows still
bigger than `max_bytes` get their longest cells cut to `min_cell_bytes` and then lose rows from the end.
Cut cells are named in the row's `truncated_cells`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from common.assets import CellLocation, store_audio, store_image
from common.config import WorkerConfig
from common.exceptions import DatasetGenerationError
from common.redaction import redact
from common.tables import audio_header

MAX_SERVED_PIXELS = 16_000_000  # an image the API decodes for /rows (4,000 x 4,000): decoding costs its pixels


@dataclass(frozen=True)
class Truncation:
    max_bytes: int
    max_cell_bytes: int
    min_cell_bytes: int

    @classmethod
    def of(cls, settings: WorkerConfig) -> Truncation:
        """WORKER_FIRST_ROWS_*: first rows' limits, those of every page of rows the API serves too."""
        return cls(
            settings.first_rows_max_bytes, settings.first_rows_max_cell_bytes, settings.first_rows_min_cell_bytes
        )


def size_of(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def cell(value: Any, kind: str, location: CellLocation, reuse: bool = False) -> Any:
    """The cell as a viewer shows it (`kind`: common.tables.column_kind of its column). With `reuse` (the API
    serving rows), an asset file already written for the cell is kept, and an image that cannot be read, or
    of more than MAX_SERVED_PIXELS, is shown as null; without (a step), an unreadable one fails the step."""
    if value is None:
        return None
    if kind in ("image", "audio"):
        data = value.get("bytes") if isinstance(value, dict) else None
        if data is None:
            return None
        if kind == "audio":
            return store_audio(location, data, reuse)
        try:
            return store_image(location, data, reuse, MAX_SERVED_PIXELS if reuse else None)
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # not an image, truncated, a bomb
            if reuse:
                return None
            raise DatasetGenerationError(
                redact(f"row {location.row}, column {location.column!r}: not a readable image ({error})"), error
            ) from error
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def row_item(
    row_idx: int,
    record: dict[str, Any],
    kinds: dict[str, str],
    location: Callable[[int, str, int], CellLocation],
    reuse: bool = False,
) -> dict[str, Any]:
    """One row: each cell shown (`location(row_idx, column, column_index)`: where its asset file goes)."""
    row = {
        name: cell(value, kinds.get(name, "other"), location(row_idx, name, index), reuse)
        for index, (name, value) in enumerate(record.items())
    }
    return {"row_idx": row_idx, "row": row, "truncated_cells": []}


def cut(row: dict[str, Any], max_cell_bytes: int) -> None:
    """Cut the row's string cells longer than max_cell_bytes, naming them in truncated_cells."""
    for name, value in row["row"].items():
        if isinstance(value, str) and len(value.encode()) > max_cell_bytes:
            row["row"][name] = value.encode()[:max_cell_bytes].decode(errors="ignore")
            if name not in row["truncated_cells"]:
                row["truncated_cells"].append(name)


def truncate(rows: list[dict[str, Any]], limits: Truncation) -> bool:
    """Cut long cells, then fit the rows into max_bytes; True when rows had to be dropped."""
    for row in rows:
        cut(row, limits.max_cell_bytes)
    if size_of(rows) <= limits.max_bytes:
        return False
    for row in rows:
        cut(row, limits.min_cell_bytes)
    dropped = False
    while len(rows) > 1 and size_of(rows) > limits.max_bytes:
        rows.pop()
        dropped = True
    return dropped


def row_items(
    row_indexes: Sequence[int],
    records: Sequence[dict[str, Any]],
    kinds: dict[str, str],
    location: Callable[[int, str, int], CellLocation],
    limits: Truncation,
) -> list[dict[str, Any]]:
    """The rows shown (their asset files written once and reused), cut to fit the limits."""
    rows = [
        row_item(row_idx, record, kinds, location, reuse=True)
        for row_idx, record in zip(row_indexes, records, strict=True)
    ]
    truncate(rows, limits)
    return rows


def with_sampling_rates(described: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
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

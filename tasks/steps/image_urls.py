"""split-image-url-columns: the string columns whose values are image URLs, from the split's first rows.

A value is an image URL when it is an http(s) URL whose last path segment has an image file's extension
(`https://host/a/cat.png?size=2`); a column is one of them when more than 30% of the first rows hold one.
"""

from __future__ import annotations

import mimetypes
from typing import Any
from urllib.parse import urlsplit

from tasks.step_task import StepJob

MIN_SHARE = 0.3
STRING_DTYPES = ("string", "large_string")


def is_image_url(value: str) -> bool:
    if not value.startswith(("https://", "http://")):
        return False
    name = urlsplit(value).path.rsplit("/", 1)[-1]
    kind, _ = mimetypes.guess_type(name)
    return kind is not None and kind.startswith("image/")


def string_columns(features: list[dict[str, Any]]) -> list[str]:
    """The columns of the first rows whose type is a string Value."""
    return [
        feature["name"]
        for feature in features
        if isinstance(feature.get("type"), dict)
        and feature["type"].get("_type") == "Value"
        and feature["type"].get("dtype") in STRING_DTYPES
    ]


def split_image_url_columns(job: StepJob) -> dict[str, Any]:
    """{"columns": [column]}"""
    first_rows = job.previous_step("split-first-rows", job.config, job.split)
    rows = [row.get("row") or {} for row in first_rows.get("rows") or []]
    columns = string_columns(first_rows.get("features") or [])
    job.progress.update(1, 1, f"{len(columns)} string column(s) in {len(rows)} row(s)")
    found = []
    for column in columns:
        urls = sum(1 for row in rows if isinstance(row.get(column), str) and is_image_url(row[column]))
        if rows and urls / len(rows) > MIN_SHARE:
            found.append(column)
    return {"columns": found}

"""`/rows`, `/search` and `/filter`: pages of a whole split, as the viewer's PaginatedResponse.

`GET /rows?dataset&config&split&offset&length`: the split's rows `offset` to `offset + length` (length at
most 100, by default 100), read from its Parquet export: config-parquet-metadata says which row groups
hold them (tasks/steps/browse.py), and only those are read (the files' parsed footers are kept, a few
per process). `num_rows_total` is the rows of the split's Parquet file, `partial` whether that file holds
the split's first rows only.

`GET /search?dataset&config&split&query&offset&length`: the rows where every word of `query` is a word of
one of the split's string columns, in the split's order; `GET /filter?...&where=&orderby=`: the rows where
the SQL expression `where` holds, in the order `orderby` gives (then the split's). Both read the split's
split-duckdb-index (common.split_index), read-only, within API_QUERY_TIMEOUT_SECONDS (504 past it),
API_QUERY_MEMORY_LIMIT_BYTES and API_QUERY_THREADS; `where` and `orderby` get through only as column
references, literals, comparisons and boolean and arithmetic operators (tasks.api.filter_sql): anything
else, and a query DuckDB refuses for its types, is 422 InvalidParameter, never run. `num_rows_total` is the
rows that match, `partial` whether the index holds the split's first rows only.

Every cell is shown as /first-rows shows it (common.rows): an image or audio cell is the signed URL of an
asset file, written on its first read and reused; long cells are cut (WORKER_FIRST_ROWS_* limits). The same
access rules, not-ready answers, ETag and Cache-Control as every cached answer (tasks.api.cached).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from common.assets import CellLocation
from common.config import get_config
from common.exceptions import CachedResponseNotFoundError
from common.rows import Truncation, row_items
from common.split_index import InvalidQueryError, Page, QueryLimits, QueryTimeoutError, filter_rows, search
from common.storage import split_files
from common.tables import column_kind
from tasks.api.cached import (
    RESPONSES,
    ContentResponse,
    answer,
    answer_entry,
    cached_entry,
    checked_names,
    signed_media,
)
from tasks.api.errors import (
    InvalidParameterError,
    MissingRequiredParameterError,
    RequestTimeoutError,
    ResponseNotFoundError,
)
from tasks.api.filter_sql import orderby_clause, where_clause

ROWS_PER_PAGE = 100  # the viewer's: `length` is at most this, and `num_rows_per_page` says it
METADATA, INDEX = "config-parquet-metadata", "split-duckdb-index"
MAX_OFFSET = 10**15
FOOTERS_KEPT = 32  # parsed Parquet footers an API process keeps (a big split's is megabytes)


def required(dataset: str | None, config: str | None, split: str | None) -> tuple[str, str, str]:
    given = (dataset, config, split)
    if not all(isinstance(value, str) and value.strip() for value in given):
        raise MissingRequiredParameterError("Parameters 'dataset', 'config' and 'split' are required")
    return dataset, config, split  # type: ignore[return-value]


def page_bounds(offset: str | None, length: str | None) -> tuple[int, int]:
    """`offset` (0 by default) and `length` (100 by default, at most 100), or InvalidParameter."""

    def number(name: str, value: str | None, default: int, most: int) -> int:
        if value is None:
            return default
        if not value.isascii() or not value.isdigit() or len(value) > 16 or int(value) > most:
            raise InvalidParameterError(f"Parameter '{name}' must be an integer from 0 to {most}")
        return int(value)

    return number("offset", offset, 0, MAX_OFFSET), number("length", length, ROWS_PER_PAGE, ROWS_PER_PAGE)


@lru_cache(maxsize=FOOTERS_KEPT)
def _footer(path: str, modified_ns: int, size: int) -> pq.FileMetaData:
    """A file's parsed footer, kept while the file is the same (`modified_ns`, `size`)."""
    return pq.read_metadata(path)


def read_rows(path: Path, row_groups: list[list[int]], offset: int, length: int) -> pa.Table:
    """Rows `offset` to `offset + length` of the file, reading only the row groups that hold them."""
    status = path.stat()
    footer = _footer(str(path), status.st_mtime_ns, status.st_size)
    start, first = 0, 0
    wanted: list[int] = []
    for index, (num_rows, _) in enumerate(row_groups):
        if start + num_rows > offset and start < offset + length:
            if not wanted:
                first = start
            wanted.append(index)
        start += num_rows
    if not wanted:
        return footer.schema.to_arrow_schema().empty_table()
    table = pq.ParquetFile(path, metadata=footer).read_row_groups(wanted)
    return table.slice(offset - first, length)


def features_list(features: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"feature_idx": index, "name": name, "type": kind} for index, (name, kind) in enumerate(features.items())]


def column_kinds(features: dict[str, Any]) -> dict[str, str]:
    from datasets import Features

    return {name: column_kind(feature) for name, feature in Features.from_dict(features).items()}


def paginated(
    request: Request,
    dataset: str,
    file_path: str,
    features: dict[str, Any],
    page: Page,
    partial_split: bool,
) -> tuple[dict[str, Any], tuple[object, ...]]:
    """The viewer's PaginatedResponse of the page's rows (media cells as signed URLs), and what its ETag
    must name besides the entry."""
    rows: list[dict[str, Any]] = []
    if page.rows.num_rows:
        revision = file_path.split("/--/")[1]  # the revision of the files the rows are read from
        config, split = file_path.split("/--/")[2].split("/")[:2]
        location: Callable[[int, str, int], CellLocation] = partial(CellLocation, dataset, revision, config, split)
        records = page.rows.to_pylist()
        limits = Truncation.of(get_config().worker)
        rows = row_items(page.row_idx, records, column_kinds(features), location, limits)
    content = {
        "features": features_list(features),
        "rows": rows,
        "num_rows_total": page.num_rows_total,
        "num_rows_per_page": ROWS_PER_PAGE,
        "partial": partial_split,
    }
    return signed_media(request, dataset, content)


def rows(
    request: Request,
    dataset: str | None = Query(None, description="org/name, or name"),
    config: str | None = Query(None, description="a config of the dataset"),
    split: str | None = Query(None, description="a split of the config"),
    offset: str | None = Query(None, description="the first row's index (0 by default)"),
    length: str | None = Query(None, description="how many rows, at most 100 (100 by default)"),
) -> Response:
    """The rows of a split, from any offset"""
    names = required(dataset, config, split)
    start, count = page_bounds(offset, length)
    valid_dataset, valid_config, valid_split, access = checked_names(request, *names)
    entry = cached_entry(METADATA, valid_dataset, valid_config, None)
    if not entry.is_success:
        return answer_entry(request, entry, access)
    files = [f for f in entry.content.get("parquet_files_metadata") or [] if f.get("split") == valid_split]
    if not files:
        raise ResponseNotFoundError(f"Not found: the config has no split {valid_split!r}")
    file = files[0]  # one file per split
    try:
        path = split_files().local(file["path"])
    except CachedResponseNotFoundError:  # replaced by a newer conversion meanwhile: the next entry has it
        raise ResponseNotFoundError("Not found: the split's file is gone; ask again") from None
    table = read_rows(path, file["row_groups"], start, count)
    page = Page(table, list(range(start, start + table.num_rows)), int(file["num_rows"]))
    content, tag = paginated(
        request, valid_dataset, file["path"], entry.content["features"], page, bool(file.get("partial"))
    )
    return answer(request, [entry], content, 200, None, access, start, count, *tag)


def query_limits() -> QueryLimits:
    settings = get_config().api
    return QueryLimits(settings.query_timeout_seconds, settings.query_memory_limit_bytes, settings.query_threads)


def _queried(
    request: Request,
    names: tuple[str, str, str],
    bounds: tuple[int, int],
    run: Callable[[Path, list[str]], Page],
    *asked: object,
) -> Response:
    """The answer of a query `run(index, columns)` on the split's index."""
    dataset, config, split, access = checked_names(request, *names)
    assert config is not None and split is not None
    entry = cached_entry(INDEX, dataset, config, split)
    if not entry.is_success:
        return answer_entry(request, entry, access)
    features: dict[str, Any] = entry.content["features"]
    index = entry.content["path"]
    try:
        # a split without columns has no index: nothing to find
        page = Page(pa.table({}), [], 0) if index is None else run(split_files().local(index), list(features))
    except CachedResponseNotFoundError:
        raise ResponseNotFoundError("Not found: the split's index is gone; ask again") from None
    except InvalidQueryError as error:
        raise InvalidParameterError(f"the query cannot run on this split: {str(error)[:300]}") from None
    except QueryTimeoutError:
        seconds = get_config().api.query_timeout_seconds
        raise RequestTimeoutError(f"the query took longer than API_QUERY_TIMEOUT_SECONDS={seconds}") from None
    except duckdb.OutOfMemoryException:
        raise InvalidParameterError(
            "the query needs more memory than API_QUERY_MEMORY_LIMIT_BYTES allows: ask for a narrower one"
        ) from None
    content, tag = paginated(request, dataset, index or "", features, page, bool(entry.content["partial"]))
    return answer(request, [entry], content, 200, None, access, *bounds, *asked, *tag)


def search_rows(
    request: Request,
    dataset: str | None = Query(None, description="org/name, or name"),
    config: str | None = Query(None, description="a config of the dataset"),
    split: str | None = Query(None, description="a split of the config"),
    query: str | None = Query(None, description="words: the rows holding every one of them, in a string column"),
    offset: str | None = Query(None, description="the first matching row's rank (0 by default)"),
    length: str | None = Query(None, description="how many rows, at most 100 (100 by default)"),
) -> Response:
    """Full-text search in the string columns of a split"""
    names = required(dataset, config, split)
    if query is None or not query.strip():
        raise MissingRequiredParameterError("Parameter 'query' is required")
    if len(query) > 1000:
        raise InvalidParameterError("Parameter 'query' is longer than 1,000 characters")
    start, count = page_bounds(offset, length)
    limits = query_limits()
    return _queried(request, names, (start, count), lambda path, _: search(path, query, start, count, limits), query)


def filter_split(
    request: Request,
    dataset: str | None = Query(None, description="org/name, or name"),
    config: str | None = Query(None, description="a config of the dataset"),
    split: str | None = Query(None, description="a split of the config"),
    where: str | None = Query(None, description='a SQL condition on the columns, e.g. "age" > 30 AND "name" = \'x\''),
    orderby: str | None = Query(None, description='a SQL ordering of the columns, e.g. "age" DESC, "name"'),
    offset: str | None = Query(None, description="the first matching row's rank (0 by default)"),
    length: str | None = Query(None, description="how many rows, at most 100 (100 by default)"),
) -> Response:
    """Filter and sort the rows of a split"""
    names = required(dataset, config, split)
    start, count = page_bounds(offset, length)
    limits = query_limits()

    def run(path: Path, columns: list[str]) -> Page:
        condition = where_clause(where, columns) if where is not None and where.strip() else None
        ordering = orderby_clause(orderby, columns) if orderby is not None and orderby.strip() else None
        return filter_rows(path, condition, ordering, start, count, limits)

    return _queried(request, names, (start, count), run, where, orderby)


PAGINATED: dict[int | str, dict[str, Any]] = {
    **RESPONSES,
    200: {"description": "the viewer's PaginatedResponse: features, rows, num_rows_total, num_rows_per_page, partial"},
    504: {"description": "the query took longer than API_QUERY_TIMEOUT_SECONDS"},
}


def router() -> APIRouter:
    routes = APIRouter(tags=["rows"])
    for path, handler in (("/rows", rows), ("/search", search_rows), ("/filter", filter_split)):
        summary = (handler.__doc__ or "").strip()
        routes.add_api_route(
            path, handler, methods=["GET"], summary=summary, responses=PAGINATED, response_class=ContentResponse
        )
    return routes

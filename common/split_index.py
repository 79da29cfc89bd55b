"""Per-split DuckDB index files behind `/search` and `/filter`: built by a worker step, queried by the API.

:func:`build_index` turns a split's Parquet files into one DuckDB database file with three tables:

- `data`: `__row_idx BIGINT` (the row's position in the split: the Parquet reader's `file_row_number`
  plus the row counts of the files before it) then the split's columns, stored in row order (the files are
  read in order with `preserve_insertion_order`), so the zonemaps of `__row_idx` let a lookup of a few rows
  skip the other row groups;
- `postings(term, row_idx)`: the distinct (token, row) pairs of the split's top-level string columns
  (:func:`string_columns`; image and audio structs, lists... are not searched), sorted by term then
  row_idx, so `WHERE term = ?` reads the few row groups of that term only;
- `terms(term, num_rows, first_rowid)`: each term's number of rows and the rowid of its first posting, so a
  search knows its tokens' frequencies at once, and pages through one token's postings by rowid;
- `index_info`: one row, what :func:`build_index` returns plus the split's Arrow schema.

A token is a maximal run of letters or digits (RE2 `[\\pL\\pN]+`) of the lowercased text (DuckDB `lower`);
:func:`query_tokens` tokenizes a query the same way in Python. Checked on every code point, the two differ
in two ways only. Python's `str.lower` maps U+0130 (capital I with dot) to two code points and capital
sigma to final sigma at a word's end, where DuckDB maps each code point to one (U+0069, small sigma):
:func:`query_tokens` maps those two first, as DuckDB does. And the letters and digits Unicode added after
Python's `unicodedata` version (14.0 on Python 3.11: 4,388 code points, Kawi, CJK extension H...) are
letters to DuckDB's RE2 but not to Python: a query word with one of them is split there, and finds nothing.

The file is built under a temporary name beside the target and renamed: it appears whole or not at all.
With `max_bytes`, only the first whole row groups whose Parquet data (`total_byte_size`) fits are indexed
(at least one), and the index says `partial`. The build is bounded by DuckDB's `memory_limit`, spilling to
a temporary directory beside the target (removed after), so it works for splits larger than memory.
DuckDB's process still grows past its limit (by ~150-250 MB for 27 M rows, measured): size the limit to
leave that room. The build binds no parameter: binding one makes DuckDB's Python module import pandas
(~100 MB more resident memory, ~0.5 s), which the queries' bound tokens and paging do once per process.

:func:`search` and :func:`filter_rows` return a :class:`Page`. They open the index read-only: an in-memory
DuckDB that ATTACHes the file `READ_ONLY`, then disables external access (no file reads, COPY, ATTACH or
extension loads from SQL) and locks its configuration (`memory_limit`, `threads` from :class:`QueryLimits`).
DuckDB's Python `connect(path)` shares one database instance per path in a process, which keeps serving a
replaced file's old content while any connection to it is open; attaching to a fresh in-memory database
does not. The open indexes (at most :data:`CACHE_SIZE`, each with its own memory limit and buffer pool)
are kept in a process-wide LRU keyed by the file's path, inode, mtime and size and by the limits, so a
replaced file is opened anew and its old instance closed once its running queries are done. Each query runs
on its own `.cursor()` of the cached connection: the functions are safe to call from many threads at once
(a FastAPI threadpool); DuckDB runs them in parallel.

Errors: a query running longer than `timeout_seconds` is interrupted -> :class:`QueryTimeoutError`; a
query text DuckDB rejects (parser, binder, catalog, conversion, invalid input, out of range, type mismatch,
permission errors) -> :class:`InvalidQueryError` with DuckDB's message. Other DuckDB errors (out of memory,
I/O) propagate as they are.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_IDX = "__row_idx"
TOKEN_PATTERN = r"[\pL\pN]+"  # RE2, in DuckDB
MAX_QUERY_WORDS = 10  # different words a search query may hold
CACHE_SIZE = 4  # open read-only indexes kept per process (each up to its memory limit: cost follows active work)
FORMAT_VERSION = 1
T = TypeVar("T")
_ALIAS = "idx"  # the index's catalog in a query connection
_PYTHON_TOKEN = re.compile(r"[^\W_]+")  # letters and digits: str.isalnum, i.e. Unicode L* and N*
_SIMPLE_LOWER = str.maketrans({"\u0130": "i", "\u03a3": "\u03c3"})  # DuckDB's one-to-one lower of İ and Σ
_QUERY_ERRORS: tuple[type[Exception], ...] = (
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
    duckdb.PermissionException,
)


class QueryTimeoutError(Exception):
    """The query ran longer than its limits' timeout_seconds and was interrupted."""


class InvalidQueryError(Exception):
    """DuckDB rejected the query (its message), or the search query has no token."""


@dataclass(frozen=True)
class QueryLimits:
    """What one query may use: its time, and the memory and threads of the index's DuckDB instance."""

    timeout_seconds: float
    memory_limit_bytes: int
    threads: int


@dataclass(frozen=True)
class Page:
    """A page of a split's rows."""

    rows: pa.Table  # the split's own columns only, in the page's order
    row_idx: list[int]  # each row's position in the split (0-based)
    num_rows_total: int  # how many rows match (the indexed rows, for an unfiltered query)


def query_tokens(text: str) -> list[str]:
    """The tokens of a text, as the index has them: runs of letters or digits, lowercased, in order."""
    return _PYTHON_TOKEN.findall(text.translate(_SIMPLE_LOWER).lower())


def string_columns(schema: pa.Schema) -> list[str]:
    """The columns a search looks into: the top-level string columns."""
    return [
        field.name
        for field in schema
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or _is_string_view(field.type)
    ]


def _is_string_view(data_type: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", None)
    return bool(is_view(data_type)) if is_view is not None else False


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _list(texts: list[str]) -> str:
    return "[" + ", ".join(_literal(text) for text in texts) + "]"


# --- building ---------------------------------------------------------------------------------------------


def build_index(
    parquet_files: Sequence[Path], target: Path, max_bytes: int, memory_limit_bytes: int, threads: int
) -> dict[str, Any]:
    """Build the index of a split's Parquet files (in the split's order) at `target`, replacing it.

    Returns {"num_rows": rows indexed, "partial": whether rows were left out, "size": the file's bytes,
    "indexed_columns": the searched columns, "num_rows_total": the split's rows}.
    """
    if not parquet_files:
        raise ValueError("a split has at least one Parquet file")
    files = [pq.ParquetFile(path) for path in parquet_files]
    try:
        schema = files[0].schema_arrow
        metadatas = [file.metadata for file in files]
    finally:
        for file in files:
            file.close()
    if ROW_IDX in schema.names or "file_row_number" in schema.names:
        raise ValueError(f"a split's column is named {ROW_IDX} or file_row_number")
    num_rows_total = sum(metadata.num_rows for metadata in metadatas)
    # (file, rows taken from its start) for the first whole row groups that fit in max_bytes
    taken: list[tuple[Path, int]] = []
    num_bytes = num_rows = 0
    partial = False
    for path, metadata in zip(parquet_files, metadatas, strict=True):
        rows = 0
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            if num_bytes + row_group.total_byte_size > max_bytes and num_rows + rows > 0:
                partial = True
                break
            num_bytes += row_group.total_byte_size
            rows += row_group.num_rows
        taken.append((path, rows))
        num_rows += rows
        if partial:
            break
    indexed_columns = string_columns(schema)

    target = Path(target)
    stem = f".{target.name}.{uuid.uuid4().hex}"
    temporary = target.with_name(stem + ".tmp")
    spill = target.with_name(stem + ".spill")
    config: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": f"{max(memory_limit_bytes // 1024, 1)}KiB",
        "threads": threads,
        "temp_directory": str(spill),
        "preserve_insertion_order": True,  # data in the files' order; postings as sorted
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    }
    try:
        spill.mkdir()
        connection = duckdb.connect(str(temporary), config=config)
        try:
            connection.execute("SET enable_progress_bar = false")  # a connection's own setting (a cursor's is off)
            _create_data(connection, taken)
            _create_postings(connection, indexed_columns, spill / "scratch.duckdb")
            connection.execute(
                f"CREATE TABLE index_info AS SELECT {FORMAT_VERSION}::INTEGER AS format_version,"
                f" {num_rows}::BIGINT AS num_rows, {num_rows_total}::BIGINT AS num_rows_total,"
                f" {str(partial).lower()} AS partial, {_list(indexed_columns)}::VARCHAR[] AS indexed_columns,"
                f" {_list(schema.names)}::VARCHAR[] AS columns,"
                f" unhex('{schema.serialize().to_pybytes().hex()}') AS arrow_schema"
            )
            connection.execute("CHECKPOINT")
        finally:
            connection.close()
        size = temporary.stat().st_size
        os.replace(temporary, target)
    except BaseException:
        for leftover in (temporary, temporary.with_name(temporary.name + ".wal")):
            with suppress(FileNotFoundError):
                leftover.unlink()
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return {
        "num_rows": num_rows,
        "partial": partial,
        "size": size,
        "indexed_columns": indexed_columns,
        "num_rows_total": num_rows_total,
    }


def _create_data(connection: duckdb.DuckDBPyConnection, taken: list[tuple[Path, int]]) -> None:
    offset = 0
    for position, (path, rows) in enumerate(taken):
        select = (
            f"SELECT (file_row_number + {offset})::BIGINT AS {ROW_IDX}, * EXCLUDE (file_row_number)"
            f" FROM read_parquet({_literal(str(path))}, file_row_number = true) WHERE file_row_number < {rows}"
        )
        connection.execute(f"CREATE TABLE data AS {select}" if position == 0 else f"INSERT INTO data {select}")
        offset += rows


def _create_postings(connection: duckdb.DuckDBPyConnection, columns: list[str], scratch: Path) -> None:
    if not columns:
        connection.execute("CREATE TABLE postings (term VARCHAR, row_idx BIGINT)")
        _create_terms(connection)
        return
    tokens = ", ".join(
        f"regexp_extract_all(lower({_identifier(column)}), {_literal(TOKEN_PATTERN)})" for column in columns
    )
    # Each row's distinct tokens (flatten skips NULL lists) into a scratch database, then one sort of all the
    # pairs: a third faster than sorting as they are made, and the scratch table's pages are not left free
    # in the index file.
    connection.execute(f"ATTACH {_literal(str(scratch))} AS scratch")
    try:
        connection.execute(
            f"CREATE TABLE scratch.pairs AS SELECT {ROW_IDX} AS row_idx,"
            f" unnest(list_distinct(flatten([{tokens}]))) AS term FROM data"
        )
        connection.execute("CREATE TABLE postings AS SELECT term, row_idx FROM scratch.pairs ORDER BY term, row_idx")
    finally:
        connection.execute("DETACH scratch")
    _create_terms(connection)


def _create_terms(connection: duckdb.DuckDBPyConnection) -> None:
    # a term's postings are the rowids first_rowid .. first_rowid + num_rows - 1 of the sorted table
    connection.execute(
        "CREATE TABLE terms AS SELECT term, count(*) AS num_rows, min(rowid) AS first_rowid FROM postings"
        " GROUP BY term ORDER BY term"
    )


# --- querying ---------------------------------------------------------------------------------------------


def search(index: Path, query: str, offset: int, length: int, limits: QueryLimits) -> Page:
    """The rows where every token of `query` occurs in a string column, in the split's order.

    One token: its postings are contiguous and sorted in the table, so a page is a range of their rowids
    (cheap at any offset). Several: the postings of each token joined on row_idx, the rarest token's last
    (DuckDB builds its hash table on the right side), then sorted for the page.
    """
    tokens = sorted(set(query_tokens(query)))
    if not tokens:
        raise InvalidQueryError("the search query has no letter or digit")
    if len(tokens) > MAX_QUERY_WORDS:  # a join per word: their number is bounded, not the client's to choose
        raise InvalidQueryError(f"the search query has more than {MAX_QUERY_WORDS} different words")
    _check_paging(offset, length)
    postings = f"{_ALIAS}.postings"
    with _query(index, limits) as (cursor, run, info):
        terms_sql = f"SELECT term, num_rows, first_rowid FROM {_ALIAS}.terms WHERE term IN ({_marks(tokens)})"
        terms = {
            term: (num_rows, first)
            for term, num_rows, first in run(lambda: cursor.execute(terms_sql, tokens).fetchall())
        }
        frequencies = {token: terms.get(token, (0, 0))[0] for token in tokens}
        if min(frequencies.values()) == 0:
            row_idx: list[int] = []
            num_rows_total = 0
        elif len(tokens) == 1:
            num_rows_total, first = terms[tokens[0]]
            first += offset
            page_sql = f"SELECT row_idx FROM {postings} WHERE rowid BETWEEN ? AND ? AND term = ? ORDER BY row_idx"
            found = run(lambda: cursor.execute(page_sql, [first, first + length - 1, tokens[0]]).fetchall())
            row_idx = [row[0] for row in found]
        else:
            ordered = sorted(tokens, key=lambda token: -frequencies[token])
            joins = "".join(
                f" JOIN {postings} t{number} ON t{number}.row_idx = t0.row_idx AND t{number}.term = ?"
                for number in range(1, len(ordered))
            )
            matches_sql = (
                f"WITH matches AS MATERIALIZED (SELECT t0.row_idx FROM {postings} t0{joins} WHERE t0.term = ?)"
                " SELECT (SELECT count(*) FROM matches),"
                " (SELECT coalesce(list(row_idx ORDER BY row_idx), []) FROM"
                " (SELECT row_idx FROM matches ORDER BY row_idx LIMIT ? OFFSET ?))"
            )
            parameters = [*ordered[1:], ordered[0], length, offset]
            total, page = run(lambda: _one(cursor.execute(matches_sql, parameters).fetchone()))
            num_rows_total, row_idx = int(total), list(page)
        table = _rows(cursor, run, info, row_idx)
    return _page(info, table, num_rows_total)


def _rows(cursor: duckdb.DuckDBPyConnection, run: _Run, info: _Info, row_idx: list[int]) -> pa.Table:
    """The rows of these positions, in the list's order (the page's)."""
    if not row_idx:
        return info.empty.add_column(0, ROW_IDX, pa.array([], pa.int64()))
    # the bounds let the zonemaps skip row groups; the list keeps the page's rows
    rows_sql = f"SELECT * FROM {_ALIAS}.data WHERE {ROW_IDX} BETWEEN ? AND ? AND {ROW_IDX} IN ({_marks(row_idx)})"
    table = run(lambda: cursor.execute(rows_sql, [min(row_idx), max(row_idx), *row_idx]).fetch_arrow_table())
    rank = pc.index_in(table.column(ROW_IDX), value_set=pa.array(row_idx, pa.int64()))
    return table.take(pc.sort_indices(rank))


def filter_rows(
    index: Path, where: str | None, orderby: str | None, offset: int, length: int, limits: QueryLimits
) -> Page:
    """The rows matching `where` (SQL, checked by the caller) sorted by `orderby` then row, paged."""
    _check_paging(offset, length)
    where_sql = f" WHERE (\n{where}\n)" if where else ""
    order_sql = f" ORDER BY {orderby}\n, {ROW_IDX}" if orderby else f" ORDER BY {ROW_IDX}"
    count_sql = f"SELECT count(*) FROM {_ALIAS}.data{where_sql}"
    # the page's positions first: only they and the sort's keys go through the sort, never whole rows
    page_sql = f"SELECT {ROW_IDX} FROM {_ALIAS}.data{where_sql}{order_sql} LIMIT ? OFFSET ?"
    with _query(index, limits) as (cursor, run, info):
        for sql in (count_sql, page_sql):
            try:
                statements = cursor.extract_statements(sql)
            except _QUERY_ERRORS as error:
                raise InvalidQueryError(str(error)) from error
            if len(statements) != 1:
                raise InvalidQueryError("where and orderby make one statement")
        num_rows_total = int(run(lambda: _one(cursor.execute(count_sql).fetchone()))[0])
        row_idx = [row[0] for row in run(lambda: cursor.execute(page_sql, [length, offset]).fetchall())]
        table = _rows(cursor, run, info, row_idx)
    return _page(info, table, num_rows_total)


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    assert row is not None, "an aggregate has a row"
    return row


def _check_paging(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise InvalidQueryError("offset and length are not negative")


@dataclass(frozen=True)
class _Info:
    schema: pa.Schema  # the split's Arrow schema
    empty: pa.Table  # no row, DuckDB's types


def _page(info: _Info, table: pa.Table, num_rows_total: int) -> Page:
    row_idx = table.column(ROW_IDX).to_pylist()
    return Page(rows=_cast(info, table.drop_columns([ROW_IDX])), row_idx=row_idx, num_rows_total=num_rows_total)


def _cast(info: _Info, table: pa.Table) -> pa.Table:
    """The rows with the split's own Arrow types and metadata, or DuckDB's where Arrow cannot cast them."""
    try:
        return table.cast(info.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        return table


@dataclass
class _Open:
    """An open read-only index: its connection, and how many queries use it."""

    connection: duckdb.DuckDBPyConnection
    info: _Info
    users: int = 0
    evicted: bool = False


_cache: OrderedDict[tuple[Any, ...], _Open] = OrderedDict()
_cache_lock = threading.Lock()


def _open(path: Path, limits: QueryLimits) -> _Open:
    connection = duckdb.connect(
        ":memory:",
        config={
            "memory_limit": f"{max(limits.memory_limit_bytes // 1024, 1)}KiB",
            "threads": limits.threads,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        },
    )
    try:
        connection.execute(f"ATTACH {_literal(str(path))} AS {_ALIAS} (READ_ONLY)")
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        row = connection.execute(f"SELECT arrow_schema FROM {_ALIAS}.index_info").fetchone()
        assert row is not None
        empty = connection.execute(f"SELECT * EXCLUDE ({ROW_IDX}) FROM {_ALIAS}.data LIMIT 0").fetch_arrow_table()
    except BaseException:
        connection.close()
        raise
    schema = pa.ipc.read_schema(pa.py_buffer(row[0]))
    return _Open(connection=connection, info=_Info(schema=schema, empty=empty))


def _evict(entry: _Open) -> None:
    entry.evicted = True
    _release(entry)


def _release(entry: _Open) -> None:
    """Close an evicted index once no query uses it (called with _cache_lock held)."""
    if entry.evicted and entry.users == 0:
        entry.connection.close()


@contextmanager
def _checkout(index: Path, limits: QueryLimits) -> Iterator[_Open]:
    path = Path(index).resolve()
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, limits.memory_limit_bytes, limits.threads)
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            entry.users += 1
    if entry is None:
        opened = _open(path, limits)
        with _cache_lock:
            entry = _cache.get(key)
            if entry is None:
                entry = _cache[key] = opened
            else:  # another thread opened it meanwhile
                _evict(opened)
            _cache.move_to_end(key)
            entry.users += 1
            # a replaced file's older versions, then the least recently used
            for other in [other for other in _cache if other[0] == key[0] and other[1:4] != key[1:4]]:
                _evict(_cache.pop(other))
            while len(_cache) > CACHE_SIZE:
                _evict(_cache.popitem(last=False)[1])
    try:
        yield entry
    finally:
        with _cache_lock:
            entry.users -= 1
            _release(entry)


class _Run:
    """Runs a cursor's statements under one deadline: once it passes, interrupts them until the query ends."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, timeout_seconds: float) -> None:
        self.cursor = cursor
        self.timed_out = threading.Event()
        self.done = threading.Event()
        self.timeout_seconds = timeout_seconds
        self.watcher = threading.Thread(target=self._watch, name="split-index-deadline", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        if self.done.wait(self.timeout_seconds):
            return
        self.timed_out.set()
        while True:  # a statement started after one interrupt gets the next
            with suppress(duckdb.Error):
                self.cursor.interrupt()
            if self.done.wait(0.005):
                return

    def stop(self) -> None:
        self.done.set()
        self.watcher.join()

    def __call__(self, statement: Callable[[], T]) -> T:
        if self.timed_out.is_set():
            raise QueryTimeoutError(f"the query ran longer than {self.timeout_seconds} s")
        try:
            return statement()
        except duckdb.InterruptException as error:
            raise QueryTimeoutError(f"the query ran longer than {self.timeout_seconds} s") from error
        except _QUERY_ERRORS as error:
            raise InvalidQueryError(str(error)) from error


@contextmanager
def _query(index: Path, limits: QueryLimits) -> Iterator[tuple[duckdb.DuckDBPyConnection, _Run, _Info]]:
    with _checkout(index, limits) as entry:
        cursor = entry.connection.cursor()
        try:
            run = _Run(cursor, limits.timeout_seconds)
            try:
                yield cursor, run, entry.info
            finally:
                run.stop()
        finally:
            cursor.close()

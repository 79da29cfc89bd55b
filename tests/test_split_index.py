"""common/split_index.py on real DuckDB: indexes built from Parquet files written here, queried and compared
with the same queries done with pandas on the source rows."""

from __future__ import annotations

import math
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import split_index
from common.split_index import (
    InvalidQueryError,
    QueryLimits,
    QueryTimeoutError,
    build_index,
    filter_rows,
    query_tokens,
    search,
    string_columns,
)

NUM_ROWS = 2_500
ROW_GROUP_SIZE = 300
RARE = "Zephyr"
WORDS = ["apple", "Banana", "cherry", "date", "Elder", "fig", "grape", "honeydew", "kiwi", "lemon"]
LIMITS = QueryLimits(timeout_seconds=10, memory_limit_bytes=256 * 2**20, threads=2)
GiB = 2**30
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def make_split(num_rows: int = NUM_ROWS, seed: int = 0) -> pa.Table:
    generator = random.Random(seed)
    texts: list[str | None] = []
    for row in range(num_rows):
        if row % 97 == 5:
            texts.append(None)
            continue
        words = [generator.choice(WORDS) for _ in range(generator.randint(1, 6))]
        if generator.random() < 0.01:
            words.insert(generator.randrange(len(words) + 1), generator.choice([RARE, RARE.upper(), "zephyr"]))
        separators = [" ", ", ", "! ", " - ", "_", "\n"]
        texts.append("".join(word + generator.choice(separators) for word in words).strip())
    titles = [
        None if row % 53 == 0 else f"Title {row % 40} {generator.choice(['café', 'Straße', 'naïve', 'ÉCOLE', 'x2'])}"
        for row in range(num_rows)
    ]
    scores: list[float | None] = [generator.random() for _ in range(num_rows)]
    for row in range(0, num_rows, 101):
        scores[row] = math.nan
    for row in range(3, num_rows, 89):
        scores[row] = None
    return pa.table(
        {
            "id": pa.array(range(num_rows), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "title": pa.array(titles, pa.large_string()),
            "score": pa.array(scores, pa.float64()),
            "flag": pa.array([generator.random() < 0.5 for _ in range(num_rows)], pa.bool_()),
            # a list and an image-like struct, holding the rare word: neither is searched
            "tags": pa.array([[RARE.lower(), "t"] if row % 10 == 0 else ["t"] for row in range(num_rows)]),
            "image": pa.array(
                [{"bytes": bytes([row % 256]) * 10, "path": f"{RARE.lower()}-{row}.png"} for row in range(num_rows)],
                IMAGE,
            ),
        }
    )


@pytest.fixture(scope="module")
def split() -> pa.Table:
    return make_split()


@pytest.fixture(scope="module")
def frame(split: pa.Table) -> pd.DataFrame:
    return split.to_pandas()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, split: pa.Table) -> Path:
    directory = tmp_path_factory.mktemp("index")
    parquet = directory / "0000.parquet"
    pq.write_table(split, parquet, row_group_size=ROW_GROUP_SIZE)
    target = directory / "index.duckdb"
    info = build_index([parquet], target, max_bytes=GiB, memory_limit_bytes=256 * 2**20, threads=2)
    assert info == {
        "num_rows": NUM_ROWS,
        "partial": False,
        "size": target.stat().st_size,
        "indexed_columns": ["text", "title"],
        "num_rows_total": NUM_ROWS,
    }
    assert sorted(path.name for path in directory.iterdir()) == ["0000.parquet", "index.duckdb"]
    return target


def cell_tokens(cell: Any) -> set[str]:
    """The test's own tokenizer of a cell (no I with dot nor capital sigma in these cells)."""
    return set(re.findall(r"[^\W_]+", cell.lower())) if isinstance(cell, str) else set()


def expected_search(frame: pd.DataFrame, query: str) -> list[int]:
    wanted = cell_tokens(query)
    tokens = [cell_tokens(text) | cell_tokens(title) for text, title in zip(frame["text"], frame["title"], strict=True)]
    return [row for row, row_tokens in enumerate(tokens) if wanted <= row_tokens]


def plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows comparable with ==: NaN as a string."""
    return [
        {name: "NaN" if isinstance(value, float) and math.isnan(value) else value for name, value in row.items()}
        for row in rows
    ]


def check_page(page: split_index.Page, split: pa.Table, row_idx: list[int], total: int) -> None:
    assert page.row_idx == row_idx
    assert page.num_rows_total == total
    assert page.rows.schema.equals(split.schema, check_metadata=False)
    assert plain(page.rows.to_pylist()) == plain(split.take(row_idx).to_pylist() if row_idx else [])


# --- search -----------------------------------------------------------------------------------------------


SEARCHES = [RARE, "zephyr", "ZEPHYR!!", "apple", "Apple banana", "banana, APPLE", "fig grape kiwi", "Zephyr-apple"]


@pytest.mark.parametrize("query", [*SEARCHES, "café", "CAFÉ", "straße", "title 7", "x2"])
def test_search_finds_the_rows_pandas_finds(index: Path, split: pa.Table, frame: pd.DataFrame, query: str) -> None:
    expected = expected_search(frame, query)
    assert expected, "the query matches rows"
    page = search(index, query, offset=0, length=100, limits=LIMITS)
    check_page(page, split, expected[:100], len(expected))


def test_the_rare_word_is_rare_and_lists_and_structs_are_not_searched(index: Path, frame: pd.DataFrame) -> None:
    page = search(index, RARE, offset=0, length=NUM_ROWS, limits=LIMITS)
    assert 5 <= page.num_rows_total <= 60  # about 1%, while every image path and a tenth of tags hold it
    assert page.row_idx == expected_search(frame, RARE)
    assert search(index, "png", offset=0, length=10, limits=LIMITS).num_rows_total == 0


def test_a_word_in_no_row_finds_nothing(index: Path, split: pa.Table) -> None:
    page = search(index, "nowhere", offset=0, length=100, limits=LIMITS)
    check_page(page, split, [], 0)
    assert page.rows.column_names == split.column_names
    assert search(index, "apple nowhere", offset=0, length=100, limits=LIMITS).num_rows_total == 0


def test_search_pages(index: Path, split: pa.Table, frame: pd.DataFrame) -> None:
    for query, length in ((RARE, 7), ("apple", 400)):
        expected = expected_search(frame, query)
        pages = [search(index, query, offset, length, LIMITS) for offset in range(0, len(expected) + 1, length)]
        assert [row for page in pages for row in page.row_idx] == expected
        for offset, page in zip(range(0, len(expected) + 1, length), pages, strict=True):
            check_page(page, split, expected[offset : offset + length], len(expected))
        for offset in (len(expected), len(expected) + 1, 10**9):
            check_page(search(index, query, offset, length, LIMITS), split, [], len(expected))
        check_page(search(index, query, 1, 0, LIMITS), split, [], len(expected))


def test_a_query_without_tokens_is_invalid(index: Path) -> None:
    for query in ("", "  ", "!?_ -"):
        with pytest.raises(InvalidQueryError):
            search(index, query, offset=0, length=10, limits=LIMITS)
    with pytest.raises(InvalidQueryError):
        search(index, "apple", offset=-1, length=10, limits=LIMITS)


def test_searches_from_many_threads_agree(index: Path, frame: pd.DataFrame) -> None:
    queries = [RARE, "apple", "fig grape", "title 3", "nowhere"] * 8
    with ThreadPoolExecutor(8) as pool:
        pages = list(pool.map(lambda query: search(index, query, 0, 50, LIMITS), queries))
    for query, page in zip(queries, pages, strict=True):
        assert page.row_idx == expected_search(frame, query)[:50]


# --- tokens -----------------------------------------------------------------------------------------------


def duckdb_tokens(texts: list[str]) -> list[list[str]]:
    connection = duckdb.connect()
    try:
        rows = connection.execute(
            "SELECT regexp_extract_all(lower(text), $pattern) FROM unnest($texts) WITH ORDINALITY AS t(text, position)"
            " ORDER BY position",
            {"pattern": split_index.TOKEN_PATTERN, "texts": texts},
        ).fetchall()
    finally:
        connection.close()
    return [list(row[0]) for row in rows]


UNICODE_SAMPLE = [
    "İstanbul ISTANBUL \u0131i",
    "ΟΔΟΣ ΣΟΦΟΣ σοφός ς",
    "Straße STRASSE ẞ",
    "café naïve cafe\u0301 Ǆ ǅ ǆ",
    "snake_case kebab-case 42abc x²³ ½ Ⅻ ٣٤ 三",
    "東京タワー 한국어 ไทย हिन्दी עברית العربية",
    "emoji 😀 🇫🇷 a\u200bb tab\tnew\nline",
    "",
]


def test_query_tokens_agree_with_duckdb_on_a_unicode_sample() -> None:
    assert [query_tokens(text) for text in UNICODE_SAMPLE] == duckdb_tokens(UNICODE_SAMPLE)
    assert query_tokens("İstanbul ΟΔΟΣ") == ["istanbul", "οδοσ"]  # str.lower would say i̇stanbul, οδος


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=30), min_size=1, max_size=20))
def test_query_tokens_agree_with_duckdb(texts: list[str]) -> None:
    assert [query_tokens(text) for text in texts] == duckdb_tokens(texts)


def test_string_columns_are_the_top_level_strings(split: pa.Table) -> None:
    assert string_columns(split.schema) == ["text", "title"]
    assert string_columns(pa.schema([("n", pa.int32()), ("s", pa.list_(pa.string()))])) == []


# --- filter -----------------------------------------------------------------------------------------------


def nan_and_null(split: pa.Table, frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with what pandas mixes up kept apart: a NULL score, a NaN score (greatest to DuckDB)."""
    frame = frame.copy()
    frame["row"] = range(len(frame))
    frame["score_null"] = pc.is_null(split["score"]).to_numpy(zero_copy_only=False)
    frame["score_nan"] = frame["score"].isna() & ~frame["score_null"]
    frame["text_null"] = frame["text"].isna()
    return frame


def expected_filter(split: pa.Table, frame: pd.DataFrame, case: str) -> list[int]:
    frame = nan_and_null(split, frame)
    if case == "score_and_flag":
        selected = frame[((frame["score"] > 0.5) | frame["score_nan"]) & frame["flag"]]
    elif case == "id_mod_7":
        selected = frame[frame["id"] % 7 == 0]
    elif case == "score_desc":
        selected = frame.sort_values(
            ["score_null", "score_nan", "score", "row"], ascending=[True, False, False, True], kind="stable"
        )
    elif case == "text_asc_id_desc":
        selected = frame.sort_values(["text_null", "text", "id"], ascending=[True, True, False], kind="stable")
    elif case == "flag_ties":
        selected = frame[frame["title"].notna()].sort_values(["flag", "row"], kind="stable")
    elif case == "everything":
        selected = frame
    return list(selected["row"])


FILTERS = {
    "score_and_flag": ('"score" > 0.5 AND "flag"', None),
    "id_mod_7": ('"id" % 7 = 0', None),
    "score_desc": (None, '"score" DESC NULLS LAST'),
    "text_asc_id_desc": (None, '"text" ASC, "id" DESC'),
    "flag_ties": ('"title" IS NOT NULL', '"flag"'),
    "everything": (None, None),
}


@pytest.mark.parametrize("case", sorted(FILTERS))
def test_filter_finds_and_sorts_the_rows_pandas_does(
    index: Path, split: pa.Table, frame: pd.DataFrame, case: str
) -> None:
    where, orderby = FILTERS[case]
    expected = expected_filter(split, frame, case)
    for offset, length in ((0, 100), (90, 25), (len(expected) - 3, 100), (len(expected) + 5, 10)):
        page = filter_rows(index, where, orderby, offset, length, LIMITS)
        check_page(page, split, expected[offset : offset + length], len(expected))


@pytest.mark.parametrize(
    ("where", "orderby"),
    [
        ('"text" > 5', None),  # a binder error in DuckDB 1.4: no implicit cast from a string to an integer
        ('CAST("text" AS INTEGER) > 5', None),  # a conversion error
        ('"nope" = 1', None),
        ('no_such_function("id")', None),
        ('"id" >', None),
        ("count(*) > 1", None),
        (None, '"nope"'),
        ('"id" = 1) OR (1 = 1', '"id"; DELETE FROM data'),
        ("1 = 1); DROP TABLE data; SELECT (1", None),
        ("\"id\" IN (SELECT 1 FROM read_csv('/etc/passwd'))", None),
        ("\"id\" IN (SELECT 1 FROM '/etc/passwd')", None),
    ],
)
def test_a_query_duckdb_rejects_is_invalid(index: Path, where: str | None, orderby: str | None) -> None:
    with pytest.raises(InvalidQueryError) as error:
        filter_rows(index, where, orderby, 0, 10, LIMITS)
    if "read_csv" in (where or ""):
        assert "disabled by configuration" in str(error.value)


def test_a_slow_query_is_interrupted(index: Path) -> None:
    limits = QueryLimits(timeout_seconds=0.3, memory_limit_bytes=256 * 2**20, threads=2)
    slow = '"id" = (SELECT sum(hash(a.range * b.range)) FROM range(200000) a, range(200000) b)'
    started = time.monotonic()
    with pytest.raises(QueryTimeoutError):
        filter_rows(index, slow, None, 0, 10, limits)
    assert time.monotonic() - started < 3
    # the index still answers
    assert filter_rows(index, '"id" < 3', None, 0, 10, limits).row_idx == [0, 1, 2]


def test_the_index_is_read_only_and_sees_no_file(index: Path) -> None:
    with split_index._query(index, LIMITS) as (cursor, _run, _info):
        for statement in (
            "INSERT INTO idx.data (__row_idx) VALUES (-1)",
            "DELETE FROM idx.postings",
            "CREATE TABLE idx.other (x INTEGER)",
            "SELECT * FROM read_csv('/etc/passwd')",
            "SELECT * FROM read_parquet('/etc/passwd')",
            "COPY (SELECT 1) TO '/tmp/split-index-copy.csv'",
            "ATTACH '/tmp/split-index-other.duckdb' AS other",
            "LOAD fts",
            "SET enable_external_access = true",
            "SET memory_limit = '100GB'",
        ):
            with pytest.raises(duckdb.Error):
                cursor.execute(statement)
        assert not Path("/tmp/split-index-copy.csv").exists()
        # the data in row order and the postings sorted, as stored
        stored = [row[0] for row in cursor.execute("SELECT __row_idx FROM idx.data").fetchall()]
        assert stored == list(range(NUM_ROWS))
        postings = cursor.execute("SELECT term, row_idx FROM idx.postings ORDER BY rowid").fetchall()
        assert postings == sorted(set(postings))
        terms = cursor.execute("SELECT term, num_rows, first_rowid FROM idx.terms ORDER BY term").fetchall()
        first = 0
        for term, num_rows, first_rowid in terms:
            assert first_rowid == first
            assert {posting[0] for posting in postings[first : first + num_rows]} == {term}
            first += num_rows
        assert first == len(postings)


# --- building ---------------------------------------------------------------------------------------------


def test_several_files_make_one_split(tmp_path: Path, split: pa.Table, frame: pd.DataFrame) -> None:
    first, second = tmp_path / "0000.parquet", tmp_path / "0001.parquet"
    pq.write_table(split.slice(0, 1_000), first, row_group_size=250)
    pq.write_table(split.slice(1_000), second, row_group_size=400)
    target = tmp_path / "index.duckdb"
    info = build_index([first, second], target, max_bytes=GiB, memory_limit_bytes=256 * 2**20, threads=1)
    assert (info["num_rows"], info["num_rows_total"], info["partial"]) == (NUM_ROWS, NUM_ROWS, False)
    for query in (RARE, "kiwi lemon"):
        expected = expected_search(frame, query)
        check_page(search(target, query, 0, 2_000, LIMITS), split, expected, len(expected))
    expected = expected_filter(split, frame, "score_desc")
    check_page(filter_rows(target, None, FILTERS["score_desc"][1], 0, 50, LIMITS), split, expected[:50], NUM_ROWS)


def test_a_partial_build_indexes_the_first_row_groups(tmp_path: Path, split: pa.Table, frame: pd.DataFrame) -> None:
    first, second = tmp_path / "0000.parquet", tmp_path / "0001.parquet"
    pq.write_table(split.slice(0, 1_000), first, row_group_size=ROW_GROUP_SIZE)
    pq.write_table(split.slice(1_000), second, row_group_size=ROW_GROUP_SIZE)
    metadata = pq.ParquetFile(first).metadata
    sizes = [metadata.row_group(group).total_byte_size for group in range(metadata.num_row_groups)]
    sizes_second = pq.ParquetFile(second).metadata.row_group(0).total_byte_size
    target = tmp_path / "index.duckdb"
    for max_bytes, num_rows in (
        (0, 300),  # at least one row group
        (sizes[0] + sizes[1], 600),
        (sizes[0] + sizes[1] + sizes[2] - 1, 600),
        (sum(sizes) + sizes_second, 1_300),  # the first file's four row groups, one of the second
    ):
        info = build_index([first, second], target, max_bytes, memory_limit_bytes=256 * 2**20, threads=2)
        assert (info["num_rows"], info["num_rows_total"], info["partial"]) == (num_rows, NUM_ROWS, True)
        expected = [row for row in expected_search(frame, RARE) if row < num_rows]
        check_page(search(target, RARE, 0, 100, LIMITS), split, expected, len(expected))
        page = filter_rows(target, None, '"id" DESC', 0, 3, LIMITS)
        check_page(page, split, [num_rows - 1, num_rows - 2, num_rows - 3], num_rows)


def test_a_failed_build_leaves_no_file(tmp_path: Path, split: pa.Table) -> None:
    good, bad = tmp_path / "0000.parquet", tmp_path / "0001.parquet"
    pq.write_table(split.slice(0, 500), good, row_group_size=ROW_GROUP_SIZE)
    # a second file whose "id" cannot be inserted into the first one's
    pq.write_table(split.slice(500).set_column(0, "id", pa.array([[1]] * (NUM_ROWS - 500))), bad)
    target = tmp_path / "index.duckdb"
    with pytest.raises(duckdb.Error):
        build_index([good, bad], target, GiB, memory_limit_bytes=256 * 2**20, threads=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0000.parquet", "0001.parquet"]
    # an index already there stays as it was
    build_index([good], target, GiB, memory_limit_bytes=256 * 2**20, threads=2)
    before = target.read_bytes()
    with pytest.raises(duckdb.Error):
        build_index([good, bad], target, GiB, memory_limit_bytes=256 * 2**20, threads=2)
    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0000.parquet", "0001.parquet", "index.duckdb"]


def test_a_replaced_index_is_not_served_from_its_old_connection(tmp_path: Path) -> None:
    parquet, target = tmp_path / "0000.parquet", tmp_path / "index.duckdb"
    old, new = make_split(400, seed=1), make_split(700, seed=2)
    pq.write_table(old, parquet)
    build_index([parquet], target, GiB, memory_limit_bytes=256 * 2**20, threads=1)
    assert filter_rows(target, None, None, 0, 1, LIMITS).num_rows_total == 400
    with split_index._query(target, LIMITS):  # a query still running on the old file
        pq.write_table(new, parquet)
        build_index([parquet], target, GiB, memory_limit_bytes=256 * 2**20, threads=1)
        page = filter_rows(target, None, None, 0, 1_000, LIMITS)
        assert page.num_rows_total == 700
        assert plain(page.rows.to_pylist()) == plain(new.to_pylist())
    assert all(key[0] != str(target) or key[2] == os.stat(target).st_mtime_ns for key in split_index._cache)


def test_a_split_without_strings_and_an_empty_first_file(tmp_path: Path, split: pa.Table) -> None:
    numbers = split.select(["id", "score", "flag", "tags"])
    empty, full = tmp_path / "0000.parquet", tmp_path / "0001.parquet"
    pq.write_table(numbers.slice(0, 0), empty)
    pq.write_table(numbers, full, row_group_size=ROW_GROUP_SIZE)
    target = tmp_path / "index.duckdb"
    info = build_index([empty, full], target, max_bytes=0, memory_limit_bytes=256 * 2**20, threads=1)
    assert (info["num_rows"], info["partial"], info["indexed_columns"]) == (ROW_GROUP_SIZE, True, [])
    assert search(target, "apple", 0, 10, LIMITS).num_rows_total == 0
    page = filter_rows(target, '"id" >= 298', None, 0, 10, LIMITS)
    check_page(page, numbers, [298, 299], 2)

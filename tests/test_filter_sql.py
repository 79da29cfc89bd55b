"""The checks of /filter's `where` and `orderby` (tasks/api/filter_sql.py): what they let through runs in a real
DuckDB and selects and orders the rows pandas does; an injection corpus is refused; and generated inputs
(any text, and random joins of SQL fragments) are either refused or run without any error but a data one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import Any

import duckdb
import pandas as pd
import pytest
import sqlglot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from tasks.api.errors import InvalidParameterError
from tasks.api.filter_sql import MAX_LENGTH, orderby_clause, where_clause

COLUMNS = ("id", "text", "score", "flag", "my col")
ROWS = [
    (1, "apple", 1.5, True, 3),
    (2, "Banana", 2.0, False, None),
    (3, "cherry", None, True, 1),
    (4, None, 0.5, None, 2),
    (5, "apple pie", 3.25, False, 3),
    (6, "50%", -1.0, True, 0),
    (7, "x_y", 2.0, False, 5),
    (8, "Apple", 10.0, None, None),
]
# The errors of DuckDB about the data (types, conversions, overflows): the API answers them with a 422.
DATA_ERRORS = (
    duckdb.ConversionException,
    duckdb.BinderException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
)


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(config={"enable_external_access": False})
    connection.execute('CREATE TABLE t (id INTEGER, text VARCHAR, score DOUBLE, flag BOOLEAN, "my col" INTEGER)')
    connection.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", ROWS)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=list(COLUMNS)).convert_dtypes()  # nullable dtypes: Kleene logic, as SQL


def ids(con: duckdb.DuckDBPyConnection, sql: str) -> list[int]:
    return [row[0] for row in con.execute(sql).fetchall()]


WHERE_CASES: list[tuple[str, Callable[[pd.DataFrame], Any]]] = [
    ("id = 3", lambda d: d["id"] == 3),
    ("id != 3 AND id <> 4", lambda d: (d["id"] != 3) & (d["id"] != 4)),
    ("score > 1.5 AND NOT flag", lambda d: (d["score"] > 1.5) & ~d["flag"]),
    ("score <= 0.5 OR flag", lambda d: (d["score"] <= 0.5) | d["flag"]),
    ("id IN (1, 2, 5)", lambda d: d["id"].isin([1, 2, 5])),
    ("id NOT IN (1, 2, -5)", lambda d: ~d["id"].isin([1, 2, -5])),
    ("score BETWEEN 1 AND 2", lambda d: (d["score"] >= 1) & (d["score"] <= 2)),
    ("score NOT BETWEEN 1 AND 2", lambda d: ~((d["score"] >= 1) & (d["score"] <= 2))),
    ("text IS NULL", lambda d: d["text"].isna()),
    ("score IS NOT NULL", lambda d: d["score"].notna()),
    ("text LIKE 'apple%'", lambda d: d["text"].str.startswith("apple")),
    ("text ILIKE 'APPLE%'", lambda d: d["text"].str.lower().str.startswith("apple")),
    ("text NOT LIKE '%e%'", lambda d: ~d["text"].str.contains("e", regex=False)),
    ("text LIKE '_0%'", lambda d: d["text"].str.match(r"^.0")),
    ("text = 'apple'", lambda d: d["text"] == "apple"),
    ("(id * 2 + 1) % 3 = 0", lambda d: (d["id"] * 2 + 1) % 3 == 0),
    ("id / 4 > 1.2", lambda d: d["id"] / 4 > 1.2),
    ("-score < -2", lambda d: -d["score"] < -2),
    ('"my col" >= 2 OR id < 2', lambda d: (d["my col"] >= 2) | (d["id"] < 2)),
    ('"my col" - id = 2 AND TRUE', lambda d: d["my col"] - d["id"] == 2),
    ("NOT (flag OR score > 2) AND id > 1", lambda d: ~(d["flag"] | (d["score"] > 2)) & (d["id"] > 1)),
    ("flag = FALSE", lambda d: d["flag"] == False),  # noqa: E712 (a pandas mask)
]


@pytest.mark.parametrize(("where", "expected"), WHERE_CASES, ids=[case[0] for case in WHERE_CASES])
def test_where_matches_pandas(
    con: duckdb.DuckDBPyConnection, df: pd.DataFrame, where: str, expected: Callable[[pd.DataFrame], Any]
) -> None:
    clause = where_clause(where, COLUMNS)
    if "ILIKE" not in where.upper():  # (an ILIKE is rendered `lower(a) LIKE lower(p)`: calls, refused as input)
        assert where_clause(clause, COLUMNS) == clause  # the rendered clause is accepted again, unchanged
    mask = expected(df).fillna(False).astype(bool)
    assert ids(con, f"SELECT id FROM t WHERE {clause} ORDER BY id") == df["id"][mask].tolist()


ORDERBY_CASES: list[tuple[str, list[str], list[bool], str]] = [
    # (orderby, pandas columns to sort by, ascending, na_position); the tie-breaker `id` is added to both
    ("score", ["score"], [True], "last"),
    ("score DESC", ["score"], [False], "last"),
    ("score DESC NULLS FIRST", ["score"], [False], "first"),
    ("text ASC NULLS FIRST", ["text"], [True], "first"),
    ('"my col" DESC, text', ["my col", "text"], [False, True], "last"),
    ("-score", ["minus score"], [True], "last"),
    ('"my col" * 2 - id DESC', ["expression"], [False], "last"),
    ("flag, score DESC", ["flag", "score"], [True, False], "last"),
]


@pytest.mark.parametrize(("orderby", "by", "ascending", "nulls"), ORDERBY_CASES, ids=[c[0] for c in ORDERBY_CASES])
def test_orderby_matches_pandas(
    con: duckdb.DuckDBPyConnection, df: pd.DataFrame, orderby: str, by: list[str], ascending: list[bool], nulls: str
) -> None:
    clause = orderby_clause(orderby, COLUMNS)
    assert orderby_clause(clause, COLUMNS) == clause
    frame = df.assign(**{"minus score": -df["score"], "expression": df["my col"] * 2 - df["id"]})
    expected = frame.sort_values([*by, "id"], ascending=[*ascending, True], na_position=nulls, kind="stable")
    assert ids(con, f"SELECT id FROM t ORDER BY {clause}, id") == expected["id"].tolist()


def test_rendering() -> None:
    assert where_clause("id = 1 AND \"my col\" IS NOT NULL AND text NOT ILIKE 'a%'", COLUMNS) == (
        '"id" = 1 AND NOT "my col" IS NULL AND LOWER("text") NOT LIKE LOWER(\'a%\')'
    )  # ILIKE as LIKE of lowered text: DuckDB's ILIKE backtracks on `%`, exponentially, uninterruptibly
    assert orderby_clause('score DESC, "my col" NULLS FIRST, id', COLUMNS) == (
        '"score" DESC NULLS LAST, "my col" ASC NULLS FIRST, "id" ASC NULLS LAST'
    )
    assert where_clause('"we""ird" = 1', ['we"ird']) == '"we""ird" = 1'
    assert where_clause('"order" > 1 AND "select" IS NULL', ["order", "select"]) == '"order" > 1 AND "select" IS NULL'
    assert where_clause("id = 1 IS NULL", COLUMNS) == '("id" = 1) IS NULL'  # as DuckDB reads it
    assert where_clause("(id = 1) = (score < 2)", COLUMNS) == '("id" = 1) = ("score" < 2)'
    assert where_clause("id - -1 = - -id", COLUMNS) == '"id" - -1 = - -"id"'  # never `--`, a comment


BOTH_REFUSED = [
    "read_csv('/etc/passwd')",
    "id = 1; DROP TABLE t",
    "id = 1;",
    "id IN (SELECT 1)",
    "COPY t TO '/tmp/x'",
    "ATTACH '/tmp/x.db'",
    "getenv('HOME') = 'x'",
    "id = 1 -- comment",
    "id = 1 /* c */",
    "text = 'unbalanced",
    "1) UNION SELECT * FROM read_csv('/etc/passwd') WHERE (1",
    "CAST(id AS VARCHAR) = '1'",
    "id::VARCHAR = '1'",
    "text = current_setting('x')",
    "t.id = 1",
    "*",
    "t.*",
    "unknown_col = 1",
    "ID = 1",  # names are case-sensitive
    "$1 = 1",
    "?",
    "EXISTS (SELECT 1)",
    "CASE WHEN 1 THEN 1 END",
    "glob('*')",
    "'a' || 'b' = text",
    "",
    "   \n\t",
    "id = 1 AND " + "x" * 4_990,
    "(" * 10_000 + "id" + ")" * 10_000,
    "(" * 70 + "id" + ")" * 70,
    "NOT " * 70 + "flag",
    "PRAGMA version",
    "SET x=1",
    "INSTALL httpfs",
    "LOAD httpfs",
    "lower(text) = 'a'",
    "length(text) > 1",
    "read_text('/etc/passwd') = 'x'",
    "text -> 'a' = 'b'",
    "text ->> 'a' = 'b'",
    "[1, 2] = id",
    "{'a': 1} = id",
    "(id, score) = (1, 2)",
    "list_transform([1], x -> x + 1) = id",
    "sum(id) OVER () > 1",
    "id IS TRUE",
    "id IS DISTINCT FROM 1",
    "id BETWEEN SYMMETRIC 1 AND 2",
    "text LIKE text",
    "text LIKE 'a' ESCAPE '!'",
    "text LIKE ANY ('a', 'b')",
    "text SIMILAR TO 'a'",
    "text GLOB 'a*'",
    "id IN ()",
    "id IN (1, , 2)",
    "id IN (id)",
    "id = 1.2.3",
    "id = 1e",
    "id // 2 = 1",
    "id ** 2 = 1",
    "id & 1 = 1",
    "~id = 1",
    "@id = 1",
    "text = 'a' 'b'",
    "text = $$a$$",
    "text = e'\\x41'",
    "DATE '2020-01-01' = text",
    "INTERVAL 1 DAY = text",
    "text COLLATE nocase = 'a'",
    "id = 1\x00",
    "main.t.id = 1",
    "id = (SELECT 1)",
    "1 UNION SELECT 1",
    "1 < id < 5",  # sqlglot reads (1 < id) < 5, DuckDB refuses it: parentheses are required
    "id = 1 = TRUE",
    "flag = id BETWEEN 1 AND 2",
]
ORDERBY_REFUSED = [
    "1",
    "(1)",
    "2 DESC",
    "'a'",
    "id; DROP",
    "id; DROP TABLE t",
    "read_csv('x')",
    "(SELECT 1)",
    "id LIMIT 1",
    "id OFFSET 1",
    "id, 1",
    "id,",
    ", id",
    "id,, score",
    "ALL",
    "id WITH FILL",
    "id > 1",
    "flag AND id",
    "id IN (1, 2)",
    "text LIKE 'a'",
    "id DESC DESC",
    "id) UNION SELECT 1 ORDER BY (1",
    "id COLLATE nocase",
]


def assert_refused(function: Callable[[str, Collection[str]], str], text: str, parameter: str) -> str:
    with pytest.raises(InvalidParameterError) as caught:
        function(text, COLUMNS)
    message = caught.value.message
    assert message.startswith(f"Parameter '{parameter}' is invalid: ")
    assert len(message) < 250  # no long echo of the input
    assert caught.value.code == "InvalidParameter"
    return message


@pytest.mark.parametrize("where", BOTH_REFUSED, ids=[repr(text[:40]) for text in BOTH_REFUSED])
def test_where_refused(where: str) -> None:
    assert_refused(where_clause, where, "where")


@pytest.mark.parametrize(
    "orderby", BOTH_REFUSED + ORDERBY_REFUSED, ids=[repr(t[:40]) for t in BOTH_REFUSED + ORDERBY_REFUSED]
)
def test_orderby_refused(orderby: str) -> None:
    assert_refused(orderby_clause, orderby, "orderby")


def test_refusal_messages() -> None:
    message = assert_refused(where_clause, "read_csv('/etc/passwd')", "where")
    assert message == "Parameter 'where' is invalid: function calls are not allowed (read_csv)"
    assert "function calls are not allowed (getenv)" in assert_refused(where_clause, "getenv('HOME') = 'x'", "where")
    assert "unknown column 'x'" in assert_refused(orderby_clause, "x DESC", "orderby")
    assert "casts" in assert_refused(where_clause, "id::VARCHAR = '1'", "where")
    assert "subqueries" in assert_refused(where_clause, "id IN (SELECT 1)", "where")
    assert "parameters" in assert_refused(where_clause, "$1 = 1", "where")
    assert "comments" in assert_refused(where_clause, "id = 1 -- c", "where")
    assert "';'" in assert_refused(where_clause, "id = 1; DROP TABLE t", "where")
    assert "longer than" in assert_refused(where_clause, "x" * 5_000, "where")
    assert "nested" in assert_refused(where_clause, "NOT " * 70 + "flag", "where")
    assert "positions" in assert_refused(orderby_clause, "1", "orderby")
    assert "y" * 100 + "..." in assert_refused(where_clause, "y" * 1_500 + " = 1", "where")


def test_limits() -> None:
    assert where_clause("NOT " * 60 + "flag", COLUMNS).startswith("NOT NOT")  # nesting up to 64 passes
    long = " OR ".join(["id = 1"] * 50)
    assert len(where_clause(long.ljust(MAX_LENGTH), COLUMNS)) > 0  # exactly MAX_LENGTH characters pass
    assert_refused(where_clause, long.ljust(MAX_LENGTH + 1), "where")
    assert_refused(where_clause, "id IN (1, 2, 3,)", "where")  # sqlglot itself would drop the comma


def run_checked(con: duckdb.DuckDBPyConnection, text: str) -> None:
    """`text` as where, then as orderby: refused, or it runs with at most a data error, and renders stably."""
    for function, statement in (
        (where_clause, "SELECT id FROM t WHERE {}"),
        (orderby_clause, "SELECT id FROM t ORDER BY {}, id"),
    ):
        try:
            clause = function(text, COLUMNS)
        except InvalidParameterError:
            continue
        assert function(clause, COLUMNS) == clause
        assert "--" not in clause and "/*" not in clause  # DuckDB would read a comment
        with contextlib.suppress(*DATA_ERRORS):
            con.execute(statement.format(clause)).fetchall()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_any_text(con: duckdb.DuckDBPyConnection, text: str) -> None:
    run_checked(con, text)


FRAGMENTS = [
    *COLUMNS, '"my col"', '"id"', '"ID"', "ID", "t.id", "t", "unknown", '"', "'", "''", "'apple'", "'a%'", "'%'",
    "0", "1", "-1", "2.5", ".5", "1e3", "1e400", "9223372036854775807", "170141183460469231731687303715884105728",
    "TRUE", "FALSE", "NULL", "=", "==", "!=", "<>", "<", "<=", ">", ">=", "+", "-", "*", "/", "//", "%", "||", "::",
    "->", "->>", "~", "!", "&", "|", "^", "@", "AND", "OR", "NOT", "IS", "IN", "BETWEEN", "LIKE", "ILIKE", "ESCAPE",
    "ASC", "DESC", "NULLS", "FIRST", "LAST", "SELECT", "FROM", "WHERE", "UNION", "ALL", "CAST", "AS", "VARCHAR",
    "INTEGER", "CASE", "WHEN", "THEN", "ELSE", "END", "EXISTS", "COPY", "TO", "ATTACH", "PRAGMA", "SET", "INSTALL",
    "LOAD", "DROP", "TABLE", "LIMIT", "ORDER BY", "OVER", "COLLATE", "read_csv(", "read_parquet(", "getenv(", "glob(",
    "read_text(", "current_setting(", "lower(", "length(", "'/etc/passwd'", "(", "(", ")", ")", ",", ";", "--", "/*",
    "*/", "$1", "?", "[", "]", "{", "}", ":", ".", "$$", "e'", "\\", "\n",
]  # fmt: skip


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.sampled_from(FRAGMENTS), st.sampled_from([" ", " ", ""])), min_size=1, max_size=15))
def test_sql_fragments(con: duckdb.DuckDBPyConnection, parts: list[tuple[str, str]]) -> None:
    run_checked(con, "".join(fragment + space for fragment, space in parts))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(max_size=50))
def test_string_literals_mean_the_same_to_duckdb(con: duckdb.DuckDBPyConnection, value: str) -> None:
    """What sqlglot reads in a string literal is what DuckDB reads in the rendered one."""
    try:
        clause = where_clause("text = '" + value.replace("'", "''") + "'", COLUMNS)
    except InvalidParameterError:
        assert "--" in value or "/*" in value or "\x00" in value
        return
    assert con.execute(f"SELECT count(*) FROM (SELECT ?::VARCHAR AS text) WHERE {clause}", [value]).fetchone() == (1,)


def parenthesized(clause: str) -> str:
    """`clause` with every operand that is not a column, a literal or already in parentheses put in some."""
    tree = sqlglot.parse_one(clause, read="duckdb", into=exp.Condition)
    for node in list(tree.walk()):
        for child in [] if isinstance(node, exp.Paren) else list(node.iter_expressions()):
            if not isinstance(child, exp.Column | exp.Identifier | exp.Literal | exp.Null | exp.Boolean | exp.Paren):
                paren = exp.Paren()
                child.replace(paren)
                paren.set("this", child)
    return tree.sql(dialect="duckdb", identify=True)


NUMBERS = st.recursive(
    st.sampled_from(["id", "score", '"my col"', "0", "1", "2", "2.5", "7", "NULL"]),
    lambda inner: st.one_of(
        inner.map(lambda x: f"- {x}"),
        inner.map(lambda x: f"({x})"),
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "%"]), inner).map(" ".join),
    ),
    max_leaves=6,
)
CONDITIONS = st.recursive(
    st.one_of(
        st.sampled_from(["flag", "TRUE", "NULL", "text IS NULL", "text LIKE 'a%'", "text NOT ILIKE '%E'"]),
        st.tuples(NUMBERS, st.sampled_from(["=", "<>", "<", "<=", ">", ">="]), NUMBERS).map(" ".join),
        st.tuples(NUMBERS, st.sampled_from(["BETWEEN", "NOT BETWEEN"]), NUMBERS, NUMBERS).map(
            "{0[0]} {0[1]} {0[2]} AND {0[3]}".format
        ),
        NUMBERS.map(lambda x: f"{x} NOT IN (1, -2, NULL)"),
    ),
    lambda inner: st.one_of(
        inner.map(lambda x: f"NOT {x}"),
        inner.map(lambda x: f"({x})"),
        inner.map(lambda x: f"{x} IS NOT NULL"),
        st.tuples(inner, st.sampled_from(["AND", "OR", "="]), inner).map(" ".join),
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=CONDITIONS)
def test_duckdb_reads_the_checked_tree(con: duckdb.DuckDBPyConnection, where: str) -> None:
    """DuckDB's precedence reads the rendered clause as the tree sqlglot parsed: same rows as with every operand
    in parentheses."""
    try:
        clause = where_clause(where, COLUMNS)
    except InvalidParameterError:
        return  # chained comparisons, nesting too deep
    results: list[list[int] | str] = []
    for sql in (clause, parenthesized(clause)):
        try:
            results.append(ids(con, f"SELECT id FROM t WHERE {sql} ORDER BY id"))
        except DATA_ERRORS as error:
            results.append(type(error).__name__)
    assert results[0] == results[1]

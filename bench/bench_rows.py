"""Pages of a whole split over HTTP: `/rows`, `/search` and `/filter` against plain DuckDB on the Parquet file.

For each dataset of bench/bench_data.py (a CSV split of --csv-gb, a folder of --images images; the CSV's
text ends with the rare word `zyzzyva` in one row in 1,000), the steps run in real `celery -A tasks worker`
processes, each step's worker fresh as in bench_data: split-first-rows (light), config-parquet-and-info
(heavy), config-parquet and config-parquet-metadata (light); then the heavy split-duckdb-index in a fresh
one-process heavy worker, beside a light one (split-descriptive-statistics, the other heavy job config-parquet
enqueued, is cancelled before: the heavy pool process runs the index step only). The index step's wall time
is its job's run time in the ledger, its peak RSS the VmHWM of the heavy worker's pool process when its entry
appears (bench_data.run_step), its file size the entry's `size`. WORKER_PARQUET_MAX_BYTES and
WORKER_DUCKDB_INDEX_MAX_BYTES are set so that the whole split is converted and indexed.

Then one API process (`python -m tasks api`, one uvicorn process, its defaults: API_QUERY_TIMEOUT_SECONDS,
API_QUERY_MEMORY_LIMIT_BYTES, API_QUERY_THREADS) is measured over real HTTP by one httpx client (keep-alive,
sequential requests), every answer checked (status, row indexes, cells, totals):

(1) `/rows` at --requests random offsets over the whole split, length 100: p50, p90, p99; a cold pass, then a
    warm pass over the same offsets (an image's first read writes its asset file; the random pages overlap,
    so the cold pass's pages none of whose rows was read before are also measured apart). Baseline: DuckDB in this
    process (one connection kept open) reading the same rows from the split's Parquet file,
    `SELECT * FROM read_parquet(?) LIMIT 100 OFFSET n` with `fetchall()`, same offsets;
(2) CSV: `/search?query=zyzzyva`, the first page and a deep one (offset 10,000, or the middle page of the
    matches when there are fewer than 20,000): p50 over --repeats requests. Baseline: what a competent user
    writes over the Parquet file, `... WHERE regexp_matches(lower(text), '\\bzyzzyva\\b') ORDER BY id LIMIT
    100 OFFSET n` plus its `count(*)`; the pages must hold the same rows and the totals agree;
(3) `/filter`: CSV `where="score" > 3.0 AND "category" = 'class3'`, `orderby="score" DESC` (images:
    `where="label" = 3`), first page: p50 over --repeats requests; baseline the same query and its count(*)
    in DuckDB over the Parquet file;
(4) bad input: --bad-inputs generated `where`/`orderby` strings (a random mix of column names, literals,
    operators, keywords, function names such as read_csv, getenv, COPY, ATTACH, quotes, semicolons, comments
    and parentheses: 40% token soup, the rest near-valid expressions and orderings, some mutated), the known
    injection strings (each must be refused: 422) and odd but harmless edge cases, sent to the CSV's /filter:
    the answers counted by status. A COPY or ATTACH target must not appear, and the index must answer as
    before afterwards;
(5) the API process's peak RSS (VmHWM), after each phase.

A repeated query (search, filter and their baselines) runs --repeats times, or fewer (3 at least) once it
has taken REPEAT_BUDGET_SECONDS. Targets (issue 26): /rows p50 <= 30 ms and p99 <= 150 ms for the CSV, p99 <=
300 ms for images; /search first page p50 <= 300 ms; /filter first page p50 <= 500 ms; peak RSS <= 500 MB for
the API process and for the index step; zero 500s on bad input (every answer 200 or 422, a 504 counted apart).
The client, the API, the servers and DuckDB share the machine's cores: other load skews the numbers (the
load average is recorded). It prints a table per dataset, writes bench/results/rows.json, and exits with
status 1 after its report when an answer was wrong, a bad input got a 500 (or no answer), an attack got a
200, or the index answered otherwise after the bad input.

    python -m bench.bench_rows [--csv-gb 2] [--images 20000] [--data-dir DIR] [--requests 200]
                               [--repeats 20] [--bad-inputs 1000]

The generated data stays in --data-dir (default: BENCH_DATA_DIR or /tmp/stepcache-bench-data), reused by the
next run (and by bench_data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
from rich.console import Console
from rich.table import Table

from bench.bench_api import api_process
from bench.bench_data import (
    DATASETS,
    TIMEOUT_SECONDS,
    data_arguments,
    peak_rss_mb,
    run_step,
    write_csv,
    write_images,
)
from bench.harness import bench_servers, percentile

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG, SPLIT = "default", "train"
LENGTH = 100
RARE_WORD = "zyzzyva"
DEEP_OFFSET = 10_000
REPEAT_BUDGET_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 120.0
FILTERS = {  # dataset kind: (where, orderby, the same in DuckDB SQL over the Parquet file)
    "csv": ('"score" > 3.0 AND "category" = \'class3\'', '"score" DESC', "score > 3.0 AND category = 'class3'"),
    "images": ('"label" = 3', None, "label = 3"),
}
BASELINE_ORDER = {"csv": "score DESC", "images": None}
SEARCH_BASELINE = rf"regexp_matches(lower(text), '\b{RARE_WORD}\b')"
TARGETS = {  # measure: (at most, unit)
    "csv rows p50": (30.0, "ms"),
    "csv rows p99": (150.0, "ms"),
    "images rows p99": (300.0, "ms"),
    "search first page p50": (300.0, "ms"),
    "filter first page p50": (500.0, "ms"),
    "api peak rss": (500.0, "MB"),
    "index peak rss": (500.0, "MB"),
}


# --- the pipeline -----------------------------------------------------------------------------------------


def pipeline(env: dict[str, str], log_dir: Path, dataset: str) -> dict[str, Any]:
    """Run the dataset's steps up to split-duckdb-index (see the module); what they took and made."""
    from common import cache
    from tasks.embedded import WorkerProcess
    from tasks.steps import dataset_config_names

    dataset_config_names.delay(dataset)  # config-names and split-names on the way to first rows
    steps: dict[str, Any] = {}
    for step, queue, split in (
        ("split-first-rows", "light", SPLIT),
        ("config-parquet-and-info", "heavy", None),
        ("config-parquet-metadata", "light", None),  # config-parquet first, in the same worker
    ):
        steps[step] = run_step(env, log_dir, dataset, step, queue, split)
    steps["cancelled"] = cancel_pending(dataset, "split-descriptive-statistics")
    light_log = log_dir / f"light-{dataset.replace('/', '-')}.log"
    # the light jobs left hold the namespace's slots (QUEUE_MAX_JOBS_PER_NAMESPACE): the index's job may wait for them
    with WorkerProcess("bench-light", env, light_log, 1, "light"):
        steps["split-duckdb-index"] = run_step(env, log_dir, dataset, "split-duckdb-index", "heavy", SPLIT)
    cancel_pending(dataset, None)  # what is left waiting holds no slot of the namespace for the next dataset
    metadata = cache.get_response("config-parquet-metadata", dataset, CONFIG, None).content
    index = cache.get_response("split-duckdb-index", dataset, CONFIG, SPLIT).content
    file = next(f for f in metadata["parquet_files_metadata"] if f["split"] == SPLIT)
    steps["parquet"] = {
        "path": file["path"],
        "bytes": file["size"],
        "num_rows": file["num_rows"],
        "row_groups": len(file["row_groups"]),
        "partial": file.get("partial"),
    }
    steps["index"] = {key: index[key] for key in ("size", "num_rows", "num_rows_total", "indexed_columns", "partial")}
    return steps


def cancel_pending(dataset: str, step: str | None) -> list[str]:
    """Cancel the dataset's waiting or queued jobs (of `step` only, if given): the steps they name."""
    from common.names import namespace_of
    from common.queue.jobs import PENDING_STATUSES
    from tasks.queue import get_queue

    queue = get_queue()
    jobs = [job for job in queue.jobs(dataset, list(PENDING_STATUSES)) if step is None or job.step == step]
    queue.cancel_jobs(namespace_of(dataset), [job.job_id for job in jobs])
    return sorted(job.step for job in jobs)


# --- measuring --------------------------------------------------------------------------------------------


def timed_get(client: httpx.Client, path: str, params: dict[str, str]) -> tuple[float, int, Any]:
    """One request: its time in ms (to the whole body), its status and its body (JSON, or text)."""
    began = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = (time.perf_counter() - began) * 1000
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return elapsed, response.status_code, body


def summary(latencies: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(latencies),
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p90_ms": round(percentile(latencies, 0.9), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
    }


def repeated(call: Callable[[], object], repeats: int) -> list[float]:
    """`call`'s times in ms, `repeats` times or fewer (3 at least) once REPEAT_BUDGET_SECONDS have passed."""
    times: list[float] = []
    started = time.monotonic()
    while len(times) < repeats and (len(times) < 3 or time.monotonic() - started < REPEAT_BUDGET_SECONDS):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return times


def base_params(dataset: str, **more: str | int | None) -> dict[str, str]:
    params = {"dataset": dataset, "config": CONFIG, "split": SPLIT}
    params.update({key: str(value) for key, value in more.items() if value is not None})
    return params


def rows_problem(kind: str, status: int, body: Any, offset: int, count: int, num_rows: int) -> str | None:
    """What is wrong with a /rows answer (None: nothing)."""
    if status != 200 or not isinstance(body, dict):
        return f"status {status}: {str(body)[:300]}"
    rows = body.get("rows") or []
    if [row["row_idx"] for row in rows] != list(range(offset, offset + count)):
        return f"row_idx {[row['row_idx'] for row in rows][:3]}... for offset {offset}, {len(rows)} rows"
    if body.get("num_rows_total") != num_rows:
        return f"num_rows_total {body.get('num_rows_total')} instead of {num_rows}"
    for row in rows:
        cells = row["row"]
        if kind == "csv" and cells.get("id") != row["row_idx"]:
            return f"row {row['row_idx']} has id {cells.get('id')}"
        image = cells.get("image")
        if kind == "images" and not (isinstance(image, dict) and str(image.get("src", "")).startswith("http")):
            return f"row {row['row_idx']}: image cell {str(image)[:200]}"
    return None


def measure_rows(
    client: httpx.Client,
    connection: duckdb.DuckDBPyConnection,
    kind: str,
    dataset: str,
    parquet: Path,
    num_rows: int,
    requests: int,
) -> dict[str, Any]:
    """/rows at random offsets, a cold then a warm pass; DuckDB's read of the same rows."""
    rng = random.Random(1)
    offsets = [rng.randrange(0, max(1, num_rows - LENGTH + 1)) for _ in range(requests)]
    _, status, body = timed_get(client, "/rows", base_params(dataset, offset=0, length=1))  # the process warms up
    measured: dict[str, Any] = {"offsets": len(offsets), "warm_up_status": status}
    problems: list[str] = []
    read: set[int] = {0}  # the rows read before (their asset files written, for images)
    for name in ("cold", "warm"):
        latencies, first_reads = [], []
        for offset in offsets:
            elapsed, status, body = timed_get(client, "/rows", base_params(dataset, offset=offset, length=LENGTH))
            latencies.append(elapsed)
            page = range(offset, min(offset + LENGTH, num_rows))
            if all(row not in read for row in page):
                first_reads.append(elapsed)
            read.update(page)
            problem = rows_problem(kind, status, body, offset, len(page), num_rows)
            if problem:
                problems.append(f"{name} GET /rows?offset={offset}: {problem}")
        measured[name] = summary(latencies)
        if name == "cold":  # the random pages overlap: those whose every row is read for the first time
            measured["cold_first_reads"] = summary(first_reads)
    sql = "SELECT * FROM read_parquet(?) LIMIT {length} OFFSET {offset}"
    connection.execute(sql.format(length=LENGTH, offset=0), [str(parquet)]).fetchall()  # warm up
    latencies = []
    for offset in offsets:
        began = time.perf_counter()
        found = connection.execute(sql.format(length=LENGTH, offset=offset), [str(parquet)]).fetchall()
        latencies.append((time.perf_counter() - began) * 1000)
        if len(found) != min(LENGTH, num_rows - offset):
            problems.append(f"duckdb: {len(found)} rows at offset {offset}")
    measured["duckdb"] = summary(latencies)
    measured["wrong_answers"] = len(problems)
    measured["problems"] = problems[:10]
    return measured


def ids_of(body: Any, column: str) -> list[Any]:
    return [row["row"][column] for row in body.get("rows", [])] if isinstance(body, dict) else []


def measure_query(
    client: httpx.Client,
    connection: duckdb.DuckDBPyConnection,
    path: str,
    params: dict[str, str],
    baseline_sql: tuple[str, str],
    parquet: Path,
    key: str,
    repeats: int,
) -> dict[str, Any]:
    """The API's answer to `path?params`, timed `repeats` times (its first request apart), against the
    baseline's page query and count query (timed together), with the same rows and total."""
    first_ms, status, body = timed_get(client, path, params)
    problems: list[str] = []
    if status != 200 or not isinstance(body, dict):
        problems.append(f"GET {path} {params}: status {status}: {str(body)[:300]}")
    statuses: Counter[int] = Counter()

    def api_call() -> None:
        statuses[timed_get(client, path, params)[1]] += 1

    api_times = repeated(api_call, repeats)
    page_sql, count_sql = baseline_sql
    found: dict[str, Any] = {}

    def baseline_call() -> None:
        found["page"] = connection.execute(page_sql, [str(parquet)]).fetch_arrow_table()
        found["count"] = connection.execute(count_sql, [str(parquet)]).fetchone()

    baseline_times = repeated(baseline_call, repeats)
    expected_ids = found["page"].column(key).to_pylist()
    expected_total = int(found["count"][0])
    if isinstance(body, dict) and status == 200:
        if body.get("num_rows_total") != expected_total:
            problems.append(
                f"GET {path} {params}: num_rows_total {body.get('num_rows_total')}, DuckDB {expected_total}"
            )
        if ids_of(body, key) != expected_ids:
            problems.append(f"GET {path} {params}: {key}s {ids_of(body, key)[:5]}..., DuckDB {expected_ids[:5]}...")
    if set(statuses) - {200}:
        problems.append(f"GET {path} {params}: statuses {dict(statuses)}")
    api_p50, baseline_p50 = percentile(api_times, 0.5), percentile(baseline_times, 0.5)
    return {
        "params": params,
        "num_rows_total": body.get("num_rows_total") if isinstance(body, dict) else None,
        "rows": len(body.get("rows", [])) if isinstance(body, dict) else None,
        "first_request_ms": round(first_ms, 2),
        "requests": len(api_times),
        "p50_ms": round(api_p50, 2),
        "max_ms": round(max(api_times), 2),
        "duckdb": {"sql": list(baseline_sql), "runs": len(baseline_times), "p50_ms": round(baseline_p50, 2)},
        "ratio": round(api_p50 / baseline_p50, 3),
        "wrong_answers": len(problems),
        "problems": problems,
    }


def search_and_filter(
    client: httpx.Client,
    connection: duckdb.DuckDBPyConnection,
    kind: str,
    dataset: str,
    parquet: Path,
    num_rows: int,
    repeats: int,
) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    if kind == "csv":
        matches = sum(1 for _ in range(500, num_rows, 1000))  # the rows that end with the rare word
        deep = min(DEEP_OFFSET, matches // 2 // LENGTH * LENGTH)
        where = f"FROM read_parquet(?) WHERE {SEARCH_BASELINE}"
        for name, offset in (("search_first_page", 0), ("search_deep_page", deep)):
            measured[name] = measure_query(
                client,
                connection,
                "/search",
                base_params(dataset, query=RARE_WORD, offset=offset, length=LENGTH),
                (f"SELECT * {where} ORDER BY id LIMIT {LENGTH} OFFSET {offset}", f"SELECT count(*) {where}"),
                parquet,
                "id",
                repeats,
            )
            measured[name]["expected_matches"] = matches
            if measured[name]["num_rows_total"] != matches:
                measured[name]["problems"].append(f"{matches} rows end with {RARE_WORD}")
                measured[name]["wrong_answers"] += 1
    api_where, orderby, sql_where = FILTERS[kind]
    order = f" ORDER BY {BASELINE_ORDER[kind]}" if BASELINE_ORDER[kind] else ""
    measured["filter_first_page"] = measure_query(
        client,
        connection,
        "/filter",
        base_params(dataset, where=api_where, orderby=orderby, offset=0, length=LENGTH),
        (
            f"SELECT * FROM read_parquet(?) WHERE {sql_where}{order} LIMIT {LENGTH}",
            f"SELECT count(*) FROM read_parquet(?) WHERE {sql_where}",
        ),
        parquet,
        "id" if kind == "csv" else "label",
        repeats,
    )
    if kind == "images":  # the labels are all 3: the page's rows are checked by their row_idx instead
        page = measure_query_rows(client, dataset, api_where, connection, parquet, sql_where)
        if page:
            measured["filter_first_page"]["problems"].append(page)
            measured["filter_first_page"]["wrong_answers"] += 1
    return measured


def measure_query_rows(
    client: httpx.Client, dataset: str, where: str, connection: duckdb.DuckDBPyConnection, parquet: Path, sql: str
) -> str | None:
    """Whether the filter's first page holds the rows DuckDB finds first (by their position in the file)."""
    body = timed_get(client, "/filter", base_params(dataset, where=where, length=LENGTH))[2]
    found = connection.execute(
        f"SELECT file_row_number FROM read_parquet(?, file_row_number = true) WHERE {sql}"
        f" ORDER BY file_row_number LIMIT {LENGTH}",
        [str(parquet)],
    ).fetchall()
    expected = [row[0] for row in found]
    got = [row["row_idx"] for row in body.get("rows", [])] if isinstance(body, dict) else []
    return None if got == expected else f"/filter {where}: row_idx {got[:5]}..., DuckDB {expected[:5]}..."


# --- bad input --------------------------------------------------------------------------------------------


COLUMNS = ['"id"', '"text"', '"score"', '"flag"', '"category"', "id", "score", "text", "category", "flag"]
ODD_COLUMNS = ['"__row_idx"', '"nope"', '"Score"', "data.id", "idx.data.id", '"te""xt"', "*", "rowid", '""']
LITERALS = [
    "0", "3.0", "-1", "1e309", "9223372036854775807", "99999999999999999999999", "'class3'", "'it''s'", "''",
    "'%a%'", "TRUE", "FALSE", "NULL", "0x10", ".5", "1.", "'zyzzyva'", "DATE '2020-01-01'", "'é'", "'\\'",
    "-0.0", "1e-400", "'1'", "'NaN'", "'inf'",
]  # fmt: skip
OPERATORS = [
    "=", "==", "<>", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "//", "%", "||", "::", "->", "->>", "~~",
    "^", "&", "|", "<<", "AND", "OR", "NOT", "IS", "IS NOT", "LIKE", "ILIKE", "NOT LIKE", "GLOB", "SIMILAR TO",
    "IN", "NOT IN", "BETWEEN", "COLLATE", "ESCAPE", "@>", "**",
]  # fmt: skip
KEYWORDS = [
    "SELECT", "FROM", "WHERE", "UNION", "ALL", "ORDER BY", "GROUP BY", "HAVING", "LIMIT", "OFFSET", "DESC", "ASC",
    "NULLS FIRST", "NULLS LAST", "CAST(", "AS", "CASE", "WHEN", "THEN", "ELSE", "END", "EXISTS", "VALUES", "WITH",
    "PRAGMA", "SET", "INSTALL", "LOAD", "DROP TABLE data", "CREATE TABLE x AS", "INSERT INTO data", "DELETE FROM",
    "UPDATE data SET", "CHECKPOINT", "USE", "DESCRIBE", "SUMMARIZE", "EXPLAIN", "QUALIFY", "OVER (", "FILTER (",
]  # fmt: skip
FUNCTIONS = [
    "read_csv(", "read_csv_auto(", "read_parquet(", "read_text(", "read_blob(", "read_json(", "glob(", "getenv(",
    "current_setting(", "COPY", "ATTACH", "DETACH", "lower(", "length(", "regexp_matches(", "sum(", "count(*)",
    "random()", "range(", "repeat(", "string_agg(", "list_value(", "struct_pack(", "query(", "query_table(",
    "duckdb_settings()", "duckdb_tables()", "pragma_database_list", "version()", "now()", "sleep_ms(",
]  # fmt: skip
PUNCTUATION = [
    "'", '"', "`", ";", "--", "/*", "*/", "(", ")", ",", ".", "[", "]", "{", "}", "$1", "?", ":x", "\\", "\n", "\t",
    "  ", "\U0001f642", "\u202e", "\x00", "%", "%00", "#", "@",
]  # fmt: skip
TOKENS = COLUMNS + ODD_COLUMNS + LITERALS + OPERATORS + KEYWORDS + FUNCTIONS + PUNCTUATION


def attacks(scratch: Path) -> list[tuple[str | None, str | None]]:
    """The known injection attempts, as (where, orderby): each must be refused (422)."""
    copied, attached = scratch / "copied.csv", scratch / "attached.db"
    where = [
        "read_csv('/etc/passwd')",
        "\"id\" IN (SELECT * FROM read_csv('/etc/passwd'))",
        "\"text\" = (SELECT content FROM read_text('/etc/passwd'))",
        "\"id\" > 0 UNION SELECT * FROM read_parquet('/etc/passwd')",
        "; DROP TABLE data",
        "1=1; DROP TABLE data",
        '"id" > 0; DROP TABLE data --',
        '"id" > 0); DROP TABLE data; --',
        f"COPY data TO '{copied}'",
        f"\"id\" > 0); COPY (SELECT 1) TO '{copied}'; --",
        f"ATTACH '{attached}'",
        f"\"id\" > 0; ATTACH '{attached}' AS x",
        "getenv('HOME')",
        "getenv('HOME') = '/root'",
        "current_setting('memory_limit') = '1'",
        '"id" > 0; SET enable_external_access = true',
        "PRAGMA database_list",
        "INSTALL httpfs",
        "LOAD httpfs",
        "--",
        '"id" > 0 --',
        "/* */",
        '"id" /* */ > 0',
        "/*",
        "'",
        '"',
        "'''",
        '"id" = \'abc',
        '"id" = "',
        "\"text\" = 'x'' OR 1=1",
        '"id" > 0) OR (1=1',
        "\"id\"::VARCHAR = '1'",
        "CAST(\"id\" AS VARCHAR) = '1'",
        "(SELECT count(*) FROM data) > 0",
        "(SELECT count(*) FROM idx.data) > 0",
        "EXISTS (SELECT 1)",
        '"id" = $1',
        '"id" = ?',
        '"__row_idx" > 0',
        "idx.data.id > 0",
        "lower(\"text\") = 'x'",
        "\"text\" SIMILAR TO '.*'",
        "\"text\" GLOB '*'",
        "regexp_matches(\"text\", '(a+)+$')",
        '"id" > 0\x00; DROP TABLE data',
    ]
    orderby = [
        '"id"; DROP TABLE data',
        "(SELECT 1)",
        "random()",
        '"id" DESC LIMIT 1',
        '"id" COLLATE nocase',
        "read_csv('/etc/passwd')",
        "getenv('HOME')",
        '"id" --',
        '/* */ "id"',
        '"id" USING SAMPLE 10',
    ]
    return [(text, None) for text in where] + [(None, text) for text in orderby]


EDGE_CASES: list[tuple[str | None, str | None]] = [  # odd but harmless: 200 and 422 are both right
    ("(" * 600 + '"id" > 0' + ")" * 600, None),
    ("NOT " * 500 + '"flag"', None),
    ('"id" > 0 AND ' * 300 + "TRUE", None),
    ('"id" + ' * 900 + "1 > 0", None),
    ("x" * 3000, None),
    ('"id" IN ()', None),
    ('"id" IN (1,,2)', None),
    ('"id" BETWEEN 1', None),
    ('"text" LIKE "text"', None),
    ("\"text\" LIKE '%' ESCAPE '\\'", None),
    ('"id" IS 1', None),
    ('"id" < "score" = "flag"', None),
    ('"id" * 9223372036854775807 > 0', None),
    ('"text" > 3', None),
    ('"id" / 0 > 1', None),
    ("1", None),
    ("TRUE", None),
    (None, "1"),
    (None, '"nope"'),
    (None, '"id" DESC,'),
    (None, '"id" ASC NULLS FIRST, "score" DESC NULLS LAST'),
]


def generated(count: int, seed: int = 0) -> list[tuple[str | None, str | None]]:
    """`count` (where, orderby) pairs: token soup, near-valid expressions, mutated ones, orderings."""
    rng = random.Random(seed)

    def soup() -> str:
        return rng.choice([" ", ""]).join(rng.choices(TOKENS, k=rng.randint(1, 15)))

    def comparison() -> str:
        column = rng.choice(COLUMNS + ODD_COLUMNS[:2])
        form = rng.randrange(6)
        if form == 0:
            return f"{column} {rng.choice(['=', '<>', '<', '>', '<=', '>='])} {rng.choice(LITERALS)}"
        if form == 1:
            return f"{column} {rng.choice(['+', '-', '*', '/', '%'])} {rng.choice(LITERALS)} > {rng.choice(LITERALS)}"
        if form == 2:
            return f"{column} {rng.choice(['', 'NOT '])}BETWEEN {rng.choice(LITERALS)} AND {rng.choice(LITERALS)}"
        if form == 3:
            return f"{column} {rng.choice(['', 'NOT '])}IN ({', '.join(rng.choices(LITERALS, k=rng.randint(1, 4)))})"
        if form == 4:
            return f"{column} {rng.choice(['LIKE', 'ILIKE', 'NOT LIKE'])} {rng.choice(LITERALS)}"
        return f"{column} IS {rng.choice(['', 'NOT '])}NULL"

    def condition(depth: int = 0) -> str:
        if depth > 2 or rng.random() < 0.5:
            return comparison()
        joined = f"{condition(depth + 1)} {rng.choice(['AND', 'OR'])} {condition(depth + 1)}"
        return rng.choice([joined, f"({joined})", f"NOT ({joined})"])

    def ordering() -> str:
        items = [
            f"{rng.choice(COLUMNS + ODD_COLUMNS[:2])}{rng.choice(['', ' ASC', ' DESC'])}"
            f"{rng.choice(['', '', ' NULLS FIRST', ' NULLS LAST'])}"
            for _ in range(rng.randint(1, 3))
        ]
        return ", ".join(items)

    def mutated(text: str) -> str:
        position = rng.randint(0, len(text))
        choice = rng.randrange(3)
        if choice == 0:  # a token inserted
            return text[:position] + rng.choice([" ", ""]) + rng.choice(TOKENS) + " " + text[position:]
        if choice == 1:  # cut short
            return text[:position] or text
        return text + rng.choice([" ", ""]) + rng.choice(TOKENS)  # a token after

    cases: list[tuple[str | None, str | None]] = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.3:
            cases.append((soup(), None))
        elif draw < 0.4:
            cases.append((None, soup()))
        elif draw < 0.65:
            cases.append((condition(), ordering() if rng.random() < 0.3 else None))
        elif draw < 0.85:
            cases.append((mutated(condition()), None))
        elif draw < 0.95:
            cases.append((None, rng.choice([ordering(), mutated(ordering())])))
        else:
            cases.append((condition(), mutated(ordering())))
    return cases


def bad_input(client: httpx.Client, dataset: str, scratch: Path, count: int) -> dict[str, Any]:
    """Every known and generated input sent to /filter; the answers by status, the unexpected ones shown."""
    cases = [("attack", case) for case in attacks(scratch)] + [("edge", case) for case in EDGE_CASES]
    cases += [("generated", case) for case in generated(count)]
    statuses: dict[str, Counter[int]] = {"attack": Counter(), "edge": Counter(), "generated": Counter()}
    unexpected: list[dict[str, Any]] = []
    accepted: dict[str, list[dict[str, Any]]] = {"attack": [], "edge": []}
    latencies = []
    started = time.monotonic()
    for origin, (where, orderby) in cases:
        params = base_params(dataset, where=where, orderby=orderby, length=10)
        try:
            elapsed, status, body = timed_get(client, "/filter", params)
        except httpx.HTTPError as error:  # no answer at all: counted as status 0
            unexpected.append({"where": where, "orderby": orderby, "status": None, "answer": repr(error)[:300]})
            statuses[origin][0] += 1
            continue
        latencies.append(elapsed)
        statuses[origin][status] += 1
        shown = {"where": where, "orderby": orderby, "status": status, "ms": round(elapsed, 1)}
        if status not in (200, 422, 504):
            unexpected.append({**shown, "answer": str(body)[:400]})
        elif status == 200 and origin in accepted:
            accepted[origin].append({**shown, "num_rows_total": body.get("num_rows_total")})
    every = Counter[int]()
    for counter in statuses.values():
        every.update(counter)

    def by_status(counter: Counter[int]) -> dict[str, int]:
        return {str(status): number for status, number in sorted(counter.items())}

    return {
        "requests": len(cases),
        "seconds": round(time.monotonic() - started, 1),
        "by_status": by_status(every),
        "by_origin": {origin: by_status(counter) for origin, counter in statuses.items()},
        "latency": summary(latencies),
        "server_errors": sum(number for status, number in every.items() if status >= 500 and status != 504),
        "no_answer": every[0],
        "timeouts": every[504],
        "unexpected": unexpected[:30],
        "attacks_accepted": accepted["attack"],
        "edge_cases_accepted": accepted["edge"],
        "files_written": [str(path) for path in (scratch / "copied.csv", scratch / "attached.db") if path.exists()],
    }


def api_peak_rss_mb(pid: int) -> float:
    """The VmHWM of a process and its children (uvicorn's), the highest."""
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return round(max(peak_rss_mb(process.pid) for process in processes), 1)


# --- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(parser)
    parser.add_argument("--requests", type=int, default=200, help="/rows requests per pass")
    parser.add_argument("--repeats", type=int, default=20, help="requests of each /search and /filter measure")
    parser.add_argument("--bad-inputs", type=int, default=1000, help="generated where/orderby strings")
    arguments = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 150)  # a log gets the whole table
    began = time.monotonic()
    phases: dict[str, float] = {}
    mirror = arguments.data_dir / "mirror"
    with console.status("writing the data (kept for the next run)"):
        write_csv(mirror / DATASETS["csv"] / "train.csv", arguments.csv_gb)
        write_images(mirror / DATASETS["images"], arguments.images)
    phases["data"] = round(time.monotonic() - began, 1)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": {
            "csv_gb": arguments.csv_gb,
            "images": arguments.images,
            "data_dir": str(arguments.data_dir),
            "requests": arguments.requests,
            "repeats": arguments.repeats,
            "bad_inputs": arguments.bad_inputs,
            "length": LENGTH,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
            "load_average_at_start": os.getloadavg(),
        },
        "targets": {name: {"at_most": limit, "unit": unit} for name, (limit, unit) in TARGETS.items()},
        "csv_bytes": (mirror / DATASETS["csv"] / "train.csv").stat().st_size,
    }
    with tempfile.TemporaryDirectory(prefix="stepcache-bench-rows-") as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "metrics").mkdir()
        extra = {
            "COMMON_HF_ENDPOINT": str(mirror),
            "WORKER_PARQUET_DIRECTORY": str(scratch / "parquet"),
            "ASSETS_STORAGE_DIRECTORY": str(scratch / "assets"),
            "COMMON_HF_CACHE_DIRECTORY": str(scratch / "hf-cache"),
            "WORKER_PARQUET_MAX_BYTES": str(10**11),  # the whole split converted, and indexed:
            "WORKER_DUCKDB_INDEX_MAX_BYTES": str(10**11),
            "WORKER_MAX_JOB_DURATION_SECONDS": str(TIMEOUT_SECONDS),
            "WORKER_HEARTBEAT_INTERVAL_SECONDS": "5",
            "API_METRICS_PORT": "0",
            "API_ASSETS_SIGNING_KEY": "bench-assets-signing-key",
        }
        with bench_servers(**extra) as servers:
            from common.config import get_config

            for kind, dataset in DATASETS.items():
                started = time.monotonic()
                with console.status(f"{dataset}: the steps, up to split-duckdb-index"):
                    results[kind] = {"steps": pipeline(servers.env, scratch, dataset)}
                phases[f"pipeline_{kind}"] = round(time.monotonic() - started, 1)
            settings = get_config().api
            results["api_settings"] = {
                "query_timeout_seconds": settings.query_timeout_seconds,
                "query_memory_limit_bytes": settings.query_memory_limit_bytes,
                "query_threads": settings.query_threads,
            }
            env = {**os.environ, **servers.env, "COMMON_LOG_LEVEL": "WARNING"}
            env["PROMETHEUS_MULTIPROC_DIR"] = str(scratch / "metrics")
            results["api_peak_rss_mb"] = {}
            connection = duckdb.connect()
            started = time.monotonic()
            with (
                api_process(env, scratch / "api.log", 1) as (port, pid),
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_SECONDS) as client,
            ):
                results["api_peak_rss_mb"]["started"] = api_peak_rss_mb(pid)
                for kind, dataset in DATASETS.items():
                    parquet = scratch / "parquet" / results[kind]["steps"]["parquet"]["path"]
                    num_rows = int(results[kind]["steps"]["parquet"]["num_rows"])
                    with console.status(f"{dataset}: GET /rows, {arguments.requests} offsets, twice"):
                        results[kind]["rows"] = measure_rows(
                            client, connection, kind, dataset, parquet, num_rows, arguments.requests
                        )
                    results["api_peak_rss_mb"][f"after_{kind}_rows"] = api_peak_rss_mb(pid)
                    with console.status(f"{dataset}: GET /search and /filter"):
                        results[kind].update(
                            search_and_filter(client, connection, kind, dataset, parquet, num_rows, arguments.repeats)
                        )
                    results["api_peak_rss_mb"][f"after_{kind}_queries"] = api_peak_rss_mb(pid)
                with console.status(f"/filter: {arguments.bad_inputs} generated and the known bad inputs"):
                    results["bad_input"] = bad_input(client, DATASETS["csv"], scratch, arguments.bad_inputs)
                    csv = results["csv"]["steps"]["parquet"]
                    parquet = scratch / "parquet" / csv["path"]
                    again = search_and_filter(
                        client, connection, "csv", DATASETS["csv"], parquet, int(csv["num_rows"]), 3
                    )
                    results["bad_input"]["index_intact"] = all(not measure["problems"] for measure in again.values())
                results["api_peak_rss_mb"]["end"] = api_peak_rss_mb(pid)
                results["api_log_tail"] = (scratch / "api.log").read_text(errors="replace").splitlines()[-10:]
            connection.close()
            phases["api"] = round(time.monotonic() - started, 1)
    phases["total"] = round(time.monotonic() - began, 1)
    results["phases_seconds"] = phases
    results["machine"]["load_average_at_end"] = os.getloadavg()
    report(results, console)
    wrong = sum(results[kind]["rows"]["wrong_answers"] for kind in DATASETS) + sum(
        measure["wrong_answers"]
        for kind in DATASETS
        for measure in results[kind].values()
        if isinstance(measure, dict) and "ratio" in measure
    )
    bad = results["bad_input"]
    if wrong or bad["server_errors"] or bad["no_answer"] or bad["attacks_accepted"] or not bad["index_intact"]:
        sys.exit(1)


# --- the report -------------------------------------------------------------------------------------------


def verdict(name: str, value: float) -> str:
    """The target of `name`, and whether `value` meets it."""
    if name not in TARGETS:
        return ""
    limit, unit = TARGETS[name]
    return f"<= {limit:g} {unit} " + ("[green]yes[/green]" if value <= limit else "[red]NO[/red]")


def dataset_table(results: dict[str, Any], kind: str) -> Table:
    """One dataset's measures: stepcache's, the target, DuckDB's on the Parquet file, their ratio."""
    measured = results[kind]
    steps = measured["steps"]
    parquet = steps["parquet"]
    source = f"CSV {results['csv_bytes'] / 1e9:.2f} GB, " if kind == "csv" else ""
    table = Table(
        title=f"{kind}: {parquet['num_rows']:,} rows ({source}Parquet {parquet['bytes'] / 1e6:,.0f} MB in"
        f" {parquet['row_groups']} row groups), {results['machine']['cpus']} CPUs"
    )
    for column in ("measure", "stepcache", "target", "DuckDB", "ratio", "notes"):
        table.add_column(column, justify="right" if column in ("stepcache", "DuckDB", "ratio") else "left")
    rows = measured["rows"]
    passes = {
        "cold": f"{rows['offsets']} random offsets, length {LENGTH}",
        "cold_first_reads": f"the cold pass's {rows['cold_first_reads']['count']} pages of rows never read before",
        "warm": "the same offsets again",
    }
    for name, said in passes.items():
        for quantile in ("p50", "p90", "p99") if rows[name]["count"] else ():
            value, baseline = rows[name][f"{quantile}_ms"], rows["duckdb"][f"{quantile}_ms"]
            table.add_row(
                f"/rows {name.replace('_', ' ')} {quantile}",
                f"{value:.1f} ms",
                verdict(f"{kind} rows {quantile}", value),
                f"{baseline:.1f} ms",
                f"{value / baseline:.2f}x",
                said if quantile == "p50" else "",
            )
    labels = {
        "search_first_page": ("/search first page p50", "search first page p50"),
        "search_deep_page": ("/search deep page p50", ""),
        "filter_first_page": ("/filter first page p50", "filter first page p50"),
    }
    for key, (label, target) in labels.items():
        if key in measured:
            query = measured[key]
            table.add_row(
                label,
                f"{query['p50_ms']:.1f} ms",
                verdict(target, query["p50_ms"]),
                f"{query['duckdb']['p50_ms']:.1f} ms",
                f"{query['ratio']:.2f}x",
                f"offset {query['params'].get('offset', '0')}, {query['num_rows_total']:,} matches;"
                f" {query['requests']} requests, {query['duckdb']['runs']} DuckDB runs;"
                f" first request {query['first_request_ms']:.0f} ms",
            )
    index, built = steps["split-duckdb-index"], steps["index"]
    table.add_row("split-duckdb-index wall time", f"{index['seconds']:.1f} s", "", "", "", "the job's run time")
    peak = index["peak_rss_mb"]
    table.add_row("split-duckdb-index peak RSS", f"{peak:.0f} MB", verdict("index peak rss", peak), "", "", "")
    table.add_row(
        "index file size",
        f"{built['size'] / 1e6:,.1f} MB",
        "",
        "",
        f"{built['size'] / parquet['bytes']:.2f}x",
        f"of the Parquet file; {built['num_rows']:,} rows indexed, partial: {built['partial']}",
    )
    conversion = steps["config-parquet-and-info"]
    table.add_row(
        "config-parquet-and-info",
        f"{conversion['seconds']:.1f} s",
        "",
        "",
        "",
        f"peak RSS {conversion['peak_rss_mb']:.0f} MB (not a target here)",
    )
    wrong = rows["wrong_answers"] + sum(
        query["wrong_answers"] for query in measured.values() if isinstance(query, dict) and "ratio" in query
    )
    table.add_row("wrong answers", f"[red]{wrong}[/red]" if wrong else "0", "0", "", "", "")
    return table


def report(results: dict[str, Any], console: Console) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rows.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for kind in DATASETS:
        console.print(dataset_table(results, kind))
    peaks = results["api_peak_rss_mb"]
    api = Table(title="the API process and bad input")
    for column in ("measure", "value", "target"):
        api.add_column(column)
    api.add_row("API peak RSS (VmHWM) at the end", f"{peaks['end']:.0f} MB", verdict("api peak rss", peaks["end"]))
    api.add_row("API peak RSS by phase", ", ".join(f"{key} {value:.0f}" for key, value in peaks.items()), "")
    bad = results["bad_input"]
    api.add_row(
        f"bad input: {bad['requests']} /filter requests, {bad['seconds']} s",
        ", ".join(f"{status}: {number}" for status, number in bad["by_status"].items()),
        "200 or 422 only",
    )
    for origin, counts in bad["by_origin"].items():
        target = "422 only" if origin == "attack" else ""
        api.add_row(f"  {origin}", ", ".join(f"{status}: {number}" for status, number in counts.items()), target)
    api.add_row(
        "  500s (server errors)",
        f"[red]{bad['server_errors']}[/red]" if bad["server_errors"] else "0",
        "0 " + ("[green]yes[/green]" if not bad["server_errors"] else "[red]NO[/red]"),
    )
    api.add_row("  504s (query timeout)", str(bad["timeouts"]), "counted apart")
    latency = bad["latency"]
    spread = f"{latency['p50_ms']:.0f} / {latency['p99_ms']:.0f} / {latency['max_ms']:.0f} ms"
    api.add_row("  bad-input latency p50 / p99 / max", spread, "")
    api.add_row("  files written by COPY / ATTACH", str(bad["files_written"] or "none"), "none")
    api.add_row("  index answers as before afterwards", str(bad["index_intact"]), "True")
    console.print(api)
    for item in bad["unexpected"]:
        console.print(f"unexpected answer: {json.dumps(item)[:600]}", markup=False, highlight=False)
    for item in bad["attacks_accepted"]:
        console.print(f"attack answered 200: {json.dumps(item)[:300]}", markup=False, highlight=False)
    for item in bad["edge_cases_accepted"]:
        console.print(f"edge case answered 200: {json.dumps(item)[:200]}", markup=False, highlight=False)
    for kind in DATASETS:
        for problem in results[kind]["rows"]["problems"] + [
            problem
            for query in results[kind].values()
            if isinstance(query, dict) and "ratio" in query
            for problem in query["problems"]
        ]:
            console.print(f"{kind}: {problem}", markup=False, highlight=False)
    loads = results["machine"]["load_average_at_start"][0], results["machine"]["load_average_at_end"][0]
    console.print(f"load average (1 min) at start / end: {loads[0]:.2f} / {loads[1]:.2f}")
    console.print(f"seconds by phase: {results['phases_seconds']}; written to {RESULTS / 'rows.json'}")


if __name__ == "__main__":
    main()

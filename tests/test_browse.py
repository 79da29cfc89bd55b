"""/rows, /search and /filter over real HTTP, on datasets the tests write, with Celery's in-process worker
computing config-parquet-metadata and split-duckdb-index: every row reachable by paging and equal to the
source, search and filter equal to pandas on the source, the viewer's contract, media as signed URLs,
partial splits, ugly input refused with a typed 422, and gated datasets refused without a JWT."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from common import cache
from tasks import samples
from tests import test_parquet_download
from tests.conftest import use_settings
from tests.test_api_auth import token
from tests.test_pipeline import run_pipeline
from tests.viewer_contract import Contract, load

ROWS = 1_000
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]
RARE = "zyzzyva"  # in 1% of rows


mirror = test_parquet_download.mirror  # the fixtures: a mirror, JWTs, signed URLs, and the API over HTTP
client = test_parquet_download.client


@pytest.fixture(autouse=True)
def small_row_groups(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row groups of a few dozen rows: pages span several."""
    use_settings(monkeypatch, {"WORKER_PARQUET_ROW_GROUP_MAX_BYTES": "2000"})


def words_dataset(root: Path, name: str = "org/words") -> tuple[str, pd.DataFrame]:
    rng = random.Random(7)
    records = []
    for index in range(ROWS):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        if index % 100 == 37:
            text += f" {RARE.upper() if index % 200 == 37 else RARE}"
        records.append(
            {
                "id": index,
                "text": text,
                "score": None if index % 97 == 0 else round(rng.random(), 3),
                "flag": index % 3 == 0,
                "label": f"label {index % 7}",
            }
        )
    frame = pd.DataFrame(records)
    path = root / name / "data.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return name, pd.read_csv(path)  # as the CSV reads back (a missing score is NaN)


def conforms(contract: Contract, path: str, answer: httpx.Response) -> bool:
    """The answer conforms, but for one gap of the document: the viewer answers a bad offset, length or where
    422 InvalidParameter (libapi's get_request_parameter_offset...), while its document lists only
    MissingRequiredParameter for 422."""
    invalid = answer.headers.get("X-Error-Code") == "InvalidParameter"
    violations = [v for v in contract.check_answer(path, answer) if not (invalid and v.kind == "X-Error-Code")]
    assert violations == [], violations
    return True


def rows_of(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    return [item["row"] for item in answer.json()["rows"]]


def source_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {key: (None if isinstance(value, float) and value != value else value) for key, value in row.items()}
        for row in frame.to_dict("records")
    ]


def tokens(text: str) -> set[str]:
    return set(re.findall(r"[^\W_]+", text.lower()))


def test_every_row_of_a_split_is_reachable_by_paging_and_equal_to_its_source(
    client: httpx.Client,
    mirror: Path,
    celery_worker: object,
) -> None:
    dataset, frame = words_dataset(mirror)
    entries = run_pipeline(dataset)
    metadata = entries[("config-parquet-metadata", "default", None)].content["parquet_files_metadata"]
    (file,) = metadata
    assert file["num_rows"] == ROWS and len(file["row_groups"]) > 10  # bounded groups: pages span several
    contract = load()
    split = {"dataset": dataset, "config": "default", "split": "train"}
    served: list[dict[str, Any]] = []
    for offset in range(0, ROWS, 100):
        answer = client.get("/rows", params={**split, "offset": offset, "length": 100})
        assert contract.check_answer("/rows", answer) == []
        body = answer.json()
        assert (body["num_rows_total"], body["num_rows_per_page"], body["partial"]) == (ROWS, 100, False)
        assert [item["row_idx"] for item in body["rows"]] == list(range(offset, min(offset + 100, ROWS)))
        served += rows_of(answer)
    assert served == source_rows(frame)
    assert [f["name"] for f in client.get("/rows", params=split).json()["features"]] == list(frame.columns)
    # any window, across row groups; the last page; past the end; nothing
    assert rows_of(client.get("/rows", params={**split, "offset": 123, "length": 77})) == source_rows(frame)[123:200]
    assert rows_of(client.get("/rows", params={**split, "offset": ROWS - 30})) == source_rows(frame)[-30:]
    past = client.get("/rows", params={**split, "offset": ROWS + 5})
    assert past.status_code == 200 and past.json()["rows"] == [] and past.json()["num_rows_total"] == ROWS
    assert rows_of(client.get("/rows", params={**split, "length": 0})) == []
    # an ETag per page
    first = client.get("/rows", params=split)
    again = client.get("/rows", params=split, headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    other = client.get("/rows", params={**split, "offset": 1})
    assert other.headers["ETag"] != first.headers["ETag"]
    # ugly input: typed, never a 500
    for params, code in (
        ({**split, "offset": -1}, "InvalidParameter"),
        ({**split, "offset": "1e3"}, "InvalidParameter"),
        ({**split, "length": 101}, "InvalidParameter"),
        ({**split, "length": "ten"}, "InvalidParameter"),
        ({**split, "offset": "9" * 40}, "InvalidParameter"),
        ({"dataset": dataset, "config": "default"}, "MissingRequiredParameter"),
        ({**split, "split": "nope"}, "ResponseNotFound"),
    ):
        answer = client.get("/rows", params=params)
        assert answer.status_code in (404, 422) and answer.json()["error_code"] == code, (params, answer.text)
        assert conforms(contract, "/rows", answer), params

    # /search: every word, in a string column, in the split's order; equal to the same search in pandas
    strings = ["text", "label"]
    by_row = [set().union(*(tokens(str(row[c])) for c in strings)) for row in frame.to_dict("records")]
    for query in (RARE, RARE.upper(), "alpha", "alpha beta", "label 3", "nothing-here-at-all"):
        wanted = tokens(query)
        expected = [index for index, found in enumerate(by_row) if wanted <= found]
        got: list[int] = []
        for offset in range(0, max(1, len(expected)), 100):
            answer = client.get("/search", params={**split, "query": query, "offset": offset})
            assert answer.status_code == 200 and contract.check_answer("/search", answer) == [], answer.text
            body = answer.json()
            assert body["num_rows_total"] == len(expected), query
            got += [item["row_idx"] for item in body["rows"]]
            assert [item["row"] for item in body["rows"]] == [source_rows(frame)[i] for i in got[-len(body["rows"]) :]]
        assert got == expected, query
    assert len([i for i, found in enumerate(by_row) if RARE in found]) == ROWS // 100

    # /filter: equal to pandas, ordered by orderby then by the split's order
    cases = [
        ('"score" > 0.5 AND "flag"', None, frame[(frame.score > 0.5) & frame.flag]),
        ('"id" % 7 = 0 OR "label" = \'label 2\'', None, frame[(frame.id % 7 == 0) | (frame.label == "label 2")]),
        ('"score" IS NULL', None, frame[frame.score.isna()]),
        (
            None,
            '"score" DESC NULLS LAST',
            frame.sort_values("score", ascending=False, kind="stable", na_position="last"),
        ),
        (
            '"id" BETWEEN 10 AND 500',
            '"label" ASC, "id" DESC',
            frame[frame.id.between(10, 500)].sort_values(["label", "id"], ascending=[True, False]),
        ),
    ]
    for where, orderby, expected_frame in cases:
        params = {**split, **({"where": where} if where else {}), **({"orderby": orderby} if orderby else {})}
        answer = client.get("/filter", params={**params, "length": 100})
        assert contract.check_answer("/filter", answer) == [], params
        body = answer.json()
        assert body["num_rows_total"] == len(expected_frame), params
        assert [item["row_idx"] for item in body["rows"]] == list(expected_frame.index[:100]), params
        assert [item["row"] for item in body["rows"]] == source_rows(expected_frame)[:100], params
    # the injection corpus: refused before anything runs, typed
    for where in (
        "read_csv('/etc/passwd') IS NOT NULL",
        '"id" = 1; DROP TABLE data',
        '"id" IN (SELECT 1)',
        "COPY data TO '/tmp/x'",
        "ATTACH '/tmp/x.db'",
        "getenv('HOME') = 'x'",
        '"id" = 1 -- comment',
        '"text" = \'unbalanced',
        '"text" > 5',  # DuckDB refuses it for its types: 422 as well
        '"nope" = 1',
    ):
        answer = client.get("/filter", params={**split, "where": where})
        assert answer.status_code == 422 and answer.json()["error_code"] == "InvalidParameter", (where, answer.text)
        assert conforms(contract, "/filter", answer), where
    for orderby in ("1", "read_csv('x')", '"id"; DROP TABLE data'):
        answer = client.get("/filter", params={**split, "orderby": orderby})
        assert answer.status_code == 422, (orderby, answer.text)
    for params in ({**split, "query": " "}, {**split, "query": "x" * 2000}):
        assert client.get("/search", params=params).status_code == 422
    # /is-valid says search and filter work, now that they do
    valid = client.get("/is-valid", params={"dataset": dataset}).json()
    assert valid == {"preview": True, "viewer": True, "search": True, "filter": True, "statistics": True}
    assert cache.get_response("split-duckdb-index", dataset, "default", "train").content["partial"] is False


def test_a_partial_split_says_so_and_media_are_signed_urls(
    client: httpx.Client,
    mirror: Path,
    monkeypatch: pytest.MonkeyPatch,
    celery_worker: object,
) -> None:
    monkeypatch.setenv("WORKER_PARQUET_MAX_BYTES", "3000")  # the split's first rows only
    from common.config import get_config

    get_config.cache_clear()
    dataset, frame = words_dataset(mirror, "org/cut")
    run_pipeline(dataset)
    split = {"dataset": dataset, "config": "default", "split": "train"}
    body = client.get("/rows", params=split).json()
    assert body["partial"] is True and 0 < body["num_rows_total"] < ROWS
    assert [item["row"] for item in body["rows"]] == source_rows(frame)[: len(body["rows"])]
    assert client.get("/search", params={**split, "query": "alpha"}).json()["partial"] is True
    assert client.get("/filter", params=split).json()["num_rows_total"] == body["num_rows_total"]
    monkeypatch.delenv("WORKER_PARQUET_MAX_BYTES")
    get_config.cache_clear()

    for media, key in ((samples.image_dataset(mirror), "image"), (samples.audio_dataset(mirror), "audio")):
        run_pipeline(media)
        answer = client.get("/rows", params={"dataset": media, "config": "default", "split": "train"})
        assert answer.status_code == 200, answer.text
        assert load().check_answer("/rows", answer) == []
        (column,) = [f["name"] for f in answer.json()["features"] if f["type"].get("_type") in ("Image", "Audio")]
        cells = [item["row"][column] for item in answer.json()["rows"]]
        sources = [cell["src"] if key == "image" else cell[0]["src"] for cell in cells]
        assert len(sources) == (3 if key == "image" else 2)
        for source in sources:
            assert source.startswith("http") and "signature=" in source
            fetched = client.get(source)
            assert fetched.status_code == 200 and len(fetched.content) > 0
            assert client.get(source.split("?")[0]).status_code == 403  # unsigned
        again = client.get("/rows", params={"dataset": media, "config": "default", "split": "train", "offset": 1})
        assert [item["row_idx"] for item in again.json()["rows"]] == list(range(1, len(sources)))


def test_a_gated_datasets_rows_need_a_jwt_for_it(client: httpx.Client, mirror: Path, celery_worker: object) -> None:
    dataset, _ = words_dataset(mirror, "org/gatedwords")
    (mirror / dataset / ".gated").write_text("")
    run_pipeline(dataset)
    split = {"dataset": dataset, "config": "default", "split": "train"}
    for path, more in (("/rows", {}), ("/search", {"query": "alpha"}), ("/filter", {"where": '"id" < 3'})):
        refused = client.get(path, params={**split, **more})
        missing = client.get(path, params={**split, **more, "dataset": "org/nothing"})
        assert refused.status_code == 401 and refused.json()["error_code"] == "ExternalUnauthenticatedError"
        assert (refused.status_code, refused.content) == (missing.status_code, missing.content), path
        other = client.get(path, params={**split, **more}, headers={"Authorization": f"Bearer {token('org/other')}"})
        assert other.status_code == 404, path
        allowed = client.get(path, params={**split, **more}, headers={"Authorization": f"Bearer {token(dataset)}"})
        assert allowed.status_code == 200 and allowed.headers["Cache-Control"].startswith("private"), path
        assert allowed.json()["rows"], path


def test_ugly_cells_and_costly_queries_get_a_bounded_answer(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    """What an adversarial review found, each answered as it should be: an image past the first rows that
    cannot be read, or too big to decode in the API, is a null cell (the page is served); ILIKE with many
    `%` runs as `lower() LIKE lower()` (DuckDB's ILIKE backtracks, uninterruptibly); a search of more than
    10 different words is refused; a sorted page deep in the split sorts positions, not whole rows."""
    import io

    from PIL import Image

    def png(size: tuple[int, int]) -> bytes:
        output = io.BytesIO()
        Image.new("RGB", size, (1, 2, 3)).save(output, format="PNG")
        return output.getvalue()

    for index in range(100):
        samples.write(mirror / "org" / "ugly" / "train" / "a" / f"{index:03d}.png", png((4, 3)))
    samples.write(mirror / "org" / "ugly" / "train" / "a" / "100.png", png((4, 3))[:40])  # truncated
    samples.write(mirror / "org" / "ugly" / "train" / "a" / "101.png", png((4001, 4000)))  # 16 M pixels and more
    run_pipeline("org/ugly")
    split = {"dataset": "org/ugly", "config": "default", "split": "train"}
    answer = client.get("/rows", params={**split, "offset": 98})
    assert answer.status_code == 200, answer.text
    cells = {item["row_idx"]: item["row"]["image"] for item in answer.json()["rows"]}
    assert [index for index, image in cells.items() if image is None] == [100, 101]
    assert all(cells[index]["src"].startswith("http") for index in (98, 99))

    dataset, frame = words_dataset(mirror, "org/likes")
    run_pipeline(dataset)
    split = {"dataset": dataset, "config": "default", "split": "train"}
    pattern = "%a%l%p%h%a%q"
    answer = client.get("/filter", params={**split, "where": f"\"text\" ILIKE '{pattern.upper()}'"})
    expected = frame[frame.text.str.lower().str.fullmatch(pattern.replace("%", ".*"))]
    assert answer.status_code == 200 and answer.json()["num_rows_total"] == len(expected)
    words = " ".join(f"w{number}" for number in range(11))
    refused = client.get("/search", params={**split, "query": words})
    assert refused.status_code == 422 and "10 different words" in refused.json()["error"]
    deep = client.get("/filter", params={**split, "orderby": '"text" DESC', "offset": ROWS - 10})
    ordered = frame.sort_values("text", ascending=False, kind="stable")
    assert [item["row_idx"] for item in deep.json()["rows"]] == list(ordered.index[-10:])

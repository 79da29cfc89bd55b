"""/compatible-libraries, /croissant-crumbs, /hub-cache and the operator's /admin/dataset-status and
/admin/cache-reports over real HTTP, with Celery's in-process worker behind them; and the dataset-level
steps that gather /splits, /parquet and /info against what the API's gathering answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common import cache
from common.processing_graph import get_processing_graph
from tasks import samples
from tests.api_server import api_client
from tests.conftest import Stores
from tests.test_pipeline import run_pipeline, use_pipeline_settings

OPERATOR_KEY = "viewer-endpoints-operator-key"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


@pytest.fixture
def mirror(stores: Stores, default_graph: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    root.mkdir()
    use_pipeline_settings(
        monkeypatch, tmp_path, f"file://{root}", API_BACKFILL_INTERVAL_SECONDS="3600", API_OPERATOR_KEY=OPERATOR_KEY
    )
    return root


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:
    with api_client() as client:
        yield client


def without_urls(answer: dict[str, Any]) -> dict[str, Any]:
    files = [{k: v for k, v in file.items() if k != "url"} for file in answer["parquet_files"]]
    return {**answer, "parquet_files": files}


def test_the_hubs_endpoints_serve_their_entries_as_every_cached_answer(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = samples.csv_dataset(mirror)
    run_pipeline(dataset)
    for path, kind in (
        ("/hub-cache", "dataset-hub-cache"),
        ("/compatible-libraries", "dataset-compatible-libraries"),
        ("/croissant-crumbs", "dataset-croissant-crumbs"),
    ):
        answer = client.get(path, params={"dataset": dataset})
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json() == cache.get_response(kind, dataset).content
        assert answer.headers["Cache-Control"].startswith("public, max-age=")
        again = client.get(path, params={"dataset": dataset}, headers={"If-None-Match": answer.headers["ETag"]})
        assert again.status_code == 304, path
    for missing in ("org/nothing", "bad//name"):  # answered as /is-valid or /size answer it: an error
        answer = client.get("/hub-cache", params={"dataset": missing})
        assert answer.status_code >= 400 and answer.json()["error_code"] == answer.headers["X-Error-Code"]
    # The steps gather what the API gathers, per request, today (the URLs aside: the API adds them).
    gathered = {
        "/splits": "dataset-split-names",
        "/info": "dataset-info",
        "/parquet": "dataset-parquet",
    }
    for path, kind in gathered.items():
        served = client.get(path, params={"dataset": dataset}).json()
        served = without_urls(served) if path == "/parquet" else served
        assert served == cache.get_response(kind, dataset).content, path
    # The pandas and Polars snippets read the Parquet export the API serves (at API_PUBLIC_URL).
    libraries = client.get("/compatible-libraries", params={"dataset": dataset}).json()["libraries"]
    for library in ("pandas", "polars"):
        (code,) = next(item for item in libraries if item["library"] == library)["loading_codes"]
        scope: dict[str, Any] = {}
        exec(code["code"].replace("http://localhost:8000", str(client.base_url).rstrip("/")), scope)
        assert len(scope["df"]) == 150, library


def test_the_operators_dataset_status_and_cache_reports(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = samples.csv_dataset(mirror)
    run_pipeline(dataset)
    assert client.get("/admin/dataset-status", params={"dataset": dataset}).status_code == 401
    status = client.get("/admin/dataset-status", params={"dataset": dataset}, headers=OPERATOR).json()
    assert list(status) == [step.name for step in get_processing_graph()]
    assert [e["split"] for e in status["split-is-valid"]["cached_responses"]] == ["test", "train"]
    assert all(not step["jobs"] for step in status.values())
    entry = status["dataset-hub-cache"]["cached_responses"][0]
    assert entry["http_status"] == 200 and "content" not in entry and entry["dataset_git_revision"]
    assert client.get("/admin/dataset-status", params={"dataset": "a b"}, headers=OPERATOR).status_code == 422
    # Every split-is-valid entry, one a page.
    assert client.get("/admin/cache-reports/split-is-valid").status_code == 401
    pages, cursor = [], ""
    while True:
        page = client.get(
            "/admin/cache-reports/split-is-valid", params={"cursor": cursor, "limit": 1}, headers=OPERATOR
        ).json()
        pages.append(page["cache_reports"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    reports = [report for page in pages for report in page]
    assert sorted(report["split"] for report in reports) == ["test", "train"] and len(pages) == 3
    assert all(report["kind"] == "split-is-valid" and "content" not in report for report in reports)
    whole = client.get("/admin/cache-reports/split-is-valid", headers=OPERATOR).json()
    assert whole["cache_reports"] == reports and whole["next_cursor"] == ""
    unknown = client.get("/admin/cache-reports/no-such-step", headers=OPERATOR)
    assert unknown.status_code == 404 and unknown.json()["error_code"] == "NotFoundError"
    bad = client.get("/admin/cache-reports/split-is-valid", params={"cursor": "zzz"}, headers=OPERATOR)
    assert bad.status_code == 422

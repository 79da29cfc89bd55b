"""The `datasets` library's own client of the dataset viewer (datasets/utils/_dataset_viewer.py), pointed at
stepcache's API: it gets the exported Parquet files and the dataset infos, with no fallback.

It derives the viewer's URL from HF_ENDPOINT by prefixing the host with `datasets-server.`; that name does
not resolve here, so the test resolves it to the API's loopback address (its requests go, unchanged
otherwise, to the real API over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import httpx
import pytest
from datasets.utils import _dataset_viewer

from common import cache
from tasks import samples
from tests.test_parquet_download import client, mirror, parquet_files  # noqa: F401  (fixtures)

VIEWER_HOST = "datasets-server.stepcache.test"


@pytest.fixture
def viewer_client(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:  # noqa: F811
    """The session `datasets` uses, with the viewer's host name resolved to the API."""
    api = client.base_url

    def resolve(request: httpx.Request) -> None:
        if request.url.host == VIEWER_HOST:
            request.url = request.url.copy_with(host=api.host, port=api.port)

    with httpx.Client(event_hooks={"request": [resolve]}) as session:
        monkeypatch.setattr(_dataset_viewer, "get_session", lambda: session)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://stepcache.test")
        yield session


def test_the_datasets_library_gets_the_exported_parquet_files_and_infos_without_falling_back(
    client: httpx.Client,  # noqa: F811
    mirror: Path,  # noqa: F811
    viewer_client: httpx.Client,
    celery_worker: object,
) -> None:
    dataset = samples.csv_dataset(mirror)
    listed = parquet_files(client, dataset)
    revision = cache.get_response("config-parquet", dataset, "default").dataset_git_revision
    files = _dataset_viewer.get_exported_parquet_files(dataset, commit_hash=revision, token=None)
    # The same files, under the host the library asked (the request's base URL, API_PUBLIC_URL being unset).
    assert [file["url"].removeprefix(f"http://{VIEWER_HOST}") for file in files] == [
        file["url"].removeprefix(str(client.base_url)) for file in listed
    ]
    infos = _dataset_viewer.get_exported_dataset_infos(dataset, commit_hash=revision, token=None)
    info = datasets.DatasetInfo.from_dict(infos["default"])
    assert list(info.features) == ["id", "text", "score", "flag"] and info.splits["train"].num_examples > 0
    # Another revision: the library's check of X-Revision refuses the export (it falls back, as it should).
    with pytest.raises(_dataset_viewer.DatasetViewerError):
        _dataset_viewer.get_exported_parquet_files(dataset, commit_hash="0" * 40, token=None)

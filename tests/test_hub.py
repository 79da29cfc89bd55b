"""The pipeline against a Hub: a local Hub-compatible HTTP server (tests/hub_server.py) at COMMON_HF_ENDPOINT.

Every way the Hub fails (500, no answer, a token needed, 404) ends as a typed error in the cache and in the
ledger; transient ones are retried and open the shared breaker, after which jobs fail fast and a backfill
retries them; the token reaches no log, event, ledger row or cache entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import cache, orchestrator
from common.config import get_config
from common.event_bus import EVENTS_STREAM
from common.queue import JobStatus
from common.resilience import BREAKER_NAMESPACE
from tasks.queue import get_queue
from tests import formats
from tests.conftest import Stores
from tests.hub_server import HubServer
from tests.test_pipeline import content, run_pipeline, use_pipeline_settings, wait_until_settled

SECRET = "hf_secret_token_that_must_not_leak"


@pytest.fixture
def hub(stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    root = tmp_path / "hub"
    root.mkdir()
    with HubServer(root) as server:
        server.token = SECRET
        use_pipeline_settings(
            monkeypatch,
            tmp_path,
            server.url,
            COMMON_HF_TIMEOUT_SECONDS="1",
            COMMON_HF_CACHE_DIRECTORY=str(tmp_path / "hf-cache"),
        )
        yield server
    get_config.cache_clear()


def with_token(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.setenv("COMMON_HF_TOKEN", token)
    get_config.cache_clear()


def root_error(dataset: str) -> tuple[int, str | None]:
    entries = run_pipeline(dataset)
    entry = entries[("dataset-config-names", None, None)]
    job = max((j for j in get_queue().jobs(dataset) if j.step == "dataset-config-names"), key=lambda j: j.created_at)
    assert job.status == JobStatus.ERROR and job.error_code == entry.error_code  # the ledger says the same
    assert len(entries) == 12  # nothing fanned out; the dataset-level descendants say why
    return entry.http_status, entry.error_code


def test_the_whole_pipeline_runs_against_the_hub(hub: HubServer, celery_worker: object) -> None:
    dataset = formats.csv_repo(hub.root)
    entries = run_pipeline(dataset)
    assert all(e.is_success for e in entries.values()), [(k, e.error_code) for k, e in entries.items()]
    assert entries[("dataset-config-names", None, None)].dataset_git_revision == hub.revision(dataset)
    assert content(entries, "split-first-rows", "default", "train")["rows"][0]["row"] == formats.ROWS[0]
    assert content(entries, "config-size", "default")["size"]["config"]["num_rows"] == 33
    images = run_pipeline(formats.imagefolder_repo(hub.root))
    cell = content(images, "split-first-rows", "default", "train")["rows"][0]["row"]["image"]
    assert (cell["width"], cell["height"]) == (8, 6)


def test_a_missing_dataset_is_a_cached_404(hub: HubServer, celery_worker: object) -> None:
    hub.modes["fmt/csv"] = "missing"
    formats.csv_repo(hub.root)
    assert root_error("fmt/csv") == (404, "DatasetNotFoundError")
    assert root_error("fmt/never-written") == (404, "DatasetNotFoundError")


def test_a_private_dataset_needs_the_token(
    hub: HubServer, celery_worker: object, monkeypatch: pytest.MonkeyPatch, default_graph: None
) -> None:
    hub.modes["fmt/csv"] = "private"
    formats.csv_repo(hub.root)
    assert root_error("fmt/csv") == (404, "DatasetNotFoundError")  # as the Hub: no telling it exists
    with_token(monkeypatch, SECRET)
    assert orchestrator.backfill(get_queue(), "fmt/csv") == []  # a 404 is not retried...
    cache.delete_dataset_responses("fmt/csv")  # ...until someone asks again (here: the cache is cleared)
    entries = run_pipeline("fmt/csv")
    assert all(e.is_success for e in entries.values())
    assert any(headers.get("authorization") == f"Bearer {SECRET}" for _, _, headers in hub.requests)


def test_a_gated_dataset_without_access_is_a_cached_403(
    hub: HubServer, celery_worker: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.modes["fmt/csv"] = "gated"
    formats.csv_repo(hub.root)
    assert root_error("fmt/csv") == (403, "DatasetGatedError")
    with_token(monkeypatch, "hf_someone_elses_token")
    cache.delete_dataset_responses("fmt/csv")
    assert root_error("fmt/csv") == (403, "DatasetGatedError")
    with_token(monkeypatch, SECRET)
    cache.delete_dataset_responses("fmt/csv")
    assert all(e.is_success for e in run_pipeline("fmt/csv").values())


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_a_failing_hub_is_retried_opens_the_breaker_and_a_backfill_retries_later(
    mode: str, hub: HubServer, celery_worker: object, stores: Stores, default_graph: None
) -> None:
    hub.hang_seconds = 5
    formats.csv_repo(hub.root)
    formats.jsonl_repo(hub.root)
    hub.mode = mode
    status, code = root_error("fmt/csv")
    assert (status, code) in ((502, "HubTransientError"), (503, "HubUnavailableError"))
    asked = len(hub.requests)
    assert asked > 1  # retried with backoff, until the breaker opened
    # The breaker is open for every process (its state is in Redis): the next job fails fast, asking nothing.
    assert root_error("fmt/jsonl") == (503, "HubUnavailableError")
    assert len(hub.requests) == asked
    # The Hub is back and the breaker's reset timeout passed (here: its state dropped): a backfill retries.
    hub.mode = None
    for key in stores.redis().scan_iter(f"{BREAKER_NAMESPACE}*"):
        stores.redis().delete(key)
    assert [job.step for job in orchestrator.backfill(get_queue(), "fmt/csv")] == ["dataset-config-names"]
    entries = wait_until_settled("fmt/csv")
    assert all(e.is_success for e in entries.values()) and len(entries) > 3


def test_the_token_reaches_no_log_event_ledger_row_or_cache_entry(
    hub: HubServer,
    celery_worker: object,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stores: Stores,
) -> None:
    caplog.set_level(logging.DEBUG)
    with_token(monkeypatch, SECRET)
    hub.modes["fmt/csv"] = "private"
    hub.modes["fmt/gated"] = "gated"
    formats.csv_repo(hub.root)
    formats.csv_repo(hub.root, "fmt/gated")
    assert all(e.is_success for e in run_pipeline("fmt/csv").values())
    hub.token = "hf_another_token"  # the gated dataset refuses ours: an error whose text we store
    assert root_error("fmt/gated") == (403, "DatasetGatedError")
    stored = [
        json.dumps([e.content for e in cache.get_dataset_responses(name)], default=str)
        for name in ("fmt/csv", "fmt/gated")
    ]
    stored += [job.model_dump_json() for name in ("fmt/csv", "fmt/gated") for job in get_queue().jobs(name)]
    events = [str(entry) for entry in stores.redis().xrange(EVENTS_STREAM)]
    assert events and stored
    for text in (*stored, *events, caplog.text):
        assert SECRET not in text
    kept = [path for path in Path(get_config().common.hf_cache_path).rglob("*") if path.is_file()]
    assert any(path.suffix == ".pickle" for path in kept)  # what datasets resolved, kept for the other steps
    assert not any(SECRET.encode() in path.read_bytes() for path in kept)


@pytest.mark.slow
@pytest.mark.parametrize("hang_on", ["/tree/", "/README.md"])
def test_every_request_to_the_hub_is_bounded_by_its_timeout(
    hang_on: str, hub: HubServer, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing or a download that never answers (the libraries send some without a timeout) fails typed,
    within the libraries' own retries of COMMON_HF_TIMEOUT_SECONDS each, instead of holding the job."""
    import time

    from common.exceptions import HubTransientError, HubUnavailableError
    from common.reading import config_names
    from common.sources import get_source

    dataset = formats.two_configs_repo(hub.root)
    source = get_source()
    location = source.locate(dataset, source.revision(dataset))
    hub.hang_on = hang_on
    started = time.monotonic()
    with pytest.raises((HubTransientError, HubUnavailableError)):
        config_names(source, location)
    assert time.monotonic() - started < 90

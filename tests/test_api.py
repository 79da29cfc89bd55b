"""The HTTP API over real HTTP (uvicorn on a free port), with Celery's in-process worker behind it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common import cache
from tasks import samples, steps
from tasks.queue import get_queue
from tests.api_server import api_client
from tests.conftest import Stores, use_settings
from tests.test_pipeline import use_pipeline_settings, wait_until_settled

TIMEOUT = 120.0


@pytest.fixture
def mirror(stores: Stores, default_graph: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "mirror"
    root.mkdir()
    use_pipeline_settings(monkeypatch, tmp_path, f"file://{root}", API_BACKFILL_INTERVAL_SECONDS="3600")
    return root


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:
    with api_client() as client:
        yield client


def not_ready(answer: httpx.Response) -> bool:
    return answer.status_code == 500 and answer.headers.get("X-Error-Code") == "ResponseNotReady"


def get_until_ready(
    client: httpx.Client, path: str, headers: dict[str, str] | None = None, **params: str
) -> list[httpx.Response]:
    """Every answer to GET path until one is not "not ready" (the viewer's 500 ResponseNotReady)."""
    answers = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        answers.append(client.get(path, params=params, headers=headers))
        if not not_ready(answers[-1]):
            return answers
        time.sleep(0.2)
    raise AssertionError(f"{path} {params} stayed not ready: {answers[-1].json()}")


def test_a_dataset_goes_from_not_ready_to_200_through_the_api_alone(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = samples.csv_dataset(mirror)
    answers = get_until_ready(client, "/first-rows", dataset=dataset, config="default", split="train")
    first, last = answers[0], answers[-1]
    assert not_ready(first) and first.json()["error_code"] == "ResponseNotReady"
    assert first.headers["Cache-Control"] == "no-store"
    assert first.json()["backfill"] is True and int(first.headers["Retry-After"]) >= 1
    later_not_ready = [answer for answer in answers[1:-1]]
    location = "/jobs/for/split-first-rows?dataset=org%2Fcsv&config=default&split=train"
    assert all("job_id" in answer.json() and answer.headers["Location"] == location for answer in later_not_ready)
    assert last.status_code == 200, last.json()
    # The Location names the job that produced the answer.
    producer = client.get(location)
    assert producer.status_code == 200 and producer.json()["step"] == "split-first-rows"
    assert producer.json()["status"] == "success" and producer.headers["Content-Location"].startswith("/jobs/")
    entry = cache.get_response("split-first-rows", dataset, "default", "train")
    assert producer.json()["job_id"] == entry.job_id
    body = last.json()
    assert [feature["name"] for feature in body["features"]] == ["id", "text", "score", "flag"]
    assert body["rows"][3]["row"] == {"id": 3, "text": "row 3", "score": 1.5, "flag": False}
    assert last.headers["Cache-Control"].startswith("public, max-age=")
    tag = last.headers["ETag"]
    again = client.get(
        "/first-rows",
        params={"dataset": dataset, "config": "default", "split": "train"},
        headers={"If-None-Match": tag},
    )
    assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == tag
    wait_until_settled(dataset)
    splits = client.get("/splits", params={"dataset": dataset}).json()
    assert [split["split"] for split in splits["splits"]] == ["train", "test"] and splits["pending"] == []
    assert client.get("/splits", params={"dataset": dataset, "config": "default"}).json()["splits"] == splits["splits"]
    parquet = client.get("/parquet", params={"dataset": dataset}).json()
    assert sorted(file["split"] for file in parquet["parquet_files"]) == ["test", "train"]
    assert set(client.get("/info", params={"dataset": dataset}).json()["dataset_info"]) == {"default"}
    assert client.get("/size", params={"dataset": dataset}).json()["size"]["dataset"]["num_rows"] == 152
    statistics = client.get("/statistics", params={"dataset": dataset, "config": "default", "split": "train"})
    assert statistics.status_code == 200 and statistics.json()["num_examples"] > 0
    assert client.get("/is-valid", params={"dataset": dataset}).json()["preview"] is True


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        # The viewer's answers: a parameter missing or empty for every level the endpoint serves...
        ("/first-rows", {"dataset": "org/csv"}, 422, "MissingRequiredParameter"),
        ("/first-rows", {"dataset": "org/csv", "config": "default", "split": " "}, 422, "MissingRequiredParameter"),
        ("/is-valid", {}, 422, "MissingRequiredParameter"),
        ("/splits", {"dataset": ""}, 422, "MissingRequiredParameter"),
        ("/jobs/not a job id", {}, 422, "InvalidParameter"),
        # ...a name no dataset can have, or that none has: the answer of a dataset that does not exist...
        ("/first-rows", {"dataset": "../etc", "config": "a", "split": "b"}, 401, "ExternalUnauthenticatedError"),
        ("/splits", {"dataset": "org/missing", "split": "train"}, 401, "ExternalUnauthenticatedError"),
        # ...and a config or split no entry can have: not found.
        ("/first-rows", {"dataset": "org/csv", "config": "a/b", "split": "b"}, 404, "ResponseNotFound"),
        ("/first-rows", {"dataset": "org/csv", "config": "a", "split": "b\nc"}, 404, "ResponseNotFound"),
    ],
)
def test_bad_input_gets_the_viewers_typed_error_and_writes_nothing(
    client: httpx.Client, mirror: Path, stores: Stores, path: str, params: dict[str, str], status: int, code: str
) -> None:
    samples.csv_dataset(mirror)
    answer = client.get(path, params=params)
    assert answer.status_code == status, answer.text
    assert answer.json()["error_code"] == code and answer.headers["X-Error-Code"] == code
    assert answer.headers["Cache-Control"] == "no-store"
    assert "Traceback" not in answer.text
    assert stores.redis().dbsize() == 0 or not stores.redis().keys("stepcache:api:backfill:*")


def test_a_cached_error_keeps_its_status_and_code_and_a_missing_dataset_is_not_found(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    empty = samples.empty_dataset(mirror)
    answers = get_until_ready(client, "/splits", dataset=empty)
    assert answers[-1].status_code == 500 and answers[-1].json()["error_code"] == "EmptyDatasetError"
    assert answers[-1].headers["X-Error-Code"] == "EmptyDatasetError"
    # A dataset the source does not have: the viewer's 401 at once (404 with a valid JWT), nothing enqueued.
    missing = client.get("/first-rows", params={"dataset": "org/missing", "config": "default", "split": "train"})
    assert missing.status_code == 401 and missing.json()["error_code"] == "ExternalUnauthenticatedError"
    assert "does not exist, or is not accessible without authentication" in missing.json()["error"]
    assert get_queue().jobs("org/missing") == []


def test_a_missing_entry_enqueues_a_backfill_once(client: httpx.Client, mirror: Path) -> None:
    dataset = samples.csv_dataset(mirror)
    queue = get_queue()
    queue.set_limit("org", 0)  # its jobs wait: this test looks at what the API enqueues
    params = {"dataset": dataset, "config": "default", "split": "train"}
    first = client.get("/first-rows", params=params)
    assert not_ready(first) and first.json()["backfill"] is True
    jobs = queue.jobs(dataset)
    assert [job.step for job in jobs] == ["dataset-config-names"]
    second = client.get("/first-rows", params=params)
    assert not_ready(second) and second.json()["job_id"] == jobs[0].job_id
    assert "backfill" not in second.json()
    # Location names the job of the entry asked for: not created until its ancestors end, so its ancestor's.
    location = second.headers["Location"]
    assert location == "/jobs/for/split-first-rows?dataset=org%2Fcsv&config=default&split=train"
    producing = client.get(location)
    assert producing.status_code == 202 and int(producing.headers["Retry-After"]) >= 1
    assert producing.json()["status"] == "not created yet"
    assert producing.json()["waiting_for"]["job_id"] == jobs[0].job_id
    queue.cancel(dataset)
    # No job, no entry, and a backfill already tried within API_BACKFILL_INTERVAL_SECONDS: not found.
    third = client.get("/first-rows", params=params)
    assert third.status_code == 404 and third.json()["error_code"] == "ResponseNotFound"
    assert len(queue.jobs(dataset)) == 1


def events_of(
    client: httpx.Client, job_id: str, last_event_id: str | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, type, data) of every event of the job's SSE stream, until it ends."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = [], {}
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=TIMEOUT) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if not line:
                if "data" in current:
                    events.append((current.get("id", ""), current.get("event", ""), json.loads(current["data"])))
                current = {}
                continue
            field, _, value = line.partition(":")
            current[field] = value.strip()
    return events


def test_a_job_and_its_events_as_server_sent_events_resumable(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = samples.csv_dataset(mirror)
    job_id = steps.dataset_config_names.delay(dataset).id
    events = events_of(client, job_id)
    types = [kind for _, kind, _ in events]
    assert types[-1] == "job.succeeded" and "job.started" in types and "job.progress" in types, types
    assert all(data["job_id"] == job_id for _, _, data in events)
    progress = [data for _, kind, data in events if kind == "job.progress"]
    assert progress[-1]["fraction"] == 1.0
    resumed = events_of(client, job_id, last_event_id=events[0][0])
    assert [event[0] for event in resumed] == [event[0] for event in events[1:]]
    state = client.get(f"/jobs/{job_id}").json()
    assert state["status"] == "success" and state["dataset"] == dataset and "lease_token" not in state
    # Resumed after its end: what came after it (Celery's task.succeeded), then the ledger's state closes it.
    after_end = [kind for _, kind, _ in events_of(client, job_id, last_event_id=events[-1][0])]
    assert after_end[-1] == "job.state" and not any(kind.startswith("job.") for kind in after_end[:-1])
    assert client.get("/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
    for bad in ("99999999999999999999-0", "1-x", "-1"):
        answer = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
        assert answer.status_code == 422 and answer.json()["error_code"] == "InvalidParameter"


def test_bounded_requests_cors_and_request_ids(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(
        monkeypatch,
        {"API_MAX_BODY_BYTES": "2000", "API_CORS_ORIGINS": "https://viewer.example", "API_WEBHOOK_SECRET": "s" * 16},
    )
    with api_client() as client:
        big, secret = b"{" + b" " * 5000 + b"}", {"X-Webhook-Secret": "s" * 16}
        declared = client.post("/webhook", content=big, headers=secret)
        assert declared.status_code == 413 and declared.json()["error_code"] == "PayloadTooLargeError"
        chunked = client.post("/webhook", content=iter([big[:1500], big[1500:]]), headers=secret)
        assert chunked.status_code == 413 and chunked.json()["error_code"] == "PayloadTooLargeError"
        allowed = client.get("/is-valid", params={"dataset": "x"}, headers={"Origin": "https://viewer.example"})
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        assert {"ETag", "Retry-After", "X-Error-Code"} <= set(
            allowed.headers["Access-Control-Expose-Headers"].split(", ")
        )
        too_big = client.post("/webhook", content=big, headers={**secret, "Origin": "https://viewer.example"})
        assert too_big.status_code == 413 and too_big.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        other = client.get("/is-valid", params={"dataset": "x"}, headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        assert client.get("/is-valid", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
        injected = client.get("/is-valid", headers={"X-Request-Id": "a b\tc" + "x" * 100}).headers["X-Request-Id"]
        assert len(injected) == 32 and injected.isalnum()  # not a token: a new id instead
        assert client.get("/nowhere").json() == {"error": "Not Found", "error_code": "NotFoundError"}
        assert "paths" in client.get("/openapi.json").json()
    use_settings(monkeypatch, {"API_REQUEST_TIMEOUT_SECONDS": "0.001"})
    with api_client() as client:
        slow = client.get("/healthcheck")
        assert slow.status_code == 504 and slow.json()["error_code"] == "RequestTimeoutError"


def test_what_bson_holds_and_json_lacks_is_served_as_json(client: httpx.Client, mirror: Path) -> None:
    (mirror / "org" / "odd").mkdir(parents=True)
    content = {"size": {"nan": float("nan"), "inf": float("-inf"), "text": "été 🌞", "big": 2**62}}
    cache.upsert_response("dataset-size", "org/odd", content)
    answer = client.get("/size", params={"dataset": "org/odd"})
    assert answer.status_code == 200
    assert answer.json() == {"size": {"nan": None, "inf": None, "text": "été 🌞", "big": 2**62}}


def test_a_struct_with_a_field_named_type_is_not_taken_for_an_image(
    client: httpx.Client, mirror: Path, celery_worker: object
) -> None:
    dataset = "org/typefield"
    samples.write(mirror / dataset / "train.jsonl", json.dumps({"meta": {"_type": "Image", "src": "x"}}) + "\n")
    answer = get_until_ready(client, "/first-rows", dataset=dataset, config="default", split="train")[-1]
    assert answer.status_code == 200 and answer.json()["rows"][0]["row"]["meta"] == {"_type": "Image", "src": "x"}


def test_the_producing_job_of_an_entry_refuses_ugly_input_with_typed_errors(client: httpx.Client, mirror: Path) -> None:
    dataset = samples.csv_dataset(mirror)
    unknown_step = client.get("/jobs/for/no-such-step", params={"dataset": dataset})
    assert unknown_step.status_code == 422 and unknown_step.json()["error_code"] == "UnknownStepError"
    bad_name = client.get("/jobs/for/split-first-rows", params={"dataset": "../etc", "config": "c", "split": "s"})
    assert bad_name.status_code == 422 and bad_name.json()["error_code"] == "InvalidDatasetNameError"
    missing = client.get("/jobs/for/split-first-rows", params={"dataset": dataset, "config": "c", "split": "s"})
    assert missing.status_code == 404 and missing.json()["error_code"] == "UnknownJobError"
    no_dataset = client.get("/jobs/for/split-first-rows")
    assert no_dataset.status_code == 422
    assert "Location" not in missing.headers and get_queue().jobs(dataset) == []  # asking enqueues nothing

"""What the API reads before it knows who asks, and what its answers say about the machine, over real HTTP:
the webhook checks its secret before it reads a byte of the body and reads a bounded body; Parquet files
are named relative to their storage; no answer names a local path or the host."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common import cache
from common.config import get_config
from common.exceptions import EmptyDatasetError
from tasks import samples, steps
from tasks.api.webhook import WEBHOOK_MAX_BODY_BYTES, renamer
from tasks.queue import get_queue
from tests.api_server import api_client
from tests.test_api import events_of, get_until_ready
from tests.test_api_auth import OPERATOR_KEY, WEBHOOK_SECRET, mirror  # noqa: F401  (the fixture)
from tests.test_pipeline import wait_until_settled
from tests.waiting import eventually

WRONG = {"X-Webhook-Secret": "wrong-secret-0123456789"}
RIGHT = {"X-Webhook-Secret": WEBHOOK_SECRET}


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:  # noqa: F811
    with api_client() as client:
        yield client


def payload(dataset: str, padding: int = 0) -> bytes:
    body = f'{{"event": {{"action": "update", "scope": "repo"}}, "repo": {{"type": "dataset", "name": "{dataset}"}}}}'
    return body.encode() + b" " * padding


def test_a_wrong_secret_is_refused_before_the_body_is_read(client: httpx.Client) -> None:
    # 900 KB that are not JSON: refused for the secret (401), not for the body (422): it was not parsed.
    not_json = b"{" + b"x" * 899_999
    for body in (not_json, payload("org/ds", 900_000)):
        started = time.monotonic()
        refused = client.post("/webhook", content=body, headers={**WRONG, "Content-Type": "application/json"})
        assert (refused.status_code, refused.json()["error_code"]) == (401, "AuthenticationRequiredError")
        assert time.monotonic() - started < 1
    # A body announced and never sent: the 401 comes anyway, so nothing waited for the body.
    url = httpx.URL(str(client.base_url))
    with socket.create_connection((url.host, url.port)) as connection:
        connection.settimeout(5)
        connection.sendall(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Webhook-Secret: wrong-secret-0123456789\r\nContent-Length: 900000\r\n\r\n"
        )
        assert connection.recv(100).startswith(b"HTTP/1.1 401 ")
    assert get_queue().jobs("org/ds") == []


def test_the_webhook_reads_a_body_up_to_its_cap_and_validates_it(client: httpx.Client, mirror: Path) -> None:  # noqa: F811
    big = payload("org/ds", 100_000)
    declared = client.post("/webhook", content=big, headers=RIGHT)
    streamed = client.post("/webhook", content=iter([big[:40_000], big[40_000:]]), headers=RIGHT)  # no length
    for refused in (declared, streamed):
        assert (refused.status_code, refused.json()["error_code"]) == (413, "PayloadTooLargeError")
        assert refused.headers["X-Error-Code"] == "PayloadTooLargeError"
    for invalid in (b"{not json", b'{"event": {"action": "update"}}', b"[]"):
        answer = client.post("/webhook", content=invalid, headers=RIGHT)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error_code"] in ("InvalidParameter", "MissingRequiredParameter"), answer.text
    assert get_queue().jobs("org/ds") == []
    # A payload padded close to the cap is read and acted on.
    samples.csv_dataset(mirror, "org/ds")
    accepted = client.post("/webhook", content=payload("org/ds", WEBHOOK_MAX_BODY_BYTES - 200), headers=RIGHT)
    assert accepted.status_code == 200 and accepted.json()["enqueued"] == 1


def test_parquet_files_are_named_relative_to_their_storage(
    client: httpx.Client,
    mirror: Path,  # noqa: F811
    celery_worker: object,
) -> None:
    dataset = samples.csv_dataset(mirror)
    get_until_ready(client, "/splits", dataset=dataset)
    wait_until_settled(dataset)
    storage = get_config().worker.parquet_path
    answers = [
        client.get("/parquet", params={"dataset": dataset}),
        client.get("/parquet", params={"dataset": dataset, "config": "default"}),
    ]
    for answer in answers:
        files = answer.json()["parquet_files"]
        assert sorted(file["split"] for file in files) == ["test", "train"]
        for file in files:
            assert file["path"].startswith(f"{dataset}/--/") and file["path"].endswith(f"/{file['split']}/0000.parquet")
            assert (storage / file["path"]).is_file() and str(storage) not in answer.text
    statistics = client.get("/statistics", params={"dataset": dataset, "config": "default", "split": "train"})
    assert statistics.status_code == 200  # its step read the file back from its relative path
    # An entry written by an older version holds absolute paths: they are served relative too.
    entry = cache.get_response("config-parquet", dataset, "default")
    absolute = [{**file, "path": str(storage / file["path"])} for file in entry.content["parquet_files"]]
    cache.upsert_response("config-parquet", dataset, {**entry.content, "parquet_files": absolute}, config="default")
    assert (
        client.get("/parquet", params={"dataset": dataset}).json()["parquet_files"]
        == answers[0].json()["parquet_files"]
    )
    # A move rewrites both forms under the new name.
    moved = renamer(dataset, "org/renamed")({"parquet_files": [*absolute, *answers[0].json()["parquet_files"]]})
    paths = [file["path"] for file in moved["parquet_files"]]
    assert all(path.removeprefix(f"{storage}/").startswith("org/renamed/--/") for path in paths), paths


def test_no_answer_names_a_local_path_or_the_host(
    client: httpx.Client,
    mirror: Path,  # noqa: F811
    celery_worker: object,
    tmp_path: Path,
) -> None:
    host = socket.gethostname()
    names_the_machine = re.compile(
        "|".join(re.escape(text) for text in {str(tmp_path), str(tmp_path.resolve())})
        + rf"|(?<![\w-]){re.escape(host)}(?![\w-])"
        + r"|Traceback|File \""
    )
    empty, corrupted, csv = (
        samples.empty_dataset(mirror),
        samples.corrupted_dataset(mirror),
        samples.csv_dataset(mirror),
    )
    for dataset in (empty, corrupted, csv):
        get_until_ready(client, "/splits", dataset=dataset)
        wait_until_settled(dataset)
    # The error of a step, as an older version stored it: its message names the mirror and the host.
    samples.empty_dataset(mirror, "org/legacy")
    legacy = EmptyDatasetError(f"The directory at {mirror}/org/legacy on {host} doesn't contain any data files")
    cache.upsert_error("dataset-config-names", "org/legacy", legacy)
    job_id, failed_job_id = (steps.dataset_config_names.delay(dataset).id for dataset in (csv, empty))
    events = events_of(client, job_id) + events_of(client, failed_job_id)
    ended = next(event_id for event_id, kind, _ in events if kind == "job.failed")

    def celery_after_the_end() -> list[tuple[str, str, dict[str, Any]]]:  # read again, resuming after the end
        later = events_of(client, failed_job_id, last_event_id=ended)
        return later if any(kind == "task.failed" for _, kind, _ in later) else []

    events += eventually(celery_after_the_end, "the task's failure, told after the job's end")
    assert {"job.started", "task.started", "job.succeeded", "job.failed", "task.failed"} <= {e[1] for e in events}
    for _, kind, data in events:
        assert "worker" not in data and not names_the_machine.search(str(data)), (kind, data)
        assert kind != "task.failed" or (data["exception"] == "EmptyDatasetError" and "message" not in data)
    split = {"config": "default", "split": "train"}
    answers: dict[str, httpx.Response] = {}
    for dataset in (empty, corrupted, csv, "org/legacy"):
        for path in ("/splits", "/first-rows", "/parquet", "/info", "/size", "/statistics", "/is-valid"):
            params = {"dataset": dataset} | (split if path in ("/first-rows", "/statistics") else {})
            answers[f"{path} {dataset}"] = client.get(path, params=params)
    answers |= {
        "missing dataset": client.get("/first-rows", params={"dataset": "org/missing", **split}),
        "missing config": client.get("/first-rows", params={"dataset": csv, "config": "nope", "split": "train"}),
        "bad name": client.get("/first-rows", params={"dataset": "../etc", **split}),
        "bad level": client.get("/is-valid", params={"dataset": csv, "config": "default"}),
        "no route": client.get("/nowhere"),
        "unknown job": client.get("/jobs/00000000-0000-0000-0000-000000000000"),
        "job": client.get(f"/jobs/{job_id}"),
        "webhook refused": client.post("/webhook", content=b"{", headers=WRONG),
        "webhook invalid": client.post("/webhook", content=b"{", headers=RIGHT),
        "limits": client.get("/admin/limits", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}),
        "healthcheck": client.get("/healthcheck"),
        "openapi": client.get("/openapi.json"),
    }
    failed = {name: answer for name, answer in answers.items() if answer.status_code >= 400}
    assert {"/splits org/empty", "/first-rows org/corrupted", "/splits org/legacy", "missing dataset"} <= set(failed)
    assert {answer.status_code for answer in failed.values()} >= {401, 404, 422, 500}
    for name, answer in answers.items():
        assert not names_the_machine.search(answer.text), (name, answer.text)
    # A cached error is its message and code: its cause (the library's own text) stays in the cache.
    assert set(answers["/splits org/empty"].json()) == {"error", "error_code"}
    assert "org/empty" in answers["/splits org/empty"].json()["error"]  # the path, relative to the mirror
    assert "org/legacy" in answers["/splits org/legacy"].json()["error"]
    assert cache.get_response("dataset-config-names", empty).details is not None
    assert "worker" not in answers["job"].json() and answers["job"].json()["status"] == "success"

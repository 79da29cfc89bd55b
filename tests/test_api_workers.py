"""The API as users run it: `python -m tasks api` and `celery -A tasks worker`, real processes, real HTTP."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from common.event_bus import EventBus
from tasks import run, samples
from tasks.api.auth import sign_request
from tasks.embedded import WorkerProcess, free_port
from tests.api_server import api_client
from tests.conftest import Stores
from tests.test_api import events_of, get_until_ready, not_ready
from tests.test_pipeline import use_pipeline_settings
from tests.waiting import eventually

pytestmark = pytest.mark.slow
OPERATOR_KEY = "e2e-operator-key-0123456789"
OPERATOR_SECRET = "e2e-operator-secret-0123456789"
WEBHOOK_SECRET = "e2e-webhook-secret-0123456789"
ASSETS_KEY = "e2e-assets-key-0123456789"


def healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthcheck").status_code == 200
    except httpx.TransportError:
        return False


def test_a_dataset_through_the_api_alone_with_real_processes(
    stores: Stores, default_graph: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mirror"
    port, metrics_port = free_port(), free_port()
    use_pipeline_settings(
        monkeypatch,
        tmp_path,
        f"file://{root}",
        WORKER_METRICS_PORT="0",
        API_METRICS_PORT=str(metrics_port),
        COMMON_LOG_FORMAT="json",
        COMMON_LOG_LEVEL="DEBUG",
        API_OPERATOR_KEY=OPERATOR_KEY,
        API_OPERATOR_SECRET=OPERATOR_SECRET,
        API_WEBHOOK_SECRET=WEBHOOK_SECRET,
        API_ASSETS_SIGNING_KEY=ASSETS_KEY,
    )
    dataset = samples.csv_dataset(root)
    env = dict(os.environ)  # the stores' settings and the test's, as the processes it starts must share them
    with (
        WorkerProcess("api-e2e", env, tmp_path / "worker.log", concurrency=2),
        run.api(env, port, tmp_path / "api.log"),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        eventually(lambda: healthy(client), "the API answers /healthcheck")
        position = EventBus(stores.redis()).last_id()
        params = {"dataset": dataset, "config": "default", "split": "train"}
        first = client.get("/first-rows", params=params, headers={"X-Request-Id": "e2e-request-1"})
        assert not_ready(first) and first.headers["X-Request-Id"] == "e2e-request-1"
        waiting = get_until_ready(client, "/first-rows", **params)
        assert waiting[-1].status_code == 200 and len(waiting[-1].json()["rows"]) == 100
        job_ids = {answer.json()["job_id"] for answer in waiting[:-1]}
        # A job's events through SSE, to its end (from its start: the stream is replayed from its creation).
        for job_id in list(job_ids)[:2]:
            kinds = [kind for _, kind, _ in events_of(client, job_id)]
            assert {"job.queued", "job.started"} <= set(kinds) and kinds[-1] == "job.succeeded", kinds
        # The request id in the events published while answering that request, and in the API's log lines.
        events = EventBus(stores.redis()).read(position, count=1000)
        assert {event.type for _, event in events if event.request_id == "e2e-request-1"} == {"job.queued"}
        time.sleep(0.5)
        lines = [json.loads(line) for line in (tmp_path / "api.log").read_text().splitlines() if line.startswith("{")]
        tagged = [line for line in lines if line.get("request_id") == "e2e-request-1"]
        assert any(line["logger"] == "stepcache.api.access" and " 500 " in line["message"] for line in tagged), tagged
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'stepcache_api_requests_total{method="GET",route="/first-rows",status="200"}' in metrics
        assert 'route="unmatched"' not in metrics or "/etc" not in metrics
        # Secrets, in headers and settings, are never logged, even at DEBUG.
        client.get("/admin/limits", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
        client.post(
            "/admin/refresh?dataset=org/x",
            headers=sign_request(OPERATOR_SECRET, "POST", "/admin/refresh?dataset=org/x"),
        )
        client.post("/webhook", json={}, headers={"X-Webhook-Secret": WEBHOOK_SECRET})
        for method in ("M1", "M2", "M3"):  # made-up methods: no series of their own (at most one "other")
            client.request(method, "/healthcheck")
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'method="M1"' not in metrics
        time.sleep(0.5)
    log = (tmp_path / "api.log").read_text()
    assert "/admin/refresh" in log and "/webhook" in log
    for secret in (OPERATOR_KEY, OPERATOR_SECRET, WEBHOOK_SECRET, ASSETS_KEY):
        assert secret not in log


def test_a_webhook_to_one_api_process_is_heard_by_the_others(
    stores: Stores, default_graph: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    port = free_port()
    use_pipeline_settings(
        monkeypatch,
        tmp_path,
        f"file://{root}",
        API_METRICS_PORT="0",
        API_WEBHOOK_SECRET=WEBHOOK_SECRET,
        API_ACCESS_CACHE_SECONDS="3600",  # only a webhook makes the processes ask the source again
    )
    params = {"dataset": "org/new", "config": "default"}
    with (
        run.api(dict(os.environ), port, tmp_path / "api.log"),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as other,
        api_client() as client,
    ):
        eventually(lambda: healthy(other), "the API answers /healthcheck")
        assert other.get("/splits", params=params).json()["error_code"] == "ExternalUnauthenticatedError"
        samples.csv_dataset(root, "org/new")
        assert other.get("/splits", params=params).json()["error_code"] == "ExternalUnauthenticatedError"  # kept
        payload = {"event": {"action": "create", "scope": "repo"}, "repo": {"type": "dataset", "name": "org/new"}}
        assert client.post("/webhook", json=payload, headers={"X-Webhook-Secret": WEBHOOK_SECRET}).is_success
        started = time.monotonic()
        eventually(lambda: not_ready(other.get("/splits", params=params)), "the other process forgetting")
        assert time.monotonic() - started < 5

"""Progress in Flower: a running step's fraction and message, read from a real Flower process (its HTTP API
and its task page), from `AsyncResult.info`, and from every built-in step's job.progress events."""

from __future__ import annotations

import html
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from common.config import get_config
from common.event_bus import EventBus
from common.events import EventType
from common.processing_graph import DEFAULT_STEPS
from common.redis_connection import get_redis
from tasks import samples, steps
from tasks.embedded import free_port
from tasks.run import flower
from tests import sample_steps
from tests.conftest import Stores, use_settings
from tests.waiting import eventually
from tests.workers import sample_worker

TIMEOUT = 30.0
SLEEP_SECONDS = 8.0  # test-sleep reports 5 times, every 1.6 s: 0.2, 0.4, 0.6, 0.8, 1.0
FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # what Flower may show while the step runs


@contextmanager
def running_flower(env: dict[str, str], log: Path) -> Iterator[str]:
    """`celery -A tasks flower` on a free port, its API open; yields its base URL once it answers."""
    port = free_port()
    with flower({**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"}, port, log) as process:
        base = f"http://127.0.0.1:{port}"
        eventually(lambda: process.poll() is not None or get(base, "/healthcheck") is not None, "Flower answers")
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        yield base


def get(base: str, path: str) -> str | None:
    """The body of a 200 answer, None for anything else (not up yet, unknown task)."""
    try:
        with urllib.request.urlopen(base + path, timeout=5) as answer:
            body: bytes = answer.read()
            return body.decode()
    except (OSError, urllib.error.HTTPError):
        return None


def task_info(base: str, task_id: str) -> dict[str, Any] | None:
    body = get(base, f"/api/task/info/{task_id}")
    return json.loads(body) if body else None


def shown_fraction(task: dict[str, Any] | None) -> float | None:
    """The fraction Flower shows for a task in PROGRESS (its `result` field holds the meta as JSON)."""
    if not task or task.get("state") != "PROGRESS" or not task.get("result"):
        return None
    meta = json.loads(task["result"])
    assert {"current", "total", "fraction", "message"} <= set(meta), meta
    return float(meta["fraction"])


@pytest.mark.slow
def test_flower_shows_a_running_steps_progress_fraction(
    stores: Stores, celery_app: Celery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = use_settings(monkeypatch, {**stores.env(), "WORKER_METRICS_PORT": "0"})
    worker_env = {**env, "TEST_SLEEP_SECONDS": str(SLEEP_SECONDS)}
    with running_flower(env, tmp_path / "flower.log") as flower, sample_worker("w", worker_env, tmp_path, 1):
        # Flower only knows what it received: a first task it sees end tells its event receiver is on.
        first = sample_steps.test_noop.delay("org/first")
        first.get(timeout=TIMEOUT)
        eventually(lambda: (task_info(flower, first.id) or {}).get("state") == "SUCCESS", "Flower sees tasks end")

        result = sample_steps.test_sleep.delay("org/ds")
        fraction = eventually(
            lambda: shown_fraction(task_info(flower, result.id)), "a fraction in /api/task/info", TIMEOUT
        )
        assert fraction in FRACTIONS

        # the same meta in the result backend
        info = result.info
        assert result.state == "PROGRESS", result.state
        assert {"current", "total", "fraction", "message"} <= set(info) and info["total"] == 5
        assert info["fraction"] in (*FRACTIONS, 1.0) and info["message"].startswith("slept ")

        listed = json.loads(get(flower, "/api/tasks?state=PROGRESS") or "{}")
        assert result.id in listed, listed
        assert shown_fraction(listed[result.id]) in FRACTIONS

        page = html.unescape(get(flower, f"/task/{result.id}") or "")
        assert "PROGRESS" in page
        assert any(f'"fraction": {f}' in page for f in FRACTIONS), page[-3000:]
        assert result.get(timeout=TIMEOUT)["http_status"] == 200

        def succeeded() -> dict[str, Any] | None:
            task = task_info(flower, result.id)
            return task if task and task["state"] == "SUCCESS" else None

        done = eventually(succeeded, "SUCCESS in Flower")
        assert done and "http_status" in done["result"]  # the task's return value replaced the progress meta
        assert "SUCCESS" in (get(flower, f"/task/{result.id}") or "")


BUILTIN_STEPS = {step.name for step in DEFAULT_STEPS}


def test_every_builtin_step_reports_progress(
    stores: Stores, celery_worker: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    use_settings(
        monkeypatch,
        {
            "COMMON_HF_ENDPOINT": f"file://{root}",
            "ASSETS_STORAGE_DIRECTORY": str(tmp_path / "assets"),
            "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
        },
    )
    dataset = samples.csv_dataset(root)
    bus = EventBus(get_redis(get_config().queue.redis_url))
    start = bus.last_id()
    steps.dataset_config_names.delay(dataset)

    def progress_by_step() -> dict[str, list[Any]]:
        reports: dict[str, list[Any]] = {}
        for _, event in bus.read(after=start, count=10_000):
            if event.type == EventType.JOB_PROGRESS and event.dataset == dataset:
                reports.setdefault(event.step or "", []).append(event)
        return reports if set(reports) >= BUILTIN_STEPS else {}

    reports = eventually(progress_by_step, "a job.progress event from every built-in step", timeout=120)
    for step, events in reports.items():
        assert events[-1].fraction == 1.0, (step, events)
        assert all(event.message for event in events), (step, events)

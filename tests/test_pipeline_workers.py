"""The whole graph for one dataset, from one call, with a real `celery -A tasks worker` process: the brief's
own command, without -Q, consumes every queue (heavy steps included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from common import cache
from tasks import samples, steps
from tasks.embedded import ROOT, WorkerProcess
from tests.conftest import Stores, use_settings
from tests.test_pipeline import wait_until_settled
from tests.waiting import eventually
from tests.workers import sample_worker

pytestmark = pytest.mark.slow


def test_one_call_with_real_workers_fills_every_entry_the_graph_expects(
    stores: Stores, celery_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mirror"
    env = {
        **stores.env(),
        "COMMON_HF_ENDPOINT": f"file://{root}",
        "ASSETS_STORAGE_DIRECTORY": str(tmp_path / "assets"),
        "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
        "WORKER_METRICS_PORT": "0",
    }
    use_settings(monkeypatch, env)
    dataset = samples.multi_config_dataset(root)
    worker = sample_worker("w", env, tmp_path)
    assert "-Q" not in worker.command  # `celery -A tasks worker`, as the brief says
    with worker:
        steps.dataset_config_names.delay(dataset)
        entries = wait_until_settled(dataset)
        backfill = subprocess.run(
            [sys.executable, "-m", "tasks", "backfill", dataset],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    defaults = {key: entry for key, entry in entries.items() if not key[0].startswith("test-")}
    assert all(entry.is_success for entry in defaults.values()), {k: e.error_code for k, e in defaults.items()}
    # 12 dataset-level entries, 7 per config (en, fr), 5 per split (en/train, fr/train, fr/test)
    assert len(defaults) == 12 + 7 * 2 + 5 * 3
    heavy = {kind for kind, _, _ in defaults if steps.get_step_task(kind).step.queue == "heavy"}
    assert heavy == {"config-parquet-and-info", "split-descriptive-statistics", "split-duckdb-index"}
    assert backfill.returncode == 0, backfill.stderr
    assert "nothing to backfill" in backfill.stdout or "test-" in backfill.stdout


def test_a_users_step_fans_out_to_its_config_level_child_and_fans_in_with_real_workers(
    stores: Stores, celery_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import user_steps

    env = {**stores.env(), "WORKER_METRICS_PORT": "0"}
    use_settings(monkeypatch, env)
    include = ["tests.sample_steps", "tests.user_steps"]
    with WorkerProcess("user", env, tmp_path / "worker-user.log", concurrency=2, include=include):
        user_steps.test_user_tables.delay("someone/db")
        total = eventually(lambda: _entry("test-user-total", "someone/db"), "the fan-in step's entry", timeout=90)
    entries = cache.get_dataset_responses("someone/db")
    rows = {entry.config: entry.content["rows"] for entry in entries if entry.kind == "test-user-table-rows"}
    assert rows == user_steps.TABLES
    assert total.content == {"rows": sum(user_steps.TABLES.values())}
    assert sorted({entry.kind for entry in entries}) == ["test-user-table-rows", "test-user-tables", "test-user-total"]


def _entry(kind: str, dataset: str) -> cache.CachedResponse | None:
    return next((entry for entry in cache.get_dataset_responses(dataset) if entry.kind == kind), None)


def test_a_private_hub_dataset_with_real_workers_and_the_token_in_no_log(
    stores: Stores, celery_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import formats
    from tests.hub_server import HubServer

    secret = "hf_worker_secret_that_must_not_leak"
    with HubServer(tmp_path / "hub") as hub:
        hub.token = secret
        hub.modes["fmt/configs"] = "private"
        dataset = formats.two_configs_repo(hub.root)
        env = {
            **stores.env(),
            "COMMON_HF_ENDPOINT": hub.url,
            "COMMON_HF_TOKEN": secret,
            "COMMON_HF_CACHE_DIRECTORY": str(tmp_path / "hf-cache"),
            "COMMON_LOG_LEVEL": "DEBUG",
            "ASSETS_STORAGE_DIRECTORY": str(tmp_path / "assets"),
            "WORKER_PARQUET_DIRECTORY": str(tmp_path / "parquet"),
            "WORKER_METRICS_PORT": "0",
        }
        use_settings(monkeypatch, env)
        with sample_worker("w", env, tmp_path) as worker:
            steps.dataset_config_names.delay(dataset)
            entries = wait_until_settled(dataset)
    defaults = {key: entry for key, entry in entries.items() if not key[0].startswith("test-")}
    assert all(entry.is_success for entry in defaults.values()), {k: e.error_code for k, e in defaults.items()}
    assert len(defaults) == 12 + 7 * 2 + 5 * 3  # en/train, fr/train, fr/test
    assert any(headers.get("authorization") == f"Bearer {secret}" for _, _, headers in hub.requests)
    log = worker.log_path.read_text()
    assert "config-parquet-and-info" in log and secret not in log
    assert all(secret not in str(entry.content) for entry in entries.values())

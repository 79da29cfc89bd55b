"""The whole graph for one dataset, from one call, with a real `celery -A tasks worker` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from tasks import samples, steps
from tasks.embedded import ROOT
from tests.conftest import Stores, use_settings
from tests.test_pipeline import wait_until_settled
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
    with sample_worker("w", env, tmp_path):
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
    # 3 dataset-level entries, 5 per config (en, fr), 2 per split (en/train, fr/train, fr/test)
    assert len(defaults) == 3 + 5 * 2 + 2 * 3
    assert backfill.returncode == 0, backfill.stderr
    assert "nothing to backfill" in backfill.stdout or "test-" in backfill.stdout

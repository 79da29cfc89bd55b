"""`make run` (`python -m tasks run`) on a machine with nothing configured, and Flower while it runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tasks.embedded import ROOT, free_port
from tests.waiting import eventually

pytestmark = pytest.mark.slow
SERVER_VARIABLES = ("QUEUE_REDIS_URL", "CACHE_MONGO_URL", "QUEUE_MONGO_URL", "CELERY_BROKER_URL", "COMMON_HF_ENDPOINT")
# demo/csv, demo/jsonl (2 splits each), other/parquet, other/images: 12 dataset-level, 7 per config, 5 per split
SAMPLE_ENTRIES = 29 + 29 + 24 + 24


def unconfigured_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES and not k.startswith(("ASSETS_", "WORKER_"))
    }
    return {**env, "WORKER_METRICS_PORT": "0", "FLOWER_UNAUTHENTICATED_API": "true"}


def test_the_makefile_runs_the_cli_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python -m tasks run $(if $(ONCE),--once) $(ARGS)" in makefile


def test_run_once_ends_with_every_sample_entry_successful_and_prints_the_cache(tmp_path: Path) -> None:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks",
            "run",
            "--once",
            "--home",
            str(tmp_path / ".stepcache"),
            "--flower-port",
            str(free_port()),
            "--api-port",
            str(free_port()),
        ],
        cwd=ROOT,
        env=unconfigured_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    lines = process.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kind"))
    rows = [line for line in lines[header + 2 :] if line.strip() and not line.startswith(("Flower", "API"))]
    assert len(rows) == SAMPLE_ENTRIES
    assert all(line.split()[-2] == "ok" for line in rows), rows
    assert {line.split()[1] for line in rows} == {"demo/csv", "demo/jsonl", "other/parquet", "other/images"}
    assert "Flower: http://localhost:" in process.stdout and "API: http://localhost:" in process.stdout
    home = tmp_path / ".stepcache"
    assert (home / "mongo").is_dir() and (home / "mirror" / "demo" / "csv" / "train.csv").is_file()


def readme_own_step(directory: Path) -> str:
    """The README's own-step module, written as `mysteps.py` in `directory`: its step's name."""
    module = re.search(r"## Your own step\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert module is not None
    (directory / "mysteps.py").write_text(module.group(1))
    found = re.search(r'@step\("([a-z-]+)"', module.group(1))
    assert found is not None
    return found.group(1)


def test_a_taken_port_stops_run_with_one_line_before_it_starts_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.run(
            [sys.executable, "-m", "tasks", "run", "--home", str(tmp_path / "home"), "--flower-port", str(port)],
            cwd=ROOT,
            env=unconfigured_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert process.returncode == 2 and process.stderr.count("\n") == 1, process
    assert f"port {port} (Flower) is taken" in process.stderr and not (tmp_path / "home").exists()


def test_flower_shows_the_steps_while_run_works_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    env = {**unconfigured_env(), "PYTHONPATH": str(ROOT)}
    ports = ["--flower-port", str(port), "--api-port", str(api_port)]
    own_step = readme_own_step(tmp_path)  # the README's own step, loaded by every process run starts
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks", "run", "--home", str(tmp_path), *ports, "--import", "mysteps"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        eventually(lambda: any("serving" in line for line in output), "the samples' pipelines", timeout=240)
        # A reader of the README enqueues a step while it serves: the CLI finds run's servers and settings
        # in the file it wrote, without any export.
        client_env = {**env, "STEPCACHE_RUN_ENV": str(tmp_path / "env")}
        limits = subprocess.run(
            [sys.executable, "-m", "tasks", "limits"], cwd=tmp_path, env=client_env, capture_output=True, text=True
        )
        assert limits.returncode == 0 and "QUEUE_MAX_JOBS_PER_NAMESPACE): 2" in limits.stdout, limits
        (tmp_path / "mirror" / "me" / "pets").mkdir(parents=True)
        (tmp_path / "mirror" / "me" / "pets" / "train.csv").write_text("name,legs\ncat,4\nbird,2\n")
        enqueued = subprocess.run(
            [sys.executable, "-m", "tasks", "enqueue", "dataset-config-names", "me/pets"],
            cwd=tmp_path,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert enqueued.returncode == 0, enqueued.stderr
        job_id = enqueued.stdout.strip()

        def flower_tasks() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=5) as answer:
                    tasks: dict[str, Any] = json.load(answer)
            except OSError:
                return None
            done = [t for t in tasks.values() if t["name"] == "split-first-rows" and "me/pets" in (t["args"] or "")]
            return tasks if job_id in tasks and done and done[0]["state"] == "SUCCESS" else None

        tasks = eventually(flower_tasks, "Flower showing the enqueued pipeline", timeout=240, every=0.5)
        assert tasks[job_id]["name"] == "dataset-config-names" and tasks[job_id]["state"] == "SUCCESS"
        first_rows = next(t for t in tasks.values() if t["name"] == "split-first-rows" and "me/pets" in t["args"])
        assert "'split': 'train'" in first_rows["kwargs"]
        status = subprocess.run(
            [sys.executable, "-m", "tasks", "status", "me/pets"],
            cwd=tmp_path,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "split-first-rows" in status.stdout and "200" in status.stdout
        own = subprocess.run(
            [sys.executable, "-m", "tasks", "status", "demo/csv"],
            cwd=tmp_path,
            env=client_env,
            capture_output=True,
            text=True,
        )
        assert own_step in own.stdout, own.stdout  # the README's own step ran in run's worker
        # The API it printed serves the same entry.
        assert f"API: http://localhost:{api_port}/docs" in "".join(output)
        query = "dataset=me/pets&config=default&split=train"
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/first-rows?{query}", timeout=30) as answer:
            assert answer.status == 200 and json.load(answer)["rows"][1]["row"] == {"name": "bird", "legs": 2}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        reader.join(timeout=10)
    assert process.returncode == 0, "".join(output)[-3000:]
    assert "stopped" in "".join(output) and not (tmp_path / "env").exists()
    for gone in (port, api_port):  # Flower and the API are gone with it
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", gone)) != 0

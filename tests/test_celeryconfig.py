"""celeryconfig.py is where Celery's settings live: what a real worker reports, a user's own module
through CELERY_CONFIG_MODULE, and the overrides the limiter cannot take."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.embedded import WorkerProcess
from tests.conftest import Stores

ROOT = Path(__file__).resolve().parent.parent


def conf_of(env: dict[str, str], *names: str) -> subprocess.CompletedProcess[str]:
    """`import tasks` in a new process with `env`, printing the default app's value of each setting."""
    script = f"import tasks; print(*(repr(tasks.app.conf[name]) for name in {names!r}), tasks.app._config_source)"
    return subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_running_worker_reports_the_settings_of_celeryconfig(stores: Stores, tmp_path: Path) -> None:
    from celery import Celery

    env = {**stores.env(), "WORKER_MAX_JOB_DURATION_SECONDS": "1234", "WORKER_HARD_LIMIT_GRACE_SECONDS": "6"}
    with WorkerProcess("conf", env, tmp_path / "worker.log", concurrency=1) as worker:
        probe = Celery(broker=stores.redis_url, set_as_current=False)
        try:
            replies = probe.control.inspect(destination=[worker.nodename], timeout=5).conf()  # `celery inspect conf`
        finally:
            probe.close()
    conf = replies[worker.nodename]
    assert conf["task_soft_time_limit"] == 1234 and conf["task_time_limit"] == 1240  # from stepcache's settings
    assert conf["task_acks_late"] is True and conf["worker_prefetch_multiplier"] == 1
    assert conf["task_routes"] == ["tasks.factory.route_step"] and conf["accept_content"] == ["json"]


def test_a_users_module_may_change_celerys_settings_but_not_what_the_limiter_needs(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("from celeryconfig import *\n\nresult_expires = 60\nworker_concurrency = 3\n")
    (tmp_path / "unsafe.py").write_text("from celeryconfig import *\n\ntask_acks_late = False\n")
    path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    default = conf_of(path, "result_expires", "task_acks_late")
    assert default.returncode == 0 and default.stdout.split() == ["86400", "True", "celeryconfig"], default.stderr
    mine = conf_of({**path, "CELERY_CONFIG_MODULE": "mine"}, "result_expires", "worker_concurrency", "task_acks_late")
    assert mine.returncode == 0 and mine.stdout.split() == ["60", "3", "True", "mine"], mine.stderr
    for module, words in (("unsafe", "unsafe sets task_acks_late=False"), ("nowhere", "cannot be imported")):
        refused = conf_of({**path, "CELERY_CONFIG_MODULE": module}, "task_acks_late")
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("stepcache: ") and words in refused.stderr


@pytest.mark.parametrize("name", ["task_serializer", "worker_prefetch_multiplier", "task_track_started"])
def test_every_protected_setting_is_refused_when_changed(tmp_path: Path, name: str) -> None:
    value = {"task_serializer": "'pickle'", "worker_prefetch_multiplier": "4", "task_track_started": "True"}[name]
    (tmp_path / "changed.py").write_text(f"from celeryconfig import *\n\n{name} = {value}\n")
    refused = conf_of({"PYTHONPATH": str(tmp_path), "CELERY_CONFIG_MODULE": "changed"}, name)
    assert refused.returncode == 2 and f"sets {name}=" in refused.stderr, refused

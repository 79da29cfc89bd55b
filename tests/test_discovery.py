"""Service discovery (common/registry.py, tasks/api/discovery.py): every worker and API process in the
registry while it lives, gone within the TTL when it dies, listed for Prometheus' HTTP service discovery,
and scraped by a real Prometheus (Debian's `prometheus` package)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from common.registry import (
    EXPIRY_KEY,
    PROCESSES_KEY,
    ProcessRecord,
    Registration,
    Role,
    get_registry,
    metrics_url,
    stepcache_version,
    this_process,
)
from tasks import run
from tasks.api.discovery import METRICS_URL_ENV
from tasks.embedded import ROOT, WorkerProcess, free_port
from tests import sample_steps
from tests.api_server import api_client
from tests.conftest import Stores, dbsize, use_settings
from tests.waiting import eventually
from tests.workers import sample_worker

pytestmark = pytest.mark.redis_topologies
OPERATOR_KEY = "discovery-operator-key-0123"
PROMETHEUS_HINT = (
    "prometheus not found on PATH: install Debian's package (apt-get install prometheus; .ci/run does) to run "
    "the service discovery tests against a real Prometheus"
)


def record(role: Role, pid: int, url: str | None, node: str | None = None) -> ProcessRecord:
    started = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    return ProcessRecord(
        role=role,
        host="box",
        pid=pid,
        node=node,
        queues=("heavy", "light") if role == Role.WORKER else (),
        concurrency=4 if role == Role.WORKER else None,
        version="1.2.3",
        metrics_url=url,
        started_at=started,
    )


def test_a_record_lives_while_renewed_and_expires_within_its_ttl_leaving_no_key(stores: Stores) -> None:
    registry, client = get_registry(), stores.redis()
    worker = record(Role.WORKER, 12, "http://box:9808/metrics", "w@box")
    registry.register(worker, 0.5)
    assert registry.live() == [worker]
    for _ in range(4):  # renewed past the first TTL: still there
        time.sleep(0.2)
        registry.register(worker, 0.5)
        assert registry.live() == [worker]
    renewed = time.monotonic()
    gone = eventually(lambda: not registry.live(), "the record expiring", timeout=2, every=0.02)
    assert gone and time.monotonic() - renewed <= 0.5 + 0.1
    # Both keys expire with the last record: a fleet that is gone leaves nothing behind.
    eventually(lambda: dbsize(client) == 0, "the registry's keys expiring", timeout=2, every=0.02)
    client.close()


def test_a_registration_renews_until_stopped_and_its_stop_removes_the_record_at_once(stores: Stores) -> None:
    started = datetime.now(UTC)
    registration = Registration(lambda: this_process(Role.API, started), ttl_seconds=0.6).start()
    registry = get_registry()
    mine = eventually(registry.live, "the record written at start", timeout=5, every=0.02)
    assert [(r.role, r.host, r.pid, r.started_at) for r in mine] == [
        (Role.API, socket.gethostname(), os.getpid(), started)
    ]
    time.sleep(1.5)  # more than twice the TTL: renewed meanwhile
    assert registry.live() == mine
    registration.stop()
    assert registry.live() == []
    client = stores.redis()
    assert client.exists(PROCESSES_KEY, EXPIRY_KEY) == 0
    client.close()


def test_a_metrics_url_names_the_advertised_host_or_the_listen_host_or_this_hosts_name(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert metrics_url("127.0.0.1", 9808) == "http://127.0.0.1:9808/metrics"
    assert metrics_url("0.0.0.0", 9808) == f"http://{socket.gethostname()}:9808/metrics"
    assert metrics_url("::", 9808) == f"http://{socket.gethostname()}:9808/metrics"
    assert metrics_url("::1", 9808) == "http://[::1]:9808/metrics"
    assert metrics_url("127.0.0.1", 0) is None  # no metrics served
    use_settings(clean_env, {"COMMON_REGISTRY_ADVERTISE_HOST": "worker-3.internal"})
    assert metrics_url("0.0.0.0", 9808) == "http://worker-3.internal:9808/metrics"


def test_the_prometheus_route_is_the_operators_and_lists_one_target_per_metrics_endpoint(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(METRICS_URL_ENV, raising=False)
    use_settings(monkeypatch, {"API_OPERATOR_KEY": OPERATOR_KEY})
    registry = get_registry()
    for process in (
        record(Role.WORKER, 12, "http://box:9808/metrics", "light@box"),
        record(Role.WORKER, 13, None, "heavy@box"),  # no metrics served: nothing to scrape
        record(Role.API, 21, "http://box:9809/metrics"),  # two processes of one `python -m tasks api`
        record(Role.API, 22, "http://box:9809/metrics"),
    ):
        registry.register(process, 30)
    with api_client() as client:
        # This API process registers itself too, with no metrics URL (its metrics are not served here).
        eventually(lambda: any(r.pid == os.getpid() for r in registry.live()), "the API's own record")
        assert client.get("/discovery/prometheus").status_code == 401
        wrong = client.get("/discovery/prometheus", headers={"Authorization": "Bearer wrong-key-0123456789"})
        assert (wrong.status_code, wrong.json()["error_code"]) == (401, "AuthenticationRequiredError")
        answer = client.get("/discovery/prometheus", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == [
        {
            "targets": ["box:9808"],
            "labels": {
                "job": "stepcache-worker",
                "role": "worker",
                "host": "box",
                "node": "light@box",
                "__meta_stepcache_pid": "12",
                "__meta_stepcache_version": "1.2.3",
                "__meta_stepcache_started_at": "2024-01-02T03:04:05+00:00",
                "__meta_stepcache_queues": "heavy,light",
                "__meta_stepcache_concurrency": "4",
            },
        },
        {
            "targets": ["box:9809"],
            "labels": {
                "job": "stepcache-api",
                "role": "api",
                "host": "box",
                "__meta_stepcache_pid": "21,22",
                "__meta_stepcache_version": "1.2.3",
                "__meta_stepcache_started_at": "2024-01-02T03:04:05+00:00",
                "__meta_stepcache_queues": "",
                "__meta_stepcache_concurrency": "",
            },
        },
    ]
    assert [r.pid for r in registry.live() if r.role == Role.API] == [21, 22]  # its own record removed at stop


# --- real processes ---------------------------------------------------------------------------------------


def by_node(records: list[ProcessRecord], count: int) -> dict[str | None, ProcessRecord]:
    """The records by node name, once there are `count` of them (empty before)."""
    return {record.node: record for record in records} if len(records) == count else {}


def worker_env(stores: Stores, monkeypatch: pytest.MonkeyPatch, ttl: float, **extra: str) -> dict[str, str]:
    return use_settings(
        monkeypatch, {**stores.env(), "COMMON_REGISTRY_TTL_SECONDS": str(ttl), "WORKER_METRICS_PORT": "0", **extra}
    )


def workers_command(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tasks", "workers"]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


@contextmanager
def stopped_at_the_end(worker: WorkerProcess) -> Iterator[WorkerProcess]:
    try:
        yield worker
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_worker_registers_when_ready_and_drops_out_within_the_ttl_when_killed(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl, port = 2.0, free_port()
    env = worker_env(stores, monkeypatch, ttl, WORKER_METRICS_PORT=str(port))
    registry = get_registry()
    killed, stopped = sample_worker("killed", env, tmp_path, concurrency=2), sample_worker("stopped", env, tmp_path)
    with killed, stopped_at_the_end(stopped):
        eventually(lambda: registry.live(), "the first worker's record")  # its metrics server started
        stopped.start()
        assert killed.process is not None and stopped.process is not None
        found = eventually(lambda: by_node(registry.live(), 2), "both workers' records")
        mine = found[killed.nodename]
        assert (mine.role, mine.host, mine.pid) == (Role.WORKER, socket.gethostname(), killed.process.pid)
        assert (mine.queues, mine.concurrency, mine.version) == (("heavy", "light"), 2, stepcache_version())
        assert mine.metrics_url == f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(mine.metrics_url).status_code == 200
        assert found[stopped.nodename].metrics_url is None  # the port was taken by the first: no metrics
        time.sleep(2 * ttl)  # renewed meanwhile
        assert {r.node for r in registry.live()} == {killed.nodename, stopped.nodename}
        # `python -m tasks workers`: the registry beside Celery's ping.
        listed = workers_command(env)
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.strip().startswith(killed.nodename))
        assert f" {killed.process.pid} " in row and " heavy,light " in row and row.rstrip().endswith("registry+ping")
        assert mine.metrics_url in row
        # A clean stop removes the record at once; a SIGKILL leaves it to expire within the TTL.
        stopped.stop()  # (a warm shutdown: the worker_shutdown signal)
        assert {r.node for r in registry.live()} == {killed.nodename}
        killed.kill()
        started = time.monotonic()
        eventually(lambda: not registry.live(), "the killed worker dropping out", timeout=2 * ttl, every=0.02)
        dropped_after = time.monotonic() - started
    print(f"a SIGKILLed worker dropped out of the registry {dropped_after:.2f} s after its death (TTL {ttl} s)")
    assert dropped_after <= ttl + 0.1
    nobody = workers_command(env)
    assert nobody.returncode == 3 and "no worker answered a ping, and none is in the registry" in nobody.stdout


@contextmanager
def monitored(redis_url: str) -> Iterator[redis.client.Monitor]:
    client = redis.Redis.from_url(redis_url)
    try:
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            yield monitor
    finally:
        client.close()


def renewals(monitor: redis.client.Monitor, process_id: str, seconds: float) -> int:
    """The registration calls of `process_id` Redis receives in the next `seconds` (by Redis' clock, the
    broker's polling keeps the monitor fed): script calls naming its keys and the process, not the commands
    that script runs, nor other processes' reads."""
    calls, start = 0, time.time()
    while (command := monitor.next_command())["time"] <= start + seconds:  # type: ignore[no-untyped-call]
        text = command["command"]
        if command["time"] < start:  # buffered while the caller was busy (enqueuing): before the window
            continue
        if command.get("client_type") != "lua" and PROCESSES_KEY in text and process_id in text:
            calls += 1
    return calls


@pytest.mark.slow
def test_registry_traffic_follows_the_processes_never_the_jobs(
    stores: Stores, celery_app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl, window, jobs = 1.5, 6.0, 400
    env = worker_env(stores, monkeypatch, ttl, TEST_SLEEP_SECONDS="0.01")
    client = redis.Redis.from_url(stores.redis_url)
    with sample_worker("traffic", env, tmp_path, concurrency=4), monitored(stores.redis_url) as monitor:
        (worker,) = eventually(get_registry().live, "the worker's record")
        idle = renewals(monitor, worker.process_id, window)
        for i in range(jobs):
            sample_steps.test_sleep.delay(f"ns{i}/ds")  # a namespace each: they run side by side
        done_before = client.llen(sample_steps.EXECUTIONS_KEY) // 2
        busy = renewals(monitor, worker.process_id, window)
        ran = client.llen(sample_steps.EXECUTIONS_KEY) // 2 - done_before
        registry_keys = sorted(key.decode() for key in client.scan_iter(match="*registry*"))
    client.close()
    expected = window / (ttl / 3)
    print(
        f"registry round trips in {window:.0f} s: {idle} idle, {busy} while {ran} jobs ran "
        f"(one renewal every {ttl / 3:.2f} s: {expected:.0f} expected; 6 a minute at the default TTL of 30 s)"
    )
    # Under MONITOR, on two cores, a worker runs a few jobs a second; 20 jobs are thousands of commands,
    # and one registry call a job would already be 5 times the renewals.
    assert ran >= 20, f"only {ran} jobs ran during the busy window: nothing was measured"
    assert abs(idle - expected) <= 1 and abs(busy - expected) <= 1, (idle, busy, expected)
    assert registry_keys == [EXPIRY_KEY, PROCESSES_KEY]  # two keys, whatever the number of jobs


# --- a real Prometheus --------------------------------------------------------------------------------------

# Prometheus' discovery manager hands new target lists to its scrape manager at most this often.
PROMETHEUS_UPDATE_SECONDS = 5
PROMETHEUS_CONFIG = """global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: stepcache
    http_sd_configs:
      - url: {api}/discovery/prometheus
        refresh_interval: 1s
        authorization:
          type: Bearer
          credentials: {key}
"""


@contextmanager
def prometheus(api_url: str, directory: Path) -> Iterator[httpx.Client]:
    """Prometheus on a free loopback port, discovering its targets through the API; a client of its HTTP API."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(PROMETHEUS_HINT)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(api=api_url, key=OPERATOR_KEY))
    port = free_port()
    command = [
        binary,
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={directory / 'data'}",
    ]
    log = directory / "prometheus.log"
    with (
        run.child(command, dict(os.environ), log) as process,
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as client,
    ):

        def ready() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                return client.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, "Prometheus ready", timeout=30)
        yield client


def targets(client: httpx.Client) -> list[dict[str, Any]]:
    answer = client.get("/api/v1/targets", params={"state": "active"}).json()
    active: list[dict[str, Any]] = answer["data"]["activeTargets"]
    return active


def target_of(client: httpx.Client, **labels: str) -> dict[str, Any] | None:
    return next((t for t in targets(client) if labels.items() <= t["labels"].items()), None)


def healthy(client: httpx.Client, **labels: str) -> dict[str, Any]:
    """The target with these labels once Prometheus scraped it successfully (empty before)."""
    target = target_of(client, **labels)
    return target if target is not None and target["health"] == "up" else {}


def discovered(api_url: str) -> str:
    answer = httpx.get(f"{api_url}/discovery/prometheus", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert answer.status_code == 200, answer.text
    return answer.text


@pytest.mark.slow
def test_prometheus_scrapes_a_worker_started_during_the_test_and_drops_it_within_the_ttl_once_killed(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("prometheus") is None:
        pytest.fail(PROMETHEUS_HINT)
    ttl, refresh = 3.0, 1.0
    api_port, api_metrics_port, worker_metrics_port = free_port(), free_port(), free_port()
    env = worker_env(
        stores,
        monkeypatch,
        ttl,
        API_OPERATOR_KEY=OPERATOR_KEY,
        API_METRICS_PORT=str(api_metrics_port),
        WORKER_METRICS_PORT=str(worker_metrics_port),
    )
    api_url = f"http://127.0.0.1:{api_port}"
    with (
        run.api(dict(os.environ), api_port, tmp_path / "api.log"),
        prometheus(api_url, tmp_path / "prometheus") as scraper,
    ):
        api_target = eventually(
            lambda: healthy(scraper, job="stepcache-api"), "the API's metrics, discovered and scraped"
        )
        assert api_target["labels"]["instance"] == f"127.0.0.1:{api_metrics_port}"
        assert target_of(scraper, job="stepcache-worker") is None
        worker = sample_worker("scraped", env, tmp_path, concurrency=2).start()
        try:
            up = eventually(lambda: healthy(scraper, node=worker.nodename), "the new worker, discovered and scraped")
            labels = up["labels"]
            assert (labels["job"], labels["role"], labels["host"]) == (
                "stepcache-worker",
                "worker",
                socket.gethostname(),
            )
            assert labels["instance"] == f"127.0.0.1:{worker_metrics_port}" and up["lastError"] == ""
            assert up["discoveredLabels"]["__meta_stepcache_queues"] == "heavy,light"
            samples = scraper.get("/api/v1/query", params={"query": f'up{{node="{worker.nodename}"}}'}).json()
            assert samples["data"]["result"][0]["value"][1] == "1"
            assert worker.nodename in discovered(api_url)
            worker.kill()
            killed = time.monotonic()
            eventually(
                lambda: worker.nodename not in discovered(api_url),
                "the killed worker gone from the API's discovery",
                timeout=2 * ttl,
                every=0.05,
            )
            out_of_discovery = time.monotonic() - killed
            eventually(
                lambda: target_of(scraper, node=worker.nodename) is None,
                "the killed worker gone from Prometheus' targets",
                timeout=ttl + refresh + PROMETHEUS_UPDATE_SECONDS + 5,
                every=0.05,
            )
            out_of_prometheus = time.monotonic() - killed
        finally:
            worker.stop()
        assert healthy(scraper, job="stepcache-api")
    print(
        f"killed worker: out of the API's discovery after {out_of_discovery:.2f} s, out of Prometheus' targets "
        f"after {out_of_prometheus:.2f} s (TTL {ttl} s, SD refresh {refresh} s)"
    )
    assert out_of_discovery <= ttl + 0.2
    assert out_of_prometheus <= ttl + refresh + PROMETHEUS_UPDATE_SECONDS + 1
